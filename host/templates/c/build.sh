#!/usr/bin/env bash
# Builds the {{name}} stage (C) and installs it as {{name}}.wasm in the plugins folder.
#
# What it needs is installed the first time, when missing (Debian):
#   apt:    clang-19, lld-19, wasi-libc, libclang-rt-19-dev-wasm32 (the compiler,
#           the linker, the C library for wasm32-wasi, the compiler's runtime)
#   cargo:  wit-bindgen-cli 0.63 (the C bindings of the WIT contract), kept
#           under ~/.cache/ecommerce-pipeline/c-toolchain
#   rustup: the wasm32-wasip2 target, whose wasm-component-ld links the
#           module and turns it into a component with the WASI preview 1
#           reactor adapter (Debian's wasi-libc speaks preview 1)
# Later builds take about a second.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../..}"
llvm="${LLVM_VERSION:-19}"
tools="${XDG_CACHE_HOME:-$HOME/.cache}/ecommerce-pipeline/c-toolchain"

runtime=/usr/lib/llvm-$llvm/lib/clang/$llvm/lib/wasi/libclang_rt.builtins-wasm32.a
if ! command -v "clang-$llvm" >/dev/null || [ ! -x "/usr/lib/llvm-$llvm/bin/wasm-ld" ] \
   || [ ! -f /usr/lib/wasm32-wasi/libc.a ] || [ ! -f "$runtime" ]; then
  echo "installing clang-$llvm, lld-$llvm, wasi-libc and libclang-rt-$llvm-dev-wasm32 (apt)" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
    "clang-$llvm" "lld-$llvm" wasi-libc "libclang-rt-$llvm-dev-wasm32" >/dev/null
fi

wit_bindgen="$tools/bin/wit-bindgen"
if ! "$wit_bindgen" --version 2>/dev/null | grep -q ' 0\.63\.'; then
  echo "installing wit-bindgen-cli 0.63 into $tools (cargo, once)" >&2
  cargo install wit-bindgen-cli --version '~0.63' --locked --root "$tools" --quiet
fi

rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
linker="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/wasm-component-ld"
[ -x "$linker" ] || { echo "no wasm-component-ld at $linker (rustup's wasm32-wasip2 target)" >&2; exit 1; }

# The bindings are generated from the contract at every build: gen/ is not
# yours to edit.
"$wit_bindgen" c "$here/wit" --world plugin --out-dir "$here/gen" >/dev/null
"clang-$llvm" --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Werror \
  -I"$here/gen" "$here/stage.c" "$here/gen/plugin.c" "$here/gen/plugin_component_type.o" \
  -fuse-ld="$linker" -Wl,--wasi-adapter=reactor \
  -o "$out/.{{name}}.wasm.tmp"
mv "$out/.{{name}}.wasm.tmp" "$out/{{name}}.wasm"
