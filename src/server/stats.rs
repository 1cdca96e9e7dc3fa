//! Accept-loop counters: plain atomics, so `/health` reads them without a lock
//! and a wedged handler cannot hide them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Milliseconds since the Unix epoch (0 = never).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Default)]
pub struct AcceptStats {
    pub connections_total: AtomicU64,
    /// Connections turned away with 503 because the connection limit was hit.
    pub connections_rejected: AtomicU64,
    pub connections_open: AtomicU64,
    pub requests_total: AtomicU64,
    pub accept_errors: AtomicU64,
    last_accept_ms: AtomicU64,
    last_request_completed_ms: AtomicU64,
}

#[derive(Debug, Serialize)]
pub struct AcceptSnapshot {
    pub connections_total: u64,
    pub connections_open: u64,
    pub connections_rejected: u64,
    pub requests_total: u64,
    pub accept_errors: u64,
    /// Unix seconds, or null before the first one.
    pub last_accept_at: Option<f64>,
    pub last_request_completed_at: Option<f64>,
    /// Same as `last_request_completed_at`; the name users of other agent
    /// servers already script against.
    pub last_request_at: Option<f64>,
}

fn secs(ms: u64) -> Option<f64> {
    (ms != 0).then(|| ms as f64 / 1000.0)
}

impl AcceptStats {
    pub fn accepted(&self) {
        self.connections_total.fetch_add(1, Relaxed);
        self.last_accept_ms.store(now_unix_ms(), Relaxed);
    }

    pub fn request_completed(&self) {
        self.requests_total.fetch_add(1, Relaxed);
        self.last_request_completed_ms.store(now_unix_ms(), Relaxed);
    }

    pub fn snapshot(&self) -> AcceptSnapshot {
        let completed = secs(self.last_request_completed_ms.load(Relaxed));
        AcceptSnapshot {
            connections_total: self.connections_total.load(Relaxed),
            connections_open: self.connections_open.load(Relaxed),
            connections_rejected: self.connections_rejected.load(Relaxed),
            requests_total: self.requests_total.load(Relaxed),
            accept_errors: self.accept_errors.load(Relaxed),
            last_accept_at: secs(self.last_accept_ms.load(Relaxed)),
            last_request_completed_at: completed,
            last_request_at: completed,
        }
    }
}
