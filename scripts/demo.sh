#!/usr/bin/env bash
# The main job: build clusterlink, deploy a broker on the embedded store, join clusters,
# and verify the broker lists them. Everything lives in a temporary directory that is
# removed on exit; nothing on the host's network is changed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked --bin clusterlink
bin="$PWD/target/release/clusterlink"

work=$(mktemp -d /tmp/clusterlink-demo.XXXXXX)
broker_pid=""
cleanup() {
  [ -n "$broker_pid" ] && kill "$broker_pid" 2>/dev/null && wait "$broker_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
cd "$work"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$bin" deploy-broker --data-dir broker --listen "127.0.0.1:$port"
"$bin" broker run --data-dir broker 2>broker.log &
broker_pid=$!
for _ in $(seq 200); do grep -q "broker serving" broker.log && break; sleep 0.05; done
grep -q "broker serving" broker.log || { cat broker.log; echo "broker did not start" >&2; exit 1; }

"$bin" join broker/broker-info.yaml --cluster-id east --pod-cidr 10.1.0.0/16 --service-cidr 10.101.0.0/16 --label region=eu-west
"$bin" join broker/broker-info.yaml --cluster-id west --pod-cidr 10.2.0.0/16 --service-cidr 10.102.0.0/16 --label region=us-east
echo "--- an overlapping join is refused:"
if "$bin" join broker/broker-info.yaml --cluster-id south --pod-cidr 10.1.128.0/17 --service-cidr 10.103.0.0/16; then
  echo "FAIL: an overlapping join was accepted" >&2; exit 1
fi
echo "--- clusters, as east sees them:"
"$bin" show clusters --credentials clusterlink-east.yaml
n=$("$bin" show clusters --credentials broker/admin.yaml -o json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
[ "$n" = 2 ] || { echo "FAIL: expected 2 clusters, the broker lists $n" >&2; exit 1; }
echo "OK: broker up, 2 clusters joined, overlap refused"
