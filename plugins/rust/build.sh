#!/usr/bin/env bash
# Builds the shipped Rust stages for wasm32-wasip2 and installs them into
# the plugins folder (or the folder given as $1) by write-then-rename, so a
# running host never loads half a file.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/..}"
rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cd "$here"
cargo build --release --target wasm32-wasip2 --quiet
target="${CARGO_TARGET_DIR:-$here/target}/wasm32-wasip2/release"
mkdir -p "$out"
# crate:installed name. The Rust currency stage is installed under its own
# name beside the Python one (currency.wasm) it mirrors.
for pair in transform:transform dedup:dedup currency:currency_rust; do
  crate="${pair%%:*}" stage="${pair#*:}"
  cp "$target/$crate.wasm" "$out/.$stage.wasm.tmp"
  mv "$out/.$stage.wasm.tmp" "$out/$stage.wasm"
done
