//! What the store's threads publish without being asked, lock-free: the
//! commit counts (`/metrics`, the `store` check's proof), how long the last
//! proof of writing stands, whether the store thread is inside a request
//! and since when, and whether it waits for a write lock that another
//! process holds (an operator's `sqlite3` shell, a backup script).
//!
//! It sits below `store` and `store_sync`, which both write here.
//!
//! The store thread writes these atomics; the check reads them on the
//! tick's worker, so a tick between proofs needs no round trip to the
//! store thread and no SQLite call runs on an async worker. The lock wait
//! is SQLite's busy handler ([`Watch::busy_handler`]): it waits at most
//! [`BUSY_TIMEOUT`] for the lock, says so here while it waits, and after a
//! wait that ran out keeps later waits short until a write gets the lock
//! again, so writes answer 503 within the busy timeout instead of one
//! timeout each.
//!
//! Not here: SQL, the proofs themselves (`store`), the check's verdict
//! (`health::app_checks`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Longest SQLite waits for a write lock that another process holds (an
/// operator's `sqlite3` shell, a backup) before the write fails with
/// `database is locked`; agentd's own thread never contends with itself.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

/// After a wait that ran out, how long a later write waits for the lock
/// until one gets it again: a lock held for minutes answers each write 503
/// within this, not within a whole `BUSY_TIMEOUT` per write in the queue.
pub const BUSY_RETRY_WAIT: Duration = Duration::from_millis(100);

/// A wait for another process's lock shorter than this is contention, not
/// news: the `store` check reports the lock once a wait has lasted this
/// long, or once a wait ran out.
pub const LOCK_REPORT_AFTER: Duration = Duration::from_millis(250);

/// A request the store thread has been serving for longer than this is
/// looked at: the check stops reusing the last proof and queues a
/// heartbeat, which a hung thread does not answer. The longest request it
/// serves on purpose is a `quick_check` (250 ms budget) or a write waiting
/// for the lock (reported as such).
pub const STUCK_AFTER: Duration = Duration::from_secs(1);

/// Append transactions and rows committed since start: group commit shows as
/// many rows per commit.
#[derive(Debug, Default)]
pub struct CommitCounts {
    pub commits: AtomicU64,
    pub rows: AtomicU64,
    /// fsyncs of the WAL made by the store's sync thread (at
    /// `synchronous=full`; 0 at `normal`). One may cover several commits.
    pub syncs: AtomicU64,
    /// Writes of the API (appends, deletes, new generations) made durable
    /// so far: the `store` check's proof that writing works when it moved
    /// since the last tick (see `Worker::heartbeat`).
    pub durable_writes: AtomicU64,
    /// Set by the sync thread when an fsync of the WAL failed: every later
    /// write is refused, and no earlier proof of writing stands.
    pub sync_failed: AtomicBool,
}

/// Shared by the store thread (writer) and the `store` check (reader).
pub struct Watch {
    clock: Instant,
    /// Until when (ns after `clock`) the last proof of writing stands; 0:
    /// no proof stands (none yet, or a failure since).
    proof_until: AtomicU64,
    /// When the request being served started (ns after `clock`, plus 1);
    /// 0 while the thread waits for requests.
    busy_since: AtomicU64,
    /// When the store thread began to wait for a write lock held by another
    /// process (ns after `clock`, plus 1); 0 once a write got the lock.
    locked_since: AtomicU64,
    /// A wait ran out and no write got the lock since: later waits are
    /// `BUSY_RETRY_WAIT` long.
    gave_up: AtomicBool,
    /// The store thread is inside SQLite's busy handler now: from its
    /// first call until it gives up or a write got the lock.
    waiting: AtomicBool,
    /// A heartbeat is queued or being served: a tick that finds the lock
    /// reported does not queue another behind it.
    heartbeat_pending: AtomicBool,
    /// Woken when a lock wait has lasted `LOCK_REPORT_AFTER` or ran out, so
    /// a check waiting for the store thread's answer can say why it is
    /// late instead of waiting out its deadline.
    lock_news: Notify,
}

impl Default for Watch {
    fn default() -> Self {
        Watch {
            clock: Instant::now(),
            proof_until: AtomicU64::new(0),
            busy_since: AtomicU64::new(0),
            locked_since: AtomicU64::new(0),
            gave_up: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            heartbeat_pending: AtomicBool::new(false),
            lock_news: Notify::new(),
        }
    }
}

impl Watch {
    fn now(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64 + 1
    }

    fn age(&self, since: u64) -> Duration {
        Duration::from_nanos(self.now().saturating_sub(since))
    }

    /// The last proof of writing stands until `until`.
    pub fn proved_until(&self, until: Instant) {
        let ns = until.saturating_duration_since(self.clock).as_nanos() as u64;
        self.proof_until.store(ns.max(1), Relaxed);
    }

    /// No proof stands: the next tick proves writing again.
    pub fn clear_proof(&self) {
        self.proof_until.store(0, Relaxed);
    }

    /// Whether the last proof still stands now.
    pub fn proof_stands(&self) -> bool {
        let until = self.proof_until.load(Relaxed);
        until != 0 && self.now() <= until
    }

    /// The store thread starts (`true`) or ends (`false`) serving a request.
    pub fn serving(&self, busy: bool) {
        self.busy_since
            .store(if busy { self.now() } else { 0 }, Relaxed);
    }

