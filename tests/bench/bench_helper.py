#!/usr/bin/env python3
"""Helpers for compare.sh (Python 3 standard library only).

Subcommands:
  freeports N                    print N distinct free TCP ports on 127.0.0.1
  etcd-leader                    read `etcdctl endpoint status -w json` on stdin,
                                 print the leader's endpoint
  rw-whole URL URL URL           exit 0 and print the leader's URL when the
                                 raftwasm cluster is whole: every node answers
                                 /status, all agree on one leader, the leader
                                 shows three voters and no membership change,
                                 every node has applied what the leader had
                                 committed, and a stale /get answers on every node
  preload --kind K --url U --keys N
                                 write keys key-000000000000.. with 100-byte values
  failover --kind K --leader U --pid P --survivors U,U
                                 write in a loop on the leader, kill -9 P, then
                                 poll the survivors until a write is acknowledged;
                                 print "FAILOVER ms=<kill to first ack>"

Everything here is bounded in count and time and only talks to 127.0.0.1.
"""

import argparse
import base64
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse

VALUE = ("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" * 2)[:100]
LEADER_HEADER = "x-raft-leader"


def key_of(i):
    return "key-%012d" % i


def b64(s):
    return base64.b64encode(s.encode()).decode()


def hostport(url):
    u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    if u.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"refusing non-loopback target {url!r}")
    return u.hostname, u.port


def norm(url):
    h, p = hostport(url)
    return f"http://{h}:{p}"


