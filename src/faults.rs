//! Fault injection for the wedge tests: `POST /debug/fault/{kind}`.
//!
//! Compiled in only with the `fault-injection` cargo feature (off in default and
//! release builds), answered only when `AGENTD_FAULT_INJECTION=1` and only on a
//! loopback listener. Without the feature every hook here is inert and costs
//! nothing. Each kind reproduces a wedge that other agent servers hit in
//! production, so the tests can prove the watchdog catches it.

#[cfg(feature = "fault-injection")]
use std::sync::atomic::{AtomicBool, Ordering};

/// Every kind the endpoint accepts.
pub const KINDS: &[&str] = &[
    "block-runtime",
    "deadlock-state",
    "stall-accept",
    "hang-store",
    "exhaust-fds",
    "stall-executor",
];

/// Switches the accept loop and executor look at. Inert without the feature.
#[derive(Debug, Default)]
pub struct Faults {
    #[cfg(feature = "fault-injection")]
    accept_stalled: AtomicBool,
    #[cfg(feature = "fault-injection")]
    accept_notify: tokio::sync::Notify,
    #[cfg(feature = "fault-injection")]
    executor_stalled: AtomicBool,
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

    #[cfg(feature = "fault-injection")]
    pub fn stall_accept(&self) {
        self.accept_stalled.store(true, Ordering::SeqCst);
        self.accept_notify.notify_waiters();
    }

    /// True when the executor must stop starting queued work.
    pub fn executor_stalled(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        {
            self.executor_stalled.load(Ordering::SeqCst)
        }
        #[cfg(not(feature = "fault-injection"))]
        false
    }

    #[cfg(feature = "fault-injection")]
    pub fn stall_executor(&self) {
        self.executor_stalled.store(true, Ordering::SeqCst);
    }
}

/// `POST /debug/fault/{kind}`.
#[cfg(feature = "fault-injection")]
pub async fn inject(
    app: &std::sync::Arc<crate::app::App>,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<crate::server::http::Body>, crate::server::http::ApiError> {
    use crate::server::http::ApiError;
    let kind = req
        .uri()
        .path()
        .trim_start_matches("/debug/fault/")
        .to_owned();
    if !app.config.fault_injection {
        return Err(ApiError::NotFound(req.uri().path().to_owned()));
    }
    if req.method() != http::Method::POST {
        return Err(crate::server::router::not_allowed(&req, "POST"));
    }
    Err(ApiError::bad(
        format!("unknown fault kind {kind:?}; known: {}", KINDS.join(", ")),
        "unknown_fault",
    ))
}
