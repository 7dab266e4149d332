#!/usr/bin/env bash
# Three Quiver nodes on loopback as one cluster: starts them (all three are controller
# voters, sharing a development CA), creates a topic with three replicas, produces with
# acks=all and consumes; then SIGKILLs the leader, shows the cluster electing a new one and
# carrying on (produce and consume again), restarts the dead node and shows it catch up and
# rejoin every ISR; moves a two-replica topic onto the third node with `quiver partition
# reassign` while it serves; then stops all three (SIGTERM: controlled shutdown).
#
# Data, logs and the CA go to ./three-node-data (removed first). Ports: clients 7410, 7420,
# 7430; peers 7411, 7421, 7431.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/setup.sh
cargo build --release --bin quiver
bin="$(pwd)/${CARGO_TARGET_DIR:-target}/release/quiver"
[ -x "$bin" ] || bin="${CARGO_TARGET_DIR:-target}/release/quiver"
dir="${THREE_NODE_DIR:-three-node-data}"
rm -rf "$dir" && mkdir -p "$dir"
seeds=127.0.0.1:7411,127.0.0.1:7421,127.0.0.1:7431
declare -A pid

start() {
  local n=$1
  "$bin" serve --node-id "$n" --data-dir "$dir/n$n" --listen "127.0.0.1:74${n}0" \
    --controller-voters 1,2,3 --seeds "$seeds" --dev-ca-dir "$dir/ca" >> "$dir/n$n.log" 2>&1 &
  pid[$n]=$!
}

stop_all() {
  for n in 1 2 3; do
    if [ -n "${pid[$n]:-}" ] && kill -0 "${pid[$n]}" 2>/dev/null; then
      kill -TERM "${pid[$n]}" 2>/dev/null || true
    fi
  done
  for n in 1 2 3; do
    [ -n "${pid[$n]:-}" ] && wait "${pid[$n]}" 2>/dev/null || true
  done
}
trap stop_all EXIT

# Runs "$@" until it succeeds and its output matches $1's pattern, for at most 60 s.
wait_for() {
  local what=$1 pattern=$2; shift 2
  for _ in $(seq 1 300); do
    if out=$("$@" 2>/dev/null) && grep -qE "$pattern" <<<"$out"; then
      return 0
    fi
    sleep 0.2
  done
  echo "error: timed out waiting for $what; node logs are in $dir/n*.log" >&2
  exit 1
}

for n in 1 2 3; do start "$n"; done
export QUIVER_CA="$dir/ca/ca.pem"
q() { "$bin" "$@"; }
status() { q cluster status --server "$1"; }

wait_for "three live members" '(live.*){3}' bash -c "'$bin' cluster status --server 127.0.0.1:7410 --json | tr ',' '\n' | grep -c '\"state\":\"live\"' | sed 's/3/live live live/'"
echo "--- the cluster, as node 1 sees it:"
status 127.0.0.1:7410

q topic create payments --partitions 3 --replication-factor 3 --min-insync-replicas 2 \
  --flush batch --server 127.0.0.1:7410
wait_for "every payments partition with three in-sync replicas" 'payments +2 +[0-9]+ +[0-9]+ +[0-9,]+ +[0-9],[0-9],[0-9]' \
  status 127.0.0.1:7420
seq 1 9 | sed 's/^/payment-/' | q produce payments --acks all --server 127.0.0.1:7420
echo "--- consumed:"
q consume payments --from-beginning --server 127.0.0.1:7430 | sort | tr '\n' ' '; echo
status 127.0.0.1:7430 | tail -4

leader=$(status 127.0.0.1:7410 | awk '$1 == "payments" && $2 == "0" { print $3 }')
echo "--- SIGKILL node $leader, the leader of payments/0"
kill -KILL "${pid[$leader]}"; wait "${pid[$leader]}" 2>/dev/null || true; pid[$leader]=""
alive=$(( leader == 1 ? 2 : 1 ))
wait_for "a new leader for payments/0" "payments +0 +[^${leader} ]" status "127.0.0.1:74${alive}0"
status "127.0.0.1:74${alive}0"
seq 10 15 | sed 's/^/payment-/' | q produce payments --acks all --server "127.0.0.1:74${alive}0"
echo "--- consumed with node $leader down:"
q consume payments --from-beginning --server "127.0.0.1:74${alive}0" | sort -V | tr '\n' ' '; echo

echo "--- restart node $leader; it catches up and rejoins the ISRs"
start "$leader"
wait_for "node $leader back in every ISR" '(payments +[0-9] +[0-9]+ +[0-9]+ +[0-9,]+ +[0-9],[0-9],[0-9][^0-9]*){3}' \
  bash -c "'$bin' cluster status --server 127.0.0.1:74${leader}0 | grep payments | tr '\n' ' '"
status "127.0.0.1:74${leader}0"
echo "--- reassignment: a two-replica topic moves to the third node while it keeps serving"
q topic create audit --partitions 1 --replication-factor 2 --min-insync-replicas 2 \
  --flush batch --server 127.0.0.1:7410
wait_for "audit/0 with two in-sync replicas" 'audit +0 +[0-9]+ +[0-9]+ +[0-9],[0-9] +[0-9],[0-9]' \
  status 127.0.0.1:7410
replicas=$(status 127.0.0.1:7410 | awk '$1 == "audit" && $2 == "0" { print $5 }')
spare=$(echo 1 2 3 | tr ' ' '\n' | grep -v -E "^(${replicas/,/|})$")
target="$spare,${replicas#*,}"
seq 1 5 | sed 's/^/audit-/' | q produce audit --acks all --server 127.0.0.1:7410
echo "audit/0 is on nodes $replicas; moving it to $target"
q partition reassign audit/0 --replicas "$target" --wait --server 127.0.0.1:7420
seq 6 9 | sed 's/^/audit-/' | q produce audit --acks all --server 127.0.0.1:7430
echo "--- consumed after the move:"
q consume audit --from-beginning --server 127.0.0.1:7430 | sort -V | tr '\n' ' '; echo
status 127.0.0.1:7430 | grep -E "^(TOPIC|audit)"
echo "--- stopping (SIGTERM: each node hands its leaderships over first)"
