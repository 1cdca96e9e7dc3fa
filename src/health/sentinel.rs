//! The sentinel: a plain OS thread that watches the health loop's heartbeat.
//!
//! The health loop runs on tokio; if the runtime wedges, the loop stops and
//! systemd stops being petted, which is the point. But a wedged runtime cannot
//! explain itself. The sentinel can: it needs no runtime, and when the
//! heartbeat is older than `stall_after` it writes one diagnostics bundle per
//! incident (every thread's state and wait channel, open fds, gauges, the
//! loop's last verdict) to the log and to the state directory. Where no
//! watchdog will kill the process (launchd), it aborts it after `abort_after`
//! so the supervisor restarts it.
//!
//! Not for: petting systemd. The sentinel never sends anything to the init
//! system; only a passing tick of the health loop does.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::bundle::write_bundle;
use super::gauges::{fds, threads, ProcSnapshot, ThreadInfo};

/// Name of the sentinel thread, as it appears in `/proc`, `top -H` and bundles.
pub const THREAD_NAME: &str = "agentd-sentinel";

/// Most fds listed in a bundle. A leak is visible in the first few thousand
/// targets; listing a million would make the bundle the next problem.
pub const MAX_BUNDLE_FDS: usize = 4096;

/// Most threads listed in a bundle; far above `max_threads`' default, so it
/// only cuts the listing of a process that already failed `resources`.
pub const MAX_BUNDLE_THREADS: usize = 4096;

/// The health loop's proof of life: when its last tick completed.
#[derive(Debug)]
pub struct Heartbeat {
    /// Fixed origin; beats are milliseconds after it, so they fit in an atomic
    /// and are monotonic (wall-clock jumps cannot fake or hide a stall).
    origin: Instant,
    last_ms: AtomicU64,
    /// Beats so far. Identifies an incident: a stall is "new" when the count
    /// changed since the last one was reported, even if the loop resumed and
    /// stalled again between two polls.
    beats: AtomicU64,
}

impl Heartbeat {
    /// A heartbeat that counts its creation as the last beat, so start-up is
    /// not a stall.
    pub fn new() -> Arc<Heartbeat> {
        Arc::new(Heartbeat {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            beats: AtomicU64::new(0),
        })
    }

    /// Records a completed tick.
    pub fn beat(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
        // Release pairs with the Acquire in `beats()`: whoever sees the new
        // count also sees the new time.
        self.beats.fetch_add(1, Ordering::Release);
    }

    /// Time since the last completed tick.
    pub fn since_last(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }

    /// Ticks completed so far.
    pub fn beats(&self) -> u64 {
        self.beats.load(Ordering::Acquire)
    }
}

#[derive(Debug, Clone)]
pub struct SentinelConfig {
    /// The longest wait between two looks at the heartbeat. The sentinel
    /// also wakes when the heartbeat would turn stale (or an abort is due),
    /// so a stall is seen when it begins, whatever this is.
    pub poll: Duration,
    /// A heartbeat older than this is a stall. Should exceed the loop's
    /// interval plus its checks' deadline, or every slow tick is an incident.
    pub stall_after: Duration,
    /// Abort the process once a stall lasts this long; `None` where a watchdog
    /// (systemd) already kills a process that stops petting it.
    pub abort_after: Option<Duration>,
    /// Where bundles are written (`<state-dir>/diagnostics`).
    pub bundle_dir: PathBuf,
    /// Bundles kept; older ones are deleted.
    pub keep: usize,
}

/// Lets the owner observe and stop the sentinel. Dropping it leaves the
/// sentinel running (detached): losing a handle must not silently disable
/// stall detection.
#[derive(Debug)]
pub struct SentinelHandle {
    shared: Arc<Shared>,
    thread: JoinHandle<()>,
}

impl SentinelHandle {
    /// Stops the sentinel and waits for its thread to exit (at most the time of
    /// a bundle being written; the wait between polls is interrupted).
    pub fn stop(self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        let _ = self.thread.join();
    }

