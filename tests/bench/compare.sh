#!/usr/bin/env bash
# Side-by-side benchmark: raftwasm against etcd 3.4, each as a three-member
# cluster on 127.0.0.1 of this machine, driven by wrk with the same parameters.
#
# Usage:
#   compare.sh [RAFTWASM_BIN]         (or set RAFTWASM_BIN in the environment)
#
# Needs etcd and etcdctl (3.4), wrk, curl and python3 on PATH. When etcd, etcdctl or
# wrk is missing and this runs as root on Debian, it installs the packages
# etcd-server, etcd-client and wrk with apt-get.
#
# Settings (environment):
#   DURATION=10     seconds per wrk row
#   KILLS=5         leader kills per system for the failover row (median shown)
#   KEYS=10000      key space; keys are preloaded before the read rows
#   FAILOVER_REQ_TIMEOUT=0.1  seconds the failover client waits for one write
#                   before it tries the next survivor (a write forwarded to the
#                   dead leader never returns, so this bounds the time lost)
#   BENCH_TMPDIR    parent of the temporary data directories (default $TMPDIR, else /tmp)
#   KEEP_TMP=1      keep the temporary directory (data and logs) on exit
#   RAFTWASM_ARGS   extra flags for every raftwasm node (default none)
#
# Rows (keys 16 bytes, values 100 bytes, a random key per request):
#   durable writes, 1 connection (1 wrk thread), on the leader
#   durable writes, 64 connections (2 threads), on the leader
#   linearizable reads, 64 connections, on the leader
#   stale (etcd: serializable) reads, 64 connections, on a follower
#   failover: kill -9 the leader while one client writes; time from the kill to
#   the first acknowledged write; median of KILLS kills, the killed member
#   restarted and the cluster whole again between kills.
#
# etcd runs with its default settings (heartbeat 100 ms, election timeout
# 1000 ms), raftwasm with its defaults (heartbeat 50 ms, election timeouts
# 130-260 ms: a follower elects 390-520 ms after it last heard the leader)
# plus RAFTWASM_ARGS (for example --threads 1). The two clusters never run
# at the same time: etcd is started, measured and stopped, then raftwasm, so
# neither takes CPU from the other.
# All traffic stays on 127.0.0.1; every wait has a deadline and every client
# run is bounded in time. Every process started here is stopped on exit (also
# on failure or Ctrl-C) and the temporary directory removed.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HELPER="$HERE/bench_helper.py"
LUA="$HERE/kv.lua"

RAFTWASM_BIN=${1:-${RAFTWASM_BIN:-}}
DURATION=${DURATION:-10}
KILLS=${KILLS:-5}
KEYS=${KEYS:-10000}
FAILOVER_REQ_TIMEOUT=${FAILOVER_REQ_TIMEOUT:-0.1}
BENCH_TMPDIR=${BENCH_TMPDIR:-${TMPDIR:-/tmp}}
KEEP_TMP=${KEEP_TMP:-0}

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -n $RAFTWASM_BIN ]] || die "usage: $0 RAFTWASM_BIN (or set RAFTWASM_BIN)"
[[ -x $RAFTWASM_BIN ]] || die "raftwasm binary '$RAFTWASM_BIN' is not executable"
RAFTWASM_BIN=$(cd "$(dirname "$RAFTWASM_BIN")" && pwd)/$(basename "$RAFTWASM_BIN")
[[ $DURATION =~ ^[0-9]+$ && $DURATION -ge 1 ]] || die "DURATION must be a whole number of seconds"
[[ $KILLS =~ ^[0-9]+$ ]] || die "KILLS must be a whole number"
[[ $KEYS =~ ^[0-9]+$ && $KEYS -ge 1 ]] || die "KEYS must be a positive whole number"
[[ -f $HELPER && -f $LUA ]] || die "bench_helper.py and kv.lua must sit beside this script"
command -v python3 >/dev/null || die "python3 is needed"

# ------------------------------------------------------------------ tools
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null || ! command -v wrk >/dev/null; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    log "installing etcd-server etcd-client wrk"
    timeout 900 apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq etcd-server etcd-client wrk >&2
  fi
fi
for t in etcd etcdctl wrk curl timeout; do command -v "$t" >/dev/null || die "$t is not installed"; done
ETCD_VERSION=$(etcd --version 2>/dev/null | sed -n 's/^etcd Version: //p')
[[ $ETCD_VERSION == 3.4.* ]] || log "warning: etcd is '$ETCD_VERSION', not 3.4"
export ETCDCTL_API=3

