#!/usr/bin/env bash
# Runs every test: unit, property, crash, end-to-end (real QUIC + real files) and CLI tests, and
# checks that the fuzz targets compile. Bounded: each test stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo test --workspace --locked
# The fuzz targets live outside the workspace (cargo-fuzz layout); make sure they still build.
if [ -f fuzz/Cargo.toml ]; then
  cargo build --manifest-path fuzz/Cargo.toml --bins
fi
echo "all tests passed"