    /// Stall incidents reported so far.
    pub fn incidents(&self) -> u64 {
        self.shared.lock().incidents
    }

    /// Path of the last bundle written, if any was.
    pub fn last_bundle(&self) -> Option<PathBuf> {
        self.shared.lock().last_bundle.clone()
    }

    /// Waits until at least `count` incidents were reported, or `timeout`
    /// passed. Returns whether the count was reached.
    pub fn wait_for_incidents(&self, count: u64, timeout: Duration) -> bool {
        let guard = self.shared.lock();
        let (guard, _) = self
            .shared
            .changed
            .wait_timeout_while(guard, timeout, |s| s.incidents < count)
            .unwrap_or_else(PoisonError::into_inner);
        guard.incidents >= count
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled on `stop` and after every incident.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Default)]
struct State {
    stop: bool,
    incidents: u64,
    last_bundle: Option<PathBuf>,
}

/// Starts the sentinel thread.
///
/// `context` supplies the loop's last verdict (or anything else worth
/// keeping) for the bundle. It runs on the sentinel thread while the runtime
/// may be wedged, so it must not block or await: read an `ArcSwap`, not a
/// lock that a handler holds. A panic in it is caught and noted in the bundle.
/// `abort` is called once per incident that outlasts `abort_after`
/// (production passes `std::process::abort`, which dumps core).
pub fn spawn(
    heartbeat: Arc<Heartbeat>,
    config: SentinelConfig,
    context: Box<dyn Fn() -> Value + Send>,
    abort: Box<dyn Fn() + Send>,
) -> std::io::Result<SentinelHandle> {
    let shared = Arc::new(Shared::default());
    let thread_shared = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || watch(&heartbeat, &config, &*context, &*abort, &thread_shared))?;
    Ok(SentinelHandle { shared, thread })
}

fn watch(
    heartbeat: &Heartbeat,
    config: &SentinelConfig,
    context: &dyn Fn() -> Value,
    abort: &dyn Fn(),
    shared: &Shared,
) {
    // Beat counts of the incident last reported / aborted for.
    let mut reported: Option<u64> = None;
    let mut aborted: Option<u64> = None;
    loop {
        {
            let wait = next_look(
                heartbeat.since_last(),
                config,
                reported == Some(heartbeat.beats()),
            );
            let guard = shared.lock();
            let (guard, _) = shared
                .changed
                .wait_timeout_while(guard, wait, |s| !s.stop)
                .unwrap_or_else(PoisonError::into_inner);
            if guard.stop {
                return;
            }
        }
        // Count before age: a beat landing between the two reads makes the
        // age small (no stall), never pins an old count on a new stall.
        let beats = heartbeat.beats();
        let stalled = heartbeat.since_last();
        let abort_due = config.abort_after.is_some_and(|after| stalled > after);
        if stalled <= config.stall_after && !abort_due {
            continue;
        }
        // A bundle comes before any abort, even if abort_after < stall_after:
        // the abort exists to restart, the bundle to explain.
        if reported != Some(beats) {
            reported = Some(beats);
            let bundle = report(stalled, config, context);
            let mut state = shared.lock();
            state.incidents += 1;
            if bundle.is_some() {
                state.last_bundle = bundle;
            }
            drop(state);
            shared.changed.notify_all();
        }
        if abort_due && aborted != Some(beats) {
            aborted = Some(beats);
            tracing::error!(
                stalled_ms = ms(stalled),
                abort_after_ms = config.abort_after.map(ms),
                "health loop stalled for {} ms; aborting so the supervisor restarts agentd",
                ms(stalled)
            );
            abort();
        }
    }
}

