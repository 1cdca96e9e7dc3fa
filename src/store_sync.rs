//! The store's sync thread: makes committed batches durable, so the store
//! thread can fill and commit the next batch while an fsync runs
//! (pipelined group commit at `synchronous=full`).
//!
//! The store thread commits a batch (SQLite at `synchronous=NORMAL`: the
//! frames are in the WAL, not yet on disk) and hands the batch's answers
//! here. This thread takes every batch handed over, calls `fdatasync` on
//! the WAL once for all of them, and only then answers them: acknowledged
//! still means committed and on disk. SQLite's own syncs at a checkpoint
//! are unchanged.
//!
//! It holds a second descriptor of `state.db-wal`, never a SQLite
//! connection: the one connection stays with the store thread. An fsync
//! that fails answers its batches with the error and is remembered: after
//! a failed fsync the kernel may have dropped the pages, so the store
//! refuses every later write (the `store` check says why).
//!
//! Not here: SQL, the proofs about `state.db` (`store`, `store_file`).

use std::fs::File;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::store_watch::CommitCounts;

/// What one committed batch is waiting for: its answers, given once the WAL
/// is on disk (`Err` with the reason the WAL cannot be written: the fsync
/// failed, now or before).
pub struct SyncJob {
    pub answer: Box<dyn FnOnce(Result<(), String>) + Send>,
    /// API writes in the batch (not the heartbeat), for `durable_writes`.
    pub writes: u64,
}

/// Shared by the store thread and the sync thread.
#[derive(Default)]
struct Shared {
    /// Batches handed over and not yet answered.
    pending: Mutex<usize>,
    /// Signalled when `pending` falls to 0.
    idle: Condvar,
    /// The first failed fsync, for every later write.
    failed: Mutex<Option<String>>,
    /// When the last fsync succeeded.
    last_ok: Mutex<Option<Instant>>,
}

/// The store thread's handle on the sync thread.
pub struct Syncer {
    tx: Option<SyncSender<SyncJob>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Start the sync thread for `wal` (the WAL file SQLite writes), with
    /// room for `queue` committed batches waiting.
    pub fn start(wal: File, queue: usize, counts: Arc<CommitCounts>) -> std::io::Result<Syncer> {
        let (tx, rx) = sync_channel(queue.max(1));
        let shared = Arc::new(Shared::default());
        let thread = std::thread::Builder::new()
            .name("agentd-store-sync".into())
            .spawn({
                let shared = shared.clone();
                move || run(wal, rx, shared, counts)
            })?;
        Ok(Syncer {
            tx: Some(tx),
            shared,
            thread: Some(thread),
        })
    }

    /// Hand a committed batch over. Blocks only while `queue` batches
    /// already wait (a disk slower than the requests).
    pub fn hand_over(&self, job: SyncJob) {
        *lock(&self.shared.pending) += 1;
        let Some(tx) = &self.tx else { return };
        if let Err(e) = tx.send(job) {
            // The thread is gone (it never exits on its own): say so.
            *lock(&self.shared.pending) -= 1;
            (e.0.answer)(Err("the store's sync thread has stopped".into()));
        }
    }

    /// Wait until every batch handed over is answered, at most `cap`.
    /// True when none is pending.
    pub fn wait_idle(&self, cap: Duration) -> bool {
        let pending = lock(&self.shared.pending);
        let (pending, _) = self
            .shared
            .idle
            .wait_timeout_while(pending, cap, |n| *n > 0)
            .unwrap_or_else(PoisonError::into_inner);
        *pending == 0
    }

    /// Whether an fsync is running or batches wait for one.
    pub fn busy(&self) -> bool {
        *lock(&self.shared.pending) > 0
    }

    /// Whether an fsync of the WAL succeeded within `window`: the disk
    /// flushed lately.
    pub fn synced_within(&self, window: Duration) -> bool {
        lock(&self.shared.last_ok).is_some_and(|t| t.elapsed() < window)
    }

    /// The first fsync that failed, if any.
    pub fn failed(&self) -> Option<String> {
        lock(&self.shared.failed).clone()
    }

    /// Answer everything handed over, then stop the thread.
    pub fn stop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn run(wal: File, rx: Receiver<SyncJob>, shared: Arc<Shared>, counts: Arc<CommitCounts>) {
    while let Ok(first) = rx.recv() {
        // Every batch committed while the last fsync ran: one fsync for all.
        let mut jobs = vec![first];
        while let Ok(job) = rx.try_recv() {
            jobs.push(job);
        }
        let failed_before = lock(&shared.failed).clone();
        let result = match failed_before {
            Some(why) => Err(why),
            None => wal.sync_data().map_err(|e| {
                let why = format!("fsync of state.db-wal failed: {e}");
                tracing::error!(error = %e, "fsync of state.db-wal failed; refusing every write");
                *lock(&shared.failed) = Some(why.clone());
                counts.sync_failed.store(true, Relaxed);
                why
            }),
        };
        let n = jobs.len();
        if result.is_ok() {
            *lock(&shared.last_ok) = Some(Instant::now());
            counts.syncs.fetch_add(1, Relaxed);
            let writes: u64 = jobs.iter().map(|j| j.writes).sum();
            counts.durable_writes.fetch_add(writes, Relaxed);
        }
        for job in jobs {
            (job.answer)(result.clone());
        }
        let mut pending = lock(&shared.pending);
        *pending -= n;
        if *pending == 0 {
            shared.idle.notify_all();
        }
    }
}
