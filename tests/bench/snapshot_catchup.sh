#!/usr/bin/env bash
# A lagging follower catching up from a large snapshot: prints the snapshot's
# size, the time from the follower's restart to its first read of the last
# key, and the peak memory (VmHWM) of the leader and the follower.
#
# usage: tests/bench/snapshot_catchup.sh [path/to/raftwasm]
#   VALUES=300      values of VALUE_BYTES each, written while the follower is down
#   VALUE_BYTES=1000000
#
# Three nodes on 127.0.0.1 (free ports picked at run time), each with
# --snapshot-entries=50 --keep-entries=5, so the follower can only catch up
# from a snapshot. Every wait has a deadline; every process started here is
# stopped on exit and the temporary directory removed.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BIN=${1:-${RAFTWASM_BIN:-target/release/raftwasm}}
VALUES=${VALUES:-300}
VALUE_BYTES=${VALUE_BYTES:-1000000}
ARGS=(--snapshot-entries=50 --keep-entries=5 --threads=2)

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
[[ -x $BIN ]] || die "no raftwasm binary at $BIN (cargo build --release -p raftwasm)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/snapshot-catchup.XXXXXX")
declare -a PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

read -r -a PORTS <<<"$(python3 "$HERE/bench_helper.py" freeports 6)"
((${#PORTS[@]} == 6)) || die "could not pick free ports"
http() { echo "127.0.0.1:${PORTS[$1]}"; }
raft() { echo "127.0.0.1:${PORTS[$(($1 + 3))]}"; }

start() {  # start I [--bootstrap | --join ADDR]
  local i=$1; shift
  "$BIN" --http="$(http "$i")" --raft="$(raft "$i")" --node="$WORK/n$i" "${ARGS[@]}" "$@" \
    >>"$WORK/n$i.log" 2>&1 &
  PIDS[i]=$!
}

# wait_until SECONDS WHAT CMD...: polls CMD every 0.1 s until it succeeds.
wait_until() {
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out waiting for $what"
    sleep 0.1
  done
}
voters() { [[ $(curl -sf "http://$(http 0)/status" | grep -o '"voter":true' | wc -l) == 3 ]]; }
has_guest() { curl -sf "http://$(http 0)/status" | grep -q '"guest":{'; }

start 0 --bootstrap
wait_until 30 "node 0 to bootstrap" has_guest
start 1 --join "$(http 0)"
start 2 --join "$(http 0)"
wait_until 30 "three voters" voters

leader_of() {  # leader_of I: the leader's HTTP address, as node I sees it
  curl -sf --max-time 2 "http://$(http "$1")/status" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["leader_http"] or "")'
}
leader=$(leader_of 0)
follower=2
[[ $leader == "$(http 2)" ]] && follower=1
kill -9 "${PIDS[follower]}"
wait "${PIDS[follower]}" 2>/dev/null || true
log "follower $follower down; writing $VALUES values of $VALUE_BYTES bytes to $leader"
head -c "$VALUE_BYTES" /dev/urandom >"$WORK/value"
# A write that fails (the leadership moved on a busy machine) is sent again
# to whoever leads then, for up to 30 s.
for n in $(seq 1 "$VALUES"); do
  deadline=$((SECONDS + 30))
  until curl -sf --max-time 10 -X POST --data-binary @"$WORK/value" "http://$leader/set?key=k$n" >/dev/null; do
    ((SECONDS < deadline)) || die "write $n failed for 30 s"
    sleep 0.2
    leader=$(leader_of $((3 - follower))) || true
  done
done

started=$(date +%s.%N)
start "$follower"
last_key_read() {
  [[ $(curl -sf "http://$(http "$follower")/get?key=k$VALUES&consistency=stale" | wc -c) == "$VALUE_BYTES" ]]
}
wait_until 300 "the follower to read the last key" last_key_read
finished=$(date +%s.%N)

leader=$(leader_of "$follower")
leader_pid=${PIDS[0]}
for i in 0 1 2; do [[ $leader == "$(http "$i")" ]] && leader_pid=${PIDS[i]}; done
hwm() { awk '/VmHWM/ {printf "%.0f MB", $2 / 1024}' "/proc/$1/status"; }
snapshot=$(du -b "$WORK/n$follower/snapshots/"*.snap 2>/dev/null | awk '{s += $1} END {printf "%.0f MB", s / 1e6}')
pieces=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/n$follower.log" | grep -o 'pieces=[0-9]*' | tail -1 || true)
echo "snapshot on the follower: $snapshot ($pieces)"
echo "catch-up: $(python3 -c "print(f'{$finished - $started:.1f}')") s from restart to reading the last key"
echo "peak memory: leader $(hwm "$leader_pid"), follower $(hwm "${PIDS[follower]}")"
