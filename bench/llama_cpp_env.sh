#!/usr/bin/env bash
# Build the separate venv that runs llama.cpp (llama-cpp-python, compiled from its PyPI sdist for this CPU) and the
# `gguf` writer for bench/engine.py. Idempotent.
#
# Owns: bench/.venv-llama only (git-ignored). Never touches the project venv.
# Contract: exits 0 with $VENV/bin/python able to `import llama_cpp, gguf`, or non-zero with the reason on stderr.
# The build is native (GGML_NATIVE: the instruction sets of this CPU, as a llama.cpp user builds it) with OpenMP,
# and skips llama.cpp's tools, tests and examples (the bench only loads the library); it takes minutes on 2 cores.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/peer_venv.sh"
VENV="${LLAMA_CPP_VENV:-$HERE/.venv-llama}"
LLAMA_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
GGUF_VERSION="0.19.0"
STAMP="$VENV/.llama-cpp-$LLAMA_VERSION-stamp"
CHECK="import llama_cpp, gguf; print('llama-cpp-python', llama_cpp.__version__, 'gguf', '$GGUF_VERSION')"

peer_venv_open "$VENV" "$STAMP" "$CHECK" "llama.cpp"
"${PIP[@]}" install -q "gguf==$GGUF_VERSION" numpy safetensors
CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "${PIP[@]}" install -q --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_VERSION"
peer_venv_close "$VENV" "$STAMP" "$CHECK" "llama.cpp"
