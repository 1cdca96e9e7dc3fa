//! One agent process and its supervision: starting it (its own process
//! group, a scrubbed environment with its tag, the connection, `initialize`),
//! the task that waits for it and, when it exits or is stopped, kills what
//! it left (its group, and what carries its tag outside it) and reports the
//! exit; the sweep of escapees after each turn. A failed start counts
//! against the back-off (`backoff`); its stderr's tail (`stderr`) says why.
//!
//! Must not: know the pool (the supervising task reports an exit through
//! the `OnExit` it is given) or a turn; let a process outlive its
//! supervising task; wait on the process or its pipes without a bound. It
//! sits above `client`, `backoff`, `stderr`, `options` and `stats`, below
//! `turn` and `pool`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use acp::v1::schema::{Implementation, InitializeRequest, InitializeResponse};
use acp::v1::ConnectionTo;
use acp::Agent;
use agent_client_protocol as acp;
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::client::{self, rpc_error_text, Routes};
use super::options::AcpOptions;
use super::stats::Stats;
use super::stderr::{read_stderr, Tail};
use crate::agent::process::{
    exit_end, scrub_env, spawn_error_reason, start_with_default_signals, stop_child_group,
    EXECUTION_ID_ENV,
};
use crate::agent::runtime::RunEnd;
use crate::init::reaper::{self, SweepReport, TrackedChild, EXECUTION_SWEEP_BOUND};

/// How long a new agent process has to answer `initialize`. Gemini CLI 0.61
/// answers in about 1.7 s on an idle two-core machine; a Node agent on a
/// loaded one takes several times that.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a failed start waits for the rest of the agent's stderr.
const STDERR_DRAIN: Duration = Duration::from_secs(1);

/// The id of the next agent process, unique in the process (not per pool):
/// its tag (`acp-agent-<agentd's pid>-N`) is what the sweep of an exited
/// agent kills, so neither two pools in one process (tests start several
/// servers) nor two agentd processes on one host may share one.
static NEXT_AGENT_ID: AtomicU64 = AtomicU64::new(1);

/// How an agent process ended.
#[derive(Debug, Clone)]
pub(super) struct ExitInfo {
    pub(super) end: RunEnd,
    /// The signal agentd stopped it with, when agentd did.
    pub(super) stopped_with: Option<i32>,
}

/// One agent process and its connection.
pub(super) struct AgentProc {
    /// Its number in this agentd process (logs, its tag).
    pub(super) id: u64,
    pub(super) pid: u32,
    /// The connection, through which turns send their requests.
    pub(super) cx: ConnectionTo<Agent>,
    /// It offers `session/load` (its `initialize` answer said so).
    pub(super) load_session: bool,
    /// Where its updates go: the running turn of each ACP session.
    pub(super) routes: Arc<Routes>,
    /// When it answered `initialize`: a young exit is a failed start.
    pub(super) started: Instant,
    /// Set by the supervising task once the process has exited.
    exit: watch::Receiver<Option<ExitInfo>>,
    /// Asks its supervising task to stop it (the reason is in `stop_reason`).
    stop: CancellationToken,
    pub(super) stop_reason: Mutex<Option<String>>,
    stderr: Arc<Mutex<Tail>>,
    /// Set once the process has answered a prompt.
    pub(super) served: AtomicBool,
    /// Its `AGENTD_EXECUTION_ID` tag (`acp-agent-<pid>-N`), which everything it
    /// starts inherits.
    tag: String,
    /// Its start time (`/proc` clock ticks): what carries its tag is younger.
    start_time: Option<u64>,
}

