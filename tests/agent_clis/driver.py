#!/usr/bin/env python3
"""Scenarios for agentd with the real agent CLIs (Claude Code, Gemini CLI,
Codex CLI).

Run by run.sh inside a network namespace that has only loopback. For each
CLI it starts a fake model API (fake_model.py) and several agentd instances
(each with its own state directory, HOME and TMPDIR), then drives agentd's
HTTP API as a user would and checks what comes back. Scenarios run
concurrently; every wait has a deadline. Prints one line per check, then a
conformance matrix (scenario x CLI: ok, FAIL or n/a) and ends with
"checks: N, failed: M"; exits 1 when a check failed.

Two tables hold what differs between the CLIs: CLIS_SPEC (how each CLI is
set up and what its own output looks like) and SCENARIOS (which scenario
runs on which instance, and for which CLIs). CONFORMANCE.md explains both.

Environment: AGENTD_BIN (the agentd binary), AGENTD_CLIS_DIR (the npm prefix
holding the CLIs), E2E_WORK (a scratch directory), E2E_CLIS ("claude gemini
codex", or some of them), E2E_ONLY (comma-separated scenario names),
E2E_JOBS (scenarios at once, default 6), E2E_DEADLINE (seconds for the whole
run, default 600).
"""

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from urllib.parse import urlencode

HERE = os.path.dirname(os.path.abspath(__file__))
AGENTD_BIN = os.environ["AGENTD_BIN"]
CLIS_DIR = os.environ["AGENTD_CLIS_DIR"]
WORK = os.environ["E2E_WORK"]
CLIS = os.environ.get("E2E_CLIS", "claude gemini codex").split()
ONLY = [s for s in os.environ.get("E2E_ONLY", "").split(",") if s]
JOBS = int(os.environ.get("E2E_JOBS", "6"))

CLAUDE_VERSION = "2.1.330"
GEMINI_VERSION = "0.61.0"
CODEX_VERSION = "0.169.0"
FAKE_500_MESSAGE = "fake model internal failure 7731"
# An answer from a real CLI takes about 1 s (Claude, Codex) or 4-10 s
# (Gemini, on two busy cores); a request that takes this long is stuck.
REQUEST_TIMEOUT = 180
START_TIMEOUT = 30
# The whole suite's bound (E2E_DEADLINE, seconds): past it every request
# fails at once, so a wedged agentd costs minutes, not hours. A passing run
# takes about 2 minutes on two idle cores.
SUITE_DEADLINE = time.monotonic() + float(os.environ.get("E2E_DEADLINE", "600"))


def bounded(timeout):
    """timeout, shortened to what is left of the suite's deadline."""
    return max(1.0, min(timeout, SUITE_DEADLINE - time.monotonic()))

# ---------------------------------------------------------------- reporting

_lock = threading.Lock()
_checks = 0
_failed = []
# Outcomes per (scenario name, cli), for the conformance matrix; a scenario's
# thread says which cell its checks belong to.
_cells = {}
_current = threading.local()


def emit(line):
    with _lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def check(scope, what, ok, detail=""):
    global _checks
    ok = bool(ok)
    cell = getattr(_current, "cell", None)
    with _lock:
        _checks += 1
        if not ok:
            _failed.append(f"{scope}: {what}")
        if cell is not None:
            _cells.setdefault(cell, []).append(ok)
    tail = "" if ok else f"  -- {str(detail)[:600]}"
    emit(f"{'ok  ' if ok else 'FAIL'} {scope}: {what}{tail}")
    return ok


def is_uuid(s):
    return isinstance(s, str) and re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", s) is not None


