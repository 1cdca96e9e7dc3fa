#!/usr/bin/env python3
"""A fake model API for the agent-CLI end-to-end suite (Python 3 stdlib only).

Speaks enough of three APIs for the real CLIs to hold a conversation:

* Anthropic Messages (Claude Code): POST /v1/messages (streaming SSE and
  plain JSON), POST /v1/messages/count_tokens, GET /v1/models.
* Gemini (Gemini CLI): POST .../models/M:generateContent,
  :streamGenerateContent (?alt=sse) and :countTokens.
* OpenAI Responses (Codex CLI, a provider with wire_api = "responses"):
  POST /v1/responses (or /responses), streamed SSE: response.created,
  response.output_item.added, response.output_text.delta,
  response.output_item.done, response.completed (with usage). Codex's own
  developer messages and its <environment_context> user message are not
  turns.

The answer depends on the whole conversation received: it lists every user
turn it saw, "turns=2: hello | what did I say?", so a test can prove that
turn 2 carried turn 1. Magic words in the newest user turn steer it:

  FAKE_429         a rate-limit / quota error (Anthropic rate_limit_error with
                   x-should-retry: false; Gemini RESOURCE_EXHAUSTED; OpenAI
                   rate_limit_exceeded, "Rate limit reached for ...")
  FAKE_RETRY_429   the same without x-should-retry: false, to measure how long
                   a CLI's own retries take
  FAKE_500         HTTP 500 with the message FAKE_500_MESSAGE
  FAKE_SLOW        the answer starts, then the stream stalls (bounded by
                   SLOW_SECONDS) so a timeout or terminate has something to kill
  FAKE_SETSID:P    a tool call (Claude Bash / Gemini run_shell_command /
                   Codex exec_command) that starts a `setsid` sleeper writing
                   its pid to file P; once the tool result comes back the
                   answer is "tool done: ..."
  FAKE_RUN:P       the same tool call running the shell script P (`sh P`)

GET /_fake/seen?q=WORD counts the model requests whose newest user turn
contains WORD, so a test knows when a CLI has reached the model; for Codex
requests it also lists what the request said about where Codex ran
("contexts": sandbox_mode from its x-codex-turn-metadata header, cwd from its
<environment_context>), so a test can see the sandbox agentd asked for.

It binds 127.0.0.1 on the given port (0 = any), prints the port on stdout
("port N") and logs one line per request to stderr, marking requests it does
not know ("UNKNOWN"), so what a CLI version calls can be learned from the log.
Not a model: no tokens, no safety, no real tool planning.
"""

import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

FAKE_500_MESSAGE = "fake model internal failure 7731"
# How long a FAKE_SLOW answer stalls at most: longer than any timeout the
# suite asks for, short enough that a stuck client never keeps the server busy.
SLOW_SECONDS = 60
# Largest request body read; the CLIs send a few hundred KiB at most
# (system prompt and tool schemas).
MAX_BODY = 16 * 1024 * 1024
# A user turn longer than this is shortened in the echo.
TURN_ECHO_CHARS = 200

LOG_LOCK = threading.Lock()
# The newest user turn of every model request, newest last, bounded: a test
# asks GET /_fake/seen?q=WORD to learn that a CLI has reached the model.
# Each entry is (turn, context): context is a dict of what the request said
# about where the CLI ran, or None.
SEEN = []
SEEN_LIMIT = 1000
# Contexts returned by /_fake/seen at most (the newest).
SEEN_CONTEXTS = 20


def remember(conv, context=None):
    with LOG_LOCK:
        SEEN.append((conv.last, context))
        del SEEN[:-SEEN_LIMIT]


def log(line):
    with LOG_LOCK:
        sys.stderr.write(time.strftime("%H:%M:%S ") + line + "\n")
        sys.stderr.flush()


# Context blocks the CLIs put into user turns on their own; they are not turns
# the person typed.
CONTEXT_PREFIXES = (
    "<system-reminder>",
    "This is the Gemini CLI",
    "<session_context>",
    "<environment",
    "Caveat:",
    "<command-",
    "<local-command",
    "<turn_aborted>",
    "<user_shell_command>",
    "<subagent_notification>",
    "# AGENTS.md instructions",
)


def is_person_text(text):
    t = text.strip()
    return bool(t) and not t.startswith(CONTEXT_PREFIXES)


def shorten(text):
    text = " ".join(text.split())
    return text if len(text) <= TURN_ECHO_CHARS else text[:TURN_ECHO_CHARS] + "…"


