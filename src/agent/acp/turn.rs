//! One turn on an acquired agent: opening the ACP session it runs in (warm,
//! `session/load` of the recorded one, or `session/new`), the memory check
//! (the turns a load replayed against those the store recorded) and, when
//! the agent lost context, agentd's transcript given back with the prompt;
//! the prompt itself, its cancel (`session/cancel`, then stopping an agent
//! that does not answer), and the outcome.
//!
//! Must not: acquire or release processes, or know the pool (it gets the
//! settings and its agent); wait on anything but within the turn's
//! deadline, its cancel or the agent's exit; touch the store (the
//! transcript comes through the request). It sits above `agent_proc`,
//! `client`, `replay_count` and `options`, below `pool`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use acp::v1::schema::{
    CancelNotification, ContentBlock, LoadSessionRequest, NewSessionRequest, PromptRequest,
    PromptResponse, StopReason, TextContent,
};
use agent_client_protocol as acp;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::agent_proc::AgentProc;
use super::client::{rpc_error_text, ReplayGuard, RouteGuard, TextAcc, TurnSink};
use super::options::AcpOptions;
use super::replay_count::{ReplayCount, ReplayTally};
use crate::agent::history::{Message, Role};
use crate::agent::runtime::{
    Cleanup, ExecutionContext, ExecutionKind, ResultLine, RunEnd, RunOutcome, RunRequest,
};
use crate::agent::sessions::{memory, Memory};

/// How long a `session/load` replay may stay silent before agentd takes it
/// as complete, when what arrived so far is less than agentd recorded.
/// Gemini CLI 0.61 answers `session/load` before it has sent its replay (it
/// streams the history afterwards, one awaited write per message), so the
/// count at the answer may be short of what the agent holds; an agent that
/// replays before it answers is complete at the answer and never waits.
/// Successive replay messages come a few milliseconds apart.
const REPLAY_QUIET: Duration = Duration::from_millis(200);

/// Longest wait for a replay to complete, however it trickles in.
const REPLAY_SETTLE_MAX: Duration = Duration::from_secs(3);

/// Most bytes of agentd's own transcript of a chat session given back, with
/// the prompt, to an agent that lost the session's context: the newest
/// messages that fit (64 KiB is tens of turns of conversation, and well
/// within what a model reads in one prompt).
pub const RESTORE_TRANSCRIPT_BYTES: usize = 64 << 10;

/// The ACP session a turn runs in.
struct Opened {
    id: String,
    /// The turns it holds before this one: what a load replayed, what the
    /// store recorded for a warm session, 0 for a new one (`None`: unknown).
    held: Option<u64>,
    /// The store recorded turns the session does not hold: the context of
    /// the chat is lost, unless agentd gives its transcript back.
    lost: bool,
}

/// Why a turn stopped waiting for the agent's answer.
enum Stop {
    TimedOut,
    Cancelled,
}

pub(super) struct Turn<'a> {
    /// The pool's settings (the work directory, bounds, policy, grace).
    pub(super) opts: &'a AcpOptions,
    pub(super) agent: &'a Arc<AgentProc>,
    pub(super) req: &'a RunRequest,
    pub(super) ctx: &'a ExecutionContext,
    pub(super) deadline: Instant,
}