def json_type(line):
    """The "type" of a stream-json line, or None."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj.get("type") if isinstance(obj, dict) else None


def wait_until(cond, timeout, step=0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(step)


def pid_running(pid):
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


# ---------------------------------------------------------------- processes


class FakeModel:
    def __init__(self, name):
        self.log_path = os.path.join(WORK, f"fake-model-{name}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "fake_model.py"), "0"],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        m = re.match(r"port (\d+)", line)
        if not m:
            raise RuntimeError(f"fake model did not print its port: {line!r}")
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def _seen(self, word):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/_fake/seen?" + urlencode({"q": word}))
            return json.loads(conn.getresponse().read())
        except (OSError, ValueError, http.client.HTTPException):
            return {}
        finally:
            conn.close()

    def seen(self, word):
        """How many model requests carried word in their newest user turn."""
        return self._seen(word).get("count", 0)

    def contexts(self, word):
        """What those requests said about where the CLI ran (Codex only:
        sandbox_mode, cwd)."""
        return self._seen(word).get("contexts", [])

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


class Agentd:
    """One agentd with its own state directory, HOME and TMPDIR."""

    def __init__(self, cli, name, model, extra_env=None, with_key=True):
        self.cli = cli
        self.name = name
        self.dir = os.path.join(WORK, f"{cli}-{name}")
        self.state = os.path.join(self.dir, "state")
        self.home = os.path.join(self.dir, "home")
        tmp = os.path.join(self.dir, "tmp")
        for d in (self.state, self.home, tmp):
            os.makedirs(d, exist_ok=True)
        env = {
            "PATH": os.environ["PATH"],
            "LANG": "C.UTF-8",
            "HOME": self.home,
            "TMPDIR": tmp,
            "AGENTD_LISTEN": "127.0.0.1:0",
            "AGENTD_STATE_DIR": self.state,
            "AGENTD_LOG": "info",
            "AGENTD_HEALTH_INTERVAL": "1s",
            "AGENTD_KILL_GRACE": "2s",
        }
        env.update(CLIS_SPEC[cli].env(self, model, with_key))
        env.update(extra_env or {})
        self.env = env
        self.model = model
        self.proc = None
        self.port = None
        self.log_path = os.path.join(self.dir, "agentd.log")
        self.starts = 0

    def scope(self, scenario):
        return f"{self.cli} {scenario}"

    def start(self):
        self.starts += 1
        log = open(self.log_path, "a")
        log.write(f"---- start {self.starts}\n")
        log.flush()
        self.proc = subprocess.Popen([AGENTD_BIN, "serve"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.dir)
        log.close()

        def listening():
            with open(self.log_path, errors="replace") as f:
                text = f.read()
            text = text[text.rfind(f"---- start {self.starts}"):]
            m = re.search(r"listening on \S*?127\.0\.0\.1:(\d+)", text)
            return int(m.group(1)) if m else None

        wait_until(lambda: listening() is not None or self.proc.poll() is not None, START_TIMEOUT)
        port = listening()
        if port is None:
            raise RuntimeError(f"agentd ({self.name}) did not start: {self.log_tail()}")
        self.port = port
        ok = wait_until(lambda: self.get("/health")[0] == 200, START_TIMEOUT, 0.2)
        if not ok:
            raise RuntimeError(f"agentd ({self.name}) never became healthy: {self.log_tail()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode if self.proc else None

    def log_text(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, n=1500):
        return self.log_text()[-n:]

    # ------------------------------------------------------------ HTTP

    def request(self, method, path, body=None, headers=None, timeout=REQUEST_TIMEOUT):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=bounded(timeout))
        try:
            data = None
            h = dict(headers or {})
            if body is not None:
                data = json.dumps(body).encode()
                h["content-type"] = "application/json"
            conn.request(method, path, body=data, headers=h)
            resp = conn.getresponse()
            raw = resp.read()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw.decode(errors="replace")
            return resp.status, parsed, dict(resp.getheaders())
        except (OSError, http.client.HTTPException) as e:
            return 0, {"transport_error": repr(e)}, {}
        finally:
            conn.close()

    def get(self, path):
        s, b, _ = self.request("GET", path, timeout=10)
        return s, b

    def chat(self, message, session_id=None, timeout_s=None):
        body = {"message": message}
        if session_id is not None:
            body["session_id"] = session_id
        if timeout_s is not None:
            body["timeout_s"] = timeout_s
        s, b, _ = self.request("POST", "/api/chat", body)
        return s, b

    def task(self, prompt, **extra):
        s, b, h = self.request("POST", "/api/task", dict(prompt=prompt, **extra))
        return s, b, h

    def stream(self, execution_id, last_event_id=None, timeout=REQUEST_TIMEOUT):
        return SseStream(self.port, execution_id, last_event_id, timeout)


class SseStream:
    """A client of GET /api/executions/{id}/stream that parses events."""

    def __init__(self, port, execution_id, last_event_id, timeout):
        timeout = bounded(timeout)
        self.deadline = time.monotonic() + timeout
        # One socket timeout for the whole stream: agentd sends a keepalive
        # comment every 15 s, so a silent socket for this long is a failure.
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        headers = {"accept": "text/event-stream"}
        if last_event_id is not None:
            headers["last-event-id"] = str(last_event_id)
        self.conn.request("GET", f"/api/executions/{execution_id}/stream", headers=headers)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status

    def events(self):
        """Yields {"event", "id", "data"} until the stream ends or the deadline."""
        ev = {"event": "message", "id": None, "data": []}
        while time.monotonic() < self.deadline:
            try:
                line = self.resp.fp.readline()
            except OSError:
                return
            if not line:
                return
            line = line.decode(errors="replace").rstrip("\r\n")
            if line == "":
                if ev["data"] or ev["event"] != "message":
                    yield {"event": ev["event"], "id": ev["id"], "data": "\n".join(ev["data"])}
                ev = {"event": "message", "id": None, "data": []}
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                ev["data"].append(value)
            elif field == "event":
                ev["event"] = value
            elif field == "id":
                ev["id"] = value

    def close(self):
        self.conn.close()


# ---------------------------------------------------------------- the CLIs
#
# How each CLI is pointed at the fake model, and what of its own output the
# scenarios may expect. Everything a scenario needs to know about a CLI is
# here, so the scenarios themselves read the same for every CLI.


def bin_path(name):
    return os.path.join(CLIS_DIR, "node_modules", ".bin", name)


def claude_env(inst, model, with_key):
    env = {
        "AGENTD_RUNTIME": "claude-code",
        "AGENTD_CLAUDE_BIN": bin_path("claude"),
        "ANTHROPIC_BASE_URL": model.url,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
    }
    if with_key:
        env["ANTHROPIC_API_KEY"] = "sk-ant-fake-e2e"
    return env


def gemini_env(inst, model, with_key):
    env = {
        "AGENTD_RUNTIME": "gemini",
        "AGENTD_GEMINI_BIN": bin_path("gemini"),
        "GOOGLE_GEMINI_BASE_URL": model.url,
    }
    if with_key:
        env["GEMINI_API_KEY"] = "fake-gemini-key-e2e"
    os.makedirs(os.path.join(inst.home, ".gemini"), exist_ok=True)
    with open(os.path.join(inst.home, ".gemini", "settings.json"), "w") as f:
        # Only what points Gemini at the fake model and keeps it quiet and
        # quick to fail. Session retention stays at Gemini's default: what
        # sessions need to survive is agentd's to write, in the workspace's
        # own .gemini/settings.json.
        json.dump({
            "security": {"auth": {"selectedType": "gemini-api-key"}},
            "general": {"maxAttempts": 1},
            "telemetry": {"enabled": False},
            "privacy": {"usageStatisticsEnabled": False},
        }, f)
    return env


CODEX_KEY_VAR = "FAKE_CODEX_KEY"


def write_codex_config(home, model, slug="gpt-5", extra=""):
    """CODEX_HOME/config.toml pointing Codex (or codex-acp) at the fake model."""
    os.makedirs(home, mode=0o700, exist_ok=True)
    with open(os.path.join(home, "config.toml"), "w") as f:
        f.write(f"""\
# Codex talks to the fake model only.
model = "{slug}"
model_provider = "fake"
{extra}
[model_providers.fake]
name = "fake"
base_url = "{model.url}/v1"
wire_api = "responses"
env_key = "{CODEX_KEY_VAR}"
# A 429 or 500 fails the turn at once instead of after Codex's retries.
request_max_retries = 0
stream_max_retries = 0

# With no DNS, the metrics export holds every exit for about 5 s.
[analytics]
enabled = false

