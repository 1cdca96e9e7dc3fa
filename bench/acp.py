#!/usr/bin/env python3
"""The `acp` runtime's benchmark (run by bench/acp.sh inside a network and
PID namespace with only loopback).

1. agentd's own cost per warm turn: the same ACP agent driven by a bare
   ACP client (JSON-RPC lines on the agent's pipes, in this script) and by
   agentd (`POST /api/chat` on a kept-alive connection), turns interleaved so
   that drift hits both alike. Once with a minimal agent that answers at once
   (tests/fixtures/acp-echo-agent.py: the difference is agentd's cost and
   little else), once with the real Gemini CLI (`gemini --acp`) against the
   fake Gemini API.
2. A warm ACP turn against a fresh-process turn of the same CLI: agentd's
   `gemini` runtime (one `gemini -p` per turn, resuming the session) and its
   `acp` runtime with `gemini --acp`, both through `POST /api/chat`.
3. agentd's RSS, threads and fds with no agent and with
   AGENTD_ACP_MAX_AGENTS warm Gemini agents.

Prints a markdown table (and writes it to BENCH_RESULTS when set). Knobs:
BENCH_ACP_ECHO_TURNS (400), BENCH_ACP_GEMINI_TURNS (30),
BENCH_ACP_FRESH_TURNS (5), BENCH_ACP_AGENTS (4), BENCH_ACP_SETTLE_MS (200: the
pause after each Gemini turn, see interleaved()).
"""

import http.client
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "agent_clis"))
import driver  # noqa: E402
from driver import Agentd, FakeModel  # noqa: E402

ECHO_AGENT = os.path.join(ROOT, "tests", "fixtures", "acp-echo-agent.py")
ECHO_TURNS = int(os.environ.get("BENCH_ACP_ECHO_TURNS", "400"))
GEMINI_TURNS = int(os.environ.get("BENCH_ACP_GEMINI_TURNS", "30"))
FRESH_TURNS = int(os.environ.get("BENCH_ACP_FRESH_TURNS", "5"))
MAX_AGENTS = int(os.environ.get("BENCH_ACP_AGENTS", "4"))
SETTLE = float(os.environ.get("BENCH_ACP_SETTLE_MS", "200")) / 1000.0
TURN_DEADLINE = 120  # seconds, for any one turn


def log(msg):
    print(f"# {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------ the clients

class BareAcp:
    """A bare ACP client: the agent as a child, JSON-RPC lines on its pipes."""

    def __init__(self, argv, env, cwd):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, cwd=cwd, text=True,
                                     bufsize=1)
        self.next_id = 0
        self.call("initialize", {"protocolVersion": 1, "clientCapabilities": {}})
        self.session = self.call("session/new", {"cwd": cwd, "mcpServers": []})["sessionId"]

    def call(self, method, params):
        self.next_id += 1
        rid = self.next_id
        self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method,
                                          "params": params}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + TURN_DEADLINE
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the agent closed its stdout during {method}")
            msg = json.loads(line)
            if msg.get("id") == rid and "method" not in msg:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            if "id" in msg and "method" in msg:  # a request to the client: refuse it
                self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "error": {
                    "code": -32601, "message": "not supported"}}) + "\n")
                self.proc.stdin.flush()
        raise RuntimeError(f"{method}: no answer within {TURN_DEADLINE} s")

    def turn(self, text):
        result = self.call("session/prompt", {"sessionId": self.session,
                                              "prompt": [{"type": "text", "text": text}]})
        if result.get("stopReason") != "end_turn":
            raise RuntimeError(f"bare turn ended {result}")

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Chat:
    """POST /api/chat on one kept-alive connection."""

    def __init__(self, agentd, session):
        self.conn = http.client.HTTPConnection("127.0.0.1", agentd.port, timeout=TURN_DEADLINE)
        self.session = session

    def turn(self, text):
        body = json.dumps({"message": text, "session_id": self.session})
        self.conn.request("POST", "/api/chat", body=body, headers={"content-type": "application/json"})
        resp = self.conn.getresponse()
        raw = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"agentd turn: HTTP {resp.status} {raw[:300]!r}")
        return json.loads(raw)


