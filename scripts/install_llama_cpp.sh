#!/usr/bin/env bash
# Build llama.cpp's Python bindings (llama-cpp-python, source distribution from the registry) into
# .venv, for `struprune export gguf`'s tests and the llama.cpp speed rows. Only the library is
# built (no server, tools, examples or multimodal library): 7 minutes measured on a
# 2-core machine that two benchmark jobs shared.
set -euo pipefail
cd "$(dirname "$0")/.."
if .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
    echo "llama-cpp-python already installed"; exit 0
fi
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
export CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
.venv/bin/python -m pip install --quiet -c constraints-cpu.txt --no-binary llama-cpp-python "llama-cpp-python==0.3.36"
.venv/bin/python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