/// How long to wait before looking at the heartbeat again: until the moment
/// it would be stale (or an abort due), at most `poll`. A loop that beats on
/// time therefore wakes the sentinel about once per `stall_after`, not every
/// `poll`, and a stall is still seen the moment it begins.
fn next_look(since_last: Duration, config: &SentinelConfig, reported: bool) -> Duration {
    // Just past the limit, so the look finds the heartbeat stale, not equal.
    const PAST: Duration = Duration::from_millis(1);
    let mut wait = config.poll;
    if !reported {
        if let Some(left) = config.stall_after.checked_sub(since_last) {
            wait = wait.min(left + PAST);
        }
    }
    if let Some(left) = config.abort_after.and_then(|a| a.checked_sub(since_last)) {
        wait = wait.min(left + PAST);
    }
    wait
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Collects, logs and writes one bundle. Returns its path if it was written.
fn report(
    stalled: Duration,
    config: &SentinelConfig,
    context: &dyn Fn() -> Value,
) -> Option<PathBuf> {
    let gauges = ProcSnapshot::read();
    let mut thread_list = threads();
    let threads_truncated = thread_list.len() > MAX_BUNDLE_THREADS;
    thread_list.truncate(MAX_BUNDLE_THREADS);
    let fd_list = fds(MAX_BUNDLE_FDS);
    let context = catch_unwind(AssertUnwindSafe(context))
        .unwrap_or_else(|_| json!({ "error": "context callback panicked" }));
    let written_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let bundle = json!({
        "reason": "health loop stalled",
        "pid": std::process::id(),
        "written_at": written_at,
        "stalled_ms": ms(stalled),
        "stall_after_ms": ms(config.stall_after),
        "gauges": gauges,
        "threads": thread_list,
        "threads_truncated": threads_truncated,
        "fds": fd_list,
        "fds_truncated": gauges.open_fds > fd_list.len() as i64,
        "context": context,
    });
    // The journal gets the thread summary too: if the bundle cannot be written
    // (disk full, fd table full), the log is all that is left.
    let summary = thread_summary(&thread_list);
    match write_bundle(&config.bundle_dir, &bundle, config.keep) {
        Ok(path) => {
            tracing::error!(
                stalled_ms = ms(stalled),
                thread_count = gauges.thread_count,
                open_fds = gauges.open_fds,
                threads = %summary,
                bundle = %path.display(),
                "health loop stalled for {} ms; diagnostics bundle written to {}",
                ms(stalled),
                path.display()
            );
            Some(path)
        }
        Err(error) => {
            tracing::error!(
                stalled_ms = ms(stalled),
                thread_count = gauges.thread_count,
                open_fds = gauges.open_fds,
                threads = %summary,
                %error,
                "health loop stalled for {} ms; could not write diagnostics bundle to {}: {error}",
                ms(stalled),
                config.bundle_dir.display()
            );
            None
        }
    }
}

/// `tid name state wchan` per thread, `; `-separated: one line a person can
/// read in `journalctl`.
fn thread_summary(list: &[ThreadInfo]) -> String {
    list.iter()
        .map(|t| format!("{} {} {} {}", t.tid, t.name, t.state, t.wchan))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_counts_beats_and_resets_age() {
        let hb = Heartbeat::new();
        assert_eq!(hb.beats(), 0);
        std::thread::sleep(Duration::from_millis(300));
        let before = hb.since_last();
        assert!(before >= Duration::from_millis(300));
        hb.beat();
        assert_eq!(hb.beats(), 1);
        assert!(hb.since_last() < before, "the beat did not reset the age");
    }

    #[test]
    fn stop_interrupts_a_long_poll() {
        let dir = tempfile::tempdir().unwrap();
        let handle = spawn(
            Heartbeat::new(),
            SentinelConfig {
                poll: Duration::from_secs(3600),
                stall_after: Duration::from_secs(3600),
                abort_after: None,
                bundle_dir: dir.path().into(),
                keep: 3,
            },
            Box::new(|| Value::Null),
            Box::new(|| {}),
        )
        .unwrap();
        let started = Instant::now();
        handle.stop();
        // The poll is an hour: stopping returned long before it.
        assert!(started.elapsed() < Duration::from_secs(60));
    }
}
