#!/usr/bin/env bash
# Build llama-cpp-python from its source distribution into a venv of its own, for
# benchmarks/llama_cpp.py (not part of `make test`; nothing of llama.cpp is committed).
#
#   bash benchmarks/llama_cpp_setup.sh [VENV]   # default VENV: .venv-llama (15-25 min on 2 quiet cores)
#
# The same sdist ships llama.cpp's `convert_hf_to_gguf.py` (and its `gguf-py`): the script
# unpacks it beside the venv, so the benchmark converts our checkpoint with the converter of the
# very llama.cpp it runs. Built for this machine (GGML_NATIVE): rebuild on another CPU.
set -euo pipefail

VERSION=0.3.36
VENV=${1:-.venv-llama}
PYTHON=${PYTHON:-python3}
SRC="$VENV/src"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q -U pip
fi
mkdir -p "$SRC"
if [ ! -f "$SRC/llama_cpp_python-$VERSION.tar.gz" ]; then
    "$VENV/bin/pip" download -q --no-binary :all: --no-deps -d "$SRC" "llama-cpp-python==$VERSION"
fi
if [ ! -d "$SRC/llama_cpp_python-$VERSION" ]; then
    tar -xzf "$SRC/llama_cpp_python-$VERSION.tar.gz" -C "$SRC"
fi
# The converter's own needs (numpy, sentencepiece, safetensors, torch for reading tensors) and
# the benchmark's: the CPU torch pinned as in the Makefile (on disk here, no CUDA wheels).
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q numpy sentencepiece safetensors "transformers>=4.46" protobuf
"$VENV/bin/pip" install -q -e "$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "building llama-cpp-python $VERSION (native CPU build; 15-25 minutes on 2 cores)" >&2
    # Only the library: no llava/mtmd, tools, tests or examples. The build folder is kept, so
    # an interrupted build resumes where it stopped.
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        "$VENV/bin/pip" install -q -C "build-dir=$(realpath "$SRC")/build" "$SRC/llama_cpp_python-$VERSION"
fi
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
echo "converter: $SRC/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py"
