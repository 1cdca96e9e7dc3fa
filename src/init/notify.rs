//! The sd_notify client: how agentd tells systemd it is ready, reloading,
//! stopping, what its status is, and that it is still healthy (`WATCHDOG=1`).
//!
//! This module is the *mechanism* only. It never decides when to pet the
//! watchdog: `watchdog_ping` has exactly one caller, the health loop's passing
//! tick. A wedged process must stop petting, so nothing else may ping "just in
//! case".
//!
//! Properties the rest of agentd relies on:
//!
//! * One datagram socket, opened once, non-blocking. A send never blocks the
//!   caller: when systemd's receive queue is full the message is dropped and
//!   counted (`EAGAIN`), which for a watchdog ping is the right failure mode (a
//!   late ping is no better than a missing one, and a blocked health loop is
//!   worse).
//! * Send errors are never fatal and never panic; they are counted and logged
//!   (the first failure after a success at `warn`, the rest at `debug`, so a
//!   missing supervisor cannot flood the log once per tick).
//! * Both socket forms systemd uses are handled: a filesystem path
//!   (`/run/systemd/notify`) and an abstract name (`@/org/freedesktop/...`),
//!   which the `sd-notify` crate does not handle itself. That crate is still
//!   used for what it does well: the message vocabulary (`NotifyState`) and
//!   the `CLOCK_MONOTONIC` reading `RELOADING=1` needs.
//! * The process environment is only read, never modified.
//!
//! Not here: when to send what (health loop, `main`), the watchdog interval
//! policy (health loop: `watchdog_timeout() / 3`).

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

/// Longest `STATUS=` text sent, in bytes. systemd reads a notification into a
/// buffer of about one page and discards what does not fit, which would lose
/// every other assignment in the same datagram; a status line a person reads
/// in `systemctl status` never needs more than this.
pub const MAX_STATUS_BYTES: usize = 1024;

/// Where notifications go, parsed from `NOTIFY_SOCKET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyTarget {
    /// A socket bound to a filesystem path.
    Path(String),
    /// A socket in the Linux abstract namespace (`NOTIFY_SOCKET=@name`); the
    /// name is stored without the leading `@`.
    Abstract(String),
}

impl NotifyTarget {
    /// Parse a `NOTIFY_SOCKET` value. `None` when empty or in a form agentd
    /// cannot use (e.g. `vsock:`, which only matters inside VMs).
    pub fn parse(value: &str) -> Option<NotifyTarget> {
        if let Some(name) = value.strip_prefix('@') {
            if name.is_empty() {
                return None;
            }
            return Some(NotifyTarget::Abstract(name.to_owned()));
        }
        if value.starts_with('/') {
            return Some(NotifyTarget::Path(value.to_owned()));
        }
        None
    }

    fn socket_addr(&self) -> io::Result<SocketAddr> {
        match self {
            NotifyTarget::Path(path) => SocketAddr::from_pathname(path),
            NotifyTarget::Abstract(name) => abstract_addr(name.as_bytes()),
        }
    }
}

impl std::fmt::Display for NotifyTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotifyTarget::Path(path) => f.write_str(path),
            NotifyTarget::Abstract(name) => write!(f, "@{name}"),
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix socket names exist only on Linux",
    ))
}

/// The open notification socket and where it sends.
#[derive(Debug)]
struct Channel {
    /// Unbound, non-blocking. Unconnected on purpose: `send_to` on every
    /// message keeps working if the receiver's socket is re-created, where a
    /// connected socket would fail with `ECONNREFUSED` forever.
    socket: UnixDatagram,
    addr: SocketAddr,
    target: NotifyTarget,
}

/// What became of one notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// The whole datagram was queued on the receiver's socket.
    Sent,
    /// The receiver's queue was full (`EAGAIN`); the message was dropped.
    Dropped,
    /// Any other error (no receiver, permission, ...); the message was lost.
    Failed,
    /// Notifications are off (no `NOTIFY_SOCKET`); nothing was attempted.
    Disabled,
}

/// Client for systemd's notification socket. Cheap to share: `Send + Sync`,
/// every method takes `&self`.
#[derive(Debug)]
pub struct Notifier {
    /// `None` when not supervised by systemd (or the socket could not be
    /// opened); every send is then a no-op.
    channel: Option<Channel>,
    /// `WATCHDOG_USEC`, kept only when systemd meant it for this process.
    watchdog_timeout: Option<Duration>,
    /// Datagrams queued successfully, of any kind.
    sent: AtomicU64,
    /// `WATCHDOG=1` datagrams queued successfully; shown in `/health` so a
    /// person can see the loop is really petting.
    pings_sent: AtomicU64,
    /// Datagrams dropped because the receiver's queue was full.
    dropped: AtomicU64,
    /// Datagrams lost to any other error.
    failed: AtomicU64,
    /// Whether the last send failed; makes the log say so once per outage
    /// instead of once per message.
    failing: AtomicBool,
}

