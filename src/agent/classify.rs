//! Result classification: turns a `RunOutcome` into the HTTP status, the
//! `status`/`code` strings and the response text a client sees.
//!
//! Pure and total: no I/O, no clock, every outcome maps to exactly one row of
//! the table below. It does not know about queues (a 409 "cancelled before
//! start" or a 429 "queue full" is the executor's) or about JSON shapes (the
//! handlers build bodies from `Classified`).
//!
//! | outcome                                                  | http | status    | code                 |
//! |----------------------------------------------------------|------|-----------|----------------------|
//! | result line is an error with a rate-limit/quota sign     | 429  | failed    | `rate_limited`       |
//! | result line is an error, anything else                   | 502  | failed    | `agent_error`        |
//! | exit 0 / completed, with text                            | 200  | success   | —                    |
//! | exit 0 / completed, result line but no text              | 200  | success   | — (placeholder text) |
//! | exit 0 / completed, no result line, no text              | 502  | failed    | `empty_result`       |
//! | non-zero exit, stderr has a rate-limit/quota sign        | 429  | failed    | `rate_limited`       |
//! | non-zero exit                                            | 500  | failed    | `nonzero_exit`       |
//! | killed by a signal agentd did not send                   | 500  | failed    | `killed`             |
//! | timed out (agentd stopped it)                            | 504  | timeout   | `timeout`            |
//! | cancelled while running                                  | 200  | cancelled | `cancelled`          |
//! | could not be spawned                                     | 502  | failed    | `runtime_unavailable`|
//!
//! A rate-limit/quota sign is any of: model API status 429 or 529
//! (`api_error_status`), an error type or text naming `rate_limit`,
//! "rate limit", `overloaded_error`, `RESOURCE_EXHAUSTED`, "Resource has been
//! exhausted", "too many requests", "quota" (but not "disk quota"), or 429 as a
//! word. `Retry-After` is set when the agent's message names a delay
//! ("retry in 56s", "retry after 30 seconds", `"retryDelay": "17s"`).
//!
//! An error result line wins over the exit code: agent CLIs exit non-zero
//! when they report an error, and the result line says more than the code.
//! `message` carries the agent's own words (its error result, or the last
//! lines of its stderr), bounded to `streamjson::MAX_ERROR_MESSAGE`.

use crate::agent::runtime::{RunEnd, RunOutcome};
use crate::agent::streamjson::MAX_ERROR_MESSAGE;

/// Response text for a clean run that produced result metadata but no text
/// (e.g. a skill with `context: fork` answers in its fork, not on stdout).
pub const NO_OUTPUT_PLACEHOLDER: &str = "(task completed with no direct output)";

/// Longest stderr tail, in characters, carried into a classified failure. The
/// runtime already caps stderr in bytes; this keeps API error bodies short.
pub const STDERR_TAIL_CHARS: usize = 4000;

/// Lines of stderr quoted in the message of a failed exit: an agent's fatal
/// error is one or two lines at the end (stack frames are skipped).
const STDERR_MESSAGE_LINES: usize = 3;

/// What a client is told about one execution.
#[derive(Debug, Clone, PartialEq)]
pub struct Classified {
    pub http_status: u16,
    /// `success`, `failed`, `timeout` or `cancelled`.
    pub status: &'static str,
    /// Machine-readable reason for anything but success.
    pub code: Option<&'static str>,
    /// The answer (or whatever partial output exists).
    pub response: String,
    pub exit_code: Option<i32>,
    /// The end of stderr, for failures only (a successful agent's stderr is
    /// progress noise, not something to return).
    pub stderr_tail: Option<String>,
    /// One sentence a person reads.
    pub message: Option<String>,
    /// Seconds a client should wait before retrying (`Retry-After`), when a
    /// rate-limited agent named a delay.
    pub retry_after_s: Option<u64>,
}

