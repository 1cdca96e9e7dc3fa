#!/usr/bin/env python3
"""CPU cost of one watchdog tick, against a baseline in the same run.

Usage: watchdog_cpu.py AGENTD_BIN WORK_DIR INTERVAL WINDOW_S

Starts two idle agentd processes side by side: the subject with
AGENTD_HEALTH_INTERVAL=INTERVAL and the baseline with a one-hour interval.
After a settling pause it reads each one's CPU time (utime+stime from
/proc/PID/stat, in clock ticks) and its `/health` watchdog tick count, waits
WINDOW_S seconds, and reads them again. Then it stops both and collects their
whole-life CPU time from wait4() (microsecond resolution) as a cross-check.

    per tick = (subject CPU - baseline CPU) / subject ticks

Ticks come from `/health` → `watchdog.ticks` when the build exposes it, else
from window / interval (said so in the output). Prints a final line:

    WATCHDOG us_per_tick=... ticks=... ticks_source=health|computed ...
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")
SETTLE_S = 2.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")
procs = []
watchdog_present = False


def on_term(signum, frame):
    raise SystemExit(1)


def parse_duration(text):
    m = re.fullmatch(r"([0-9.]+)\s*(ms|s|m|h)?", text.strip())
    if not m:
        raise SystemExit(f"cannot parse interval {text!r}")
    n = float(m.group(1))
    return n * {"ms": 1e-3, "s": 1, None: 1, "m": 60, "h": 3600}[m.group(2)]


def start(binary, state_dir, interval, log_path):
    env = dict(os.environ)
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(k, None)
    env.update({
        "AGENTD_LISTEN": "127.0.0.1:0",
        "AGENTD_STATE_DIR": state_dir,
        "AGENTD_HEALTH_INTERVAL": interval,
    })
    log = open(log_path, "w")
    p = subprocess.Popen([binary, "serve"], env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=log)
    procs.append(p)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with open(log_path) as f:
            m = re.search(r"listening on (\S+)", ANSI.sub("", f.read()))
        if m:
            return p, m.group(1)
        if p.poll() is not None:
            raise SystemExit(f"agentd exited early; see {log_path}")
        time.sleep(0.01)
    raise SystemExit(f"agentd did not start; see {log_path}")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def thread_cpu_ns(pid):
    """CPU nanoseconds per thread name (schedstat), for a breakdown. Threads
    that exit inside the window drop out, so this is a guide, not the total."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        out[name] = out.get(name, 0) + ns
    return out


def health_ticks(addr):
    """The watchdog tick count from `/health`, None without one; also notes
    whether `/health` has a `watchdog` block at all."""
    global watchdog_present
    try:
        with urllib.request.urlopen(f"http://{addr}/health", timeout=5) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        body = json.load(e)
    wd = body.get("watchdog")
    watchdog_present = watchdog_present or isinstance(wd, dict)
    if isinstance(wd, dict) and isinstance(wd.get("ticks"), int):
        return wd["ticks"]
    return None


def main():
    signal.signal(signal.SIGTERM, on_term)
    binary, work, interval, window = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    interval_s = parse_duration(interval)
    try:
        subj, subj_addr = start(binary, os.path.join(work, "wd-subject"), interval,
                                os.path.join(work, "wd-subject.log"))
        base, base_addr = start(binary, os.path.join(work, "wd-baseline"), "1h",
                                os.path.join(work, "wd-baseline.log"))
        time.sleep(SETTLE_S)
        t0 = time.monotonic()
        ticks0 = health_ticks(subj_addr)
        health_ticks(base_addr)  # same request cost on both sides
        s0, b0 = cpu_ticks(subj.pid), cpu_ticks(base.pid)
        t_s0, t_b0 = thread_cpu_ns(subj.pid), thread_cpu_ns(base.pid)
        time.sleep(window)
        s1, b1 = cpu_ticks(subj.pid), cpu_ticks(base.pid)
        t_s1, t_b1 = thread_cpu_ns(subj.pid), thread_cpu_ns(base.pid)
        ticks1 = health_ticks(subj_addr)
        health_ticks(base_addr)
        elapsed = time.monotonic() - t0
        if ticks0 is not None and ticks1 is not None:
            ticks, source = ticks1 - ticks0, "health"
        else:
            ticks, source = int(elapsed / interval_s), "computed"
        # Whole-life CPU with microsecond resolution: both processes lived the
        # same span and did the same start-up and shutdown, so the difference
        # is the extra ticks. Their tick count over the whole life is the
        # window's rate times the life span.
        life0 = time.monotonic()
        for p in (subj, base):
            p.send_signal(signal.SIGTERM)
        rus = {}
        for name, p in (("subject", subj), ("baseline", base)):
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = status
            rus[name] = ru.ru_utime + ru.ru_stime
        procs.clear()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    us_per_clk = 1e6 / CLK_TCK
    subj_us = (s1 - s0) * us_per_clk
    base_us = (b1 - b0) * us_per_clk
    per_tick = (subj_us - base_us) / ticks if ticks > 0 else float("nan")
    resolution = us_per_clk / ticks if ticks > 0 else float("nan")
    life_s = SETTLE_S + elapsed + (time.monotonic() - life0)
    life_ticks = ticks / elapsed * life_s
    ru_per_tick = (rus["subject"] - rus["baseline"]) * 1e6 / life_ticks if life_ticks else float("nan")
    print(f"window {elapsed:.1f} s, interval {interval}, ticks {ticks} ({source})")
    print(f"subject  CPU {subj_us / 1000:.1f} ms in window, {rus['subject'] * 1000:.1f} ms whole life")
    print(f"baseline CPU {base_us / 1000:.1f} ms in window, {rus['baseline'] * 1000:.1f} ms whole life")
    if ticks > 0:
        parts = []
        for name in sorted(set(t_s1) | set(t_b1)):
            extra = (t_s1.get(name, 0) - t_s0.get(name, 0)) - (t_b1.get(name, 0) - t_b0.get(name, 0))
            parts.append(f"{name} {extra / 1000 / ticks:.0f}")
        print("by thread, µs per tick over baseline: " + ", ".join(parts))
        print("BYTHREAD " + "; ".join(parts))
    print(f"WATCHDOG us_per_tick={per_tick:.1f} resolution_us={resolution:.1f} ticks={ticks} "
          f"ticks_source={source} watchdog_present={'yes' if watchdog_present else 'no'} rusage_us_per_tick={ru_per_tick:.1f} "
          f"subject_window_ms={subj_us / 1000:.1f} baseline_window_ms={base_us / 1000:.1f}")


if __name__ == "__main__":
    main()
