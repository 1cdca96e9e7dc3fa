//! The real `agentd` binary as a child process: CLI, configuration errors,
//! graceful shutdown on a real SIGTERM, and a flat open-file count.

mod common;

use std::process::Command;

use common::notify::{has_line, NotifyReceiver};
use common::{agentd_bin, user_messages, Conn, Daemon};
use nix::sys::signal::Signal;
use serde_json::json;

#[test]
fn version_and_help_work() {
    let out = Command::new(agentd_bin()).arg("version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("agentd 0."));
    let out = Command::new(agentd_bin()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("serve") && help.contains("health"), "{help}");
}

/// `serve --help` carries the settings part made from the list of settings
/// (every setting, its variable, key, default and meaning), and each flag's
/// help names its variable and default.
#[test]
fn serve_help_lists_every_setting() {
    let out = Command::new(agentd_bin())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let settings = agentd::config::settings_help();
    assert!(help.contains(settings.trim()), "{help}");
    for name in [
        "AGENTD_MAX_CONNECTIONS",
        "AGENTD_LOG",
        "CODEX_HOME",
        "AGENTD_CONFIG",
    ] {
        assert!(
            settings.contains(&format!("\n  {name}")),
            "{name}: {settings}"
        );
    }
    assert!(
        help.contains("[env: AGENTD_LISTEN] [default: 127.0.0.1:8420]"),
        "{help}"
    );
    assert!(help.contains("[env: AGENTD_STATE_DIR]"), "{help}");
}

/// Invalid configuration exits non-zero before binding, with one line naming
/// the setting and the bad value.
#[test]
fn invalid_config_exits_before_binding_and_names_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("AGENTD_MAX_CONNECTIONS", "many"),
        ("AGENTD_LISTEN", "not-an-address"),
        ("AGENTD_RUNTIME", "skynet"),
        ("AGENTD_HEALTH_INTERVAL", "-1"),
    ];
    for (name, value) in cases {
        let out = Command::new(agentd_bin())
            .arg("serve")
            .env_clear()
            .env("AGENTD_STATE_DIR", dir.path())
            .env(name, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(name) && err.contains(value), "{err}");
    }
    assert!(
        !dir.path().join("state.db").exists(),
        "nothing was created before validation passed"
    );
    let out = Command::new(agentd_bin())
        .args(["serve", "--listen", "0.0.0.0:0"])
        .env_clear()
        .env("AGENTD_STATE_DIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AGENTD_API_TOKEN"));
}

/// A start that cannot listen leaves nothing behind: the listener is bound
/// before the state directory is created, so a taken port is an error that
/// names the address, and the directory does not exist afterwards.
#[test]
fn port_in_use_fails_before_the_state_dir_exists() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = Command::new(agentd_bin())
        .args(["serve", "--listen", &addr])
        .env_clear()
        .env("AGENTD_STATE_DIR", &state)
        .env("AGENTD_LOG", "info")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on {addr}")) && err.contains("in use"),
        "{err}"
    );
    assert!(!state.exists(), "the state directory was created: {err}");
}

/// `--listen localhost:PORT` is resolved once at start to a loopback
/// address; the server then answers there, and the error of a taken port
/// names both the name and the address it resolved to.
#[test]
fn listen_accepts_a_host_name() {
    let dir = tempfile::tempdir().unwrap();
    let rx = NotifyReceiver::path();
    let socket = rx.env_value();
    let d = Daemon::start(
        &[
            ("AGENTD_LISTEN", "localhost:0"),
            ("NOTIFY_SOCKET", socket.as_str()),
        ],
        dir.path(),
    );
    assert!(d.addr.ip().is_loopback(), "{}", d.addr);
    assert!(rx
        .wait_for(|m| has_line(m, "READY=1"), common::WAIT)
        .is_some());
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(common::get(d.addr, "/health")).status, 200);

    let other = tempfile::tempdir().unwrap();
    let port = d.addr.port();
    let out = Command::new(agentd_bin())
        .args(["serve", "--listen", &format!("localhost:{port}")])
        .env_clear()
        .env("AGENTD_STATE_DIR", other.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on {} (localhost:{port})", d.addr)),
        "{err}"
    );
}

