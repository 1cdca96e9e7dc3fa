//! Process gauges read from Linux `/proc/self`: thread count, open fds, RSS,
//! RLIMIT_NOFILE, and (for diagnostics bundles) per-thread state and fd targets.
//!
//! Every reader is cheap and never fails: a gauge that cannot be read is
//! [`UNREADABLE`] (`-1`), because the moments a gauge cannot be read (fd table
//! full, `/proc` unmounted) are exactly the moments a health report must still
//! be produced. [`ProcGauges`] caches a snapshot for `GET /health`, which is
//! served at high request rates and must not list `/proc/self/fd` per request.
//!
//! Not for: deciding health (see `checks`), or tokio runtime metrics.

use std::ffi::CStr;
use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;

/// The value of a gauge that could not be read.
pub const UNREADABLE: i64 = -1;

/// Text used for a per-thread field that could not be read.
const UNKNOWN: &str = "?";

/// `/proc/self/stat` and `/proc/self/statm`, opened once and read with
/// `pread` at offset 0 (the kernel renders them anew on every read), and the
/// `/proc/self/fd` and `/proc/self/task` directories, whose `fstat` alone
/// gives the counts (see [`open_fds`] and [`thread_count`]): the health loop
/// reads them every tick, and opening them each time cost a path walk, an fd
/// and a close. Opened by `ProcGauges::new`, at start, so the process's fd
/// count does not move later; close-on-exec, so agents never inherit them.
struct ProcFiles {
    stat: Option<fs::File>,
    statm: Option<fs::File>,
    fd_dir: Option<fs::File>,
    task_dir: Option<fs::File>,
}

static PROC_FILES: OnceLock<ProcFiles> = OnceLock::new();

fn proc_files() -> &'static ProcFiles {
    let dir = |path: &str| {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(path)
            .ok()
    };
    PROC_FILES.get_or_init(|| ProcFiles {
        stat: fs::File::open("/proc/self/stat").ok(),
        statm: fs::File::open("/proc/self/statm").ok(),
        fd_dir: dir("/proc/self/fd"),
        task_dir: dir("/proc/self/task"),
    })
}

/// The whole text of a `/proc` file into `buf`; `None` if it cannot be read
/// (or does not fit, which these fixed-format files never come near). One
/// read returns these one-line files whole; a short read that ends the line
/// is the end, so the usual second read (for the 0 of end of file) is saved.
fn read_proc<'b>(file: Option<&fs::File>, buf: &'b mut [u8]) -> Option<&'b str> {
    use std::os::unix::fs::FileExt;
    let file = file?;
    let mut got = 0;
    loop {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
        if got == buf.len() {
            return None;
        }
        if buf[got - 1] == b'\n' {
            break;
        }
    }
    std::str::from_utf8(&buf[..got]).ok()
}

/// Threads running in this process. The link count of `/proc/self/task` is
/// two plus the threads (the kernel adds them when it is asked), so one
/// `fstat` of the directory kept open answers; where that does not hold,
/// `num_threads` (field 20 of `/proc/self/stat`: the `Threads:` of
/// `status`, at a fraction of its cost).
pub fn thread_count() -> i64 {
    if let Some(Ok(meta)) = proc_files().task_dir.as_ref().map(fs::File::metadata) {
        use std::os::unix::fs::MetadataExt;
        if meta.nlink() > 2 {
            return i64::try_from(meta.nlink() - 2).unwrap_or(UNREADABLE);
        }
    }
    let mut buf = [0u8; 1024];
    let Some(stat) = read_proc(proc_files().stat.as_ref(), &mut buf) else {
        return UNREADABLE;
    };
    // Fields after the `)` that ends the name start at field 3 (state).
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().nth(20 - 3))
        .and_then(|n| n.parse().ok())
        .unwrap_or(UNREADABLE)
}

/// Open file descriptors, not counting one opened only to list them.
///
/// Since Linux 6.2 the size of `/proc/self/fd` is the number of open fds, so
/// one `fstat` of the directory kept open answers (it counts that directory,
/// which stays open for good, like any other fd). Older kernels say 0 there
/// (a process always has that one fd open), and then the listing is read,
/// through a fresh directory fd that is not counted; with the fd table full
/// that open fails, and a full table is itself what the count would show.
pub fn open_fds() -> i64 {
    if let Some(Ok(meta)) = proc_files().fd_dir.as_ref().map(fs::File::metadata) {
        if meta.len() > 0 {
            return i64::try_from(meta.len()).unwrap_or(UNREADABLE);
        }
    }
    listed_fds()
}

/// Open fds by listing `/proc/self/fd`, not counting the listing's own.
fn listed_fds() -> i64 {
    let mut count: i64 = 0;
    match for_each_fd(|_| {
        count += 1;
        true
    }) {
        Some(()) => count,
        None => UNREADABLE,
    }
}

