//! The executor: one per process. It admits executions (bounded queue → 429
//! beyond), runs at most `max_concurrent` at once, keeps chat messages of one
//! session in order, and remembers running executions plus a bounded ring of
//! finished ones for `GET /api/executions/{id}`.
//!
//! Not here: what a runtime does with a prompt (`runtime`, `process`), or how an
//! outcome becomes an HTTP status (`classify`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{oneshot, watch, Semaphore};

use super::classify::{classify, Classified};
use super::replay::ReplayBudget;
use super::runtime::{ExecutionContext, ExecutionKind, RunOutcome, RunRequest, Runtime};
use crate::clock::{now_unix_ms, unix_now};
use crate::config::ExecutorConfig;

/// Where an execution is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Queued,
    Running,
    Finished,
}

/// What a finished execution produced.
// One value per execution, stored once behind its mutex: the size difference
// between variants costs nothing, boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Finish {
    /// It ran; the outcome and its classification.
    Ran {
        outcome: RunOutcome,
        classified: Classified,
        /// Wall time from start to end, as agentd measured it.
        duration_ms: u64,
    },
    /// Cancelled while it still waited for a slot.
    CancelledBeforeStart,
}

/// One execution. Shared by the executor, the request that started it and
/// anyone streaming or polling it.
pub struct Execution {
    pub id: String,
    pub kind: ExecutionKind,
    pub session_id: String,
    pub created_at: f64,
    pub ctx: ExecutionContext,
    started_at: Mutex<Option<f64>>,
    finished_at: Mutex<Option<f64>>,
    finish: Mutex<Option<Finish>>,
    /// Flips to `Finished` exactly once; waiters and SSE streams watch it.
    phase: watch::Sender<Phase>,
    /// SSE subscribers right now (capped by `max_subscribers`).
    pub subscribers: AtomicUsize,
}

impl Execution {
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub fn subscribe_phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    pub fn finish(&self) -> Option<Finish> {
        self.finish.lock().unwrap().clone()
    }

    pub fn started_at(&self) -> Option<f64> {
        *self.started_at.lock().unwrap()
    }

    pub fn finished_at(&self) -> Option<f64> {
        *self.finished_at.lock().unwrap()
    }

    /// Wait until it finished.
    pub async fn finished(&self) -> Finish {
        let mut rx = self.phase.subscribe();
        // The sender lives in `self`, so the channel cannot close under us.
        let _ = rx.wait_for(|p| *p == Phase::Finished).await;
        self.finish().expect("finished executions have a result")
    }

    /// Ask it to stop (SIGINT → SIGTERM → SIGKILL if it runs; never starts if
    /// queued).
    pub fn cancel(&self) {
        self.ctx.cancel.cancel();
    }

    pub fn pid(&self) -> Option<u32> {
        match self.ctx.pid.load(Relaxed) {
            0 => None,
            p => Some(p),
        }
    }
}

/// What `submit` refuses.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("executor is full: {running} running, {queued} queued (limit {limit}); retry later")]
    QueueFull {
        running: usize,
        queued: usize,
        limit: usize,
    },
    #[error("server is shutting down")]
    ShuttingDown,
}

/// Lock-free numbers for `/health` and the `executor` check.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ExecutorGauges {
    pub running: usize,
    /// Admitted and not started (including chats waiting for an earlier chat
    /// of their session).
    pub queued: usize,
    /// Queued executions that only wait for a free slot.
    pub waiting_for_slot: usize,
    pub free_slots: usize,
    pub started_total: u64,
    /// Unix ms of the last start (0 = never).
    pub last_started_ms: u64,
    /// Bytes all replay buffers hold together, and their bound
    /// (`stream_replay_total`).
    pub replay_bytes: usize,
    pub replay_limit: usize,
}

/// Outcomes an execution can end with, as counted by [`CompletionCounts`]:
/// the `status` of its classification, or `cancelled` when it never started.
pub const OUTCOMES: [&str; 4] = ["success", "failed", "timeout", "cancelled"];

