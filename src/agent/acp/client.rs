//! The client side of the protocol: the connection to one agent (the SDK's
//! dispatch loop over its stdin and stdout) and agentd's handlers in it.
//! Each ACP session's `session/update`s go to the turn running in it (text
//! to the output and the answer, tool calls, plans and thoughts as typed
//! events) or, while the session is being loaded, to the count of its
//! replay; `session/request_permission` is answered by the policy or held
//! for a client (`ask`).
//!
//! Must not: wait in the dispatch loop (a handler only pushes, or spawns a
//! task that waits); let an update reach a turn that is not running; know
//! the pool, a process's supervision or what a turn decides (it sits below
//! `agent_proc` and `turn`, above `options` and `replay_count`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use acp::v1::schema::{
    ContentBlock, PermissionOptionKind, RequestPermissionOutcome, RequestPermissionRequest,
    RequestPermissionResponse, SelectedPermissionOutcome, SessionNotification, SessionUpdate,
};
use acp::v1::ConnectionTo;
use acp::Agent;
use agent_client_protocol as acp;
use futures::{SinkExt, StreamExt};
use tokio::process::{ChildStdin, ChildStdout};
use tokio::sync::oneshot;
use tokio_util::codec::{FramedRead, FramedWrite, LinesCodec};
use tokio_util::sync::CancellationToken;

use super::options::PermissionPolicy;
use super::replay_count::ReplayCount;
use crate::agent::permissions::{PermissionChoice, Permissions};
use crate::agent::replay::OutputLog;
use crate::clock::now_unix_ms;

/// Longest JSON text of one typed event (a tool call, plan or permission
/// request) put in the replay buffer; a larger one is replaced by a stub
/// naming its kind and size.
pub const MAX_EVENT_BYTES: usize = 64 << 10;

/// The connection to agent `id`: the SDK's dispatch loop, with agentd's
/// handlers routing what the agent sends to `routes`. `cx_tx` gets the
/// connection once it is up; the loop runs until `done` is cancelled or the
/// agent's side of it closes. The transport is built here, at once; the
/// loop runs when the returned future is polled (in a task of its own).
pub(super) fn connect(
    id: u64,
    stdin: ChildStdin,
    stdout: ChildStdout,
    max_line: usize,
    routes: Arc<Routes>,
    cx_tx: oneshot::Sender<ConnectionTo<Agent>>,
    done: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    let outgoing =
        SinkExt::<String>::sink_map_err(FramedWrite::new(stdin, LinesCodec::new()), |e| {
            std::io::Error::other(e.to_string())
        });
    let incoming = FramedRead::new(stdout, LinesCodec::new_with_max_length(max_line))
        .map(|line| line.map_err(|e| std::io::Error::other(e.to_string())));
    let transport = acp::Lines::new(outgoing, incoming);
    let notes = routes.clone();
    let asks = routes;
    async move {
        let result = acp::Client
            .v1()
            .on_receive_notification(
                async move |n: SessionNotification, _cx| {
                    notes.update(n);
                    Ok(())
                },
                acp::on_receive_notification!(),
            )
            .on_receive_request(
                async move |r: RequestPermissionRequest, responder, _cx| {
                    asks.permission(r, responder);
                    Ok(())
                },
                acp::on_receive_request!(),
            )
            .connect_with(transport, async move |cx: ConnectionTo<Agent>| {
                let _ = cx_tx.send(cx);
                done.cancelled().await;
                Ok(())
            })
            .await;
        if let Err(e) = result {
            tracing::debug!(agent = id, error = %e, "ACP connection ended");
        }
    }
}

/// An SDK error as one line: its message, and its data when there is any
/// (Gemini CLI puts the model API's error there).
pub(super) fn rpc_error_text(e: &acp::Error) -> String {
    match &e.data {
        Some(serde_json::Value::String(s)) => format!("{} ({})", e.message, s),
        Some(v) if !v.is_null() => format!("{} ({v})", e.message),
        _ => e.message.clone(),
    }
}

/// Removes a turn's route when the turn ends, however it ends.
pub(super) struct RouteGuard<'a> {
    pub(super) routes: &'a Routes,
    pub(super) session: &'a str,
    pub(super) sink: &'a Arc<TurnSink>,
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        self.sink.ended.cancel();
        self.routes.remove(self.session);
    }
}

/// The turn each ACP session's updates go to, and the replays being
/// counted for sessions being loaded.
#[derive(Default)]
pub(super) struct Routes {
    turns: Mutex<HashMap<String, Arc<TurnSink>>>,
    replays: Mutex<HashMap<String, Arc<ReplayCount>>>,
}

