#!/usr/bin/env bash
# Run every test. The tests use the two public reference models; they are pulled into the
# local store ($SMELT_HOME, default ~/.cache/smelt) on first run and reused afterwards. The
# server tests need python3 (pip) and node (npm) for the official OpenAI client packages.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p smelt
for m in qwen2.5-coder-0.5b-instruct gemma-3-270m; do
  ./target/release/smelt pull "$m" >/dev/null
done
# The server tests drive smelt with the official OpenAI client packages.
python3 -m pip install -q --disable-pip-version-check -r tests/clients/python/requirements.txt
npm ci --prefix tests/clients/node --silent --no-audit --no-fund
cargo test --workspace "$@"