/// Classify one outcome; see the module table.
pub fn classify(outcome: &RunOutcome) -> Classified {
    let response = response_text(outcome);
    let exit_code = match outcome.end {
        RunEnd::Exited { code } => Some(code),
        _ => None,
    };
    let stderr_tail = stderr_tail(&outcome.stderr_tail);
    let failed = |http_status, code, message: String| Classified {
        http_status,
        status: "failed",
        code: Some(code),
        response: response.clone(),
        exit_code,
        stderr_tail: stderr_tail.clone(),
        message: Some(message),
        retry_after_s: None,
    };

    match &outcome.end {
        RunEnd::TimedOut => {
            return Classified {
                http_status: 504,
                status: "timeout",
                code: Some("timeout"),
                response,
                exit_code,
                stderr_tail,
                message: Some("the execution timed out and was stopped".into()),
                retry_after_s: None,
            }
        }
        RunEnd::Cancelled => {
            return Classified {
                http_status: 200,
                status: "cancelled",
                code: Some("cancelled"),
                response,
                exit_code,
                stderr_tail: None,
                message: Some("the execution was cancelled".into()),
                retry_after_s: None,
            }
        }
        RunEnd::SpawnFailed { command, reason } => {
            let message = if reason == "not found" {
                format!("runtime command not found: {command}")
            } else {
                format!("runtime command {command} could not be started: {reason}")
            };
            return failed(502, "runtime_unavailable", message);
        }
        RunEnd::Signaled { signal } => {
            return failed(
                500,
                "killed",
                format!(
                    "the agent was killed by signal {signal} ({})",
                    signal_name(*signal)
                ),
            );
        }
        RunEnd::Completed | RunEnd::Exited { .. } => {}
    }

    if let Some(result) = outcome.result.as_ref().filter(|r| r.is_error) {
        let detail = match (&result.error_message, &result.subtype) {
            (Some(message), _) => message.clone(),
            (None, Some(subtype)) => format!("the agent reported an error ({subtype})"),
            (None, None) => "the agent reported an error".to_owned(),
        };
        let signs = format!(
            "{}\n{}",
            result.error_type.as_deref().unwrap_or_default(),
            detail
        );
        if rate_limited(result.api_error_status, &signs) {
            let mut c = failed(429, "rate_limited", detail.clone());
            c.retry_after_s = retry_after(&detail);
            return c;
        }
        return failed(502, "agent_error", detail);
    }

    if let RunEnd::Exited { code } = outcome.end {
        if code != 0 {
            let said = stderr_message(&outcome.stderr_tail);
            let message = match &said {
                Some(said) => format!("the agent exited with code {code}: {said}"),
                None => format!("the agent exited with code {code}"),
            };
            if let Some(said) = said.filter(|s| rate_limited(None, s)) {
                let mut c = failed(429, "rate_limited", message);
                c.retry_after_s = retry_after(&said);
                return c;
            }
            return failed(500, "nonzero_exit", message);
        }
    }

    if !response.trim().is_empty() {
        return Classified {
            http_status: 200,
            status: "success",
            code: None,
            response,
            exit_code,
            stderr_tail: None,
            message: None,
            retry_after_s: None,
        };
    }
    if outcome.result.is_some() {
        return Classified {
            http_status: 200,
            status: "success",
            code: None,
            response: NO_OUTPUT_PLACEHOLDER.to_owned(),
            exit_code,
            stderr_tail: None,
            message: None,
            retry_after_s: None,
        };
    }
    failed(
        502,
        "empty_result",
        "the agent exited cleanly but produced no output and no result".into(),
    )
}

/// The result line's text is the agent's final answer; without one, the
/// accumulated assistant text (or plain stdout) is.
fn response_text(outcome: &RunOutcome) -> String {
    match &outcome.result {
        Some(result) if !result.text.trim().is_empty() => result.text.clone(),
        _ => outcome.text.clone(),
    }
}

fn stderr_tail(stderr: &str) -> Option<String> {
    let trimmed = stderr.trim_end();
    if trimmed.is_empty() {
        return None;
    }
    let count = trimmed.chars().count();
    Some(if count > STDERR_TAIL_CHARS {
        trimmed.chars().skip(count - STDERR_TAIL_CHARS).collect()
    } else {
        trimmed.to_owned()
    })
}

/// The module table's rate-limit/quota signs, in a model API status or in
/// text (an error type, the agent's message, stderr).
fn rate_limited(api_status: Option<u16>, text: &str) -> bool {
    if matches!(api_status, Some(429 | 529)) {
        return true;
    }
    let lower = text.to_ascii_lowercase();
    const SIGNS: &[&str] = &[
        "rate limit",
        "rate_limit",
        "overloaded_error",
        "resource_exhausted",
        "resource has been exhausted",
        "too many requests",
    ];
    SIGNS.iter().any(|s| lower.contains(s))
        || lower.replace("disk quota", "").contains("quota")
        || has_word(&lower, "429")
}

/// `word` in `text` with no alphanumeric character on either side.
fn has_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    })
}

/// Longest `Retry-After` derived from an agent's message: a larger number is
/// more likely a misread than a real delay.
const MAX_RETRY_AFTER_S: u64 = 24 * 3600;

