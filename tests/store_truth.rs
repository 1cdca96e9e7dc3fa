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

// ------------------------------------------------- a file that is no database

/// Tamper with `state.db` under a running server (same inode, so the
/// identity check alone would pass), then: the next write is refused with 503
/// naming `what`, nothing of it is acknowledged, and the `store` check fails
/// as a wedge (the loop stops counting passing ticks, so `WATCHDOG=1` stops).
/// Returns the still running server.
async fn tampering_refuses_writes(
    vars: &[(&str, &str)],
    what: &str,
    tamper: impl FnOnce(&Path),
) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut all = vec![("AGENTD_HEALTH_INTERVAL", "100ms")];
    all.extend_from_slice(vars);
    let server = TestServer::start(&all, dir.path()).await;
    for i in 0..3 {
        let r = post_json(server.addr, "/api/chat", &chat(i)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    health_until(server.addr, "healthy first", |s, _| s == 200).await;

    tamper(&dir.path().join("state.db"));

    let mut msg = String::new();
    for i in 3..6 {
        let r = post_json(server.addr, "/api/chat", &chat(i)).await;
        assert_eq!(r.status, 503, "write {i} after tampering: {}", r.text());
        msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.contains(what), "{msg}");
    }
    let body = health_until(server.addr, "store check fails", |status, b| {
        status == 503 && b["checks"]["store"]["status"] == "failed"
    })
    .await;
    let detail = body["checks"]["store"]["detail"].as_str().unwrap();
    assert!(detail.contains(what), "{detail}");
    assert_eq!(body["status"], "degraded");
    assert!(
        body["watchdog"]["consecutive_failures"].as_u64().unwrap() >= 1,
        "{body}"
    );
    eprintln!(
        "{what}: chat 503 \"{msg}\"; /health 503 {}, store failed: \"{detail}\", \
         {} failed ticks in a row",
        body["status"], body["watchdog"]["consecutive_failures"]
    );
    (server, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_db_overwritten_in_place_with_garbage_acknowledges_nothing() {
    tampering_refuses_writes(&[], "no longer a SQLite database", |db| {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
        f.write_all(&[0x5a; 4096]).unwrap();
        f.sync_all().unwrap();
    })
    .await
    .0
    .stop()
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_state_db_acknowledges_nothing() {
    tampering_refuses_writes(&[], "truncated", |db| {
        let f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
        f.set_len(0).unwrap();
    })
    .await
    .0
    .stop()
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_database_copied_over_state_db_acknowledges_nothing() {
    tampering_refuses_writes(&[], "overwritten in place by another database", |db| {
        let other = db.with_file_name("other.db");
        let conn = rusqlite::Connection::open(&other).unwrap();
        conn.execute_batch(
            "CREATE TABLE unrelated (x); INSERT INTO unrelated VALUES (randomblob(50000));",
        )
        .unwrap();
        drop(conn);
        // `cp` writes into the existing file: same inode, other content.
        std::fs::copy(&other, db).unwrap();
    })
    .await
    .0
    .stop()
    .await;
}

/// `chattr +i` (the nearest a test gets to a read-only remount: a remount
/// is refused while SQLite holds the files open for writing): the WAL cannot
/// grow, so the commit fails and nothing is acknowledged. Needs root
/// (CAP_LINUX_IMMUTABLE) and a file system with the flag (ext4, xfs, btrfs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immutable_state_files_acknowledge_nothing() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: chattr +i needs CAP_LINUX_IMMUTABLE; run as root (CI does)");
        return;
    }
    struct Mutable(Vec<PathBuf>);
    impl Drop for Mutable {
        fn drop(&mut self) {
            for p in &self.0 {
                let _ = Command::new("chattr").arg("-i").arg(p).status();
            }
        }
    }
    let mut guard = Mutable(Vec::new());
    let (server, _dir) = tampering_refuses_writes(&[], "cannot be written", |db| {
        let wal = db.with_file_name("state.db-wal");
        for f in [db.to_path_buf(), wal] {
            let out = Command::new("chattr").arg("+i").arg(&f).output().unwrap();
            assert!(
                out.status.success(),
                "chattr +i {}: {}",
                f.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            guard.0.push(f);
        }
    })
    .await;
    // Writable again: the server closes its store cleanly.
    drop(guard);
    server.stop().await;
}

/// Stop a server that wrote `n` messages (its close checkpoints everything
/// into `state.db`), and return the state dir's database path and page size.
fn database_with_messages(dir: &Path, n: usize) -> (PathBuf, u64) {
    let mut d = Daemon::start(&[], dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut conn = common::Conn::open(d.addr).await.unwrap();
        for i in 0..n {
            let r = conn
                .post_json(
                    "/api/chat",
                    &json!({"message": format!("m{i} {}", "x".repeat(500)), "session_id": "truth"}),
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
    });
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.wait(), Some(0));
    let db = dir.join("state.db");
    let header = std::fs::read(&db).unwrap();
    let raw = u16::from_be_bytes([header[16], header[17]]) as u64;
    (db, if raw == 1 { 65536 } else { raw })
}

/// Overwrite the last page of the database (a leaf of the messages table)
/// in place, leaving the header alone.
fn damage_last_page(db: &Path, page: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
    let len = f.metadata().unwrap().len();
    assert!(len >= 4 * page, "database too small: {len} bytes");
    f.seek(SeekFrom::Start(len - page)).unwrap();
    f.write_all(&vec![0xa5; page as usize]).unwrap();
    f.sync_all().unwrap();
}

/// Damage the header cannot show (a page in the middle) is found by the
/// scheduled `PRAGMA quick_check`: writes are refused from then on and the
/// `store` check names it.
#[test]
fn quick_check_finds_a_damaged_page_under_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let (db, page) = database_with_messages(dir.path(), 200);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(quick_check_finds(dir.path(), &db, page));
}

async fn quick_check_finds(dir: &Path, db: &Path, page: u64) {
    let server = TestServer::start(
        &[
            ("AGENTD_HEALTH_INTERVAL", "100ms"),
            ("AGENTD_STORE_QUICK_CHECK_INTERVAL", "100ms"),
        ],
        dir,
    )
    .await;
    health_until(server.addr, "healthy first", |s, _| s == 200).await;
    damage_last_page(db, page);
    let body = health_until(server.addr, "store check fails", |_, b| {
        b["checks"]["store"]["status"] == "failed"
    })
    .await;
    let detail = body["checks"]["store"]["detail"].as_str().unwrap();
    assert!(detail.contains("quick_check"), "{detail}");
    let r = post_json(server.addr, "/api/chat", &chat(9)).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("quick_check"), "{}", r.text());
    server.stop().await;
}

/// The same damage found at start: `serve` exits 1 naming it, before
/// anything is served.
#[test]
fn a_damaged_state_db_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (db, page) = database_with_messages(dir.path(), 200);
    damage_last_page(&db, page);
    let out = Command::new(common::agentd_bin())
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("AGENTD_LISTEN", "127.0.0.1:0")
        .env("AGENTD_STATE_DIR", dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("quick_check"), "{stderr}");
}
