#!/usr/bin/env bash
# Throughput benchmark: the pipeline end to end against the COPY ceiling
# of the same server, in one run.
#
#   benches/throughput.sh [EVENTS] [DATABASE_URL_OF_A_SCRATCH_SERVER]
#
# 1. generates EVENTS events (default 1,000,000; 1% duplicates) in files
#    of 10,000;
# 2. ceiling: COPY of the same (distinct) rows straight into an empty
#    copy of the table, primary key included;
# 3. pipeline: `host run --once` with the shipped transform and dedup over
#    the same files into an empty table;
# 4. prints events/s, the ratio to the ceiling, per-part times from the
#    batch records, and the host's peak RSS; writes it as JSON too.
set -euo pipefail
cd "$(dirname "$0")/.."
events="${1:-1000000}"
admin="${2:-postgres://postgres@127.0.0.1:5432/postgres}"
files=$(( (events + 9999) / 10000 ))
work="target/bench"
host=target/release/host
rm -rf "$work" && mkdir -p "$work"
[ -x "$host" ] || cargo build --release -p host
[ -f plugins/transform.wasm ] || bash plugins/rust/build.sh

db="bench_$$"
url="${admin%/*}/$db"
psql -q "$admin" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
trap 'psql -q "$admin" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true' EXIT

"$host" generate --output "$work/input" --files "$files" --events-per-file 10000 \
  --duplicate-rate 0.01 --invalid-rate 0 --seed 1 --interval 0 2>/dev/null >/dev/null

# The ceiling table has the same primary key; COPY refuses duplicates, so
# it gets the distinct rows (prepared before the clock starts).
tail -q -n +2 "$work"/input/*.csv | sort -u -t, -k1,1 > "$work/distinct.csv"
psql -q "$url" -c "CREATE TABLE ceiling (event_id VARCHAR(36) PRIMARY KEY, user_id INT NOT NULL, event_type VARCHAR(20) NOT NULL,
  product_id INT NOT NULL, price NUMERIC(10,2) NOT NULL, event_time TIMESTAMP NOT NULL)"
start=$(date +%s.%N)
psql -q "$url" -c "\\copy ceiling FROM '$work/distinct.csv' WITH (FORMAT csv)"
ceiling_s=$(echo "$(date +%s.%N) - $start" | bc)

start=$(date +%s.%N)
/usr/bin/time -f "%M" -o "$work/rss_kb" "$host" run --plugins plugins --input "$work/input" \
  --database-url "$url" --once --metrics-addr off --state-dir "$work/state" 2>"$work/host.log" >"$work/host.out"
pipeline_s=$(echo "$(date +%s.%N) - $start" | bc)

rows=$(psql -Atq "$url" -c "SELECT count(*) FROM ecommerce_events")
stage_ms=$(psql -Atq "$url" -c "SELECT s->>'name', round(sum((s->>'ms')::numeric)) FROM pipeline.batches, jsonb_array_elements(stages) s GROUP BY 1" | tr '\n' ' ')
rss_mb=$(( $(cat "$work/rss_kb") / 1024 ))
ceiling_eps=$(echo "$events / $ceiling_s" | bc)
pipeline_eps=$(echo "$events / $pipeline_s" | bc)
ratio=$(echo "scale=2; $pipeline_eps / $ceiling_eps" | bc)

printf '%-28s %s\n' "events" "$events" "rows written" "$rows" \
  "COPY ceiling" "${ceiling_s}s  ${ceiling_eps} events/s" \
  "pipeline (--once)" "${pipeline_s}s  ${pipeline_eps} events/s" \
  "ratio to ceiling" "$ratio" "stage time (ms)" "$stage_ms" "host peak RSS" "${rss_mb} MB"
cat > "$work/result.json" <<JSON
{"events": $events, "rows": $rows, "ceiling_s": $ceiling_s, "ceiling_eps": $ceiling_eps,
 "pipeline_s": $pipeline_s, "pipeline_eps": $pipeline_eps, "ratio": $ratio, "peak_rss_mb": $rss_mb,
 "commit": "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"}
JSON
echo "written: $work/result.json"
