#!/usr/bin/env bash
# GPU decode benchmark (benchmarks/gpu_decode.py) on a CUDA machine: installs triton if missing, runs the
# kernel tests, then prints the GPU tables and writes runs/bench-gpu/{report.md,results.json,capacity.json,
# attention.json}.
#   bash benchmarks/gpu_decode.sh [extra gpu_decode.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -c "import triton" 2>/dev/null || $PY -m pip install -q "triton>=3.0"
$PY -m pytest -q tests/test_kernel.py
$PY benchmarks/gpu_decode.py --out runs/bench-gpu "$@"