def request(url, method, path, body=None, timeout=2.0, conn=None):
    """One HTTP request; returns (status, headers dict lowercased, body bytes)."""
    own = conn is None
    if own:
        h, p = hostport(url)
        conn = http.client.HTTPConnection(h, p, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        if own:
            conn.close()


def write_once(kind, url, i, timeout, conn=None):
    k = key_of(i)
    if kind == "etcd":
        body = json.dumps({"key": b64(k), "value": b64(VALUE)})
        return request(url, "POST", "/v3/kv/put", body, timeout, conn)
    return request(url, "GET", f"/set?key={k}&value={VALUE}", None, timeout, conn)


# ---------------------------------------------------------------- freeports
def cmd_freeports(a):
    socks, ports = [], []
    try:
        while len(ports) < a.n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    print(" ".join(map(str, ports)))


# -------------------------------------------------------------- etcd-leader
def cmd_etcd_leader(_a):
    data = json.load(sys.stdin)
    for e in data:
        st = e.get("Status", {})
        if st.get("leader") and st.get("header", {}).get("member_id") == st.get("leader"):
            print(e["Endpoint"])
            return 0
    return 1


# ----------------------------------------------------------------- rw-whole
def cmd_rw_whole(a):
    urls = [norm(u) for u in a.urls]
    statuses = {}
    for u in urls:
        try:
            st, _, body = request(u, "GET", "/status", timeout=2.0)
            if st != 200:
                return 1
            statuses[u] = json.loads(body)
        except (OSError, ValueError, http.client.HTTPException):
            return 1
    leaders = {s.get("leader") for s in statuses.values()}
    if len(leaders) != 1 or None in leaders:
        return 1
    lead = [u for u, s in statuses.items() if s.get("id") == next(iter(leaders))]
    if len(lead) != 1:
        return 1
    ls = statuses[lead[0]]
    voters = [m for m in ls.get("members", []) if m.get("voter")]
    if len(voters) != a.voters or ls.get("membership_changing"):
        return 1
    committed = ls.get("committed") or 0
    for u in urls:
        try:
            s = json.loads(request(u, "GET", "/status", timeout=2.0)[2])
        except (OSError, ValueError, http.client.HTTPException):
            return 1
        if (s.get("applied") or 0) < committed:
            return 1
        try:
            st, _, _ = request(u, "GET", "/get?key=x&consistency=stale", timeout=2.0)
        except (OSError, http.client.HTTPException):
            return 1
        if st not in (200, 404):
            return 1
    print(lead[0])
    return 0


# ------------------------------------------------------------------ preload
def cmd_preload(a):
    url = norm(a.url)
    deadline = time.monotonic() + a.deadline
    nxt = [0]
    lock = threading.Lock()
    failures = []

    def worker():
        h, p = hostport(url)
        conn = http.client.HTTPConnection(h, p, timeout=10)
        while time.monotonic() < deadline and not failures:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= a.keys:
                break
            for attempt in range(3):
                try:
                    st, _, body = write_once(a.kind, url, i, 10, conn)
                    if st == 200:
                        break
                    err = f"status {st}: {body[:200]!r}"
                except (OSError, http.client.HTTPException) as e:
                    err = repr(e)
                    conn.close()
                    conn = http.client.HTTPConnection(h, p, timeout=10)
            else:
                failures.append(f"key {i}: {err}")
        conn.close()

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(a.concurrency)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join(max(0.0, deadline - time.monotonic()) + 1)
    if failures or nxt[0] < a.keys:
        print(f"preload failed: {failures[:3]} (reached {min(nxt[0], a.keys)} of {a.keys})", file=sys.stderr)
        return 1
    # Spot-check that the data is readable.
    for i in (0, a.keys // 2, a.keys - 1):
        if a.kind == "etcd":
            st, _, body = request(url, "POST", "/v3/kv/range", json.dumps({"key": b64(key_of(i))}))
            ok = st == 200 and b'"kvs"' in body and b64(VALUE).encode() in body
        else:
            st, _, body = request(url, "GET", f"/get?key={key_of(i)}&consistency=linearizable")
            ok = st == 200 and body == VALUE.encode()
        if not ok:
            print(f"preload check failed on key {i}: {st} {body[:200]!r}", file=sys.stderr)
            return 1
    print(f"preloaded {a.keys} keys in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return 0


# ----------------------------------------------------------------- failover
def cmd_failover(a):
    leader = norm(a.leader)
    survivors = [norm(u) for u in a.survivors.split(",") if u]
    if leader in survivors or not survivors:
        print("bad survivors list", file=sys.stderr)
        return 2
    i = 0

    # 1. A single client writes in a loop on the leader (bounded: count and time).
    warm_acks, t_end = 0, time.monotonic() + a.warmup
    while time.monotonic() < t_end and i < a.max_requests:
        try:
            st, _, _ = write_once(a.kind, leader, i, a.req_timeout)
        except (OSError, http.client.HTTPException):
            st = None
        i += 1
        warm_acks += st == 200
    if warm_acks == 0:
        print(f"the leader {leader} acknowledged no write before the kill", file=sys.stderr)
        return 1

    # 2. Kill the leader between two writes; the clock starts after the signal.
    os.kill(a.pid, signal.SIGKILL)
    t0 = time.monotonic()

    # 3. Poll the survivors until one acknowledges a write.
    deadline = t0 + a.deadline
    rr, hint, attempts = 0, None, 0
    outcomes = {}          # answer (status code, or "timeout"/"error") -> count
    named_ms = None        # raftwasm: first 421 naming a surviving node as leader

    def summary():
        return ",".join(f"{k}:{v}" for k, v in sorted(outcomes.items(), key=lambda kv: str(kv[0])))

    while time.monotonic() < deadline and attempts < a.max_requests:
        target = hint or survivors[rr % len(survivors)]
        hint = None
        attempts += 1
        try:
            st, hdrs, _ = write_once(a.kind, target, i, a.req_timeout)
            outcome = st
        except (socket.timeout, TimeoutError):
            st, hdrs, outcome = None, {}, "timeout"
        except (OSError, http.client.HTTPException):
            st, hdrs, outcome = None, {}, "error"
        if st == 421:  # tell apart: names no leader, the dead one, or a survivor
            named_hdr = hdrs.get(LEADER_HEADER)
            outcome = ("421-none" if not named_hdr else
                       "421-dead" if named_hdr.rstrip("/") == leader else "421-live")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        i += 1
        if st == 200:
            ms = (time.monotonic() - t0) * 1000
            extra = f" leader_named_ms={named_ms:.1f}" if named_ms is not None else ""
            print(f"FAILOVER ms={ms:.1f} acked_by={target} attempts={attempts}"
                  f" answers={summary()}{extra} warmup_acks={warm_acks}")
            return 0
        if st == 421 and hdrs.get(LEADER_HEADER):
            try:
                named = norm(hdrs[LEADER_HEADER])
            except SystemExit:
                named = None
            if named in survivors:
                if named_ms is None:
                    named_ms = (time.monotonic() - t0) * 1000
                hint = named
                continue
        rr += 1
        time.sleep(a.poll_interval)
    print(f"FAILOVER ms=nan attempts={attempts} answers={summary()}"
          f" (no write acknowledged within {a.deadline}s)")
    return 1


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("freeports")
    s.add_argument("n", type=int)
    sub.add_parser("etcd-leader")
    s = sub.add_parser("rw-whole")
    s.add_argument("urls", nargs="+")
    s.add_argument("--voters", type=int, default=3)
    s = sub.add_parser("preload")
    s.add_argument("--kind", choices=["etcd", "raftwasm"], required=True)
    s.add_argument("--url", required=True)
    s.add_argument("--keys", type=int, default=10000)
    s.add_argument("--concurrency", type=int, default=32)
    s.add_argument("--deadline", type=float, default=300)
    s = sub.add_parser("failover")
    s.add_argument("--kind", choices=["etcd", "raftwasm"], required=True)
    s.add_argument("--leader", required=True)
    s.add_argument("--pid", type=int, required=True)
    s.add_argument("--survivors", required=True)
    s.add_argument("--warmup", type=float, default=0.5, help="seconds of writes before the kill")
    s.add_argument("--req-timeout", type=float, default=0.25)
    s.add_argument("--poll-interval", type=float, default=0.005)
    s.add_argument("--deadline", type=float, default=30)
    s.add_argument("--max-requests", type=int, default=200000)
    a = p.parse_args()
    fn = {
        "freeports": cmd_freeports,
        "etcd-leader": cmd_etcd_leader,
        "rw-whole": cmd_rw_whole,
        "preload": cmd_preload,
        "failover": cmd_failover,
    }[a.cmd]
    sys.exit(fn(a) or 0)


if __name__ == "__main__":
    main()