/// Resident set size in bytes (`/proc/self/statm` resident pages × page size).
pub fn rss_bytes() -> i64 {
    let mut buf = [0u8; 256];
    let Some(statm) = read_proc(proc_files().statm.as_ref(), &mut buf) else {
        return UNREADABLE;
    };
    let Some(pages) = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<i64>().ok())
    else {
        return UNREADABLE;
    };
    // SAFETY: sysconf has no memory-safety preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page_size <= 0 {
        return UNREADABLE;
    }
    pages.saturating_mul(page_size as i64)
}

/// RLIMIT_NOFILE `(soft, hard)`. "Unlimited" is reported as `i64::MAX` so a
/// comparison against it never trips.
pub fn fd_limits() -> (i64, i64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return (UNREADABLE, UNREADABLE);
    }
    let clamp = |v: libc::rlim_t| {
        if v == libc::RLIM_INFINITY {
            i64::MAX
        } else {
            i64::try_from(v).unwrap_or(i64::MAX)
        }
    };
    (clamp(limit.rlim_cur), clamp(limit.rlim_max))
}

/// One thread of this process, as the kernel sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ThreadInfo {
    pub tid: i64,
    /// `comm`: the thread name (tokio workers, `agentd-sentinel`, the store
    /// thread...), which tells a reader which part of the program is stuck.
    pub name: String,
    /// One-letter scheduler state from `stat` (`R`, `S`, `D`, ...); a thread in
    /// `D` is waiting on the kernel (disk, NFS) and no timeout can free it.
    pub state: String,
    /// Kernel function the thread sleeps in (`futex_wait_queue`, `ep_poll`,
    /// ...); `0` while running. Shows *what* a stalled thread waits for.
    pub wchan: String,
}

/// Every thread of this process with name, state and wait channel. Fields that
/// cannot be read are `"?"`; threads that exit while being listed are skipped.
pub fn threads() -> Vec<ThreadInfo> {
    let Ok(dir) = fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut out: Vec<ThreadInfo> = dir
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let tid: i64 = entry.file_name().to_str()?.parse().ok()?;
            let path = entry.path();
            let read = |file: &str| fs::read_to_string(path.join(file)).ok();
            let name = read("comm").map(|s| s.trim_end().to_owned());
            let state = read("stat").and_then(|stat| stat_state(&stat));
            let wchan = read("wchan").map(|s| s.trim_end().to_owned());
            if name.is_none() && state.is_none() && wchan.is_none() {
                return None; // the thread exited while we listed it
            }
            Some(ThreadInfo {
                tid,
                name: name.unwrap_or_else(|| UNKNOWN.into()),
                state: state.unwrap_or_else(|| UNKNOWN.into()),
                wchan: wchan.unwrap_or_else(|| UNKNOWN.into()),
            })
        })
        .collect();
    out.sort_by_key(|t| t.tid);
    out
}

/// The state letter of a `stat` line. The name field is in parentheses and may
/// itself contain spaces and `)`, so the state is found after the *last* `)`.
fn stat_state(stat: &str) -> Option<String> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next().map(str::to_owned)
}

/// One open file descriptor and what it refers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FdInfo {
    pub fd: i32,
    /// The `readlink` of `/proc/self/fd/N`: a path, `socket:[inode]`,
    /// `pipe:[inode]`, `anon_inode:[eventpoll]`... A leak shows up as many fds
    /// with the same target.
    pub target: String,
}

/// Up to `limit` open fds with their targets, in fd order. The descriptor used
/// to list the directory is not included.
pub fn fds(limit: usize) -> Vec<FdInfo> {
    let mut numbers = Vec::new();
    // The listing is cut at `limit` while reading, so a process with an fd leak
    // of a million entries costs `limit` readlinks, not a million.
    let _ = for_each_fd(|fd| {
        if numbers.len() >= limit {
            return false;
        }
        numbers.push(fd);
        true
    });
    numbers.sort_unstable();
    numbers
        .into_iter()
        .filter_map(|fd| {
            // An fd closed since it was listed has no link anymore; skip it.
            let target = fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
            Some(FdInfo {
                fd,
                target: target.to_string_lossy().into_owned(),
            })
        })
        .collect()
}