# ------------------------------------------------------- processes, cleanup
WORK=$(mktemp -d "$BENCH_TMPDIR/bench-compare.XXXXXX")
declare -A PID=()   # name -> pid of every background process started here

# Servers are disowned (so the shell does not report the deliberate kill -9s);
# the shell still reaps them, and stop_proc polls until the pid is gone.
stop_proc() {  # stop_proc NAME: TERM, up to 5 s, then KILL, up to 5 s more
  local name=$1 pid=${PID[$1]:-} i
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  wait "$pid" 2>/dev/null || true
  unset "PID[$name]"
}

cleanup() {
  local rc=$? name
  trap - EXIT INT TERM
  # The data is thrown away, so no graceful stop: kill -9 (an etcd leader
  # told to stop would first spend seconds trying to hand over leadership).
  # The foreground client runs under `timeout`, which leads its own process
  # group: kill that group so the client goes with it.
  [[ -n ${PID[fg]:-} ]] && { kill -KILL -- "-${PID[fg]}" 2>/dev/null || true; }
  for name in "${!PID[@]}"; do kill -KILL "${PID[$name]}" 2>/dev/null || true; done
  for name in "${!PID[@]}"; do stop_proc "$name"; done
  if [[ $KEEP_TMP == 1 ]]; then
    log "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_bg() {  # start_bg NAME CMD...: run in the background, log to WORK/NAME.log
  local name=$1; shift
  "$@" >>"$WORK/$name.log" 2>&1 &
  PID[$name]=$!
  disown "$!"
}

# run_bounded SECS CMD...: run in the foreground with a hard time limit; waits
# in a way that lets INT/TERM reach the trap at once.
run_bounded() {
  local secs=$1 rc=0; shift
  timeout -k 5 "$secs" "$@" &
  PID[fg]=$!
  wait "${PID[fg]}" || rc=$?
  unset "PID[fg]"
  return "$rc"
}

# wait_until SECS WHAT CMD...: poll CMD every 0.2 s until it succeeds, or fail.
wait_until() {
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || die "timed out after ${secs}s waiting for $what (logs in $WORK)"
    sleep 0.2
  done
}

# median_of "N N N": the median of the numbers, or nan when there are none
median_of() { tr -s ' ' '\n' <<<"$1" | sort -n | awk 'NF {a[++n] = $1} END {if (!n) print "nan"; else if (n % 2) print a[(n+1)/2]; else print (a[n/2] + a[n/2+1]) / 2}'; }

LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?")

# CPU seconds the whole machine spent in user and system mode (from
# /proc/stat), and CPU seconds used by this script and everything it started and reaped (from the
# `times` builtin). Their growth over the run tells how much CPU other
# processes took meanwhile: the numbers are only fair on a quiet machine.
busy_seconds() { awk -v hz="$(getconf CLK_TCK)" '$1 == "cpu" {print ($2 + $3 + $4) / hz; exit}' /proc/stat; }
# `times` must run in this shell itself, not in a $(...) subshell.
own_seconds() {  # own_seconds VAR
  times >"$WORK/times"
  printf -v "$1" '%s' "$(awk '{for (i = 1; i <= NF; i++) {split($i, t, "m"); s += t[1] * 60 + t[2]}} END {print s}' "$WORK/times")"
}
BUSY0=$(busy_seconds) WALL0=$SECONDS
own_seconds OWN0

