#!/usr/bin/env python3
"""Time agentd's cold start: spawn → `listening on` log line → `READY=1`.

Usage: cold_start.py AGENTD_BIN STATE_DIR_TEMPLATE RUNS [DB_TO_COPY]

Each run creates a Unix datagram socket we own, starts `agentd serve` with
NOTIFY_SOCKET pointing at it, and records when the `listening on` line appears on
stderr and when the `READY=1` datagram arrives. The process is then stopped
with SIGTERM. Without DB_TO_COPY every run gets a fresh, empty state dir (a
first start: the database is created). With it, DB_TO_COPY is copied into the
state dir once and synced, and every run restarts on that database, as agentd
restarts on its own. Prints one line per run and a final machine-readable line:

    COLD listen_ms_median=... ready_ms_median=... (or ready_ms_median=none)

A build that does not send READY=1 yet reports `none` after waiting
READY_GRACE seconds past the `listening on` line.
"""
import os
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

READY_GRACE = 2.0
START_DEADLINE = 20.0
ANSI = re.compile(rb"\x1b\[[0-9;]*m")

current = None


def on_term(signum, frame):
    raise SystemExit(1)


def fresh_state_dir(state_dir, db):
    if os.path.exists(state_dir):
        shutil.rmtree(state_dir)
    os.makedirs(state_dir)
    if db:
        target = os.path.join(state_dir, "state.db")
        shutil.copyfile(db, target)
        with open(target, "rb+") as f:
            os.fsync(f.fileno())


def one_run(binary, state_dir):
    global current
    sock_dir = tempfile.mkdtemp(prefix="agentd-notify-")
    sock_path = os.path.join(sock_dir, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.setblocking(False)
    env = dict(os.environ)
    env.update({
        "NOTIFY_SOCKET": sock_path,
        "AGENTD_LISTEN": "127.0.0.1:0",
        "AGENTD_STATE_DIR": state_dir,
        "AGENTD_LOG": "info",
    })
    env.pop("WATCHDOG_USEC", None)
    env.pop("WATCHDOG_PID", None)
    sel = selectors.DefaultSelector()
    t0 = time.monotonic()
    proc = subprocess.Popen([binary, "serve"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    current = proc
    t_listen = t_ready = None
    buf = b""
    try:
        sel.register(sock, selectors.EVENT_READ, "notify")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        while t_ready is None:
            now = time.monotonic()
            deadline = t0 + START_DEADLINE
            if t_listen is not None:
                deadline = min(deadline, t_listen + READY_GRACE)
            if now >= deadline or proc.poll() is not None:
                break
            for key, _ in sel.select(timeout=deadline - now):
                if key.data == "notify":
                    data = sock.recv(4096)
                    if b"READY=1" in data.split(b"\n"):
                        t_ready = time.monotonic()
                else:
                    chunk = os.read(proc.stderr.fileno(), 65536)
                    if not chunk:
                        sel.unregister(proc.stderr)
                        continue
                    buf += ANSI.sub(b"", chunk)
                    if t_listen is None and b"listening on" in buf:
                        t_listen = time.monotonic()
    finally:
        sel.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        current = None
        sock.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    ms = lambda t: None if t is None else (t - t0) * 1000
    return ms(t_listen), ms(t_ready)


def main():
    signal.signal(signal.SIGTERM, on_term)
    binary, state_dir, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    db = sys.argv[4] if len(sys.argv) > 4 else None
    listens, readies = [], []
    try:
        if db:
            fresh_state_dir(state_dir, db)
        for i in range(runs):
            if not db:
                fresh_state_dir(state_dir, None)
            listen_ms, ready_ms = one_run(binary, state_dir)
            fmt = lambda v: "none" if v is None else f"{v:.1f}"
            print(f"run {i + 1}: listening {fmt(listen_ms)} ms, READY=1 {fmt(ready_ms)} ms",
                  flush=True)
            if listen_ms is not None:
                listens.append(listen_ms)
            if ready_ms is not None:
                readies.append(ready_ms)
    finally:
        if current is not None and current.poll() is None:
            current.kill()
    med = lambda xs: f"{statistics.median(xs):.1f}" if xs else "none"
    mx = lambda xs: f"{max(xs):.1f}" if xs else "none"
    print(f"COLD listen_ms_median={med(listens)} listen_ms_max={mx(listens)} "
          f"ready_ms_median={med(readies)} ready_ms_max={mx(readies)} "
          f"ready_runs={len(readies)}/{runs}")


if __name__ == "__main__":
    main()
