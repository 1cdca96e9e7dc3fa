//! `/api/*` handlers: chat, history, sessions. Input is validated before
//! anything changes; bad input gets a 4xx that names the problem. Session ids
//! are normalised here (UUID spellings, see `agent::sessions`), and a chat's
//! resume-vs-new decision is read from the store, never from the in-memory
//! history.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::answer::{finish_response, usage_json};
use super::http::{json as json_response, ApiError, Body};
use super::input::{json_body, optional_string, required_text, timeout_field};
use crate::agent::executor::{Finish, Submission};
use crate::agent::history::{Message, Role};
use crate::agent::runtime::{ExecutionKind, TranscriptSource};
use crate::agent::sessions::{normalise_session_id, CliSession, MAX_SESSION_ID_LEN};
use crate::app::App;
use crate::clock::unix_now;
use crate::store::CliSessionRecord;

/// Session used when a chat names none.
pub const DEFAULT_SESSION: &str = "default";

/// Most messages one history request returns.
const MAX_HISTORY_PAGE: usize = 10_000;

pub fn valid_session_id(s: &str) -> bool {
    normalise_session_id(s).is_some()
}

fn session_error(s: &str) -> ApiError {
    ApiError::bad(
        format!(
            "invalid session_id {s:?}: use 1-{MAX_SESSION_ID_LEN} characters from A-Z a-z 0-9 - _ . : or a UUID"
        ),
        "invalid_session_id",
    )
}

/// The canonical session id, or the 400 naming what was sent.
fn session_key(s: &str) -> Result<String, ApiError> {
    normalise_session_id(s).ok_or_else(|| session_error(s))
}

