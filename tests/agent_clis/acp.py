#!/usr/bin/env python3
"""Scenarios for agentd's `acp` runtime with real ACP agents, each pointed
at the fake model API on loopback:

  gemini   Gemini CLI in ACP mode (`gemini --acp`), the fake Gemini API
  claude   the Claude adapter (`claude-agent-acp`), which drives its own
           Claude Code through ANTHROPIC_BASE_URL, the fake Anthropic API
  codex    the Codex adapter (`codex-acp`), the fake Responses API
  qwen     Qwen Code (`qwen --acp --auth-type gemini`), the fake Gemini API

Gemini runs every scenario; the other presets run the ones that prove what
differs between agents (context, session/load, a killed agent, permissions,
tasks). Run by acp.sh inside a network and PID namespace that has only
loopback (the same set-up as run.sh). Reuses driver.py's processes and
checks (FakeModel, Agentd, check, ...). Each scenario gets its own agentd;
several run at once; every wait has a deadline. Ends with "checks: N,
failed: M"; exits 1 when a check failed.

Environment: as driver.py (AGENTD_BIN, AGENTD_CLIS_DIR, E2E_WORK, E2E_ONLY,
E2E_JOBS, E2E_DEADLINE), and E2E_ACP_AGENTS (gemini,claude,codex,qwen).
"""

import json
import os
import signal
import sys
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import driver
from driver import Agentd, FakeModel, check, emit, pid_running, wait_until

AGENTS = [n for n in os.environ.get("E2E_ACP_AGENTS", "gemini,claude,codex,qwen").split(",") if n]


def acp_env(env, *words):
    """A per-turn runtime's environment turned into the acp runtime's."""
    for name in [k for k in env if k.startswith("AGENTD_")]:
        env.pop(name)
    env["AGENTD_RUNTIME"] = "acp"
    env["AGENTD_ACP_CMD"] = " ".join(words)
    return env


def gemini_acp_env(inst, model, with_key):
    return acp_env(driver.gemini_env(inst, model, with_key), driver.bin_path("gemini"), "--acp")


def claude_acp_env(inst, model, with_key):
    env = acp_env(driver.claude_env(inst, model, with_key), driver.bin_path("claude-agent-acp"))
    # The adapter always hands its Claude Code a permission-skipping flag that
    # Claude Code refuses as root unless told it runs in a sandbox (the
    # suite's namespaces are one).
    env["IS_SANDBOX"] = "1"
    return env


def codex_acp_env(inst, model, with_key):
    home = os.path.join(inst.dir, "codex-home")
    # A model slug Codex knows, or every answer starts with a "model metadata
    # not found" warning; ask before every command, so that a tool call
    # reaches session/request_permission.
    driver.write_codex_config(home, model, slug="gpt-5.5", extra='approval_policy = "untrusted"\n')
    env = {"CODEX_HOME": home}
    if with_key:
        env[driver.CODEX_KEY_VAR] = "fake-codex-key-e2e"
    return acp_env(env, driver.bin_path("codex-acp"))


def qwen_acp_env(inst, model, with_key):
    os.makedirs(os.path.join(inst.home, ".qwen"), exist_ok=True)
    with open(os.path.join(inst.home, ".qwen", "settings.json"), "w") as f:
        # No memory-extraction or follow-up-suggestion requests after a turn.
        json.dump({"memory": {"enableManagedAutoMemory": False},
                   "ui": {"enableFollowupSuggestions": False}}, f)
    env = {"GOOGLE_GEMINI_BASE_URL": model.url, "GEMINI_MODEL": "gemini-fake-1"}
    if with_key:
        env["GEMINI_API_KEY"] = "fake-gemini-key-e2e"
    # `default` approval asks the client; Qwen's own default asks a model.
    return acp_env(env, driver.bin_path("qwen"), "--acp", "--auth-type", "gemini",
                   "--approval-mode", "default")