/// Calls `visit` with every open fd number except the directory's own, until it
/// returns false. `None` if `/proc/self/fd` cannot be opened (typically: the fd
/// table is full).
///
/// This uses `opendir` directly rather than `std::fs::read_dir` because only
/// `dirfd` says which entry is the listing's own descriptor; excluding it makes
/// the count exact.
fn for_each_fd(mut visit: impl FnMut(i32) -> bool) -> Option<()> {
    // SAFETY: the path is a valid NUL-terminated string.
    let dir = unsafe { libc::opendir(c"/proc/self/fd".as_ptr()) };
    if dir.is_null() {
        return None;
    }
    // SAFETY: `dir` is a valid, open DIR stream until `closedir` below; it is
    // private to this call, so `readdir` on it is not shared between threads.
    // Each `dirent` is only read before the next `readdir` call.
    unsafe {
        let own = libc::dirfd(dir);
        loop {
            let entry = libc::readdir(dir);
            if entry.is_null() {
                break;
            }
            let name = CStr::from_ptr((*entry).d_name.as_ptr());
            let Some(fd) = name.to_str().ok().and_then(|s| s.parse::<i32>().ok()) else {
                continue; // "." and ".."
            };
            if fd != own && !visit(fd) {
                break;
            }
        }
        libc::closedir(dir);
    }
    Some(())
}

/// One reading of the cheap gauges, as `GET /health` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProcSnapshot {
    pub thread_count: i64,
    pub open_fds: i64,
    pub rss_bytes: i64,
    pub fd_soft: i64,
    pub fd_hard: i64,
}

impl ProcSnapshot {
    /// Reads every gauge now (a few syscalls plus one `/proc/self/fd` listing).
    pub fn read() -> ProcSnapshot {
        let (fd_soft, fd_hard) = fd_limits();
        ProcSnapshot {
            thread_count: thread_count(),
            open_fds: open_fds(),
            rss_bytes: rss_bytes(),
            fd_soft,
            fd_hard,
        }
    }
}

/// A [`ProcSnapshot`] at most `ttl` old, shared by every `/health` request.
///
/// The hot path is one atomic load, one clock read and one `ArcSwap` load.
/// The caller that finds the snapshot stale refreshes it; the refresh is
/// guarded by a try-lock, so no caller ever waits on another: callers that
/// lose the race return the previous snapshot, which is stale by at most one
/// refresh's duration.
pub struct ProcGauges {
    ttl: Duration,
    /// Fixed origin so "when was the snapshot taken" fits in one atomic.
    origin: Instant,
    /// Nanoseconds after `origin` at which `snapshot` was read.
    taken_at_nanos: AtomicU64,
    snapshot: ArcSwap<ProcSnapshot>,
    /// The try-lock: true while one caller refreshes.
    refreshing: AtomicBool,
    /// Refreshes done so far; lets tests (and curious readers) see the cache work.
    refreshes: AtomicU64,
}

impl std::fmt::Debug for ProcGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcGauges")
            .field("ttl", &self.ttl)
            .field("snapshot", &**self.snapshot.load())
            .finish()
    }
}

impl ProcGauges {
    /// Reads the gauges once, so [`get`](Self::get) always has a valid snapshot.
    pub fn new(ttl: Duration) -> ProcGauges {
        ProcGauges {
            ttl,
            origin: Instant::now(),
            taken_at_nanos: AtomicU64::new(0),
            snapshot: ArcSwap::from_pointee(ProcSnapshot::read()),
            refreshing: AtomicBool::new(false),
            refreshes: AtomicU64::new(0),
        }
    }

    /// The cached snapshot, refreshed first if it is older than `ttl` and no
    /// other caller is refreshing it right now.
    pub fn get(&self) -> ProcSnapshot {
        self.get_at(Instant::now())
    }

    /// Reads the gauges now, bypassing the cache, and stores the result so
    /// `/health` sees it too. For checks, which must not judge stale numbers.
    pub fn refresh(&self) -> ProcSnapshot {
        let snapshot = ProcSnapshot::read();
        self.store(snapshot, Instant::now());
        snapshot
    }

    /// Reads what the `resources` check judges (threads, open fds, the fd
    /// limits) now, and puts it into the cached snapshot, whose RSS stays as
    /// it was read (it is no check's input; `/health` rereads it once the
    /// snapshot is `ttl` old). Saves the tick a `/proc/self/statm` read.
    pub fn refresh_counts(&self) -> ProcSnapshot {
        let (fd_soft, fd_hard) = fd_limits();
        let snapshot = ProcSnapshot {
            thread_count: thread_count(),
            open_fds: open_fds(),
            fd_soft,
            fd_hard,
            ..**self.snapshot.load()
        };
        self.snapshot.store(Arc::new(snapshot));
        snapshot
    }

