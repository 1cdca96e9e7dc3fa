//! The back-off of agent starts that keep failing: 0.5 s after the first
//! failure, doubling to 30 s, and the pool reported `degraded` (with the
//! reason) until a start succeeds.
//!
//! Only the bookkeeping: the starts are `agent_proc`'s, and what counts as
//! a failed start is decided where a start or an exit is seen. Imports
//! only `stats` of `acp/`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::stats::Stats;

/// First and longest wait before starting an agent again after starts that
/// failed (the agent exited, or never answered `initialize`).
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A process that exits within this long of its start, before it answered
/// any prompt, counts as a failed start for the back-off.
pub(super) const EARLY_EXIT: Duration = Duration::from_secs(10);

/// Starts that failed in a row, and when the next may be tried.
#[derive(Default)]
pub(super) struct Backoff {
    state: Mutex<BackoffState>,
}

#[derive(Default)]
struct BackoffState {
    failures: u32,
    retry_at: Option<Instant>,
}

impl Backoff {
    fn lock(&self) -> std::sync::MutexGuard<'_, BackoffState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the next start may be tried, after failed ones.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.lock().retry_at
    }

    /// A start failed: wait longer before the next, and say so in `/health`.
    pub(super) fn failed(&self, stats: &Stats, reason: &str) {
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
        stats.degraded.store(Some(Arc::new(text)));
    }

    /// A start succeeded: the next one need not wait.
    pub(super) fn succeeded(&self, stats: &Stats) {
        let mut st = self.lock();
        st.failures = 0;
        st.retry_at = None;
        stats.degraded.store(None);
    }
}