# The steering words that make the model call the shell tool.
TOOL_KINDS = ("FAKE_SETSID", "FAKE_RUN")


def tool_command(kind, arg):
    """The shell command of a tool call: the setsid sleeper, or a script."""
    return setsid_command(arg) if kind == "FAKE_SETSID" else f"sh {arg}"


def setsid_command(pidfile):
    # The sleeper gets its own session and process group, writes its pid and
    # outlives the tool call unless something sweeps it. Unique duration so
    # it can be told apart in `ps`. The command waits (up to 2 s) for the pid
    # file and says whether it appeared: a sandbox that tears down its
    # processes when the command returns could otherwise kill the sleeper
    # before it wrote anything, and "no pid file" must mean the write was
    # refused. No command substitution: Gemini's shell tool refuses it.
    waits = " ".join(str(i) for i in range(20))
    return (
        f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 900' </dev/null >/dev/null 2>&1 & "
        f"for i in {waits}; do [ -s {pidfile} ] && break; sleep 0.1; done; "
        f"if [ -s {pidfile} ]; then echo sleeper started; else echo no pid file; fi"
    )


class Conversation:
    """What the answer is computed from: user turns, and a pending tool result."""

    def __init__(self, turns, tool_result):
        self.turns = turns
        self.tool_result = tool_result

    @property
    def last(self):
        return self.turns[-1] if self.turns else ""

    def answer_text(self):
        if self.tool_result is not None:
            return "tool done: " + shorten(self.tool_result)
        return f"turns={len(self.turns)}: " + " | ".join(shorten(t) for t in self.turns)

    def steering(self):
        """(kind, argument) for the newest user turn, or (None, None)."""
        if self.tool_result is not None:
            return None, None
        last = self.last
        for word in ("FAKE_RETRY_429", "FAKE_429", "FAKE_500", "FAKE_SLOW"):
            if word in last:
                return word, None
        m = re.search(r"(FAKE_SETSID|FAKE_RUN):(\S+)", last)
        if m:
            return m.group(1), m.group(2)
        return None, None


# ---------------------------------------------------------------- Anthropic


def anthropic_conversation(body):
    turns = []
    tool_result = None
    for msg in body.get("messages", []):
        if msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, str):
            blocks = [{"type": "text", "text": content}]
        else:
            blocks = content or []
        for b in blocks:
            # A CLI may fold several person turns into one message (after a
            # failed turn); each text block counts as a turn of its own.
            if b.get("type") == "text" and is_person_text(b.get("text", "")):
                turns.append(b["text"].strip())
                tool_result = None
            elif b.get("type") == "tool_result":
                c = b.get("content")
                if isinstance(c, list):
                    c = " ".join(x.get("text", "") for x in c if isinstance(x, dict))
                tool_result = str(c or "")
    return Conversation(turns, tool_result)


def anthropic_is_side_request(body):
    """Claude Code sends small side requests (titles, topic checks) with no
    tools; they get a short fixed answer so they never steer or fail."""
    return not body.get("tools") and body.get("max_tokens", 0) <= 512


# ---------------------------------------------------------------- Gemini


def gemini_conversation(body):
    turns = []
    tool_result = None
    for c in body.get("contents", []):
        if c.get("role") != "user":
            continue
        for p in c.get("parts", []):
            if "text" in p and is_person_text(p["text"]):
                turns.append(p["text"].strip())
                tool_result = None
            elif "functionResponse" in p:
                tool_result = json.dumps(p["functionResponse"].get("response", {}))
    return Conversation(turns, tool_result)


# ---------------------------------------------------------------- OpenAI Responses


def responses_conversation(body):
    """User turns of a Responses request. Codex sends its own instructions as
    developer messages and an <environment_context> user message; those are
    not turns. A function_call_output after the newest turn is the tool
    result that turn is waiting for."""
    turns = []
    tool_result = None
    items = body.get("input")
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    for item in items or []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message" and item.get("role") == "user":
            content = item.get("content")
            if isinstance(content, str):
                content = [{"type": "input_text", "text": content}]
            for part in content or []:
                text = part.get("text", "") if isinstance(part, dict) else ""
                if part.get("type") in ("input_text", "text") and is_person_text(text):
                    turns.append(text.strip())
                    tool_result = None
        elif kind == "function_call_output":
            out = item.get("output")
            if isinstance(out, list):
                out = " ".join(x.get("text", "") for x in out if isinstance(x, dict))
            elif isinstance(out, dict):
                out = out.get("content") or json.dumps(out)
            tool_result = str(out or "")
    return Conversation(turns, tool_result)


