#!/usr/bin/env bash
# Builds the {{name}} stage and installs it as {{name}}.wasm in the plugins folder.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../..}"
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cd "$here"
cargo build --release --target wasm32-wasip2 --quiet
target="${CARGO_TARGET_DIR:-$here/target}/wasm32-wasip2/release"
cp "$target/{{crate}}.wasm" "$out/.{{name}}.wasm.tmp"
mv "$out/.{{name}}.wasm.tmp" "$out/{{name}}.wasm"
