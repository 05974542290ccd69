#!/usr/bin/env bash
# One transform in three languages, timed like for like: the currency
# stage in Rust (currency_rust.wasm), Python (currency.wasm, componentize-py)
# and JavaScript (currency_js.wasm, componentize-js), which give identical
# output row by row (host/tests/languages.rs), each run by
# `host plugin test` over the same events in batches of the same size.
#
#   benches/languages.sh [EVENTS] [RUNS]
#
# 1. generates EVENTS events (default 100,000; `host generate --seed 1`,
#    no duplicates, no malformed rows) into one CSV file;
# 2. warms the compile cache with one run per component over a small
#    sample, so no timed run compiles (Python and JS take seconds to);
# 3. runs each component RUNS times (default 3) over all events, batches
#    of 5000, and keeps the best in-stage rate (the machine is shared) and
#    the wall time of that run (process start, cache load, CSV parse
#    included);
# 4. checks that the three outputs are identical, prints a table and
#    writes it as JSON to target/bench-languages/result.json.
set -euo pipefail
cd "$(dirname "$0")/.."
events="${1:-100000}"
runs="${2:-3}"
batch=5000
work="target/bench-languages"
host=target/release/host
config=(--config "rates=USD:1.0,EUR:0.92" --config target-currency=EUR)
[ -x "$host" ] || cargo build --release -p host
[ -f plugins/currency_rust.wasm ] || bash plugins/rust/build.sh
[ -f plugins/currency.wasm ] || bash plugins/python/currency/build.sh
[ -f plugins/currency_js.wasm ] || bash plugins/js/currency/build.sh
rm -rf "$work/input" && mkdir -p "$work/cache"

per_file=10000
files=$(( (events + per_file - 1) / per_file ))
[ "$events" -lt "$per_file" ] && per_file=$events
"$host" generate --output "$work/input" --files "$files" --events-per-file "$per_file" \
  --duplicate-rate 0 --invalid-rate 0 --seed 1 --interval 0 >/dev/null 2>&1
first=$(ls "$work"/input/*.csv | head -1)
{ head -1 "$first"; tail -q -n +2 "$work"/input/*.csv | awk -v n="$events" 'NR <= n'; } > "$work/events.csv"
head -101 "$work/events.csv" > "$work/warm.csv"

langs=(rust python js)
declare -A component=([rust]=plugins/currency_rust.wasm [python]=plugins/currency.wasm [js]=plugins/currency_js.wasm)
declare -A label=([rust]="Rust (wit-bindgen)" [python]="Python (componentize-py)" [js]="JavaScript (componentize-js)")
declare -A best_eps best_wall digest
for lang in "${langs[@]}"; do
  "$host" plugin test "${component[$lang]}" --input "$work/warm.csv" "${config[@]}" \
    --cache-dir "$work/cache" --json >/dev/null 2>&1
  best_eps[$lang]=0
  for run in $(seq "$runs"); do
    out="$work/$lang.$run.jsonl"
    start=$(date +%s.%N)
    "$host" plugin test "${component[$lang]}" --input "$work/events.csv" "${config[@]}" \
      --batch-size "$batch" --cache-dir "$work/cache" --json >"$out" 2>/dev/null
    wall=$(printf "%.3f" "$(echo "$(date +%s.%N) - $start" | bc)")
    eps=$(tail -1 "$out" | jq '.summary.events_per_second | floor')
    if [ "$eps" -gt "${best_eps[$lang]}" ]; then best_eps[$lang]=$eps; best_wall[$lang]=$wall; fi
  done
  digest[$lang]=$(head -n -1 "$work/$lang.1.jsonl" | sha256sum | cut -c1-16)
done

identical=yes
for lang in "${langs[@]}"; do [ "${digest[$lang]}" = "${digest[rust]}" ] || identical=no; done

printf '%d events, batches of %d, best of %d runs, compile cache warm\n\n' "$events" "$batch" "$runs"
printf '| %-30s | %14s | %10s | %13s | %10s |\n' language "events/s" "ns/event" "x Rust time" "wall (s)"
printf '|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..32})" "$(printf -- '-%.0s' {1..16})" \
  "$(printf -- '-%.0s' {1..12})" "$(printf -- '-%.0s' {1..15})" "$(printf -- '-%.0s' {1..12})"
json_rows=()
for lang in "${langs[@]}"; do
  eps=${best_eps[$lang]}
  ns=$(( 1000000000 / eps ))
  slower=$(echo "scale=1; ${best_eps[rust]} / $eps" | bc)
  printf '| %-30s | %14s | %10s | %13s | %10.2f |\n' "${label[$lang]}" "$eps" "$ns" "$slower" "${best_wall[$lang]}"
  json_rows+=("{\"language\": \"$lang\", \"component\": \"${component[$lang]}\", \"events_per_second\": $eps, \"ns_per_event\": $ns, \"wall_s\": ${best_wall[$lang]}, \"output_sha256_16\": \"${digest[$lang]}\"}")
done
printf '\noutputs identical across languages: %s\n' "$identical"
{
  printf '{"events": %d, "batch_size": %d, "runs": %d, "outputs_identical": %s,\n "commit": "%s",\n "languages": [\n  ' \
    "$events" "$batch" "$runs" "$([ $identical = yes ] && echo true || echo false)" \
    "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  (IFS=$'\n'; echo "${json_rows[*]}") | paste -sd, | sed 's/},{/},\n  {/g'
  printf ' ]}\n'
} > "$work/result.json"
python3 -m json.tool "$work/result.json" >/dev/null
echo "written: $work/result.json"
[ "$identical" = yes ]