    /// Whether the store thread is waiting for another process's lock now.
    pub fn waiting(&self) -> bool {
        self.waiting.load(Relaxed)
    }

    /// Whether the store thread has been inside one request for longer
    /// than `STUCK_AFTER`.
    pub fn stuck(&self) -> bool {
        let since = self.busy_since.load(Relaxed);
        since != 0 && self.age(since) > STUCK_AFTER
    }

    /// A write got the lock: contention, if there was any, is over.
    pub fn got_lock(&self) {
        self.waiting.store(false, Relaxed);
        self.locked_since.store(0, Relaxed);
        self.gave_up.store(false, Relaxed);
    }

    /// How long another process has kept the store from the write lock,
    /// once that is worth reporting (see `LOCK_REPORT_AFTER`).
    pub fn locked_for(&self) -> Option<Duration> {
        let since = self.locked_since.load(Relaxed);
        if since == 0 {
            return None;
        }
        let age = self.age(since);
        (age >= LOCK_REPORT_AFTER || self.gave_up.load(Relaxed)).then_some(age)
    }

    /// The check's reason while the lock is held elsewhere.
    pub fn locked_reason(held: Duration) -> String {
        format!(
            "database is locked: another process has held the write lock of state.db for {} ms",
            held.as_millis()
        )
    }

    /// A heartbeat was queued (`true`), or the store thread is done with it
    /// or it was never taken (`false`).
    pub fn heartbeat_queued(&self, queued: bool) {
        self.heartbeat_pending.store(queued, Relaxed);
    }

    pub fn heartbeat_pending(&self) -> bool {
        self.heartbeat_pending.load(Relaxed)
    }

    /// Woken on lock news; `enable` the future before reading the state.
    pub fn lock_news(&self) -> tokio::sync::futures::Notified<'_> {
        self.lock_news.notified()
    }

    /// SQLite's busy handler for the store's connection: called with the
    /// number of earlier calls in this wait, it sleeps a little and says
    /// whether to try again. The wait is bounded by `BUSY_TIMEOUT`, or by
    /// `BUSY_RETRY_WAIT` after a wait that ran out and before any write got
    /// the lock again.
    pub fn busy_handler(watch: std::sync::Arc<Watch>) -> impl FnMut(i32) -> bool + Send + 'static {
        let mut started = Instant::now();
        let mut budget = BUSY_TIMEOUT;
        let mut reported = false;
        move |count| {
            let now = Instant::now();
            if count == 0 {
                started = now;
                reported = false;
                budget = if watch.gave_up.load(Relaxed) {
                    BUSY_RETRY_WAIT
                } else {
                    BUSY_TIMEOUT
                };
                let _ = watch
                    .locked_since
                    .compare_exchange(0, watch.now(), Relaxed, Relaxed);
                watch.waiting.store(true, Relaxed);
            }
            let waited = now - started;
            if waited >= budget {
                watch.gave_up.store(true, Relaxed);
                watch.waiting.store(false, Relaxed);
                watch.lock_news.notify_waiters();
                return false;
            }
            if !reported && watch.locked_for().is_some() {
                reported = true;
                watch.lock_news.notify_waiters();
            }
            // As SQLite's own handler: short sleeps first, then 25 ms.
            let step = match count {
                0 => 1,
                1 => 2,
                2 => 5,
                3 => 10,
                4 => 15,
                5 => 20,
                _ => 25,
            };
            std::thread::sleep(Duration::from_millis(step).min(budget - waited));
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_wait_that_ran_out_makes_later_waits_short_until_a_write_gets_the_lock() {
        let watch = Arc::new(Watch::default());
        let mut wait = Watch::busy_handler(watch.clone());
        let started = Instant::now();
        let mut count = 0;
        while wait(count) {
            count += 1;
        }
        assert!(started.elapsed() >= BUSY_TIMEOUT);
        let held = watch.locked_for().expect("a wait that ran out is reported");
        assert!(held >= BUSY_TIMEOUT, "{held:?}");

        let again = Instant::now();
        let mut count = 0;
        while wait(count) {
            count += 1;
        }
        let short = again.elapsed();
        assert!(
            short >= BUSY_RETRY_WAIT && short < BUSY_TIMEOUT,
            "{short:?}"
        );

        watch.got_lock();
        assert_eq!(watch.locked_for(), None);
        let fresh = Instant::now();
        let mut count = 0;
        while wait(count) {
            count += 1;
        }
        assert!(fresh.elapsed() >= BUSY_TIMEOUT);
    }

    #[test]
    fn a_short_wait_is_not_reported() {
        let watch = Arc::new(Watch::default());
        let mut wait = Watch::busy_handler(watch.clone());
        assert!(wait(0));
        assert_eq!(watch.locked_for(), None);
        watch.got_lock();
        assert_eq!(watch.locked_for(), None);
    }

    #[test]
    fn a_proof_stands_until_its_time_and_not_after_a_failure() {
        let watch = Watch::default();
        assert!(!watch.proof_stands());
        watch.proved_until(Instant::now() + Duration::from_secs(60));
        assert!(watch.proof_stands());
        watch.clear_proof();
        assert!(!watch.proof_stands());
        watch.proved_until(Instant::now() - Duration::from_millis(1));
        assert!(!watch.proof_stands());
    }
}
