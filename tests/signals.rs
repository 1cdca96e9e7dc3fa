//! Stopping the real binary by signal: Ctrl-C does not wait out the drain
//! for work nobody will read, a second signal exits at once (non-zero, store
//! closed, process groups killed), and a token that would never match is
//! refused at start.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{agentd_bin, Conn, Daemon, WAIT};
use nix::sys::signal::Signal;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Wait (bounded) until an execution is running and has a pid; return it.
async fn running_pid(addr: std::net::SocketAddr) -> u32 {
    let mut conn = Conn::open(addr).await.unwrap();
    for _ in 0..500 {
        let v = conn.get("/api/executions/running").await.json();
        if let Some(pid) = v["executions"][0]["pid"].as_u64() {
            return pid as u32;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no execution started");
}

/// Wait (bounded) until the daemon's log has a line containing `needle`.
fn wait_for_log(d: &Daemon, needle: &str) {
    for _ in 0..500 {
        if d.log_text().contains(needle) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no {needle:?} in the log: {}", d.log_text());
}

#[test]
fn ctrl_c_with_a_request_in_flight_cancels_it_instead_of_waiting_out_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let sleepy = fixture("sleepy.sh");
    let drain = Duration::from_secs(30);
    let mut d = Daemon::start(
        &[
            ("AGENTD_RUNTIME", "command"),
            ("AGENTD_RUNTIME_CMD", &sleepy),
            ("AGENTD_DRAIN_TIMEOUT", "30s"),
            ("AGENTD_KILL_GRACE", "1s"),
        ],
        dir.path(),
    );
    let addr = d.addr;
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A synchronous task: its request stays in flight until the agent ends.
    let in_flight = rt.spawn(async move {
        common::post_json(addr, "/api/task", &serde_json::json!({"prompt": "x"})).await
    });
    rt.block_on(running_pid(addr));
    let stopping = Instant::now();
    d.signal(Signal::SIGINT);
    assert_eq!(d.wait(), Some(0), "{}", d.log_text());
    let took = stopping.elapsed();
    let answer = rt.block_on(in_flight).unwrap();
    assert_eq!(answer.json()["status"], "cancelled", "{}", answer.text());
    assert!(
        took < drain,
        "Ctrl-C waited {took:?}, the whole drain of {drain:?}"
    );
    eprintln!("Ctrl-C with a task in flight: exited after {took:?} (drain {drain:?})");
}

#[test]
fn a_second_signal_during_the_drain_exits_at_once_after_closing_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let stubborn = fixture("stubborn.sh");
    let mut d = Daemon::start(
        &[
            ("AGENTD_RUNTIME", "command"),
            ("AGENTD_RUNTIME_CMD", &stubborn),
            // Left alone, the stop would take minutes: the agent ignores
            // SIGINT and SIGTERM and each grace period is long.
            ("AGENTD_DRAIN_TIMEOUT", "60s"),
            ("AGENTD_KILL_GRACE", "60s"),
        ],
        dir.path(),
    );
    let addr = d.addr;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt.block_on(common::post_json(
        addr,
        "/api/task",
        &serde_json::json!({"prompt": "x", "async": true}),
    ));
    assert_eq!(r.status, 202);
    let agent = rt.block_on(running_pid(addr));

    d.signal(Signal::SIGTERM);
    wait_for_log(&d, "SIGTERM: shutting down");
    let second = Instant::now();
    d.signal(Signal::SIGTERM);
    let status = d.wait_status();
    eprintln!("second SIGTERM: exited after {:?}", second.elapsed());
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{}", d.log_text());
    let log = d.log_text();
    assert!(log.contains("second signal"), "{log}");
    assert!(log.contains("store closed"), "{log}");
    // The agent's whole process group was killed, not left behind.
    let mut left = common::procs::live_group_members(agent);
    for _ in 0..250 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        left = common::procs::live_group_members(agent);
    }
    assert!(left.is_empty(), "agent processes left behind: {left:?}");
    // The state dir is usable at once by the next start.
    let d2 = Daemon::start(&[], dir.path());
    drop(d2);
}

#[test]
fn a_token_with_surrounding_whitespace_is_refused_at_start_without_printing_it() {
    let dir = tempfile::tempdir().unwrap();
    let token = "whitespace-token-0123456789";
    let mut child = Command::new(agentd_bin())
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("AGENTD_LISTEN", "127.0.0.1:0")
        .env("AGENTD_STATE_DIR", dir.path())
        .env("AGENTD_API_TOKEN", format!("{token} \n"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut text);
        let _ = tx.send(text);
    });
    let text = rx.recv_timeout(WAIT).expect("agentd exits");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(text.contains("AGENTD_API_TOKEN"), "{text}");
    assert!(text.contains("whitespace"), "{text}");
    assert!(!text.contains(token), "the token was printed: {text}");
}

/// agentd started with signals ignored (as `nohup` or `&` in a script start
/// it): its agents still start with default dispositions, so a timeout's
/// SIGINT ends them, and the execution's JSON says which signal did.
#[test]
fn agents_of_a_server_started_with_signals_ignored_get_the_defaults() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(agentd_bin());
    cmd.arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AGENTD_LISTEN", "127.0.0.1:0")
        .env("AGENTD_STATE_DIR", dir.path())
        .env("AGENTD_LOG", "info")
        .env("AGENTD_RUNTIME", "command")
        .env(
            "AGENTD_RUNTIME_CMD",
            "grep -E '^Sig(Ign|Blk):' /proc/self/status",
        )
        .env("AGENTD_HEALTH_INTERVAL", "1h")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: signal is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            for sig in [libc::SIGINT, libc::SIGQUIT, libc::SIGUSR2] {
                libc::signal(sig, libc::SIG_IGN);
            }
            Ok(())
        });
    }
    let mut d = Daemon::spawn(cmd);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut conn = Conn::open(d.addr).await.unwrap();
        let r = conn
            .post_json("/api/task", &serde_json::json!({"prompt": "p"}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let text = r.json()["response"].as_str().unwrap().to_owned();
        // The agent's own masks: nothing ignored, nothing blocked.
        assert!(text.contains("SigIgn:\t0000000000000000"), "{text}");
        assert!(text.contains("SigBlk:\t0000000000000000"), "{text}");
    });
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait(), Some(0));

    // The same server, now timing out an agent that only SIGINT stops early.
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(agentd_bin());
    cmd.arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AGENTD_LISTEN", "127.0.0.1:0")
        .env("AGENTD_STATE_DIR", dir.path())
        .env("AGENTD_RUNTIME", "command")
        .env("AGENTD_RUNTIME_CMD", fixture("sleepy.sh"))
        .env("AGENTD_KILL_GRACE", "5s")
        .env("AGENTD_HEALTH_INTERVAL", "1h")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: as above.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGQUIT, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut d = Daemon::spawn(cmd);
    rt.block_on(async {
        let mut conn = Conn::open(d.addr).await.unwrap();
        let r = conn
            .post_json(
                "/api/task",
                &serde_json::json!({"prompt": "p", "timeout_s": 0.3}),
            )
            .await;
        assert_eq!(r.status, 504, "{}", r.text());
        let body = r.json();
        assert_eq!(body["cleanup"]["stopped_with"], "SIGINT", "{body}");
    });
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait(), Some(0));
}