impl Turn<'_> {
    /// Run the turn on the acquired agent; returns the outcome and the
    /// session the agent holds for the chat afterwards.
    pub(super) async fn run(
        &mut self,
        held: Option<(String, String)>,
    ) -> (RunOutcome, Option<(String, String)>) {
        let cli_id = self.req.cli_session.as_ref().map(|s| s.id.clone());
        let warm = match (self.req.kind, &held, &cli_id) {
            (ExecutionKind::Chat, Some((held_cli, acp_id)), Some(cli)) if held_cli == cli => {
                Some(acp_id.clone())
            }
            _ => None,
        };
        let opened = match warm {
            // The process kept the conversation in memory: it holds what
            // the store recorded.
            Some(id) => Opened {
                id,
                held: self.req.cli_session.as_ref().and_then(|s| s.turns),
                lost: false,
            },
            None => match self.open_session().await {
                Ok(opened) => opened,
                Err(outcome) => return (*outcome, None),
            },
        };
        let session = opened.id.clone();
        let keep = match (self.req.kind, cli_id) {
            (ExecutionKind::Chat, Some(cli)) => Some((cli, session.clone())),
            _ => None,
        };
        let restore = match opened.lost {
            true => self.transcript().await,
            false => None,
        };
        let restored = restore.is_some();
        let mut outcome = self.prompt(&session, restore).await;
        outcome.agent.session_id = Some(session);
        outcome.agent.session_restarted = opened.lost;
        outcome.agent.session_restored = restored;
        outcome.agent.session_turns = match self.req.kind {
            ExecutionKind::Chat => opened.held.map(|n| n + 1),
            ExecutionKind::Task => None,
        };
        (outcome, keep)
    }

    /// agentd's transcript of the chat session, as the text block that
    /// goes before the prompt; `None` when there is none to give.
    async fn transcript(&self) -> Option<String> {
        let source = self.req.transcript.as_ref()?;
        let read = tokio::select! {
            r = source.read(RESTORE_TRANSCRIPT_BYTES) => r,
            _ = sleep_until(self.deadline) => None,
            _ = self.ctx.cancel.cancelled() => None,
        };
        let Some(messages) = read else {
            tracing::warn!(execution_id = %self.req.execution_id, session_id = %self.req.session_id, "agentd's transcript of the session could not be read; the turn runs without the earlier context");
            return None;
        };
        let block = transcript_block(&messages, RESTORE_TRANSCRIPT_BYTES)?;
        tracing::info!(
            execution_id = %self.req.execution_id,
            session_id = %self.req.session_id,
            messages = messages.len(),
            bytes = block.len(),
            "the agent lost the session's context; agentd's transcript of it goes with the prompt"
        );
        Some(block)
    }

    /// `session/load` of the session the store recorded, when the agent can;
    /// otherwise, or when that fails, `session/new`. A load whose replay
    /// holds fewer turns than the store recorded lost context (`lost`).
    async fn open_session(&self) -> Result<Opened, Box<RunOutcome>> {
        let workdir = self.opts.workdir.clone();
        let recorded = match self.req.kind {
            ExecutionKind::Chat => self.req.cli_session.as_ref().filter(|s| s.exists),
            ExecutionKind::Task => None,
        };
        if let Some(recorded) = recorded {
            match (&recorded.agent_id, self.agent.load_session) {
                (Some(id), true) => {
                    let count = Arc::new(ReplayCount::default());
                    self.agent.routes.count_replay(id, count.clone());
                    let _counting = ReplayGuard {
                        routes: &self.agent.routes,
                        session: id,
                    };
                    let load = self
                        .agent
                        .cx
                        .send_request(LoadSessionRequest::new(id.clone(), workdir.clone()))
                        .block_task();
                    match self.call(load).await {
                        Ok(_) => {
                            let replay = match self.settle(&count, recorded.turns).await {
                                Ok(replay) => replay,
                                Err(other) => return Err(Box::new(self.call_failed(other).await)),
                            };
                            let lost = match memory(recorded.turns, replay.users) {
                                Memory::Short { recorded, held } => {
                                    tracing::warn!(execution_id = %self.req.execution_id, session_id = %self.req.session_id, acp_session = %id, recorded, held, "the agent loaded the session with fewer turns than agentd recorded in it: it lost context");
                                    true
                                }
                                Memory::Whole | Memory::Uncounted => {
                                    tracing::info!(execution_id = %self.req.execution_id, session_id = %self.req.session_id, acp_session = %id, recorded = recorded.turns, held = replay.users, "ACP session loaded");
                                    false
                                }
                            };
                            return Ok(Opened {
                                id: id.clone(),
                                held: Some(replay.users),
                                lost,
                            });
                        }
                        Err(CallError::Rpc(e)) => {
                            tracing::warn!(execution_id = %self.req.execution_id, session_id = %self.req.session_id, acp_session = %id, "the agent could not load the session ({}); the turn starts a new one without the earlier context", rpc_error_text(&e));
                        }
                        Err(other) => return Err(Box::new(self.call_failed(other).await)),
                    }
                }
                (Some(id), false) => {
                    tracing::warn!(execution_id = %self.req.execution_id, session_id = %self.req.session_id, acp_session = %id, "the agent does not offer session/load; the turn starts a new session without the earlier context")
                }
                (None, _) => {
                    tracing::warn!(execution_id = %self.req.execution_id, session_id = %self.req.session_id, "no ACP session was recorded for this session; the turn starts a new one without the earlier context")
                }
            }
        }
        let new = self
            .agent
            .cx
            .send_request(NewSessionRequest::new(workdir))
            .block_task();
        match self.call(new).await {
            Ok(r) => Ok(Opened {
                id: r.session_id.0.to_string(),
                held: Some(0),
                // The store had turns in a session the agent cannot give back.
                lost: recorded.is_some(),
            }),
            Err(e) => Err(Box::new(self.call_failed(e).await)),
        }
    }

    /// Wait until the replay of a loaded session is complete: at once when
    /// it already covers the `recorded` turns (or nothing was recorded to
    /// compare with), else once it has been silent for `REPLAY_QUIET`
    /// (within `REPLAY_SETTLE_MAX`). The tally then says what the agent
    /// holds.
    async fn settle(
        &self,
        count: &ReplayCount,
        recorded: Option<u64>,
    ) -> Result<ReplayTally, CallError> {
        let Some(recorded) = recorded else {
            return Ok(count.tally());
        };
        let cap = Instant::now() + REPLAY_SETTLE_MAX;
        loop {
            let more = count.changed.notified();
            tokio::pin!(more);
            more.as_mut().enable();
            let tally = count.tally();
            if tally.covers(recorded) {
                return Ok(tally);
            }
            let quiet = (Instant::now() + REPLAY_QUIET).min(cap);
            tokio::select! {
                _ = &mut more => {}
                _ = sleep_until(quiet) => return Ok(count.tally()),
                _ = self.agent.wait_exit() => return Err(CallError::Exited),
                _ = sleep_until(self.deadline) => return Err(CallError::Stopped(Stop::TimedOut)),
                _ = self.ctx.cancel.cancelled() => return Err(CallError::Stopped(Stop::Cancelled)),
            }
        }
    }

    /// Await a request, bounded by the deadline, the cancel and the agent's exit.
    async fn call<T>(
        &self,
        request: impl std::future::Future<Output = Result<T, acp::Error>>,
    ) -> Result<T, CallError> {
        tokio::select! {
            r = request => r.map_err(CallError::Rpc),
            _ = self.agent.wait_exit() => Err(CallError::Exited),
            _ = sleep_until(self.deadline) => Err(CallError::Stopped(Stop::TimedOut)),
            _ = self.ctx.cancel.cancelled() => Err(CallError::Stopped(Stop::Cancelled)),
        }
    }

    async fn call_failed(&self, e: CallError) -> RunOutcome {
        match e {
            CallError::Stopped(Stop::TimedOut) => RunOutcome::ended(RunEnd::TimedOut),
            CallError::Stopped(Stop::Cancelled) => RunOutcome::ended(RunEnd::Cancelled),
            CallError::Exited => self.died().await,
            CallError::Rpc(e) => {
                if let Some(outcome) = self.died_soon(&e).await {
                    return outcome;
                }
                error_outcome(rpc_error_text(&e), String::new())
            }
        }
    }

    /// The agent exited under the turn.
    async fn died(&self) -> RunOutcome {
        let info = self.agent.wait_exit().await;
        let mut o = RunOutcome::ended(info.end);
        o.stderr_tail = self.agent.stderr_tail();
        o
    }

    /// A failed request because the connection broke (the SDK says so in
    /// the error, or has recorded the connection's end): the process is on
    /// its way out; wait briefly to report how it ended.
    async fn died_soon(&self, e: &acp::Error) -> Option<RunOutcome> {
        let broke = acp::is_incoming_transport_closed(e) || acp::is_connection_terminated(e);
        if !broke && self.agent.cx.termination().is_none() && !self.agent.exited() {
            return None;
        }
        match timeout(Duration::from_secs(2), self.agent.wait_exit()).await {
            Ok(_) => Some(self.died().await),
            Err(_) => None,
        }
    }

    /// Send the prompt (after `restore`, agentd's transcript for an agent
    /// that lost the context, when there is one) and wait for the answer.
    async fn prompt(&self, session: &str, restore: Option<String>) -> RunOutcome {
        let sink = Arc::new(TurnSink {
            execution_id: self.req.execution_id.clone(),
            output: self.ctx.output.clone(),
            text: Mutex::new(TextAcc::new(self.opts.max_line)),
            permissions: self.ctx.permissions.clone(),
            policy: self.opts.permissions,
            permission_timeout: self.opts.permission_timeout,
            ended: CancellationToken::new(),
        });
        self.agent.routes.insert(session, sink.clone());
        let _route = RouteGuard {
            routes: &self.agent.routes,
            session,
            sink: &sink,
        };
        let mut content = Vec::with_capacity(2);
        if let Some(restore) = restore {
            content.push(ContentBlock::Text(TextContent::new(restore)));
        }
        content.push(ContentBlock::Text(TextContent::new(
            self.req.prompt.clone(),
        )));
        let request = PromptRequest::new(session.to_owned(), content);
        let answer = self.agent.cx.send_request(request).block_task();
        tokio::pin!(answer);
        let first = tokio::select! {
            r = &mut answer => Ok(r),
            _ = self.agent.wait_exit() => return self.died().await,
            _ = sleep_until(self.deadline) => Err(Stop::TimedOut),
            _ = self.ctx.cancel.cancelled() => Err(Stop::Cancelled),
        };
        match first {
            Ok(answer) => self.answered(answer, &sink).await,
            Err(why) => self.stop_prompt(session, &sink, why, answer).await,
        }
    }

    /// The turn's deadline passed or it was cancelled before the answer:
    /// ask the agent to stop (it answers the prompt with `cancelled` when
    /// it honours that, and stays warm); one that does not answer within
    /// the kill grace is stopped.
    async fn stop_prompt(
        &self,
        session: &str,
        sink: &TurnSink,
        why: Stop,
        mut answer: Pin<&mut impl Future<Output = Result<PromptResponse, acp::Error>>>,
    ) -> RunOutcome {
        // Ask the agent to stop; it answers the prompt with
        // `cancelled` when it honours that.
        let _ = self
            .agent
            .cx
            .send_notification(CancelNotification::new(session.to_owned()));
        sink.ended.cancel();
        let grace = self.opts.kill_grace.max(Duration::from_millis(100));
        let honoured = tokio::select! {
            r = timeout(grace, &mut answer) => r.ok(),
            _ = self.agent.wait_exit() => None,
        };
        let end = match why {
            Stop::TimedOut => RunEnd::TimedOut,
            Stop::Cancelled => RunEnd::Cancelled,
        };
        match honoured {
            Some(_) => {
                tracing::info!(execution_id = %self.req.execution_id, agent = self.agent.id, "the ACP agent honoured session/cancel; it stays warm");
                let mut o = RunOutcome::ended(end);
                o.text = sink.text();
                o
            }
            None => {
                tracing::warn!(execution_id = %self.req.execution_id, agent = self.agent.id, "the ACP agent did not answer session/cancel within {} ms; stopping it", grace.as_millis());
                self.agent.stop("unresponsive: no answer to session/cancel");
                let info = self.agent.wait_exit().await;
                let mut o = RunOutcome::ended(end);
                o.text = sink.text();
                o.cleanup = Cleanup {
                    stopped_with: info.stopped_with,
                    ..Cleanup::default()
                };
                o
            }
        }
    }

    /// The agent answered the prompt (or the request failed): the outcome.
    async fn answered(
        &self,
        answer: Result<PromptResponse, acp::Error>,
        sink: &TurnSink,
    ) -> RunOutcome {
        let text = sink.text();
        let truncated = sink.truncated();
        match answer {
            Ok(response) => {
                self.agent.served.store(true, Relaxed);
                let (is_error, subtype, message) = match response.stop_reason {
                    StopReason::EndTurn => (false, "end_turn", None),
                    StopReason::Cancelled => (false, "cancelled", None),
                    StopReason::Refusal => (true, "refusal", Some("the agent refused to continue (stopReason refusal)")),
                    StopReason::MaxTokens => (true, "max_tokens", Some("the agent reached its token limit (stopReason max_tokens)")),
                    StopReason::MaxTurnRequests => (true, "max_turn_requests", Some("the agent reached its limit of model requests for one turn (stopReason max_turn_requests)")),
                    _ => (true, "unknown", Some("the agent stopped for a reason agentd does not know")),
                };
                if response.stop_reason == StopReason::Cancelled {
                    let mut o = RunOutcome::ended(RunEnd::Cancelled);
                    o.text = text;
                    return o;
                }
                let mut o = RunOutcome::ended(RunEnd::Completed);
                o.result = Some(ResultLine {
                    text: text.clone(),
                    is_error,
                    subtype: Some(subtype.into()),
                    error_message: message.map(str::to_owned),
                    ..Default::default()
                });
                o.text = text;
                o.stdout_truncated = truncated;
                o
            }
            Err(e) => {
                if let Some(o) = self.died_soon(&e).await {
                    return o;
                }
                error_outcome(rpc_error_text(&e), text)
            }
        }
    }
}