# What each preset is known to do, which the checks hold it to: `loads`,
# session/load restores the conversation in a new process (Gemini CLI 0.61
# advertises it but cannot load a session it wrote); `sandboxed_tools`, its
# tools run in a sandbox with its own PID namespace (Codex: bwrap), so the
# pid a tool writes is not one agentd can see.
PRESETS = {
    "gemini": SimpleNamespace(env=gemini_acp_env, loads=False, sandboxed_tools=False, scenarios=None),
    "claude": SimpleNamespace(env=claude_acp_env, loads=True, sandboxed_tools=False,
                              scenarios={"multi_turn", "restart_load", "agent_killed", "killed_after_answer", "tasks",
                                         "permission_deny", "permission_ask"}),
    "codex": SimpleNamespace(env=codex_acp_env, loads=True, sandboxed_tools=True,
                             scenarios={"multi_turn", "restart_load", "agent_killed", "killed_after_answer", "tasks",
                                        "permission_deny", "permission_ask"}),
    "qwen": SimpleNamespace(env=qwen_acp_env, loads=True, sandboxed_tools=False,
                            scenarios={"multi_turn", "restart_load", "agent_killed", "killed_after_answer", "tasks",
                                       "permission_deny"}),
}
for _name, _preset in PRESETS.items():
    driver.CLIS_SPEC[f"acp-{_name}"] = SimpleNamespace(env=_preset.env)


def preset(a):
    return PRESETS[a.cli.removeprefix("acp-")]


def agents(a):
    """The /health agents block ({} when missing)."""
    s, b = a.get("/health")
    return (b or {}).get("agents") or {} if s in (200, 503) and isinstance(b, dict) else {}


def wait_agents(a, pred, timeout=10):
    """Waits until the /health agents block satisfies pred; returns it or None."""
    return wait_until(lambda: (lambda r: r if pred(r) else None)(agents(a)), timeout, 0.2)


def ended(s, b):
    """The turn ended: answered, or ended as cancelled (an agent may end
    its turn that way when a permission is refused)."""
    return s == 200 or (isinstance(b, dict) and b.get("status") == "cancelled")


def agent_children(a):
    """Pids of agentd's direct children (its ACP agent processes)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == a.proc.pid:
            out.append(int(name))
    return out


def tagged(a):
    """{pid: pgid} of the live processes tagged as one of a's ACP agents."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and any(e.startswith(b"AGENTD_EXECUTION_ID=acp-agent-") for e in env) \
                and int(name) != a.proc.pid and _descends(int(name), a.proc.pid):
            out[int(name)] = int(fields[2])
    return out


def _descends(pid, ancestor):
    for _ in range(64):
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            return False
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


def response(b):
    return (b or {}).get("response", "") if isinstance(b, dict) else ""


def meta(b):
    return (b or {}).get("metadata") or {} if isinstance(b, dict) else {}


def sc_multi_turn(a):
    scope = a.scope("multi-turn")
    sid = "acp-multi"
    s1, b1 = a.chat("hello there", session_id=sid)
    check(scope, "turn 1 answered", s1 == 200 and "turns=1: hello there" in response(b1),
          f"HTTP {s1} {json.dumps(b1)[:300]}")
    children = agent_children(a)
    check(scope, "one agent process runs after turn 1", len(children) == 1, children)
    s2, b2 = a.chat("what did I say?", session_id=sid)
    check(scope, "turn 2 carries turn 1 (context kept by the agent)",
          s2 == 200 and "turns=2: hello there | what did I say?" in response(b2),
          f"HTTP {s2} {json.dumps(b2)[:300]}")
    s3, b3 = a.chat("and now?", session_id=sid)
    check(scope, "turn 3 carries both", s3 == 200 and "turns=3:" in response(b3), response(b3))
    check(scope, "the same process answered every turn", agent_children(a) == children,
          f"{children} then {agent_children(a)}")
    groups = tagged(a)
    check(scope, "every process of the agent is in its process group",
          children and all(g == children[0] for g in groups.values()), f"agent {children}: {groups}")
    check(scope, "the ACP session id is reported and stable",
          meta(b1).get("agent_session_id") and meta(b1).get("agent_session_id") == meta(b3).get("agent_session_id"),
          [meta(b).get("agent_session_id") for b in (b1, b2, b3)])
    check(scope, "no session restart reported", not meta(b2).get("session_restarted"), meta(b2))
    ag = wait_agents(a, lambda r: r.get("started") == 1, 5)
    check(scope, "/health agents: 1 started, 0 restarts, limit shown",
          ag and ag.get("restarts") == 0 and ag.get("limit") == 4 and ag.get("running") == 1,
          agents(a))


