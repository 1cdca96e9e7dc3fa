//! The pool and its bound: at most `max_agents` agent processes, counting
//! those being started; a chat's own idle process, or a new one (closing
//! the least recently used idle one when the pool is full), or a wait while
//! every process is busy; processes released after a turn, closed when idle
//! past `idle` or when their session's history is deleted, and pinged while
//! idle. What supervision reports of an exit is recorded here (a restart or
//! a close on purpose). A turn is handed to `turn`, and run once more on a
//! new process when an idle one was found dead before it showed anything.
//!
//! Must not: hold its lock across an await; start or stop a process itself
//! (`agent_proc` does) or speak the protocol beyond the ping; exceed its
//! bound. It sits above every other room of `acp/` but `mod.rs`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_client_protocol as acp;
use tokio::sync::Notify;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::agent_proc::{AgentProc, ExitInfo, Exited, NoAgent, OnExit, Starter};
use super::backoff::{Backoff, EARLY_EXIT};
use super::options::AcpOptions;
use super::stats::Stats;
use super::turn::Turn;
use crate::agent::runtime::{
    AgentsReport, ExecutionContext, ExecutionKind, ResultLine, RunEnd, RunOutcome, RunRequest,
};
use crate::clock::now_unix_ms;

/// How long an idle agent has to answer the health loop's cheap request.
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Whom a process serves.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owner {
    /// One agentd chat session.
    Chat(String),
    /// Tasks, each in a fresh ACP session.
    Task,
}

struct Entry {
    agent: Arc<AgentProc>,
    owner: Owner,
    busy: bool,
    last_used: Instant,
    /// The chat's CLI session id (agentd's, per generation) and the ACP
    /// session this process holds for it.
    session: Option<(String, String)>,
}

#[derive(Default)]
struct PoolState {
    entries: Vec<Entry>,
    /// Processes being started (they count against the limit).
    starting: usize,
}

pub(super) struct Pool {
    opts: AcpOptions,
    state: Mutex<PoolState>,
    stats: Stats,
    backoff: Backoff,
    /// Woken when a process is released, exits or is removed.
    changed: Notify,
    reaper_started: std::sync::Once,
}

enum Next {
    Got(Arc<AgentProc>, Option<(String, String)>),
    Start(Option<Arc<AgentProc>>),
    Wait,
}

impl Pool {
    pub(super) fn new(opts: AcpOptions) -> Self {
        Pool {
            state: Mutex::new(PoolState::default()),
            stats: Stats::default(),
            backoff: Backoff::default(),
            changed: Notify::new(),
            reaper_started: std::sync::Once::new(),
            opts,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn report(&self) -> AgentsReport {
        self.stats.report(self.opts.max_agents)
    }

    /// A process for `owner`: its own idle one, or a new one (closing the
    /// least recently used idle process when the pool is full), waiting
    /// while every process is busy. True with a new one.
    async fn acquire(
        self: &Arc<Self>,
        owner: &Owner,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<(Arc<AgentProc>, Option<(String, String)>, bool), NoAgent> {
        self.start_reaper();
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = {
                let mut st = self.lock();
                st.entries.retain(|e| !e.agent.exited());
                if let Some(e) = st.entries.iter_mut().find(|e| e.owner == *owner && !e.busy) {
                    e.busy = true;
                    Next::Got(e.agent.clone(), e.session.clone())
                } else if st.entries.len() + st.starting < self.opts.max_agents {
                    st.starting += 1;
                    Next::Start(None)
                } else if let Some(at) = st
                    .entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| !e.busy)
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(i, _)| i)
                {
                    let old = st.entries.remove(at);
                    st.starting += 1;
                    Next::Start(Some(old.agent))
                } else {
                    Next::Wait
                }
            };
            match next {
                Next::Got(agent, session) => {
                    self.stats.busy.fetch_add(1, Relaxed);
                    return Ok((agent, session, false));
                }
                Next::Start(evicted) => {
                    if let Some(old) = evicted {
                        self.stats.closed.fetch_add(1, Relaxed);
                        tracing::info!(
                            agent = old.id,
                            pid = old.pid,
                            "closing the least recently used idle ACP agent to make room"
                        );
                        old.stop("closed to make room for another session");
                    }
                    let started = self.starter().start(deadline, cancel, self.on_exit()).await;
                    let mut st = self.lock();
                    st.starting -= 1;
                    let agent = started?;
                    st.entries.push(Entry {
                        agent: agent.clone(),
                        owner: owner.clone(),
                        busy: true,
                        last_used: Instant::now(),
                        session: None,
                    });
                    self.stats.busy.fetch_add(1, Relaxed);
                    return Ok((agent, None, true));
                }
                Next::Wait => {
                    tokio::select! {
                        _ = notified => {}
                        _ = sleep_until(deadline) => return Err(NoAgent::TimedOut),
                        _ = cancel.cancelled() => return Err(NoAgent::Cancelled),
                    }
                }
            }
        }
    }

