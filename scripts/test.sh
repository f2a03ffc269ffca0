#!/usr/bin/env bash
# Run every test. The tests use the two public reference models; they are pulled into the
# local store ($SMELT_HOME, default ~/.cache/smelt) on first run and reused afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p smelt
for m in qwen2.5-coder-0.5b-instruct gemma-3-270m; do
  ./target/release/smelt pull "$m" >/dev/null
done
cargo test --workspace "$@"
