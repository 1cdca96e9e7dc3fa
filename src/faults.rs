//! Fault injection for the wedge tests: `POST /debug/fault/{kind}`.
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
}

/// `POST /debug/fault/{kind}`: answer 200, then wedge the named part.
#[cfg(feature = "fault-injection")]
pub async fn inject(
    app: &std::sync::Arc<crate::app::App>,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<crate::server::http::Body>, crate::server::http::ApiError> {
    use crate::server::http::ApiError;
    use std::time::Duration;

    let path = req.uri().path().to_owned();
    let kind = path.trim_start_matches("/debug/fault/").to_owned();
    if !app.config.fault_injection || !app.faults.loopback_listener.load(Ordering::SeqCst) {
        return Err(ApiError::NotFound(path));
    }
    if req.method() != http::Method::POST {
        return Err(crate::server::router::not_allowed(&req, "POST"));
    }
    tracing::warn!(fault = %kind, "fault injection requested");
    match kind.as_str() {
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
                return Err(ApiError::Unavailable("store queue is full".into()));
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
            });
        }
        _ => {
            return Err(ApiError::bad(
                format!("unknown fault kind {kind:?}; known: {}", KINDS.join(", ")),
                "unknown_fault",
            ))
        }
    }
    Ok(crate::server::http::json(
        http::StatusCode::OK,
        &serde_json::json!({"fault": kind, "injected": true}),
    ))
}
