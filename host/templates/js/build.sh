#!/usr/bin/env bash
# Builds the {{name}} stage and installs it as {{name}}.wasm in the plugins folder.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../..}"
cd "$here"
[ -x node_modules/.bin/componentize-js ] || npm install --silent --no-audit --no-fund
node_modules/.bin/componentize-js --wit wit -n plugin -d http fetch-event -o "$out/.{{name}}.wasm.tmp" stage.js >/dev/null
mv "$out/.{{name}}.wasm.tmp" "$out/{{name}}.wasm"
