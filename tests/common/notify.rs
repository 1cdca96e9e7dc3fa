//! An in-process stand-in for systemd's notification socket, for integration
//! tests: bind it, put `env_value()` in a child's (or a `Notifier`'s)
//! `NOTIFY_SOCKET`, then await messages such as `READY=1` or `WATCHDOG=1`.
//!
//! It only records what arrives; it does not imitate systemd's reactions
//! (no watchdog timer, no restart). The end-to-end tests use a real systemd
//! for those.
//!
//! Self-contained on purpose (no `mod` declarations, std + tempfile only), so
//! any test crate can include it with `mod notify;` or `#[path]`.
#![allow(dead_code)]

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest datagram kept whole; systemd itself reads notifications into a
/// buffer of about this size, so a longer one is a bug worth seeing truncated.
const MAX_DATAGRAM: usize = 4096;

/// Every datagram received, with its arrival time, plus the wake-up for
/// waiters.
struct Inbox {
    messages: Mutex<Vec<(Instant, String)>>,
    arrived: Condvar,
    /// Set by `Drop` before it shuts the socket down, so the collector knows
    /// the wake-up means "stop".
    stopping: AtomicBool,
}

/// A bound notification socket and the thread collecting its datagrams.
/// Dropping it stops the thread and removes the socket.
pub struct NotifyReceiver {
    env_value: String,
    socket: Arc<UnixDatagram>,
    inbox: Arc<Inbox>,
    collector: Option<JoinHandle<()>>,
    /// Holds the socket file for path receivers; removed on drop.
    _dir: Option<tempfile::TempDir>,
}

impl NotifyReceiver {
    /// A receiver bound to a socket file in a fresh temp directory.
    pub fn path() -> NotifyReceiver {
        let dir = tempfile::tempdir().expect("temp dir for the notify socket");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        let env_value = path.to_str().expect("utf-8 temp path").to_owned();
        NotifyReceiver::start(socket, env_value, Some(dir))
    }

    /// A receiver bound to a unique name in the Linux abstract namespace, the
    /// form systemd itself uses (`NOTIFY_SOCKET=@...`).
    pub fn abstract_name() -> NotifyReceiver {
        use std::os::linux::net::SocketAddrExt;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "agentd-test-notify-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind abstract notify socket");
        NotifyReceiver::start(socket, format!("@{name}"), None)
    }

    fn start(
        socket: UnixDatagram,
        env_value: String,
        dir: Option<tempfile::TempDir>,
    ) -> NotifyReceiver {
        let socket = Arc::new(socket);
        let inbox = Arc::new(Inbox {
            messages: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            stopping: AtomicBool::new(false),
        });
        let collector = {
            let socket = Arc::clone(&socket);
            let inbox = Arc::clone(&inbox);
            std::thread::Builder::new()
                .name("notify-receiver".into())
                .spawn(move || collect(&socket, &inbox))
                .expect("spawn notify receiver thread")
        };
        NotifyReceiver {
            env_value,
            socket,
            inbox,
            collector: Some(collector),
            _dir: dir,
        }
    }

    /// The value to put in `NOTIFY_SOCKET`.
    pub fn env_value(&self) -> String {
        self.env_value.clone()
    }

    /// Every datagram received so far, oldest first.
    pub fn messages(&self) -> Vec<(Instant, String)> {
        self.inbox.messages.lock().unwrap().clone()
    }

    /// Datagrams so far that satisfy `pred`.
    pub fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.inbox
            .messages
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, m)| pred(m))
            .count()
    }

    /// The first datagram (already received or arriving within `timeout`)
    /// that satisfies `pred`; `None` on timeout.
    pub fn wait_for(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        self.wait_until(timeout, |messages| {
            messages
                .iter()
                .find(|(_, m)| pred(m))
                .map(|(_, m)| m.clone())
        })
    }

    /// Wait until at least `n` datagrams satisfy `pred`; true if they did
    /// within `timeout`.
    pub fn wait_for_count(&self, pred: impl Fn(&str) -> bool, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |messages| {
            (messages.iter().filter(|(_, m)| pred(m)).count() >= n).then_some(())
        })
        .is_some()
    }

    fn wait_until<T>(
        &self,
        timeout: Duration,
        found: impl Fn(&[(Instant, String)]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut messages = self.inbox.messages.lock().unwrap();
        loop {
            if let Some(value) = found(&messages) {
                return Some(value);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            messages = self.inbox.arrived.wait_timeout(messages, left).unwrap().0;
        }
    }
}

/// Whether `message` contains the assignment line `line` (e.g. `READY=1`).
pub fn has_line(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

/// The value of `key` in `message`, if assigned.
pub fn value_of<'m>(message: &'m str, key: &str) -> Option<&'m str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
}

fn collect(socket: &UnixDatagram, inbox: &Inbox) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => {
                // shutdown() in Drop wakes recv with 0 bytes; an empty datagram
                // is not a notification either.
                if inbox.stopping.load(Ordering::Acquire) {
                    return;
                }
                if n == 0 {
                    continue;
                }
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                inbox.messages.lock().unwrap().push((Instant::now(), text));
                inbox.arrived.notify_all();
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

impl Drop for NotifyReceiver {
    fn drop(&mut self) {
        self.inbox.stopping.store(true, Ordering::Release);
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        if let Some(collector) = self.collector.take() {
            let _ = collector.join();
        }
    }
}
