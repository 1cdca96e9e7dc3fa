//! Fault injection for the wedge tests: the switches the accept loop, the
//! executor and the health loop look at, and the kinds there are. What
//! wedges a part by name (`inject`) sits with the endpoint that asks for it
//! (`POST /debug/fault/{kind}`, `server::health`), above the parts it acts
//! on; this room imports nothing of the crate, so `App` can hold it.
//!
//! Compiled in only with the `fault-injection` cargo feature (off in default and
//! release builds), answered only when `AGENTD_FAULT_INJECTION=1` and only on a
//! loopback listener. Without the feature every hook here is inert and costs
//! nothing. Each kind reproduces a wedge that other agent servers hit in
//! production, so the tests can prove the watchdog catches it.

use std::sync::atomic::AtomicBool;
#[cfg(feature = "fault-injection")]
use std::sync::atomic::Ordering;

/// Every kind the endpoint accepts.
pub const KINDS: &[&str] = &[
    "block-runtime",
    "deadlock-state",
    "stall-accept",
    "hang-store",
    "exhaust-fds",
    "stall-executor",
    "leak-fd-per-tick",
];

/// Switches the accept loop and executor look at. Inert without the feature.
#[derive(Debug, Default)]
pub struct Faults {
    /// Set by the accept loop: fault injection answers only on a loopback
    /// (or Unix) listener.
    pub loopback_listener: AtomicBool,
    #[cfg(feature = "fault-injection")]
    accept_stalled: AtomicBool,
    #[cfg(feature = "fault-injection")]
    accept_notify: tokio::sync::Notify,
    /// `leak-fd-per-tick`: every health tick opens `/dev/null` and forgets
    /// the descriptor, a slow leak for the trend tests (unlike
    /// `exhaust-fds`, which fills the table at once).
    #[cfg(feature = "fault-injection")]
    pub leak_fd_per_tick: AtomicBool,
}

impl Faults {
    /// Resolves when the accept loop must stop accepting; never without the
    /// feature.
    pub async fn accept_stalled(&self) {
        #[cfg(feature = "fault-injection")]
        {
            let notified = self.accept_notify.notified();
            if self.accept_stalled.load(Ordering::SeqCst) {
                return;
            }
            notified.await
        }
        #[cfg(not(feature = "fault-injection"))]
        std::future::pending::<()>().await
    }

    /// Called by the health loop at the start of every tick; leaks one fd
    /// while `leak-fd-per-tick` is on. Does nothing without the feature.
    pub fn on_health_tick(&self) {
        #[cfg(feature = "fault-injection")]
        if self.leak_fd_per_tick.load(Ordering::SeqCst) {
            if let Ok(f) = std::fs::File::open("/dev/null") {
                std::mem::forget(f);
            }
        }
    }

    #[cfg(feature = "fault-injection")]
    pub fn stall_accept(&self) {
        self.accept_stalled.store(true, Ordering::SeqCst);
        self.accept_notify.notify_waiters();
    }
}

/// Why a fault could not be injected.
#[cfg(feature = "fault-injection")]
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("unknown fault kind {0:?}; known: {known}", known = KINDS.join(", "))]
    Unknown(String),
    #[error("{0}")]
    Unavailable(String),
}
