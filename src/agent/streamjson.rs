//! Line-by-line parser for an agent's stdout: stream-json events (Claude Code,
//! Gemini CLI), Codex's JSONL events, or plain text, mixed freely.
//!
//! It is fed raw byte chunks as they arrive and keeps only bounded state: the
//! text it will answer with (capped) and the line being assembled (capped). It
//! does not read pipes, broadcast output or decide what an outcome means: those
//! are `process` and `classify`.
//!
//! Rules:
//! * A line that is a JSON object with a string `type` is an event. Assistant
//!   text is accumulated (Claude: `{"type":"assistant","message":{"content":
//!   [{"type":"text","text":..}]}}`; Gemini: `{"type":"message","role":
//!   "assistant","content":..,"delta":true}`, or a bare `text` field). The last
//!   `{"type":"result"}` line becomes the `ResultLine`. Other event types (tool
//!   calls, init, ...) are not part of the answer and are dropped.
//! * Codex (`codex exec --json`): `thread.started {thread_id}` names the
//!   session; an `item.completed` whose item is an `agent_message` is answer
//!   text; `turn.completed {usage}` is a successful result (the answer is the
//!   messages' text) and `turn.failed {error}` an error result; an `error
//!   {message}` event is the error of a turn that never completed. Every
//!   other item (commands, file changes, reasoning, plans, and `error` items,
//!   which Codex also uses for warnings) is not part of the answer and never
//!   fails the turn. Unknown event and item types are ignored.
//! * Every other line is plain output and is kept verbatim, newline included.
//! * A line longer than the line cap cannot be an event we could hold in memory,
//!   so it is treated as plain text from that point on.
//! * Lines keep being parsed after the text cap is reached: the `result` line
//!   of a chatty agent comes last and must still be seen.

use serde_json::Value;

use crate::agent::runtime::{AgentReport, ResultLine};

/// Smallest line cap. A result line carries the whole final answer plus its
/// metadata (cost, `is_error`); it must stay parseable even when the text cap
/// is configured small, or an error result would pass for plain text.
pub const MIN_LINE_CAP: usize = 256 * 1024;

/// Most characters of the agent's own error message kept for `error.message`:
/// enough for any message a CLI prints (a stack of `errors[]` included), short
/// enough for an API error body and a log line.
pub const MAX_ERROR_MESSAGE: usize = 2000;

/// What the parser learned from one execution's stdout.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedOutput {
    /// Assistant text and plain lines, at most the text cap in bytes.
    pub text: String,
    /// The last `{"type":"result"}` line, if any.
    pub result: Option<ResultLine>,
    /// True when any text was dropped because of the cap.
    pub truncated: bool,
    /// True when at least one stream-json event was seen.
    pub saw_events: bool,
    /// The agent's session id and model, from its init and result lines.
    pub agent: AgentReport,
}

/// Incremental parser; see the module doc for the rules.
#[derive(Debug)]
pub struct StreamParser {
    /// Answer text as bytes: plain chunks may end mid-character, so UTF-8 is
    /// decoded once, at `finish`.
    text: Vec<u8>,
    /// Most bytes `text` may hold.
    text_cap: usize,
    /// The line being assembled (without its newline).
    line: Vec<u8>,
    /// Most bytes `line` may hold before the line is declared plain text: the
    /// text cap (a longer line could not be kept anyway) but at least
    /// `MIN_LINE_CAP`. Memory per execution is bounded by the sum of both caps.
    line_cap: usize,
    /// Inside an over-long line: bytes go straight to `text` until a newline.
    overlong: bool,
    truncated: bool,
    result: Option<ResultLine>,
    saw_events: bool,
    agent: AgentReport,
}

impl StreamParser {
    /// A parser that keeps at most `text_cap` bytes of answer text.
    pub fn new(text_cap: usize) -> Self {
        Self::with_caps(text_cap, text_cap.max(MIN_LINE_CAP))
    }