# No curated-plugin sync (git and HTTPS to GitHub) at every start.
[features]
plugins = false
""")


def codex_env(inst, model, with_key):
    env = {
        "AGENTD_RUNTIME": "codex",
        "AGENTD_CODEX_BIN": bin_path("codex"),
    }
    if with_key:
        env[CODEX_KEY_VAR] = "fake-codex-key-e2e"
    # CODEX_HOME is left unset: agentd's default, <state>/codex, is where
    # this configuration must be found.
    write_codex_config(os.path.join(inst.state, "codex"), model)
    return env


def claude_session_dirs(inst):
    return [os.path.join(inst.home, ".claude", "projects")]


def gemini_session_dirs(inst):
    # One directory per project under ~/.gemini/tmp: its chats and
    # whatever else Gemini keeps there for the project.
    root = os.path.join(inst.home, ".gemini", "tmp")
    try:
        return [os.path.join(root, d) for d in sorted(os.listdir(root))]
    except FileNotFoundError:
        return []


def codex_session_dirs(inst):
    return [os.path.join(inst.state, "codex", "sessions")]


CLIS_SPEC = {
    "claude": SimpleNamespace(
        runtime="claude-code", binary="claude", version=CLAUDE_VERSION, env=claude_env,
        args_var="AGENTD_CLAUDE_ARGS",
        # The "tools" instance: the shell tool is allowed.
        tools_env={"AGENTD_CLAUDE_ARGS": "--allowedTools Bash"},
        # The "type" of the first stdout line, and of the line that ends a turn.
        first_line="system", result_line="result",
        # The first line names the CLI's working directory.
        first_line_cwd=True,
        # agentd chooses the CLI's session UUID (the session's own, if it is one).
        agentd_names_session=True,
        # What the CLI's error says for a model 429, a model 500, no API key.
        rate_limit_text="rate limit", error_500_text=FAKE_500_MESSAGE,
        missing_key_texts=("Not logged in", "ANTHROPIC_API_KEY"),
        # The timeout scenario's timeout_s: long enough for the CLI to
        # reach the (stalling) model first, even on a busy machine.
        timeout_s=4,
        # Where the CLI keeps its sessions (deleted by the lost-session scenario).
        session_dirs=claude_session_dirs,
        # What the answer to a refused tool call says, when it says anything
        # the suite can check (None: the CLI refuses before running anything).
        refused_tool_output=None,
        # Whether metadata.usage is checked (agentd's contract names it for
        # Codex, from its turn.completed line).
        reports_usage=False,
        # The sandbox each instance must run the CLI in, for a CLI whose
        # model requests say so (None: not visible to the suite).
        sandbox_by_instance=None,
    ),
    "gemini": SimpleNamespace(
        runtime="gemini", binary="gemini", version=GEMINI_VERSION, env=gemini_env,
        args_var="AGENTD_GEMINI_ARGS",
        tools_env={"AGENTD_GEMINI_ARGS": "--yolo"},
        first_line="init", result_line="result", first_line_cwd=False,
        agentd_names_session=True,
        rate_limit_text="Resource has been exhausted", error_500_text=FAKE_500_MESSAGE,
        missing_key_texts=("GEMINI_API_KEY",),
        timeout_s=15,
        session_dirs=gemini_session_dirs,
        refused_tool_output=None,
        reports_usage=False,
        sandbox_by_instance=None,
    ),
    "codex": SimpleNamespace(
        runtime="codex", binary="codex", version=CODEX_VERSION, env=codex_env,
        args_var="AGENTD_CODEX_ARGS",
        # Codex runs every command in its sandbox; without one, the setsid
        # sleeper can write its pid file and outlive the command.
        tools_env={"AGENTD_CODEX_SANDBOX": "danger-full-access"},
        first_line="thread.started", result_line="turn.completed", first_line_cwd=False,
        # Codex chooses its thread id (a UUID v7) itself.
        agentd_names_session=False,
        # Codex words model errors itself: a 429 as "exceeded retry limit,
        # last status: 429 Too Many Requests", any 5xx as "We're currently
        # experiencing high demand, ..." (the model's message is not shown).
        rate_limit_text="429 Too Many Requests", error_500_text="currently experiencing high demand",
        missing_key_texts=(CODEX_KEY_VAR,),
        timeout_s=4,
        session_dirs=codex_session_dirs,
        # The read-only sandbox runs the command and refuses its write.
        refused_tool_output="no pid file",
        reports_usage=True,
        # Codex's own sandbox kills a setsid child when the command returns,
        # so the setsid scenario proves agentd's sweep only when Codex ran
        # with danger-full-access, as that instance asks.
        sandbox_by_instance={"main": "workspace-write", "tools": "danger-full-access",
                             "readonly": "read-only"},
    ),
}


# ---------------------------------------------------------------- scenarios
#
# Each scenario takes (cli, a): the CLI's name and the agentd instance the
# SCENARIOS table gives it; it returns nothing and reports through check().


def expect_answer(scope, what, status, body, expected):
    resp = (body or {}).get("response") if isinstance(body, dict) else None
    got = resp.strip() if isinstance(resp, str) else resp
    return check(scope, what, status == 200 and got == expected,
                 f"HTTP {status}, expected {expected!r}, got {json.dumps(body)[:400]}")


def metadata(body):
    return ((body or {}).get("metadata") or {}) if isinstance(body, dict) else {}


def agent_session(body):
    return metadata(body).get("agent_session_id")


def check_sandbox(scope, cli, a, marker):
    """For a CLI whose model requests name their sandbox (Codex): the
    requests whose newest turn holds marker ran in the sandbox this instance
    asks for. Nothing to check for the other CLIs."""
    want = (CLIS_SPEC[cli].sandbox_by_instance or {}).get(a.name)
    if want is None:
        return
    modes = [c.get("sandbox_mode") for c in a.model.contexts(marker)]
    check(scope, f"the CLI ran in the {want} sandbox", bool(modes) and set(modes) == {want},
          f"sandbox modes seen: {modes}")


def check_not_restarted(scope, what, bodies):
    """metadata.session_restarted is present and false on every answer."""
    flags = [metadata(b).get("session_restarted", "absent") for b in bodies]
    return check(scope, what, flags == [False] * len(bodies), f"session_restarted: {flags}")


def sc_default_session(cli, a):
    scope = a.scope("default session")
    s1, b1 = a.chat("hello from the default session")
    expect_answer(scope, "turn 1 answered", s1, b1, "turns=1: hello from the default session")
    s2, b2 = a.chat("what did I say?")
    expect_answer(scope, "turn 2 carried turn 1", s2, b2,
                  "turns=2: hello from the default session | what did I say?")
    spec = CLIS_SPEC[cli]
    # Gemini in particular must work as documented: no --skip-trust, no
    # trust variable.
    check(scope, "the CLI ran with no extra arguments (and no Gemini trust variable)",
          s1 == 200 and spec.args_var not in a.env and "GEMINI_CLI_TRUST_WORKSPACE" not in a.env,
          f"HTTP {s1}")
    check(scope, "session_id is 'default'", isinstance(b2, dict) and b2.get("session_id") == "default", b2)
    sid1, sid2 = agent_session(b1), agent_session(b2)
    check(scope, "metadata.agent_session_id is a UUID, the same on both turns",
          is_uuid(sid1) and sid1 == sid2, f"{sid1!r} / {sid2!r}")
    check_not_restarted(scope, "metadata.session_restarted is false on both turns", [b1, b2])
    if spec.reports_usage:
        # One model request answered turn 1, and the fake counts 10 in, 5 out.
        usage = metadata(b1).get("usage")
        check(scope, "metadata.usage carries the turn's tokens (10 in, 5 out)",
              isinstance(usage, dict) and usage.get("input_tokens") == 10 and usage.get("output_tokens") == 5,
              f"usage: {usage!r}")


def sc_named_session(cli, a):
    scope = a.scope("named session")
    name = "demo"
    s1, b1 = a.chat("my name is Ada", session_id=name)
    expect_answer(scope, "turn 1 in session 'demo'", s1, b1, "turns=1: my name is Ada")
    s2, b2 = a.chat("what is my name?", session_id=name)
    expect_answer(scope, "turn 2 carried turn 1", s2, b2, "turns=2: my name is Ada | what is my name?")
    s3, b3 = a.chat("and again?", session_id=name)
    expect_answer(scope, "turn 3 carried turns 1 and 2", s3, b3,
                  "turns=3: my name is Ada | what is my name? | and again?")
    sid = agent_session(b1)
    check(scope, "agent_session_id is a stable UUID for the name",
          is_uuid(sid) and agent_session(b2) == sid == agent_session(b3), f"{sid} {agent_session(b3)}")


def sc_uuid_spellings(cli, a):
    scope = a.scope("uuid session")
    u = uuid.uuid4()
    spellings = [u.hex, f"urn:uuid:{u}", str(u).upper()]
    s1, b1 = a.chat("first via 32 hex digits", session_id=spellings[0])
    expect_answer(scope, "turn 1 with 32 hex digits", s1, b1, "turns=1: first via 32 hex digits")
    s2, b2 = a.chat("second via urn", session_id=spellings[1])
    expect_answer(scope, "turn 2 with urn:uuid: carried turn 1", s2, b2,
                  "turns=2: first via 32 hex digits | second via urn")
    s3, b3 = a.chat("third via upper case", session_id=spellings[2])
    expect_answer(scope, "turn 3 with upper-case hyphenated carried turns 1-2", s3, b3,
                  "turns=3: first via 32 hex digits | second via urn | third via upper case")
    ids = [agent_session(b) for b in (b1, b2, b3)]
    if CLIS_SPEC[cli].agentd_names_session:
        check(scope, "agent_session_id is the normalised UUID on every spelling",
              ids == [str(u)] * 3, f"expected {u}, got {ids}")
    else:
        # The CLI chose its own id (Codex: its thread id, a UUID v7): one
        # conversation, so one id on all three turns, and not the session's.
        version = uuid.UUID(ids[0]).version if is_uuid(ids[0]) else None
        check(scope, "agent_session_id is the CLI's own UUID v7, the same on every spelling",
              is_uuid(ids[0]) and ids == [ids[0]] * 3 and version == 7 and ids[0] != str(u),
              f"session {u}, got {ids}")


def sc_failed_first_turn(cli, a):
    scope = a.scope("failed first turn")
    name = "fails-first"
    s1, b1 = a.chat(f"FAKE_500 secret-{cli}-pw", session_id=name)
    err = (b1 or {}).get("error") or {} if isinstance(b1, dict) else {}
    want = CLIS_SPEC[cli].error_500_text
    check(scope, f"model 500 -> 502 with the agent's message ({want!r})",
          s1 == 502 and want in str(err.get("message", "")),
          f"HTTP {s1} {json.dumps(b1)[:400]}")
    log = a.log_text()
    warn = [line for line in log.splitlines() if "WARN" in line.upper()]
    exec_id = (b1 or {}).get("execution_id") if isinstance(b1, dict) else None
    check(scope, "the failed execution is logged at warn (with its id when answered)",
          bool(warn) and (exec_id is None or any(exec_id in line for line in warn)),
          f"execution_id={exec_id}; warn lines: {warn[-3:]}")
    check(scope, "the log never holds the prompt", f"secret-{cli}-pw" not in log,
          [line for line in log.splitlines() if f"secret-{cli}-pw" in line][:2])
    s2, b2 = a.chat("second try", session_id=name)
    resp2 = (b2 or {}).get("response", "") if isinstance(b2, dict) else ""
    check(scope, "turn 2 after the failure succeeds",
          s2 == 200 and isinstance(resp2, str) and resp2.strip().endswith("second try"),
          f"HTTP {s2} {json.dumps(b2)[:400]}")
    s3, b3 = a.chat("third try", session_id=name)
    resp3 = (b3 or {}).get("response", "") if isinstance(b3, dict) else ""
    check(scope, "turn 3 carried turn 2",
          s3 == 200 and isinstance(resp3, str) and resp3.strip().endswith("second try | third try"),
          f"HTTP {s3} {json.dumps(b3)[:400]}")


def sc_delete_history(cli, a):
    scope = a.scope("delete history")
    name = "forget-me"
    s1, b1 = a.chat("remember apples", session_id=name)
    expect_answer(scope, "turn 1", s1, b1, "turns=1: remember apples")
    s, b, _ = a.request("DELETE", f"/api/chat/history?session_id={name}")
    check(scope, "DELETE /api/chat/history answered 200", s == 200, f"HTTP {s} {b}")
    s, b = a.get(f"/api/chat/history?session_id={name}")
    check(scope, "history is empty after DELETE",
          s == 200 and isinstance(b, dict) and not b.get("messages"), f"HTTP {s} {b}")
    s2, b2 = a.chat("what do you remember?", session_id=name)
    expect_answer(scope, "the next turn starts a fresh conversation (context gone)", s2, b2,
                  "turns=1: what do you remember?")
    check(scope, "a new agent session after DELETE",
          is_uuid(agent_session(b2)) and agent_session(b2) != agent_session(b1),
          f"{agent_session(b1)} -> {agent_session(b2)}")
    s3, b3 = a.chat("and now?", session_id=name)
    expect_answer(scope, "the fresh conversation continues", s3, b3,
                  "turns=2: what do you remember? | and now?")


def sc_rate_limit(cli, a):
    scope = a.scope("model 429")
    s, b, h = a.task("FAKE_429 please")
    err = (b or {}).get("error") or {} if isinstance(b, dict) else {}
    check(scope, "429 rate_limited", s == 429 and err.get("code") == "rate_limited",
          f"HTTP {s} {json.dumps(b)[:400]}")
    want = CLIS_SPEC[cli].rate_limit_text
    check(scope, f"error.message carries the agent's text ({want!r})",
          want.lower() in str(err.get("message", "")).lower(), err)


def sc_tasks(cli, a):
    scope = a.scope("sync task")
    s, b, _ = a.task("task ping")
    expect_answer(scope, "task answered", s, b, "turns=1: task ping")
    check(scope, "status success", isinstance(b, dict) and b.get("status") == "success", b)
    s2, b2, _ = a.task("task pong")
    expect_answer(scope, "a second task shares no context", s2, b2, "turns=1: task pong")
    check(scope, "each task has its own agent session",
          is_uuid(agent_session(b)) and agent_session(b) != agent_session(b2),
          f"{agent_session(b)} {agent_session(b2)}")


def sc_async_sse(cli, a):
    scope = a.scope("async task + SSE")
    s, b, _ = a.task("async ping", **{"async": True})
    eid = (b or {}).get("execution_id") if isinstance(b, dict) else None
    if not check(scope, "202 accepted with an execution_id", s == 202 and eid, f"HTTP {s} {b}"):
        return
    st = a.stream(eid)
    check(scope, "stream answered 200", st.status == 200, st.status)
    data_events, end = [], None
    for ev in st.events():
        if ev["event"] == "end":
            end = ev
            break
        if ev["event"] in ("message", "output"):
            data_events.append(ev)
    st.close()
    ids = [e["id"] for e in data_events]
    check(scope, "output events carry id: 1, 2, 3, ... from the start",
          bool(ids) and ids == [str(i) for i in range(1, len(ids) + 1)], ids)
    # Events carry stdout as read (a chunk may hold part of a line or
    # several); in order they add up to the CLI's output.
    stdout = "".join(e["data"] for e in data_events)
    lines = [line for line in stdout.split("\n") if line.strip()]
    spec = CLIS_SPEC[cli]
    first_type = json_type(lines[0]) if lines else None
    check(scope, f"the stream starts with the CLI's first line ({spec.first_line})",
          first_type == spec.first_line, stdout[:200])
    if spec.first_line_cwd and lines:
        try:
            cwd = json.loads(lines[0]).get("cwd")
        except (ValueError, AttributeError):
            cwd = None
        want = os.path.realpath(os.path.join(a.state, "workspace"))
        check(scope, "the CLI ran in <state-dir>/workspace (cwd of its init line)", cwd == want,
              f"cwd {cwd!r}, expected {want!r}")
    check(scope, f"the stream ends with the CLI's result line ({spec.result_line})",
          bool(lines) and json_type(lines[-1]) == spec.result_line, lines[-2:])
    try:
        end_body = json.loads(end["data"]) if end else {}
    except ValueError:
        end_body = {}
    check(scope, "event: end carries the result",
          end_body.get("status") == "success" and str(end_body.get("response", "")).strip() == "turns=1: async ping",
          end)
    s, b = a.get(f"/api/executions/{eid}")
    check(scope, "GET /api/executions/{id} says success",
          s == 200 and isinstance(b, dict) and b.get("status") == "success", f"HTTP {s} {b}")


def sc_reconnect_terminate(cli, a):
    scope = a.scope("SSE reconnect + terminate")
    marker = f"hold-{uuid.uuid4().hex[:8]}"
    s, b, _ = a.task(f"FAKE_SLOW {marker}", timeout_s=120, **{"async": True})
    eid = (b or {}).get("execution_id") if isinstance(b, dict) else None
    if not check(scope, "202 accepted", s == 202 and eid, f"HTTP {s} {b}"):
        return
    # Subscribe late: only once the CLI has reached the model, long after it
    # printed its first line. The stream must still start at event 1.
    reached = wait_until(lambda: a.model.seen(marker) > 0, 120, 0.2)
    check(scope, "the CLI reached the model (stalled there)", reached, marker)
    st = a.stream(eid, timeout=90)
    first = None
    for ev in st.events():
        if ev["event"] == "end":
            break
        if ev["event"] in ("message", "output"):
            first = ev
            break
    st.close()
    check(scope, "a late subscriber still gets the CLI's first line as event id 1",
          first is not None and first["id"] == "1"
          and first["data"].startswith('{"type":"%s"' % CLIS_SPEC[cli].first_line),
          first)
    if first is None or not (first["id"] or "").isdigit():
        a.request("POST", f"/api/executions/{eid}/terminate")
        return
    s, b = a.get("/api/executions/running")
    running = [e for e in (b or {}).get("executions", [])] if isinstance(b, dict) else []
    mine = [e for e in running if e.get("execution_id") == eid]
    check(scope, "listed as running while the model stalls", len(mine) == 1, b)
    pid = mine[0].get("pid") if mine else None
    st2 = a.stream(eid, last_event_id=first["id"], timeout=90)
    check(scope, "reconnect with Last-Event-ID answered 200", st2.status == 200, st2.status)
    collected = []
    term_status = {}

    def reader():
        for ev in st2.events():
            collected.append(ev)
            if ev["event"] == "end":
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    # The reconnected stream is open: terminate the execution.
    ts, tb, _ = a.request("POST", f"/api/executions/{eid}/terminate")
    term_status.update(status=ts, body=tb)
    t.join(60)
    st2.close()
    check(scope, "terminate answered 200 cancelled",
          ts == 200 and isinstance(tb, dict) and tb.get("status") == "cancelled", f"HTTP {ts} {tb}")
    data = [e for e in collected if e["event"] in ("message", "output")]
    ids = [int(e["id"]) for e in data if e["id"] and e["id"].isdigit()]
    check(scope, "after reconnect no event at or before Last-Event-ID is repeated",
          all(i > int(first["id"]) for i in ids), ids)
    check(scope, "after reconnect ids continue without a gap",
          ids == list(range(int(first["id"]) + 1, int(first["id"]) + 1 + len(ids))), ids)
    end = [e for e in collected if e["event"] == "end"]
    try:
        end_body = json.loads(end[0]["data"]) if end else {}
    except ValueError:
        end_body = {}
    check(scope, "the reconnected stream ends with event: end, status cancelled",
          end_body.get("status") == "cancelled", end[:1] or collected[-3:])
    if pid:
        check(scope, "the CLI process is gone after terminate",
              wait_until(lambda: not pid_running(pid), 10), f"pid {pid}")


def sc_timeout(cli, a):
    scope = a.scope("timeout")
    timeout_s = CLIS_SPEC[cli].timeout_s
    t0 = time.monotonic()
    s, b, _ = a.task("FAKE_SLOW forever", timeout_s=timeout_s)
    took = time.monotonic() - t0
    check(scope, "504 timeout", s == 504 and isinstance(b, dict) and b.get("status") == "timeout",
          f"HTTP {s} {json.dumps(b)[:300]}")
    # Not a performance assertion: the answer must come from the timeout, not
    # from the fake model giving up after its own 60 s.
    check(scope, "answered by agentd's timeout, before the model's own 60 s stall ended",
          took < 55, f"{took:.1f} s")


def sc_health(cli, a):
    scope = a.scope("health runtime")
    s, b = a.get("/health")
    rt = (b or {}).get("runtime") if isinstance(b, dict) else None
    rt = rt or {}
    spec = CLIS_SPEC[cli]
    want_name, want_version = spec.runtime, spec.version
    check(scope, "/health has a runtime block naming the runtime", rt.get("name") == want_name, b)
    check(scope, "the CLI is runnable", rt.get("runnable") is True, rt)
    check(scope, f"the CLI's version is {want_version}", want_version in str(rt.get("version", "")), rt)
    check(scope, "the command is the configured binary",
          str(rt.get("command", "")).endswith(spec.binary), rt)


def sc_workdir(cli, a):
    scope = a.scope("workdir")
    ws = os.path.join(a.state, "workspace")
    ok = os.path.isdir(ws)
    check(scope, "<state-dir>/workspace exists", ok, ws)
    if ok:
        mode = os.stat(ws).st_mode & 0o777
        check(scope, "the workspace is private (no group/other access)", mode & 0o077 == 0, oct(mode))


def sc_refused_tool(cli, a):
    scope = a.scope("tool not allowed")
    pidfile = os.path.join(a.dir, "refused-sleeper.pid")
    s, b, _ = a.task(f"FAKE_SETSID:{pidfile}")
    check(scope, "a refused tool still ends in a successful result",
          s == 200 and isinstance(b, dict) and b.get("status") == "success", f"HTTP {s} {json.dumps(b)[:300]}")
    check(scope, "the refused command had no effect (no pid file)", not os.path.exists(pidfile), pidfile)
    check_sandbox(scope, cli, a, pidfile)
    said = CLIS_SPEC[cli].refused_tool_output
    if said is not None:
        # The command ran and its write was refused, so "no pid file" above
        # is the refusal and not a command that never started.
        resp = (b or {}).get("response", "") if isinstance(b, dict) else ""
        check(scope, f"the command ran and reported the refusal ({said!r})",
              isinstance(resp, str) and resp.startswith("tool done:") and said in resp, resp[:300])


def sc_restart(cli, a):
    scope = a.scope("restart")
    s1, b1 = a.chat("before the restart", session_id="survivor")
    expect_answer(scope, "turn 1", s1, b1, "turns=1: before the restart")
    rc = a.stop()
    check(scope, "agentd stopped cleanly on SIGTERM", rc == 0, rc)
    a.start()
    s2, b2 = a.chat("after the restart", session_id="survivor")
    expect_answer(scope, "turn 2 after a restart carried turn 1", s2, b2,
                  "turns=2: before the restart | after the restart")
    s3, b3 = a.chat("default after restart")
    expect_answer(scope, "a new session after the restart starts fresh", s3, b3,
                  "turns=1: default after restart")


def sc_eviction(cli, a):
    scope = a.scope("eviction (AGENT_HISTORY_LIMIT=2)")
    s, b = a.chat("alpha one", session_id="alpha")
    expect_answer(scope, "alpha turn 1", s, b, "turns=1: alpha one")
    s, b = a.chat("beta one", session_id="beta")
    expect_answer(scope, "beta turn 1", s, b, "turns=1: beta one")
    s, b = a.get("/api/chat/history?session_id=alpha")
    check(scope, "alpha was pushed out of memory",
          s == 200 and isinstance(b, dict) and not b.get("messages"), f"HTTP {s} {b}")
    s, b = a.chat("alpha two", session_id="alpha")
    expect_answer(scope, "alpha turn 2 carried turn 1", s, b, "turns=2: alpha one | alpha two")


def sc_missing_key(cli, a):
    scope = a.scope("missing API key")
    s, b = a.chat("hello without a key")
    err = (b or {}).get("error") or {} if isinstance(b, dict) else {}
    msg = str(err.get("message", ""))
    check(scope, "not a success", s not in (0, 200) and err, f"HTTP {s} {json.dumps(b)[:300]}")
    wants = CLIS_SPEC[cli].missing_key_texts
    check(scope, f"error.message carries the CLI's own words ({' or '.join(map(repr, wants))})",
          any(w in msg for w in wants), msg)


def sc_setsid_sweep(cli, a):
    scope = a.scope("setsid grandchild")
    pidfile = os.path.join(a.dir, "sleeper.pid")
    s, b, _ = a.task(f"FAKE_SETSID:{pidfile}")
    resp = (b or {}).get("response", "") if isinstance(b, dict) else ""
    check(scope, "the tool ran and the task succeeded",
          s == 200 and isinstance(resp, str) and resp.startswith("tool done:"), f"HTTP {s} {json.dumps(b)[:300]}")
    check_sandbox(scope, cli, a, pidfile)
    pid = None
    if wait_until(lambda: os.path.exists(pidfile) and open(pidfile).read().strip(), 5):
        pid = int(open(pidfile).read().strip())
    if not check(scope, "the setsid sleeper was started (pid file written)", pid is not None, pidfile):
        return
    gone = wait_until(lambda: not pid_running(pid), 10)
    check(scope, "the setsid sleeper is gone after its execution ended", gone, f"pid {pid} still running")
    if not gone:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def sc_restart_thrice(cli, a):
    scope = a.scope("restart x3")
    name = "thrice"
    said, bodies = [], []
    for i in range(1, 5):
        if i > 1:
            rc = a.stop()
            check(scope, f"agentd stopped cleanly on SIGTERM (restart {i - 1})", rc == 0, rc)
            a.start()
        said.append(f"turn {i} of four")
        s, b = a.chat(said[-1], session_id=name)
        bodies.append(b)
        expect_answer(scope, f"turn {i} carried every turn before it", s, b,
                      f"turns={i}: " + " | ".join(said))
    check_not_restarted(scope, "metadata.session_restarted is false on all four turns", bodies)
    ids = [agent_session(b) for b in bodies]
    check(scope, "agent_session_id is the same UUID across the three restarts",
          is_uuid(ids[0]) and ids == [ids[0]] * 4, ids)


def sc_lost_session(cli, a):
    scope = a.scope("CLI session files lost")
    name = "amnesia"
    s1, b1 = a.chat("remember pears", session_id=name)
    expect_answer(scope, "turn 1", s1, b1, "turns=1: remember pears")
    sid = agent_session(b1)
    deleted = []
    for d in CLIS_SPEC[cli].session_dirs(a):
        for root, _, files in os.walk(d):
            deleted += [os.path.join(root, f) for f in files]
        shutil.rmtree(d, ignore_errors=True)
    # The session's own file was among them (its name carries the id or
    # the id's first 8 hex digits), or this scenario proves nothing.
    check(scope, "the CLI's files for the session were found and deleted",
          is_uuid(sid) and any(sid[:8] in os.path.basename(f) for f in deleted),
          f"agent_session_id {sid!r}; deleted {[os.path.relpath(f, a.dir) for f in deleted][:8]}")
    s2, b2 = a.chat("what do you remember?", session_id=name)
    expect_answer(scope, "the next turn is answered by a fresh conversation (context honestly lost)",
                  s2, b2, "turns=1: what do you remember?")
    check(scope, "metadata.session_restarted is true on that turn",
          metadata(b2).get("session_restarted") is True, f"HTTP {s2} metadata {metadata(b2)}")
    s3, b3 = a.chat("and now?", session_id=name)
    expect_answer(scope, "the fresh conversation continues", s3, b3,
                  "turns=2: what do you remember? | and now?")
    check_not_restarted(scope, "metadata.session_restarted is false on the turn after", [b3])
    check(scope, "the fresh conversation keeps one agent_session_id",
          is_uuid(agent_session(b2)) and agent_session(b3) == agent_session(b2),
          f"{agent_session(b2)} -> {agent_session(b3)}")


def sc_codex_setup(cli, a):
    scope = a.scope("Codex set-up")
    marker = f"where-{uuid.uuid4().hex[:8]}"
    s, b = a.chat(f"{marker} do you keep this?", session_id="codex-setup")
    expect_answer(scope, "answered through the configuration in <state>/codex", s, b,
                  f"turns=1: {marker} do you keep this?")
    check(scope, "agentd was not given CODEX_HOME", "CODEX_HOME" not in a.env, a.env.get("CODEX_HOME"))
    sid = agent_session(b)
    rollouts = []
    for root, _, files in os.walk(os.path.join(a.state, "codex", "sessions")):
        rollouts += [f for f in files if is_uuid(sid) and sid in f]
    check(scope, "the thread's rollout is under <state>/codex/sessions (the default CODEX_HOME)",
          bool(rollouts), f"thread {sid!r}")
    check_sandbox(scope, cli, a, marker)
    cwds = [c.get("cwd") for c in a.model.contexts(marker)]
    want = os.path.realpath(os.path.join(a.state, "workspace"))
    check(scope, "the CLI ran in <state-dir>/workspace (cwd of its environment context)",
          bool(cwds) and all(c and os.path.realpath(c) == want for c in cwds), f"cwd {cwds}, expected {want!r}")


ALL = ("claude", "gemini", "codex")

# Which scenario runs where: name (for E2E_ONLY and the matrix), function,
# the instance it runs on (a name, or {cli: name} where the CLIs differ),
# and the CLIs it applies to (a cell for any other CLI reads n/a). The slow
# ones first.
SCENARIOS = [
    SimpleNamespace(name="reconnect", fn=sc_reconnect_terminate, instance="main", clis=ALL),
    SimpleNamespace(name="restart-x3", fn=sc_restart_thrice, instance="restart3", clis=ALL),
    SimpleNamespace(name="lost-session", fn=sc_lost_session, instance="lost", clis=ALL),
    SimpleNamespace(name="timeout", fn=sc_timeout, instance="main", clis=ALL),
    SimpleNamespace(name="uuid", fn=sc_uuid_spellings, instance="main", clis=ALL),
    SimpleNamespace(name="failed-first", fn=sc_failed_first_turn, instance="main", clis=ALL),
    SimpleNamespace(name="eviction", fn=sc_eviction, instance="evict", clis=ALL),
    SimpleNamespace(name="restart", fn=sc_restart, instance="restart", clis=ALL),
    SimpleNamespace(name="delete", fn=sc_delete_history, instance="main", clis=ALL),
    SimpleNamespace(name="named", fn=sc_named_session, instance="main", clis=ALL),
    SimpleNamespace(name="default", fn=sc_default_session, instance="main", clis=ALL),
    SimpleNamespace(name="setsid", fn=sc_setsid_sweep, instance="tools", clis=ALL),
    SimpleNamespace(name="async", fn=sc_async_sse, instance="main", clis=ALL),
    SimpleNamespace(name="tasks", fn=sc_tasks, instance="main", clis=ALL),
    SimpleNamespace(name="rate-limit", fn=sc_rate_limit, instance="main", clis=ALL),
    # Claude and Gemini refuse a tool they were not allowed; Codex runs every
    # command in its sandbox, and its read-only one refuses the write.
    SimpleNamespace(name="refused-tool", fn=sc_refused_tool,
                    instance={"claude": "main", "gemini": "main", "codex": "readonly"}, clis=ALL),
    SimpleNamespace(name="missing-key", fn=sc_missing_key, instance="nokey", clis=ALL),
    SimpleNamespace(name="health", fn=sc_health, instance="main", clis=ALL),
    SimpleNamespace(name="workdir", fn=sc_workdir, instance="main", clis=ALL),
    # What only Codex has: CODEX_HOME, its sandbox modes.
    SimpleNamespace(name="codex-setup", fn=sc_codex_setup, instance="main", clis=("codex",)),
]


def instance_of(sc, cli):
    return sc.instance if isinstance(sc.instance, str) else sc.instance[cli]


def runtime_settled(inst):
    """True once /health shows no runtime block, or one with a version."""
    s, b = inst.get("/health")
    rt = (b or {}).get("runtime") if isinstance(b, dict) else None
    return not isinstance(rt, dict) or rt.get("version") is not None


def instances_for(cli, model, needed):
    specs = {
        # No extra CLI arguments at all: each CLI must work as documented.
        "main": dict(),
        "restart": dict(),
        "restart3": dict(),
        "lost": dict(),
        "evict": dict(extra_env={"AGENT_HISTORY_LIMIT": "2"}),
        "nokey": dict(with_key=False),
        "tools": dict(extra_env=CLIS_SPEC[cli].tools_env),
        "readonly": dict(extra_env={"AGENTD_CODEX_SANDBOX": "read-only"}),
    }
    return {name: Agentd(cli, name, model, **specs[name]) for name in specs if name in needed}


def conformance_matrix(scenarios):
    """Lines of the scenario x CLI table: ok when every check of the cell
    passed, FAIL when one failed (or the scenario made none), n/a when the
    scenario does not apply to the CLI."""
    width = max([len("scenario")] + [len(sc.name) for sc in scenarios])
    lines = ["  ".join(["scenario".ljust(width)] + [c.ljust(6) for c in CLIS]).rstrip()]
    for sc in scenarios:
        row = [sc.name.ljust(width)]
        for cli in CLIS:
            if cli not in sc.clis:
                cell = "n/a"
            else:
                results = _cells.get((sc.name, cli))
                cell = "FAIL" if not results or not all(results) else "ok"
            row.append(cell.ljust(6))
        lines.append("  ".join(row).rstrip())
    return lines


def main():
    t0 = time.monotonic()
    unknown_clis = [c for c in CLIS if c not in CLIS_SPEC]
    if unknown_clis:
        emit(f"unknown CLI in E2E_CLIS: {' '.join(unknown_clis)} (known: {' '.join(CLIS_SPEC)})")
        return 2
    scenarios = [sc for sc in SCENARIOS if not ONLY or sc.name in ONLY]
    models, instances = {}, {}
    try:
        for cli in CLIS:
            models[cli] = FakeModel(cli)
            needed = {instance_of(sc, cli) for sc in scenarios if cli in sc.clis}
            instances[cli] = instances_for(cli, models[cli], needed)
            for inst in instances[cli].values():
                inst.start()
            emit(f"#  {cli}: fake model on 127.0.0.1:{models[cli].port}, "
                 f"{len(instances[cli])} agentd instances up")
        # agentd reads the CLI's version once at start, bounded; let that
        # finish before the scenarios load the machine (bounded too).
        for cli in CLIS:
            main_inst = instances[cli].get("main")
            if main_inst is not None:
                wait_until(lambda: runtime_settled(main_inst), 45, 0.5)
        jobs = []
        with ThreadPoolExecutor(max_workers=JOBS) as pool:
            for sc in scenarios:
                for cli in CLIS:
                    if cli in sc.clis:
                        inst = instances[cli][instance_of(sc, cli)]
                        jobs.append(pool.submit(run_scenario, sc, cli, inst))
            for fut in jobs:
                fut.result()
    except Exception as e:  # a broken set-up is one failed check, with the reason
        check("setup", "instances started", False, f"{e}\n{traceback.format_exc()[-800:]}")
    finally:
        for cli, insts in instances.items():
            for inst in insts.values():
                inst.stop()
        for m in models.values():
            m.stop()
    unknown = []
    for cli, m in models.items():
        with open(m.log_path) as f:
            unknown += [f"{cli}: {line.strip()}" for line in f if "UNKNOWN" in line]
    for line in unknown[:10]:
        emit(f"#  fake model saw an unknown request: {line}")
    emit("#  conformance (scenario x CLI):")
    for line in conformance_matrix(scenarios):
        emit("#    " + line)
    if _failed:
        emit("#  failed: " + "; ".join(_failed))
        for cli, insts in instances.items():
            for inst in insts.values():
                tail = [line for line in inst.log_text().splitlines()
                        if " WARN " in line or " ERROR " in line][-5:]
                for line in tail:
                    emit(f"#  agentd {cli}-{inst.name}: {line[:300]}")
        emit("#  agentd and fake-model logs are in the work directory")
    emit(f"suite time: {time.monotonic() - t0:.0f} s; checks: {_checks}, failed: {len(_failed)}")
    return 1 if _failed else 0


def demo(clis):
    """Prints a real exchange per CLI, as a console transcript: agentd on
    127.0.0.1:8420 (free: the namespace is private), driven with curl."""
    for cli in clis:
        model = FakeModel(f"demo-{cli}")
        a = Agentd(cli, "demo", model, extra_env={"AGENTD_LISTEN": "127.0.0.1:8420"})
        try:
            a.start()
            print(f"# {cli}: {CLIS_SPEC[cli].runtime} runtime, fake model API on 127.0.0.1:{model.port}")
            for message in ("hello", "what did I say?"):
                body = json.dumps({"message": message, "session_id": "demo"})
                argv = ["curl", "-s", "localhost:8420/api/chat", "-H", "content-type: application/json",
                        "-d", body]
                out = subprocess.run(argv, capture_output=True, text=True, timeout=REQUEST_TIMEOUT).stdout
                print(f"$ curl -s localhost:8420/api/chat -H 'content-type: application/json' \\\n"
                      f"    -d '{body}'")
                print(out.rstrip())
            print()
        finally:
            a.stop()
            model.stop()
    return 0


def run_scenario(sc, cli, inst):
    _current.cell = (sc.name, cli)
    try:
        sc.fn(cli, inst)
    except Exception as e:
        check(f"{cli} {sc.name}", "ran to the end", False, f"{e!r}\n{traceback.format_exc()[-600:]}")
    finally:
        if not _cells.get((sc.name, cli)):
            check(f"{cli} {sc.name}", "made at least one check", False)
        _current.cell = None


if __name__ == "__main__":
    if sys.argv[1:2] == ["--demo"]:
        sys.exit(demo(CLIS))
    sys.exit(main())
