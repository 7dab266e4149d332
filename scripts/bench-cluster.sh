#!/usr/bin/env bash
# Cluster benchmark (BENCHMARKS.md, "Cluster"): on this machine, one node and a three-node
# cluster run side by side; `quiver perf produce` with acks=all writes the same load to a
# topic on the single node and to a topic with three replicas (min.insync.replicas 2) on the
# cluster, alternating, REPEATS rounds. Then the failover time: SIGKILL the leader of the
# replicated topic's partition 0 and time until a write to that partition is acknowledged
# by its successor (FAILOVERS times, restarting the node and waiting for the full ISR in
# between). Every topic uses flush.policy=batch (acks=all counts fsynced copies).
#
#   scripts/bench-cluster.sh [DIR] [REPEATS] [FAILOVERS]     (COUNT=records per run)
#
# Each round also runs `quiver perf e2e --acks all --rate RATE` (default 50,000 records/s,
# ten seconds) against both: acknowledgement and end-to-end latency when not saturated.
#
# FAILOVER_ON=controller first moves partition 0's leadership to the active controller
# (`quiver partition reassign` + `partition elect --preferred`), so every kill is the worst
# case: the partition leader and the controller at once.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --release --bin quiver
bin="$(cd "${CARGO_TARGET_DIR:-target}/release" && pwd)/quiver"
dir="${1:-/tmp/quiver-bench-cluster}"
repeats="${2:-3}"
failovers="${3:-3}"
count="${COUNT:-500000}"
rm -rf "$dir" && mkdir -p "$dir"
declare -A pid
seeds=127.0.0.1:7611,127.0.0.1:7621,127.0.0.1:7631

