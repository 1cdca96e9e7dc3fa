//! No process outlives its execution: agentd as a child subreaper, the reaper
//! of orphans that reparent to it, and the sweep that kills every process
//! still tagged with a finished execution's id.
//!
//! This room owns the `/proc` reading and the `waitpid` calls for processes
//! agentd did not spawn itself. It does not spawn, supervise or signal an
//! execution's own child (that is `agent::process`), and it never calls
//! `waitpid(-1)`: tokio's process driver must collect the exit status of the
//! children it tracks, so the reaper only waits for zombies it found by pid
//! that are not registered with [`track_child`].
//!
//! Invariants:
//! * Every `/proc` read is bounded in bytes (fixed buffers, no growth) and a
//!   process that vanishes or cannot be read is skipped, never an error.
//! * A zombie child is reaped only when it is not a tracked child and it was
//!   already a zombie at a sweep at least [`ORPHAN_GRACE`] earlier (so a child
//!   some other code waits for, like a version probe, is left to that code).
//! * Every sweep is bounded in entries scanned and in time.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// After a zombie child is first seen, how long it must stay unreaped before
/// the reaper takes it. A child whose owner waits for it is reaped by that
/// owner within microseconds of exiting; one a full second old is an orphan.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(1);

/// Backstop sweep interval when no SIGCHLD arrives (signals coalesce, and a
/// sweep may have left young zombies for later).
pub const ORPHAN_SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Shortest gap between two orphan sweeps, so a burst of exits (one SIGCHLD
/// each) costs one `/proc` scan, not one per exit.
pub const ORPHAN_SWEEP_MIN_GAP: Duration = Duration::from_millis(100);

/// Most `/proc` entries one scan looks at. Linux's default `pid_max` on
/// 64-bit hosts is 4 Mi, but real process tables are far smaller; a scan
/// stops here rather than run unbounded on a pathological host.
pub const MAX_PROC_ENTRIES: usize = 1 << 16;

/// Bytes of `/proc/PID/environ` read while looking for the execution tag.
/// The kernel allows an environment of several MiB; agentd sets the tag in
/// every child it starts, where it sits among the inherited variables, so
/// 1 MiB covers any environment a real agent has while bounding the read.
pub const ENVIRON_SCAN_LIMIT: usize = 1 << 20;

/// How long the end-of-execution sweep may take in total (scans, SIGKILL,
/// waiting for the killed to die). A process stuck in uninterruptible sleep
/// dies when that sleep ends; the execution does not wait for it.
pub const EXECUTION_SWEEP_BOUND: Duration = Duration::from_secs(2);

/// Scans per end-of-execution sweep: a tagged process that forks while being
/// killed leaves a tagged child, which the next round finds.
const SWEEP_ROUNDS: usize = 4;

/// Poll step while waiting for killed processes to die.
const DEATH_POLL: Duration = Duration::from_millis(5);

/// Whether `become_subreaper` succeeded; read by the sweep and `/health`-like
/// reports.
static SUBREAPER: AtomicBool = AtomicBool::new(false);

/// Pids of children agentd spawned and waits for itself (tokio tracks their
/// exit status). Bounded by the executor's concurrency: a pid is registered
/// for exactly as long as its execution runs.
static TRACKED: Mutex<Option<HashSet<u32>>> = Mutex::new(None);

/// Make agentd the reaper of its descendants' orphans
/// (`prctl(PR_SET_CHILD_SUBREAPER)`): a process an agent started that
/// outlives its parent (a `setsid` or double-forked daemon) reparents to
/// agentd instead of to PID 1, where agentd can find and reap it.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes one integer argument
    // and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    SUBREAPER.store(true, Ordering::Relaxed);
    Ok(())
}

/// True once `become_subreaper` succeeded in this process.
pub fn is_subreaper() -> bool {
    SUBREAPER.load(Ordering::Relaxed)
}

/// A child whose exit status tokio collects; the reaper leaves it alone while
/// this guard lives. Drop it once the child was waited for (or handed to
/// tokio's orphan queue, which tolerates a stolen status).
#[derive(Debug)]
pub struct TrackedChild(u32);