    /// Give a process back after a turn, with the session it now holds.
    fn release(&self, agent: &Arc<AgentProc>, session: Option<(String, String)>) {
        {
            let mut st = self.lock();
            if let Some(e) = st.entries.iter_mut().find(|e| Arc::ptr_eq(&e.agent, agent)) {
                e.busy = false;
                e.last_used = Instant::now();
                if session.is_some() {
                    e.session = session;
                }
            }
        }
        self.stats.busy.fetch_sub(1, Relaxed);
        self.changed.notify_waiters();
    }

    /// Close the idle process of chat `session_id` (of every chat for
    /// `None`): its history was deleted, and the context the process holds
    /// must not come back. A busy one is left to finish its turn; the next
    /// turn then opens a new ACP session, as the store moved the chat to a
    /// new CLI session id.
    pub(super) fn close_chats(&self, session_id: Option<&str>) {
        let closed: Vec<_> = {
            let mut st = self.lock();
            let (gone, kept) = std::mem::take(&mut st.entries).into_iter().partition(|e| {
                !e.busy
                    && match (&e.owner, session_id) {
                        (Owner::Chat(s), Some(id)) => s == id,
                        (Owner::Chat(_), None) => true,
                        (Owner::Task, _) => false,
                    }
            });
            st.entries = kept;
            gone
        };
        for e in closed {
            self.stats.closed.fetch_add(1, Relaxed);
            tracing::info!(
                agent = e.agent.id,
                "closing the ACP agent of a deleted session"
            );
            e.agent.stop("its session's history was deleted");
        }
        self.changed.notify_waiters();
    }

