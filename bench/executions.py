#!/usr/bin/env python3
"""Time COUNT short executions, one after another, against a running agentd.

Usage: executions.py HOST:PORT COUNT [UNRELATED]

Each execution is a synchronous `POST /api/task` over one keep-alive
connection; the server's runtime should be a program that exits at once
(`AGENTD_RUNTIME=command AGENTD_RUNTIME_CMD=cat`), so the time is mostly
agentd's own: spawn, pipe reads, and the end-of-run cleanup (kill what is
left of the group, sweep for tagged escapees, reap). With UNRELATED > 0 that
many sleeping processes, outside agentd's process tree, sit in the host's
process table during the run: a sweep that scanned all of /proc would slow
down with them; one that walks agentd's own children does not.

Prints one line: EXEC per_exec_ms=… total_s=… host_processes=… failed=…
"""
import http.client
import json
import os
import signal
import subprocess
import sys
import time

host, port = sys.argv[1].rsplit(":", 1)
count = int(sys.argv[2])
unrelated = int(sys.argv[3]) if len(sys.argv) > 3 else 0

sleepers = []
try:
    for _ in range(unrelated):
        sleepers.append(
            subprocess.Popen(
                ["sleep", "600"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    host_processes = sum(1 for p in os.listdir("/proc") if p.isdigit())
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"prompt": "x"})
    headers = {"content-type": "application/json"}

    def one():
        conn.request("POST", "/api/task", body, headers)
        r = conn.getresponse()
        r.read()
        return r.status == 200

    for _ in range(min(20, count)):  # warm-up: connection, caches
        one()
    failed = 0
    t = time.perf_counter()
    for _ in range(count):
        failed += not one()
    total = time.perf_counter() - t
    conn.close()
finally:
    for p in sleepers:
        p.send_signal(signal.SIGKILL)
    for p in sleepers:
        p.wait()

print(
    f"EXEC per_exec_ms={total * 1000 / count:.3f} total_s={total:.2f} "
    f"host_processes={host_processes} failed={failed}"
)