/// Register `pid` as a child agentd waits for itself.
pub fn track_child(pid: u32) -> TrackedChild {
    TRACKED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashSet::new)
        .insert(pid);
    TrackedChild(pid)
}

impl Drop for TrackedChild {
    fn drop(&mut self) {
        if let Some(set) = TRACKED.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            set.remove(&self.0);
        }
    }
}

fn is_tracked(pid: u32) -> bool {
    TRACKED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .is_some_and(|s| s.contains(&pid))
}

/// The fields of `/proc/PID/stat` the reaper needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    /// R, S, D, Z (zombie), X (dead), ...
    pub state: u8,
    pub ppid: u32,
    /// Process group id.
    pub pgrp: i32,
    /// Clock ticks after boot; with the pid it names one process for ever
    /// (a pid is reused, a (pid, start time) pair is not).
    pub start_time: u64,
}

impl ProcStat {
    pub fn is_zombie(&self) -> bool {
        self.state == b'Z' || self.state == b'X'
    }
}

/// Read `/proc/PID/stat` into a fixed buffer. `None` when the process is gone
/// or the line cannot be parsed.
pub fn read_stat(pid: u32) -> Option<ProcStat> {
    // The line is at most a few hundred bytes: comm is capped at 16 bytes and
    // the rest are ~50 numbers.
    let mut buf = [0u8; 1024];
    let mut file = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
    parse_stat(pid, &buf[..len])
}

fn parse_stat(pid: u32, line: &[u8]) -> Option<ProcStat> {
    // comm is in parentheses and may contain anything: fields resume after
    // the last ')'.
    let close = line.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&line[close + 1..]).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = *fields.next()?.as_bytes().first()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    // Field 22 (starttime); we consumed fields 3 to 5, so it is the 17th of
    // the remaining ones.
    let start_time = fields.nth(16)?.parse().ok()?;
    Some(ProcStat {
        pid,
        state,
        ppid,
        pgrp,
        start_time,
    })
}

/// Pids in `/proc`, at most `MAX_PROC_ENTRIES`.
fn proc_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .take(MAX_PROC_ENTRIES)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

/// Bytes read from one `/proc/PID/task/TID/children` file: a list of pids,
/// about 8 bytes each, so 64 KiB names 8,000 children of one thread.
const CHILDREN_FILE_LIMIT: u64 = 64 << 10;

/// The children of every thread of `pid`, from `/proc/PID/task/*/children`.
/// `None` when the kernel has no such files (built without
/// `CONFIG_PROC_CHILDREN`); a process that vanished has no children.
fn children_of(pid: u32) -> Option<Vec<u32>> {
    let tasks = match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(t) => t,
        Err(_) => return Some(Vec::new()),
    };
    let mut out = Vec::new();
    let mut any_file = false;
    for task in tasks.flatten() {
        let mut text = String::new();
        match std::fs::File::open(task.path().join("children")) {
            Ok(f) => {
                any_file = true;
                let _ = f.take(CHILDREN_FILE_LIMIT).read_to_string(&mut text);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(_) => continue,
        }
        out.extend(
            text.split_ascii_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    if !any_file && pid == std::process::id() {
        // agentd itself always has a task directory: no file means no support.
        return None;
    }
    Some(out)
}

/// Where an execution's leftovers can be once its group is gone: agentd is
/// the subreaper of every agent, so a process that outlived its parent was
/// reparented to agentd, and its own children hang below it. The walk starts
/// at agentd's children that nobody in agentd waits for (running agents are
/// tracked, and a leftover of this execution cannot be below another
/// execution's agent) and goes down their trees, at most `MAX_PROC_ENTRIES`
/// processes. Its cost follows what agentd's agents left behind, not the
/// size of the host's process table. Falls back to every pid in `/proc` when
/// agentd is no subreaper (orphans then go to init, outside the walk) or the
/// kernel lists no children.
fn sweep_candidates() -> Vec<u32> {
    let me = std::process::id();
    if !is_subreaper() {
        return proc_pids();
    }
    let Some(top) = children_of(me) else {
        return proc_pids();
    };
    let mut stack: Vec<u32> = top.into_iter().filter(|&p| !is_tracked(p)).collect();
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    while let Some(pid) = stack.pop() {
        if out.len() >= MAX_PROC_ENTRIES {
            break;
        }
        if pid == me || !seen.insert(pid) {
            continue;
        }
        out.push(pid);
        if let Some(children) = children_of(pid) {
            stack.extend(children);
        }
    }
    out
}

/// Does `/proc/PID/environ` contain exactly the entry `NAME=VALUE`? Streams
/// the file through a fixed buffer, reading at most `ENVIRON_SCAN_LIMIT`
/// bytes. `None` when the file cannot be read (gone, or not ours to read).
pub fn environ_has(pid: u32, entry: &[u8]) -> Option<bool> {
    let mut file = std::fs::File::open(format!("/proc/{pid}/environ")).ok()?;
    let mut matcher = EntryMatcher::new(entry);
    let mut buf = [0u8; 8192];
    let mut read = 0usize;
    while read < ENVIRON_SCAN_LIMIT {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // EACCES on the first read is how a process we may not inspect
            // answers; mid-read errors mean it is going away.
            Err(_) => return if read == 0 { None } else { Some(false) },
        };
        read += n;
        if matcher.feed(&buf[..n]) {
            return Some(true);
        }
    }
    Some(matcher.finish())
}

/// Matches one NUL-separated entry against `needle` across buffer boundaries.
struct EntryMatcher<'a> {
    needle: &'a [u8],
    /// Bytes of the current entry that matched so far; `None` once it
    /// diverged (skip to the next NUL).
    matched: Option<usize>,
}