/// The delay a message asks for: the first number within a few characters
/// after "retry" (`retry in 56.3s`, `retry after 30 seconds`,
/// `"retryDelay": "17s"`, `Retry-After: 5`, `retry in 2 minutes`), rounded up
/// to whole seconds.
fn retry_after(message: &str) -> Option<u64> {
    let lower = message.to_ascii_lowercase();
    for (i, _) in lower.match_indices("retry") {
        let window: String = lower[i + 5..].chars().take(24).collect();
        let Some(start) = window.find(|c: char| c.is_ascii_digit()) else {
            continue;
        };
        let rest = &window[start..];
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let Ok(n) = rest[..end].parse::<f64>() else {
            continue;
        };
        let unit = rest[end..].trim_start_matches([' ', '"']);
        let seconds = if unit.starts_with("ms") {
            n / 1000.0
        } else if unit.starts_with("min") || unit.starts_with("m ") || unit == "m" {
            n * 60.0
        } else if unit.starts_with('h') {
            n * 3600.0
        } else {
            n
        };
        return Some((seconds.ceil() as u64).clamp(1, MAX_RETRY_AFTER_S));
    }
    None
}

/// The agent's own last words on stderr: its last few lines that are not stack
/// frames or blank, joined, bounded to `MAX_ERROR_MESSAGE` characters.
fn stderr_message(stderr: &str) -> Option<String> {
    let plain = strip_ansi(stderr);
    let lines: Vec<&str> = plain
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("at ") && *l != "}" && *l != "{")
        .collect();
    let last = &lines[lines.len().saturating_sub(STDERR_MESSAGE_LINES)..];
    let joined = last.join(" ");
    if joined.is_empty() {
        return None;
    }
    let count = joined.chars().count();
    Some(if count > MAX_ERROR_MESSAGE {
        let tail: String = joined.chars().skip(count - MAX_ERROR_MESSAGE).collect();
        format!("…{tail}")
    } else {
        joined
    })
}

/// Text without ANSI escape sequences (`ESC [ … letter`): CLIs colour their
/// fatal errors even when stderr is a pipe.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.clone().next() == Some('[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        }
    }
    out
}

