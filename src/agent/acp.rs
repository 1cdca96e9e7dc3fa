//! The `acp` runtime: agents kept warm over the Agent Client Protocol
//! (JSON-RPC 2.0, one message per line on the agent's stdin and stdout),
//! spoken with the protocol's own SDK (`agent-client-protocol`).
//!
//! One agent process serves one agentd chat session at a time and keeps the
//! conversation in its own memory, so a turn costs one `session/prompt`
//! instead of a CLI start. Tasks get a fresh ACP session each, on processes
//! kept for tasks. The processes live in a bounded pool: at most
//! `max_agents`, idle ones closed after `idle`, the least recently used idle
//! one closed when a new one is needed and the pool is full.
//!
//! Supervision, as systemd supervises agentd: each process has a task that
//! waits for it, so an exit or crash is noticed at once (the counters and
//! the last reason go to `/health`, `/metrics` and `/status`) and the
//! session it held is continued by `session/load` in a new process. A
//! process that does not answer a cancel within the kill grace, or an idle
//! process that does not answer a cheap request, is killed and replaced.
//! Starts that keep failing back off. None of this is a reason for agentd to
//! stop its watchdog: a failing agent is only ever `degraded`.
//!
//! Imports nothing above `agent/`: the settings arrive as `AcpOptions`.
//!
//! Invariants:
//! * A process is in the pool from its start until its supervising task saw
//!   it exit; a process whose task ended has been killed (its whole group)
//!   and reaped, or handed to the orphan reaper.
//! * At most `max_agents` processes exist, counting those being started.
//! * A turn's updates reach its execution only while the turn runs: each
//!   ACP session id routes to at most one turn, and a `session/load` replay
//!   (the agent repeating history) reaches no turn: it is only counted.
//! * The agent's memory is checked against agentd's: the user turns a
//!   `session/load` replays are compared with the turns the store recorded
//!   in that session; an agent that holds fewer lost context, and the turn
//!   says so (`session_restarted`) and gives it agentd's transcript of the
//!   session with the prompt (`session_restored`).
//! * Every wait is bounded by the turn's deadline, its cancel, or the
//!   process's exit.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use acp::v1::schema::{
    CancelNotification, ContentBlock, Implementation, InitializeRequest, LoadSessionRequest,
    NewSessionRequest, PermissionOptionKind, PromptRequest, RequestPermissionOutcome,
    RequestPermissionRequest, RequestPermissionResponse, SelectedPermissionOutcome,
    SessionNotification, SessionUpdate, StopReason, TextContent,
};
use acp::v1::ConnectionTo;
use acp::Agent;
use agent_client_protocol as acp;
use arc_swap::ArcSwapOption;
use futures::{SinkExt, StreamExt};
use tokio::process::Command;
use tokio::sync::{watch, Notify};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::codec::{FramedRead, FramedWrite, LinesCodec};
use tokio_util::sync::CancellationToken;

use crate::agent::history::{Message, Role};
use crate::agent::permissions::{PermissionChoice, Permissions};
use crate::agent::process::{
    exit_end, scrub_env, spawn_error_reason, start_with_default_signals, stop_child_group,
    EXECUTION_ID_ENV,
};
use crate::agent::replay::OutputLog;
pub use crate::agent::runtime::AgentsReport;
use crate::agent::runtime::{
    Cleanup, ExecutionContext, ExecutionKind, ResultLine, RunEnd, RunFuture, RunOutcome,
    RunRequest, Runtime,
};
use crate::agent::sessions::{memory, Memory};
use crate::clock::now_unix_ms;
use crate::init::reaper::{self, SweepReport, EXECUTION_SWEEP_BOUND};

/// Longest JSON text of one typed event (a tool call, plan or permission
/// request) put in the replay buffer; a larger one is replaced by a stub
/// naming its kind and size.
pub const MAX_EVENT_BYTES: usize = 64 << 10;

