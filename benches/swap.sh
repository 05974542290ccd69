#!/usr/bin/env bash
# Hot-swap benchmark: while `host run` ingests a steady stream, a new build
# of the transform stage is renamed into plugins/, and we measure
#   - swap latency: from the rename to the commit of the first batch that
#     the new version processed (pipeline.batches.committed_at and
#     stages->0->>'hash'), cold (a component never compiled) and cached
#     (one already in the compile cache);
#   - the throughput dip: rows/s committed from the rename until 2 s after
#     the first new batch, against the 10 s before the rename; and the
#     worst batch latency in each window.
#
#   benches/swap.sh [EVENTS_PER_SECOND] [DATABASE_URL_OF_A_SCRATCH_SERVER]
#
# "New builds" are the shipped transform.wasm with a custom section
# appended (a unique payload each): the same code under a new content
# hash, so the host treats each as a new version and, the first time,
# compiles it. Swaps: cold, cached (back to the original), cold, cached
# (the first variant again). Prints a table and writes
# target/bench-swap/result.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export PGOPTIONS="-c client_min_messages=warning"
rate="${1:-2000}"
admin="${2:-postgres://postgres@127.0.0.1:5432/postgres}"
work="target/bench-swap"
host=target/release/host
[ -x "$host" ] || cargo build --release -p host
[ -f plugins/transform.wasm ] || bash plugins/rust/build.sh
rm -rf "$work" && mkdir -p "$work/plugins" "$work/input" "$work/variants"
cp plugins/transform.wasm plugins/dedup.wasm plugins/pipeline.toml "$work/plugins/"

db="bench_swap_$$"
url="${admin%/*}/$db"
psql -q "$admin" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql -q "$admin" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# A variant: same code, new hash (custom section "bench", 16-byte payload).
variant() {
  cp plugins/transform.wasm "$1"
  printf '\x00\x16\x05bench%016d' "$2" >> "$1"
}
variant "$work/variants/a.wasm" "$$"
variant "$work/variants/b.wasm" "$(( $$ + 1 ))"
cp plugins/transform.wasm "$work/variants/original.wasm"

"$host" run --plugins "$work/plugins" --input "$work/input" --database-url "$url" \
  --state-dir "$work/state" --cache-dir "$work/cache" --metrics-addr off \
  --batch-interval 1s 2>"$work/host.log" >"$work/host.out" &
pids+=($!)
# Ten files a second.
"$host" generate --output "$work/input" --interval 100ms --events-per-file $(( rate / 10 )) \
  --duplicate-rate 0.01 --seed 7 2>/dev/null >/dev/null &
pids+=($!)
sleep 15

q() { psql -Atq "$url" -c "$1"; }
now() { date +%s.%N; }
results=()
swap() { # label file
  local label="$1" file="$2" hash t0 t1 waited=0
  hash=$(sha256sum "$file" | cut -d' ' -f1)
  # Copied ahead of time, so the rename is the only event measured.
  cp "$file" "$work/plugins/.transform.wasm.tmp"
  sleep 1
  t0=$(now)
  mv "$work/plugins/.transform.wasm.tmp" "$work/plugins/transform.wasm"
  t1=""
  while [ -z "$t1" ]; do
    t1=$(q "SELECT extract(epoch FROM min(committed_at)) FROM pipeline.batches
            WHERE stages->0->>'hash' = '$hash' AND committed_at >= to_timestamp($t0)")
    if [ -z "$t1" ]; then
      sleep 0.05; waited=$(( waited + 1 ))
      [ "$waited" -lt 1200 ] || { echo "no batch from $label after 60 s" >&2; exit 1; }
    fi
  done
  sleep 3
  local swap_ms before around lat_before lat_around
  swap_ms=$(echo "($t1 - $t0) * 1000 / 1" | bc)
  before=$(q "SELECT round(coalesce(sum(rows_in), 0) / 10.0) FROM pipeline.batches
              WHERE committed_at >= to_timestamp($t0 - 10) AND committed_at < to_timestamp($t0)")
  around=$(q "SELECT round(coalesce(sum(rows_in), 0) / ($t1 + 2 - $t0)) FROM pipeline.batches
              WHERE committed_at >= to_timestamp($t0) AND committed_at < to_timestamp($t1 + 2)")
  lat_before=$(q "SELECT round(coalesce(max(latency_ms), 0)) FROM pipeline.batches
              WHERE committed_at >= to_timestamp($t0 - 10) AND committed_at < to_timestamp($t0)")
  lat_around=$(q "SELECT round(coalesce(max(latency_ms), 0)) FROM pipeline.batches
              WHERE committed_at >= to_timestamp($t0) AND committed_at < to_timestamp($t1 + 2)")
  printf '%-22s %10s %14s %14s %16s %16s\n' "$label" "$swap_ms" "$before" "$around" "$lat_before" "$lat_around"
  results+=("{\"swap\": \"$label\", \"rename_to_first_batch_ms\": $swap_ms, \"rows_per_s_before\": $before, \"rows_per_s_around\": $around, \"max_batch_latency_ms_before\": $lat_before, \"max_batch_latency_ms_around\": $lat_around}")
  sleep 8
}

printf '%-22s %10s %14s %14s %16s %16s\n' "swap" "ms" "rows/s before" "rows/s around" "max lat before" "max lat around"
swap "cold (new hash)" "$work/variants/a.wasm"
swap "cached (original)" "$work/variants/original.wasm"
swap "cold (new hash)" "$work/variants/b.wasm"
swap "cached (variant a)" "$work/variants/a.wasm"

kill -TERM "${pids[1]}" 2>/dev/null || true
sleep 2
kill -TERM "${pids[0]}" 2>/dev/null || true
wait "${pids[0]}" 2>/dev/null || true
pids=()
rows=$(q "SELECT count(*) FROM ecommerce_events")
swaps_logged=$(grep -c "stage version swapped in" "$work/host.log" || true)
echo "rows written: $rows; swaps logged: $swaps_logged; generator rate: $rate events/s"
{
  echo "{\"rate_events_per_s\": $rate, \"rows\": $rows, \"commit\": \"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\","
  echo " \"swaps\": ["
  (IFS=,; echo "  ${results[*]}")
  echo " ]}"
} > "$work/result.json"
echo "written: $work/result.json"