impl Routes {
    pub(super) fn count_replay(&self, session: &str, count: Arc<ReplayCount>) {
        self.replays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(session.to_owned(), count);
    }

    fn stop_counting(&self, session: &str) {
        self.replays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(session);
    }

    fn replay(&self, session: &str) -> Option<Arc<ReplayCount>> {
        self.replays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(session)
            .cloned()
    }

    pub(super) fn insert(&self, session: &str, sink: Arc<TurnSink>) {
        self.turns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(session.to_owned(), sink);
    }

    fn remove(&self, session: &str) {
        self.turns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(session);
    }

    fn get(&self, session: &str) -> Option<Arc<TurnSink>> {
        self.turns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(session)
            .cloned()
    }

    /// A `session/update`: text to the output, tool calls, plans and
    /// thoughts as typed events. Runs in the SDK's dispatch loop; never waits.
    fn update(&self, n: SessionNotification) {
        let Some(sink) = self.get(&n.session_id.0) else {
            // No turn runs in the session: a `session/load` replay, counted
            // when the session is being loaded, else dropped.
            if let Some(count) = self.replay(&n.session_id.0) {
                count.see(&n.update);
            }
            return;
        };
        let event = match &n.update {
            SessionUpdate::AgentMessageChunk(chunk) => {
                if let ContentBlock::Text(t) = &chunk.content {
                    sink.push_text(&t.text);
                }
                return;
            }
            SessionUpdate::AgentThoughtChunk(_) => "thought",
            SessionUpdate::ToolCall(_) => "tool_call",
            SessionUpdate::ToolCallUpdate(_) => "tool_call_update",
            SessionUpdate::Plan(_) => "plan",
            _ => return,
        };
        sink.output.push_event(event, event_json(event, &n.update));
    }

    /// A `session/request_permission`, answered by the policy or, with
    /// `ask`, by a client. Never waits in the dispatch loop.
    fn permission(
        &self,
        r: RequestPermissionRequest,
        responder: acp::Responder<RequestPermissionResponse, acp::V1>,
    ) {
        let Some(sink) = self.get(&r.session_id.0) else {
            // No turn runs in that session: nobody could have asked for this.
            let _ = responder.respond(RequestPermissionResponse::new(
                RequestPermissionOutcome::Cancelled,
            ));
            return;
        };
        let choices = choices(&r);
        let tool_call = serde_json::to_value(&r.tool_call).unwrap_or_default();
        let title = r.tool_call.fields.title.clone().unwrap_or_default();
        let reject = pick(
            &r,
            &[
                PermissionOptionKind::RejectOnce,
                PermissionOptionKind::RejectAlways,
            ],
        );
        let allow = pick(
            &r,
            &[
                PermissionOptionKind::AllowOnce,
                PermissionOptionKind::AllowAlways,
            ],
        );
        match sink.policy {
            PermissionPolicy::Deny => {
                let _ = responder.respond(RequestPermissionResponse::new(log_decision(
                    &sink,
                    &title,
                    reject,
                    "policy deny",
                )));
            }
            PermissionPolicy::Allow => {
                let _ = responder.respond(RequestPermissionResponse::new(log_decision(
                    &sink,
                    &title,
                    allow,
                    "policy allow",
                )));
            }
            PermissionPolicy::Ask => ask_client(sink, title, tool_call, choices, reject, responder),
        }
    }
}

/// A permission request's options, as a client is shown them.
fn choices(r: &RequestPermissionRequest) -> Vec<PermissionChoice> {
    r.options
        .iter()
        .map(|o| PermissionChoice {
            option_id: o.option_id.0.to_string(),
            name: o.name.clone(),
            kind: kind_name(&o.kind).into(),
        })
        .collect()
}

/// The id of the request's first option of the first of `kinds` it offers.
fn pick(r: &RequestPermissionRequest, kinds: &[PermissionOptionKind]) -> Option<String> {
    kinds.iter().find_map(|k| {
        r.options
            .iter()
            .find(|o| o.kind == *k)
            .map(|o| o.option_id.0.to_string())
    })
}

