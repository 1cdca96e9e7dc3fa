//! `/api/*` handlers: chat, history, sessions. Input is validated before
//! anything changes; bad input gets a 4xx that names the problem.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};

use super::executions::finish_json;
use super::http::{json as json_response, parse_json_object, read_body, ApiError, Body};
use crate::agent::executor::{Finish, Submission};
use crate::agent::history::{Message, Role};
use crate::agent::runtime::ExecutionKind;
use crate::app::{unix_now, App};

/// Session used when a chat names none.
pub const DEFAULT_SESSION: &str = "default";

/// Longest accepted session id.
const MAX_SESSION_ID_LEN: usize = 128;

/// Most messages one history request returns.
const MAX_HISTORY_PAGE: usize = 10_000;

pub fn valid_session_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SESSION_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

fn session_error(s: &str) -> ApiError {
    ApiError::bad(
        format!(
            "invalid session_id {s:?}: use 1-{MAX_SESSION_ID_LEN} characters from A-Z a-z 0-9 - _ . :"
        ),
        "invalid_session_id",
    )
}

/// Query parameters as pairs; an undecodable query is a 400.
fn query<B>(req: &Request<B>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

fn query_session<B>(req: &Request<B>) -> Result<Option<String>, ApiError> {
    match query(req).into_iter().find(|(k, _)| k == "session_id") {
        None => Ok(None),
        Some((_, v)) if v.is_empty() => Ok(None),
        Some((_, v)) if valid_session_id(&v) => Ok(Some(v)),
        Some((_, v)) => Err(session_error(&v)),
    }
}

fn optional_string(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ApiError::bad(
            format!("`{field}` must be a string, got {}", type_name(other)),
            "invalid_field",
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `timeout_s`: a positive number of seconds up to the configured maximum.
pub fn timeout_field(obj: &Map<String, Value>, app: &App) -> Result<Duration, ApiError> {
    let max = app.config.runtime.max_timeout;
    match obj.get("timeout_s") {
        None | Some(Value::Null) => Ok(app.config.runtime.default_timeout),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(s) if s > 0.0 && s <= max.as_secs_f64() => Ok(Duration::from_secs_f64(s)),
            _ => Err(ApiError::bad(
                format!(
                    "`timeout_s` must be a number of seconds above 0 and at most {}",
                    max.as_secs()
                ),
                "invalid_field",
            )),
        },
        Some(other) => Err(ApiError::bad(
            format!("`timeout_s` must be a number, got {}", type_name(other)),
            "invalid_field",
        )),
    }
}

/// The required, non-empty text field `field` of a request body.
pub fn required_text(obj: &Map<String, Value>, field: &str) -> Result<String, ApiError> {
    match optional_string(obj, field)? {
        None => Err(ApiError::bad(
            format!("`{field}` is required"),
            "missing_field",
        )),
        Some(s) if s.trim().is_empty() => Err(ApiError::bad(
            format!("`{field}` must not be empty"),
            "empty_field",
        )),
        Some(s) => Ok(s),
    }
}

pub async fn json_body(app: &App, req: Request<Incoming>) -> Result<Map<String, Value>, ApiError> {
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bytes = read_body(req.into_body(), declared, app.config.max_body_bytes).await?;
    parse_json_object(&bytes)
}

/// `POST /api/chat`
pub async fn chat(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let obj = json_body(app, req).await?;
    let message = required_text(&obj, "message")?;
    let session_id = match optional_string(&obj, "session_id")? {
        None => DEFAULT_SESSION.to_owned(),
        Some(s) if valid_session_id(&s) => s,
        Some(s) => return Err(session_error(&s)),
    };
    let timeout = timeout_field(&obj, app)?;
    let resume = app.runtime().name() == "claude-code" && app.session_seen(&session_id).await;
    let asked_at = unix_now();
    let exec = app.executor.submit(Submission {
        kind: ExecutionKind::Chat,
        session_id: session_id.clone(),
        prompt: message.clone(),
        timeout,
        resume,
    })?;
    let finish = exec.finished().await;
    let Finish::Ran {
        outcome,
        classified,
        duration_ms,
    } = &finish
    else {
        let (status, mut body) = finish_json(&exec, &finish);
        body["session_id"] = json!(session_id);
        return Ok(json_response(status, &body));
    };
    if classified.status != "success" {
        // Nothing is recorded for a chat that did not succeed: it was not
        // acknowledged.
        let (status, mut body) = finish_json(&exec, &finish);
        body["session_id"] = json!(session_id);
        return Ok(json_response(status, &body));
    }
    let response = classified.response.clone();
    app.record(vec![
        Message {
            role: Role::User,
            content: message,
            timestamp: asked_at,
            session_id: session_id.clone(),
        },
        Message {
            role: Role::Assistant,
            content: response.clone(),
            timestamp: unix_now(),
            session_id: session_id.clone(),
        },
    ])
    .await?;
    let cost = outcome.result.as_ref().and_then(|r| r.cost_usd);
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "execution_id": exec.id,
            "session_id": session_id,
            "response": response,
            "metadata": {
                "duration_ms": duration_ms,
                "cost_usd": cost,
            },
        }),
    ))
}

/// `GET /api/chat/history?session_id=&limit=`
pub async fn history(app: &Arc<App>, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let session = query_session(req)?;
    let limit = match query(req).into_iter().find(|(k, _)| k == "limit") {
        None => MAX_HISTORY_PAGE,
        Some((_, v)) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_HISTORY_PAGE).contains(&n) => n,
            _ => {
                return Err(ApiError::bad(
                    format!(
                        "invalid limit {v:?}: expected an integer from 1 to {MAX_HISTORY_PAGE}"
                    ),
                    "invalid_query",
                ))
            }
        },
    };
    let (messages, size, cap) = {
        let state = app.state.lock().await;
        (
            state.history.recent(session.as_deref(), limit),
            state.history.len(),
            state.history.limit(),
        )
    };
    Ok(json_response(
        StatusCode::OK,
        &json!({"messages": messages, "size": size, "limit": cap}),
    ))
}

/// `DELETE /api/chat/history[?session_id=]`
pub async fn clear_history(
    app: &Arc<App>,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let session = query_session(req)?;
    let (cleared, deleted) = app.clear_history(session.as_deref()).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"cleared": cleared, "deleted": deleted, "session_id": session}),
    ))
}

/// `GET /api/chat/session`
pub async fn sessions(app: &Arc<App>) -> Result<Response<Body>, ApiError> {
    let summary = app.store.sessions().await?;
    let (size, limit) = app.history_gauges();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "sessions": summary.sessions,
            "total_messages": summary.total_messages,
            "total_sessions": summary.total_sessions,
            "history_size": size,
            "history_limit": limit,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_restricted() {
        assert!(valid_session_id("default"));
        assert!(valid_session_id("a1b2-c3_d.e:f"));
        assert!(!valid_session_id(""));
        assert!(!valid_session_id("has space"));
        assert!(!valid_session_id("../etc"));
        assert!(!valid_session_id(&"x".repeat(129)));
    }
}
