//! Result classification: a runtime's outcome → HTTP status and `status`.
//! (Provisional: covers the in-process runtimes until the child-process
//! runtimes land.)

use super::runtime::{RunEnd, RunOutcome};

#[derive(Debug, Clone)]
pub struct Classified {
    pub http_status: u16,
    pub status: &'static str,
    pub code: Option<&'static str>,
    pub response: String,
    pub exit_code: Option<i32>,
    pub stderr_tail: Option<String>,
    pub message: Option<String>,
}

pub fn classify(outcome: &RunOutcome) -> Classified {
    let ok = |response: String| Classified {
        http_status: 200,
        status: "success",
        code: None,
        response,
        exit_code: None,
        stderr_tail: None,
        message: None,
    };
    match &outcome.end {
        RunEnd::Cancelled => Classified {
            status: "cancelled",
            ..ok(outcome.text.clone())
        },
        RunEnd::TimedOut => Classified {
            http_status: 504,
            status: "timeout",
            code: Some("timeout"),
            ..ok(outcome.text.clone())
        },
        _ => ok(outcome.text.clone()),
    }
}
