#!/usr/bin/env bash
# llama.cpp for tests/test_engines.py: llama-cpp-python built from its sdist into its own venv.
#
#   engines/llama_cpp.sh                      # venv: ~/.cache/ecomla/engines/llama-cpp
#   LLAMA_CPP_VENV=/some/venv engines/llama_cpp.sh
#   python -m pytest -m engines tests/test_engines.py -rs     # the checks (reads the same LLAMA_CPP_VENV)
#
# What it makes, all under ECOMLA_ENGINES (default ~/.cache/ecomla/engines):
#   - wheels/llama_cpp_python-VERSION-*.whl: the built wheel, cached: a second run installs it without rebuilding
#     (it is built for this machine's CPU, GGML_NATIVE, so the cache is per machine);
#   - LLAMA_CPP_VENV (default llama-cpp/): a venv with that wheel and its runtime dependencies (numpy, jinja2,
#     diskcache, typing-extensions), apart from ecomla's (the engine needs no torch).
# Workaround: built from the sdist, as PyPI has no wheel of llama-cpp-python for Linux x86_64. The build takes one
# core (JOBS, default 1, CMAKE_BUILD_PARALLEL_LEVEL) at nice 19 so a shared machine keeps its other work, and skips
# the multimodal library (CMAKE_ARGS default -DLLAVA_BUILD=OFF: llama_cpp loads it only for image chat handlers).
set -euo pipefail

VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
ENGINES=${ECOMLA_ENGINES:-$HOME/.cache/ecomla/engines}
VENV=${LLAMA_CPP_VENV:-$ENGINES/llama-cpp}
WHEELS=$ENGINES/wheels
SDIST_DIR=$ENGINES/sdist
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-1}
export CMAKE_ARGS=${CMAKE_ARGS:--DLLAVA_BUILD=OFF}
SDIST=$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz

mkdir -p "$WHEELS" "$SDIST_DIR"
if [ ! -f "$SDIST" ]; then
    "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SDIST_DIR"
fi

wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    echo "building llama-cpp-python $VERSION from its sdist with $JOBS job(s), CMAKE_ARGS=$CMAKE_ARGS (minutes)"
    start=$(date +%s)
    CMAKE_BUILD_PARALLEL_LEVEL=$JOBS nice -n 19 "$PYTHON" -m pip wheel --no-deps -w "$WHEELS" "$SDIST"
    echo "built in $(( $(date +%s) - start )) s"
    wheel=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
else
    echo "cached wheel: $wheel (no rebuild)"
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$wheel"

"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'in $VENV')"