/// `ask`: hold the request on the execution for a client to answer, in a
/// task of its own (the dispatch loop goes on); refused with `reject` when
/// too many are pending or nobody answers within the timeout, cancelled
/// when the turn ends first.
fn ask_client(
    sink: Arc<TurnSink>,
    title: String,
    tool_call: serde_json::Value,
    choices: Vec<PermissionChoice>,
    reject: Option<String>,
    responder: acp::Responder<RequestPermissionResponse, acp::V1>,
) {
    let Some((pending, answer)) = sink.permissions.ask(tool_call, choices, now_unix_ms()) else {
        let _ = responder.respond(RequestPermissionResponse::new(log_decision(
            &sink,
            &title,
            reject,
            "too many pending requests",
        )));
        return;
    };
    sink.output.push_event(
        "permission",
        serde_json::to_string(&pending).unwrap_or_default(),
    );
    tracing::info!(execution_id = %sink.execution_id, request_id = %pending.request_id, tool = %title, "ACP permission request waits for a client");
    let wait = sink.permission_timeout;
    tokio::spawn(async move {
        let outcome = tokio::select! {
            chosen = answer => match chosen {
                Ok(id) => log_decision(&sink, &title, Some(id), "client"),
                Err(_) => log_decision(&sink, &title, None, "withdrawn"),
            },
            _ = tokio::time::sleep(wait) => {
                sink.permissions.withdraw(&pending.request_id);
                log_decision(&sink, &title, reject, "timeout")
            }
            _ = sink.ended.cancelled() => {
                sink.permissions.withdraw(&pending.request_id);
                log_decision(&sink, &title, None, "turn ended")
            }
        };
        let _ = responder.respond(RequestPermissionResponse::new(outcome));
    });
}

/// Stops counting a session's replay when the load is over, however it ends.
pub(super) struct ReplayGuard<'a> {
    pub(super) routes: &'a Routes,
    pub(super) session: &'a str,
}

impl Drop for ReplayGuard<'_> {
    fn drop(&mut self) {
        self.routes.stop_counting(self.session);
    }
}

fn log_decision(
    sink: &TurnSink,
    title: &str,
    option: Option<String>,
    by: &str,
) -> RequestPermissionOutcome {
    tracing::info!(
        execution_id = %sink.execution_id,
        tool = %title,
        decision = option.as_deref().unwrap_or("cancelled"),
        by,
        "ACP permission request answered"
    );
    sink.output.push_event(
        "permission_decision",
        serde_json::json!({"option_id": option, "by": by, "tool": title}).to_string(),
    );
    match option {
        Some(id) => RequestPermissionOutcome::Selected(SelectedPermissionOutcome::new(id)),
        None => RequestPermissionOutcome::Cancelled,
    }
}

fn kind_name(kind: &PermissionOptionKind) -> &'static str {
    match kind {
        PermissionOptionKind::AllowOnce => "allow_once",
        PermissionOptionKind::AllowAlways => "allow_always",
        PermissionOptionKind::RejectOnce => "reject_once",
        PermissionOptionKind::RejectAlways => "reject_always",
        _ => "other",
    }
}

/// A typed event's JSON, bounded by `MAX_EVENT_BYTES`.
fn event_json(event: &str, update: &SessionUpdate) -> String {
    let json = serde_json::to_string(update).unwrap_or_default();
    if json.len() <= MAX_EVENT_BYTES {
        return json;
    }
    serde_json::json!({"sessionUpdate": event, "truncated": true, "bytes": json.len()}).to_string()
}

/// Where one turn's updates go.
pub(super) struct TurnSink {
    pub(super) execution_id: String,
    pub(super) output: Arc<OutputLog>,
    pub(super) text: Mutex<TextAcc>,
    pub(super) permissions: Arc<Permissions>,
    pub(super) policy: PermissionPolicy,
    pub(super) permission_timeout: Duration,
    /// Cancelled when the turn ends or is being cancelled: pending
    /// permission requests are then answered `cancelled`.
    pub(super) ended: CancellationToken,
}

impl TurnSink {
    fn push_text(&self, text: &str) {
        self.output.push(text);
        self.text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(text);
    }

    pub(super) fn text(&self) -> String {
        self.text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .text
            .clone()
    }

    pub(super) fn truncated(&self) -> bool {
        self.text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .truncated
    }
}

/// A turn's answer text, bounded.
pub(super) struct TextAcc {
    text: String,
    cap: usize,
    truncated: bool,
}

impl TextAcc {
    pub(super) fn new(cap: usize) -> Self {
        TextAcc {
            text: String::new(),
            cap,
            truncated: false,
        }
    }

    fn push(&mut self, s: &str) {
        let room = self.cap.saturating_sub(self.text.len());
        if s.len() <= room {
            self.text.push_str(s);
            return;
        }
        let mut end = room;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.text.push_str(&s[..end]);
        self.truncated = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_bounded_on_a_character_boundary() {
        let mut t = TextAcc::new(5);
        t.push("abc");
        t.push("dé"); // 'é' is two bytes: only "d" fits
        assert_eq!(t.text, "abcd");
        assert!(t.truncated);
    }
}
