//! `/api/task` and `/api/executions/*`: headless tasks, the registry of running
//! and recently finished executions, output over Server-Sent Events (replayed
//! from the start or after `Last-Event-ID`, then live), and termination.

use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::answer::{finish_json, finish_response};
use super::http::{json as json_response, ApiError, Body};
use super::input::{json_body, required_text, timeout_field};
use crate::agent::executor::{Execution, Phase, Rejected, Submission};
use crate::agent::permissions::AnswerError;
use crate::agent::replay::{Batch, OutputReader};
use crate::agent::runtime::ExecutionKind;
use crate::app::App;
use crate::init::reaper::EXECUTION_SWEEP_BOUND;

/// SSE comment sent while nothing else is, so proxies keep the stream open.
pub const SSE_KEEPALIVE: Duration = Duration::from_secs(15);

/// Frames buffered between an SSE forwarder and its connection. The forwarder
/// reads the replay buffer at the client's pace, so this only smooths bursts;
/// a client that falls behind the replay buffer gets `event: dropped`.
const SSE_CONNECTION_BUFFER: usize = 16;

/// A client that accepts no frame for this long (its socket buffer stays
/// full) is closed, so a stuck reader cannot hold a subscriber slot for ever.
/// Four keepalive periods: a live client reads at least that often.
pub const SSE_CLIENT_STALL: Duration = Duration::from_secs(60);

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
        transcript: None,
    })?;
    if asynchronous {
        return Ok(json_response(
            StatusCode::ACCEPTED,
            &json!({"execution_id": exec.id, "status": "accepted"}),
        ));
    }
    let finish = exec.finished().await;
    Ok(finish_response(&exec, &finish, None))
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
    let pending = exec.ctx.permissions.pending();
    if !pending.is_empty() {
        v["pending_permissions"] = json!(pending);
    }
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
    // An ACP agent gets one grace to honour `session/cancel` before the
    // two-signal escalation.
    let bound = rt.kill_grace * 3
        + rt.pipe_drain
        + EXECUTION_SWEEP_BOUND
        + crate::agent::process::REAP_AFTER_KILL;
    if tokio::time::timeout(bound, exec.finished()).await.is_err() {
        return Err(ApiError::Unavailable(format!(
            "execution {id} did not stop within {bound:?}"
        )));
    }
    Ok(json_response(StatusCode::OK, &describe(&exec)))
}

/// `POST /api/executions/{id}/permissions/{request_id}` with
/// `{"option_id": "…"}`: answer a permission request the execution's ACP
/// agent is waiting on (`AGENTD_ACP_PERMISSIONS=ask`).
pub async fn answer_permission(
    app: &Arc<App>,
    id: &str,
    request_id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let exec = lookup(app, id)?;
    let obj = json_body(app, req).await?;
    let option = required_text(&obj, "option_id")?;
    match exec.ctx.permissions.answer(request_id, &option) {
        Ok(()) => Ok(json_response(
            StatusCode::OK,
            &json!({"execution_id": exec.id, "request_id": request_id, "option_id": option}),
        )),
        Err(e @ AnswerError::NoSuchRequest(_)) => Err(ApiError::NotFound(e.to_string())),
        Err(e @ AnswerError::NoSuchOption { .. }) => {
            Err(ApiError::bad(e.to_string(), "invalid_option"))
        }
    }
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

/// Format one output chunk as an SSE event: `id: <seq>`, `event: <name>` for
/// a typed event (plain output has none, so it is a `message`), then a
/// `data:` line per line of text (a client joins them with `\n`, restoring
/// the chunk).
fn sse_chunk(seq: u64, event: Option<&str>, text: &str) -> Bytes {
    let mut out = String::with_capacity(text.len() + 48);
    out.push_str("id: ");
    out.push_str(&seq.to_string());
    out.push('\n');
    if let Some(event) = event {
        out.push_str("event: ");
        out.push_str(event);
        out.push('\n');
    }
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

/// The `Last-Event-ID` a reconnecting client sends: the id of the last event
/// it got. Absent means "from the start".
fn last_event_id(headers: &HeaderMap) -> Result<u64, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(0);
    };
    let text = value.to_str().unwrap_or("").trim();
    if text.is_empty() {
        return Ok(0);
    }
    text.parse().map_err(|_| {
        ApiError::bad(
            format!("Last-Event-ID must be an event id this stream sent (a non-negative integer), not {text:?}"),
            "invalid_header",
        )
    })
}