    fn with_caps(text_cap: usize, line_cap: usize) -> Self {
        StreamParser {
            text: Vec::new(),
            text_cap,
            line: Vec::new(),
            line_cap: line_cap.max(1),
            overlong: false,
            truncated: false,
            result: None,
            saw_events: false,
            agent: AgentReport::default(),
        }
    }

    /// Feed the next chunk of stdout; chunks may split lines anywhere.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        while !chunk.is_empty() {
            let newline = chunk.iter().position(|&b| b == b'\n');
            let (segment, rest) = match newline {
                Some(i) => (&chunk[..i], &chunk[i + 1..]),
                None => (chunk, &chunk[chunk.len()..]),
            };
            if self.overlong {
                self.push_text(segment);
                if newline.is_some() {
                    self.push_text(b"\n");
                    self.overlong = false;
                }
            } else if self.line.len() + segment.len() > self.line_cap {
                // Too long to be an event we hold: from here on it is plain text.
                let held = std::mem::take(&mut self.line);
                self.push_text(&held);
                self.push_text(segment);
                if newline.is_some() {
                    self.push_text(b"\n");
                } else {
                    self.overlong = true;
                }
            } else {
                self.line.extend_from_slice(segment);
                if newline.is_some() {
                    let line = std::mem::take(&mut self.line);
                    self.line_end(&line, true);
                    // Reuse the allocation for the next line.
                    self.line = line;
                    self.line.clear();
                }
            }
            chunk = rest;
        }
    }

    /// End of stdout: a last line without a newline still counts.
    pub fn finish(mut self) -> ParsedOutput {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_end(&line, false);
        }
        let mut text = String::from_utf8_lossy(&self.text).into_owned();
        // The cap may have cut a character in half; the lossy decode turned it
        // into U+FFFD, which is fine, but never exceed the cap by doing so.
        if text.len() > self.text_cap {
            let mut end = self.text_cap;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        ParsedOutput {
            text,
            result: self.result,
            truncated: self.truncated,
            saw_events: self.saw_events,
            agent: self.agent,
        }
    }

    fn line_end(&mut self, line: &[u8], had_newline: bool) {
        let trimmed = trim_ascii(line);
        if trimmed.first() == Some(&b'{') {
            if let Ok(event @ Value::Object(_)) = serde_json::from_slice::<Value>(trimmed) {
                if let Some(kind) = event.get("type").and_then(Value::as_str) {
                    self.saw_events = true;
                    self.event(kind, &event);
                    return;
                }
            }
        }
        self.separate();
        self.push_text(line);
        if had_newline {
            self.push_text(b"\n");
        }
    }

    fn event(&mut self, kind: &str, event: &Value) {
        match kind {
            "assistant" => {
                let text = event
                    .get("message")
                    .map(message_text)
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| message_text(event));
                self.push_message(&text, false);
            }
            "message" => {
                // Gemini CLI: user messages are echoed back; only the
                // assistant's count. A message without a role is assumed to be
                // the assistant's (lenient towards look-alike CLIs).
                let role = event.get("role").and_then(Value::as_str);
                if matches!(role, None | Some("assistant") | Some("model")) {
                    let delta = event.get("delta").and_then(Value::as_bool) == Some(true);
                    self.push_message(&message_text(event), delta);
                }
            }
            "text" => {
                self.push_message(&message_text(event), true);
            }
            // Claude: {"type":"system","subtype":"init",..}; Gemini: {"type":"init",..}.
            "init" => self.init(event),
            "system" if event.get("subtype").and_then(Value::as_str) == Some("init") => {
                self.init(event)
            }
            "thread.started" => {
                if let Some(id) = str_field(event, "thread_id") {
                    self.agent.session_id = Some(id);
                }
            }
            "item.completed" => {
                let item = event.get("item").unwrap_or(&Value::Null);
                if item.get("type").and_then(Value::as_str) == Some("agent_message") {
                    self.push_message(&message_text(item), false);
                }
            }
            "turn.completed" => self.result = Some(codex_turn_completed(event)),
            "turn.failed" => self.result = Some(codex_error(event.get("error"))),
            // A turn that completed stands; an error after it is not its error.
            "error" if self.result.as_ref().is_none_or(|r| r.is_error) => {
                self.result = Some(codex_error(Some(event)));
            }
            "result" => {
                if let Some(id) = str_field(event, "session_id") {
                    self.agent.session_id = Some(id);
                }
                if matches!(self.agent.model.as_deref(), None | Some("auto")) {
                    if let Some(model) = sole_model(event) {
                        self.agent.model = Some(model);
                    }
                }
                self.result = Some(result_line(event));
            }
            _ => {}
        }
    }

    /// The init line names the session and the model the CLI chose.
    fn init(&mut self, event: &Value) {
        if let Some(id) = str_field(event, "session_id") {
            self.agent.session_id = Some(id);
        }
        if let Some(model) = str_field(event, "model") {
            self.agent.model = Some(model);
        }
    }

    /// Whole messages are separated by a newline; streamed deltas are glued.
    fn push_message(&mut self, text: &str, delta: bool) {
        if text.is_empty() {
            return;
        }
        if !delta {
            self.separate();
        }
        self.push_text(text.as_bytes());
    }

    /// Start a new line unless the text is empty or already at one.
    fn separate(&mut self) {
        if !self.text.is_empty() && self.text.last() != Some(&b'\n') {
            self.push_text(b"\n");
        }
    }

    fn push_text(&mut self, bytes: &[u8]) {
        let room = self.text_cap.saturating_sub(self.text.len());
        if bytes.len() > room {
            self.truncated = true;
        }
        self.text.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

/// Text of a message-like object: `content` as a string or as an array of
/// `{"type":"text","text":..}` blocks, else a `text` field.
fn message_text(value: &Value) -> String {
    match value.get("content") {
        Some(Value::String(s)) => return s.clone(),
        Some(Value::Array(blocks)) => {
            let mut out = String::new();
            for block in blocks {
                let is_text = matches!(
                    block.get("type").and_then(Value::as_str),
                    None | Some("text")
                );
                if let (true, Some(t)) = (is_text, block.get("text").and_then(Value::as_str)) {
                    out.push_str(t);
                }
            }
            if !out.is_empty() {
                return out;
            }
        }
        _ => {}
    }
    value
        .get("text")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn str_field(v: &Value, k: &str) -> Option<String> {
    v.get(k)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The one model a result's usage map names (Claude `modelUsage`, Gemini
/// `stats.models`), for CLIs whose init line said `auto` or nothing.
fn sole_model(event: &Value) -> Option<String> {
    let usage = event
        .get("modelUsage")
        .or_else(|| event.get("stats").and_then(|s| s.get("models")))?
        .as_object()?;
    match usage.keys().collect::<Vec<_>>().as_slice() {
        [only] => Some((*only).clone()),
        _ => None,
    }
}

/// At most `MAX_ERROR_MESSAGE` characters.
fn bounded(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(MAX_ERROR_MESSAGE) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// One entry of Claude's `errors[]`: a string, or an object with a `message`
/// (else the object itself, as JSON).
fn error_entry(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => str_field(other, "message").unwrap_or_else(|| other.to_string()),
    }
}

/// An HTTP status given as a number or a numeric string.
fn status_field(v: &Value, k: &str) -> Option<u16> {
    match v.get(k)? {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Claude: `result`, `total_cost_usd` (older: `cost_usd`), `duration_ms`,
/// `is_error`, `subtype`, `errors[]` (strings or objects), `api_error_status`,
/// `api_error_type`; an error result may carry `errors[]` and no `result`.
/// Gemini: `status: "error"`, `error: {"type", "message"}`,
/// `stats.duration_ms`. Both are accepted.
fn result_line(event: &Value) -> ResultLine {
    let error = event.get("error").filter(|e| !e.is_null());
    let gemini_message = error.and_then(|e| match e {
        Value::String(s) => Some(s.clone()),
        other => str_field(other, "message"),
    });
    let errors: Vec<String> = event
        .get("errors")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(error_entry)
                .filter(|e| !e.trim().is_empty())
                .collect()
        })
        .unwrap_or_default();
    let subtype = str_field(event, "subtype");
    let text = str_field(event, "result")
        .or_else(|| str_field(event, "response"))
        .unwrap_or_default();
    let is_error = event.get("is_error").and_then(Value::as_bool) == Some(true)
        || event.get("status").and_then(Value::as_str) == Some("error")
        || subtype.as_deref().is_some_and(|s| s.starts_with("error"))
        || gemini_message.is_some()
        || !errors.is_empty();
    let error_message = is_error
        .then(|| {
            if !errors.is_empty() {
                Some(errors.join("; "))
            } else {
                gemini_message.clone().or_else(|| Some(text.clone()))
            }
        })
        .flatten()
        .filter(|m| !m.trim().is_empty())
        .map(|m| bounded(&m));
    let api_error_status = status_field(event, "api_error_status")
        .or_else(|| error.and_then(|e| status_field(e, "code")))
        .or_else(|| error.and_then(|e| status_field(e, "status")));
    let error_type = str_field(event, "api_error_type").or_else(|| {
        error
            .and_then(|e| str_field(e, "type"))
            .filter(|t| t != "unknown")
    });
    let cost_usd = event
        .get("total_cost_usd")
        .or_else(|| event.get("cost_usd"))
        .and_then(Value::as_f64);
    let duration_ms = event
        .get("duration_ms")
        .or_else(|| event.get("stats").and_then(|s| s.get("duration_ms")))
        .and_then(Value::as_u64);
    ResultLine {
        // An error result's text is its message; the answer is empty.
        text: if is_error && text.is_empty() {
            error_message.clone().unwrap_or_default()
        } else {
            text
        },
        cost_usd,
        duration_ms,
        is_error,
        subtype,
        error_message,
        api_error_status,
        error_type,
        input_tokens: usage_tokens(event, "input_tokens"),
        output_tokens: usage_tokens(event, "output_tokens"),
    }
}

/// Codex `turn.completed {usage: {input_tokens, output_tokens, ..}}`: a
/// success whose answer is the turn's agent messages.
fn codex_turn_completed(event: &Value) -> ResultLine {
    let usage = event.get("usage");
    let tokens = |k: &str| usage.and_then(|u| u.get(k)).and_then(Value::as_u64);
    ResultLine {
        input_tokens: tokens("input_tokens"),
        output_tokens: tokens("output_tokens"),
        ..ResultLine::default()
    }
}

/// Codex `turn.failed {error: {message}}` or `error {message}`: an error
/// result carrying Codex's words (they name the model API's status, which
/// `classify` reads).
fn codex_error(error: Option<&Value>) -> ResultLine {
    let message = match error {
        Some(Value::String(s)) => Some(s.clone()),
        Some(e) => str_field(e, "message"),
        None => None,
    }
    .filter(|m| !m.trim().is_empty())
    .unwrap_or_else(|| "Codex reported a failed turn without a message".into());
    let message = bounded(&message);
    ResultLine {
        text: message.clone(),
        is_error: true,
        error_message: Some(message),
        ..ResultLine::default()
    }
}

/// Claude's `usage.input_tokens` / `usage.output_tokens` on a result line.
fn usage_tokens(event: &Value, key: &str) -> Option<u64> {
    event.get("usage")?.get(key)?.as_u64()
}

fn trim_ascii(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if first.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if last.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(input: &str, cap: usize) -> ParsedOutput {
        let mut p = StreamParser::new(cap);
        p.feed(input.as_bytes());
        p.finish()
    }

    #[test]
    fn plain_text_is_kept_verbatim() {
        let out = parse("hello\nworld", 1024);
        assert_eq!(out.text, "hello\nworld");
        assert_eq!(out.result, None);
        assert!(!out.saw_events && !out.truncated);
    }

    #[test]
    fn claude_assistant_text_and_result_line() {
        let input = concat!(
            r#"{"type":"system","subtype":"init","session_id":"x"}"#,
            "\n",
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"Hi "},{"type":"tool_use","name":"Bash"},{"type":"text","text":"there"}]}}"#,
            "\n",
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"Done."}]}}"#,
            "\n",
            r#"{"type":"result","subtype":"success","is_error":false,"result":"Done.","total_cost_usd":0.25,"duration_ms":1200}"#,
            "\n"
        );
        let out = parse(input, 1024);
        assert_eq!(out.text, "Hi there\nDone.");
        assert_eq!(
            out.result,
            Some(ResultLine {
                text: "Done.".into(),
                cost_usd: Some(0.25),
                duration_ms: Some(1200),
                is_error: false,
                subtype: Some("success".into()),
                ..ResultLine::default()
            })
        );
        assert!(out.saw_events);
        assert_eq!(out.agent.session_id.as_deref(), Some("x"));
    }

    #[test]
    fn gemini_deltas_are_glued_and_user_messages_skipped() {
        let input = concat!(
            r#"{"type":"init","session_id":"s","model":"m"}"#,
            "\n",
            r#"{"type":"message","role":"user","content":"question"}"#,
            "\n",
            r#"{"type":"message","role":"assistant","content":"Hel","delta":true}"#,
            "\n",
            r#"{"type":"message","role":"assistant","content":"lo","delta":true}"#,
            "\n",
            r#"{"type":"result","status":"success","stats":{"duration_ms":77}}"#,
        );
        let out = parse(input, 1024);
        assert_eq!(out.text, "Hello");
        let result = out.result.unwrap();
        assert_eq!(result.duration_ms, Some(77));
        assert!(!result.is_error);
    }

    #[test]
    fn gemini_error_result_is_an_error_with_its_message() {
        let out = parse(
            r#"{"type":"result","status":"error","error":{"type":"api","message":"429 Too Many Requests"}}"#,
            1024,
        );
        let result = out.result.unwrap();
        assert!(result.is_error);
        assert_eq!(result.text, "429 Too Many Requests");
    }

    #[test]
    fn claude_error_result_with_errors_and_no_result() {
        // The shape of `--resume` with an unknown id and of exhausted
        // `--max-turns`: `errors[]` (strings or objects), no `result`.
        let out = parse(
            concat!(
                r#"{"type":"result","subtype":"error_during_execution","is_error":true,"num_turns":0,"session_id":"s1","total_cost_usd":0,"#,
                r#""errors":["No conversation found with session ID: s1",{"message":"second"},{"code":7}]}"#
            ),
            1024,
        );
        let r = out.result.unwrap();
        assert!(r.is_error);
        assert_eq!(r.subtype.as_deref(), Some("error_during_execution"));
        assert_eq!(
            r.error_message.as_deref(),
            Some(r#"No conversation found with session ID: s1; second; {"code":7}"#)
        );
        assert_eq!(r.text, r.error_message.clone().unwrap());
        assert_eq!(out.agent.session_id.as_deref(), Some("s1"));
    }

    #[test]
    fn claude_max_turns_without_any_message_is_still_an_error() {
        let r = parse(
            r#"{"type":"result","subtype":"error_max_turns","session_id":"s"}"#,
            1024,
        )
        .result
        .unwrap();
        assert!(r.is_error);
        assert_eq!(r.error_message, None);
        assert_eq!(r.subtype.as_deref(), Some("error_max_turns"));
    }

    #[test]
    fn claude_api_error_result_carries_status_and_type() {
        // As Claude Code 2.1 prints a model 429 (`subtype` says success).
        let out = parse(
            concat!(
                r#"{"type":"system","subtype":"init","session_id":"s2","model":"claude-opus-5-5"}"#,
                "\n",
                r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":429,"api_error_type":"rate_limit_error","#,
                r#""result":"API Error: Request rejected (429) · rate limit","session_id":"s2"}"#
            ),
            1024,
        );
        let r = out.result.unwrap();
        assert!(r.is_error);
        assert_eq!(r.api_error_status, Some(429));
        assert_eq!(r.error_type.as_deref(), Some("rate_limit_error"));
        assert_eq!(
            r.error_message.as_deref(),
            Some("API Error: Request rejected (429) · rate limit")
        );
        assert_eq!(out.agent.model.as_deref(), Some("claude-opus-5-5"));
        // A null status (success results carry `"api_error_status":null`) is none.
        let ok = parse(
            r#"{"type":"result","subtype":"success","is_error":false,"api_error_status":null,"result":"hi"}"#,
            1024,
        )
        .result
        .unwrap();
        assert_eq!(
            (ok.is_error, ok.api_error_status, ok.error_message),
            (false, None, None)
        );
    }

    #[test]
    fn gemini_quota_error_and_model_from_usage() {
        let out = parse(
            concat!(
                r#"{"type":"init","session_id":"g1","model":"auto"}"#,
                "\n",
                r#"{"type":"result","status":"error","error":{"type":"unknown","message":"[API Error: Resource has been exhausted (e.g. check quota).]"},"#,
                r#""stats":{"duration_ms":0,"models":{"gemini-2.5-flash":{}}}}"#
            ),
            1024,
        );
        let r = out.result.unwrap();
        assert!(r.is_error);
        assert_eq!(
            r.error_message.as_deref(),
            Some("[API Error: Resource has been exhausted (e.g. check quota).]")
        );
        // "unknown" says nothing: no type.
        assert_eq!(r.error_type, None);
        assert_eq!(out.agent.session_id.as_deref(), Some("g1"));
        assert_eq!(out.agent.model.as_deref(), Some("gemini-2.5-flash"));
    }

    #[test]
    fn error_message_is_bounded() {
        let long = "e".repeat(MAX_ERROR_MESSAGE * 3);
        let line = format!(r#"{{"type":"result","is_error":true,"errors":["{long}"]}}"#);
        let r = parse(&line, 1 << 20).result.unwrap();
        let message = r.error_message.unwrap();
        assert_eq!(message.chars().count(), MAX_ERROR_MESSAGE + 1);
        assert!(message.ends_with('…'));
    }

    #[test]
    fn cost_usd_is_accepted_when_total_cost_is_absent() {
        let out = parse(r#"{"type":"result","result":"x","cost_usd":0.5}"#, 1024);
        assert_eq!(out.result.unwrap().cost_usd, Some(0.5));
    }

    #[test]
    fn non_event_json_and_garbage_lines_are_plain_text() {
        let out = parse("{\"no_type\":1}\n{broken\n[1,2]\n", 1024);
        assert_eq!(out.text, "{\"no_type\":1}\n{broken\n[1,2]\n");
        assert!(!out.saw_events);
    }

    #[test]
    fn lines_split_across_chunks_are_reassembled() {
        let line = r#"{"type":"assistant","message":{"content":[{"type":"text","text":"héllo"}]}}"#;
        let bytes = format!("{line}\nplain\n");
        let mut p = StreamParser::new(1024);
        // One byte at a time, splitting the multi-byte character too.
        for b in bytes.as_bytes() {
            p.feed(std::slice::from_ref(b));
        }
        let out = p.finish();
        assert_eq!(out.text, "héllo\nplain\n");
    }

    #[test]
    fn text_is_capped_and_reported_truncated() {
        let out = parse(&"abcdefghij\n".repeat(10), 25);
        assert_eq!(out.text.len(), 25);
        assert!(out.truncated);
    }

    #[test]
    fn cap_never_splits_a_character() {
        let out = parse("ééééé", 3);
        assert!(out.text.len() <= 3, "{:?}", out.text);
        assert!(out.truncated);
    }

    #[test]
    fn result_line_after_the_cap_is_still_seen() {
        let mut input = "x".repeat(100);
        input.push('\n');
        input.push_str(r#"{"type":"result","result":"final"}"#);
        let out = parse(&input, 16);
        assert!(out.truncated);
        assert_eq!(out.result.unwrap().text, "final");
    }

    #[test]
    fn overlong_line_becomes_plain_text_and_parsing_resumes() {
        let mut p = StreamParser::with_caps(64, 64);
        let long = format!(
            "{{\"type\":\"assistant\",\"text\":\"{}\"}}",
            "y".repeat(200)
        );
        p.feed(long.as_bytes());
        p.feed(b"\n");
        p.feed(br#"{"type":"result","result":"ok"}"#);
        p.feed(b"\n");
        let out = p.finish();
        assert!(out.truncated);
        assert!(out.text.starts_with("{\"type\":\"assistant\""));
        assert_eq!(out.text.len(), 64);
        assert_eq!(out.result.unwrap().text, "ok");
    }

    const CODEX_OK: &str = concat!(
        "{\"type\":\"thread.started\",\"thread_id\":\"019a-thread\"}\n",
        "{\"type\":\"turn.started\"}\n",
        "{\"type\":\"item.completed\",\"item\":{\"id\":\"item_0\",\"type\":\"error\",\"message\":\"Model metadata for `gpt-5` not found\"}}\n",
        "{\"type\":\"item.started\",\"item\":{\"id\":\"item_1\",\"type\":\"command_execution\",\"command\":\"ls\",\"status\":\"in_progress\"}}\n",
        "{\"type\":\"item.completed\",\"item\":{\"id\":\"item_1\",\"type\":\"command_execution\",\"command\":\"ls\",\"aggregated_output\":\"a\\n\",\"exit_code\":0}}\n",
        "{\"type\":\"item.completed\",\"item\":{\"id\":\"item_2\",\"type\":\"reasoning\",\"text\":\"thinking\"}}\n",
        "{\"type\":\"item.completed\",\"item\":{\"id\":\"item_3\",\"type\":\"agent_message\",\"text\":\"the answer\"}}\n",
        "{\"type\":\"item.completed\",\"item\":{\"id\":\"item_4\",\"type\":\"future_kind\",\"text\":\"ignored\"}}\n",
        "{\"type\":\"future.event\",\"x\":1}\n",
        "{\"type\":\"turn.completed\",\"usage\":{\"input_tokens\":120,\"cached_input_tokens\":0,\"output_tokens\":7}}\n",
    );

    #[test]
    fn codex_answer_thread_and_usage() {
        let out = parse(CODEX_OK, 1024);
        assert_eq!(out.text, "the answer");
        assert_eq!(out.agent.session_id.as_deref(), Some("019a-thread"));
        let result = out.result.expect("turn.completed is the result");
        assert!(!result.is_error, "a warning item does not fail the turn");
        assert_eq!(result.error_message, None);
        assert_eq!(
            (result.input_tokens, result.output_tokens),
            (Some(120), Some(7))
        );
    }

    #[test]
    fn codex_failed_turn_and_error_event_carry_the_message() {
        let failed = parse(
            "{\"type\":\"thread.started\",\"thread_id\":\"t\"}\n{\"type\":\"turn.started\"}\n\
             {\"type\":\"error\",\"message\":\"Reconnecting... 1/5\"}\n\
             {\"type\":\"turn.failed\",\"error\":{\"message\":\"unexpected status 429 Too Many Requests: Rate limit reached\"}}\n",
            1024,
        );
        let r = failed.result.unwrap();
        assert!(r.is_error);
        assert_eq!(
            r.error_message.as_deref(),
            Some("unexpected status 429 Too Many Requests: Rate limit reached")
        );
        let error_only = parse(
            "{\"type\":\"error\",\"message\":\"stream disconnected\"}\n",
            1024,
        );
        assert_eq!(
            error_only.result.unwrap().error_message.as_deref(),
            Some("stream disconnected")
        );
        // An error after the turn completed is not the turn's.
        let late = parse(
            "{\"type\":\"turn.completed\",\"usage\":{}}\n{\"type\":\"error\",\"message\":\"late\"}\n",
            1024,
        );
        assert!(!late.result.unwrap().is_error);
    }
}
