//! The pool's counters, as atomics, and the `AgentsReport` made of them.
//!
//! Lock-free on purpose: `/health`, `/metrics` and `/status` read the pool
//! through `report`, and must never wait for the pool's lock. The pool and
//! each process's supervision write the counters; nothing here decides
//! anything or imports another room of `acp/`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use arc_swap::ArcSwapOption;

use crate::agent::runtime::AgentsReport;

/// What `/health` shows of the pool, kept where no lock is needed to read it.
#[derive(Default)]
pub(super) struct Stats {
    /// Agent processes alive: from their start until supervision saw them exit.
    pub(super) running: AtomicU64,
    /// Of them, holding a turn (acquired, not yet released).
    pub(super) busy: AtomicU64,
    pub(super) started: AtomicU64,
    /// Processes that died or were killed for not answering.
    pub(super) restarts: AtomicU64,
    /// Idle processes closed on purpose (idle, room, a deleted session).
    pub(super) closed: AtomicU64,
    /// When (Unix seconds) and why the last restart happened.
    pub(super) last_restart: ArcSwapOption<(u64, String)>,
    /// Set by the back-off while starts keep failing: the reason.
    pub(super) degraded: ArcSwapOption<String>,
}

impl Stats {
    /// The pool now; `limit` is its bound (`max_agents`).
    pub(super) fn report(&self, limit: usize) -> AgentsReport {
        let running = self.running.load(Relaxed);
        let busy = self.busy.load(Relaxed).min(running);
        let last = self.last_restart.load_full();
        AgentsReport {
            running,
            busy,
            idle: running - busy,
            limit: limit as u64,
            started: self.started.load(Relaxed),
            restarts: self.restarts.load(Relaxed),
            closed: self.closed.load(Relaxed),
            last_restart_reason: last.as_ref().map(|l| l.1.clone()),
            last_restart_at: last.as_ref().map(|l| l.0),
            degraded: self.degraded.load_full().map(|d| (*d).clone()),
        }
    }
}
