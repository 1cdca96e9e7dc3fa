//! What the accept loop shares with the rooms around it: its counters
//! (plain atomics, so `/health` reads them without a lock and a wedged
//! handler cannot hide them; the recent rejection rate and the saturation
//! flag: load, reported, never a reason to stop petting), and the probe
//! door, the self-probe's own way into the loop.
//!
//! Below `app` (which holds both), `server` (whose loop fills the counters
//! and serves the door) and `health` (which reads the counters and knocks
//! at the door), so none of them imports another for these.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use tokio::io::DuplexStream;

use crate::clock::now_unix_ms;

use serde::Serialize;

/// Seconds of rejections the recent rate averages over. Long enough that a
/// burst shows in a `/health` read a second later, short enough that the rate
/// falls back to 0 soon after a flood ends.
pub const REJECT_RATE_WINDOW_S: u64 = 5;

/// One-second buckets kept (the window plus the second being filled).
const REJECT_BUCKETS: usize = REJECT_RATE_WINDOW_S as usize + 1;

#[derive(Debug, Default)]
pub struct AcceptStats {
    pub connections_total: AtomicU64,
    /// Connections turned away with 503 because the connection limit was hit.
    pub connections_rejected: AtomicU64,
    pub connections_open: AtomicU64,
    /// Client slots in use (the probe's reserved slots not counted), compared
    /// with `connections_max` to say "saturated".
    pub client_slots_used: AtomicUsize,
    /// The client connection cap (`AGENTD_MAX_CONNECTIONS`), set when the
    /// accept loop starts.
    pub connections_max: AtomicUsize,
    /// Self-probe connections served while every client slot was taken:
    /// proof that the probe did not compete with clients.
    pub probe_connections_reserved: AtomicU64,
    pub requests_total: AtomicU64,
    pub accept_errors: AtomicU64,
    last_accept_ms: AtomicU64,
    last_request_completed_ms: AtomicU64,
    /// Rejections per second for the last few seconds: bucket i counts the
    /// rejections of the second stored in `reject_epochs[i]`. Racy by design
    /// (two threads may reset a bucket at once and lose a count): it is a
    /// rate for people, not a counter; `connections_rejected` is exact.
    reject_counts: [AtomicU64; REJECT_BUCKETS],
    reject_epochs: [AtomicU64; REJECT_BUCKETS],
}

#[derive(Debug, Serialize)]
pub struct AcceptSnapshot {
    pub connections_total: u64,
    pub connections_open: u64,
    pub connections_rejected: u64,
    /// Client connection cap (`AGENTD_MAX_CONNECTIONS`).
    pub connections_max: usize,
    /// True when every client slot is taken or connections were turned away
    /// in the last `REJECT_RATE_WINDOW_S` seconds. Load, not a wedge.
    pub saturated: bool,
    /// Connections turned away per second over the last
    /// `REJECT_RATE_WINDOW_S` seconds.
    pub rejected_per_second: f64,
    /// Self-probe connections served while every client slot was taken.
    pub probe_connections_reserved: u64,
    pub requests_total: u64,
    pub accept_errors: u64,
    /// Unix seconds, or null before the first one.
    pub last_accept_at: Option<f64>,
    pub last_request_completed_at: Option<f64>,
    /// Same as `last_request_completed_at`; the name users of other agent
    /// servers already script against.
    pub last_request_at: Option<f64>,
}