def sc_restart_load(a):
    scope = a.scope("agentd restart -> session/load")
    sid = "acp-restart"
    s1, b1 = a.chat("remember apples", session_id=sid)
    check(scope, "turn 1 answered", s1 == 200 and "turns=1: remember apples" in response(b1),
          f"HTTP {s1} {json.dumps(b1)[:300]}")
    if preset(a).loads:
        # As in the SIGKILL scenario: Claude Code writes its transcript just
        # after it answers, and a stop inside that moment loses the turn.
        check(scope, "the agent has written turn 1 to its session",
              wait_until(lambda: persisted(a, "remember apples"), 15, 0.1), a.home)
    children = agent_children(a)
    rc = a.stop()
    check(scope, "agentd stopped cleanly", rc == 0, rc)
    check(scope, "its agent process went with it",
          wait_until(lambda: not any(pid_running(p) for p in children), 10), children)
    a.start()
    s2, b2 = a.chat("what did I say?", session_id=sid)
    check(scope, "the turn after the restart succeeds", s2 == 200 and "what did I say?" in response(b2),
          f"HTTP {s2} {json.dumps(b2)[:300]}")
    log = a.log_text()
    check(scope, "agentd asked the new agent process for session/load of the recorded ACP session",
          meta(b1).get("agent_session_id") and ("could not load the session" in log or "ACP session loaded" in log),
          a.log_tail(600))
    kept = "turns=2: remember apples | what did I say?" in response(b2)
    if preset(a).loads:
        check(scope, "session/load kept the context across the restart", kept, response(b2))
        check(scope, "no session restart reported", not meta(b2).get("session_restarted"), meta(b2))
        check(scope, "the same ACP session goes on",
              meta(b2).get("agent_session_id") == meta(b1).get("agent_session_id"), [meta(b1), meta(b2)])
    elif not meta(b2).get("session_restarted"):
        # Gemini CLI 0.61 advertises loadSession but mostly cannot load a
        # session it wrote ("No previous sessions found for this project.");
        # when its load does work, the context must be there.
        check(scope, "session/load worked this time, and kept the context", kept, response(b2))
    else:
        check(scope, "the turn says it was restarted, and ran without the context", not kept, response(b2))
        check(scope, "the fallback is logged as a warning",
              " WARN " in log and "starts a new one without the earlier context" in log, a.log_tail(600))


def persisted(a, text):
    """True once a file the agent keeps under its home (its session
    transcript) holds `text`. agentd's own state dir and log are not
    looked at."""
    roots = [a.home, os.path.join(a.dir, "codex-home")]
    for root in roots:
        for top, _, files in os.walk(root):
            for name in files:
                path = os.path.join(top, name)
                try:
                    if os.path.getsize(path) > 4 << 20:
                        continue
                    with open(path, "rb") as f:
                        if text.encode() in f.read():
                            return True
                except OSError:
                    continue
    return False


def sc_agent_killed(a):
    scope = a.scope("agent SIGKILLed between turns")
    sid = "acp-kill"
    s1, b1 = a.chat("first words", session_id=sid)
    check(scope, "turn 1 answered", s1 == 200, f"HTTP {s1} {json.dumps(b1)[:300]}")
    children = agent_children(a)
    if not check(scope, "one agent process", len(children) == 1, children):
        return
    if preset(a).loads:
        # A crash *between* turns: after the agent wrote the turn to its
        # session (Claude Code writes its transcript just after it answers;
        # a kill inside that moment loses the turn, which no client can
        # prevent).
        check(scope, "the agent has written turn 1 to its session",
              wait_until(lambda: persisted(a, "first words"), 15, 0.1), a.home)
    os.killpg(children[0], signal.SIGKILL)
    ag = wait_agents(a, lambda r: r.get("restarts") == 1)
    check(scope, "/health counts the restart with its reason",
          ag and "signal 9" in str(ag.get("last_restart_reason")), agents(a))
    s, b = a.get("/health")
    check(scope, "agentd itself stays healthy (200)", s == 200, f"HTTP {s} {str(b)[:300]}")
    ms, mb, _ = a.request("GET", "/metrics", timeout=10)
    check(scope, "/metrics counts it (agentd_acp_agent_restarts_total 1)",
          ms == 200 and "agentd_acp_agent_restarts_total 1" in str(mb), str(mb)[-800:])
    s2, b2 = a.chat("what did I say?", session_id=sid)
    check(scope, "the next turn succeeds in a new process",
          s2 == 200 and "what did I say?" in response(b2), f"HTTP {s2} {json.dumps(b2)[:300]}")
    if preset(a).loads:
        check(scope, "it continued the session (session/load)",
              "turns=2: first words | what did I say?" in response(b2), response(b2))
    elif not meta(b2).get("session_restarted"):
        check(scope, "session/load worked this time, and kept the context",
              "turns=2: first words | what did I say?" in response(b2), response(b2))
    elif meta(b2).get("session_restored") == "transcript":
        check(scope, "it said it could not continue the session, and agentd's transcript gave the context back",
              "first words" in response(b2), b2)
    else:
        check(scope, "it said it could not continue the session, and ran without the context",
              "first words" not in response(b2), b2)
    check(scope, "a new agent process runs", agent_children(a) not in ([], children), agent_children(a))


