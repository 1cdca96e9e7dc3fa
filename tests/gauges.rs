//! The `/proc` gauges against real changes of this process: open fds,
//! threads, the cached snapshot, the `resources` check at the fd limit, and
//! a timed-out self-probe that must leave no socket behind.
//!
//! They count the whole process, so they run alone: this binary holds one
//! test, which runs the cases one after another. No other test's threads,
//! sockets or files (the test harness starts a thread per test) can move
//! the counts they assert.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use agentd::health::checks::{resources_check, run_checks, Check, CheckStatus};
use agentd::health::gauges::{
    fd_limits, fds, open_fds, thread_count, threads, ProcGauges, UNREADABLE,
};
use agentd::health::probe::{self_probe_check, ProbeTarget};

#[test]
fn process_wide_gauges_follow_real_changes_of_this_process() {
    thread_count_is_the_threads_line_of_status();
    reading_the_gauges_opens_no_fd();
    open_fds_rises_by_exactly_the_files_opened();
    fds_lists_the_targets_of_open_files();
    thread_count_rises_when_a_thread_starts();
    cached_gauges_are_stale_within_ttl_and_fresh_after();
    resources_check_fails_near_the_fd_limit_and_when_the_fd_table_is_full();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(self_probe_leaves_no_socket_behind_after_a_timeout());
}

/// Runs `attempt` until it succeeds, at most 5 times. Exact fd/thread deltas
/// can still move when the harness itself finishes something; a gauge that
/// is wrong fails every attempt.
fn within_attempts(mut attempt: impl FnMut() -> Result<(), String>) {
    let mut last = String::new();
    for _ in 0..5 {
        match attempt() {
            Ok(()) => return,
            Err(why) => last = why,
        }
    }
    panic!("failed 5 attempts; last: {last}");
}

fn open_files(n: usize) -> Vec<std::fs::File> {
    (0..n).map(|_| tempfile::tempfile().unwrap()).collect()
}

fn thread_count_is_the_threads_line_of_status() {
    within_attempts(|| {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let threads: i64 = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let counted = thread_count();
        if counted == threads {
            Ok(())
        } else {
            Err(format!("thread_count {counted}, Threads: {threads}"))
        }
    });
}

fn reading_the_gauges_opens_no_fd() {
    // The first reading opens the gauges' own `/proc` files, for good.
    open_fds();
    within_attempts(|| {
        let before = open_fds();
        for _ in 0..100 {
            thread_count();
            agentd::health::gauges::rss_bytes();
            open_fds();
        }
        let after = open_fds();
        if after == before {
            Ok(())
        } else {
            Err(format!(
                "open fds {before} before 300 readings, {after} after"
            ))
        }
    });
}

async fn probe_once(target: ProbeTarget, deadline: Duration) -> CheckStatus {
    let check = self_probe_check(target, "/health?probe=1");
    run_checks(&[check], deadline).await.checks["self_probe"].status
}

fn open_fds_rises_by_exactly_the_files_opened() {
    within_attempts(|| {
        let before = open_fds();
        let files = open_files(10);
        let during = open_fds();
        drop(files);
        let after = open_fds();
        if during - before == 10 && after == before {
            Ok(())
        } else {
            Err(format!(
                "before {before}, with 10 files {during}, after {after}"
            ))
        }
    });
}

fn fds_lists_the_targets_of_open_files() {
    let files: Vec<_> = (0..3)
        .map(|_| tempfile::NamedTempFile::new().unwrap())
        .collect();
    // The first reading opens the gauges' own `/proc` files, for good.
    open_fds();
    let listed = fds(usize::MAX);
    for file in &files {
        let path = file.path().to_string_lossy().into_owned();
        assert!(
            listed.iter().any(|f| f.target == path),
            "{path} not in {listed:?}"
        );
    }
    assert_eq!(listed.len() as i64, open_fds());
}

fn thread_count_rises_when_a_thread_starts() {
    within_attempts(|| {
        let before = thread_count();
        let (release, wait) = mpsc::channel::<()>();
        let (started_tx, started) = mpsc::channel::<()>();
        let worker = std::thread::Builder::new()
            .name("gauge-witness".into())
            .spawn(move || {
                started_tx.send(()).unwrap();
                let _ = wait.recv();
            })
            .unwrap();
        started.recv().unwrap();
        let during = thread_count();
        let asleep = witness_falls_asleep();
        release.send(()).unwrap();
        worker.join().unwrap();
        let after = thread_count();
        if during - before == 1 && after == before && asleep {
            Ok(())
        } else {
            Err(format!(
                "before {before}, during {during}, after {after}, seen asleep {asleep}"
            ))
        }
    });
}