def codex_context(headers, body):
    """Where Codex says it runs: the sandbox mode of its turn metadata
    header and the cwd of its <environment_context> message."""
    ctx = {}
    try:
        meta = json.loads(headers.get("x-codex-turn-metadata") or "{}")
        if isinstance(meta, dict) and meta.get("sandbox_mode"):
            ctx["sandbox_mode"] = meta["sandbox_mode"]
    except ValueError:
        pass
    m = re.search(r"<environment_context>.*?<cwd>(.*?)</cwd>", json.dumps(body.get("input", "")))
    if m:
        ctx["cwd"] = m.group(1)
    return ctx or None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-model/1"

    def log_message(self, fmt, *args):  # the default access log is noise
        pass

    # ------------------------------------------------------------ plumbing

    def read_body(self):
        n = int(self.headers.get("content-length") or 0)
        if n > MAX_BODY:
            raise ValueError("body too large")
        raw = self.rfile.read(n) if n else b""
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError:
            return {}

    def send_json(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def start_sse(self):
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.end_headers()
        self.close_connection = True

    def sse(self, data, event=None):
        out = ""
        if event:
            out += f"event: {event}\n"
        out += f"data: {json.dumps(data)}\n\n"
        self.wfile.write(out.encode())
        self.wfile.flush()

    def stall(self, ping=None):
        """Keep the connection open without answering, bounded. With ping
        (bytes), send it every second, as the Anthropic API does on a long
        answer, and end early when the client has gone away."""
        deadline = time.monotonic() + SLOW_SECONDS
        while time.monotonic() < deadline:
            time.sleep(1)
            if ping is None:
                continue
            try:
                self.wfile.write(ping)
                self.wfile.flush()
            except OSError:
                return

    # ------------------------------------------------------------ routing

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/_fake/seen":
            q = parse_qs(self.path.partition("?")[2]).get("q", [""])[0]
            with LOG_LOCK:
                hits = [ctx for turn, ctx in SEEN if q and q in turn]
            self.send_json(200, {"count": len(hits),
                                 "contexts": [c for c in hits if c][-SEEN_CONTEXTS:]})
            return
        if path.rstrip("/") == "/v1/models" or path.startswith("/v1/models/"):
            log(f"GET {self.path}")
            self.send_json(200, {
                "data": [{"type": "model", "id": "claude-fake-1", "display_name": "Fake",
                          "created_at": "2025-01-01T00:00:00Z"}],
                "has_more": False, "first_id": "claude-fake-1", "last_id": "claude-fake-1",
            })
            return
        log(f"UNKNOWN GET {self.path}")
        self.send_json(404, {"error": {"message": f"fake model: no GET {path}"}})

    def do_HEAD(self):
        log(f"HEAD {self.path}")
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self):
        path = self.path.split("?")[0]
        try:
            body = self.read_body()
        except ValueError as e:
            self.send_json(413, {"error": {"message": str(e)}})
            return
        try:
            if path.startswith("/v1/messages/count_tokens"):
                log(f"POST {self.path}")
                self.send_json(200, {"input_tokens": 42})
            elif path.startswith("/v1/messages"):
                self.anthropic(body)
            elif path.rstrip("/") in ("/v1/responses", "/responses"):
                self.openai_responses(body)
            elif ":countTokens" in path:
                log(f"POST {self.path}")
                self.send_json(200, {"totalTokens": 42})
            elif ":streamGenerateContent" in path:
                self.gemini(body, stream=True)
            elif ":generateContent" in path:
                self.gemini(body, stream=False)
            else:
                log(f"UNKNOWN POST {self.path} keys={sorted(body)[:10]}")
                self.send_json(404, {"error": {"message": f"fake model: no POST {path}"}})
        except (BrokenPipeError, ConnectionResetError):
            log(f"client went away: {self.path}")

    # ------------------------------------------------------------ Anthropic

    def anthropic(self, body):
        stream = bool(body.get("stream"))
        model = body.get("model", "claude-fake-1")
        conv = anthropic_conversation(body)
        side = anthropic_is_side_request(body)
        kind, arg = (None, None) if side else conv.steering()
        if not side:
            remember(conv)
        log(f"POST {self.path} anthropic stream={stream} side={side} tools={len(body.get('tools') or [])} "
            f"turns={len(conv.turns)} steer={kind}")
        if kind in ("FAKE_429", "FAKE_RETRY_429"):
            headers = {"retry-after": "7"}
            if kind == "FAKE_429":
                headers["x-should-retry"] = "false"
            self.send_json(429, {"type": "error", "error": {
                "type": "rate_limit_error",
                "message": "Number of request tokens has exceeded your per-minute rate limit (fake)"}},
                headers=headers)
            return
        if kind == "FAKE_500":
            self.send_json(500, {"type": "error", "error": {"type": "api_error", "message": FAKE_500_MESSAGE}},
                           headers={"x-should-retry": "false"})
            return
        msg_id = "msg_fake_%d" % int(time.time() * 1000)
        usage = {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": 0}
        if side:
            blocks = [{"type": "text", "text": "Fake title"}]
            stop = "end_turn"
        elif kind in TOOL_KINDS:
            blocks = [{"type": "tool_use", "id": "toolu_fake_1", "name": "Bash",
                       "input": {"command": tool_command(kind, arg),
                                 "description": "Start a detached sleeper"}}]
            stop = "tool_use"
        else:
            blocks = [{"type": "text", "text": conv.answer_text()}]
            stop = "end_turn"
        if not stream:
            if kind == "FAKE_SLOW":
                self.stall()
                return
            self.send_json(200, {"id": msg_id, "type": "message", "role": "assistant", "model": model,
                                 "content": blocks, "stop_reason": stop, "stop_sequence": None,
                                 "usage": usage})
            return
        self.start_sse()
        self.sse({"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": usage}}, "message_start")
        if kind == "FAKE_SLOW":
            self.sse({"type": "content_block_start", "index": 0,
                      "content_block": {"type": "text", "text": ""}}, "content_block_start")
            self.sse({"type": "content_block_delta", "index": 0,
                      "delta": {"type": "text_delta", "text": "thinking slowly"}}, "content_block_delta")
            self.stall(ping=b'event: ping\ndata: {"type": "ping"}\n\n')
            return
        for i, b in enumerate(blocks):
            if b["type"] == "text":
                self.sse({"type": "content_block_start", "index": i,
                          "content_block": {"type": "text", "text": ""}}, "content_block_start")
                text = b["text"]
                # Two deltas, so streaming clients see output arrive in parts.
                half = len(text) // 2
                for part in (text[:half], text[half:]):
                    if part:
                        self.sse({"type": "content_block_delta", "index": i,
                                  "delta": {"type": "text_delta", "text": part}}, "content_block_delta")
            else:
                self.sse({"type": "content_block_start", "index": i,
                          "content_block": {"type": "tool_use", "id": b["id"], "name": b["name"],
                                            "input": {}}}, "content_block_start")
                self.sse({"type": "content_block_delta", "index": i,
                          "delta": {"type": "input_json_delta", "partial_json": json.dumps(b["input"])}},
                         "content_block_delta")
            self.sse({"type": "content_block_stop", "index": i}, "content_block_stop")
        self.sse({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                  "usage": {"output_tokens": 5}}, "message_delta")
        self.sse({"type": "message_stop"}, "message_stop")

    # ------------------------------------------------------------ Responses

    def openai_responses(self, body):
        conv = responses_conversation(body)
        kind, arg = conv.steering()
        remember(conv, codex_context(self.headers, body))
        model = body.get("model", "gpt-fake-1")
        log(f"POST {self.path} responses stream={bool(body.get('stream'))} "
            f"tools={len(body.get('tools') or [])} turns={len(conv.turns)} steer={kind}")
        if kind in ("FAKE_429", "FAKE_RETRY_429"):
            # The body of a real OpenAI rate-limit answer; "type" is not
            # "usage_limit_reached", so Codex treats it as retryable.
            self.send_json(429, {"error": {
                "message": f"Rate limit reached for {model} in organization org-fake on tokens per min "
                           "(TPM): Limit 1000, Used 1000, Requested 1. Please try again in 7s.",
                "type": "tokens", "param": None, "code": "rate_limit_exceeded"}},
                headers={"retry-after": "7"})
            return
        if kind == "FAKE_500":
            self.send_json(500, {"error": {"message": FAKE_500_MESSAGE, "type": "server_error",
                                           "param": None, "code": None}})
            return
        resp_id = "resp_fake_%d" % int(time.time() * 1000)
        if kind in TOOL_KINDS:
            item = {"type": "function_call", "id": "fc_fake_1", "call_id": "call_fake_1",
                    "name": "exec_command", "status": "completed",
                    "arguments": json.dumps({"cmd": tool_command(kind, arg)})}
        else:
            item = {"type": "message", "id": "msg_fake_1", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": conv.answer_text(), "annotations": []}]}
        usage = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0},
                 "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": 15}
        response = {"id": resp_id, "object": "response", "created_at": int(time.time()),
                    "status": "in_progress", "model": model, "output": []}
        self.start_sse()
        self.sse({"type": "response.created", "response": response}, "response.created")
        if item["type"] == "message":
            added = dict(item, status="in_progress", content=[])
            self.sse({"type": "response.output_item.added", "output_index": 0, "item": added},
                     "response.output_item.added")
            text = "thinking slowly" if kind == "FAKE_SLOW" else item["content"][0]["text"]
            # Two deltas, so streaming clients see output arrive in parts.
            half = len(text) // 2
            for part in (text[:half], text[half:]):
                if part:
                    self.sse({"type": "response.output_text.delta", "item_id": item["id"],
                              "output_index": 0, "content_index": 0, "delta": part},
                             "response.output_text.delta")
            if kind == "FAKE_SLOW":
                self.stall(ping=b": keepalive\n\n")
                return
        else:
            self.sse({"type": "response.output_item.added", "output_index": 0,
                      "item": dict(item, status="in_progress", arguments="")},
                     "response.output_item.added")
        self.sse({"type": "response.output_item.done", "output_index": 0, "item": item},
                 "response.output_item.done")
        self.sse({"type": "response.completed",
                  "response": dict(response, status="completed", output=[item], usage=usage)},
                 "response.completed")

    # ------------------------------------------------------------ Gemini

    def gemini(self, body, stream):
        conv = gemini_conversation(body)
        gen = body.get("generationConfig") or {}
        wants_json = gen.get("responseMimeType") == "application/json" or "responseJsonSchema" in gen \
            or "responseSchema" in gen
        kind, arg = (None, None) if wants_json else conv.steering()
        if not wants_json:
            remember(conv)
        log(f"POST {self.path} gemini stream={stream} json={wants_json} "
            f"tools={len(body.get('tools') or [])} turns={len(conv.turns)} steer={kind}")
        if kind in ("FAKE_429", "FAKE_RETRY_429"):
            self.send_json(429, {"error": {
                "code": 429, "status": "RESOURCE_EXHAUSTED",
                "message": "Resource has been exhausted (e.g. check quota)."}})
            return
        if kind == "FAKE_500":
            self.send_json(500, {"error": {"code": 500, "status": "INTERNAL", "message": FAKE_500_MESSAGE}})
            return
        if wants_json:
            # Side requests (next-speaker check, routing, loop detection) ask
            # for JSON; the answer that ends the turn is the safe one.
            parts = [{"text": json.dumps({"reasoning": "fake", "next_speaker": "user",
                                          "model_choice": "flash", "is_loop": False,
                                          "complexity": "simple",
                                          "complexity_reasoning": "fake", "complexity_score": 1})}]
        elif kind in TOOL_KINDS:
            parts = [{"functionCall": {"name": "run_shell_command",
                                       "args": {"command": tool_command(kind, arg),
                                                "description": "Start a detached sleeper"}}}]
        else:
            parts = [{"text": conv.answer_text()}]
        usage = {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15}
        chunk = {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP",
                                 "index": 0}], "usageMetadata": usage, "modelVersion": "gemini-fake-1"}
        if not stream:
            if kind == "FAKE_SLOW":
                self.stall()
                return
            self.send_json(200, chunk)
            return
        self.start_sse()
        if kind == "FAKE_SLOW":
            self.wfile.write(("data: " + json.dumps({"candidates": [{"content": {
                "role": "model", "parts": [{"text": "thinking slowly"}]}, "index": 0}]}) + "\r\n\r\n").encode())
            self.wfile.flush()
            self.stall()
            return
        if parts and "text" in parts[0] and not wants_json:
            text = parts[0]["text"]
            half = len(text) // 2
            first = {"candidates": [{"content": {"role": "model", "parts": [{"text": text[:half]}]},
                                     "index": 0}], "modelVersion": "gemini-fake-1"}
            chunk["candidates"][0]["content"]["parts"] = [{"text": text[half:]}]
            self.wfile.write(("data: " + json.dumps(first) + "\r\n\r\n").encode())
        self.wfile.write(("data: " + json.dumps(chunk) + "\r\n\r\n").encode())
        self.wfile.flush()


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"port {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