#[test]
fn unusable_state_dir_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = Command::new(agentd_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&file)
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a-file") && err.contains("state dir"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn invalid_history_limit_warns_and_uses_default() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&[("AGENT_HISTORY_LIMIT", "lots")], dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let h = rt.block_on(common::get(d.addr, "/health")).json();
    assert_eq!(h["diagnostics"]["conversation_history_limit"], 1000);
    d.signal(Signal::SIGTERM);
    assert_eq!(d.wait(), Some(0));
    assert!(
        d.log_text().contains("AGENT_HISTORY_LIMIT"),
        "{}",
        d.log_text()
    );
}

/// SIGTERM while chat requests are in flight: every request the server
/// acknowledged with 200 is in the store after a restart, and the exit is 0.
#[test]
fn graceful_shutdown_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&[], dir.path());
    let addr = d.addr;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let clients: Vec<_> = (0..8)
        .map(|c| {
            rt.spawn(async move {
                let mut acked = Vec::new();
                let Ok(mut conn) = Conn::open(addr).await else {
                    return acked;
                };
                // Bounded: at most 5000 requests per client; the drain ends
                // the connection, which ends the loop.
                for i in 0..5000 {
                    let msg = format!("c{c}-{i}");
                    match conn
                        .send(
                            "POST",
                            "/api/chat",
                            &[],
                            serde_json::to_vec(
                                &json!({"message": msg, "session_id": format!("c{c}")}),
                            )
                            .unwrap(),
                        )
                        .await
                    {
                        Ok(r) if r.status == 200 => acked.push(msg),
                        _ => break,
                    }
                }
                acked
            })
        })
        .collect();
    // Let traffic flow, then a real SIGTERM mid-stream.
    rt.block_on(async {
        let mut c = Conn::open(addr).await.unwrap();
        loop {
            let h = c.get("/health").await.json();
            // 200 chats acknowledged (two messages each) before the signal.
            if h["diagnostics"]["conversation_history_size"]
                .as_u64()
                .unwrap()
                > 400
            {
                break;
            }
        }
    });
    d.signal(Signal::SIGTERM);
    let acked: Vec<String> = rt.block_on(async {
        let mut all = Vec::new();
        for c in clients {
            all.extend(c.await.unwrap());
        }
        all
    });
    assert_eq!(d.wait(), Some(0), "clean exit: {}", d.log_text());
    assert!(acked.len() > 100, "traffic was in flight: {}", acked.len());

    let d2 = Daemon::start(&[("AGENT_HISTORY_LIMIT", "100000")], dir.path());
    let stored = rt
        .block_on(common::get(d2.addr, "/api/chat/history?limit=10000"))
        .json();
    let users: std::collections::HashSet<&str> = user_messages(&stored).into_iter().collect();
    let lost: Vec<_> = acked
        .iter()
        .filter(|m| !users.contains(m.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

/// The store's single connection makes the fd count independent of traffic:
/// after 10,000 chats it equals the count after the first one.
#[test]
fn open_fds_stay_flat_over_ten_thousand_chats() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&[("AGENTD_STORE_SYNCHRONOUS", "normal")], dir.path());
    let addr = d.addr;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conns = 4;
    let mut clients = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..conns {
            v.push(Conn::open(addr).await.unwrap());
        }
        v
    });
    let body = serde_json::to_vec(&json!({"message": "fd check"})).unwrap();
    let r = rt
        .block_on(clients[0].send("POST", "/api/chat", &[], body.clone()))
        .unwrap();
    assert_eq!(r.status, 200);
    // Every client connection is open and has served once before the baseline.
    for c in clients.iter_mut().skip(1) {
        rt.block_on(c.get("/health"));
    }
    let baseline = d.open_fds();
    assert!(baseline > 0);
    rt.block_on(async {
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|mut c| {
                let body = body.clone();
                tokio::spawn(async move {
                    for _ in 0..(10_000 / conns) {
                        let r = c
                            .send("POST", "/api/chat", &[], body.clone())
                            .await
                            .unwrap();
                        assert_eq!(r.status, 200);
                    }
                    c
                })
            })
            .collect();
        let mut kept = Vec::new();
        for t in tasks {
            kept.push(t.await.unwrap());
        }
        assert_eq!(
            d.open_fds(),
            baseline,
            "fds after 10,000 chats vs after the first"
        );
        let h = common::get(addr, "/api/chat/session").await.json();
        assert_eq!(h["total_messages"], 2 * 10_001);
        drop(kept);
    });
}
