#!/usr/bin/env python3
"""HTTP client of the systemd end-to-end suite (standard library only).

The suite runs it inside the container's network namespace, so every request
goes to the container's own loopback. Every loop here is bounded both in
count and in time. Subcommands print one JSON object on stdout.

  chat      store N chat messages; write the acknowledged ones to a file
  verify    check that every acknowledged message is in the history
  inject    POST /debug/fault/{kind}; print the CLOCK_MONOTONIC time of the 200
  get       GET a path; print the status and (a field of) the JSON body
  task      POST /api/task {"prompt","async":true}; print the execution id
  probe     loop new-connection requests for a while; count refusals, resets,
            timeouts and answers
  chatload  loop chats for a while (load during the false-positive test)
  make-db   build a state.db of a given size with agentd's schema
"""

import argparse
import http.client
import json
import os
import socket
import sqlite3
import sys
import time
import uuid

HOST = "127.0.0.1"
PORT = 8420


def mono_us():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def request(method, path, body=None, timeout=10.0):
    """One request on a fresh connection; returns (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection(HOST, PORT, timeout=timeout)
    try:
        headers = {"Connection": "close"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


def emit(obj):
    print(json.dumps(obj, sort_keys=True))
    sys.stdout.flush()


def cmd_chat(a):
    deadline = time.monotonic() + a.max_seconds
    acked, failed = [], 0
    for i in range(a.n):
        if time.monotonic() > deadline:
            break
        msg = f"{a.session}-{i}-{uuid.uuid4().hex[:8]}"
        try:
            status, body = request(
                "POST", "/api/chat", {"message": msg, "session_id": a.session}, timeout=5
            )
        except OSError:
            failed += 1
            continue
        if status == 200 and isinstance(body, dict) and body.get("session_id") == a.session:
            acked.append(msg)
        else:
            failed += 1
    with open(a.out, "w") as f:
        for m in acked:
            f.write(m + "\n")
    emit({"sent": a.n, "acked": len(acked), "failed": failed})


def cmd_verify(a):
    with open(a.acked) as f:
        acked = [line.strip() for line in f if line.strip()]
    status, body = request("GET", f"/api/chat/history?session_id={a.session}&limit=10000")
    if status != 200 or not isinstance(body, dict):
        emit({"acked": len(acked), "found": 0, "status": status})
        return
    seen = {m["content"] for m in body.get("messages", []) if m.get("role") == "user"}
    missing = [m for m in acked if m not in seen]
    emit({"acked": len(acked), "found": len(acked) - len(missing), "missing": missing[:5]})


def cmd_inject(a):
    status, body = request("POST", f"/debug/fault/{a.kind}", {}, timeout=5)
    emit({"status": status, "t_us": mono_us(), "body": body})


def field(body, path):
    for part in path.split(".") if path else []:
        if not isinstance(body, dict):
            return None
        body = body.get(part)
    return body


def cmd_get(a):
    deadline = time.monotonic() + a.wait
    while True:
        try:
            status, body = request("GET", a.path, timeout=3)
        except OSError as e:
            status, body = None, str(e)
        if status == a.want or time.monotonic() >= deadline or a.want is None:
            break
        time.sleep(0.1)
    emit({"status": status, "value": field(body, a.field) if a.field else body})


def cmd_task(a):
    status, body = request("POST", "/api/task", {"prompt": a.prompt, "async": True}, timeout=5)
    emit({"status": status, "execution_id": field(body, "execution_id"), "body": body})


def classify(exc):
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)):
        return "reset"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    return "other"


def cmd_probe(a):
    """New connection per request, so every request exercises connect()."""
    counts = {"ok": 0, "http_error": 0, "refused": 0, "reset": 0, "timeout": 0, "other": 0}
    slowest = 0.0
    end = time.monotonic() + a.seconds
    n = 0
    while time.monotonic() < end and n < a.max_requests:
        n += 1
        t = time.monotonic()
        try:
            status, _ = request("GET", a.path, timeout=a.timeout)
            counts["ok" if status == 200 else "http_error"] += 1
        except Exception as e:  # noqa: BLE001 - every failure is counted by kind
            counts[classify(e)] += 1
            if classify(e) == "refused":
                time.sleep(0.05)
        slowest = max(slowest, time.monotonic() - t)
        time.sleep(a.pause)
    counts["requests"] = n
    counts["slowest_s"] = round(slowest, 3)
    emit(counts)


def cmd_chatload(a):
    end = time.monotonic() + a.seconds
    ok = bad = 0
    while time.monotonic() < end and ok + bad < a.max_requests:
        try:
            status, _ = request(
                "POST", "/api/chat", {"message": "load", "session_id": "load"}, timeout=5
            )
            ok, bad = (ok + 1, bad) if status == 200 else (ok, bad + 1)
        except OSError:
            bad += 1
    emit({"ok": ok, "failed": bad})


SCHEMA = """
CREATE TABLE messages (id INTEGER PRIMARY KEY, session_id TEXT NOT NULL,
  role TEXT NOT NULL CHECK (role IN ('user','assistant')),
  content TEXT NOT NULL, ts REAL NOT NULL);
CREATE INDEX messages_by_session ON messages (session_id, id);
PRAGMA user_version=1;
"""


def cmd_make_db(a):
    if os.path.exists(a.path):
        os.unlink(a.path)
    db = sqlite3.connect(a.path)
    db.executescript(SCHEMA)
    target = a.mb * 1024 * 1024
    pad = "x" * 900
    now = time.time()
    batch, i = 2000, 0
    while os.path.getsize(a.path) < target:
        rows = []
        for _ in range(batch):
            role = "user" if i % 2 == 0 else "assistant"
            rows.append((f"bulk-{i // 200}", role, f"{i} {pad}", now - 1e6 + i * 0.01))
            i += 1
        with db:
            db.executemany(
                "INSERT INTO messages (session_id, role, content, ts) VALUES (?,?,?,?)", rows
            )
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    emit({"rows": i, "bytes": os.path.getsize(a.path)})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("chat")
    s.add_argument("--n", type=int, default=50)
    s.add_argument("--session", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--max-seconds", type=float, default=30)
    s = sub.add_parser("verify")
    s.add_argument("--session", required=True)
    s.add_argument("--acked", required=True)
    s = sub.add_parser("inject")
    s.add_argument("kind")
    s = sub.add_parser("get")
    s.add_argument("path")
    s.add_argument("--field")
    s.add_argument("--want", type=int)
    s.add_argument("--wait", type=float, default=0)
    s = sub.add_parser("task")
    s.add_argument("--prompt", default="x")
    s = sub.add_parser("probe")
    s.add_argument("--path", default="/health?probe=1")
    s.add_argument("--seconds", type=float, default=10)
    s.add_argument("--max-requests", type=int, default=5000)
    s.add_argument("--timeout", type=float, default=15)
    s.add_argument("--pause", type=float, default=0.02)
    s = sub.add_parser("chatload")
    s.add_argument("--seconds", type=float, default=30)
    s.add_argument("--max-requests", type=int, default=20000)
    s = sub.add_parser("make-db")
    s.add_argument("path")
    s.add_argument("--mb", type=int, default=100)
    a = p.parse_args()
    globals()["cmd_" + a.cmd.replace("-", "_")](a)


if __name__ == "__main__":
    main()
