//! The application state every handler, check and loop receives: config, the
//! shared state lock (history), the store handle, the runtime, counters.
//!
//! Invariant: anything `/health` reports is readable here without taking
//! `state` (mirrors in atomics), because a wedged handler may hold that lock.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use thiserror::Error;
use tokio::sync::Mutex;

use crate::accept::AcceptStats;
use crate::agent::executor::Executor;
use crate::agent::history::{History, Message};
use crate::agent::runtime::Runtime;
use crate::agent::runtimes::{self, RuntimeReport};
use crate::config::Config;
use crate::faults::Faults;
use crate::health::state::HealthState;
use crate::shutdown::Shutdown;
use crate::store::{CliSessionRecord, Store, StoreError, StoreThread};

/// Where the process is in its life, as `/health` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Lifecycle {
    Starting = 0,
    Running = 1,
    Stopping = 2,
}

/// State behind the shared state lock. Handlers hold it only for short,
/// non-blocking critical sections; the `state_lock` health check proves it can
/// still be taken.
#[derive(Debug)]
pub struct SharedState {
    pub history: History,
}

pub struct App {
    pub config: Config,
    pub stats: AcceptStats,
    /// The shared state lock. A tokio mutex: a waiter parks its task, never a
    /// runtime worker thread.
    pub state: Mutex<SharedState>,
    history_size: AtomicUsize,
    history_limit: AtomicUsize,
    pub store: Store,
    /// The one executor; it owns the runtime.
    pub executor: Arc<Executor>,
    pub started: Instant,
    pub shutdown: Shutdown,
    pub faults: Faults,
    /// The watchdog loop's state: verdict, counters, notifier, gauges.
    pub health: Arc<HealthState>,
    /// The runtime as `/health` reports it, computed at start (no I/O per
    /// request).
    pub runtime_report: RuntimeReport,
    /// The self-probe's own way into the accept loop, so it never competes
    /// with clients for a slot or the listen backlog.
    pub probe_door: Arc<crate::accept::ProbeDoor>,
    lifecycle: AtomicU8,
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid AGENTD_WORKDIR (workdir) {path}: {reason}")]
    Workdir {
        path: std::path::PathBuf,
        reason: String,
    },
    /// A file or directory the configured CLI needs (Codex's home, Gemini's
    /// workspace settings) could not be prepared.
    #[error("cannot prepare {what} {path}: {reason}")]
    RuntimeFiles {
        what: &'static str,
        path: std::path::PathBuf,
        reason: String,
    },
}

impl App {
    /// Open the store, load the newest `history_limit` messages back into
    /// memory, and assemble the state. `on_slow_step` reports long start-up
    /// steps (migrations) so the caller can extend its start timeout.
    pub async fn start(
        config: Config,
        runtime: Arc<dyn Runtime>,
        shutdown: Shutdown,
        health: HealthState,
        on_slow_step: &dyn Fn(&str),
    ) -> Result<(Arc<App>, StoreThread), StartError> {
        let (store, thread) = Store::open(&config.state_dir, &config.store, on_slow_step).await?;
        // After the store: the default work directory lives in the state dir.
        runtimes::prepare_workdir(&config.runtime.workdir).map_err(|reason| {
            StartError::Workdir {
                path: config.runtime.workdir.clone(),
                reason,
            }
        })?;
        runtimes::prepare_cli_files(&config.runtime)
            .map_err(|(what, path, reason)| StartError::RuntimeFiles { what, path, reason })?;
        let mut history = History::new(config.history_limit);
        for m in store.recent(config.history_limit).await? {
            history.push(m);
        }
        let app = App {
            history_size: AtomicUsize::new(history.len()),
            history_limit: AtomicUsize::new(history.limit()),
            state: Mutex::new(SharedState { history }),
            stats: AcceptStats::default(),
            store,
            executor: Executor::new(config.executor.clone(), runtime),
            started: Instant::now(),
            shutdown,
            faults: Faults::default(),
            health: Arc::new(health),
            runtime_report: RuntimeReport::new(&config.runtime),
            probe_door: Arc::default(),
            lifecycle: AtomicU8::new(Lifecycle::Starting as u8),
            config,
        };
        Ok((Arc::new(app), thread))
    }

    pub fn lifecycle(&self) -> Lifecycle {
        match self.lifecycle.load(Relaxed) {
            0 => Lifecycle::Starting,
            1 => Lifecycle::Running,
            _ => Lifecycle::Stopping,
        }
    }

    pub fn set_lifecycle(&self, l: Lifecycle) {
        self.lifecycle.store(l as u8, Relaxed);
    }

    pub fn runtime(&self) -> &Arc<dyn Runtime> {
        self.executor.runtime()
    }

    /// History size and limit, lock-free (for `/health`).
    pub fn history_gauges(&self) -> (usize, usize) {
        (
            self.history_size.load(Relaxed),
            self.history_limit.load(Relaxed),
        )
    }

    /// Durably store messages, then add them to the in-memory history. Returns
    /// only after the store committed them.
    pub async fn record(&self, messages: Vec<Message>) -> Result<(), StoreError> {
        self.record_turn(messages, None).await
    }

    /// `record`, plus the CLI session the turn ran in, committed in the same
    /// transaction: the next turn's resume decision reads it from the store.
    pub async fn record_turn(
        &self,
        messages: Vec<Message>,
        cli_session: Option<CliSessionRecord>,
    ) -> Result<(), StoreError> {
        self.store
            .append_turn(messages.clone(), cli_session)
            .await?;
        let mut state = self.state.lock().await;
        for m in messages {
            state.history.push(m);
        }
        self.history_size.store(state.history.len(), Relaxed);
        Ok(())
    }

    /// Clear memory and store (all sessions, or one); the session (or every
    /// session) continues in a new CLI session. Returns (in memory, in store).
    pub async fn clear_history(&self, session: Option<&str>) -> Result<(usize, u64), StoreError> {
        let deleted = self.store.clear(session.map(str::to_owned)).await?;
        let mut state = self.state.lock().await;
        let cleared = state.history.clear(session);
        self.history_size.store(state.history.len(), Relaxed);
        Ok((cleared, deleted))
    }

    /// Apply a new history limit (config reload).
    pub async fn set_history_limit(&self, limit: usize) {
        let mut state = self.state.lock().await;
        state.history.set_limit(limit);
        self.history_limit.store(state.history.limit(), Relaxed);
        self.history_size.store(state.history.len(), Relaxed);
    }
}