/// [`AcceptSnapshot`] in integers, for `/health`'s integer formatting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptCounts {
    pub connections_total: u64,
    pub connections_open: u64,
    pub connections_rejected: u64,
    pub connections_max: usize,
    pub saturated: bool,
    /// Rejections in the last `REJECT_RATE_WINDOW_S` whole seconds:
    /// `rejected_per_second` is this over the window.
    pub rejected_in_window: u64,
    pub probe_connections_reserved: u64,
    pub requests_total: u64,
    pub accept_errors: u64,
    /// Unix ms, 0 before the first one.
    pub last_accept_ms: u64,
    pub last_request_completed_ms: u64,
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

    /// Count one connection turned away at the cap.
    pub fn rejected(&self) {
        self.connections_rejected.fetch_add(1, Relaxed);
        self.count_rejection_at(now_unix_ms() / 1000);
    }

    fn count_rejection_at(&self, second: u64) {
        let i = (second % REJECT_BUCKETS as u64) as usize;
        if self.reject_epochs[i].swap(second, Relaxed) != second {
            self.reject_counts[i].store(0, Relaxed);
        }
        self.reject_counts[i].fetch_add(1, Relaxed);
    }

    /// Rejections in the last `REJECT_RATE_WINDOW_S` whole seconds before
    /// `now_s`.
    fn rejected_in_window_at(&self, now_s: u64) -> u64 {
        let since = now_s.saturating_sub(REJECT_RATE_WINDOW_S);
        (0..REJECT_BUCKETS)
            .filter(|&i| {
                let epoch = self.reject_epochs[i].load(Relaxed);
                epoch >= since && epoch < now_s
            })
            .map(|i| self.reject_counts[i].load(Relaxed))
            .sum()
    }

    /// Rejections per second over the last `REJECT_RATE_WINDOW_S` whole
    /// seconds before `now_s`.
    fn rejected_per_second_at(&self, now_s: u64) -> f64 {
        self.rejected_in_window_at(now_s) as f64 / REJECT_RATE_WINDOW_S as f64
    }

    /// Rejections per second, recently (see `REJECT_RATE_WINDOW_S`).
    pub fn rejected_per_second(&self) -> f64 {
        self.rejected_per_second_at(now_unix_ms() / 1000)
    }

    /// Whether the last second being filled saw a rejection (the rate only
    /// counts whole seconds).
    fn rejected_this_second(&self, now_s: u64) -> bool {
        let i = (now_s % REJECT_BUCKETS as u64) as usize;
        self.reject_epochs[i].load(Relaxed) == now_s && self.reject_counts[i].load(Relaxed) > 0
    }

    /// Saturated: every client slot is taken, or connections were turned
    /// away recently.
    pub fn saturation(&self) -> Saturation {
        let now_s = now_unix_ms() / 1000;
        let rate = self.rejected_per_second_at(now_s);
        let used = self.client_slots_used.load(Relaxed);
        let max = self.connections_max.load(Relaxed);
        Saturation {
            saturated: (max > 0 && used >= max) || rate > 0.0 || self.rejected_this_second(now_s),
            used,
            max,
            rejected_per_second: rate,
        }
    }

    /// The same numbers as [`snapshot`](Self::snapshot), as integers: what
    /// `/health` writes without a float formatter (times in unix ms, 0 for
    /// never; the rate as rejections in the window).
    pub fn counts(&self) -> AcceptCounts {
        let now_s = now_unix_ms() / 1000;
        let rejected_in_window = self.rejected_in_window_at(now_s);
        let used = self.client_slots_used.load(Relaxed);
        let max = self.connections_max.load(Relaxed);
        AcceptCounts {
            connections_total: self.connections_total.load(Relaxed),
            connections_open: self.connections_open.load(Relaxed),
            connections_rejected: self.connections_rejected.load(Relaxed),
            connections_max: max,
            saturated: (max > 0 && used >= max)
                || rejected_in_window > 0
                || self.rejected_this_second(now_s),
            rejected_in_window,
            probe_connections_reserved: self.probe_connections_reserved.load(Relaxed),
            requests_total: self.requests_total.load(Relaxed),
            accept_errors: self.accept_errors.load(Relaxed),
            last_accept_ms: self.last_accept_ms.load(Relaxed),
            last_request_completed_ms: self.last_request_completed_ms.load(Relaxed),
        }
    }

    pub fn snapshot(&self) -> AcceptSnapshot {
        let completed = secs(self.last_request_completed_ms.load(Relaxed));
        let sat = self.saturation();
        AcceptSnapshot {
            connections_total: self.connections_total.load(Relaxed),
            connections_open: self.connections_open.load(Relaxed),
            connections_rejected: self.connections_rejected.load(Relaxed),
            connections_max: sat.max,
            saturated: sat.saturated,
            rejected_per_second: sat.rejected_per_second,
            probe_connections_reserved: self.probe_connections_reserved.load(Relaxed),
            requests_total: self.requests_total.load(Relaxed),
            accept_errors: self.accept_errors.load(Relaxed),
            last_accept_at: secs(self.last_accept_ms.load(Relaxed)),
            last_request_completed_at: completed,
            last_request_at: completed,
        }
    }
}