# Rounds of sc_killed_after_answer: ten for Gemini CLI, whose load after
# such a kill is the case in question (5-9 s a round: two agent starts);
# three for the others (Codex about 1.3 s a round, the Claude adapter 7 s,
# Qwen Code 10 s).
KILL_ROUNDS = {"gemini": 10}
KILL_ROUNDS_OTHERS = 3


def sc_killed_after_answer(a):
    """A real crash does not wait for the agent to write its turn down: the
    agent's process group is SIGKILLed the moment the HTTP answer is in, and
    the next turn asks about that answer's turn. Ten rounds with Gemini CLI
    (three with the others), each in a fresh chat session. No round may lose the context silently: it reaches the
    model (a whole session/load, or agentd's transcript), or the answer
    says session_restarted; and since agentd restores what an agent lost,
    every round's context must reach the model."""
    rounds = KILL_ROUNDS.get(a.cli.removeprefix("acp-"), KILL_ROUNDS_OTHERS)
    scope = a.scope(f"agent SIGKILLed right after its answer, x{rounds}")
    started = time.monotonic()
    outcomes = []
    for i in range(rounds):
        sid = f"acp-kill-now-{i}"
        marker = f"zebra{uuid.uuid4().hex[:8]}"
        before = set(agent_children(a))
        s1, b1 = a.chat(f"remember the word {marker}", session_id=sid)
        fresh = [p for p in agent_children(a) if p not in before]
        for pid in fresh:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not check(scope, f"round {i}: turn 1 answered by a new agent process, killed at once",
                     s1 == 200 and marker in response(b1) and len(fresh) == 1,
                     f"HTTP {s1} {json.dumps(b1)[:300]}; new processes {fresh}"):
            continue
        s2, b2 = a.chat("which word did I ask you to remember?", session_id=sid)
        m = meta(b2)
        reached = marker in response(b2)
        outcomes.append("restored" if m.get("session_restored") else
                        "loaded" if reached else
                        "restarted" if m.get("session_restarted") else "lost")
        if not check(scope, f"round {i}: the turn after the kill succeeds",
                     s2 == 200 and "which word did I ask" in response(b2),
                     f"HTTP {s2} {json.dumps(b2)[:400]}"):
            continue
        check(scope, f"round {i}: no silent loss (the context reached the model, or session_restarted)",
              reached or m.get("session_restarted") is True, b2)
        check(scope, f"round {i}: session_restored means the context reached the model",
              not m.get("session_restored") or (reached and m.get("session_restarted") is True), b2)
        check(scope, f"round {i}: the context reached the model (agentd restores what the agent lost)",
              reached, b2)
    counts = {k: outcomes.count(k) for k in ("loaded", "restored", "restarted", "lost")}
    emit(f"#  {a.cli} killed_after_answer: {counts} in {time.monotonic() - started:.0f} s")
    log = a.log_text()
    if counts["restored"]:
        check(scope, "a restore is logged, and so is the loss it repairs",
              "agentd's transcript of it goes with the prompt" in log
              and ("fewer turns than agentd recorded" in log or "without the earlier context" in log),
              a.log_tail(800))


def sc_pool(a):
    scope = a.scope("pool limit + idle close")
    s1, b1 = a.chat("session one", session_id="pool-1")
    check(scope, "session 1 answered", s1 == 200 and "session one" in response(b1), f"HTTP {s1} {b1}")
    first = agent_children(a)
    s2, b2 = a.chat("session two", session_id="pool-2")
    check(scope, "session 2 answered", s2 == 200 and "turns=1: session two" in response(b2), f"HTTP {s2} {b2}")
    check(scope, "the limit (1) held: session 1's process was closed for session 2",
          wait_until(lambda: len(agent_children(a)) == 1 and agent_children(a) != first, 10),
          f"{first} then {agent_children(a)}")
    ag = wait_agents(a, lambda r: r.get("started", 0) >= 2, 5) or agents(a)
    check(scope, "/health: limit 1, 2 started, 1 closed, 0 restarts",
          ag.get("limit") == 1 and ag.get("started") == 2 and ag.get("closed", 0) >= 1 and ag.get("restarts") == 0, ag)
    s3, b3 = a.chat("back to one", session_id="pool-1")
    check(scope, "session 1 again (its process was evicted): answered",
          s3 == 200 and "back to one" in response(b3), f"HTTP {s3} {b3}")
    gone = wait_until(lambda: agent_children(a) == [], 20, 0.2)
    check(scope, "the idle process is closed after AGENTD_ACP_IDLE", gone, agent_children(a))
    ag = wait_agents(a, lambda r: r.get("running") == 0, 5)
    check(scope, "/health: 0 running after the idle close", ag, agents(a))