/// How long a new agent process has to answer `initialize`. Gemini CLI 0.61
/// answers in about 1.7 s on an idle two-core machine; a Node agent on a
/// loaded one takes several times that.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long an idle agent has to answer the health loop's cheap request.
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// First and longest wait before starting an agent again after starts that
/// failed (the agent exited, or never answered `initialize`).
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A process that exits within this long of its start, before it answered
/// any prompt, counts as a failed start for the back-off.
const EARLY_EXIT: Duration = Duration::from_secs(10);

/// Bytes of an agent's stderr kept (its last lines name why it died).
const STDERR_TAIL: usize = 16 << 10;

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

/// The id of the next agent process, unique in the process (not per pool):
/// its tag (`acp-agent-<agentd's pid>-N`) is what the sweep of an exited
/// agent kills, so neither two pools in one process (tests start several
/// servers) nor two agentd processes on one host may share one.
static NEXT_AGENT_ID: AtomicU64 = AtomicU64::new(1);

/// What `session/request_permission` is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermissionPolicy {
    /// Pick the agent's reject option (the default).
    Deny,
    /// Pick the agent's allow-once option.
    Allow,
    /// Hold the request on the execution for a client to answer.
    Ask,
}

impl PermissionPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PermissionPolicy::Deny => "deny",
            PermissionPolicy::Allow => "allow",
            PermissionPolicy::Ask => "ask",
        }
    }
}

/// The `acp` runtime's settings (from `AGENTD_ACP_*`).
#[derive(Debug, Clone)]
pub struct AcpOptions {
    /// The agent's argv (`AGENTD_ACP_CMD`), program first.
    pub argv: Vec<String>,
    /// `cwd` of every ACP session and of the agent processes.
    pub workdir: PathBuf,
    pub max_agents: usize,
    /// Idle processes are closed after this long.
    pub idle: Duration,
    pub permissions: PermissionPolicy,
    /// An `ask` request nobody answered is refused after this long.
    pub permission_timeout: Duration,
    /// How long a cancelled turn's agent has to answer before its group is
    /// stopped, and the time between the signals that stop it.
    pub kill_grace: Duration,
    /// Longest line accepted from an agent (and bound of a turn's text).
    pub max_line: usize,
    /// Variables set for the agents on top of agentd's scrubbed environment.
    pub env: Vec<(&'static str, OsString)>,
}

#[derive(Default)]
struct Stats {
    running: AtomicU64,
    busy: AtomicU64,
    started: AtomicU64,
    restarts: AtomicU64,
    closed: AtomicU64,
    last_restart: ArcSwapOption<(u64, String)>,
    degraded: ArcSwapOption<String>,
}

/// The `acp` runtime.
pub struct Acp {
    pool: Arc<Pool>,
}

impl Acp {
    pub fn new(opts: AcpOptions) -> Self {
        Acp {
            pool: Arc::new(Pool {
                state: Mutex::new(PoolState::default()),
                stats: Stats::default(),
                changed: Notify::new(),
                reaper_started: std::sync::Once::new(),
                opts,
            }),
        }
    }

    /// The pool now.
    pub fn report(&self) -> AgentsReport {
        self.pool.report()
    }
}

impl Runtime for Acp {
    fn name(&self) -> &'static str {
        "acp"
    }

    fn keeps_sessions(&self) -> bool {
        true
    }

    fn agents(&self) -> Option<AgentsReport> {
        Some(self.report())
    }

    fn session_cleared(&self, session_id: Option<&str>) {
        self.pool.close_chats(session_id);
    }

    fn run<'a>(&'a self, req: RunRequest, ctx: &'a ExecutionContext) -> RunFuture<'a> {
        Box::pin(self.pool.clone().turn(req, ctx))
    }
}

/// Whom a process serves.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owner {
    /// One agentd chat session.
    Chat(String),
    /// Tasks, each in a fresh ACP session.
    Task,
}

/// How an agent process ended.
#[derive(Debug, Clone)]
struct ExitInfo {
    end: RunEnd,
    /// The signal agentd stopped it with, when agentd did.
    stopped_with: Option<i32>,
}

