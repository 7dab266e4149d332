#!/usr/bin/env bash
# Installs what building and testing Quiver needs on a machine that has only rustup and cargo:
# the pinned toolchain (rust-toolchain.toml) with rustfmt, clippy and the wasm32-wasip2 target.
# Idempotent and quiet when everything is already there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if ! command -v rustup >/dev/null 2>&1; then
  echo "rustup is required (https://rustup.rs)" >&2
  exit 1
fi
rustup toolchain list | grep -q "^$toolchain" || rustup toolchain install "$toolchain" --profile minimal
rustup component list --toolchain "$toolchain" --installed | grep -q '^rustfmt' || rustup component add --toolchain "$toolchain" rustfmt
rustup component list --toolchain "$toolchain" --installed | grep -q '^clippy' || rustup component add --toolchain "$toolchain" clippy
rustup target list --toolchain "$toolchain" --installed | grep -q '^wasm32-wasip2$' || rustup target add --toolchain "$toolchain" wasm32-wasip2
# Reuse a target directory outside the checkout when one is there (CI keeps one between runs).
if [ -z "${CARGO_TARGET_DIR:-}" ] && [ -d /work/target ]; then
  export CARGO_TARGET_DIR=/work/target
fi