def sc_sse(a):
    scope = a.scope("async task + SSE")
    s, b, _ = a.task("stream me", **{"async": True})
    eid = (b or {}).get("execution_id") if isinstance(b, dict) else None
    if not check(scope, "202 accepted with an execution_id", s == 202 and eid, f"HTTP {s} {b}"):
        return
    st = a.stream(eid)
    data, end = [], None
    for ev in st.events():
        if ev["event"] == "end":
            end = ev
            break
        data.append(ev)
    st.close()
    ids = [e["id"] for e in data]
    check(scope, "events carry id: 1, 2, 3, ... from the start",
          bool(ids) and ids == [str(i) for i in range(1, len(ids) + 1)], ids)
    text = "".join(e["data"] for e in data if e["event"] == "message")
    check(scope, "the agent's message chunks add up to its answer", "turns=1: stream me" in text, data[:5])
    try:
        end_body = json.loads(end["data"]) if end else {}
    except ValueError:
        end_body = {}
    check(scope, "event: end carries success", end_body.get("status") == "success", end)


def sc_terminate(a):
    scope = a.scope("terminate mid-turn")
    marker = f"hold-{uuid.uuid4().hex[:8]}"
    s0, b0, _ = a.task("warm up")
    check(scope, "warm-up answered", s0 == 200, f"HTTP {s0} {b0}")
    children = agent_children(a)
    s, b, _ = a.task(f"FAKE_SLOW {marker}", timeout_s=120, **{"async": True})
    eid = (b or {}).get("execution_id") if isinstance(b, dict) else None
    if not check(scope, "202 accepted", s == 202 and eid, f"HTTP {s} {b}"):
        return
    check(scope, "the agent reached the model (stalled there)",
          wait_until(lambda: a.model.seen(marker) > 0, 60, 0.2), marker)
    ts, tb, _ = a.request("POST", f"/api/executions/{eid}/terminate")
    check(scope, "terminate answered 200 cancelled",
          ts == 200 and isinstance(tb, dict) and tb.get("status") == "cancelled", f"HTTP {ts} {tb}")
    s2, b2, _ = a.task("after the cancel")
    check(scope, "the next turn succeeds", s2 == 200 and "after the cancel" in response(b2), f"HTTP {s2} {b2}")
    same = agent_children(a) == children
    ag = agents(a)
    check(scope, "the agent honoured session/cancel and stayed warm (same process, 0 restarts)",
          same and ag.get("restarts") == 0, f"{children} -> {agent_children(a)}; {ag}")


def sc_rate_limit(a):
    scope = a.scope("model 429")
    s, b, _ = a.task("FAKE_429 please")
    err = (b or {}).get("error") or {} if isinstance(b, dict) else {}
    check(scope, "429 rate_limited", s == 429 and err.get("code") == "rate_limited",
          f"HTTP {s} {json.dumps(b)[:400]}")


def sc_tasks(a):
    scope = a.scope("tasks")
    s1, b1, _ = a.task("task ping")
    check(scope, "task answered", s1 == 200 and "turns=1: task ping" in response(b1), f"HTTP {s1} {b1}")
    s2, b2, _ = a.task("task pong")
    check(scope, "a second task shares no context", s2 == 200 and "turns=1: task pong" in response(b2),
          f"HTTP {s2} {b2}")
    check(scope, "each task has its own ACP session",
          meta(b1).get("agent_session_id") and meta(b1).get("agent_session_id") != meta(b2).get("agent_session_id"),
          [meta(b1), meta(b2)])
    # /health's agents block is as of the last tick.
    ag = wait_agents(a, lambda r: r.get("started", 0) >= 1, 5) or agents(a)
    check(scope, "the tasks shared one warm process", ag.get("started") == 1, ag)


def permission_turn(a, scope, policy):
    """A chat turn whose model asks for a shell tool; returns (status, body, pidfile)."""
    pidfile = os.path.join(a.dir, f"sleeper-{policy}.pid")
    s, b, _ = a.task(f"FAKE_SETSID:{pidfile}")
    return s, b, pidfile


