//! The health loop against the real binary and a real `NOTIFY_SOCKET`:
//! READY=1 after the first passing tick, WATCHDOG=1 at WATCHDOG_USEC/3, and for
//! every fault kind: the pings stop, `STATUS=degraded` names the failed check,
//! and the keepalive file stops advancing.

mod common;

use std::path::Path;

use common::notify::{has_line, NotifyReceiver};
use common::Daemon;

/// `WATCHDOG_USEC` used by these tests: interval 0.5 s, deadline 0.25 s.
const WATCHDOG_USEC: &str = "1500000";

fn is_ping(m: &str) -> bool {
    has_line(m, "WATCHDOG=1")
}

fn start(receiver: &NotifyReceiver, dir: &Path, extra: &[(&str, &str)]) -> Daemon {
    let socket = receiver.env_value();
    let keepalive = dir.join("keepalive");
    let mut vars = vec![
        ("NOTIFY_SOCKET", socket.as_str()),
        ("WATCHDOG_USEC", WATCHDOG_USEC),
        ("AGENTD_FAULT_INJECTION", "1"),
        ("AGENTD_KEEPALIVE_FILE", keepalive.to_str().unwrap()),
    ];
    vars.extend_from_slice(extra);
    let d = Daemon::start(&vars, dir);
    assert!(
        receiver
            .wait_for(|m| has_line(m, "READY=1"), common::WAIT)
            .is_some(),
        "READY=1: {}",
        d.log_text()
    );
    d
}

#[test]
fn ready_follows_a_passing_tick_and_pings_arrive_each_interval() {
    let dir = tempfile::tempdir().unwrap();
    let rx = NotifyReceiver::path();
    let d = start(&rx, dir.path(), &[]);
    let msgs = rx.messages();
    let ready_at = msgs
        .iter()
        .position(|(_, m)| has_line(m, "READY=1"))
        .unwrap();
    assert!(
        msgs[..ready_at].iter().any(|(_, m)| is_ping(m)),
        "READY=1 comes after the first passing tick's ping: {msgs:?}"
    );
    // Six more pings arrive (about 3 s at 0.5 s each; bounded by WAIT).
    let before = rx.count(is_ping);
    assert!(rx.wait_for_count(is_ping, before + 6, common::WAIT));
    let status = rx
        .wait_for(|m| m.contains("STATUS=healthy"), common::WAIT)
        .expect("a healthy STATUS= line");
    assert!(status.contains("history"), "{status}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let h = rt.block_on(common::get(d.addr, "/health")).json();
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["watchdog"]["mode"], "both");
    assert_eq!(h["watchdog"]["interval_ms"], 500);
    assert!(h["watchdog"]["pings_sent"].as_u64().unwrap() >= 6);
    for check in [
        "self_probe",
        "runtime_lag",
        "state_lock",
        "store",
        "executor",
        "resources",
    ] {
        assert_eq!(h["checks"][check]["status"], "ok", "{check}: {h}");
    }
    assert!(dir.path().join("keepalive").exists());
}

#[test]
fn abstract_notify_socket_works_too() {
    let dir = tempfile::tempdir().unwrap();
    let rx = NotifyReceiver::abstract_name();
    let _d = start(&rx, dir.path(), &[]);
    assert!(rx.wait_for_count(is_ping, 3, common::WAIT));
}

#[test]
fn watchdog_meant_for_another_pid_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let rx = NotifyReceiver::path();
    let d = start(&rx, dir.path(), &[("WATCHDOG_PID", "1")]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let h = rt.block_on(common::get(d.addr, "/health")).json();
    assert_eq!(h["watchdog"]["mode"], "keepalive-file");
    assert_eq!(
        h["watchdog"]["interval_ms"], 10_000,
        "falls back to AGENTD_HEALTH_INTERVAL"
    );
    // READY=1 arrived (start() waited for it); no WATCHDOG=1 was ever sent.
    assert_eq!(rx.count(is_ping), 0, "{:?}", rx.messages());
    assert_eq!(h["watchdog"]["pings_sent"], 0);
}