/// Counters for `/health` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct NotifierStats {
    pub sent: u64,
    pub pings_sent: u64,
    pub dropped: u64,
    pub failed: u64,
}

impl Notifier {
    /// Build from this process's `NOTIFY_SOCKET`, `WATCHDOG_USEC` and
    /// `WATCHDOG_PID`. Never fails: without a usable socket the notifier is
    /// disabled (and says why at `warn` if a socket was named but unusable).
    pub fn from_env() -> Notifier {
        let var = |name: &str| std::env::var(name).ok();
        Notifier::from_parts(
            var("NOTIFY_SOCKET").as_deref(),
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
            std::process::id(),
        )
    }

    /// Build from explicit values, as `from_env` would with this environment
    /// and pid.
    pub fn from_parts(
        notify_socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        my_pid: u32,
    ) -> Notifier {
        let channel = notify_socket
            .filter(|value| !value.is_empty())
            .and_then(|value| match open_channel(value) {
                Ok(channel) => Some(channel),
                Err(err) => {
                    tracing::warn!(
                        notify_socket = value,
                        error = %err,
                        "cannot use NOTIFY_SOCKET; systemd notifications are off"
                    );
                    None
                }
            });
        Notifier {
            channel,
            watchdog_timeout: parse_watchdog(watchdog_usec, watchdog_pid, my_pid),
            sent: AtomicU64::new(0),
            pings_sent: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        }
    }

    /// A notifier that sends nothing (not under systemd, or tests).
    pub fn disabled() -> Notifier {
        Notifier::from_parts(None, None, None, 0)
    }

    /// Whether there is a socket to send to.
    pub fn is_enabled(&self) -> bool {
        self.channel.is_some()
    }

    /// Where notifications go, for logs and `/health`.
    pub fn target(&self) -> Option<&NotifyTarget> {
        self.channel.as_ref().map(|c| &c.target)
    }