def timed(fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1000.0


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))]


# ------------------------------------------------------------ agentd set-ups

def echo_env(inst, model, with_key):
    return {"AGENTD_RUNTIME": "acp", "AGENTD_ACP_CMD": ECHO_AGENT}


def gemini_acp_env(inst, model, with_key):
    env = driver.gemini_env(inst, model, with_key)
    env.pop("AGENTD_GEMINI_BIN")
    env.update({"AGENTD_RUNTIME": "acp", "AGENTD_ACP_CMD": f"{driver.bin_path('gemini')} --acp"})
    return env


driver.CLIS_SPEC["bench-echo"] = SimpleNamespace(env=echo_env)
driver.CLIS_SPEC["bench-gemini-acp"] = SimpleNamespace(env=gemini_acp_env)
driver.CLIS_SPEC["bench-gemini"] = SimpleNamespace(env=driver.gemini_env)

# What agentd gives its agent besides its own environment (see
# src/agent/runtimes.rs): the work directory as cwd and Gemini's trust.
WORKSPACE_ENV = {"GEMINI_CLI_TRUST_WORKSPACE": "true"}


def bare_for(inst, argv):
    """A bare client with the environment agentd's agent gets."""
    cwd = os.path.join(inst.dir, "bare-workspace")
    os.makedirs(cwd, exist_ok=True)
    env = {k: v for k, v in inst.env.items() if not k.startswith("AGENTD_")}
    env.update(WORKSPACE_ENV)
    return BareAcp(argv, env, cwd)


