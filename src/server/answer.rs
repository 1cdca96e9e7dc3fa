//! The JSON answer of a finished execution, shared by the chat and task
//! handlers (`api`, `executions`): its status, body, metadata (duration,
//! cost, the agent's session id, model, usage) and what agentd cleaned up.
//!
//! Below both handler files, so neither imports the other.

use http::{Response, StatusCode};
use serde_json::{json, Value};

use super::http::{json as json_response, Body};
use crate::agent::executor::{Execution, Finish};
use crate::agent::runtime::{Cleanup, RunOutcome};

/// The JSON answer for a finished execution, and its HTTP status.
pub fn finish_json(exec: &Execution, finish: &Finish) -> (StatusCode, Value) {
    match finish {
        Finish::CancelledBeforeStart => (
            StatusCode::CONFLICT,
            json!({
                "execution_id": exec.id,
                "status": "cancelled",
                "response": null,
                "error": {"code": "cancelled_before_start", "message": "cancelled before it started"},
            }),
        ),
        Finish::Ran {
            outcome,
            classified: c,
            duration_ms,
        } => {
            let mut body = json!({
                "execution_id": exec.id,
                "status": c.status,
                "response": c.response,
                "metadata": {
                    "duration_ms": outcome.result.as_ref().and_then(|r| r.duration_ms).unwrap_or(*duration_ms),
                    "wall_ms": duration_ms,
                    "cost_usd": outcome.result.as_ref().and_then(|r| r.cost_usd),
                    "exit_code": c.exit_code,
                    "stdout_truncated": outcome.stdout_truncated,
                    "stderr_truncated": outcome.stderr_truncated,
                    "agent_session_id": outcome.agent.session_id,
                    // The agent's session id where clients of the original
                    // agent server read it, as for chats; the execution's
                    // own id is `execution_id`.
                    "session_id": outcome.agent.session_id,
                    "model": outcome.agent.model,
                    "usage": usage_json(outcome),
                },
            });
            if let Some(code) = c.code {
                body["error"] =
                    json!({"code": code, "message": c.message.clone().unwrap_or_default()});
                if let Some(seconds) = c.retry_after_s {
                    body["error"]["retry_after_s"] = json!(seconds);
                }
            }
            if let Some(tail) = &c.stderr_tail {
                body["stderr_tail"] = json!(tail);
            }
            if outcome.cleanup.acted() {
                body["cleanup"] = cleanup_json(&outcome.cleanup);
            }
            let status =
                StatusCode::from_u16(c.http_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, body)
        }
    }
}

/// What agentd had to stop or kill to end the execution: the signal that
/// stopped the agent (by name) and the leftovers killed and reaped.
fn cleanup_json(c: &Cleanup) -> Value {
    let signal = c.stopped_with.map(|s| {
        nix::sys::signal::Signal::try_from(s)
            .map(|s| s.as_str().to_owned())
            .unwrap_or_else(|_| s.to_string())
    });
    json!({
        "stopped_with": signal,
        "group_killed": c.group_killed,
        "escapees_killed": c.escapees_killed,
        "survivors": c.survivors,
    })
}

/// The response for a finished execution: `finish_json`'s status and body,
/// plus `Retry-After` when a rate-limited agent named a delay.
pub fn finish_response(
    exec: &Execution,
    finish: &Finish,
    session_id: Option<&str>,
) -> Response<Body> {
    let (status, mut body) = finish_json(exec, finish);
    if let Some(session_id) = session_id {
        body["session_id"] = json!(session_id);
    }
    let mut resp = json_response(status, &body);
    if let Finish::Ran { classified, .. } = finish {
        if let Some(seconds) = classified.retry_after_s {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
        }
    }
    resp
}

/// `{"input_tokens", "output_tokens"}` when the CLI reported them, else null.
pub fn usage_json(outcome: &RunOutcome) -> Value {
    match outcome.result.as_ref() {
        Some(r) if r.input_tokens.is_some() || r.output_tokens.is_some() => {
            json!({"input_tokens": r.input_tokens, "output_tokens": r.output_tokens})
        }
        _ => Value::Null,
    }
}
