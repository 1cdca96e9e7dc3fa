#!/usr/bin/env python3
"""Connection flood for the systemd end-to-end suite (standard library only).

Runs in the container's network namespace: every connection goes to the
container's own loopback. Opens CONNS idle connections to agentd (more than
its connection cap, at most BURST per 50 ms), reopens each one the server closes, and meanwhile polls
/health every 200 ms over one keep-alive connection opened before the flood
(so it holds a slot). Bounded in time (SECONDS) and in reopens (MAX_OPENS).
Prints one JSON object:

  opened, refused        connections opened / refused by the kernel
  peak_open              most flood connections open at once
  health_polls           /health answers read by the monitor
  health_not_200         of which not 200
  saturated_seen         answers with accept_loop.saturated = true
  saturated_healthy      of which status "healthy"
  max_rejected_per_second, max_consecutive_failures
"""

import argparse
import errno
import http.client
import json
import resource
import selectors
import socket
import sys
import time

HOST = "127.0.0.1"
PORT = 8420


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--conns", type=int, default=1300)
    p.add_argument("--seconds", type=float, default=9.0)
    p.add_argument("--max-opens", type=int, default=200000)
    p.add_argument("--port", type=int, default=PORT)
    # Opens per 50 ms round: a burst of idle connections larger than the
    # listen backlog overflows it, and with SYN cookies an idle client whose
    # final ACK was dropped believes it is connected while agentd never sees
    # it; the flood must reach agentd's cap, not stall in the kernel.
    p.add_argument("--burst", type=int, default=100)
    a = p.parse_args()
    port = a.port

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, a.conns + 256) if hard != resource.RLIM_INFINITY else a.conns + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    monitor = http.client.HTTPConnection(HOST, port, timeout=5)
    monitor.connect()

    sel = selectors.DefaultSelector()
    out = {
        "opened": 0,
        "refused": 0,
        "peak_open": 0,
        "health_polls": 0,
        "health_not_200": 0,
        "saturated_seen": 0,
        "saturated_healthy": 0,
        "max_rejected_per_second": 0.0,
        "max_consecutive_failures": 0,
        "monitor_errors": 0,
    }
    open_socks = set()

    def open_one():
        if out["opened"] + out["refused"] >= a.max_opens:
            return
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        rc = s.connect_ex((HOST, port))
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            out["refused"] += 1
            return
        sel.register(s, selectors.EVENT_READ)
        open_socks.add(s)
        out["opened"] += 1

    end = time.monotonic() + a.seconds
    next_poll = time.monotonic()
    while time.monotonic() < end:
        for _ in range(min(a.burst, a.conns - len(open_socks))):
            if out["opened"] + out["refused"] >= a.max_opens:
                break
            open_one()
        out["peak_open"] = max(out["peak_open"], len(open_socks))
        for key, _ in sel.select(timeout=0.05):
            s = key.fileobj
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if not data:  # closed by the server (cap, header timeout): reopen
                sel.unregister(s)
                open_socks.discard(s)
                s.close()
        if time.monotonic() >= next_poll:
            next_poll = time.monotonic() + 0.2
            try:
                monitor.request("GET", "/health")
                resp = monitor.getresponse()
                body = json.loads(resp.read())
            except (OSError, ValueError, http.client.HTTPException):
                out["monitor_errors"] += 1
                monitor.close()
                monitor = http.client.HTTPConnection(HOST, port, timeout=5)
                continue
            out["health_polls"] += 1
            if resp.status != 200:
                out["health_not_200"] += 1
            acc = body.get("accept_loop", {})
            wd = body.get("watchdog", {})
            out["max_rejected_per_second"] = max(
                out["max_rejected_per_second"], acc.get("rejected_per_second", 0.0)
            )
            out["max_consecutive_failures"] = max(
                out["max_consecutive_failures"], wd.get("consecutive_failures", 0)
            )
            if acc.get("saturated"):
                out["saturated_seen"] += 1
                if body.get("status") == "healthy":
                    out["saturated_healthy"] += 1
    for s in list(open_socks):
        s.close()
    monitor.close()
    print(json.dumps(out, sort_keys=True))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
