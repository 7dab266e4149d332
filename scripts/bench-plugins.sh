#!/usr/bin/env bash
# End-to-end cost of consumer-side filtering: `perf consume` of the same stored records with no
# plugin, and with plugins the node runs before sending. Prints one JSON line per run.
# Usage: scripts/bench-plugins.sh [DATA_DIR] [REPEATS]
# The plugins are built from plugins/ exactly as a user builds them (release, wasm32-wasip2)
# and deployed with `quiver plugin deploy`. Runs alternate, so drift of the machine spreads
# over all variants. Throughput counts the offsets the consumer moved past (what was read from
# the log), not only the records delivered.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --bin quiver >&2
cargo build --release --target wasm32-wasip2 -p quiver-plugin-sample -p quiver-plugin-filter-json >&2
target="${CARGO_TARGET_DIR:-target}"
bin="$target/release/quiver"
wasm="$target/wasm32-wasip2/release"
data="${1:-$(mktemp -d /tmp/quiver-bench-plugins.XXXXXX)}"
repeats="${2:-3}"
count="${COUNT:-5000000}"
port=7471
rm -rf "$data"
"$bin" serve --data-dir "$data" --listen 127.0.0.1:$port > "$data.serve.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do grep -q "quiver listening" "$data.serve.log" 2>/dev/null && break; sleep 0.1; done
export QUIVER_SERVER=127.0.0.1:$port QUIVER_CA="$data/tls/ca.pem"
"$bin" plugin deploy "$wasm/quiver_plugin_sample.wasm" --name sample --version 1.0.0 >&2
"$bin" plugin deploy "$wasm/quiver_plugin_filter_json.wasm" --name filter-json --version 1.0.0 >&2
run() { echo "# quiver perf $*" >&2; "$bin" perf "$@" --json; }
run produce --topic logs --record-bytes 100 --count "$count" --values json
for i in $(seq 1 "$repeats"); do
  run consume --topic logs --count "$count"
  run consume --topic logs --count "$count" --plugin sample --param rate=1
  run consume --topic logs --count "$count" --plugin sample --param rate=2
  run consume --topic logs --count "$count" --plugin filter-json \
    --param field=level --param op=eq --param value=error
done
"$bin" plugin describe sample >&2
"$bin" plugin describe filter-json >&2
