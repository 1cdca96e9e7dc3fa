#!/usr/bin/env python3
"""Build a state.db of about SIZE_MB megabytes with agentd's schema (version 1).

Usage: fill_db.py PATH SIZE_MB

Rows look like real chat history: user/assistant pairs spread over many
sessions, a few hundred bytes of text each. Used to time a cold start against
a large database. The file is left in WAL mode and synced to disk, as a
restarted agentd finds its own database.
"""
import os
import random
import sqlite3
import sys
import time

SCHEMA = """
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content TEXT NOT NULL,
    ts REAL NOT NULL
);
CREATE INDEX messages_by_session ON messages (session_id, id);
PRAGMA user_version=1;
"""

WORDS = ("agent build test deploy health watchdog store commit session message "
         "restart systemd socket thread queue retry latency error review patch").split()


def rows(n, start_ts):
    rnd = random.Random(42)
    for i in range(n):
        session = f"session-{rnd.randrange(1000):04d}"
        role = "user" if i % 2 == 0 else "assistant"
        text = " ".join(rnd.choice(WORDS) for _ in range(rnd.randrange(20, 60)))
        yield (session, role, text, start_ts + i * 0.01)


def main():
    path, size_mb = sys.argv[1], float(sys.argv[2])
    if os.path.exists(path):
        os.remove(path)
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    target = size_mb * 1024 * 1024
    batch = 50_000
    start_ts = time.time() - 86_400 * 30
    total = 0
    while os.path.getsize(path) < target:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages (session_id, role, content, ts) VALUES (?, ?, ?, ?)",
            rows(batch, start_ts + total * 0.01),
        )
        conn.execute("COMMIT")
        total += batch
    # Leave the file as agentd leaves it: in WAL mode and on disk, so a start
    # measures agentd, not a one-time journal conversion that flushes 100 MB of
    # dirty pages.
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    print(f"{total} rows, {os.path.getsize(path) / 1048576:.1f} MiB")


if __name__ == "__main__":
    main()
