#!/usr/bin/env bash
# Builds the Python currency stage into currency.wasm in the plugins folder
# (or $1), installing componentize-py into a local venv when missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../..}"
if [ ! -x "$here/.venv/bin/componentize-py" ]; then
  python3 -m venv "$here/.venv"
  "$here/.venv/bin/pip" install -q componentize-py==0.25.1
fi
cd "$here"
mkdir -p "$out"
"$here/.venv/bin/componentize-py" -d ../../../wit -w plugin componentize app -o "$out/.currency.wasm.tmp" >/dev/null
mv "$out/.currency.wasm.tmp" "$out/currency.wasm"