impl<'a> EntryMatcher<'a> {
    fn new(needle: &'a [u8]) -> Self {
        EntryMatcher {
            needle,
            matched: Some(0),
        }
    }

    /// True as soon as a whole entry equal to the needle was seen.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if b == 0 {
                if self.matched == Some(self.needle.len()) {
                    return true;
                }
                self.matched = Some(0);
            } else if let Some(k) = self.matched {
                self.matched = (k < self.needle.len() && self.needle[k] == b).then_some(k + 1);
            }
        }
        false
    }

    /// The last entry may lack its NUL.
    fn finish(&self) -> bool {
        self.matched == Some(self.needle.len())
    }
}

/// What one end-of-execution sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Processes SIGKILLed and seen dead (and reaped, when they were
    /// agentd's children).
    pub killed: u32,
    /// Pids still alive, or not yet reaped, when the bound ran out.
    pub left: Vec<u32>,
}

/// Kill every process whose environment carries `NAME=VALUE` (an execution's
/// tag), then wait until they are dead and reaped, all before `deadline`.
/// Killed processes reparented to agentd are reaped here, so none is left a
/// zombie.
///
/// `not_before` is the start time (`ProcStat::start_time`) of the
/// execution's child when known: every process carrying its tag descends from
/// that child, so anything older is skipped without reading its environment.
/// Processes we cannot read are skipped; so is agentd itself, and so are
/// members of the process group `group` (the execution's own group, which
/// [`kill_and_reap_group`] takes care of). Only [`sweep_candidates`] are
/// looked at.
pub async fn kill_tagged(
    name: &str,
    value: &str,
    not_before: Option<u64>,
    group: Option<i32>,
    deadline: tokio::time::Instant,
) -> SweepReport {
    let entry = format!("{name}={value}").into_bytes();
    let me = std::process::id();
    // Every process we sent SIGKILL, by identity (pid + start time).
    let mut killed: HashMap<u32, u64> = HashMap::new();
    for _ in 0..SWEEP_ROUNDS {
        if !kill_tagged_once(&entry, not_before, group, &mut killed)
            || tokio::time::Instant::now() >= deadline
        {
            break;
        }
    }
    let total = killed.len() as u32;
    if total > 0 {
        tracing::debug!(tag = %value, count = total, "killed processes left by the execution");
    }
    loop {
        killed.retain(|&pid, start| !gone(pid, *start, me));
        if killed.is_empty() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(DEATH_POLL).await;
    }
    let mut left: Vec<u32> = killed.into_keys().collect();
    left.sort_unstable();
    if !left.is_empty() {
        tracing::warn!(tag = %value, pids = ?left, "processes survived SIGKILL past the sweep's bound; the reaper collects them when they die");
    }
    SweepReport {
        killed: total - left.len() as u32,
        left,
    }
}