start_node() {
  local n=$1
  "$bin" serve --node-id "$n" --data-dir "$dir/n$n" --listen "127.0.0.1:76${n}0" \
    --controller-voters 1,2,3 --seeds "$seeds" --dev-ca-dir "$dir/ca" >> "$dir/n$n.log" 2>&1 &
  pid[$n]=$!
}
cleanup() {
  for p in "${pid[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

"$bin" serve --data-dir "$dir/single" --listen 127.0.0.1:7600 > "$dir/single.log" 2>&1 &
pid[single]=$!
for n in 1 2 3; do start_node "$n"; done
ca_single="$dir/single/tls/ca.pem"
ca="$dir/ca/ca.pem"

status() { "$bin" cluster status --server "$1" --ca "$ca" 2>/dev/null; }
wait_until() { # what, command...: until the command succeeds, 60 s at most
  local what=$1; shift
  for _ in $(seq 1 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "error: timed out waiting for $what (logs in $dir)" >&2; exit 1
}
full_isr() { [ "$(status "$1" | awk '$1 == "perf-rf3" && $6 ~ /^[0-9],[0-9],[0-9]$/' | wc -l)" = 3 ]; }
three_live() { [ "$(status 127.0.0.1:7610 | awk '$3 == "live"' | wc -l)" = 3 ]; }

wait_until "the single node" "$bin" topic list --server 127.0.0.1:7600 --ca "$ca_single"
wait_until "three live cluster members" three_live
"$bin" topic create perf-single -p 3 --flush batch --server 127.0.0.1:7600 --ca "$ca_single"
"$bin" topic create perf-rf3 -p 3 -r 3 --min-insync-replicas 2 --flush batch \
  --server 127.0.0.1:7610 --ca "$ca"
wait_until "full ISRs" full_isr 127.0.0.1:7610

perf() { # server ca topic
  "$bin" perf produce --server "$1" --ca "$2" --topic "$3" --acks all --count "$count" \
    --record-bytes 100 --json
}
paced() { # server ca topic: acks=all latency at a fixed rate, not saturated
  "$bin" perf e2e --server "$1" --ca "$2" --topic "$3" --acks all --rate "$rate" \
    --count $(( rate * 10 )) --record-bytes 100 --json
}
rate="${RATE:-50000}"
: > "$dir/results.jsonl"
for r in $(seq 1 "$repeats"); do
  echo "round $r: single node"
  perf 127.0.0.1:7600 "$ca_single" perf-single | sed 's/^{/{"setup":"single",/' | tee -a "$dir/results.jsonl"
  echo "round $r: three nodes, RF=3, min ISR 2"
  perf 127.0.0.1:7610 "$ca" perf-rf3 | sed 's/^{/{"setup":"rf3",/' | tee -a "$dir/results.jsonl"
  echo "round $r: paced at $rate records/s, single node, then three nodes"
  paced 127.0.0.1:7600 "$ca_single" perf-single | sed 's/^{/{"setup":"single",/' | tee -a "$dir/results.jsonl"
  paced 127.0.0.1:7610 "$ca" perf-rf3 | sed 's/^{/{"setup":"rf3",/' | tee -a "$dir/results.jsonl"
done

: > "$dir/failover.txt"
leads_p0() { [ "$(status 127.0.0.1:7610 | awk '$1 == "perf-rf3" && $2 == "0" { print $3 }')" = "$1" ]; }
for f in $(seq 1 "$failovers"); do
  if [ "${FAILOVER_ON:-}" = controller ]; then
    # The worst case on purpose: move partition 0's leadership to the active controller
    # (reorder its replicas, then a preferred election), so the kill takes out both.
    c=$(status 127.0.0.1:7610 | sed -n 's/.*controller \([0-9]*\),.*/\1/p')
    if ! leads_p0 "$c"; then
      "$bin" partition reassign perf-rf3/0 --replicas "$c,$(echo 1 2 3 | tr ' ' '\n' | grep -v "^$c$" | paste -sd,)" \
        --wait --server 127.0.0.1:7610 --ca "$ca" > /dev/null
      "$bin" partition elect perf-rf3/0 --preferred --server 127.0.0.1:7610 --ca "$ca" > /dev/null
      wait_until "the controller leading partition 0" leads_p0 "$c"
    fi
  fi
  leader=$(status 127.0.0.1:7610 | awk '$1 == "perf-rf3" && $2 == "0" { print $3 }')
  [ -n "$leader" ] && [ "$leader" != none ] || { echo "error: no leader for perf-rf3/0" >&2; exit 1; }
  other=$(( leader == 1 ? 2 : 1 ))
  controller=$(status 127.0.0.1:7610 | sed -n 's/.*controller \([0-9]*\),.*/\1/p')
  role=$([ "$controller" = "$leader" ] && echo "also the active controller" || echo "not the active controller")
  kill -KILL "${pid[$leader]}"
  t0=$(date +%s%N)
  # The cluster's side: a poller notes when the metadata names a new leader.
  (
    until status "127.0.0.1:76${other}0" \
        | awk -v l="$leader" '$1 == "perf-rf3" && $2 == "0" && $3 != l && $3 != "none" { f=1 } END { exit !f }'; do
      sleep 0.1
    done
    echo $(( ($(date +%s%N) - t0) / 1000000 )) > "$dir/elected"
  ) &
  poller=$!
  # The client's side: a new `quiver produce` per attempt, default settings (CONNECT_MS sets
  # its connect timeout; QUIC to a dead process gets no reset, so each attempt that dials the
  # dead leader costs that long).
  until echo "failover-$f" | "$bin" produce perf-rf3 --partition 0 --acks all \
      ${CONNECT_MS:+--connect-timeout-ms "$CONNECT_MS"} --server "127.0.0.1:76${other}0" --ca "$ca" >/dev/null 2>&1; do
    sleep 0.05
  done
  t1=$(date +%s%N)
  ms=$(( (t1 - t0) / 1000000 ))
  wait "$poller" || true
  echo "failover $f: killed node $leader ($role); new leader in the metadata after $(cat "$dir/elected") ms; first acknowledged write on its successor after ${ms} ms" \
    | tee -a "$dir/failover.txt"
  wait "${pid[$leader]}" 2>/dev/null || true
  start_node "$leader"
  wait_until "node $leader back in every ISR" full_isr "127.0.0.1:76${other}0"
done
echo "results: $dir/results.jsonl, $dir/failover.txt"