/// One agent process and its connection.
struct AgentProc {
    id: u64,
    pid: u32,
    cx: ConnectionTo<Agent>,
    load_session: bool,
    routes: Arc<Routes>,
    started: Instant,
    exit: watch::Receiver<Option<ExitInfo>>,
    /// Asks its supervising task to stop it (the reason is in `stop_reason`).
    stop: CancellationToken,
    stop_reason: Mutex<Option<String>>,
    stderr: Arc<Mutex<Tail>>,
    /// Set once the process has answered a prompt.
    served: std::sync::atomic::AtomicBool,
    /// Its `AGENTD_EXECUTION_ID` tag (`acp-agent-<pid>-N`), which everything it
    /// starts inherits.
    tag: String,
    /// Its start time (`/proc` clock ticks): what carries its tag is younger.
    start_time: Option<u64>,
}

impl AgentProc {
    fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// Wait until the process has exited.
    async fn wait_exit(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        loop {
            if let Some(info) = rx.borrow_and_update().clone() {
                return info;
            }
            if rx.changed().await.is_err() {
                // The supervisor is gone without a word: it was dropped
                // (runtime shutdown), and its guard killed the group.
                return ExitInfo {
                    end: RunEnd::Signaled { signal: 9 },
                    stopped_with: Some(9),
                };
            }
        }
    }

    /// Stop the process (its whole group, SIGINT → SIGTERM → SIGKILL).
    fn stop(&self, reason: &str) {
        let mut r = self.stop_reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(reason.to_owned());
        }
        self.stop.cancel();
    }

    /// Kill what the agent's tools left running outside its process group
    /// (a `setsid` or double-forked escapee carries the agent's tag). The
    /// agent's own processes stay in its group and are left alone, so a warm
    /// agent keeps working; an escapee does not outlive the turn, as with
    /// the per-turn runtimes.
    async fn sweep_escapees(&self) -> SweepReport {
        let report = reaper::kill_tagged(
            EXECUTION_ID_ENV,
            &self.tag,
            self.start_time,
            Some(self.pid as i32),
            Instant::now() + EXECUTION_SWEEP_BOUND,
        )
        .await;
        if report.killed > 0 {
            tracing::info!(
                agent = self.id,
                pid = self.pid,
                escapees_killed = report.killed,
                "killed what the agent's tools left running outside its process group"
            );
        }
        report
    }

    fn stderr_tail(&self) -> String {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).text()
    }
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
    /// Starts that failed in a row, and when the next may be tried.
    failures: u32,
    retry_at: Option<Instant>,
}

struct Pool {
    opts: AcpOptions,
    state: Mutex<PoolState>,
    stats: Stats,
    /// Woken when a process is released, exits or is removed.
    changed: Notify,
    reaper_started: std::sync::Once,
}

/// Why a turn got no process.
enum NoAgent {
    Cancelled,
    TimedOut,
    /// The program could not be started at all.
    Spawn {
        reason: String,
    },
    /// It started but did not become an ACP agent.
    Start {
        reason: String,
        stderr: String,
    },
}

