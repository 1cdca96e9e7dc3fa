//! The store tells the truth: a deleted or replaced `state.db` refuses writes
//! and fails the `store` check; a full disk answers 507 `disk_full`, degrades
//! `/health` without stopping the watchdog, and recovers by itself; one
//! process per state directory; the directory and its files are private
//! whatever the umask. Real processes, real files, a real tmpfs.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{get, post_json, Daemon, TestServer, WAIT};
use serde_json::json;

/// Poll `/health` until `done` holds for its body, bounded by [`WAIT`].
async fn health_until(
    addr: std::net::SocketAddr,
    what: &str,
    done: impl Fn(u16, &serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let r = get(addr, "/health").await;
        let body = r.json();
        if done(r.status, &body) {
            return body;
        }
        assert!(
            started.elapsed() < WAIT,
            "{what}: not reached within {WAIT:?}; last /health: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn chat(i: usize) -> serde_json::Value {
    json!({"message": format!("m{i}"), "session_id": "truth"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_state_db_refuses_writes_and_fails_the_store_check() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[("AGENTD_HEALTH_INTERVAL", "100ms")], dir.path()).await;
    assert_eq!(
        post_json(server.addr, "/api/chat", &chat(0)).await.status,
        200
    );

    std::fs::remove_file(dir.path().join("state.db")).unwrap();
    let r = post_json(server.addr, "/api/chat", &chat(1)).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let err = r.json();
    assert_eq!(err["error"]["code"], "unavailable");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(msg.contains("state.db was deleted"), "{msg}");

    let body = health_until(server.addr, "store check fails", |status, b| {
        status == 503 && b["checks"]["store"]["status"] == "failed"
    })
    .await;
    let detail = body["checks"]["store"]["detail"].as_str().unwrap();
    assert!(detail.contains("state.db was deleted"), "{detail}");
    assert_eq!(body["status"], "degraded");
    // A wedge: the loop stops counting passing ticks.
    assert!(body["watchdog"]["consecutive_failures"].as_u64().unwrap() >= 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_state_db_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[("AGENTD_HEALTH_INTERVAL", "100ms")], dir.path()).await;
    assert_eq!(
        post_json(server.addr, "/api/chat", &chat(0)).await.status,
        200
    );
    let other = dir.path().join("other.db");
    std::fs::write(&other, b"not the database agentd has open").unwrap();
    std::fs::rename(&other, dir.path().join("state.db")).unwrap();

    let r = post_json(server.addr, "/api/chat", &chat(1)).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("state.db was replaced"), "{}", r.text());
    let body = health_until(server.addr, "store check fails", |_, b| {
        b["checks"]["store"]["status"] == "failed"
    })
    .await;
    let detail = body["checks"]["store"]["detail"].as_str().unwrap();
    assert!(detail.contains("replaced"), "{detail}");
    server.stop().await;
}

#[test]
fn a_second_serve_on_the_same_state_dir_exits_1_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let first = Daemon::start(&[], dir.path());
    let lock = std::fs::read_to_string(dir.path().join("agentd.lock")).unwrap();
    assert_eq!(lock.trim(), first.pid().to_string());

    let out = Command::new(common::agentd_bin())
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("AGENTD_LISTEN", "127.0.0.1:0")
        .env("AGENTD_STATE_DIR", dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("in use by another agentd (pid {},", first.pid())),
        "{stderr}"
    );
    // The first one still serves.
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(get(first.addr, "/health?probe=1")).status, 200);
    drop(first);
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn state_dir_is_0700_and_its_files_0600_under_umask_022() {
    let parent = tempfile::tempdir().unwrap();
    let state = parent.path().join("state");
    let mut cmd = Command::new(common::agentd_bin());
    cmd.arg("serve")
        .current_dir(parent.path())
        .env_clear()
        .env("AGENTD_LISTEN", "127.0.0.1:0")
        .env("AGENTD_STATE_DIR", &state)
        .env("AGENTD_HEALTH_INTERVAL", "100ms")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: umask is async-signal-safe and touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o022);
            Ok(())
        });
    }
    let mut daemon = Daemon::spawn(cmd);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A chat makes SQLite write the WAL and shared memory files.
    let r = rt.block_on(post_json(daemon.addr, "/api/chat", &chat(0)));
    assert_eq!(r.status, 200);
    assert_eq!(mode(&state), 0o700);
    for f in ["state.db", "state.db-wal", "state.db-shm", "agentd.lock"] {
        assert_eq!(mode(&state.join(f)), 0o600, "{f}");
    }
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait(), Some(0));
}

/// Write zeros to `path` until the file system says it is full.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 4096];
    let mut written = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = f.sync_all();
    written
}

/// A 2 MB tmpfs mounted over the state dir in a mount namespace of the
/// server's own (`unshare --mount --map-root-user`, so no root is needed
/// where user namespaces are allowed). The test reaches the mount through
/// `/proc/<pid>/root`.
#[test]
fn full_disk_is_507_degraded_without_a_wedge_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let script =
        r#"mount -t tmpfs -o size=2m,mode=0700 tmpfs "$AGENTD_STATE_DIR" && exec "$0" serve"#;
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--map-root-user", "sh", "-c", script])
        .arg(common::agentd_bin())
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AGENTD_LISTEN", "127.0.0.1:0")
        .env("AGENTD_STATE_DIR", &state)
        .env("AGENTD_HEALTH_INTERVAL", "100ms")
        .env("AGENTD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut daemon = Daemon::spawn(cmd);
    let inside: PathBuf = format!("/proc/{}/root{}", daemon.pid(), state.display()).into();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        assert_eq!(
            post_json(daemon.addr, "/api/chat", &chat(0)).await.status,
            200
        );
        health_until(daemon.addr, "healthy on the tmpfs", |s, _| s == 200).await;

        let filler = inside.join("filler");
        let written = fill(&filler);
        assert!(written > 0 && written < 2 << 20, "filled {written} bytes");
        // Big enough to need new WAL pages, which the full disk refuses.
        let big = json!({"message": "x".repeat(256 << 10), "session_id": "truth"});
        let r = post_json(daemon.addr, "/api/chat", &big).await;
        assert_eq!(r.status, 507, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "disk_full");

        let body = health_until(daemon.addr, "store degraded", |s, b| {
            s == 503 && b["checks"]["store"]["status"] == "degraded"
        })
        .await;
        let detail = body["checks"]["store"]["detail"].as_str().unwrap();
        assert!(detail.contains("disk full"), "{detail}");
        // Degraded is not a wedge: ticks keep passing the watchdog's bar.
        let failures = body["watchdog"]["consecutive_failures"].as_u64().unwrap();
        assert_eq!(failures, 0, "{body}");
        // Reads are still served.
        let history = get(daemon.addr, "/api/chat/history?session_id=truth").await;
        assert_eq!(history.status, 200);
        assert_eq!(common::user_messages(&history.json()), ["m0"]);

        std::fs::remove_file(&filler).unwrap();
        health_until(daemon.addr, "recovered", |s, _| s == 200).await;
        let r = post_json(daemon.addr, "/api/chat", &big).await;
        assert_eq!(r.status, 200, "{}", r.text());
    });
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait(), Some(0));
}
