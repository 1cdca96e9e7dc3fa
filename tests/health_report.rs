//! `agentd health`, the real binary against a real server: one test per exit
//! code (0 healthy, 1 degraded, 2 unreachable), the address taken from
//! `--url`, the config file, or a socket-activated Unix socket, and `--json`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{agentd_bin, Daemon, WAIT};

/// Short ticks, so "healthy" and "degraded" arrive quickly.
const INTERVAL: &str = "200ms";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `agentd health ARGS` with exactly `env` (plus PATH), bounded by `WAIT`.
fn health(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(agentd_bin());
    cmd.arg("health")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let out = cmd.output().expect("run agentd health");
    assert!(
        started.elapsed() < WAIT,
        "agentd health took {:?}",
        started.elapsed()
    );
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Poll `agentd health` (bounded) until it exits with `code`.
fn await_code(args: &[&str], code: i32) -> Run {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = health(args, &[]);
        if r.code == code {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "agentd health {args:?} never exited {code}; last: {} {}{}",
            r.code,
            r.stdout,
            r.stderr
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

fn start(dir: &Path, extra: &[(&str, &str)]) -> Daemon {
    let mut vars = vec![("AGENTD_HEALTH_INTERVAL", INTERVAL)];
    vars.extend_from_slice(extra);
    Daemon::start(&vars, dir)
}

#[test]
fn healthy_server_exits_0_with_a_report_for_people() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), &[("AGENT_HISTORY_LIMIT", "777")]);
    let u = url(d.addr);
    let r = await_code(&["--url", &u], 0);
    assert!(r.stdout.starts_with("agentd "), "{}", r.stdout);
    assert!(r.stdout.contains(": HEALTHY"), "{}", r.stdout);
    assert!(!r.stdout.contains("FAIL"), "{}", r.stdout);
    for check in [
        "self_probe",
        "state_lock",
        "store",
        "executor",
        "runtime_lag",
    ] {
        assert!(r.stdout.contains(check), "{check}: {}", r.stdout);
    }
    // Gauges against their limits.
    assert!(r.stdout.contains("0 / 777 (0%)"), "{}", r.stdout);
    let fds = r
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("open fds"))
        .expect("an open fds line");
    assert!(fds.contains(" / "), "{fds}");
    assert!(r.stdout.contains("watchdog"), "{}", r.stdout);
    assert!(r.stderr.is_empty(), "{}", r.stderr);

    let deep = health(&["--url", &u, "--deep"], &[]);
    assert_eq!(deep.code, 0, "{}{}", deep.stdout, deep.stderr);

    let json = health(&["--url", &u, "--json"], &[]);
    assert_eq!(json.code, 0);
    let body: serde_json::Value = serde_json::from_str(&json.stdout).expect("raw JSON body");
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["diagnostics"]["conversation_history_limit"], 777);
}

#[test]
fn address_comes_from_the_config_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), &[]);
    let _ = await_code(&["--url", &url(d.addr)], 0);
    let file = dir.path().join("agentd.toml");
    std::fs::write(&file, format!("listen = \"{}\"\n", d.addr)).unwrap();
    let file = file.to_str().unwrap();

    let r = health(&["--config", file], &[]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains(&d.addr.to_string()), "{}", r.stdout);
    let r = health(&[], &[("AGENTD_CONFIG", file)]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let listen = d.addr.to_string();
    let r = health(&[], &[("AGENTD_LISTEN", &listen)]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    // A wildcard listen address is asked on loopback.
    let wildcard = format!("0.0.0.0:{}", d.addr.port());
    let r = health(
        &["--listen", &wildcard],
        &[("AGENTD_API_TOKEN", "a-token-of-16-chars")],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);

    // A bad config names the setting and counts as "no usable answer".
    std::fs::write(dir.path().join("bad.toml"), "listen = \"nowhere\"\n").unwrap();
    let bad = dir.path().join("bad.toml");
    let r = health(&["--config", bad.to_str().unwrap()], &[]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("listen"), "{}", r.stderr);
}

#[cfg(feature = "fault-injection")]
#[test]
fn degraded_server_exits_1_and_lists_the_failing_check_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), &[("AGENTD_FAULT_INJECTION", "1")]);
    let u = url(d.addr);
    let _ = await_code(&["--url", &u], 0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let injected = rt.block_on(common::inject_fault(d.addr, "deadlock-state"));
    assert_eq!(injected, 200);
    let r = await_code(&["--url", &u], 1);
    assert!(r.stdout.contains(": DEGRADED"), "{}", r.stdout);
    let first_check = r
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("checks"))
        .nth(1)
        .expect("a check line");
    assert!(
        first_check.contains("FAIL") && first_check.contains("state_lock"),
        "{}",
        r.stdout
    );
    // The detail is shown, not just the name.
    assert!(
        first_check.split("state_lock").nth(1).unwrap().trim().len() > "0.00 ms".len(),
        "{first_check}"
    );
    let json = health(&["--url", &u, "--json"], &[]);
    assert_eq!(json.code, 1);
    let body: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(body["status"], "degraded");
}

#[test]
fn nothing_listening_exits_2() {
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let r = health(&["--url", &url(addr)], &[]);
    assert_eq!(r.code, 2, "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("cannot reach"), "{}", r.stderr);
    assert!(r.stdout.is_empty());

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let r = health(&["--url", &format!("unix:{}", sock.display())], &[]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("none.sock"), "{}", r.stderr);
}

#[test]
fn a_silent_or_foreign_server_exits_2_within_the_timeout() {
    // Accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let started = Instant::now();
    let r = health(
        &[
            "--url",
            &url(silent.local_addr().unwrap()),
            "--timeout",
            "300ms",
        ],
        &[],
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("did not answer within"), "{}", r.stderr);
    // The 300 ms timeout was honoured, not a longer default (the silent
    // listener never answers at all).
    assert!(started.elapsed() < WAIT);

    // Answers HTTP, but not agentd's /health.
    let foreign = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = foreign.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = foreign.accept().unwrap();
        // Read the whole request first: closing with unread bytes would
        // reset the connection instead of delivering the answer.
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.ends_with(b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        s.write_all(b"HTTP/1.0 200 OK\r\ncontent-type: text/html\r\n\r\n<html>hi</html>")
            .unwrap();
    });
    let r = health(&["--url", &url(addr)], &[]);
    server.join().unwrap();
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("not like agentd"), "{}", r.stderr);
}

#[test]
fn a_socket_activated_unix_socket_is_reachable_with_unix_url() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let fd = listener.as_raw_fd();
    let state = dir.path().join("state");
    let mut cmd = Command::new("sh");
    // `exec` keeps the shell's pid, so LISTEN_PID names agentd itself.
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" serve")
        .arg(agentd_bin())
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LISTEN_FDS", "1")
        .env("AGENTD_STATE_DIR", &state)
        .env("AGENTD_HEALTH_INTERVAL", INTERVAL)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe calls (fcntl, dup2, close) between fork
    // and exec.
    unsafe {
        cmd.pre_exec(move || {
            let high = libc::fcntl(fd, libc::F_DUPFD, 100);
            if high < 0 || libc::dup2(high, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(high);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn agentd on a Unix socket");
    let u = format!("unix:{}", path.display());
    let deadline = Instant::now() + WAIT;
    let r = loop {
        let r = health(&["--url", &u], &[]);
        if r.code == 0 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("at unix:"), "{}", r.stdout);
    assert!(r.stdout.contains(": HEALTHY"), "{}", r.stdout);
}
