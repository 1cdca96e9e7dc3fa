//! The application state every handler, check and loop receives: config, the
//! shared state lock (history), the store handle, the runtime, counters.
//!
//! Invariant: anything `/health` reports is readable here without taking
//! `state` (mirrors in atomics), because a wedged handler may hold that lock.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use thiserror::Error;
use tokio::sync::Mutex;

use crate::agent::executor::Executor;
use crate::agent::history::{History, Message};
use crate::agent::runtime::Runtime;
use crate::config::Config;
use crate::faults::Faults;
use crate::health::watchdog::HealthState;
use crate::server::stats::AcceptStats;
use crate::shutdown::Shutdown;
use crate::store::{Store, StoreError, StoreThread};

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
    /// The self-probe's own way into the accept loop, so it never competes
    /// with clients for a slot or the listen backlog.
    pub probe_door: Arc<crate::server::ProbeDoor>,
    lifecycle: AtomicU8,
}

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
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
        let (store, thread) = Store::open(&config.state_dir, &config.store, on_slow_step)?;
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

    /// True when the session already has messages in memory (a runtime that
    /// keeps its own sessions then resumes instead of starting fresh).
    pub async fn session_seen(&self, session: &str) -> bool {
        let state = self.state.lock().await;
        !state.history.recent(Some(session), 1).is_empty()
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
        self.store.append(messages.clone()).await?;
        let mut state = self.state.lock().await;
        for m in messages {
            state.history.push(m);
        }
        self.history_size.store(state.history.len(), Relaxed);
        Ok(())
    }

    /// Clear memory and store (all sessions, or one). Returns (in memory, in store).
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
