#!/usr/bin/env bash
# Builds raftwasm and runs the three-node walkthrough cluster on this machine:
# HTTP on 127.0.0.1:6000-6002, Raft on 127.0.0.1:7000-7002, data in ./demo.
# Ctrl-C stops all three nodes; run it again to restart them on their data.
set -euo pipefail
cd "$(dirname "$0")"
rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown
cargo build --release -p raftwasm
bin=${CARGO_TARGET_DIR:-target}/release/raftwasm
mkdir -p demo
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
"$bin" --http=127.0.0.1:6000 --raft=127.0.0.1:7000 --node=./demo/node0 --bootstrap=true >demo/node0.log 2>&1 &
pids+=($!)
until curl -sf http://127.0.0.1:6000/status | grep -q '"guest":{'; do sleep 0.2; done
for i in 1 2; do
  "$bin" --http=127.0.0.1:600$i --raft=127.0.0.1:700$i --node=./demo/node$i --join=127.0.0.1:6000 >demo/node$i.log 2>&1 &
  pids+=($!)
done
until [ "$(curl -sf http://127.0.0.1:6000/status | grep -o '"voter":true' | wc -l)" = 3 ]; do sleep 0.2; done
cat <<'TXT'
three nodes are up (logs in demo/node*.log); try:
  curl "http://127.0.0.1:6000/set?key=abc&value=efg"
  curl "http://127.0.0.1:6001/get?key=abc"
  curl "http://127.0.0.1:6001/set?key=abc&value=efg"    # a follower: write method not allowed
  curl -s http://127.0.0.1:6000/status
  open http://127.0.0.1:6000/ in a browser for the dashboard
press Ctrl-C to stop the cluster
TXT
wait