def sleeper(pidfile):
    try:
        return int(open(pidfile).read().strip())
    except (OSError, ValueError):
        return None


def kill_sleeper(pidfile):
    pid = sleeper(pidfile)
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def check_swept(a, scope, pidfile):
    """The tool's `setsid` sleeper left the agent's process group; agentd
    kills it when the turn ends, and the agent stays."""
    pid = sleeper(pidfile)
    children = agent_children(a)
    check(scope, "the setsid escapee the tool left is killed when the turn ends",
          pid and wait_until(lambda: not pid_running(pid), 5), f"sleeper {pid}")
    check(scope, "the agent itself was left running", children and agent_children(a) == children, children)
    check(scope, "the sweep is logged", "killed what the agent's tools left running" in a.log_text(),
          a.log_tail(500))


def sc_permission_deny(a):
    scope = a.scope("permission: deny")
    s, b, pidfile = permission_turn(a, scope, "deny")
    check(scope, "the turn ended", ended(s, b), f"HTTP {s} {json.dumps(b)[:300]}")
    check(scope, "the tool did not run (no pid file)", not os.path.exists(pidfile), pidfile)
    check(scope, "the decision is logged with the execution id",
          "ACP permission request answered" in a.log_text() and "policy deny" in a.log_text(), a.log_tail(500))
    kill_sleeper(pidfile)


def sc_permission_allow(a):
    scope = a.scope("permission: allow")
    s, b, pidfile = permission_turn(a, scope, "allow")
    check(scope, "the tool ran and the turn succeeded",
          s == 200 and response(b).startswith("tool done:"), f"HTTP {s} {json.dumps(b)[:300]}")
    check(scope, "the tool's process started (pid file)", wait_until(lambda: sleeper(pidfile), 5), pidfile)
    check_swept(a, scope, pidfile)
    kill_sleeper(pidfile)


def sc_permission_ask(a):
    scope = a.scope("permission: ask")
    pidfile = os.path.join(a.dir, "sleeper-ask.pid")
    s, b, _ = a.task(f"FAKE_SETSID:{pidfile}", **{"async": True})
    eid = (b or {}).get("execution_id") if isinstance(b, dict) else None
    if not check(scope, "202 accepted", s == 202 and eid, f"HTTP {s} {b}"):
        return
    st = a.stream(eid, timeout=90)
    asked = None
    for ev in st.events():
        if ev["event"] == "permission":
            asked = json.loads(ev["data"])
            break
        if ev["event"] == "end":
            break
    check(scope, "SSE carries event: permission with the offered options",
          asked and asked.get("options") and asked.get("request_id"), asked)
    if not asked:
        st.close()
        return
    s, b = a.get(f"/api/executions/{eid}")
    pending = (b or {}).get("pending_permissions") or [] if isinstance(b, dict) else []
    check(scope, "GET /api/executions/{id} shows it pending",
          [p.get("request_id") for p in pending] == [asked["request_id"]], b)
    bad_s, bad_b, _ = a.request("POST", f"/api/executions/{eid}/permissions/{asked['request_id']}",
                                {"option_id": "no-such-option"})
    check(scope, "an option it did not offer is refused with 400 naming the offered ones",
          bad_s == 400 and asked["options"][0]["option_id"] in json.dumps(bad_b), f"HTTP {bad_s} {bad_b}")
    allow = [o for o in asked["options"] if o.get("kind") == "allow_once"]
    opt = (allow or asked["options"])[0]["option_id"]
    ok_s, ok_b, _ = a.request("POST", f"/api/executions/{eid}/permissions/{asked['request_id']}",
                              {"option_id": opt})
    check(scope, "the answer is taken (200)", ok_s == 200, f"HTTP {ok_s} {ok_b}")
    end = None
    for ev in st.events():
        if ev["event"] == "end":
            end = json.loads(ev["data"])
            break
    st.close()
    check(scope, "the turn went on with the tool and succeeded",
          end and end.get("status") == "success" and str(end.get("response", "")).startswith("tool done:"), end)
    if not preset(a).sandboxed_tools:
        check_swept(a, scope, pidfile)
    kill_sleeper(pidfile)
    # Unanswered: refused after AGENTD_ACP_PERMISSION_TIMEOUT (2 s here).
    pidfile2 = os.path.join(a.dir, "sleeper-ask2.pid")
    s, b, _ = a.task(f"FAKE_SETSID:{pidfile2}")
    check(scope, "an unanswered request is refused after the timeout; the turn ends",
          ended(s, b) and not os.path.exists(pidfile2), f"HTTP {s} {json.dumps(b)[:300]}")
    check(scope, "the timeout decision is logged", "by=\"timeout\"" in a.log_text() or "by=timeout" in a.log_text(),
          a.log_tail(400))
    kill_sleeper(pidfile2)


