//! `/api/task` and `/api/executions/*`: headless tasks, the registry of running
//! and recently finished executions, live output over Server-Sent Events, and
//! termination.

use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};

use super::api::{json_body, required_text, timeout_field};
use super::http::{json as json_response, ApiError, Body};
use crate::agent::executor::{Execution, Finish, Phase, Rejected, Submission};
use crate::agent::runtime::ExecutionKind;
use crate::app::App;

/// SSE comment sent while nothing else is, so proxies keep the stream open.
pub const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

/// Frames buffered between an SSE forwarder and its connection; a client that
/// lets this fill falls behind the broadcast buffer and is dropped.
const SSE_CONNECTION_BUFFER: usize = 16;

impl From<Rejected> for ApiError {
    fn from(r: Rejected) -> Self {
        match r {
            Rejected::QueueFull { .. } => ApiError::TooManyRequests {
                message: r.to_string(),
                retry_after_s: 1,
            },
            Rejected::ShuttingDown => ApiError::Unavailable(r.to_string()),
        }
    }
}

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
                    "model": outcome.agent.model,
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
            let status =
                StatusCode::from_u16(c.http_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            (status, body)
        }
    }
}

/// `POST /api/task`
pub async fn task(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let obj = json_body(app, req).await?;
    let prompt = required_text(&obj, "prompt")?;
    let timeout = timeout_field(&obj, app)?;
    let asynchronous = match obj.get("async") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("`async` must be a boolean", "invalid_field")),
    };
    let exec = app.executor.submit(Submission {
        kind: ExecutionKind::Task,
        session_id: format!("task-{}", uuid::Uuid::new_v4()),
        prompt,
        timeout,
        cli_session: None,
    })?;
    if asynchronous {
        return Ok(json_response(
            StatusCode::ACCEPTED,
            &json!({"execution_id": exec.id, "status": "accepted"}),
        ));
    }
    let finish = exec.finished().await;
    Ok(super::api::finish_response(&exec, &finish, None))
}

/// `GET /api/executions/running`
pub fn running(app: &Arc<App>) -> Response<Body> {
    let active = app.executor.active();
    let running: Vec<Value> = active
        .iter()
        .filter(|e| e.phase() == Phase::Running)
        .map(|e| {
            json!({
                "execution_id": e.id,
                "pid": e.pid(),
                "started_at": e.started_at(),
                "kind": e.kind.as_str(),
                "session_id": e.session_id,
            })
        })
        .collect();
    let queued = active.len() - running.len();
    json_response(
        StatusCode::OK,
        &json!({"executions": running, "queued": queued}),
    )
}

fn describe(exec: &Execution) -> Value {
    let mut v = json!({
        "execution_id": exec.id,
        "kind": exec.kind.as_str(),
        "session_id": exec.session_id,
        "created_at": exec.created_at,
        "started_at": exec.started_at(),
        "finished_at": exec.finished_at(),
        "pid": exec.pid(),
    });
    match exec.finish() {
        None => v["status"] = json!(exec.phase()),
        Some(finish) => {
            let (code, result) = finish_json(exec, &finish);
            v["status"] = result["status"].clone();
            v["http_status"] = json!(code.as_u16());
            v["result"] = result;
        }
    }
    v
}

fn lookup(app: &App, id: &str) -> Result<Arc<Execution>, ApiError> {
    app.executor
        .get(id)
        .ok_or_else(|| ApiError::NotFound(format!("execution {id}")))
}

/// `GET /api/executions/{id}`
pub fn get(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    let exec = lookup(app, id)?;
    Ok(json_response(StatusCode::OK, &describe(&exec)))
}

/// `POST /api/executions/{id}/terminate`: cancel, wait (bounded by the kill
/// escalation), answer with the final status.
pub async fn terminate(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    let exec = lookup(app, id)?;
    exec.cancel();
    let rt = &app.config.runtime;
    let bound = rt.kill_grace * 2 + rt.pipe_drain + Duration::from_secs(5);
    if tokio::time::timeout(bound, exec.finished()).await.is_err() {
        return Err(ApiError::Unavailable(format!(
            "execution {id} did not stop within {bound:?}"
        )));
    }
    Ok(json_response(StatusCode::OK, &describe(&exec)))
}

/// A response body fed by a channel: the SSE forwarder task writes frames, the
/// connection reads them. Dropping the connection drops the receiver, which
/// ends the forwarder.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// Format text as one SSE event (`data:` per line).
fn sse_data(text: &str) -> Bytes {
    let mut out = String::with_capacity(text.len() + 16);
    for line in text.split('\n') {
        out.push_str("data: ");
        out.push_str(line.strip_suffix('\r').unwrap_or(line));
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

fn sse_event(event: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// Releases the subscriber slot however the forwarder ends.
struct SubscriberSlot(Arc<Execution>);

impl Drop for SubscriberSlot {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Relaxed);
    }
}

/// `GET /api/executions/{id}/stream`
pub fn stream(app: &Arc<App>, id: &str) -> Result<Response<Body>, ApiError> {
    let exec = lookup(app, id)?;
    let cap = app.executor.config().max_subscribers;
    if exec.subscribers.fetch_add(1, Relaxed) >= cap {
        exec.subscribers.fetch_sub(1, Relaxed);
        return Err(ApiError::TooManyRequests {
            message: format!("execution {id} already has {cap} stream subscribers"),
            retry_after_s: 1,
        });
    }
    let slot = SubscriberSlot(exec.clone());
    // Subscribe before checking the phase, so no output between the check and
    // the subscription is missed.
    let output = exec.ctx.output.subscribe();
    let phase = exec.subscribe_phase();
    let (tx, rx) = mpsc::channel(SSE_CONNECTION_BUFFER);
    tokio::spawn(forward(slot, output, phase, tx));
    let mut resp = Response::new(ChannelBody(rx).boxed());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

async fn forward(
    slot: SubscriberSlot,
    mut output: broadcast::Receiver<String>,
    mut phase: tokio::sync::watch::Receiver<Phase>,
    tx: mpsc::Sender<Bytes>,
) {
    let exec = slot.0.clone();
    let mut keepalive = tokio::time::interval(SSE_KEEPALIVE);
    keepalive.tick().await;
    loop {
        tokio::select! {
            biased;
            chunk = output.recv() => match chunk {
                Ok(text) => {
                    if tx.send(sse_data(&text)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let _ = tx.try_send(sse_event("dropped", &json!({"reason": "subscriber too slow", "missed": n})));
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = async { phase.wait_for(|p| *p == Phase::Finished).await.map(|_| ()) } => {
                // Drain what was produced before the end.
                while let Ok(text) = output.try_recv() {
                    if tx.send(sse_data(&text)).await.is_err() {
                        return;
                    }
                }
                break;
            }
            _ = keepalive.tick() => {
                if tx.send(Bytes::from_static(b": keepalive\n\n")).await.is_err() {
                    return;
                }
            }
        }
    }
    let end = exec
        .finish()
        .map(|f| finish_json(&exec, &f).1)
        .unwrap_or_else(|| json!({"execution_id": exec.id, "status": "unknown"}));
    let _ = tx.send(sse_event("end", &end)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_data_prefixes_every_line() {
        assert_eq!(&sse_data("a\nb")[..], b"data: a\ndata: b\n\n");
        assert_eq!(&sse_data("x\r\n")[..], b"data: x\ndata: \n\n");
    }
}
