//! Fault injection for the wedge tests: the switches the accept loop, the
//! executor and the health loop look at, and `inject`, which wedges a part by
//! name (`POST /debug/fault/{kind}` in `server::health` calls it; this file
//! knows nothing of HTTP or the router).
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
    leak_fd_per_tick: AtomicBool,
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

/// Wedge the named part now (the HTTP endpoint in `server::health` answers
/// first, then calls this). Knows nothing of HTTP.
#[cfg(feature = "fault-injection")]
pub fn inject(app: &std::sync::Arc<crate::app::App>, kind: &str) -> Result<(), FaultError> {
    use std::time::Duration;

    tracing::warn!(fault = %kind, "fault injection requested");
    match kind {
        "block-runtime" => {
            // Occupy every worker thread with a blocking wait, after this answer
            // had time to leave.
            let workers = tokio::runtime::Handle::current().metrics().num_workers();
            for _ in 0..workers + 1 {
                tokio::spawn(async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    loop {
                        std::thread::park();
                    }
                });
            }
        }
        "deadlock-state" => {
            let app = app.clone();
            tokio::spawn(async move {
                let _held = app.state.lock().await;
                std::future::pending::<()>().await;
            });
        }
        "stall-accept" => app.faults.stall_accept(),
        "hang-store" => {
            if !app.store.inject_hang() {
                return Err(FaultError::Unavailable("store queue is full".into()));
            }
        }
        "exhaust-fds" => {
            let mut leaked = 0usize;
            while let Ok(f) = std::fs::File::open("/dev/null") {
                std::mem::forget(f);
                leaked += 1;
            }
            tracing::warn!(leaked, "fault injection: file descriptors exhausted");
        }
        "stall-executor" => {
            app.executor.stall();
            // Queue work so the stall is observable.
            let _ = app.executor.submit(crate::agent::executor::Submission {
                kind: crate::agent::runtime::ExecutionKind::Task,
                session_id: "fault-injection".into(),
                prompt: "stalled".into(),
                timeout: Duration::from_secs(1),
                cli_session: None,
                transcript: None,
            });
        }
        "leak-fd-per-tick" => app.faults.leak_fd_per_tick.store(true, Ordering::SeqCst),
        _ => return Err(FaultError::Unknown(kind.to_owned())),
    }
    Ok(())
}