enum Next {
    Got(Arc<AgentProc>, Option<(String, String)>),
    Start(Option<Arc<AgentProc>>),
    Wait,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn report(&self) -> AgentsReport {
        let running = self.stats.running.load(Relaxed);
        let busy = self.stats.busy.load(Relaxed).min(running);
        let last = self.stats.last_restart.load_full();
        AgentsReport {
            running,
            busy,
            idle: running - busy,
            limit: self.opts.max_agents as u64,
            started: self.stats.started.load(Relaxed),
            restarts: self.stats.restarts.load(Relaxed),
            closed: self.stats.closed.load(Relaxed),
            last_restart_reason: last.as_ref().map(|l| l.1.clone()),
            last_restart_at: last.as_ref().map(|l| l.0),
            degraded: self.stats.degraded.load_full().map(|d| (*d).clone()),
        }
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
                    let started = self.start_agent(deadline, cancel).await;
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
    fn close_chats(&self, session_id: Option<&str>) {
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

    /// Start one agent and `initialize` it, after the back-off of earlier
    /// failed starts.
    async fn start_agent(
        self: &Arc<Self>,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<Arc<AgentProc>, NoAgent> {
        let retry_at = self.lock().retry_at;
        if let Some(at) = retry_at.filter(|at| *at > Instant::now()) {
            tokio::select! {
                _ = sleep_until(at) => {}
                _ = sleep_until(deadline) => return Err(NoAgent::TimedOut),
                _ = cancel.cancelled() => return Err(NoAgent::Cancelled),
            }
        }
        let id = NEXT_AGENT_ID.fetch_add(1, Relaxed);
        let result = self.spawn(id, deadline, cancel).await;
        match &result {
            Ok(_) => {}
            Err(NoAgent::Spawn { reason }) | Err(NoAgent::Start { reason, .. }) => {
                self.start_failed(reason)
            }
            Err(_) => {}
        }
        result
    }

    fn start_failed(&self, reason: &str) {
        let mut st = self.lock();
        st.failures = st.failures.saturating_add(1);
        let wait = BACKOFF_FIRST
            .saturating_mul(1 << st.failures.saturating_sub(1).min(16))
            .min(BACKOFF_MAX);
        st.retry_at = Some(Instant::now() + wait);
        let text = format!(
            "ACP agent failed to start {} time(s) in a row, next try in {} ms: {reason}",
            st.failures,
            wait.as_millis()
        );
        tracing::warn!("{text}");
        self.stats.degraded.store(Some(Arc::new(text)));
    }

    fn start_succeeded(&self) {
        let mut st = self.lock();
        st.failures = 0;
        st.retry_at = None;
        self.stats.degraded.store(None);
    }

    async fn spawn(
        self: &Arc<Self>,
        id: u64,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> Result<Arc<AgentProc>, NoAgent> {
        let opts = &self.opts;
        let (program, args) = opts
            .argv
            .split_first()
            .map_or(("", &[][..]), |(p, a)| (p.as_str(), a));
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(&opts.workdir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let tag = format!("acp-agent-{}-{id}", std::process::id());
        scrub_env(&mut cmd, &tag);
        for (name, value) in &opts.env {
            cmd.env(name, value);
        }
        start_with_default_signals(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| NoAgent::Spawn {
            reason: spawn_error_reason(&e),
        })?;
        let pid = child.id().unwrap_or(0);
        // tokio waits for it; the orphan reaper leaves it alone meanwhile.
        let tracked = reaper::track_child(pid);
        let start_time = reaper::read_stat(pid).map(|s| s.start_time);
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        self.stats.started.fetch_add(1, Relaxed);
        self.stats.running.fetch_add(1, Relaxed);

        let tail = Arc::new(Mutex::new(Tail::default()));
        tokio::spawn(read_stderr(stderr, tail.clone()));

        let routes = Arc::new(Routes::default());
        let (exit_tx, exit_rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let conn_done = CancellationToken::new();
        let (cx_tx, cx_rx) = tokio::sync::oneshot::channel();

        // The connection: the SDK's dispatch loop, our handlers.
        let outgoing =
            SinkExt::<String>::sink_map_err(FramedWrite::new(stdin, LinesCodec::new()), |e| {
                std::io::Error::other(e.to_string())
            });
        let incoming = FramedRead::new(stdout, LinesCodec::new_with_max_length(opts.max_line))
            .map(|line| line.map_err(|e| std::io::Error::other(e.to_string())));
        let transport = acp::Lines::new(outgoing, incoming);
        let conn = {
            let notes = routes.clone();
            let asks = routes.clone();
            let done = conn_done.clone();
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
        };
        let conn_task = tokio::spawn(conn);

        let agent_stop = stop.clone();
        let pool = Arc::downgrade(self);
        let grace = opts.kill_grace;
        let supervisor_done = conn_done.clone();
        let pgid = pid as i32;
        let sweep_tag = tag.clone();
        tokio::spawn(async move {
            let guard = GroupKill(pgid);
            let (end, stopped_with) = tokio::select! {
                status = child.wait() => (exit_end(status), None),
                _ = agent_stop.cancelled() => {
                    let signal = stop_child_group(&mut child, pgid, grace).await;
                    (RunEnd::Signaled { signal: signal as i32 }, Some(signal as i32))
                }
            };
            drop(tracked);
            // Whatever it started goes with it: its group, and what left it.
            drop(guard);
            reaper::kill_tagged(
                EXECUTION_ID_ENV,
                &sweep_tag,
                start_time,
                None,
                Instant::now() + EXECUTION_SWEEP_BOUND,
            )
            .await;
            supervisor_done.cancel();
            conn_task.abort();
            if let Some(pool) = pool.upgrade() {
                pool.exited(id, pid, end, stopped_with, exit_tx);
            } else {
                let _ = exit_tx.send(Some(ExitInfo { end, stopped_with }));
            }
        });

        let cx = tokio::select! {
            cx = cx_rx => cx.ok(),
            _ = sleep_until(deadline) => None,
        };
        let Some(cx) = cx else {
            return Err(self
                .abandon(
                    id,
                    pid,
                    &stop,
                    &exit_rx,
                    &tail,
                    "the ACP connection did not start",
                )
                .await);
        };
        let mut info = Implementation::new("agentd", env!("CARGO_PKG_VERSION"));
        info.title = Some("agentd".into());
        let init = cx
            .send_request(
                InitializeRequest::new(acp::schema::ProtocolVersion::V1).client_info(info),
            )
            .block_task();
        let mut exit_wait = exit_rx.clone();
        let init_deadline = deadline.min(Instant::now() + START_TIMEOUT);
        let answer = tokio::select! {
            r = init => Some(r),
            _ = exit_wait.wait_for(|e| e.is_some()) => None,
            _ = sleep_until(init_deadline) => None,
            _ = cancel.cancelled() => {
                stop.cancel();
                return Err(NoAgent::Cancelled);
            }
        };
        let response = match answer {
            Some(Ok(response)) => response,
            Some(Err(e)) => {
                let why = format!("initialize failed: {}", rpc_error_text(&e));
                return Err(self.abandon(id, pid, &stop, &exit_rx, &tail, &why).await);
            }
            None => {
                let why = if exit_rx.borrow().is_some() {
                    "the agent exited before answering initialize".to_owned()
                } else {
                    format!(
                        "no answer to initialize within {} s",
                        START_TIMEOUT.as_secs()
                    )
                };
                return Err(self.abandon(id, pid, &stop, &exit_rx, &tail, &why).await);
            }
        };
        self.start_succeeded();
        let load_session = response.agent_capabilities.load_session;
        tracing::info!(
            agent = id,
            pid,
            load_session,
            agent_name = response
                .agent_info
                .as_ref()
                .map(|i| i.name.as_str())
                .unwrap_or(""),
            agent_version = response
                .agent_info
                .as_ref()
                .map(|i| i.version.as_str())
                .unwrap_or(""),
            "ACP agent started"
        );
        Ok(Arc::new(AgentProc {
            id,
            pid,
            cx,
            load_session,
            routes,
            started: Instant::now(),
            exit: exit_rx,
            stop,
            stop_reason: Mutex::new(None),
            stderr: tail,
            served: std::sync::atomic::AtomicBool::new(false),
            tag,
            start_time,
        }))
    }

    /// A start that failed: stop the process, wait for it, and say why.
    async fn abandon(
        &self,
        id: u64,
        pid: u32,
        stop: &CancellationToken,
        exit: &watch::Receiver<Option<ExitInfo>>,
        tail: &Arc<Mutex<Tail>>,
        why: &str,
    ) -> NoAgent {
        stop.cancel();
        let mut exit = exit.clone();
        let _ = timeout(
            self.opts.kill_grace * 2 + Duration::from_secs(6),
            exit.wait_for(|e| e.is_some()),
        )
        .await;
        // What it said before it went is the reason a user needs: read
        // stderr to its end (its group is gone, so the pipe closes, unless
        // an escapee holds it: then what was read so far).
        let eof = tail.lock().unwrap_or_else(|e| e.into_inner()).eof.clone();
        let _ = timeout(STDERR_DRAIN, eof.cancelled()).await;
        let stderr = tail.lock().unwrap_or_else(|e| e.into_inner()).text();
        tracing::warn!(agent = id, pid, "ACP agent did not start: {why}");
        NoAgent::Start {
            reason: why.to_owned(),
            stderr,
        }
    }

    /// The supervising task saw process `id` exit.
    fn exited(
        &self,
        id: u64,
        pid: u32,
        end: RunEnd,
        stopped_with: Option<i32>,
        exit_tx: watch::Sender<Option<ExitInfo>>,
    ) {
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
                    self.start_failed(&why);
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
    async fn turn(self: Arc<Self>, req: RunRequest, ctx: &ExecutionContext) -> RunOutcome {
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
            pool: self,
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

/// SIGKILLs a process group when dropped.
struct GroupKill(i32);

impl Drop for GroupKill {
    fn drop(&mut self) {
        if self.0 > 0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

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

struct Turn<'a> {
    pool: &'a Arc<Pool>,
    agent: &'a Arc<AgentProc>,
    req: &'a RunRequest,
    ctx: &'a ExecutionContext,
    deadline: Instant,
}

impl Turn<'_> {
    /// Run the turn on the acquired agent; returns the outcome and the
    /// session the agent holds for the chat afterwards.
    async fn run(
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
        let workdir = self.pool.opts.workdir.clone();
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
            text: Mutex::new(TextAcc::new(self.pool.opts.max_line)),
            permissions: self.ctx.permissions.clone(),
            policy: self.pool.opts.permissions,
            permission_timeout: self.pool.opts.permission_timeout,
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
        let answer = match first {
            Ok(r) => r,
            Err(why) => {
                // Ask the agent to stop; it answers the prompt with
                // `cancelled` when it honours that.
                let _ = self
                    .agent
                    .cx
                    .send_notification(CancelNotification::new(session.to_owned()));
                sink.ended.cancel();
                let grace = self.pool.opts.kill_grace.max(Duration::from_millis(100));
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
                        return o;
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
                        return o;
                    }
                }
            }
        };
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

/// An SDK error as one line: its message, and its data when there is any
/// (Gemini CLI puts the model API's error there).
fn rpc_error_text(e: &acp::Error) -> String {
    match &e.data {
        Some(serde_json::Value::String(s)) => format!("{} ({})", e.message, s),
        Some(v) if !v.is_null() => format!("{} ({v})", e.message),
        _ => e.message.clone(),
    }
}

fn bounded(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

/// Removes a turn's route when the turn ends, however it ends.
struct RouteGuard<'a> {
    routes: &'a Routes,
    session: &'a str,
    sink: &'a Arc<TurnSink>,
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
struct Routes {
    turns: Mutex<HashMap<String, Arc<TurnSink>>>,
    replays: Mutex<HashMap<String, Arc<ReplayCount>>>,
}

impl Routes {
    fn count_replay(&self, session: &str, count: Arc<ReplayCount>) {
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

    fn insert(&self, session: &str, sink: Arc<TurnSink>) {
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
        let choices: Vec<PermissionChoice> = r
            .options
            .iter()
            .map(|o| PermissionChoice {
                option_id: o.option_id.0.to_string(),
                name: o.name.clone(),
                kind: kind_name(&o.kind).into(),
            })
            .collect();
        let tool_call = serde_json::to_value(&r.tool_call).unwrap_or_default();
        let title = r.tool_call.fields.title.clone().unwrap_or_default();
        let pick = |kinds: &[PermissionOptionKind]| {
            kinds.iter().find_map(|k| {
                r.options
                    .iter()
                    .find(|o| o.kind == *k)
                    .map(|o| o.option_id.0.to_string())
            })
        };
        let reject = pick(&[
            PermissionOptionKind::RejectOnce,
            PermissionOptionKind::RejectAlways,
        ]);
        let allow = pick(&[
            PermissionOptionKind::AllowOnce,
            PermissionOptionKind::AllowAlways,
        ]);
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
            PermissionPolicy::Ask => {
                let Some((pending, answer)) =
                    sink.permissions.ask(tool_call, choices, now_unix_ms())
                else {
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
                let sink = sink.clone();
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
        }
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

/// One update of a `session/load` replay, as the count sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Replayed {
    /// A chunk of a user message (with the message's id, when the agent
    /// gives one).
    User(Option<String>),
    /// A chunk of the agent's answer text.
    Answer(Option<String>),
    /// The rest of an agent's turn (thoughts, tool calls, plans): it ends a
    /// user message.
    Activity,
    /// Session-level news (commands, modes, usage, ...): no part of the
    /// conversation.
    Other,
}

impl Replayed {
    fn of(update: &SessionUpdate) -> Replayed {
        let id = |c: &acp::v1::schema::ContentChunk| c.message_id.as_ref().map(|m| m.0.to_string());
        match update {
            SessionUpdate::UserMessageChunk(c) => Replayed::User(id(c)),
            SessionUpdate::AgentMessageChunk(c) => Replayed::Answer(id(c)),
            SessionUpdate::AgentThoughtChunk(_)
            | SessionUpdate::ToolCall(_)
            | SessionUpdate::ToolCallUpdate(_)
            | SessionUpdate::Plan(_) => Replayed::Activity,
            _ => Replayed::Other,
        }
    }
}

/// The conversation a `session/load` replayed: its user messages (the
/// turns the agent holds) and answers. Consecutive chunks of one kind are
/// one message, unless their message ids differ.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct ReplayTally {
    users: u64,
    answers: u64,
    last: Option<Replayed>,
}

impl ReplayTally {
    fn see(&mut self, update: Replayed) {
        let continues = match (&self.last, &update) {
            (Some(Replayed::User(a)), Replayed::User(b))
            | (Some(Replayed::Answer(a)), Replayed::Answer(b)) => {
                a.is_none() || b.is_none() || a == b
            }
            _ => false,
        };
        match update {
            Replayed::User(_) if !continues => self.users += 1,
            Replayed::Answer(_) if !continues => self.answers += 1,
            Replayed::Other => return,
            _ => {}
        }
        self.last = Some(update);
    }

    /// True when the replay holds at least `turns` turns, each answered:
    /// nothing more of it is expected.
    fn covers(&self, turns: u64) -> bool {
        self.users >= turns && self.answers >= turns
    }
}

/// A replay being counted, for the turn that waits for it to complete.
#[derive(Default)]
struct ReplayCount {
    tally: Mutex<ReplayTally>,
    /// Woken at every counted update.
    changed: Notify,
}

impl ReplayCount {
    /// Runs in the SDK's dispatch loop; never waits.
    fn see(&self, update: &SessionUpdate) {
        self.tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .see(Replayed::of(update));
        self.changed.notify_waiters();
    }

    fn tally(&self) -> ReplayTally {
        self.tally.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Stops counting a session's replay when the load is over, however it ends.
struct ReplayGuard<'a> {
    routes: &'a Routes,
    session: &'a str,
}

impl Drop for ReplayGuard<'_> {
    fn drop(&mut self) {
        self.routes.stop_counting(self.session);
    }
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

/// Where one turn's updates go.
struct TurnSink {
    execution_id: String,
    output: Arc<OutputLog>,
    text: Mutex<TextAcc>,
    permissions: Arc<Permissions>,
    policy: PermissionPolicy,
    permission_timeout: Duration,
    /// Cancelled when the turn ends or is being cancelled: pending
    /// permission requests are then answered `cancelled`.
    ended: CancellationToken,
}

impl TurnSink {
    fn push_text(&self, text: &str) {
        self.output.push(text);
        self.text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(text);
    }

    fn text(&self) -> String {
        self.text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .text
            .clone()
    }

    fn truncated(&self) -> bool {
        self.text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .truncated
    }
}

/// A turn's answer text, bounded.
struct TextAcc {
    text: String,
    cap: usize,
    truncated: bool,
}

impl TextAcc {
    fn new(cap: usize) -> Self {
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

/// How long a failed start waits for the rest of the agent's stderr.
const STDERR_DRAIN: Duration = Duration::from_secs(1);

/// The last `STDERR_TAIL` bytes of an agent's stderr.
#[derive(Default)]
struct Tail {
    bytes: std::collections::VecDeque<u8>,
    /// Cancelled when the stderr pipe reached its end.
    eof: CancellationToken,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend(chunk);
        let over = self.bytes.len().saturating_sub(STDERR_TAIL);
        self.bytes.drain(..over);
    }

    fn text(&self) -> String {
        let (a, b) = self.bytes.as_slices();
        let mut v = a.to_vec();
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }
}

async fn read_stderr(mut stderr: tokio::process::ChildStderr, tail: Arc<Mutex<Tail>>) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 8192];
    while let Ok(n) = stderr.read(&mut buf).await {
        if n == 0 {
            break;
        }
        tail.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(&buf[..n]);
    }
    tail.lock().unwrap_or_else(|e| e.into_inner()).eof.cancel();
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

    fn update(json: serde_json::Value) -> SessionUpdate {
        serde_json::from_value(json).unwrap()
    }

    fn chunk(kind: &str, text: &str) -> SessionUpdate {
        update(
            serde_json::json!({"sessionUpdate": kind, "content": {"type": "text", "text": text}}),
        )
    }

    fn tally(updates: &[SessionUpdate]) -> ReplayTally {
        let mut t = ReplayTally::default();
        for u in updates {
            t.see(Replayed::of(u));
        }
        t
    }

    #[test]
    fn a_replay_counts_user_messages_and_answers() {
        let t = tally(&[
            chunk("user_message_chunk", "first"),
            chunk("agent_message_chunk", "one"),
            chunk("agent_message_chunk", " more"),
            chunk("user_message_chunk", "second,"),
            chunk("user_message_chunk", " in two chunks"),
            chunk("agent_thought_chunk", "hmm"),
            chunk("agent_message_chunk", "two"),
        ]);
        assert_eq!((t.users, t.answers), (2, 2));
        assert!(t.covers(2));
        assert!(!t.covers(3));
    }

    #[test]
    fn agent_activity_ends_a_user_message_and_session_news_does_not() {
        // Two prompts whose turns were only tool calls: two user messages.
        let call = update(serde_json::json!({
            "sessionUpdate": "tool_call", "toolCallId": "t1", "title": "ls"
        }));
        let t = tally(&[
            chunk("user_message_chunk", "list"),
            call.clone(),
            chunk("user_message_chunk", "again"),
            call,
        ]);
        assert_eq!((t.users, t.answers), (2, 0));
        assert!(!t.covers(2), "unanswered turns may still be on their way");
        // Commands announced in the middle of a message split nothing.
        let news = update(serde_json::json!({
            "sessionUpdate": "available_commands_update", "availableCommands": []
        }));
        let t = tally(&[
            chunk("user_message_chunk", "one message"),
            news,
            chunk("user_message_chunk", " still the same"),
        ]);
        assert_eq!(t.users, 1);
    }

    #[test]
    fn message_ids_tell_messages_apart() {
        let with_id = |kind: &str, id: &str| {
            update(serde_json::json!({
                "sessionUpdate": kind, "messageId": id,
                "content": {"type": "text", "text": "x"}
            }))
        };
        let t = tally(&[
            with_id("user_message_chunk", "m1"),
            with_id("user_message_chunk", "m1"),
            with_id("user_message_chunk", "m2"),
            with_id("agent_message_chunk", "a1"),
            with_id("agent_message_chunk", "a2"),
        ]);
        assert_eq!((t.users, t.answers), (2, 2));
    }

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

    #[test]
    fn stderr_tail_keeps_the_last_bytes() {
        let mut t = Tail::default();
        t.push(&vec![b'a'; STDERR_TAIL]);
        t.push(b"the end");
        let text = t.text();
        assert_eq!(text.len(), STDERR_TAIL);
        assert!(text.ends_with("the end"));
    }
}
