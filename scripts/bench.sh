#!/usr/bin/env bash
# Runs the benchmarks of BENCHMARKS.md against a fresh single node on loopback and prints one
# JSON line per run. Usage: scripts/bench.sh [DATA_DIR] [REPEATS]
# The data directory decides the storage under test (default: a fresh directory under /tmp, on
# the machine's disk). Every figure is printed next to `perf transport`, measured in the same
# run with the same transport settings.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --bin quiver >&2
bin="${CARGO_TARGET_DIR:-target}/release/quiver"
data="${1:-$(mktemp -d /tmp/quiver-bench.XXXXXX)}"
repeats="${2:-3}"
port=7470
rm -rf "$data"
"$bin" serve --data-dir "$data" --listen 127.0.0.1:$port > "$data.serve.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true; rm -rf "$data"' EXIT
for _ in $(seq 1 100); do grep -q "quiver listening" "$data.serve.log" 2>/dev/null && break; sleep 0.1; done
export QUIVER_SERVER=127.0.0.1:$port QUIVER_CA="$data/tls/ca.pem"
# QUIC over loopback drops packets when UDP socket buffers overflow, which shows up as tail
# latency; the node asks for 8 MiB buffers, which Linux caps at net.core.rmem_max/wmem_max.
echo "# net.core.rmem_max=$(sysctl -n net.core.rmem_max) net.core.wmem_max=$(sysctl -n net.core.wmem_max)" >&2
run() { echo "# quiver perf $*" >&2; "$bin" perf "$@" --json; }
fresh() { "$bin" topic delete "$1" >/dev/null 2>&1 || true; }

for i in $(seq 1 "$repeats"); do
  run transport --bytes 1073741824
  fresh p100; run produce --topic p100 --record-bytes 100 --count 5000000
  fresh p1k; run produce --topic p1k --record-bytes 1000 --count 2000000
done
run consume --topic p100 --count 5000000
run consume --topic p1k --count 2000000
fresh pfsync; run produce --topic pfsync --flush batch --record-bytes 1000 --count 1000000
fresh pfsync100; run produce --topic pfsync100 --flush batch --record-bytes 100 --count 3000000
fresh plz4; run produce --topic plz4 --record-bytes 1000 --count 2000000 --compression lz4 --keys random
for rate in 300000 500000 900000; do
  fresh pe2e; run e2e --topic pe2e --record-bytes 100 --count $((rate * 5)) --rate $rate --linger-ms 0
done