#[test]
fn sighup_reloads_the_config_file_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agentd.toml");
    std::fs::write(&file, "history_limit = 50\n").unwrap();
    let rx = NotifyReceiver::path();
    let mut d = start(
        &rx,
        dir.path(),
        &[("AGENTD_CONFIG", file.to_str().unwrap())],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let limit = |d: &Daemon| {
        rt.block_on(common::get(d.addr, "/health")).json()["diagnostics"]
            ["conversation_history_limit"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(limit(&d), 50);
    std::fs::write(&file, "history_limit = 7\n").unwrap();
    let readies = rx.count(|m| has_line(m, "READY=1"));
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let reloading = rx
        .wait_for(|m| has_line(m, "RELOADING=1"), common::WAIT)
        .expect("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    assert!(rx.wait_for_count(|m| has_line(m, "READY=1"), readies + 1, common::WAIT));
    assert_eq!(limit(&d), 7, "same process, new limit");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(rx
        .wait_for(|m| has_line(m, "STOPPING=1"), common::WAIT)
        .is_some());
    assert_eq!(d.wait(), Some(0));
}

/// SIGTERM while an agent ignores SIGINT/SIGTERM: the stop waits out two
/// grace periods (longer than the sentinel's stall threshold), and that is not
/// reported as a stalled loop.
#[test]
fn an_orderly_stop_is_not_reported_as_a_stall() {
    let dir = tempfile::tempdir().unwrap();
    let rx = NotifyReceiver::path();
    let stubborn = format!("{}/tests/fixtures/stubborn.sh", env!("CARGO_MANIFEST_DIR"));
    let mut d = start(
        &rx,
        dir.path(),
        &[
            ("AGENTD_RUNTIME", "command"),
            ("AGENTD_RUNTIME_CMD", &stubborn),
            ("AGENTD_KILL_GRACE", "1s"),
            ("AGENTD_DRAIN_TIMEOUT", "0"),
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let r = common::post_json(
            d.addr,
            "/api/task",
            &serde_json::json!({"prompt": "x", "async": true}),
        )
        .await;
        assert_eq!(r.status, 202);
        let mut conn = common::Conn::open(d.addr).await.unwrap();
        while conn.get("/api/executions/running").await.json()["executions"][0]["pid"].is_null() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    let stopping = std::time::Instant::now();
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.wait(), Some(0));
    assert!(
        stopping.elapsed() >= std::time::Duration::from_secs(2),
        "both grace periods ran"
    );
    let bundles = std::fs::read_dir(dir.path().join("diagnostics"))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(bundles, 0, "no diagnostics bundle for an orderly stop");
    assert!(!d.log_text().contains("health_loop"), "{}", d.log_text());
}

#[test]
fn a_startup_failure_reports_status_failed() {
    let dir = tempfile::tempdir().unwrap();
    let rx = NotifyReceiver::path();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let out = std::process::Command::new(common::agentd_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&not_a_dir)
        .env_clear()
        .env("NOTIFY_SOCKET", rx.env_value())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let failed = rx
        .wait_for(|m| m.contains("STATUS=failed: "), common::WAIT)
        .expect("STATUS=failed");
    assert!(failed.contains("state dir"), "{failed}");
    assert!(rx.count(|m| has_line(m, "READY=1")) == 0);

    let out = std::process::Command::new(common::agentd_bin())
        .arg("serve")
        .env_clear()
        .env("NOTIFY_SOCKET", rx.env_value())
        .env("AGENTD_MAX_QUEUE", "endless")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let failed = rx
        .wait_for(|m| m.contains("AGENTD_MAX_QUEUE"), common::WAIT)
        .expect("STATUS=failed naming the setting");
    assert!(failed.contains("ERRNO="), "{failed}");
}

#[cfg(feature = "fault-injection")]
mod faults {
    use super::*;
    use std::time::{Duration, Instant, SystemTime};

    const INTERVAL: Duration = Duration::from_millis(500);

    fn mtime(p: &Path) -> SystemTime {
        std::fs::metadata(p).unwrap().modified().unwrap()
    }

    /// Inject `kind`, then prove: pings stop within two intervals, the
    /// keepalive file stops advancing, and (unless the loop itself is wedged)
    /// `STATUS=degraded: <check>` names the check.
    fn pings_stop_after(
        kind: &str,
        expect_check: Option<&str>,
    ) -> (tempfile::TempDir, Daemon, NotifyReceiver) {
        let dir = tempfile::tempdir().unwrap();
        let rx = NotifyReceiver::path();
        let d = start(&rx, dir.path(), &[("AGENTD_NOFILE_TARGET", "1024")]);
        assert!(rx.wait_for_count(is_ping, 3, common::WAIT));
        let rt = tokio::runtime::Runtime::new().unwrap();
        assert_eq!(
            rt.block_on(common::inject_fault(d.addr, kind)),
            200,
            "{kind}"
        );
        let injected = Instant::now();
        if let Some(check) = expect_check {
            let want = format!("STATUS=degraded: {check}");
            assert!(
                rx.wait_for(|m| m.contains(&want), common::WAIT).is_some(),
                "{kind}: no {want:?} in {:?}\n{}",
                rx.messages(),
                d.log_text()
            );
        }
        // Let two intervals pass for an in-flight tick to finish, then no ping
        // may arrive during three more intervals (waiting out the absence of an
        // event is the only way to observe it).
        let settle = INTERVAL * 2 + INTERVAL / 2;
        std::thread::sleep(settle.saturating_sub(injected.elapsed()));
        let pings = rx.count(is_ping);
        let keepalive = dir.path().join("keepalive");
        let touched = mtime(&keepalive);
        std::thread::sleep(INTERVAL * 3);
        assert_eq!(
            rx.count(is_ping),
            pings,
            "{kind}: pings continued: {:?}",
            rx.messages()
        );
        assert_eq!(
            mtime(&keepalive),
            touched,
            "{kind}: keepalive file still advancing"
        );
        (dir, d, rx)
    }

    #[test]
    fn deadlock_state_stops_pings_and_names_state_lock() {
        let (_dir, d, _rx) = pings_stop_after("deadlock-state", Some("state_lock"));
        // /health never takes the state lock: it still answers, with 503.
        let rt = tokio::runtime::Runtime::new().unwrap();
        let started = Instant::now();
        let r = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), common::get(d.addr, "/health"))
                .await
                .expect("/health answers while the state lock is held")
        });
        let took = started.elapsed();
        assert_eq!(r.status, 503);
        assert_eq!(r.json()["status"], "degraded");
        assert_eq!(r.json()["checks"]["state_lock"]["status"], "timeout");
        eprintln!("/health answered in {took:?} while the state lock was held");
    }

    #[test]
    fn stall_accept_stops_pings_and_names_self_probe() {
        pings_stop_after("stall-accept", Some("self_probe"));
    }

    #[test]
    fn hang_store_stops_pings_and_names_store() {
        pings_stop_after("hang-store", Some("store"));
    }

    #[test]
    fn exhaust_fds_stops_pings_and_names_a_check() {
        // With no fd left, the resources check (fds over 90 %) or the
        // self-probe (cannot connect) fails first; either is a true verdict.
        let (_dir, _d, rx) = pings_stop_after("exhaust-fds", None);
        assert!(
            rx.wait_for(
                |m| m.contains("STATUS=degraded: resources")
                    || m.contains("STATUS=degraded: self_probe"),
                common::WAIT
            )
            .is_some(),
            "{:?}",
            rx.messages()
        );
    }

    #[test]
    fn stall_executor_stops_pings_and_names_executor() {
        pings_stop_after("stall-executor", Some("executor"));
    }

    #[test]
    fn block_runtime_stops_pings_and_writes_a_diagnostics_bundle() {
        let (dir, d, rx) = pings_stop_after("block-runtime", None);
        let bundles = dir.path().join("diagnostics");
        let deadline = Instant::now() + common::WAIT;
        let found = loop {
            let files: Vec<_> = std::fs::read_dir(&bundles)
                .map(|r| r.filter_map(Result::ok).map(|e| e.path()).collect())
                .unwrap_or_default();
            if let Some(f) = files
                .into_iter()
                .find(|p| p.extension().is_some_and(|e| e == "json"))
            {
                break f;
            }
            assert!(Instant::now() < deadline, "no bundle: {}", d.log_text());
            std::thread::sleep(Duration::from_millis(50));
        };
        let bundle: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&found).unwrap()).unwrap();
        let threads = bundle["threads"].as_array().expect("threads in the bundle");
        assert!(threads.iter().any(|t| t["name"]
            .as_str()
            .unwrap_or("")
            .starts_with("agentd-worker")));
        assert!(bundle["fds"].as_array().is_some_and(|f| !f.is_empty()));
        assert!(
            rx.wait_for(|m| m.contains("STATUS=degraded: health_loop"), common::WAIT)
                .is_some(),
            "the sentinel reports the stall: {:?}",
            rx.messages()
        );
    }

    #[test]
    fn repeated_failures_send_watchdog_trigger_when_configured() {
        let dir = tempfile::tempdir().unwrap();
        let rx = NotifyReceiver::path();
        let d = start(&rx, dir.path(), &[("AGENTD_WATCHDOG_TRIGGER_AFTER", "2")]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        assert_eq!(rt.block_on(common::inject_fault(d.addr, "hang-store")), 200);
        assert!(
            rx.wait_for(|m| has_line(m, "WATCHDOG=trigger"), common::WAIT)
                .is_some(),
            "{:?}",
            rx.messages()
        );
    }

    #[test]
    fn fault_endpoint_is_off_without_the_switch() {
        let dir = tempfile::tempdir().unwrap();
        let d = Daemon::start(&[], dir.path());
        let rt = tokio::runtime::Runtime::new().unwrap();
        assert_eq!(rt.block_on(common::inject_fault(d.addr, "hang-store")), 404);
    }

    /// launchd mode (keepalive file, no systemd watchdog): when the loop stalls
    /// for AGENTD_SELF_ABORT_AFTER intervals, the sentinel aborts the process so
    /// KeepAlive restarts it, after writing a diagnostics bundle.
    #[test]
    fn keepalive_mode_aborts_a_wedged_process() {
        let dir = tempfile::tempdir().unwrap();
        let keepalive = dir.path().join("keepalive");
        // A notify socket but no WATCHDOG_USEC: the mode stays keepalive-file,
        // and READY=1 says the first tick passed (and touched the file).
        let rx = NotifyReceiver::path();
        let socket = rx.env_value();
        let mut d = Daemon::start(
            &[
                ("NOTIFY_SOCKET", socket.as_str()),
                ("AGENTD_FAULT_INJECTION", "1"),
                ("AGENTD_KEEPALIVE_FILE", keepalive.to_str().unwrap()),
                ("AGENTD_HEALTH_INTERVAL", "200ms"),
                ("AGENTD_SELF_ABORT_AFTER", "3"),
            ],
            dir.path(),
        );
        assert!(rx
            .wait_for(|m| has_line(m, "READY=1"), common::WAIT)
            .is_some());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let h = rt.block_on(common::get(d.addr, "/health")).json();
        assert_eq!(h["watchdog"]["mode"], "keepalive-file");
        assert!(keepalive.exists());
        assert_eq!(
            rt.block_on(common::inject_fault(d.addr, "block-runtime")),
            200
        );
        // Bounded by Daemon::wait; SIGABRT is signal 6 (no exit code).
        let status = d.wait_status();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(libc::SIGABRT),
            "{status:?}\n{}",
            d.log_text()
        );
        let bundles = std::fs::read_dir(dir.path().join("diagnostics"))
            .unwrap()
            .count();
        assert!(bundles >= 1, "a bundle was written before the abort");
    }

    /// 100 concurrent `?deep=1` requests share one run. The state lock is held
    /// so each run lasts its full deadline, long enough for all 100 to join.
    #[test]
    fn concurrent_deep_checks_share_one_run() {
        let dir = tempfile::tempdir().unwrap();
        // Interval 10 s: deadline 5 s, so one deep run spans all requests.
        let d = Daemon::start(&[("AGENTD_FAULT_INJECTION", "1")], dir.path());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let addr = d.addr;
        rt.block_on(async move {
            assert_eq!(common::inject_fault(addr, "deadlock-state").await, 200);
            let tasks: Vec<_> = (0..100)
                .map(|_| tokio::spawn(async move { common::get(addr, "/health?deep=1").await }))
                .collect();
            let mut runs = std::collections::HashSet::new();
            for t in tasks {
                let r = t.await.unwrap();
                assert_eq!(r.status, 503);
                let body = r.json();
                assert_eq!(body["checks"]["state_lock"]["status"], "timeout");
                runs.insert(body["deep"]["runs"].as_u64().unwrap());
            }
            assert_eq!(runs.len(), 1, "all 100 callers saw the same run: {runs:?}");
            assert_eq!(runs.into_iter().next(), Some(1));
        });
    }
}