enum CallError {
    Rpc(acp::Error),
    Exited,
    Stopped(Stop),
}

fn error_outcome(message: String, text: String) -> RunOutcome {
    let mut o = RunOutcome::ended(RunEnd::Completed);
    o.result = Some(ResultLine {
        is_error: true,
        error_message: Some(bounded(
            &message,
            crate::agent::streamjson::MAX_ERROR_MESSAGE,
        )),
        ..Default::default()
    });
    o.text = text;
    o
}

fn bounded(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

/// agentd's transcript of a session, as a text block to put before the
/// prompt of an agent that lost the session's context. Each message is
/// bounded too, so the block stays within about `max_bytes`.
fn transcript_block(messages: &[Message], max_bytes: usize) -> Option<String> {
    if messages.is_empty() {
        return None;
    }
    let mut text = String::from(
        "Earlier in this conversation (your own record of it was lost; this is the \
         transcript kept by the server that runs you, oldest first):\n",
    );
    for m in messages {
        let who = match m.role {
            Role::User => "User",
            Role::Assistant => "Assistant",
        };
        text.push_str(&format!("\n[{who}]\n"));
        let mut end = m.content.len().min(max_bytes);
        while !m.content.is_char_boundary(end) {
            end -= 1;
        }
        text.push_str(&m.content[..end]);
        text.push('\n');
    }
    text.push_str("\n(End of the earlier conversation. The new message follows.)");
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transcript_block_names_each_speaker_and_bounds_each_message() {
        let m = |role, content: &str| Message {
            session_id: "s".into(),
            role,
            content: content.into(),
            timestamp: 0.0,
        };
        assert_eq!(transcript_block(&[], 100), None);
        let block = transcript_block(
            &[m(Role::User, "remember apples"), m(Role::Assistant, "ok")],
            100,
        )
        .unwrap();
        let apples = block
            .find("[User]\nremember apples\n")
            .expect("the user turn");
        let ok = block.find("[Assistant]\nok\n").expect("the answer");
        assert!(apples < ok, "oldest first: {block}");
        assert!(block.ends_with("The new message follows.)"));
        // One message over the bound is cut on a character boundary.
        let block = transcript_block(&[m(Role::User, "ééé")], 3).unwrap();
        assert!(block.contains("[User]\né\n"), "{block}");
    }
}