# ------------------------------------------------------------------- ports
read -r -a PORTS <<<"$(python3 "$HELPER" freeports 12)"
((${#PORTS[@]} == 12)) || die "could not pick free ports"
EC=("" "${PORTS[@]:0:3}")   # etcd client ports, members 1..3
EP=("" "${PORTS[@]:3:3}")   # etcd peer ports
RH=("" "${PORTS[@]:6:3}")   # raftwasm HTTP ports
RR=("" "${PORTS[@]:9:3}")   # raftwasm Raft ports

declare -A RES=()     # row key -> BENCHRESULT line
declare -A FAIL=()    # system -> space-separated failover times (ms)
declare -A FAILN=()   # system -> failed kills

field() { sed -n "s/.*[[:space:]]$2=\([^[:space:]]*\).*/\1/p" <<<"$1"; }

# run_wrk KEY MODE URL THREADS CONNS
run_wrk() {
  local key=$1 mode=$2 url=$3 threads=$4 conns=$5 out="$WORK/wrk-$1.out"
  log "wrk $key: $threads thread(s), $conns connection(s), ${DURATION}s -> $url"
  run_bounded $((DURATION + 120)) env BENCH_MODE="$mode" BENCH_KEYS="$KEYS" BENCH_LABEL="$key" \
    wrk -t"$threads" -c"$conns" -d"${DURATION}s" --timeout 5s -s "$LUA" "$url" >"$out" 2>&1 ||
    die "wrk $key failed: $(cat "$out")"
  RES[$key]=$(grep '^BENCHRESULT' "$out") || die "wrk $key printed no result: $(cat "$out")"
  log "  $(cut -d' ' -f2- <<<"${RES[$key]}")"
}

# =================================================================== etcd
ETCD_CLUSTER="e1=http://127.0.0.1:${EP[1]},e2=http://127.0.0.1:${EP[2]},e3=http://127.0.0.1:${EP[3]}"
ETCD_EPS="http://127.0.0.1:${EC[1]},http://127.0.0.1:${EC[2]},http://127.0.0.1:${EC[3]}"

etcd_start() {
  local i=$1
  start_bg "etcd$i" etcd --name "e$i" --data-dir "$WORK/etcd$i" \
    --listen-client-urls "http://127.0.0.1:${EC[i]}" --advertise-client-urls "http://127.0.0.1:${EC[i]}" \
    --listen-peer-urls "http://127.0.0.1:${EP[i]}" --initial-advertise-peer-urls "http://127.0.0.1:${EP[i]}" \
    --initial-cluster "$ETCD_CLUSTER" --initial-cluster-token "bench-compare-$$" --initial-cluster-state new
}
etcd_healthy() {
  timeout 10 etcdctl --endpoints="$ETCD_EPS" --dial-timeout=2s --command-timeout=3s endpoint health
}
etcd_leader_index() {  # prints 1..3
  local ep i
  ep=$(timeout 10 etcdctl --endpoints="$ETCD_EPS" --dial-timeout=2s --command-timeout=3s \
    endpoint status -w json | python3 "$HELPER" etcd-leader) || return 1
  for i in 1 2 3; do [[ $ep == "http://127.0.0.1:${EC[i]}" ]] && { echo "$i"; return 0; }; done
  return 1
}
etcd_whole() { etcd_healthy && etcd_leader_index; }

log "etcd $ETCD_VERSION: starting three members (client ports ${EC[*]:1}, peer ports ${EP[*]:1})"
for i in 1 2 3; do etcd_start "$i"; done
wait_until 60 "a healthy etcd cluster" etcd_whole
L=$(etcd_leader_index) || die "no etcd leader"
F=$((L % 3 + 1))
log "etcd leader: member $L; follower for stale reads: member $F"

run_bounded 600 python3 "$HELPER" preload --kind etcd --url "http://127.0.0.1:${EC[L]}" --keys "$KEYS" ||
  die "etcd preload failed"
run_wrk etcd-w1 etcd-put "http://127.0.0.1:${EC[L]}" 1 1
run_wrk etcd-w64 etcd-put "http://127.0.0.1:${EC[L]}" 2 64
run_wrk etcd-rlin etcd-range "http://127.0.0.1:${EC[L]}" 2 64
run_wrk etcd-rstale etcd-range-serializable "http://127.0.0.1:${EC[F]}" 2 64

FAIL[etcd]="" FAILN[etcd]=0
for ((k = 1; k <= KILLS; k++)); do
  wait_until 60 "the etcd cluster to be whole" etcd_whole
  L=$(etcd_leader_index) || die "no etcd leader"
  surv=""
  for i in 1 2 3; do ((i == L)) || surv+="${surv:+,}http://127.0.0.1:${EC[i]}"; done
  run_bounded 60 python3 "$HELPER" failover --kind etcd --leader "http://127.0.0.1:${EC[L]}" \
    --pid "${PID[etcd$L]}" --survivors "$surv" --req-timeout "$FAILOVER_REQ_TIMEOUT" >"$WORK/failover.out" || true
  out=$(grep '^FAILOVER' "$WORK/failover.out" || true)
  ms=$(field " $out" ms)
  log "etcd kill $k/$KILLS (member $L): ${out:-no output}"
  if [[ -n $ms && $ms != nan ]]; then FAIL[etcd]+="$ms "; else FAILN[etcd]=$((FAILN[etcd] + 1)); fi
  stop_proc "etcd$L"
  etcd_start "$L"
done
for i in 1 2 3; do stop_proc "etcd$i"; done
log "etcd stopped"

# =============================================================== raftwasm
RW_URLS=("" "http://127.0.0.1:${RH[1]}" "http://127.0.0.1:${RH[2]}" "http://127.0.0.1:${RH[3]}")

rw_start() {
  local i=$1 args
  args=(--http="127.0.0.1:${RH[i]}" --raft="127.0.0.1:${RR[i]}" --node="$WORK/rw$i")
  if ((i == 1)); then args+=(--bootstrap); else args+=(--join="127.0.0.1:${RH[1]}"); fi
  # shellcheck disable=SC2206 # RAFTWASM_ARGS is a list of flags, split on purpose
  args+=(${RAFTWASM_ARGS:-})
  start_bg "rw$i" "$RAFTWASM_BIN" "${args[@]}"
}
rw_node1_up() { curl -sf --max-time 2 "${RW_URLS[1]}/status" | grep -q '"guest":{'; }
rw_whole() { python3 "$HELPER" rw-whole "${RW_URLS[1]}" "${RW_URLS[2]}" "${RW_URLS[3]}"; }
rw_leader_index() {
  local url i
  url=$(rw_whole) || return 1
  for i in 1 2 3; do [[ $url == "${RW_URLS[i]}" ]] && { echo "$i"; return 0; }; done
  return 1
}

log "raftwasm: starting three nodes (HTTP ports ${RH[*]:1}, Raft ports ${RR[*]:1})"
rw_start 1
wait_until 60 "raftwasm node 1 to bootstrap" rw_node1_up
rw_start 2
rw_start 3
wait_until 90 "a whole raftwasm cluster (three voters, guest loaded on every node)" rw_whole
L=$(rw_leader_index) || die "no raftwasm leader"
F=$((L % 3 + 1))
log "raftwasm leader: node $L; follower for stale reads: node $F"

run_bounded 600 python3 "$HELPER" preload --kind raftwasm --url "${RW_URLS[L]}" --keys "$KEYS" ||
  die "raftwasm preload failed"
run_wrk rw-w1 raftwasm-set "${RW_URLS[L]}" 1 1
run_wrk rw-w64 raftwasm-set "${RW_URLS[L]}" 2 64
run_wrk rw-rlin raftwasm-get-linearizable "${RW_URLS[L]}" 2 64
run_wrk rw-rstale raftwasm-get-stale "${RW_URLS[F]}" 2 64

FAIL[raftwasm]="" FAILN[raftwasm]=0
for ((k = 1; k <= KILLS; k++)); do
  wait_until 90 "the raftwasm cluster to be whole" rw_whole
  L=$(rw_leader_index) || die "no raftwasm leader"
  surv=""
  for i in 1 2 3; do ((i == L)) || surv+="${surv:+,}${RW_URLS[i]}"; done
  run_bounded 60 python3 "$HELPER" failover --kind raftwasm --leader "${RW_URLS[L]}" \
    --pid "${PID[rw$L]}" --survivors "$surv" --req-timeout "$FAILOVER_REQ_TIMEOUT" >"$WORK/failover.out" || true
  out=$(grep '^FAILOVER' "$WORK/failover.out" || true)
  ms=$(field " $out" ms)
  log "raftwasm kill $k/$KILLS (node $L): ${out:-no output}"
  if [[ -n $ms && $ms != nan ]]; then FAIL[raftwasm]+="$ms "; else FAILN[raftwasm]=$((FAILN[raftwasm] + 1)); fi
  stop_proc "rw$L"
  rw_start "$L"
done
((KILLS == 0)) || wait_until 90 "the raftwasm cluster to be whole" rw_whole
for i in 1 2 3; do stop_proc "rw$i"; done
log "raftwasm stopped"

# ================================================================== table
cell() {  # cell RESULTLINE
  local l=$1 errs
  errs=$(($(field "$l" status_errors) + $(field "$l" socket_errors)))
  awk -v r="$(field "$l" ok_rps)" -v p50="$(field "$l" p50_ms)" -v p99="$(field "$l" p99_ms)" -v e="$errs" \
    'BEGIN {printf "%.0f ops/s, p50 %.2f ms, p99 %.2f ms%s", r, p50, p99, (e > 0 ? sprintf(" (%d errors)", e) : "")}'
}
ratio() {  # ratio ETCDLINE RWLINE: raftwasm/etcd for throughput and p99
  awk -v a="$(field "$1" ok_rps)" -v b="$(field "$2" ok_rps)" \
    -v pa="$(field "$1" p99_ms)" -v pb="$(field "$2" p99_ms)" \
    'BEGIN {printf "%.2fx ops/s, %.2fx p99", (a > 0 ? b / a : 0), (pa > 0 ? pb / pa : 0)}'
}
fail_cell() {  # fail_cell SYSTEM
  local s=$1
  tr -s ' ' '\n' <<<"${FAIL[$s]:-}" | sort -n |
    awk -v f="${FAILN[$s]:-0}" -v k="$KILLS" 'NF {a[++n] = $1} END {
      if (!n) { printf "n/a (%d of %d kills failed)", f, k; exit }
      m = (n % 2) ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2
      printf "median %.0f ms (min %.0f, max %.0f, n=%d%s)", m, a[1], a[n], n, (f > 0 ? sprintf(", %d failed", f) : "")}'
}
fail_ratio() {
  awk -v a="$(median_of "${FAIL[etcd]:-}")" -v b="$(median_of "${FAIL[raftwasm]:-}")" \
    'BEGIN {if (a == "nan" || b == "nan" || a <= 0) print "n/a"; else printf "%.2fx time", b / a}'
}

RW_VERSION=$("$RAFTWASM_BIN" --version 2>/dev/null | head -1 || true)
own_seconds OWN1
OTHER_CPU=$(awk -v b0="$BUSY0" -v b1="$(busy_seconds)" -v o0="$OWN0" -v o1="$OWN1" \
  -v wall=$((SECONDS - WALL0)) -v n="$(nproc)" 'BEGIN {
    other = (b1 - b0) - (o1 - o0); if (other < 0) other = 0
    printf "%.0f CPU-seconds of %d available (%.0f%%)", other, wall * n, (wall > 0 ? 100 * other / (wall * n) : 0)}')
echo
echo "## raftwasm vs etcd, three members each on 127.0.0.1"
echo
echo "- etcd $ETCD_VERSION (default settings); ${RW_VERSION:-raftwasm} (default settings)"
echo "- other processes on this machine used $OTHER_CPU during the run (should be near 0)"
echo "- $(nproc) CPU cores (1-minute load average before the run: $LOAD_BEFORE, after: $(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?")), data on $(df -PT "$WORK" | awk 'NR==2 {print $2}'); wrk, ${DURATION}s per row," \
  "16-byte keys, 100-byte values, random key per request over $KEYS keys"