/// SIGKILL what is left of the process group `pgid` (its leader already
/// exited and was reaped) and reap every member that is, or becomes,
/// agentd's child, until the group is empty or `deadline` passes. No `/proc`
/// scan: `waitpid(-pgid)` reaps only members of that group, and `kill(-pgid,
/// 0)` says whether any member, zombies included, is left. Returns the
/// members reaped and whether some were still there at the deadline.
pub async fn kill_and_reap_group(pgid: i32, deadline: tokio::time::Instant) -> (u32, bool) {
    use nix::errno::Errno;
    use nix::sys::signal::killpg;
    let group = Pid::from_raw(pgid);
    if killpg(group, Signal::SIGKILL) == Err(Errno::ESRCH) {
        return (0, false);
    }
    let mut reaped = 0u32;
    loop {
        loop {
            match waitpid(Pid::from_raw(-pgid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => reaped += 1,
                Err(Errno::EINTR) => continue,
                // ECHILD: no child of ours in the group (yet).
                Err(_) => break,
            }
        }
        if killpg(group, None) == Err(Errno::ESRCH) {
            return (reaped, false);
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                pgid,
                "process group not empty past the sweep's bound; the reaper collects it"
            );
            return (reaped, true);
        }
        // A member whose parent is still dying is reparented to agentd a
        // moment later; SIGKILL again for one that was forked meanwhile.
        let _ = killpg(group, Signal::SIGKILL);
        tokio::time::sleep(DEATH_POLL).await;
    }
}

/// One scan: SIGKILL every live process carrying `NAME=VALUE` (and started no
/// earlier than `not_before`) that is not in `killed` yet, and add it there.
/// Members of `group` are left alone. Synchronous and bounded (one pass over
/// [`sweep_candidates`]), so it may also run where nothing can be awaited (a
/// `Drop`). True when it killed something.
pub fn kill_tagged_once(
    entry: &[u8],
    not_before: Option<u64>,
    group: Option<i32>,
    killed: &mut HashMap<u32, u64>,
) -> bool {
    let me = std::process::id();
    let mut found = false;
    for pid in sweep_candidates() {
        if pid == me || killed.contains_key(&pid) {
            continue;
        }
        let Some(before) = read_stat(pid) else {
            continue;
        };
        if before.is_zombie()
            || group == Some(before.pgrp)
            || not_before.is_some_and(|t| before.start_time < t)
            || environ_has(pid, entry) != Some(true)
        {
            continue;
        }
        // The pid could have been reused between the two reads; the start
        // time says whether it still is the process whose environ matched.
        if read_stat(pid).map(|s| s.start_time) != Some(before.start_time) {
            continue;
        }
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        killed.insert(pid, before.start_time);
        found = true;
    }
    found
}

/// True when the process `pid` started at `start` is dead and reaped (or
/// its pid already names another process). A zombie child of ours is reaped
/// here (it carried the tag, so nobody else in agentd waits for it); a
/// zombie of another parent is not gone yet while agentd is the subreaper:
/// that parent was killed too, and the zombie comes to agentd when it dies.
/// (Without the subreaper role it goes to init, which is not ours to wait
/// for.)
fn gone(pid: u32, start: u64, me: u32) -> bool {
    match read_stat(pid) {
        None => true,
        Some(s) if s.start_time != start => true,
        Some(s) if s.is_zombie() => {
            if s.ppid == me && !is_tracked(pid) {
                let _ = waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG));
                return read_stat(pid).is_none_or(|now| now.start_time != start);
            }
            !is_subreaper()
        }
        Some(_) => false,
    }
}

/// Reaps orphans: zombie children of agentd that no code in agentd waits for.
#[derive(Debug, Default)]
pub struct OrphanReaper {
    /// Zombie children seen at an earlier sweep, by identity, with when they
    /// were first seen. Rebuilt from each scan, so it never holds more than
    /// the zombies that exist.
    seen: HashMap<(u32, u64), Instant>,
    /// Orphans reaped since start, for logs.
    pub reaped_total: u64,
}