def interleaved(bare, chat, turns, label, settle):
    """Warm both, then alternate turns (ABBA, so neither is always first);
    returns (bare ms list, agentd ms list). `settle` seconds pass after each
    turn: Gemini CLI goes on working for tens of milliseconds after it
    answered (its chat recording), and a prompt sent meanwhile waits for it,
    so without the pause every other turn would measure that work instead."""
    bare.turn("warm up")
    chat.turn("warm up")
    b, a = [], []
    for i in range(turns):
        order = [(b, bare), (a, chat)] if i % 2 == 0 else [(a, chat), (b, bare)]
        for out, client in order:
            out.append(timed(client.turn, f"{label} {i}"))
            time.sleep(settle)
    return b, a


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return {"rss_kb": int(out["VmRSS"].split()[0]), "threads": int(out["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def tree_rss_kb(root):
    """RSS of root's descendants (not root itself)."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            total += proc_status(pid)["rss_kb"]
        except (OSError, KeyError):
            pass
    return total


# ------------------------------------------------------------ measurements

def overhead(kind, model, turns, settle):
    spec, argv = {"echo": ("bench-echo", [ECHO_AGENT]),
                  "gemini": ("bench-gemini-acp", [driver.bin_path("gemini"), "--acp"])}[kind]
    a = Agentd(spec, "overhead", model)
    a.start()
    bare = None
    try:
        bare = bare_for(a, argv)
        chat = Chat(a, "bench")
        log(f"{kind}: {turns} warm turns each, bare ACP client and agentd, interleaved")
        return interleaved(bare, chat, turns, kind, settle)
    finally:
        if bare:
            bare.close()
        a.stop()


def fresh_turns(model, turns):
    a = Agentd("bench-gemini", "fresh", model)
    a.start()
    try:
        chat = Chat(a, "bench")
        log(f"fresh: {turns + 1} turns of the gemini runtime (one gemini -p each)")
        first = timed(chat.turn, "fresh first")
        out = []
        for i in range(turns):
            time.sleep(SETTLE)
            out.append(timed(chat.turn, f"fresh {i}"))
        return first, out
    finally:
        a.stop()


def pool_footprint(model, agents):
    a = Agentd("bench-gemini-acp", "pool", model, extra_env={"AGENTD_ACP_MAX_AGENTS": str(agents)})
    a.start()
    try:
        idle = proc_status(a.proc.pid)  # before any agent
        log(f"pool: {agents} chat sessions, one warm Gemini agent each")
        cold = []
        for i in range(agents):
            cold.append(timed(Chat(a, f"pool-{i}").turn, "hello"))
        full = proc_status(a.proc.pid)
        running = len([p for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == a.proc.pid])
        return idle, full, running, tree_rss_kb(a.proc.pid), cold
    finally:
        a.stop()


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def main():
    t0 = time.monotonic()
    model = FakeModel("bench")
    try:
        echo_b, echo_a = overhead("echo", model, ECHO_TURNS, 0)
        gem_b, gem_a = overhead("gemini", model, GEMINI_TURNS, SETTLE)
        fresh_first, fresh = fresh_turns(model, FRESH_TURNS)
        idle, full, running, agents_rss, cold = pool_footprint(model, MAX_AGENTS)
    finally:
        model.stop()

    med = statistics.median
    echo_add = med(echo_a) - med(echo_b)
    gem_add = med(gem_a) - med(gem_b)
    warm = med(gem_a)
    ratio = med(fresh) / warm
    rows = [
        ("agentd's cost per warm turn, minimal ACP agent: `POST /api/chat` minus a bare ACP client "
         f"(medians of {ECHO_TURNS} interleaved turns each)",
         f"{echo_add:.2f} ms (agentd {med(echo_a):.2f} ms, p90 {pct(echo_a, 90):.2f}; "
         f"bare {med(echo_b):.2f} ms, p90 {pct(echo_b, 90):.2f})",
         "< 5 ms", "pass" if echo_add < 5 else "FAIL"),
        (f"the same with Gemini CLI `--acp` ({GEMINI_TURNS} interleaved turns each, "
         f"{SETTLE * 1000:.0f} ms apart)",
         f"{gem_add:.2f} ms (agentd {med(gem_a):.1f} ms, p90 {pct(gem_a, 90):.1f}; "
         f"bare {med(gem_b):.1f} ms, p90 {pct(gem_b, 90):.1f})",
         "< 5 ms", "pass" if gem_add < 5 else "FAIL"),
        (f"fresh-process turn (`gemini` runtime, one `gemini -p` per turn, median of {FRESH_TURNS}) "
         "÷ warm ACP turn (`acp` runtime, Gemini CLI `--acp`)",
         f"{ratio:.0f}× ({med(fresh):.0f} ms, first turn {fresh_first:.0f} ms; warm {warm:.1f} ms)",
         "≥ 10×", "pass" if ratio >= 10 else "FAIL"),
        ("context: first turn of a chat on a new ACP agent (spawn, initialize, session/new, prompt)",
         f"median {med(cold):.0f} ms of {len(cold)}", "", ""),
        (f"agentd at {MAX_AGENTS} warm Gemini agents (AGENTD_ACP_MAX_AGENTS={MAX_AGENTS}): RSS, threads, fds",
         f"{full['rss_kb'] / 1024:.1f} MB, {full['threads']} threads, {full['fds']} fds "
         f"({running} agents running); with no agent: {idle['rss_kb'] / 1024:.1f} MB, "
         f"{idle['threads']} threads, {idle['fds']} fds", "", ""),
        ("context: the agents' own RSS (all their processes)", f"{agents_rss / 1024:.0f} MB", "", ""),
    ]
    head = (f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
            f"Gemini CLI {driver.GEMINI_VERSION}, {time.monotonic() - t0:.0f} s.\n"
            f"Load average (1/5/15 min) at end: {' '.join(open('/proc/loadavg').read().split()[:3])}.\n")
    table = ["| measurement | result | target | verdict |", "|---|---|---|---|"]
    table += [f"| {m} | {r} | {t} | {v} |" for m, r, t, v in rows]
    out = head + "\n" + "\n".join(table) + "\n"
    print(out)
    if os.environ.get("BENCH_RESULTS"):
        with open(os.environ["BENCH_RESULTS"], "w") as f:
            f.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