echo "- failover: one client; a write waits at most ${FAILOVER_REQ_TIMEOUT}s before the next survivor is tried;" \
  "a 421 naming a live leader is followed at once; clock from kill -9 to the first 200"
echo "- etcd is driven through its HTTP/JSON gateway (POST /v3/kv/put, /v3/kv/range, base64 keys and values)," \
  "as raftwasm is through its HTTP API; etcd's gRPC clients skip the gateway's translation"
echo "- ratio = raftwasm / etcd (ops/s: higher is better for raftwasm; p99 and failover time: lower is better)"
echo
echo "| workload | etcd | raftwasm | ratio |"
echo "|---|---|---|---|"
echo "| durable writes, 1 conn (leader) | $(cell "${RES[etcd-w1]}") | $(cell "${RES[rw-w1]}") | $(ratio "${RES[etcd-w1]}" "${RES[rw-w1]}") |"
echo "| durable writes, 64 conns (leader) | $(cell "${RES[etcd-w64]}") | $(cell "${RES[rw-w64]}") | $(ratio "${RES[etcd-w64]}" "${RES[rw-w64]}") |"
echo "| linearizable reads, 64 conns (leader) | $(cell "${RES[etcd-rlin]}") | $(cell "${RES[rw-rlin]}") | $(ratio "${RES[etcd-rlin]}" "${RES[rw-rlin]}") |"
echo "| stale/serializable reads, 64 conns (follower) | $(cell "${RES[etcd-rstale]}") | $(cell "${RES[rw-rstale]}") | $(ratio "${RES[etcd-rstale]}" "${RES[rw-rstale]}") |"
if ((KILLS > 0)); then
  echo "| failover: kill -9 leader -> first acked write | $(fail_cell etcd) | $(fail_cell raftwasm) | $(fail_ratio) |"
fi
