//! Result classification: turns a `RunOutcome` into the HTTP status, the
//! `status`/`code` strings and the response text a client sees.
//!
//! Pure and total: no I/O, no clock, every outcome maps to exactly one row of
//! the table below. It does not know about queues (a 409 "cancelled before
//! start" or a 429 "queue full" is the executor's) or about JSON shapes (the
//! handlers build bodies from `Classified`).
//!
//! | outcome                                           | http | status    | code                 |
//! |---------------------------------------------------|------|-----------|----------------------|
//! | result line `is_error`, text mentions rate limit  | 429  | failed    | `rate_limited`       |
//! | result line `is_error`, anything else             | 502  | failed    | `agent_error`        |
//! | exit 0 / completed, with text                     | 200  | success   | —                    |
//! | exit 0 / completed, result line but no text       | 200  | success   | — (placeholder text) |
//! | exit 0 / completed, no result line, no text       | 502  | failed    | `empty_result`       |
//! | non-zero exit                                     | 500  | failed    | `nonzero_exit`       |
//! | killed by a signal agentd did not send            | 500  | failed    | `killed`             |
//! | timed out (agentd stopped it)                     | 504  | timeout   | `timeout`            |
//! | cancelled while running                           | 200  | cancelled | `cancelled`          |
//! | could not be spawned                              | 502  | failed    | `runtime_unavailable`|
//!
//! An `is_error` result line wins over the exit code: agent CLIs exit non-zero
//! when they report an error, and the result line says more than the code.

use crate::agent::runtime::{RunEnd, RunOutcome};

/// Response text for a clean run that produced result metadata but no text
/// (e.g. a skill with `context: fork` answers in its fork, not on stdout).
pub const NO_OUTPUT_PLACEHOLDER: &str = "(task completed with no direct output)";

/// Longest stderr tail, in characters, carried into a classified failure. The
/// runtime already caps stderr in bytes; this keeps API error bodies short.
pub const STDERR_TAIL_CHARS: usize = 4000;

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
        let detail = if result.text.trim().is_empty() {
            "the agent reported an error".to_owned()
        } else {
            result.text.clone()
        };
        if mentions_rate_limit(&result.text) {
            return failed(429, "rate_limited", detail);
        }
        return failed(502, "agent_error", detail);
    }

    if let RunEnd::Exited { code } = outcome.end {
        if code != 0 {
            return failed(
                500,
                "nonzero_exit",
                format!("the agent exited with code {code}"),
            );
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

/// "rate limit", "rate_limit" (as in `rate_limit_error`) or an HTTP 429.
fn mentions_rate_limit(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.contains("rate limit") || lower.contains("rate_limit") || lower.contains("429")
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
        }
    }

    fn result(text: &str, is_error: bool) -> Option<ResultLine> {
        Some(ResultLine {
            text: text.into(),
            cost_usd: Some(0.01),
            duration_ms: Some(10),
            is_error,
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
}