/// `GET /api/executions/{id}/stream`: the execution's output from its start
/// (or after `Last-Event-ID`) out of its replay buffer, then live, then
/// `event: end`. See the README for the protocol.
pub fn stream(app: &Arc<App>, id: &str, headers: &HeaderMap) -> Result<Response<Body>, ApiError> {
    let exec = lookup(app, id)?;
    let after = last_event_id(headers)?;
    // The client already got `end` (its id is one past the last chunk's):
    // 204 tells an EventSource to stop reconnecting.
    if exec.phase() == Phase::Finished && after > exec.ctx.output.last_seq() {
        let mut resp = Response::new(crate::server::http::full(Bytes::new()));
        *resp.status_mut() = StatusCode::NO_CONTENT;
        return Ok(resp);
    }
    let cap = app.executor.config().max_subscribers;
    if exec.subscribers.fetch_add(1, Relaxed) >= cap {
        exec.subscribers.fetch_sub(1, Relaxed);
        return Err(ApiError::TooManyRequests {
            message: format!("execution {id} already has {cap} stream subscribers"),
            retry_after_s: 1,
        });
    }
    let slot = SubscriberSlot(exec.clone());
    let output = exec.ctx.output.subscribe_after(after);
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

/// Hands frames to the connection; a client that accepts none for
/// `SSE_CLIENT_STALL` is closed.
struct Frames(mpsc::Sender<Bytes>);

impl Frames {
    /// False when the client is gone or stalled: stop forwarding.
    async fn send(&self, frame: Bytes) -> bool {
        matches!(
            tokio::time::timeout(SSE_CLIENT_STALL, self.0.send(frame)).await,
            Ok(Ok(()))
        )
    }

    /// `event: dropped` when chunks were evicted before this subscriber got
    /// them, then the chunks, in order.
    async fn batch(&self, batch: Batch) -> bool {
        if batch.missed > 0
            && !self
                .send(sse_event(
                    "dropped",
                    &json!({"missed_events": batch.missed}),
                ))
                .await
        {
            return false;
        }
        for chunk in batch.chunks {
            if !self
                .send(sse_chunk(chunk.seq, chunk.event, &chunk.text))
                .await
            {
                return false;
            }
        }
        true
    }
}

async fn forward(
    slot: SubscriberSlot,
    mut output: OutputReader,
    mut phase: tokio::sync::watch::Receiver<Phase>,
    tx: mpsc::Sender<Bytes>,
) {
    let exec = slot.0.clone();
    let frames = Frames(tx);
    let mut keepalive = tokio::time::interval(SSE_KEEPALIVE);
    keepalive.tick().await;
    loop {
        tokio::select! {
            biased;
            batch = output.next_batch() => {
                if !frames.batch(batch).await {
                    return;
                }
            }
            _ = async { phase.wait_for(|p| *p == Phase::Finished).await.map(|_| ()) } => {
                // Every chunk was pushed before the phase flipped: drain them.
                loop {
                    let batch = output.try_batch();
                    if batch.is_empty() {
                        break;
                    }
                    if !frames.batch(batch).await {
                        return;
                    }
                }
                break;
            }
            _ = keepalive.tick() => {
                if !frames.send(Bytes::from_static(b": keepalive\n\n")).await {
                    return;
                }
            }
        }
    }
    let end = exec
        .finish()
        .map(|f| finish_json(&exec, &f).1)
        .unwrap_or_else(|| json!({"execution_id": exec.id, "status": "unknown"}));
    let end_id = exec.ctx.output.last_seq() + 1;
    let mut frame = format!("id: {end_id}\n").into_bytes();
    frame.extend_from_slice(&sse_event("end", &end));
    let _ = frames.send(Bytes::from(frame)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_chunk_has_an_id_and_prefixes_every_line() {
        assert_eq!(
            &sse_chunk(1, None, "a\nb")[..],
            b"id: 1\ndata: a\ndata: b\n\n"
        );
        assert_eq!(
            &sse_chunk(7, None, "x\r\n")[..],
            b"id: 7\ndata: x\ndata: \n\n"
        );
        assert_eq!(
            &sse_chunk(8, Some("tool_call"), "{}")[..],
            b"id: 8\nevent: tool_call\ndata: {}\n\n"
        );
    }

    #[test]
    fn last_event_id_is_a_number_or_absent() {
        let mut h = HeaderMap::new();
        assert_eq!(last_event_id(&h).unwrap(), 0);
        h.insert("last-event-id", HeaderValue::from_static(" 42 "));
        assert_eq!(last_event_id(&h).unwrap(), 42);
        h.insert("last-event-id", HeaderValue::from_static("abc"));
        let err = last_event_id(&h).unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert!(err.to_string().contains("Last-Event-ID"), "{err}");
    }
}
