//! Test support: start the real server (in-process on port 0, or the real
//! binary as a child process) and speak HTTP to it over real sockets.
#![allow(dead_code)]

pub mod notify;
pub mod procs;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentd::agent::runtime::Runtime;
use agentd::app::{App, Lifecycle};
use agentd::config::{Config, Overrides};
use agentd::daemon;
use agentd::init::notify::Notifier;
use agentd::init::rlimit::raise_nofile;
use agentd::server::Listener;
use agentd::shutdown::Shutdown;
use agentd::store::StoreThread;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Upper bound for any single wait in these tests; a hang fails instead of
/// stalling CI.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive HTTP/1.1 connection.
pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    token: Option<String>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(Conn {
            sender,
            addr,
            token: None,
        })
    }

    pub fn with_token(mut self, token: &str) -> Conn {
        self.token = Some(token.to_owned());
        self
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Resp, hyper::Error> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).unwrap();
        self.sender.ready().await?;
        let resp = tokio::time::timeout(WAIT, self.sender.send_request(req))
            .await
            .expect("response within the test bound")?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes().to_vec();
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    pub async fn get(&mut self, path: &str) -> Resp {
        self.send("GET", path, &[], Bytes::new())
            .await
            .expect("GET")
    }

    pub async fn post_json(&mut self, path: &str, body: &serde_json::Value) -> Resp {
        self.send(
            "POST",
            path,
            &[("content-type", "application/json")],
            serde_json::to_vec(body).unwrap(),
        )
        .await
        .expect("POST")
    }
}

/// One request on a fresh connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    let mut c = Conn::open(addr).await.expect("connect");
    c.send(method, path, headers, body).await.expect("request")
}

pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], Bytes::new()).await
}

pub async fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Resp {
    request(
        addr,
        "POST",
        path,
        &[("content-type", "application/json")],
        serde_json::to_vec(body).unwrap(),
    )
    .await
}

/// The contents of the user messages in a `GET /api/chat/history` body,
/// oldest first.
pub fn user_messages(history: &serde_json::Value) -> Vec<&str> {
    history["messages"]
        .as_array()
        .expect("a messages array")
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().expect("text content"))
        .collect()
}

/// Build a config from explicit variables only (never the test process's env).
pub fn config(vars: &[(&str, &str)], state_dir: &Path) -> Config {
    let mut map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    map.entry("AGENTD_LISTEN".into())
        .or_insert_with(|| "127.0.0.1:0".into());
    map.insert("AGENTD_STATE_DIR".into(), state_dir.display().to_string());
    Config::load(Overrides::default(), |k| map.get(k).cloned()).expect("valid test config")
}

/// The server running inside the test process on port 0.
pub struct TestServer {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
    store_thread: Option<StoreThread>,
}

impl TestServer {
    pub async fn start(vars: &[(&str, &str)], state_dir: &Path) -> TestServer {
        let config = config(vars, state_dir);
        let runtime = agentd::agent::runtimes::build_runtime(&config.runtime);
        Self::start_with(config, runtime).await
    }

    pub async fn start_with(config: Config, runtime: Arc<dyn Runtime>) -> TestServer {
        let shutdown = Shutdown::new();
        let listen = config.listen;
        let health = daemon::health_state(
            &config,
            Arc::new(Notifier::disabled()),
            raise_nofile(config.health.nofile_target),
        );
        let (app, store_thread) = App::start(config, runtime, shutdown.clone(), health, &|_| {})
            .await
            .expect("app starts");
        let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (serving, first_pass) = daemon::start_serving(&app, Listener::Tcp(listener));
        tokio::time::timeout(WAIT, first_pass)
            .await
            .expect("first health tick passes")
            .unwrap();
        app.set_lifecycle(Lifecycle::Running);
        let task = serving.server;
        TestServer {
            addr,
            app,
            shutdown,
            task,
            store_thread: Some(store_thread),
        }
    }

    /// Shut down the way `agentd serve` does: drain, close the store.
    pub async fn stop(mut self) {
        self.shutdown.trigger();
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("server drains")
            .unwrap();
        self.app.store.close().await.expect("store closes");
        let thread = self.store_thread.take().unwrap();
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .unwrap();
    }
}

pub fn agentd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_agentd"))
}

/// The real binary running as a child process.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every stderr line so far (read by a background thread).
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Start `agentd serve` on 127.0.0.1:0 with exactly `vars` (plus PATH) and
    /// wait for its "listening on" line.
    pub fn start(vars: &[(&str, &str)], state_dir: &Path) -> Daemon {
        Self::start_under(&[], vars, state_dir)
    }

    /// Like `start`, with `wrapper` (a program and its arguments, e.g.
    /// `unshare -pf --mount-proc`) running the binary.
    pub fn start_under(wrapper: &[&str], vars: &[(&str, &str)], state_dir: &Path) -> Daemon {
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(agentd_bin());
                c
            }
            None => Command::new(agentd_bin()),
        };
        // Run inside the temp state dir: a core dump (the abort tests) or any
        // stray file lands there, never in the source tree.
        cmd.arg("serve")
            .current_dir(state_dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("AGENTD_LISTEN", "127.0.0.1:0")
            .env("AGENTD_STATE_DIR", state_dir)
            .env("AGENTD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in vars {
            cmd.env(k, v);
        }
        Self::spawn(cmd)
    }

    /// Start a prepared `agentd serve` command (stderr piped) and wait for
    /// its "listening on" line.
    pub fn spawn(mut cmd: Command) -> Daemon {
        let mut child = cmd.spawn().expect("spawn agentd");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(addr) = line.split("listening on ").nth(1) {
                        let _ = tx.send(addr.trim().to_owned());
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let addr = match rx.recv_timeout(WAIT) {
            Ok(a) => a.parse().expect("listening address"),
            Err(_) => {
                let _ = child.kill();
                panic!("agentd did not start: {:?}", log.lock().unwrap());
            }
        };
        Daemon { child, addr, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig).unwrap();
    }

    /// Wait (bounded) for the process to exit; returns its exit code.
    pub fn wait(&mut self) -> Option<i32> {
        self.wait_status().code()
    }

    /// Wait (bounded) for the process to exit. The wait runs on a thread so
    /// the bound is a channel timeout, not a polling loop.
    pub fn wait_status(&mut self) -> std::process::ExitStatus {
        let pid = self.pid();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut child = std::mem::replace(&mut self.child, placeholder_child());
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(WAIT) {
            Ok(r) => r.expect("wait"),
            Err(_) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                panic!("agentd did not exit within {WAIT:?}");
            }
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Open file descriptors of the server process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An already-finished child, left in `Daemon` after `wait` took the real one.
fn placeholder_child() -> Child {
    let mut c = Command::new("true").spawn().expect("spawn true");
    let _ = c.wait();
    c
}

/// `POST /debug/fault/{kind}` (builds with the `fault-injection` feature);
/// returns the HTTP status.
#[allow(dead_code)]
pub async fn inject_fault(addr: std::net::SocketAddr, kind: &str) -> u16 {
    let path = format!("/debug/fault/{kind}");
    request(addr, "POST", &path, &[], bytes::Bytes::new())
        .await
        .status
}