NO_TOKEN_TOKEN = "e2e-" + uuid.uuid4().hex


def sc_agent_holds_no_token(a):
    """A real agent's tool looks for agentd's API token (its environment,
    agentd's /proc/<pid>/environ) and tries to answer another execution's
    pending permission request over the API. agentd runs with a token and
    `ask`; the test is the operator, holding the token."""
    scope = a.scope("agent holds no token")
    auth = {"authorization": f"Bearer {NO_TOKEN_TOKEN}"}

    def pending(eid):
        s, b, _ = a.request("GET", f"/api/executions/{eid}", headers=auth)
        return (b or {}).get("pending_permissions") or [] if s == 200 and isinstance(b, dict) else []

    def start(prompt):
        s, b, _ = a.request("POST", "/api/task", {"prompt": prompt, "async": True}, headers=auth)
        eid = (b or {}).get("execution_id") if isinstance(b, dict) else None
        check(scope, f"202 accepted for {prompt[:12]}", s == 202 and eid, f"HTTP {s} {b}")
        return eid

    # A: a task whose tool waits for the operator's answer.
    pid_a = os.path.join(a.dir, "sleeper-victim.pid")
    eid_a = start(f"FAKE_SETSID:{pid_a}")
    asked_a = eid_a and wait_until(lambda: pending(eid_a), 90, 0.2)
    if not check(scope, "the victim's permission request is pending", asked_a, eid_a):
        return
    victim = asked_a[0]
    allow = [o for o in victim["options"] if o.get("kind") == "allow_once"] or victim["options"]
    # B: the attacker, told everything but the token: the probe knows A's ids.
    out = os.path.join(a.dir, "probe")
    probe = os.path.join(a.dir, "probe.sh")
    with open(probe, "w") as f:
        f.write(f"""env > {out}.env
if cat /proc/{a.proc.pid}/environ > {out}.proc 2>/dev/null; then echo read; else echo refused; fi > {out}.proc.rc
curl -s -o {out}.post.body -w '%{{http_code}}' -X POST -H 'content-type: application/json' \\
  -H "authorization: Bearer ${{AGENTD_API_TOKEN:-none}}" \\
  --data '{{"option_id": "{allow[0]["option_id"]}"}}' \\
  http://127.0.0.1:{a.port}/api/executions/{eid_a}/permissions/{victim["request_id"]} > {out}.post.code
echo probe finished
""")
    eid_b = start(f"FAKE_RUN:{probe}")
    asked_b = eid_b and wait_until(lambda: pending(eid_b), 90, 0.2)
    if not check(scope, "the probe's own permission request is pending", asked_b, eid_b):
        return
    ok = [o for o in asked_b[0]["options"] if o.get("kind") == "allow_once"] or asked_b[0]["options"]
    s, b, _ = a.request("POST", f"/api/executions/{eid_b}/permissions/{asked_b[0]['request_id']}",
                        {"option_id": ok[0]["option_id"]}, headers=auth)
    check(scope, "the operator allows the probe (200 with the token)", s == 200, f"HTTP {s} {b}")

    def finished(eid):
        s, b, _ = a.request("GET", f"/api/executions/{eid}", headers=auth)
        return b if s == 200 and isinstance(b, dict) and b.get("status") not in ("queued", "running") else None

    end_b = wait_until(lambda: finished(eid_b), 90, 0.2)
    check(scope, "the probe ran (its tool wrote the environment it got)",
          end_b and os.path.exists(f"{out}.env"), end_b)

    def read(path):
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    env = read(f"{out}.env")
    own = [line for line in env.splitlines() if line.startswith(("AGENTD_", "CREDENTIALS_DIRECTORY="))]
    check(scope, "the tool's environment holds no token and no AGENTD_ variable but its execution id",
          env and NO_TOKEN_TOKEN not in env and [v.split("=")[0] for v in own] == ["AGENTD_EXECUTION_ID"], own)
    # agentd runs as root in this suite, and so do its agents: root's
    # CAP_SYS_PTRACE reads a non-dumpable process's environ, so the read may
    # succeed here. That it fails for an agent of the same unprivileged user
    # is tests/secrets.rs; here it is asserted only when not root.
    proc_rc = read(f"{out}.proc.rc").strip()
    if os.geteuid() != 0:
        check(scope, "agentd's /proc/<pid>/environ is refused to the agent",
              proc_rc == "refused" and NO_TOKEN_TOKEN not in read(f"{out}.proc"), proc_rc)
    code = read(f"{out}.post.code").strip()
    check(scope, "the agent's own answer to the pending request is refused 401", code == "401",
          f"{code} {read(f'{out}.post.body')[:200]}")
    check(scope, "the victim's request is still pending, its tool not run",
          [p.get("request_id") for p in pending(eid_a)] == [victim["request_id"]]
          and not os.path.exists(pid_a), pending(eid_a))
    # The operator's answer is the one that counts.
    deny = [o for o in victim["options"] if o.get("kind") == "reject_once"] or victim["options"]
    s, b, _ = a.request("POST", f"/api/executions/{eid_a}/permissions/{victim['request_id']}",
                        {"option_id": deny[0]["option_id"]}, headers=auth)
    check(scope, "the operator answers the victim's request (200)", s == 200, f"HTTP {s} {b}")
    end_a = wait_until(lambda: finished(eid_a), 90, 0.2)
    check(scope, "the victim's turn ends without running its tool", end_a and not os.path.exists(pid_a), end_a)
    kill_sleeper(pid_a)