impl AgentProc {
    pub(super) fn exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    /// Wait until the process has exited.
    pub(super) async fn wait_exit(&self) -> ExitInfo {
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
    pub(super) fn stop(&self, reason: &str) {
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
    pub(super) async fn sweep_escapees(&self) -> SweepReport {
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

    pub(super) fn stderr_tail(&self) -> String {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).text()
    }
}

/// Why a turn got no process.
pub(super) enum NoAgent {
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

/// What the supervising task reports once its process has exited and what
/// it left is gone. Whoever receives it must publish `info` on `exit_tx`:
/// that is what every wait for the process's exit waits for.
pub(super) struct Exited {
    pub(super) id: u64,
    pub(super) pid: u32,
    pub(super) end: RunEnd,
    /// The signal agentd stopped it with, when agentd did.
    pub(super) stopped_with: Option<i32>,
    pub(super) exit_tx: watch::Sender<Option<ExitInfo>>,
}

/// Where a supervising task reports its process's exit (the pool, which
/// this room does not know).
pub(super) type OnExit = Box<dyn FnOnce(Exited) + Send>;

/// What starting an agent takes from its pool: the settings, the counters
/// it adds to, and the back-off of failed starts.
pub(super) struct Starter<'a> {
    pub(super) opts: &'a AcpOptions,
    pub(super) stats: &'a Stats,
    pub(super) backoff: &'a Backoff,
}

impl Starter<'_> {
    /// Start one agent and `initialize` it, after the back-off of earlier
    /// failed starts.
    pub(super) async fn start(
        &self,
        deadline: Instant,
        cancel: &CancellationToken,
        on_exit: OnExit,
    ) -> Result<Arc<AgentProc>, NoAgent> {
        let retry_at = self.backoff.retry_at();
        if let Some(at) = retry_at.filter(|at| *at > Instant::now()) {
            tokio::select! {
                _ = sleep_until(at) => {}
                _ = sleep_until(deadline) => return Err(NoAgent::TimedOut),
                _ = cancel.cancelled() => return Err(NoAgent::Cancelled),
            }
        }
        let id = NEXT_AGENT_ID.fetch_add(1, Relaxed);
        let result = self.spawn(id, deadline, cancel, on_exit).await;
        match &result {
            Ok(_) => {}
            Err(NoAgent::Spawn { reason }) | Err(NoAgent::Start { reason, .. }) => {
                self.backoff.failed(self.stats, reason)
            }
            Err(_) => {}
        }
        result
    }

    /// Start process `id` and make it an ACP agent (`initialize`), within
    /// the turn's deadline and cancel; a start that fails is stopped,
    /// waited for and explained.
    async fn spawn(
        &self,
        id: u64,
        deadline: Instant,
        cancel: &CancellationToken,
        on_exit: OnExit,
    ) -> Result<Arc<AgentProc>, NoAgent> {
        let (launched, cx_rx) = self.launch(id, on_exit)?;
        let (cx, response) =
            match initialize(cx_rx, &launched.exit, &launched.stop, deadline, cancel).await {
                Ok(up) => up,
                Err(None) => return Err(NoAgent::Cancelled),
                Err(Some(why)) => return Err(self.abandon(&launched, &why).await),
            };
        self.backoff.succeeded(self.stats);
        Ok(launched.into_agent(cx, &response))
    }

    /// Start the process, its stderr reader, its connection and its
    /// supervising task. The connection arrives on the receiver once up.
    fn launch(
        &self,
        id: u64,
        on_exit: OnExit,
    ) -> Result<(Launched, oneshot::Receiver<ConnectionTo<Agent>>), NoAgent> {
        let opts = self.opts;
        let tag = format!("acp-agent-{}-{id}", std::process::id());
        let mut child = command(opts, &tag).spawn().map_err(|e| NoAgent::Spawn {
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
        let (cx_tx, cx_rx) = oneshot::channel();

        // The connection: the SDK's dispatch loop, our handlers.
        let conn = client::connect(
            id,
            stdin,
            stdout,
            opts.max_line,
            routes.clone(),
            cx_tx,
            conn_done.clone(),
        );
        let conn_task = tokio::spawn(conn);

        tokio::spawn(
            Supervised {
                id,
                pid,
                child,
                tracked,
                start_time,
                tag: tag.clone(),
                stop: stop.clone(),
                grace: opts.kill_grace,
                conn_done,
                conn_task,
                exit_tx,
                on_exit,
            }
            .run(),
        );
        let launched = Launched {
            id,
            pid,
            routes,
            exit: exit_rx,
            stop,
            tail,
            tag,
            start_time,
        };
        Ok((launched, cx_rx))
    }

    /// A start that failed: stop the process, wait for it, and say why.
    async fn abandon(&self, launched: &Launched, why: &str) -> NoAgent {
        let Launched {
            id,
            pid,
            stop,
            exit,
            tail,
            ..
        } = launched;
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
}

/// The agent's command: its own process group, piped stdio, agentd's
/// scrubbed environment with the agent's tag, the configured variables,
/// default signal dispositions.
fn command(opts: &AcpOptions, tag: &str) -> Command {
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
    scrub_env(&mut cmd, tag);
    for (name, value) in &opts.env {
        cmd.env(name, value);
    }
    start_with_default_signals(&mut cmd);
    cmd
}

/// Wait for the connection, then for the answer to `initialize`, within
/// the deadline and `START_TIMEOUT`. `Err(None)`: the turn was cancelled
/// (the process is told to stop); `Err(Some(why))`: the start failed.
async fn initialize(
    cx_rx: oneshot::Receiver<ConnectionTo<Agent>>,
    exit_rx: &watch::Receiver<Option<ExitInfo>>,
    stop: &CancellationToken,
    deadline: Instant,
    cancel: &CancellationToken,
) -> Result<(ConnectionTo<Agent>, InitializeResponse), Option<String>> {
    let cx = tokio::select! {
        cx = cx_rx => cx.ok(),
        _ = sleep_until(deadline) => None,
    };
    let Some(cx) = cx else {
        return Err(Some("the ACP connection did not start".to_owned()));
    };
    let mut info = Implementation::new("agentd", env!("CARGO_PKG_VERSION"));
    info.title = Some("agentd".into());
    let init = cx
        .send_request(InitializeRequest::new(acp::schema::ProtocolVersion::V1).client_info(info))
        .block_task();
    let mut exit_wait = exit_rx.clone();
    let init_deadline = deadline.min(Instant::now() + START_TIMEOUT);
    let answer = tokio::select! {
        r = init => Some(r),
        _ = exit_wait.wait_for(|e| e.is_some()) => None,
        _ = sleep_until(init_deadline) => None,
        _ = cancel.cancelled() => {
            stop.cancel();
            return Err(None);
        }
    };
    match answer {
        Some(Ok(response)) => Ok((cx, response)),
        Some(Err(e)) => Err(Some(format!("initialize failed: {}", rpc_error_text(&e)))),
        None => {
            let why = if exit_rx.borrow().is_some() {
                "the agent exited before answering initialize".to_owned()
            } else {
                format!(
                    "no answer to initialize within {} s",
                    START_TIMEOUT.as_secs()
                )
            };
            Err(Some(why))
        }
    }
}

/// A process started but not yet an ACP agent: what a failed start stops
/// and explains, and what a successful one becomes (`AgentProc`).
struct Launched {
    id: u64,
    pid: u32,
    routes: Arc<Routes>,
    exit: watch::Receiver<Option<ExitInfo>>,
    stop: CancellationToken,
    tail: Arc<Mutex<Tail>>,
    tag: String,
    start_time: Option<u64>,
}

impl Launched {
    /// The process answered `initialize`: it is an agent.
    fn into_agent(self, cx: ConnectionTo<Agent>, response: &InitializeResponse) -> Arc<AgentProc> {
        let Launched {
            id,
            pid,
            routes,
            exit,
            stop,
            tail,
            tag,
            start_time,
        } = self;
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
        Arc::new(AgentProc {
            id,
            pid,
            cx,
            load_session,
            routes,
            started: Instant::now(),
            exit,
            stop,
            stop_reason: Mutex::new(None),
            stderr: tail,
            served: AtomicBool::new(false),
            tag,
            start_time,
        })
    }
}

/// What a process's supervising task owns: the child itself, and what goes
/// with it when it exits.
struct Supervised {
    id: u64,
    pid: u32,
    child: Child,
    /// Keeps the orphan reaper off the child while tokio waits for it.
    tracked: TrackedChild,
    start_time: Option<u64>,
    /// The agent's `AGENTD_EXECUTION_ID`, for the sweep of what it left.
    tag: String,
    /// Cancelled to have the process stopped (SIGINT → SIGTERM → SIGKILL).
    stop: CancellationToken,
    grace: Duration,
    /// Ends the connection's dispatch loop once the process is gone.
    conn_done: CancellationToken,
    conn_task: JoinHandle<()>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    on_exit: OnExit,
}

impl Supervised {
    /// Wait for the process (or stop it when asked), then kill what it
    /// left, end its connection and report the exit. Dropped unfinished
    /// (runtime shutdown), its guard SIGKILLs the group.
    async fn run(self) {
        let Supervised {
            id,
            pid,
            mut child,
            tracked,
            start_time,
            tag: sweep_tag,
            stop: agent_stop,
            grace,
            conn_done: supervisor_done,
            conn_task,
            exit_tx,
            on_exit,
        } = self;
        let pgid = pid as i32;
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
        on_exit(Exited {
            id,
            pid,
            end,
            stopped_with,
            exit_tx,
        });
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
