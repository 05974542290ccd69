#!/usr/bin/env bash
# Builds the JavaScript mask_users stage into mask_users.wasm in the plugins
# folder (or $1), installing componentize-js from npm when missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/../..}"
cd "$here"
# npm ci installs exactly the lockfile and never rewrites it.
[ -x node_modules/.bin/componentize-js ] || npm ci --silent --no-audit --no-fund
mkdir -p "$out"
node_modules/.bin/componentize-js --wit ../../../wit -n plugin -d http fetch-event -o "$out/.mask_users.wasm.tmp" stage.js >/dev/null
mv "$out/.mask_users.wasm.tmp" "$out/mask_users.wasm"