def sc_delete_history(a):
    scope = a.scope("DELETE history")
    sid = "acp-delete"
    a.chat("secret words", session_id=sid)
    children = agent_children(a)
    s, _, _ = a.request("DELETE", f"/api/chat/history?session_id={sid}")
    check(scope, "DELETE answered 200", s == 200, s)
    check(scope, "the agent process holding the context was closed",
          wait_until(lambda: not any(pid_running(p) for p in children), 15), children)
    s2, b2 = a.chat("what did I say?", session_id=sid)
    check(scope, "the next turn starts a new ACP session without the deleted context",
          s2 == 200 and "turns=1: what did I say?" in response(b2), f"HTTP {s2} {b2}")


SCENARIOS = [
    ("multi_turn", sc_multi_turn, {}),
    ("restart_load", sc_restart_load, {}),
    ("agent_killed", sc_agent_killed, {}),
    ("killed_after_answer", sc_killed_after_answer, {}),
    ("pool", sc_pool, {"AGENTD_ACP_MAX_AGENTS": "1", "AGENTD_ACP_IDLE": "3s"}),
    ("sse", sc_sse, {}),
    ("terminate", sc_terminate, {}),
    ("rate_limit", sc_rate_limit, {}),
    ("tasks", sc_tasks, {}),
    ("permission_deny", sc_permission_deny, {}),
    ("permission_allow", sc_permission_allow, {"AGENTD_ACP_PERMISSIONS": "allow"}),
    ("permission_ask", sc_permission_ask, {"AGENTD_ACP_PERMISSIONS": "ask",
                                           "AGENTD_ACP_PERMISSION_TIMEOUT": "2s"}),
    ("delete_history", sc_delete_history, {}),
    ("agent_holds_no_token", sc_agent_holds_no_token, {"AGENTD_ACP_PERMISSIONS": "ask",
                                                       "AGENTD_API_TOKEN": NO_TOKEN_TOKEN}),
]


def run(agent, name, fn, env, model):
    a = Agentd(f"acp-{agent}", name, model, extra_env=env)
    try:
        a.start()
        fn(a)
    except Exception as e:
        check(a.scope(name), "ran to the end", False, f"{e!r}\n{traceback.format_exc()[-600:]}")
    finally:
        a.stop()


def main():
    t0 = time.monotonic()
    only = driver.ONLY
    unknown = [n for n in AGENTS if n not in PRESETS]
    if unknown:
        emit(f"unknown E2E_ACP_AGENTS entries {unknown}; known: {sorted(PRESETS)}")
        return 2
    model = FakeModel("acp")
    try:
        with ThreadPoolExecutor(max_workers=driver.JOBS) as pool:
            jobs = [pool.submit(run, agent, n, fn, env, model)
                    for agent in AGENTS for n, fn, env in SCENARIOS
                    if (not only or n in only)
                    and (PRESETS[agent].scenarios is None or n in PRESETS[agent].scenarios)]
            for j in jobs:
                j.result()
    finally:
        model.stop()
    failed = driver._failed
    if failed:
        emit("#  failed: " + "; ".join(failed))
        emit("#  agentd and fake-model logs are in the work directory")
    emit(f"suite time: {time.monotonic() - t0:.0f} s; checks: {driver._checks}, failed: {len(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