/// Query parameters as pairs; an undecodable query is a 400.
fn query<B>(req: &Request<B>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// `?session_id=`: absent → `None`; empty → `None` when `empty_means_all`
/// (reading), else a 400 (deleting: an empty value must not mean "every
/// session"); otherwise the canonical id.
fn query_session<B>(req: &Request<B>, empty_means_all: bool) -> Result<Option<String>, ApiError> {
    match query(req).into_iter().find(|(k, _)| k == "session_id") {
        None => Ok(None),
        Some((_, v)) if v.is_empty() && empty_means_all => Ok(None),
        Some((_, v)) if v.is_empty() => Err(ApiError::bad(
            "`session_id` is empty: name a session, or leave the parameter out to delete every session's history",
            "invalid_session_id",
        )),
        Some((_, v)) => session_key(&v).map(Some),
    }
}

/// `POST /api/chat`
pub async fn chat(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let obj = json_body(app, req).await?;
    let message = required_text(&obj, "message")?;
    let session_id = match optional_string(&obj, "session_id")? {
        None => DEFAULT_SESSION.to_owned(),
        Some(s) => session_key(&s)?,
    };
    let timeout = timeout_field(&obj, app)?;
    let runtime = app.runtime().name();
    let mut cli_session = if app.runtime().keeps_sessions() {
        Some(
            app.store
                .cli_session(session_id.clone(), runtime.to_owned())
                .await?,
        )
    } else {
        None
    };
    let asked_at = unix_now();
    let asked = Instant::now();
    // Read only if the runtime finds its agent lost context.
    let transcript = cli_session.is_some().then(|| {
        let store = app.store.clone();
        let session_id = session_id.clone();
        TranscriptSource::new(move |max_bytes| {
            let store = store.clone();
            let session_id = session_id.clone();
            Box::pin(async move { store.transcript(session_id, max_bytes).await.ok() })
        })
    });
    let submit = |cli_session: Option<CliSession>, timeout: Duration| {
        app.executor.submit(Submission {
            kind: ExecutionKind::Chat,
            session_id: session_id.clone(),
            prompt: message.clone(),
            timeout,
            cli_session,
            transcript: transcript.clone(),
        })
    };
    let mut exec = submit(cli_session.clone(), timeout)?;
    let mut finish = exec.finished().await;
    // The turn ran in a new CLI session although the store had one.
    let mut moved = false;
    let refused = matches!(&finish, Finish::Ran { outcome, .. } if outcome.agent.session_refused);
    let left = timeout.saturating_sub(asked.elapsed());
    if let (true, Some(old)) = (refused && !left.is_zero(), &cli_session) {
        // The CLI can neither create nor resume the session the store names:
        // without a new one, every later turn of this session would fail too.
        let fresh = app
            .store
            .next_cli_session(session_id.clone(), runtime.to_owned())
            .await?;
        tracing::warn!(
            session_id = %session_id,
            refused = %old.id,
            fresh = %fresh.id,
            "the agent CLI refuses to create or resume its session; the turn runs in a new CLI session"
        );
        moved = old.exists;
        cli_session = Some(fresh.clone());
        exec = submit(Some(fresh), left)?;
        finish = exec.finished().await;
    }
    let Finish::Ran {
        outcome,
        classified,
        duration_ms,
    } = &finish
    else {
        return Ok(finish_response(&exec, &finish, Some(&session_id)));
    };
    if classified.status != "success" {
        // Nothing is recorded for a chat that did not succeed: it was not
        // acknowledged.
        return Ok(finish_response(&exec, &finish, Some(&session_id)));
    }
    let response = classified.response.clone();
    app.record_turn(
        vec![
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
        ],
        cli_session.map(|c| CliSessionRecord {
            runtime: runtime.to_owned(),
            cli_session_id: c.id,
            session_id: session_id.clone(),
            agent_session_id: outcome.agent.session_id.clone(),
            // A turn moved to a new CLI session starts its count over.
            turns: if moved {
                Some(1)
            } else {
                outcome.agent.session_turns
            },
        }),
    )
    .await?;
    let cost = outcome.result.as_ref().and_then(|r| r.cost_usd);
    let session_restarted = moved || outcome.agent.session_restarted;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "execution_id": exec.id,
            "session_id": session_id,
            "response": response,
            "metadata": {
                "duration_ms": duration_ms,
                "cost_usd": cost,
                "agent_session_id": outcome.agent.session_id,
                // The same id where clients of the original agent server
                // read it: that server passed the CLI's result fields
                // (`session_id`, as Claude Code names it) through.
                "session_id": outcome.agent.session_id,
                "model": outcome.agent.model,
                // The CLI had lost this session's context and the turn ran
                // in a fresh CLI session: earlier turns are not in the answer.
                "session_restarted": session_restarted,
                // How agentd gave the context back to an agent that had
                // lost it: "transcript" (its own record of the session, sent
                // with the prompt), or null.
                "session_restored": outcome.agent.session_restored.then_some("transcript"),
                "usage": usage_json(outcome),
            },
        }),
    ))
}

/// `GET /api/chat/history?session_id=&limit=`
pub async fn history(app: &Arc<App>, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let session = query_session(req, true)?;
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

/// `DELETE /api/chat/history[?session_id=]`: one session's history, or with
/// no parameter every session's; the next turn starts a new CLI session.
pub async fn clear_history(
    app: &Arc<App>,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let session = query_session(req, false)?;
    let (cleared, deleted) = app.clear_history(session.as_deref()).await?;
    // What the runtime holds of the deleted conversations in memory (a warm
    // ACP agent's context) goes too, so it cannot come back.
    app.runtime().session_cleared(session.as_deref());
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
        assert!(valid_session_id("{123E4567-E89B-12D3-A456-426614174000}"));
    }

    fn req(uri: &str) -> Request<()> {
        Request::builder().uri(uri).body(()).unwrap()
    }

    #[test]
    fn an_empty_session_id_deletes_nothing() {
        let err = query_session(&req("/api/chat/history?session_id="), false).unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            query_session(&req("/api/chat/history?session_id="), true).unwrap(),
            None
        );
        assert_eq!(
            query_session(&req("/api/chat/history"), false).unwrap(),
            None
        );
        assert_eq!(
            query_session(
                &req("/api/chat/history?session_id=urn:uuid:123E4567-E89B-12D3-A456-426614174000"),
                false
            )
            .unwrap()
            .as_deref(),
            Some("123e4567-e89b-12d3-a456-426614174000")
        );
    }
}