fn signal_name(signal: i32) -> &'static str {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str())
        .unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::runtime::ResultLine;

    fn outcome(end: RunEnd, text: &str, result: Option<ResultLine>) -> RunOutcome {
        RunOutcome {
            end,
            text: text.into(),
            result,
            stderr_tail: "some stderr\n".into(),
            stdout_truncated: false,
            stderr_truncated: false,
            agent: Default::default(),
            cleanup: Default::default(),
        }
    }

    fn result(text: &str, is_error: bool) -> Option<ResultLine> {
        Some(ResultLine {
            text: text.into(),
            cost_usd: Some(0.01),
            duration_ms: Some(10),
            is_error,
            error_message: is_error.then(|| text.to_owned()),
            ..ResultLine::default()
        })
    }

    #[test]
    fn exit_zero_with_text_is_success() {
        let c = classify(&outcome(RunEnd::Exited { code: 0 }, "hello", None));
        assert_eq!((c.http_status, c.status, c.code), (200, "success", None));
        assert_eq!(c.response, "hello");
        assert_eq!(c.exit_code, Some(0));
        assert_eq!(c.stderr_tail, None);
    }

    #[test]
    fn completed_with_text_is_success() {
        let c = classify(&RunOutcome::completed("echoed".into()));
        assert_eq!((c.http_status, c.status), (200, "success"));
        assert_eq!(c.response, "echoed");
        assert_eq!(c.exit_code, None);
    }

    #[test]
    fn result_text_is_preferred_over_accumulated_text() {
        let c = classify(&outcome(
            RunEnd::Exited { code: 0 },
            "thinking...\nfinal",
            result("final", false),
        ));
        assert_eq!(c.response, "final");
    }

    #[test]
    fn result_line_without_text_is_success_with_placeholder() {
        let c = classify(&outcome(
            RunEnd::Exited { code: 0 },
            "  \n",
            result("", false),
        ));
        assert_eq!((c.http_status, c.status, c.code), (200, "success", None));
        assert_eq!(c.response, NO_OUTPUT_PLACEHOLDER);
    }

    #[test]
    fn exit_zero_without_result_or_output_is_empty_result() {
        let c = classify(&outcome(RunEnd::Exited { code: 0 }, "", None));
        assert_eq!(
            (c.http_status, c.status, c.code),
            (502, "failed", Some("empty_result"))
        );
        assert!(c.message.is_some());
    }

    #[test]
    fn nonzero_exit_carries_code_and_stderr_tail() {
        let c = classify(&outcome(RunEnd::Exited { code: 3 }, "partial", None));
        assert_eq!(
            (c.http_status, c.status, c.code),
            (500, "failed", Some("nonzero_exit"))
        );
        assert_eq!(c.exit_code, Some(3));
        assert_eq!(c.stderr_tail.as_deref(), Some("some stderr"));
        assert!(c.message.unwrap().contains("code 3"));
    }

    #[test]
    fn foreign_signal_is_killed() {
        let c = classify(&outcome(RunEnd::Signaled { signal: 9 }, "", None));
        assert_eq!(
            (c.http_status, c.status, c.code),
            (500, "failed", Some("killed"))
        );
        assert!(c.message.unwrap().contains("SIGKILL"));
    }

    #[test]
    fn timed_out_is_504_timeout() {
        let c = classify(&outcome(RunEnd::TimedOut, "partial", None));
        assert_eq!(
            (c.http_status, c.status, c.code),
            (504, "timeout", Some("timeout"))
        );
        assert_eq!(c.response, "partial");
        assert_eq!(c.stderr_tail.as_deref(), Some("some stderr"));
    }

    #[test]
    fn cancelled_is_200_cancelled() {
        let c = classify(&outcome(RunEnd::Cancelled, "", None));
        assert_eq!(
            (c.http_status, c.status, c.code),
            (200, "cancelled", Some("cancelled"))
        );
    }

    #[test]
    fn rate_limit_error_is_429() {
        for text in [
            "Claude AI usage limit: Rate Limit reached",
            "API Error: {\"type\":\"rate_limit_error\"}",
            "HTTP 429 Too Many Requests",
        ] {
            // Agent CLIs exit 1 when they report an error: the result wins.
            let c = classify(&outcome(RunEnd::Exited { code: 1 }, "", result(text, true)));
            assert_eq!(
                (c.http_status, c.status, c.code),
                (429, "failed", Some("rate_limited")),
                "{text}"
            );
            assert_eq!(c.message.as_deref(), Some(text));
        }
    }

    #[test]
    fn other_agent_error_is_502() {
        let c = classify(&outcome(
            RunEnd::Exited { code: 0 },
            "",
            result("max turns reached", true),
        ));
        assert_eq!(
            (c.http_status, c.status, c.code),
            (502, "failed", Some("agent_error"))
        );
        assert_eq!(c.message.as_deref(), Some("max turns reached"));
    }

    #[test]
    fn missing_command_is_runtime_unavailable_naming_it() {
        let c = classify(&outcome(
            RunEnd::SpawnFailed {
                command: "claude".into(),
                reason: "not found".into(),
            },
            "",
            None,
        ));
        assert_eq!(
            (c.http_status, c.status, c.code),
            (502, "failed", Some("runtime_unavailable"))
        );
        assert_eq!(
            c.message.as_deref(),
            Some("runtime command not found: claude")
        );

        let c = classify(&outcome(
            RunEnd::SpawnFailed {
                command: "./agent".into(),
                reason: "permission denied".into(),
            },
            "",
            None,
        ));
        assert_eq!(c.code, Some("runtime_unavailable"));
        assert!(c.message.unwrap().contains("./agent"));
    }

    #[test]
    fn stderr_tail_keeps_the_end() {
        let mut o = outcome(RunEnd::Exited { code: 1 }, "", None);
        o.stderr_tail = format!("{}END", "x".repeat(STDERR_TAIL_CHARS * 2));
        let tail = classify(&o).stderr_tail.unwrap();
        assert_eq!(tail.chars().count(), STDERR_TAIL_CHARS);
        assert!(tail.ends_with("END"));
    }

    fn error_result(
        message: Option<&str>,
        status: Option<u16>,
        kind: Option<&str>,
    ) -> Option<ResultLine> {
        Some(ResultLine {
            is_error: true,
            error_message: message.map(str::to_owned),
            api_error_status: status,
            error_type: kind.map(str::to_owned),
            ..ResultLine::default()
        })
    }

    #[test]
    fn rate_limit_and_quota_rows() {
        // (message, api status, error type) → 429, one row per sign in the table.
        let rows: &[(Option<&str>, Option<u16>, Option<&str>)] = &[
            (Some("API Error: Request rejected"), Some(429), None),
            (Some("API Error: 529"), Some(529), Some("overloaded_error")),
            (Some("Overloaded"), None, Some("overloaded_error")),
            (None, None, Some("rate_limit_error")),
            (
                Some("API Error: {\"type\":\"rate_limit_error\"}"),
                None,
                None,
            ),
            (
                Some("Claude AI usage limit: Rate Limit reached"),
                None,
                None,
            ),
            (
                Some("[API Error: Resource has been exhausted (e.g. check quota).]"),
                None,
                None,
            ),
            (Some("status: RESOURCE_EXHAUSTED"), None, None),
            (Some("You exceeded your current quota"), None, None),
            (Some("HTTP 429 Too Many Requests"), None, None),
            (Some("got 429"), None, None),
        ];
        for (message, status, kind) in rows {
            let c = classify(&outcome(
                RunEnd::Exited { code: 1 },
                "",
                error_result(*message, *status, *kind),
            ));
            assert_eq!(
                (c.http_status, c.status, c.code),
                (429, "failed", Some("rate_limited")),
                "{message:?} {status:?} {kind:?}"
            );
        }
    }

    #[test]
    fn look_alikes_are_not_rate_limits() {
        for message in [
            "Disk quota exceeded",
            "processed 4290 files",
            "API Error: 500 Internal server error",
        ] {
            let c = classify(&outcome(
                RunEnd::Exited { code: 1 },
                "",
                error_result(Some(message), Some(500), None),
            ));
            assert_eq!(c.code, Some("agent_error"), "{message}");
            assert_eq!(c.http_status, 502);
            assert_eq!(c.message.as_deref(), Some(message));
        }
    }

    #[test]
    fn error_result_without_message_names_its_subtype() {
        let mut r = error_result(None, None, None).unwrap();
        r.subtype = Some("error_max_turns".into());
        let c = classify(&outcome(RunEnd::Exited { code: 1 }, "", Some(r)));
        assert_eq!(c.code, Some("agent_error"));
        assert_eq!(
            c.message.as_deref(),
            Some("the agent reported an error (error_max_turns)")
        );
    }

    #[test]
    fn retry_after_is_read_from_the_message() {
        for (message, seconds) in [
            ("Quota exceeded. Please retry in 56.3s.", Some(57)),
            ("rate limit: retry after 30 seconds", Some(30)),
            ("RESOURCE_EXHAUSTED \"retryDelay\": \"17s\"", Some(17)),
            ("429, Retry-After: 5", Some(5)),
            ("rate limit, retry in 2 minutes", Some(120)),
            ("rate limit, retry in 250ms", Some(1)),
            ("rate limit reached", None),
        ] {
            let c = classify(&outcome(
                RunEnd::Exited { code: 1 },
                "",
                error_result(Some(message), None, None),
            ));
            assert_eq!(c.code, Some("rate_limited"), "{message}");
            assert_eq!(c.retry_after_s, seconds, "{message}");
        }
    }

    #[test]
    fn nonzero_exit_quotes_the_agents_last_stderr_lines() {
        let mut o = outcome(RunEnd::Exited { code: 41 }, "", None);
        o.stderr_tail = "Warning: 256-color support not detected.\nWhen using Gemini API, you must specify the GEMINI_API_KEY environment variable.\n    at main (file:///x.js:1:2)\n".into();
        let c = classify(&o);
        assert_eq!(c.code, Some("nonzero_exit"));
        let message = c.message.unwrap();
        assert!(
            message.starts_with("the agent exited with code 41: "),
            "{message}"
        );
        assert!(message.contains("GEMINI_API_KEY"), "{message}");
        assert!(!message.contains("at main"), "{message}");

        let mut o = outcome(RunEnd::Exited { code: 55 }, "", None);
        o.stderr_tail =
            "\u{1b}[31mGemini CLI is not running in a trusted directory.\u{1b}[0m\n".into();
        assert_eq!(
            classify(&o).message.as_deref(),
            Some(
                "the agent exited with code 55: Gemini CLI is not running in a trusted directory."
            )
        );
    }

    #[test]
    fn nonzero_exit_with_a_quota_error_on_stderr_is_429() {
        let mut o = outcome(RunEnd::Exited { code: 173 }, "", None);
        o.stderr_tail =
            "Error: Resource has been exhausted (e.g. check quota). Please retry in 12s.\n".into();
        let c = classify(&o);
        assert_eq!((c.http_status, c.code), (429, Some("rate_limited")));
        assert_eq!(c.retry_after_s, Some(12));
        assert_eq!(c.exit_code, Some(173));
    }

    #[test]
    fn stderr_message_is_bounded() {
        let mut o = outcome(RunEnd::Exited { code: 2 }, "", None);
        o.stderr_tail = format!("{}END", "x".repeat(MAX_ERROR_MESSAGE * 2));
        let message = classify(&o).message.unwrap();
        assert!(message.ends_with("END"));
        assert!(
            message.chars().count() <= MAX_ERROR_MESSAGE + 40,
            "{}",
            message.len()
        );
    }
}