    /// Refreshes done since creation.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    fn get_at(&self, now: Instant) -> ProcSnapshot {
        if self.is_fresh(now) {
            return **self.snapshot.load();
        }
        if self
            .refreshing
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return **self.snapshot.load();
        }
        // Released on every path out, even if reading /proc panicked.
        struct Unlock<'a>(&'a AtomicBool);
        impl Drop for Unlock<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _unlock = Unlock(&self.refreshing);
        // Another caller may have refreshed between our check and the lock.
        if self.is_fresh(now) {
            return **self.snapshot.load();
        }
        let snapshot = ProcSnapshot::read();
        self.store(snapshot, now);
        snapshot
    }

    fn is_fresh(&self, now: Instant) -> bool {
        let taken = Duration::from_nanos(self.taken_at_nanos.load(Ordering::Acquire));
        now.saturating_duration_since(self.origin)
            .saturating_sub(taken)
            < self.ttl
    }

    fn store(&self, snapshot: ProcSnapshot, now: Instant) {
        self.snapshot.store(Arc::new(snapshot));
        let nanos = now.saturating_duration_since(self.origin).as_nanos();
        self.taken_at_nanos
            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Release);
        self.refreshes.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The gauges against exact counts of this process run alone, in
    // `tests/gauges.rs`: other unit tests open files and threads alongside.

    #[test]
    fn gauges_read_plausible_values() {
        assert!(thread_count() >= 1);
        assert!(open_fds() >= 3, "stdin/stdout/stderr at least");
        assert!(rss_bytes() > 1 << 20);
        let (soft, hard) = fd_limits();
        assert!(soft > 0 && hard >= soft, "{soft} {hard}");
    }

    #[test]
    fn stat_state_survives_parentheses_in_the_name() {
        assert_eq!(stat_state("42 (a) b) S 1 2 3").as_deref(), Some("S"));
        assert_eq!(stat_state("42 (tokio-rt-worker) R 1").as_deref(), Some("R"));
        assert_eq!(stat_state("garbage"), None);
    }

    #[test]
    fn threads_lists_a_named_thread() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::Builder::new()
            .name("gauge-probe".into())
            .spawn(move || {
                // The new thread names itself; only list it once it runs.
                started_tx.send(()).unwrap();
                rx.recv().ok()
            })
            .unwrap();
        started.recv().unwrap();
        let list = threads();
        let _ = tx.send(());
        worker.join().unwrap();
        let probe = list
            .iter()
            .find(|t| t.name == "gauge-probe")
            .expect("the named thread is listed");
        assert!(probe.tid > 0);
        assert_eq!(probe.state.len(), 1, "{probe:?}");
    }

    #[test]
    fn fds_names_targets_and_respects_the_limit() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let all = fds(usize::MAX);
        let wanted = file.path().to_string_lossy().into_owned();
        assert!(all.iter().any(|f| f.target == wanted), "{all:?}");
        assert!(all.windows(2).all(|w| w[0].fd < w[1].fd));
        assert_eq!(fds(2).len(), 2);
        assert!(fds(0).is_empty());
    }

    #[test]
    fn cache_serves_the_same_snapshot_within_ttl() {
        let gauges = ProcGauges::new(Duration::from_secs(1));
        let first = gauges.get_at(gauges.origin);
        let later = gauges.get_at(gauges.origin + Duration::from_millis(999));
        assert_eq!(first, later);
        assert_eq!(gauges.refreshes(), 0);
    }

    #[test]
    fn cache_refreshes_after_ttl() {
        let gauges = ProcGauges::new(Duration::from_secs(1));
        let _ = gauges.get_at(gauges.origin + Duration::from_millis(1001));
        assert_eq!(gauges.refreshes(), 1);
        // Fresh again relative to the new reading time.
        let _ = gauges.get_at(gauges.origin + Duration::from_millis(1500));
        assert_eq!(gauges.refreshes(), 1);
        let _ = gauges.get_at(gauges.origin + Duration::from_millis(2002));
        assert_eq!(gauges.refreshes(), 2);
    }

    #[test]
    fn stale_caller_that_loses_the_try_lock_returns_the_previous_snapshot() {
        let gauges = ProcGauges::new(Duration::from_secs(1));
        let previous = **gauges.snapshot.load();
        gauges.refreshing.store(true, Ordering::SeqCst); // someone else refreshes
        let got = gauges.get_at(gauges.origin + Duration::from_secs(5));
        assert_eq!(got, previous);
        assert_eq!(gauges.refreshes(), 0);
        gauges.refreshing.store(false, Ordering::SeqCst);
        let _ = gauges.get_at(gauges.origin + Duration::from_secs(5));
        assert_eq!(gauges.refreshes(), 1);
    }

    #[test]
    fn snapshot_serializes_with_stable_field_names() {
        let json = serde_json::to_value(ProcSnapshot::read()).unwrap();
        for key in [
            "thread_count",
            "open_fds",
            "rss_bytes",
            "fd_soft",
            "fd_hard",
        ] {
            assert!(json.get(key).is_some(), "{key} missing in {json}");
        }
    }
}
