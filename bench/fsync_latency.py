#!/usr/bin/env python3
"""Median fsync latency of a 4 KiB append in DIR, in microseconds.

Usage: fsync_latency.py DIR [COUNT]

Context for the chat figures: with AGENTD_STORE_SYNCHRONOUS=full every commit
waits for one fsync of the WAL, so this bounds commits per second, and group
commit has to fold requests into each commit to go faster.
"""
import os
import statistics
import sys
import time

path = os.path.join(sys.argv[1], "fsync-latency.probe")
count = int(sys.argv[2]) if len(sys.argv) > 2 else 200
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
try:
    samples = []
    for _ in range(count):
        os.write(fd, b"x" * 4096)
        t = time.perf_counter()
        os.fsync(fd)
        samples.append(time.perf_counter() - t)
finally:
    os.close(fd)
    os.remove(path)
print(f"FSYNC median_us={statistics.median(samples) * 1e6:.0f}")