/// Kinds counted by [`CompletionCounts`], in the order of its rows.
pub const KINDS: [ExecutionKind; 2] = [ExecutionKind::Chat, ExecutionKind::Task];

/// Finished executions by kind and outcome: a fixed table of atomics, so
/// `/metrics` reads it without a lock and counting costs one `fetch_add`.
#[derive(Debug, Default)]
pub struct CompletionCounts {
    table: [[AtomicU64; OUTCOMES.len()]; KINDS.len()],
}

impl CompletionCounts {
    fn record(&self, kind: ExecutionKind, finish: &Finish) {
        let status = match finish {
            Finish::Ran { classified, .. } => classified.status,
            Finish::CancelledBeforeStart => "cancelled",
        };
        let row = KINDS.iter().position(|k| *k == kind);
        // `classify` only produces the statuses in OUTCOMES; anything else
        // would be a new classification row, counted as failed until listed.
        let col = OUTCOMES.iter().position(|o| *o == status).unwrap_or(1);
        if let Some(row) = row {
            self.table[row][col].fetch_add(1, Relaxed);
        }
    }

    /// Executions of `kind` that ended with `outcome` (one of [`OUTCOMES`]).
    pub fn get(&self, kind: ExecutionKind, outcome: &str) -> u64 {
        let row = KINDS.iter().position(|k| *k == kind);
        let col = OUTCOMES.iter().position(|o| *o == outcome);
        match (row, col) {
            (Some(r), Some(c)) => self.table[r][c].load(Relaxed),
            _ => 0,
        }
    }
}

/// The newest execution of each session; the next chat of that session waits
/// for its `done` receiver before it may start.
struct SessionTail {
    execution_id: String,
    done: Option<oneshot::Receiver<()>>,
}

struct Registry {
    /// Queued and running executions.
    active: HashMap<String, Arc<Execution>>,
    /// Finished executions, oldest first, at most `finished_retained`.
    finished: VecDeque<Arc<Execution>>,
    finished_index: HashMap<String, Arc<Execution>>,
    sessions: HashMap<String, SessionTail>,
    closed: bool,
}

pub struct Executor {
    config: ExecutorConfig,
    runtime: Arc<dyn Runtime>,
    slots: Arc<Semaphore>,
    registry: Mutex<Registry>,
    queued: AtomicUsize,
    waiting_for_slot: AtomicUsize,
    running: AtomicUsize,
    started_total: AtomicU64,
    last_started_ms: AtomicU64,
    /// Fault injection: when set, nothing queued starts.
    stalled: Arc<std::sync::atomic::AtomicBool>,
    /// Signalled whenever an execution leaves `active` (for `idle`).
    idle: tokio::sync::Notify,
    /// Signalled whenever an execution starts (for the `executor` check).
    started: tokio::sync::Notify,
    /// Finished executions by kind and outcome (for `/metrics`).
    completions: CompletionCounts,
    /// The bound on every execution's replay buffer together.
    replay: Arc<ReplayBudget>,
}

/// What a caller wants run.
pub struct Submission {
    pub kind: ExecutionKind,
    pub session_id: String,
    pub prompt: String,
    pub timeout: Duration,
    /// The CLI session a chat turn continues (see `agent::sessions`).
    pub cli_session: Option<super::sessions::CliSession>,
    /// agentd's transcript of the chat session, for a runtime whose agent
    /// lost context (see `RunRequest::transcript`).
    pub transcript: Option<super::runtime::TranscriptSource>,
}