/// Whether `threads()` shows the witness thread in state `S` (blocked in
/// `recv`) within a second. Right after it reported in, it may still be
/// running on its way into `recv`; sleeping is the event awaited.
fn witness_falls_asleep() -> bool {
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let listed = threads();
        match listed.iter().find(|t| t.name == "gauge-witness") {
            Some(t) if t.state == "S" => return true,
            Some(_) => std::thread::yield_now(),
            None => return false,
        }
    }
    false
}

fn cached_gauges_are_stale_within_ttl_and_fresh_after() {
    let ttl = Duration::from_millis(500);
    within_attempts(|| {
        let gauges = ProcGauges::new(ttl);
        let created = Instant::now();
        let first = gauges.get();
        let files = open_files(10);
        let cached = gauges.get();
        if created.elapsed() >= ttl {
            return Err("machine too slow to observe the cache within its ttl".into());
        }
        // Stale but valid: the reading from before the files were opened.
        assert_eq!(cached, first);
        assert_eq!(gauges.refreshes(), 0);
        // The ttl itself is the event awaited here.
        std::thread::sleep(ttl.saturating_sub(created.elapsed()) + Duration::from_millis(10));
        let fresh = gauges.get();
        drop(files);
        assert_eq!(gauges.refreshes(), 1);
        if fresh.open_fds == first.open_fds + 10 {
            Ok(())
        } else {
            Err(format!("first {first:?}, fresh {fresh:?}"))
        }
    });
}

/// Restores RLIMIT_NOFILE when dropped, so a failed assertion cannot leave the
/// test process with a tiny fd limit.
struct RestoreFdLimit(libc::rlimit);

impl RestoreFdLimit {
    fn lower_soft_to(soft: u64) -> RestoreFdLimit {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid pointers to rlimit structs for the calls' duration.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut old), 0);
            let new = libc::rlimit {
                rlim_cur: soft as libc::rlim_t,
                rlim_max: old.rlim_max,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &new), 0);
        }
        RestoreFdLimit(old)
    }
}

impl Drop for RestoreFdLimit {
    fn drop(&mut self) {
        // SAFETY: valid pointer to an rlimit struct.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.0) };
    }
}

fn lowest_free_fd() -> u64 {
    use std::os::fd::AsRawFd;
    tempfile::tempfile().unwrap().as_raw_fd() as u64
}

fn resources_check_fails_near_the_fd_limit_and_when_the_fd_table_is_full() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let gauges = Arc::new(ProcGauges::new(Duration::from_secs(60)));
    let check = resources_check(1 << 20, gauges.clone());
    let run = |check: &Check| {
        runtime.block_on(run_checks(
            std::slice::from_ref(check),
            Duration::from_secs(2),
        ))
    };

    let verdict = run(&check);
    assert_eq!(verdict.checks["resources"].status, CheckStatus::Ok);

    // Enough open fds that "2 below the limit" is above 90 % of it.
    let _files = open_files(20);
    let open = open_fds() as u64;
    {
        let _restore = RestoreFdLimit::lower_soft_to(open + 2);
        let result = &run(&check).checks["resources"];
        assert_eq!(result.status, CheckStatus::Failed, "{result:?}");
        let detail = result.detail.as_deref().unwrap();
        assert!(detail.contains("soft limit"), "{detail}");
        assert!(detail.contains(&format!("/{}", open + 2)), "{detail}");
    }
    {
        // The fd-exhaustion wedge: no new fd can be opened. New fds take the
        // lowest free number, so a limit at that number refuses every open,
        // whatever holes the fd table has above it. The count still reads
        // where the kernel gives it without opening anything (the size of
        // `/proc/self/fd`, Linux 6.2 on) and is then at or over the limit;
        // older kernels list the directory, which cannot be opened.
        let limit = lowest_free_fd();
        let _restore = RestoreFdLimit::lower_soft_to(limit);
        let result = &run(&check).checks["resources"];
        assert_eq!(result.status, CheckStatus::Failed, "{result:?}");
        let detail = result.detail.as_deref().unwrap();
        let fds = open_fds();
        if fds == UNREADABLE {
            assert!(detail.contains("cannot list open fds"), "{result:?}");
        } else {
            assert!(fds as u64 >= limit, "{fds} open, limit {limit}");
            assert!(detail.contains(&format!("/{limit}")), "{result:?}");
        }
    }
    assert!(fd_limits().0 as u64 > open + 2, "limit restored");
    assert_eq!(run(&check).checks["resources"].status, CheckStatus::Ok);
}

async fn self_probe_leaves_no_socket_behind_after_a_timeout() {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = ProbeTarget::Tcp(tcp.local_addr().unwrap());
    // Warm up whatever the runtime opens once.
    let _ = probe_once(target.clone(), Duration::from_millis(100)).await;
    let before = open_fds();
    for _ in 0..5 {
        let status = probe_once(target.clone(), Duration::from_millis(100)).await;
        assert_eq!(status, CheckStatus::Timeout);
    }
    assert_eq!(
        open_fds(),
        before,
        "each timed-out probe must close its socket"
    );
}