impl OrphanReaper {
    /// One sweep: reap zombie children that are untracked and at least
    /// `ORPHAN_GRACE` old. Returns true when young zombies remain, so the
    /// caller sweeps again after the grace.
    pub fn sweep(&mut self) -> bool {
        let me = std::process::id();
        let now = Instant::now();
        let mut next = HashMap::new();
        for pid in proc_pids() {
            let Some(stat) = read_stat(pid) else { continue };
            if stat.ppid != me || !stat.is_zombie() || is_tracked(pid) {
                continue;
            }
            let key = (pid, stat.start_time);
            let first_seen = self.seen.get(&key).copied().unwrap_or(now);
            if now.duration_since(first_seen) < ORPHAN_GRACE {
                next.insert(key, first_seen);
                continue;
            }
            match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {
                    next.insert(key, first_seen);
                }
                Ok(_) => {
                    self.reaped_total += 1;
                    tracing::debug!(pid, "reaped an orphan");
                }
                // ECHILD: its owner reaped it in between.
                Err(_) => {}
            }
        }
        self.seen = next;
        !self.seen.is_empty()
    }

    /// Sweep on every SIGCHLD (at most once per `ORPHAN_SWEEP_MIN_GAP`), after
    /// `ORPHAN_GRACE` while young zombies wait, and every
    /// `ORPHAN_SWEEP_INTERVAL` regardless. Runs until the task is dropped.
    pub async fn run(mut self) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigchld = match signal(SignalKind::child()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot listen for SIGCHLD ({e}); reaping orphans every {ORPHAN_SWEEP_INTERVAL:?}");
                None
            }
        };
        let mut wait = ORPHAN_SWEEP_INTERVAL;
        loop {
            tokio::select! {
                _ = async {
                    match sigchld.as_mut() {
                        Some(s) => { s.recv().await; }
                        None => std::future::pending().await,
                    }
                } => {}
                _ = tokio::time::sleep(wait) => {}
            }
            tokio::time::sleep(ORPHAN_SWEEP_MIN_GAP).await;
            let young = self.sweep();
            wait = if young {
                ORPHAN_GRACE
            } else {
                ORPHAN_SWEEP_INTERVAL
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parses_a_comm_with_spaces_and_parens() {
        let line = b"42 (a) b (c) S 7 41 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        let s = parse_stat(42, line).unwrap();
        assert_eq!(
            (s.state, s.ppid, s.pgrp, s.start_time),
            (b'S', 7, 41, 987654)
        );
    }

    #[test]
    fn matcher_finds_whole_entries_only_across_chunks() {
        let needle = b"AGENTD_EXECUTION_ID=abc";
        let env = b"X=1\0NOT_AGENTD_EXECUTION_ID=abc\0AGENTD_EXECUTION_ID=abcd\0AGENTD_EXECUTION_ID=abc\0Y=2\0";
        for split in 0..env.len() {
            let mut m = EntryMatcher::new(needle);
            let hit = m.feed(&env[..split]) || m.feed(&env[split..]) || m.finish();
            assert!(hit, "split at {split}");
        }
        let mut m = EntryMatcher::new(needle);
        assert!(!m.feed(b"AGENTD_EXECUTION_ID=abcd\0AGENTD_EXECUTION_ID=ab\0"));
        assert!(!m.finish());
        let mut m = EntryMatcher::new(needle);
        assert!(!m.feed(b"A=1\0AGENTD_EXECUTION_ID=abc"));
        assert!(m.finish(), "last entry without a NUL");
    }

    #[test]
    fn own_stat_and_environ_are_readable() {
        let me = std::process::id();
        let s = read_stat(me).unwrap();
        assert_eq!(s.pid, me);
        assert!(!s.is_zombie());
        // PATH is set in any test environment; an invented entry is not.
        let path = std::env::var("PATH").unwrap();
        assert_eq!(
            environ_has(me, format!("PATH={path}").as_bytes()),
            Some(true)
        );
        assert_eq!(environ_has(me, b"AGENTD_NO_SUCH_VARIABLE=1"), Some(false));
        assert_eq!(environ_has(u32::MAX, b"X=1"), None);
    }
}