impl Executor {
    pub fn new(config: ExecutorConfig, runtime: Arc<dyn Runtime>) -> Arc<Executor> {
        Arc::new(Executor {
            slots: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            replay: ReplayBudget::new(config.stream_replay_total),
            config,
            runtime,
            registry: Mutex::new(Registry {
                active: HashMap::new(),
                finished: VecDeque::new(),
                finished_index: HashMap::new(),
                sessions: HashMap::new(),
                closed: false,
            }),
            queued: AtomicUsize::new(0),
            waiting_for_slot: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            started_total: AtomicU64::new(0),
            last_started_ms: AtomicU64::new(0),
            stalled: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            idle: tokio::sync::Notify::new(),
            started: tokio::sync::Notify::new(),
            completions: CompletionCounts::default(),
        })
    }

    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        &self.runtime
    }

    pub fn config(&self) -> &ExecutorConfig {
        &self.config
    }

    /// Finished executions by kind and outcome, lock-free.
    pub fn completions(&self) -> &CompletionCounts {
        &self.completions
    }

    pub fn gauges(&self) -> ExecutorGauges {
        ExecutorGauges {
            running: self.running.load(Relaxed),
            queued: self.queued.load(Relaxed),
            waiting_for_slot: self.waiting_for_slot.load(Relaxed),
            free_slots: self.slots.available_permits(),
            started_total: self.started_total.load(Relaxed),
            last_started_ms: self.last_started_ms.load(Relaxed),
            replay_bytes: self.replay.held(),
            replay_limit: self.replay.limit(),
        }
    }

    /// Fault injection: stop starting queued work.
    pub fn stall(&self) {
        self.stalled.store(true, Relaxed);
    }

    /// Admit an execution, or refuse when `max_queue` executions already wait
    /// and no slot is free.
    pub fn submit(self: &Arc<Self>, s: Submission) -> Result<Arc<Execution>, Rejected> {
        let execution = Arc::new(Execution {
            id: uuid::Uuid::new_v4().to_string(),
            kind: s.kind,
            session_id: s.session_id.clone(),
            created_at: unix_now(),
            ctx: ExecutionContext::with_budget(
                self.config.stream_buffer,
                self.config.stream_replay_bytes,
                self.replay.clone(),
            ),
            started_at: Mutex::new(None),
            finished_at: Mutex::new(None),
            finish: Mutex::new(None),
            phase: watch::channel(Phase::Queued).0,
            subscribers: AtomicUsize::new(0),
        });
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let predecessor = {
            let mut reg = self.registry.lock().unwrap();
            if reg.closed {
                return Err(Rejected::ShuttingDown);
            }
            let queued = self.queued.load(Relaxed);
            let free = self.slots.available_permits() > queued;
            if !free && queued >= self.config.max_queue {
                return Err(Rejected::QueueFull {
                    running: self.running.load(Relaxed),
                    queued,
                    limit: self.config.max_queue,
                });
            }
            self.queued.fetch_add(1, Relaxed);
            reg.active.insert(execution.id.clone(), execution.clone());
            if s.kind == ExecutionKind::Chat {
                // Chats of one session run one at a time, in arrival order: each
                // waits for the one admitted before it.
                let tail = SessionTail {
                    execution_id: execution.id.clone(),
                    done: Some(done_rx),
                };
                reg.sessions
                    .insert(s.session_id.clone(), tail)
                    .and_then(|mut prev| prev.done.take())
            } else {
                None
            }
        };
        let request = RunRequest {
            execution_id: execution.id.clone(),
            session_id: s.session_id,
            kind: s.kind,
            prompt: s.prompt,
            timeout: s.timeout,
            cli_session: s.cli_session,
            transcript: s.transcript,
        };
        let this = self.clone();
        let exec = execution.clone();
        tokio::spawn(async move {
            this.drive(exec, request, predecessor).await;
            drop(done_tx);
        });
        Ok(execution)
    }

    async fn drive(
        &self,
        exec: Arc<Execution>,
        request: RunRequest,
        predecessor: Option<oneshot::Receiver<()>>,
    ) {
        let cancel = exec.ctx.cancel.clone();
        if let Some(prev) = predecessor {
            tokio::select! {
                _ = prev => {}
                _ = cancel.cancelled() => {}
            }
        }
        self.waiting_for_slot.fetch_add(1, Relaxed);
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            p = self.acquire_slot() => p,
        };
        self.waiting_for_slot.fetch_sub(1, Relaxed);
        self.queued.fetch_sub(1, Relaxed);
        let Some(permit) = permit else {
            self.complete(&exec, Finish::CancelledBeforeStart);
            return;
        };
        self.running.fetch_add(1, Relaxed);
        self.started_total.fetch_add(1, Relaxed);
        self.last_started_ms.store(now_unix_ms(), Relaxed);
        *exec.started_at.lock().unwrap() = Some(unix_now());
        exec.phase.send_replace(Phase::Running);
        self.started.notify_waiters();
        let started = Instant::now();
        let outcome = self.runtime.run(request, &exec.ctx).await;
        let duration_ms = started.elapsed().as_millis() as u64;
        let classified = classify(&outcome);
        log_failure(&exec, &outcome, &classified);
        drop(permit);
        self.running.fetch_sub(1, Relaxed);
        self.complete(
            &exec,
            Finish::Ran {
                outcome,
                classified,
                duration_ms,
            },
        );
    }

    async fn acquire_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if self.stalled.load(Relaxed) {
            std::future::pending::<()>().await;
        }
        self.slots.clone().acquire_owned().await.ok()
    }

    fn complete(&self, exec: &Arc<Execution>, finish: Finish) {
        self.completions.record(exec.kind, &finish);
        *exec.finish.lock().unwrap() = Some(finish);
        *exec.finished_at.lock().unwrap() = Some(unix_now());
        {
            let mut reg = self.registry.lock().unwrap();
            reg.active.remove(&exec.id);
            if reg
                .sessions
                .get(&exec.session_id)
                .is_some_and(|t| t.execution_id == exec.id)
            {
                reg.sessions.remove(&exec.session_id);
            }
            if self.config.finished_retained > 0 {
                while reg.finished.len() >= self.config.finished_retained {
                    if let Some(old) = reg.finished.pop_front() {
                        reg.finished_index.remove(&old.id);
                    }
                }
                reg.finished.push_back(exec.clone());
                reg.finished_index.insert(exec.id.clone(), exec.clone());
            }
        }
        // Its output is now the first to give back when the total is full.
        self.replay.finished(&exec.ctx.output);
        exec.phase.send_replace(Phase::Finished);
        self.idle.notify_waiters();
    }

    pub fn get(&self, id: &str) -> Option<Arc<Execution>> {
        let reg = self.registry.lock().unwrap();
        reg.active
            .get(id)
            .or_else(|| reg.finished_index.get(id))
            .cloned()
    }

    /// Queued and running executions, oldest first.
    pub fn active(&self) -> Vec<Arc<Execution>> {
        let reg = self.registry.lock().unwrap();
        let mut v: Vec<_> = reg.active.values().cloned().collect();
        v.sort_by(|a, b| a.created_at.total_cmp(&b.created_at));
        v
    }

    /// Resolves at the next start of an execution. Create the future before
    /// reading `gauges()` so a start in between is not missed.
    pub fn next_start(&self) -> tokio::sync::futures::Notified<'_> {
        self.started.notified()
    }

    /// Refuse new work and cancel everything queued or running.
    pub fn close_and_cancel_all(&self) {
        let active: Vec<_> = {
            let mut reg = self.registry.lock().unwrap();
            reg.closed = true;
            reg.active.values().cloned().collect()
        };
        for e in active {
            e.cancel();
        }
    }

    /// Wait until nothing is queued or running, at most `limit`. True if idle.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.idle.notified();
            if self.registry.lock().unwrap().active.is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }
}

/// Characters of stderr quoted in a failure's log record.
const LOGGED_STDERR_CHARS: usize = 300;

/// One `warn` record per failed execution (never a cancelled one, never the
/// prompt): enough to tell from the journal what broke.
fn log_failure(exec: &Execution, outcome: &RunOutcome, c: &Classified) {
    if c.status == "success" || c.status == "cancelled" {
        return;
    }
    let stderr = outcome.stderr_tail.trim_end();
    let count = stderr.chars().count();
    let stderr_tail: String = stderr
        .chars()
        .skip(count.saturating_sub(LOGGED_STDERR_CHARS))
        .collect();
    tracing::warn!(
        execution_id = %exec.id,
        kind = exec.kind.as_str(),
        code = c.code.unwrap_or_default(),
        http_status = c.http_status,
        exit_status = ?outcome.end,
        stderr_tail = %stderr_tail,
        "execution failed: {}",
        c.message.as_deref().unwrap_or_default()
    );
}