    /// systemd's watchdog timeout (`WATCHDOG_USEC`) when it is meant for this
    /// process: `WATCHDOG_PID` unset or equal to our pid. `None` when unset,
    /// zero, unparsable, or meant for another process (we inherited the
    /// environment of a supervised parent). Independent of `is_enabled`: the
    /// caller decides what a timeout without a socket means.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog_timeout
    }

    /// `READY=1`: start-up is complete. systemd's `start` returns now.
    pub fn ready(&self) {
        self.send(&[NotifyState::Ready]);
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=<now>`. systemd 253 and later fail a
    /// `Type=notify-reload` reload that lacks the timestamp; older versions
    /// ignore it. Send `ready()` when the reload is done.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            // CLOCK_MONOTONIC cannot fail on Linux; if it ever does, a bare
            // RELOADING=1 is still better than silence.
            Err(_) => self.send(&[NotifyState::Reloading]),
        };
    }

    /// `STATUS=<text>`: the line a person reads in `systemctl status`.
    /// Newlines become spaces (a newline would start a bogus assignment) and
    /// the text is cut at `MAX_STATUS_BYTES`.
    pub fn status(&self, text: &str) {
        let text = status_text(text);
        self.send(&[NotifyState::Status(&text)]);
    }

    /// `EXTEND_TIMEOUT_USEC=<d>`: ask for more time for the current start-up,
    /// reload or shutdown step. Values beyond `u32::MAX` µs (about 71 min) are
    /// sent as that maximum; a step that long should extend repeatedly.
    pub fn extend_timeout(&self, d: Duration) {
        let usec = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)]);
    }

    /// `STATUS=<text>` plus `ERRNO=<errno>` when given: start-up failed and
    /// why, shown by `systemctl status`. A negative errno is left out.
    pub fn status_failed(&self, text: &str, errno: Option<i32>) {
        let text = status_text(text);
        match errno.and_then(|e| u32::try_from(e).ok()) {
            Some(errno) => self.send(&[NotifyState::Status(&text), NotifyState::Errno(errno)]),
            None => self.send(&[NotifyState::Status(&text)]),
        };
    }

    /// `WATCHDOG=1`. Invariant: only the health loop's passing tick calls
    /// this; a ping from anywhere else would keep a wedged process alive.
    pub fn watchdog_ping(&self) {
        if self.send(&[NotifyState::Watchdog]) == SendOutcome::Sent {
            self.pings_sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `WATCHDOG=trigger`: ask systemd to act as if the watchdog expired now
    /// (kill with the watchdog signal, then restart). For definitive,
    /// unrecoverable states.
    pub fn watchdog_trigger(&self) {
        self.send(&[NotifyState::WatchdogTrigger]);
    }

    /// `WATCHDOG=1` datagrams that reached the socket.
    pub fn pings_sent(&self) -> u64 {
        self.pings_sent.load(Ordering::Relaxed)
    }

    /// All counters at once.
    pub fn stats(&self) -> NotifierStats {
        NotifierStats {
            sent: self.sent.load(Ordering::Relaxed),
            pings_sent: self.pings_sent.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    /// Send one datagram holding every state, newline-separated. Never
    /// blocks, never panics; the outcome is counted and returned.
    pub fn send(&self, states: &[NotifyState<'_>]) -> SendOutcome {
        let Some(channel) = &self.channel else {
            return SendOutcome::Disabled;
        };
        let message = format_message(states);
        let outcome = match channel
            .socket
            .send_to_addr(message.as_bytes(), &channel.addr)
        {
            Ok(n) if n == message.len() => SendOutcome::Sent,
            Ok(n) => {
                // Datagram sockets send all or nothing; a short count would be
                // a kernel surprise, so count it as lost rather than trust it.
                self.log_failure(
                    channel,
                    &message,
                    &io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("short send: {n} of {} bytes", message.len()),
                    ),
                );
                SendOutcome::Failed
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                tracing::debug!(
                    notify_socket = %channel.target,
                    message = message.trim_end(),
                    "notification dropped: receiver queue full"
                );
                SendOutcome::Dropped
            }
            Err(err) => {
                self.log_failure(channel, &message, &err);
                SendOutcome::Failed
            }
        };
        match outcome {
            SendOutcome::Sent => {
                self.sent.fetch_add(1, Ordering::Relaxed);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(notify_socket = %channel.target, "notifications delivered again");
                }
            }
            SendOutcome::Dropped => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            SendOutcome::Failed => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
            SendOutcome::Disabled => {}
        }
        outcome
    }

    fn log_failure(&self, channel: &Channel, message: &str, err: &io::Error) {
        if self.failing.swap(true, Ordering::Relaxed) {
            tracing::debug!(notify_socket = %channel.target, message = message.trim_end(), error = %err, "notification failed");
        } else {
            tracing::warn!(notify_socket = %channel.target, message = message.trim_end(), error = %err, "notification failed; further failures are logged at debug");
        }
    }
}

fn open_channel(value: &str) -> io::Result<Channel> {
    let target = NotifyTarget::parse(value).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "expected an absolute path or an @abstract name",
        )
    })?;
    let addr = target.socket_addr()?;
    // `UnixDatagram::unbound` sets CLOEXEC, so agent runtimes never inherit it.
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok(Channel {
        socket,
        addr,
        target,
    })
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, my_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid.filter(|p| !p.is_empty()) {
        // An unparsable WATCHDOG_PID cannot be proven to be ours; sd_watchdog_enabled
        // treats it as an error, and so do we.
        let pid: u32 = pid.trim().parse().ok()?;
        if pid != my_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

fn format_message(states: &[NotifyState<'_>]) -> String {
    let mut message = String::with_capacity(64);
    for state in states {
        use std::fmt::Write;
        let _ = writeln!(message, "{state}");
    }
    message
}

fn status_text(text: &str) -> String {
    let mut end = text.len().min(MAX_STATUS_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn bind_path() -> (tempfile::TempDir, String, UnixDatagram) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let receiver = UnixDatagram::bind(&path).unwrap();
        (dir, path.to_str().unwrap().to_owned(), receiver)
    }

    fn recv(receiver: &UnixDatagram) -> String {
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = receiver.recv(&mut buf).expect("a datagram within 5 s");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn notifier_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Notifier>();
    }

    #[test]
    fn watchdog_timeout_honours_pid() {
        let n = Notifier::from_parts(None, Some("3000000"), None, 42);
        assert_eq!(n.watchdog_timeout(), Some(Duration::from_secs(3)));
        let n = Notifier::from_parts(None, Some("3000000"), Some("42"), 42);
        assert_eq!(n.watchdog_timeout(), Some(Duration::from_secs(3)));
        let n = Notifier::from_parts(None, Some("3000000"), Some("43"), 42);
        assert_eq!(n.watchdog_timeout(), None);
        let n = Notifier::from_parts(None, Some("3000000"), Some("pid"), 42);
        assert_eq!(n.watchdog_timeout(), None);
    }

    #[test]
    fn bad_watchdog_usec_means_no_watchdog() {
        for bad in ["", "abc", "-5", "0", "1.5", "18446744073709551616"] {
            let n = Notifier::from_parts(None, Some(bad), None, 1);
            assert_eq!(n.watchdog_timeout(), None, "WATCHDOG_USEC={bad:?}");
        }
    }

    #[test]
    fn target_parsing() {
        assert_eq!(
            NotifyTarget::parse("/run/systemd/notify"),
            Some(NotifyTarget::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            NotifyTarget::parse("@/org/freedesktop/systemd1/notify/1"),
            Some(NotifyTarget::Abstract(
                "/org/freedesktop/systemd1/notify/1".into()
            ))
        );
        assert_eq!(NotifyTarget::parse("@"), None);
        assert_eq!(NotifyTarget::parse("relative.sock"), None);
        assert_eq!(NotifyTarget::parse("vsock:2:1234"), None);
    }

    #[test]
    fn disabled_notifier_sends_nothing_and_counts_nothing() {
        let n = Notifier::disabled();
        assert!(!n.is_enabled());
        n.ready();
        n.watchdog_ping();
        assert_eq!(n.stats(), NotifierStats::default());
        let n = Notifier::from_parts(Some("not-a-socket"), None, None, 1);
        assert!(!n.is_enabled());
    }

    #[test]
    fn sends_newline_separated_assignments_to_a_path() {
        let (_dir, path, receiver) = bind_path();
        let n = Notifier::from_parts(Some(&path), None, None, 1);
        assert!(n.is_enabled());
        n.ready();
        assert_eq!(recv(&receiver), "READY=1\n");
        n.status_failed("store: disk full", Some(28));
        assert_eq!(recv(&receiver), "STATUS=store: disk full\nERRNO=28\n");
        n.extend_timeout(Duration::from_secs(5));
        assert_eq!(recv(&receiver), "EXTEND_TIMEOUT_USEC=5000000\n");
        n.watchdog_ping();
        assert_eq!(recv(&receiver), "WATCHDOG=1\n");
        assert_eq!(n.pings_sent(), 1);
        assert_eq!(n.stats().sent, 4);
    }

    #[test]
    fn status_is_one_line_and_bounded() {
        let (_dir, path, receiver) = bind_path();
        let n = Notifier::from_parts(Some(&path), None, None, 1);
        n.status("degraded:\nstore: timeout");
        assert_eq!(recv(&receiver), "STATUS=degraded: store: timeout\n");
        let long = "é".repeat(MAX_STATUS_BYTES);
        n.status(&long);
        let got = recv(&receiver);
        assert!(
            got.len() <= "STATUS=\n".len() + MAX_STATUS_BYTES,
            "{}",
            got.len()
        );
        assert!(got.starts_with("STATUS=é") && got.ends_with("é\n"));
    }

    #[test]
    fn reloading_carries_current_monotonic_time() {
        let (_dir, path, receiver) = bind_path();
        let n = Notifier::from_parts(Some(&path), None, None, 1);
        let before = monotonic_usec();
        n.reloading();
        let after = monotonic_usec();
        let got = recv(&receiver);
        let mut lines = got.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let stamp: u64 = lines
            .next()
            .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
            .expect("MONOTONIC_USEC line")
            .parse()
            .unwrap();
        assert!(
            before <= stamp && stamp <= after,
            "{before} <= {stamp} <= {after}"
        );
    }

    fn monotonic_usec() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec.
        assert_eq!(
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
            0
        );
        ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
    }

    #[test]
    fn missing_receiver_is_counted_not_fatal() {
        let (dir, path, receiver) = bind_path();
        let n = Notifier::from_parts(Some(&path), None, None, 1);
        drop(receiver);
        drop(dir);
        n.watchdog_ping();
        n.ready();
        let stats = n.stats();
        assert_eq!(stats.failed, 2);
        assert_eq!(stats.pings_sent, 0);
    }

    #[test]
    fn full_receiver_queue_drops_instead_of_blocking() {
        let (_dir, path, _receiver) = bind_path();
        let n = Notifier::from_parts(Some(&path), None, None, 1);
        let started = Instant::now();
        // The kernel's per-socket datagram queue (net.unix.max_dgram_qlen) is
        // far below this, so most of these must be dropped.
        for _ in 0..5_000 {
            n.watchdog_ping();
        }
        let stats = n.stats();
        assert!(stats.dropped > 0, "{stats:?}");
        assert_eq!(stats.sent + stats.dropped, 5_000, "{stats:?}");
        assert_eq!(stats.pings_sent, stats.sent);
        // A blocking send would hang here for good; a margin a loaded
        // machine keeps tells the two apart.
        assert!(started.elapsed() < Duration::from_secs(60));
    }
}
