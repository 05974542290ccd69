#!/usr/bin/env bash
# Builds the {{name}} stage and installs it as {{name}}.wasm in the plugins folder.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../..}"
if [ ! -x "$here/.venv/bin/componentize-py" ]; then
  python3 -m venv "$here/.venv"
  "$here/.venv/bin/pip" install -q componentize-py==0.25.1
fi
cd "$here"
"$here/.venv/bin/componentize-py" -d wit -w plugin componentize app -o "$out/.{{name}}.wasm.tmp" >/dev/null
mv "$out/.{{name}}.wasm.tmp" "$out/{{name}}.wasm"