/// The accept loop's load, as `/health` and `STATUS=` report it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Saturation {
    pub saturated: bool,
    /// Client slots in use and the cap.
    pub used: usize,
    pub max: usize,
    pub rejected_per_second: f64,
}

impl Saturation {
    /// `busy: connections 1024/1024, 35 rejected/s` when saturated.
    pub fn busy_summary(&self) -> Option<String> {
        self.saturated.then(|| {
            format!(
                "busy: connections {}/{}, {} rejected/s",
                self.used,
                self.max,
                self.rejected_per_second.round() as u64
            )
        })
    }
}

/// Self-probe connections served at once (a tick and a `?deep=1` run may
/// overlap); slots beside the client cap that only the probe takes, and the
/// bound of the probe door's queue.
pub const PROBE_RESERVED_SLOTS: usize = 2;

/// The self-probe's own way into the accept loop (see the module doc).
pub struct ProbeDoor {
    tx: tokio::sync::mpsc::Sender<DuplexStream>,
    /// Taken once by the accept loop.
    rx: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<DuplexStream>>>,
}

/// Bytes either end of a probe connection buffers: several times a probe's
/// request (about 100 bytes) and its answer (about 150).
const PROBE_PIPE_BYTES: usize = 4096;

/// Why the probe could not get through its door.
#[derive(Debug, thiserror::Error)]
pub enum ProbeDoorError {
    #[error("the accept loop has stopped")]
    Closed,
}

impl Default for ProbeDoor {
    fn default() -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(PROBE_RESERVED_SLOTS);
        ProbeDoor {
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
        }
    }
}

impl ProbeDoor {
    /// A connection to the accept loop: our end of an in-memory byte pipe
    /// whose other end the loop serves. Waits for room in the door's queue
    /// (a stalled loop never makes room; the caller's deadline decides).
    ///
    /// In memory, not a socket pair: what the probe proves is the loop, hyper
    /// and the handler, and a kernel pipe cost every tick a dozen system
    /// calls (the pair, four epoll registrations, the closes) and wake-ups
    /// through the I/O driver. The kernel's side (the listener, its accept
    /// queue, fds) is watched by the loop's counters and `resources`.
    pub async fn connect(&self) -> Result<DuplexStream, ProbeDoorError> {
        let (ours, theirs) = tokio::io::duplex(PROBE_PIPE_BYTES);
        self.tx
            .send(theirs)
            .await
            .map_err(|_| ProbeDoorError::Closed)?;
        Ok(ours)
    }

    /// The accept loop takes the other side of the door, once.
    pub fn take_receiver(&self) -> Option<tokio::sync::mpsc::Receiver<DuplexStream>> {
        self.rx.lock().ok().and_then(|mut rx| rx.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_rate_counts_whole_recent_seconds_only() {
        let s = AcceptStats::default();
        for _ in 0..10 {
            s.count_rejection_at(100);
        }
        for _ in 0..5 {
            s.count_rejection_at(101);
        }
        // At 102 both seconds are in the window: 15 over 5 s.
        assert_eq!(s.rejected_per_second_at(102), 3.0);
        // The second being filled does not count yet.
        s.count_rejection_at(102);
        assert_eq!(s.rejected_per_second_at(102), 3.0);
        // Long after, the window is empty again, and a reused bucket restarts.
        assert_eq!(s.rejected_per_second_at(200), 0.0);
        // 300 lands in the bucket that held 102: it restarts from zero.
        assert_eq!(300 % REJECT_BUCKETS, 102 % REJECT_BUCKETS);
        s.count_rejection_at(300);
        assert_eq!(s.rejected_per_second_at(301), 0.2);
    }

    #[test]
    fn saturated_when_every_client_slot_is_taken() {
        let s = AcceptStats::default();
        s.connections_max.store(4, Relaxed);
        s.client_slots_used.store(3, Relaxed);
        assert!(!s.saturation().saturated);
        assert_eq!(s.saturation().busy_summary(), None);
        s.client_slots_used.store(4, Relaxed);
        let sat = s.saturation();
        assert!(sat.saturated);
        assert_eq!(
            sat.busy_summary().as_deref(),
            Some("busy: connections 4/4, 0 rejected/s")
        );
    }
}