    /// What starting an agent takes from the pool.
    fn starter(&self) -> Starter<'_> {
        Starter {
            opts: &self.opts,
            stats: &self.stats,
            backoff: &self.backoff,
        }
    }

    /// Where a process's supervising task reports its exit: to the pool
    /// while it exists, else only to those waiting for the exit.
    fn on_exit(self: &Arc<Self>) -> OnExit {
        let pool = Arc::downgrade(self);
        Box::new(move |exited: Exited| {
            if let Some(pool) = pool.upgrade() {
                pool.exited(exited);
            } else {
                let _ = exited.exit_tx.send(Some(ExitInfo {
                    end: exited.end,
                    stopped_with: exited.stopped_with,
                }));
            }
        })
    }

    /// The supervising task saw process `id` exit.
    fn exited(&self, exited: Exited) {
        let Exited {
            id,
            pid,
            end,
            stopped_with,
            exit_tx,
        } = exited;
        let (agent, reason) = {
            let mut st = self.lock();
            let at = st.entries.iter().position(|e| e.agent.id == id);
            let agent = at.map(|at| st.entries.remove(at).agent);
            let reason = agent.as_ref().and_then(|a| {
                a.stop_reason
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            });
            (agent, reason)
        };
        self.stats.running.fetch_sub(1, Relaxed);
        // A process agentd closed on purpose (idle, room, deleted session)
        // is no failure; anything else is a restart.
        let closed_on_purpose = reason
            .as_deref()
            .is_some_and(|r| !r.starts_with("unresponsive"));
        if !closed_on_purpose {
            let why = match (&reason, &end) {
                (Some(r), _) => r.clone(),
                (None, RunEnd::Exited { code }) => format!("the agent exited with code {code}"),
                (None, RunEnd::Signaled { signal }) => {
                    format!("the agent was killed by signal {signal}")
                }
                (None, other) => format!("the agent ended: {other:?}"),
            };
            if agent.is_some() {
                self.stats.restarts.fetch_add(1, Relaxed);
                self.stats
                    .last_restart
                    .store(Some(Arc::new((now_unix_ms() / 1000, why.clone()))));
                tracing::warn!(agent = id, pid, "ACP agent lost: {why}; its session continues in a new process at the next turn");
                // Only a process that died by itself, young, without ever
                // answering a turn is a failed start; one that served, or one
                // agentd killed for not answering (which took a whole cancel
                // grace or ping timeout), is a restart, not a reason to back off.
                if reason.is_none()
                    && agent.as_ref().is_some_and(|a| {
                        a.started.elapsed() < EARLY_EXIT && !a.served.load(Relaxed)
                    })
                {
                    self.backoff.failed(&self.stats, &why);
                }
            }
        }
        let _ = exit_tx.send(Some(ExitInfo { end, stopped_with }));
        self.changed.notify_waiters();
    }

    /// Close idle processes past `idle`, and check that the others still
    /// answer, on a schedule, for as long as the pool exists.
    fn start_reaper(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        self.reaper_started.call_once(|| {
            let period =
                (self.opts.idle / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(pool) = weak.upgrade() else { return };
                    pool.sweep().await;
                }
            });
        });
    }

    async fn sweep(self: &Arc<Self>) {
        let idle = self.opts.idle;
        let (expired, check): (Vec<_>, Vec<_>) = {
            let mut st = self.lock();
            let (expired, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut st.entries)
                .into_iter()
                .partition(|e| !e.busy && e.last_used.elapsed() >= idle);
            st.entries = kept;
            let check = st
                .entries
                .iter()
                .filter(|e| !e.busy)
                .map(|e| e.agent.clone())
                .collect();
            (expired, check)
        };
        for e in expired {
            self.stats.closed.fetch_add(1, Relaxed);
            tracing::info!(
                agent = e.agent.id,
                pid = e.agent.pid,
                "closing an ACP agent idle for {} s",
                idle.as_secs()
            );
            e.agent.stop("idle");
        }
        for agent in check {
            // Any answer, an error included, proves the agent reads and
            // writes; silence past the bound means it is wedged.
            let ping = acp::UntypedMessage::new("$/agentd/ping", serde_json::json!({}))
                .map(|m| agent.cx.send_request(m).block_task());
            let Ok(ping) = ping else { continue };
            if agent.exited() {
                continue;
            }
            let answered = tokio::select! {
                r = timeout(PING_TIMEOUT, ping) => r.is_ok(),
                _ = agent.wait_exit() => true,
            };
            if !answered {
                tracing::warn!(
                    agent = agent.id,
                    pid = agent.pid,
                    "idle ACP agent did not answer within {} s; restarting it",
                    PING_TIMEOUT.as_secs()
                );
                agent.stop("unresponsive: no answer to the health check");
            }
        }
    }

    /// One turn. An idle process that turns out to be dead (killed between
    /// turns, a moment before its exit was noticed) gets the turn once
    /// more, on a new process, when it showed nothing of the turn: no text,
    /// no tool call, so nothing of it can have been done.
    pub(super) async fn turn(
        self: Arc<Self>,
        req: RunRequest,
        ctx: &ExecutionContext,
    ) -> RunOutcome {
        let deadline = Instant::now() + req.timeout;
        let owner = match req.kind {
            ExecutionKind::Chat => Owner::Chat(req.session_id.clone()),
            ExecutionKind::Task => Owner::Task,
        };
        let mut retried = false;
        loop {
            let (agent, held, fresh) = match self.acquire(&owner, deadline, &ctx.cancel).await {
                Ok(got) => got,
                Err(no) => return self.no_agent(no),
            };
            let shown = ctx.output.last_seq();
            let outcome = self.turn_on(&agent, held, &req, ctx, deadline).await;
            let died = matches!(outcome.end, RunEnd::Signaled { .. } | RunEnd::Exited { .. })
                && outcome.cleanup.stopped_with.is_none();
            if retried
                || fresh
                || !died
                || ctx.output.last_seq() != shown
                || ctx.cancel.is_cancelled()
                || Instant::now() >= deadline
            {
                return outcome;
            }
            tracing::warn!(execution_id = %req.execution_id, session_id = %req.session_id, agent = agent.id, "the idle ACP agent was dead before it showed anything of the turn; the turn runs again in a new process");
            retried = true;
        }
    }

    async fn turn_on(
        self: &Arc<Self>,
        agent: &Arc<AgentProc>,
        held: Option<(String, String)>,
        req: &RunRequest,
        ctx: &ExecutionContext,
        deadline: Instant,
    ) -> RunOutcome {
        let agent = agent.clone();
        ctx.pid.store(agent.pid, Relaxed);
        let mut turn = Turn {
            opts: &self.opts,
            agent: &agent,
            req,
            ctx,
            deadline,
        };
        let (mut outcome, session) = turn.run(held).await;
        let swept = agent.sweep_escapees().await;
        outcome.cleanup.escapees_killed += swept.killed;
        outcome.cleanup.survivors += swept.left.len() as u32;
        self.release(&agent, session);
        outcome
    }

    fn no_agent(&self, no: NoAgent) -> RunOutcome {
        let command = self.opts.argv.first().cloned().unwrap_or_default();
        match no {
            NoAgent::Cancelled => RunOutcome::ended(RunEnd::Cancelled),
            NoAgent::TimedOut => RunOutcome::ended(RunEnd::TimedOut),
            NoAgent::Spawn { reason } => RunOutcome::ended(RunEnd::SpawnFailed { command, reason }),
            NoAgent::Start { reason, stderr } => {
                let mut o = RunOutcome::ended(RunEnd::Completed);
                o.result = Some(ResultLine {
                    is_error: true,
                    error_message: Some(format!("the ACP agent {command} did not start: {reason}")),
                    ..Default::default()
                });
                o.stderr_tail = stderr;
                o
            }
        }
    }
}
