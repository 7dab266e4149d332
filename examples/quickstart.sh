#!/usr/bin/env bash
# Quick start: builds Quiver, starts a single node on 127.0.0.1:7400 with its data in
# ./quiver-data, creates a topic, produces a few events, consumes them back; then builds the
# filter-json plugin to WebAssembly, deploys it, and consumes only the events it keeps (the
# node filters before sending); and stops the node.
# Leave it running instead with: cargo run --release --bin quiver -- serve
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --bin quiver
cargo build --release --target wasm32-wasip2 -p quiver-plugin-filter-json
bin="${CARGO_TARGET_DIR:-target}/release/quiver"
data="${QUIVER_DATA_DIR:-quiver-data}"

"$bin" serve --data-dir "$data" --listen 127.0.0.1:7400 > quiver-serve.log 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  grep -q "quiver listening" quiver-serve.log && break
  if ! kill -0 $server 2>/dev/null; then
    echo "error: the node did not start; its log (quiver-serve.log):" >&2
    cat quiver-serve.log >&2
    exit 1
  fi
  sleep 0.1
done
grep -q "quiver listening" quiver-serve.log || { echo "error: the node did not start in 30 s" >&2; exit 1; }
export QUIVER_SERVER=127.0.0.1:7400 QUIVER_CA="$data/tls/ca.pem"

if ! out=$("$bin" topic create quickstart --partitions 3 2>&1); then
  case "$out" in
    *topic_already_exists*) echo "(topic quickstart already exists)" ;;
    *) echo "$out" >&2; exit 1 ;;
  esac
else
  echo "$out"
fi
"$bin" topic list
printf 'alice:signed up\nbob:signed up\nalice:ordered coffee\nbob:ordered tea\nalice:paid\n' \
  | "$bin" produce quickstart --key-separator : --header source=quickstart
echo "--- consumed (JSON):"
"$bin" consume quickstart --from-beginning --format json
"$bin" topic describe quickstart

echo "--- a Wasm plugin on the stream:"
wasm="${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release/quiver_plugin_filter_json.wasm"
if ! out=$("$bin" plugin deploy "$wasm" --name filter-json --version 1.0.0 2>&1); then
  case "$out" in
    *plugin_exists*) echo "(filter-json@1.0.0 is deployed with other bytes; using it)" ;;
    *) echo "$out" >&2; exit 1 ;;
  esac
else
  echo "$out"
fi
"$bin" topic create orders >/dev/null 2>&1 || true
printf '{"user":"alice","total":12}\n{"user":"bob","total":40}\n{"user":"carol","total":75}\n' \
  | "$bin" produce orders
echo "--- orders with total > 20, filtered on the node:"
"$bin" consume orders --from-beginning \
  --plugin filter-json --param field=total --param op=gt --param value=20
echo "--- node log: quiver-serve.log; data: $data"
