//! Integration tests of the init-system boundary (`agentd::init`) against real
//! kernel objects: datagram sockets for sd_notify, listening sockets placed on
//! fds 3 and 4 of a real child process for socket activation, real resource
//! limits in a child process, real files for the keepalive.
//!
//! Scenarios that need a fresh process (fds at 3, lowered limits, a stderr of
//! a given kind) re-run this test binary as a child: `child_process_entry` does
//! the work when `AGENTD_INIT_TEST_CHILD` names a scenario and prints one
//! `CHILD-RESULT:` line the parent asserts on. It does nothing in a normal run.
//!
//! Not here: a real systemd (tests/systemd/), the health loop's use of these.

#[path = "common/notify.rs"]
mod notify;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use agentd::init::activation::{self, ActivationError, Inherited};
use agentd::init::keepalive::{self, KeepaliveVerdict};
use agentd::init::logging::{self, LogTarget};
use agentd::init::notify::Notifier;
use agentd::init::rlimit::{self, RlimitOutcome};
use notify::{has_line, value_of, NotifyReceiver};

/// How long a test waits for an event that normally takes microseconds; only
/// reached when the behaviour under test is broken.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- sd_notify

fn lifecycle_reaches(receiver: &NotifyReceiver) {
    let notifier = Notifier::from_parts(Some(&receiver.env_value()), None, None, 1);
    assert!(notifier.is_enabled());

    notifier.ready();
    notifier.status("serving on 127.0.0.1:8420");
    notifier.watchdog_ping();
    notifier.reloading();
    notifier.stopping();
    notifier.watchdog_trigger();

    let ready = receiver.wait_for(|m| has_line(m, "READY=1"), EVENT_TIMEOUT);
    assert_eq!(ready.as_deref(), Some("READY=1\n"));
    let status = receiver
        .wait_for(|m| value_of(m, "STATUS").is_some(), EVENT_TIMEOUT)
        .expect("STATUS=");
    assert_eq!(
        value_of(&status, "STATUS"),
        Some("serving on 127.0.0.1:8420")
    );
    assert!(receiver
        .wait_for(|m| has_line(m, "WATCHDOG=1"), EVENT_TIMEOUT)
        .is_some());
    let reloading = receiver
        .wait_for(|m| has_line(m, "RELOADING=1"), EVENT_TIMEOUT)
        .expect("RELOADING=1");
    let usec: u64 = value_of(&reloading, "MONOTONIC_USEC")
        .expect("RELOADING=1 comes with MONOTONIC_USEC in the same datagram")
        .parse()
        .expect("MONOTONIC_USEC is an integer");
    assert!(usec > 0);
    assert!(receiver
        .wait_for(|m| has_line(m, "STOPPING=1"), EVENT_TIMEOUT)
        .is_some());
    assert!(receiver
        .wait_for(|m| has_line(m, "WATCHDOG=trigger"), EVENT_TIMEOUT)
        .is_some());

    // Datagrams arrive in the order sent, one per call.
    let order: Vec<String> = receiver
        .messages()
        .into_iter()
        .map(|(_, m)| m.lines().next().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        order,
        [
            "READY=1",
            "STATUS=serving on 127.0.0.1:8420",
            "WATCHDOG=1",
            "RELOADING=1",
            "STOPPING=1",
            "WATCHDOG=trigger"
        ]
    );
    assert_eq!(notifier.pings_sent(), 1);
    assert_eq!(notifier.stats().sent, 6);
}

#[test]
fn notifier_reaches_a_path_socket() {
    lifecycle_reaches(&NotifyReceiver::path());
}

#[test]
fn notifier_reaches_an_abstract_socket() {
    let receiver = NotifyReceiver::abstract_name();
    assert!(receiver.env_value().starts_with('@'));
    lifecycle_reaches(&receiver);
}

#[test]
fn watchdog_timeout_is_ignored_when_meant_for_another_pid() {
    let me = std::process::id();
    let other = (me + 1).to_string();
    let mine = me.to_string();
    let n = Notifier::from_parts(None, Some("6000000"), Some(&other), me);
    assert_eq!(n.watchdog_timeout(), None);
    let n = Notifier::from_parts(None, Some("6000000"), Some(&mine), me);
    assert_eq!(n.watchdog_timeout(), Some(Duration::from_secs(6)));
}

#[test]
fn bad_watchdog_usec_disables_the_watchdog() {
    for bad in ["", "soon", "-1", "0", "3s"] {
        let n = Notifier::from_parts(None, Some(bad), None, std::process::id());
        assert_eq!(n.watchdog_timeout(), None, "WATCHDOG_USEC={bad:?}");
    }
}

/// Send many pings to a socket nobody reads, on another thread, and require
/// that thread to finish: a blocking send would never return.
fn assert_sends_never_block(env_value: String) {
    const PINGS: u64 = 5_000;
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let notifier = Notifier::from_parts(Some(&env_value), None, None, 1);
        for _ in 0..PINGS {
            notifier.watchdog_ping();
        }
        let _ = done_tx.send(notifier.stats());
    });
    let stats = done_rx
        .recv_timeout(EVENT_TIMEOUT)
        .expect("sends to a full queue must return, not block");
    assert!(stats.dropped > 0, "queue never filled: {stats:?}");
    assert_eq!(stats.sent + stats.dropped, PINGS, "{stats:?}");
    assert_eq!(stats.failed, 0, "{stats:?}");
    assert_eq!(
        stats.pings_sent, stats.sent,
        "dropped pings are not counted as sent"
    );
}

#[test]
fn send_to_a_full_path_socket_drops_instead_of_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deaf.sock");
    let _deaf = UnixDatagram::bind(&path).unwrap();
    assert_sends_never_block(path.to_str().unwrap().to_owned());
}

#[test]
fn send_to_a_full_abstract_socket_drops_instead_of_blocking() {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("agentd-test-deaf-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _deaf = UnixDatagram::bind_addr(&addr).unwrap();
    assert_sends_never_block(format!("@{name}"));
}

#[test]
fn notify_receiver_stops_when_dropped() {
    let receiver = NotifyReceiver::abstract_name();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        drop(receiver);
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(EVENT_TIMEOUT)
        .expect("dropping the receiver joins its thread promptly");
}

// ---------------------------------------------------------- socket activation

/// Put `fds` on consecutive fd numbers starting at the returned base (far
/// above what this process otherwise uses). The caller owns the new fds.
fn place_consecutively(fds: &[RawFd]) -> RawFd {
    // Distinct tests run in parallel threads; give each call its own range.
    static NEXT_BASE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(600);
    let base = NEXT_BASE.fetch_add(16, std::sync::atomic::Ordering::Relaxed);
    for (i, &fd) in fds.iter().enumerate() {
        let target = base + i as RawFd;
        // SAFETY: F_GETFD only inspects; dup2 onto a number verified unused.
        unsafe {
            assert!(
                libc::fcntl(target, libc::F_GETFD) < 0,
                "fd {target} unexpectedly in use"
            );
            assert_eq!(libc::dup2(fd, target), target);
        }
    }
    base
}

fn is_cloexec_and_nonblocking(fd: RawFd) -> (bool, bool) {
    // SAFETY: flag queries on an fd we own.
    unsafe {
        let fd_flags = libc::fcntl(fd, libc::F_GETFD);
        let fl = libc::fcntl(fd, libc::F_GETFL);
        (fd_flags & libc::FD_CLOEXEC != 0, fl & libc::O_NONBLOCK != 0)
    }
}

#[test]
fn activation_takes_over_real_tcp_and_unix_listeners() {
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let unix_path = dir.path().join("agentd.sock");
    let unix = UnixListener::bind(&unix_path).unwrap();
    let base = place_consecutively(&[tcp.as_raw_fd(), unix.as_raw_fd()]);
    drop((tcp, unix)); // only the placed copies remain

    let me = std::process::id().to_string();
    let listeners = activation::from_parts_at(
        base,
        Some(&me),
        Some("2"),
        Some("http:admin"),
        std::process::id(),
    )
    .unwrap();
    assert_eq!(listeners.len(), 2);
    match &listeners[0] {
        Inherited::Tcp { name, listener } => {
            assert_eq!(name, "http");
            assert_eq!(listener.local_addr().unwrap(), tcp_addr);
            assert_eq!(listener.as_raw_fd(), base);
            assert_eq!(is_cloexec_and_nonblocking(base), (true, true));
            // It is the real listener: a client gets through it.
            let mut client = TcpStream::connect(tcp_addr).unwrap();
            listener.set_nonblocking(false).unwrap();
            let (mut server_side, _) = listener.accept().unwrap();
            server_side.write_all(b"hi").unwrap();
            let mut got = [0u8; 2];
            client.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"hi");
        }
        other => panic!("fd {base} should be TCP, got {other:?}"),
    }
    match &listeners[1] {
        Inherited::Unix { name, listener } => {
            assert_eq!(name, "admin");
            assert_eq!(
                listener.local_addr().unwrap().as_pathname(),
                Some(unix_path.as_path())
            );
            assert_eq!(is_cloexec_and_nonblocking(base + 1), (true, true));
            let _client = UnixStream::connect(&unix_path).unwrap();
            listener.set_nonblocking(false).unwrap();
            listener.accept().unwrap();
        }
        other => panic!("fd {} should be Unix, got {other:?}", base + 1),
    }
    assert_eq!(listeners[1].name(), "admin");
}

/// Run `from_parts_at` on one placed fd and return the error it must give.
fn activation_error_for(fd: RawFd) -> (RawFd, ActivationError) {
    let base = place_consecutively(&[fd]);
    let me = std::process::id();
    match activation::from_parts_at(base, Some(&me.to_string()), Some("1"), None, me) {
        Err(err) => {
            // Refused, so the placed dup is still ours to close.
            // SAFETY: `base` is the dup made above and nothing else owns it.
            drop(unsafe { OwnedFd::from_raw_fd(base) });
            (base, err)
        }
        // The returned listeners own (and will close) the placed fd.
        Ok(listeners) => panic!("fd {base} must be refused, got {listeners:?}"),
    }
}

#[test]
fn activation_refuses_a_connected_stream_socket() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (base, err) = activation_error_for(stream.as_raw_fd());
    let text = err.to_string();
    assert!(text.contains(&format!("fd {base}")), "{text}");
    assert!(text.contains("not listening"), "{text}");
}

#[test]
fn activation_refuses_a_datagram_socket_and_a_plain_file() {
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (base, err) = activation_error_for(udp.as_raw_fd());
    let text = err.to_string();
    assert!(
        text.contains(&format!("fd {base}")) && text.contains("not a stream socket"),
        "{text}"
    );

    let file = tempfile::tempfile().unwrap();
    let (base, err) = activation_error_for(file.as_raw_fd());
    let text = err.to_string();
    assert!(
        text.contains(&format!("fd {base}")) && text.contains("not a socket"),
        "{text}"
    );
}

#[test]
fn activation_refuses_an_fd_that_is_not_open() {
    let me = std::process::id();
    // Far above anything this process opens.
    let err =
        activation::from_parts_at(4000, Some(&me.to_string()), Some("1"), None, me).unwrap_err();
    assert!(
        matches!(err, ActivationError::BadFd { fd: 4000, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("not open"), "{err}");
}

#[test]
fn activation_refuses_fds_meant_for_another_process() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = place_consecutively(&[listener.as_raw_fd()]);
    // SAFETY: our own dup; closed at the end of the test.
    let owned = unsafe { OwnedFd::from_raw_fd(base) };
    let me = std::process::id();
    let err = activation::from_parts_at(base, Some(&(me + 1).to_string()), Some("1"), None, me)
        .unwrap_err();
    assert!(matches!(err, ActivationError::WrongPid { .. }), "{err}");
    // Refusing did not take over or close the fd.
    // SAFETY: flag query on an fd we still own.
    assert!(unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_GETFD) } >= 0);
}

#[test]
fn activation_from_the_environment_in_a_real_child_uses_fds_3_and_4() {
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let unix_path = dir.path().join("agentd.sock");
    let unix = UnixListener::bind(&unix_path).unwrap();
    // Queued in the backlog before the child exists, as systemd's clients
    // would be during a restart.
    let mut client = TcpStream::connect(tcp_addr).unwrap();

    let (tcp_fd, unix_fd) = (tcp.as_raw_fd(), unix.as_raw_fd());
    let mut command = child_command("activation");
    // `$$` is the shell's pid, which `exec` keeps: LISTEN_PID is the test
    // binary's pid, exactly as systemd sets it.
    command
        .env("LISTEN_FDS", "2")
        .env("LISTEN_FDNAMES", "http:admin");
    // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            // Move both out of the way first, so neither source sits on 3 or 4.
            let high_tcp = libc::fcntl(tcp_fd, libc::F_DUPFD, 100);
            let high_unix = libc::fcntl(unix_fd, libc::F_DUPFD, 100);
            if high_tcp < 0
                || high_unix < 0
                || libc::dup2(high_tcp, 3) < 0
                || libc::dup2(high_unix, 4) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(high_tcp);
            libc::close(high_unix);
            Ok(())
        });
    }
    let result = run_child(command);
    assert_eq!(
        result,
        format!(
            "tcp http {tcp_addr} cloexec+nonblock; unix admin {} cloexec+nonblock; served",
            unix_path.display()
        )
    );
    let mut got = String::new();
    client.read_to_string(&mut got).unwrap();
    assert_eq!(got, "served by inherited fd 3");
}

fn child_activation() -> String {
    let listeners = activation::inherited_listeners().expect("inherited listeners");
    let mut parts = Vec::new();
    for (i, listener) in listeners.iter().enumerate() {
        let fd = 3 + i as RawFd;
        let flags = match is_cloexec_and_nonblocking(fd) {
            (true, true) => "cloexec+nonblock",
            _ => "flags not set",
        };
        parts.push(match listener {
            Inherited::Tcp { name, listener } => {
                format!("tcp {name} {} {flags}", listener.local_addr().unwrap())
            }
            Inherited::Unix { name, listener } => format!(
                "unix {name} {} {flags}",
                listener
                    .local_addr()
                    .unwrap()
                    .as_pathname()
                    .unwrap()
                    .display()
            ),
        });
    }
    if let Some(Inherited::Tcp { listener, .. }) = listeners.first() {
        listener.set_nonblocking(false).unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        conn.write_all(b"served by inherited fd 3").unwrap();
        parts.push("served".into());
    }
    parts.join("; ")
}

// ------------------------------------------------------------------- rlimit

/// Run the rlimit scenario in a child whose limits `ulimit` set first.
fn raise_in_child(ulimits: &str, target: u64) -> serde_json::Value {
    let mut command = child_command_with("rlimit", ulimits);
    command.env("AGENTD_INIT_TEST_TARGET", target.to_string());
    serde_json::from_str(&run_child(command)).expect("child prints the report as JSON")
}

#[test]
fn rlimit_soft_limit_is_raised_to_the_target() {
    let report = raise_in_child("ulimit -Sn 256", 512);
    assert_eq!(report["report"]["outcome"], "raised", "{report}");
    assert_eq!(report["report"]["soft"], 512, "{report}");
    assert_eq!(report["after_soft"], 512, "the kernel agrees: {report}");
}

#[test]
fn rlimit_soft_limit_stops_at_the_hard_limit() {
    let report = raise_in_child("ulimit -Sn 256 && ulimit -Hn 1000", 4096);
    assert_eq!(report["report"]["outcome"], "raised", "{report}");
    assert_eq!(report["report"]["soft"], 1000, "{report}");
    assert_eq!(report["report"]["hard"], 1000, "{report}");
    assert_eq!(report["after_soft"], 1000, "{report}");
}

#[test]
fn rlimit_soft_limit_is_never_lowered() {
    let report = raise_in_child("ulimit -Sn 2048", 1024);
    assert_eq!(report["report"]["outcome"], "unchanged", "{report}");
    assert_eq!(report["report"]["soft"], 2048, "{report}");
    assert_eq!(report["after_soft"], 2048, "{report}");
}

fn child_rlimit() -> String {
    let target: u64 = std::env::var("AGENTD_INIT_TEST_TARGET")
        .unwrap()
        .parse()
        .unwrap();
    let report = rlimit::raise_nofile(target);
    let (after_soft, _) = ::rlimit::Resource::NOFILE.get().unwrap();
    serde_json::json!({ "report": report, "after_soft": after_soft }).to_string()
}

#[test]
fn rlimit_report_in_this_process_is_well_formed() {
    // Target 64 is below any real soft limit: nothing changes in the shared
    // test process, but the real getrlimit path runs.
    let report = rlimit::raise_nofile(64);
    assert_eq!(report.outcome, RlimitOutcome::Unchanged, "{report:?}");
    assert!(report.soft >= 64 && report.error.is_none(), "{report:?}");
}

// ------------------------------------------------------------------ logging

#[test]
fn stderr_that_is_the_journal_stream_is_detected() {
    // journald connects a service's stderr to a stream socket; a socket pair
    // end is the same kind of file. Give it to a child as its stderr.
    let (journal_end, _peer) = UnixStream::pair().unwrap();
    let stat = nix::sys::stat::fstat(&journal_end).unwrap();
    let value = format!("{}:{}", stat.st_dev, stat.st_ino);

    let mut command = child_command("journal-detect");
    command
        .env("JOURNAL_STREAM", &value)
        .stderr(Stdio::from(OwnedFd::from(journal_end.try_clone().unwrap())));
    assert_eq!(run_child(command), "true");

    let (other, _other_peer) = UnixStream::pair().unwrap();
    let mut command = child_command("journal-detect");
    command
        .env("JOURNAL_STREAM", &value)
        .stderr(Stdio::from(OwnedFd::from(other)));
    assert_eq!(
        run_child(command),
        "false",
        "another socket is not the journal"
    );

    let mut command = child_command("journal-detect");
    command.env("JOURNAL_STREAM", &value);
    assert_eq!(run_child(command), "false", "a pipe is not the journal");
}

fn journald_socket_accepts_datagrams() -> bool {
    UnixDatagram::unbound()
        .and_then(|s| s.send_to(&[], "/run/systemd/journal/socket"))
        .is_ok()
}

#[test]
fn logging_goes_to_readable_stderr_when_stderr_is_not_the_journal() {
    let mut command = child_command("logging");
    command.env("JOURNAL_STREAM", "1:1");
    let output = child_output(command);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stdout.contains("CHILD-RESULT: stderr"),
        "{stdout}\n{stderr}"
    );
    let line = stderr
        .lines()
        .find(|l| l.contains("store probe timed out"))
        .unwrap_or_else(|| panic!("log line on stderr:\n{stderr}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("health_check=\"store\"") || line.contains("health_check=store"),
        "{line}"
    );
    assert!(line.contains("elapsed_ms=12"), "{line}");
}

#[test]
fn logging_chooses_journald_only_when_its_socket_works() {
    // stderr is the (fake) journal stream; whether journald is used then
    // depends on journald's own socket, probed independently here.
    let (journal_end, peer) = UnixStream::pair().unwrap();
    let stat = nix::sys::stat::fstat(&journal_end).unwrap();
    let mut command = child_command("logging");
    command
        .env("JOURNAL_STREAM", format!("{}:{}", stat.st_dev, stat.st_ino))
        .stderr(Stdio::from(OwnedFd::from(journal_end)));
    let output = child_output(command);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let expected = if journald_socket_accepts_datagrams() {
        "CHILD-RESULT: journald"
    } else {
        "CHILD-RESULT: stderr"
    };
    assert!(
        stdout.contains(expected),
        "expected {expected:?} in:\n{stdout}"
    );
    if expected.ends_with("stderr") {
        // The fallback says why, on the stream it fell back to.
        peer.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
        let mut logged = String::new();
        let _ = (&peer).read_to_string(&mut logged);
        assert!(logged.contains("journald's socket is unusable"), "{logged}");
    }
}

/// What tracing-journald really sends for a health record. journald's socket
/// path is fixed, so the child gets a private mount namespace with an empty
/// `/run` and binds that path itself. Needs CAP_SYS_ADMIN (root); elsewhere
/// the test says so and does nothing.
#[test]
fn journald_records_carry_unprefixed_uppercase_fields() {
    let (journal_end, _peer) = UnixStream::pair().unwrap();
    let stat = nix::sys::stat::fstat(&journal_end).unwrap();
    let mut command = child_command("journald-fields");
    command
        .env("JOURNAL_STREAM", format!("{}:{}", stat.st_dev, stat.st_ino))
        .stderr(Stdio::from(OwnedFd::from(journal_end)));
    // SAFETY: only raw syscalls (unshare, mount) between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let null = std::ptr::null();
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    null,
                    c"/".as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    null.cast(),
                ) != 0
                || libc::mount(
                    c"none".as_ptr(),
                    c"/run".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    null.cast(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = match command.output() {
        Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("journald field test not run: a mount namespace needs CAP_SYS_ADMIN");
            return;
        }
        other => other.expect("run the test binary as a child"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed: {stdout}");
    let fields: BTreeMap<String, String> = serde_json::from_str(
        stdout
            .lines()
            .find_map(|l| l.split_once("CHILD-RESULT: ").map(|(_, r)| r))
            .unwrap_or_else(|| panic!("no CHILD-RESULT in {stdout}")),
    )
    .unwrap();
    let field = |name: &str| fields.get(name).map(String::as_str);
    assert_eq!(field("HEALTH_CHECK"), Some("store"), "{fields:#?}");
    assert_eq!(field("HEALTH_STATUS"), Some("failed"), "{fields:#?}");
    assert_eq!(field("ELAPSED_MS"), Some("12"), "{fields:#?}");
    assert_eq!(
        field("MESSAGE"),
        Some("store probe timed out"),
        "{fields:#?}"
    );
    assert_eq!(field("PRIORITY"), Some("4"), "warn is journal priority 4");
    assert_eq!(field("SYSLOG_IDENTIFIER"), Some(logging::SYSLOG_IDENTIFIER));
    assert!(
        !fields.keys().any(|k| k.starts_with("F_")),
        "no field prefix: {fields:#?}"
    );
}

fn child_journald_fields() -> String {
    std::fs::create_dir_all("/run/systemd/journal").unwrap();
    let journal = UnixDatagram::bind("/run/systemd/journal/socket").unwrap();
    journal.set_read_timeout(Some(EVENT_TIMEOUT)).unwrap();
    assert_eq!(logging::init_logging("info"), LogTarget::Journald);
    tracing::warn!(
        health_check = "store",
        health_status = "failed",
        elapsed_ms = 12,
        "store probe timed out"
    );
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // The layer's start-up probe is an empty datagram; skip it.
        let n = journal.recv(&mut buf).expect("a journal record");
        let fields = parse_journal_native(&buf[..n]);
        if fields.get("MESSAGE").map(String::as_str) == Some("store probe timed out") {
            return serde_json::to_string(&fields).unwrap();
        }
    }
}

/// Decode journald's native protocol: `NAME=value\n`, or `NAME\n` followed by
/// a little-endian u64 length, the value, and `\n`.
fn parse_journal_native(mut data: &[u8]) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    while !data.is_empty() {
        let end = data
            .iter()
            .position(|&b| b == b'\n' || b == b'=')
            .expect("field name ends");
        let name = String::from_utf8_lossy(&data[..end]).into_owned();
        let rest = &data[end + 1..];
        let (value, next) = if data[end] == b'=' {
            let nl = rest.iter().position(|&b| b == b'\n').expect("value ends");
            (&rest[..nl], &rest[nl + 1..])
        } else {
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            (&rest[8..8 + len], &rest[8 + len + 1..])
        };
        fields.insert(name, String::from_utf8_lossy(value).into_owned());
        data = next;
    }
    fields
}

fn child_logging() -> String {
    let target = logging::init_logging("info");
    tracing::warn!(
        health_check = "store",
        health_status = "failed",
        elapsed_ms = 12,
        "store probe timed out"
    );
    match target {
        LogTarget::Journald => "journald".into(),
        LogTarget::Stderr => "stderr".into(),
    }
}

// ---------------------------------------------------------------- keepalive

fn set_age(path: &Path, age: Duration) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - age).unwrap();
}

#[test]
fn keepalive_touch_creates_then_advances_mtime_and_check_follows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.keepalive");
    let max_age = Duration::from_secs(30);
    assert_eq!(keepalive::check(&path, max_age), KeepaliveVerdict::Missing);

    keepalive::touch(&path).unwrap();
    assert!(matches!(
        keepalive::check(&path, max_age),
        KeepaliveVerdict::Fresh(_)
    ));

    set_age(&path, Duration::from_secs(90));
    assert!(matches!(
        keepalive::check(&path, max_age),
        KeepaliveVerdict::Stale(age) if age >= Duration::from_secs(90)
    ));

    keepalive::touch(&path).unwrap();
    let age = keepalive::age(&path).unwrap();
    assert!(age < max_age, "touch moved mtime to now, age {age:?}");
    assert!(matches!(
        keepalive::check(&path, max_age),
        KeepaliveVerdict::Fresh(_)
    ));
}

/// A stand-in `launchctl` that records its arguments. Written by a separate
/// shell so no fd open for writing on it can leak into a concurrent fork of
/// this multi-threaded process (which would make exec fail with ETXTBSY).
fn fake_launchctl(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let program = dir.join("launchctl");
    let record = dir.join("launchctl.args");
    let script = format!("#!/bin/sh\necho \"$@\" >> '{}'\n", record.display());
    let status = Command::new("sh")
        .arg("-c")
        .arg("printf '%s' \"$1\" > \"$2\" && chmod +x \"$2\"")
        .arg("sh")
        .arg(&script)
        .arg(&program)
        .status()
        .unwrap();
    assert!(status.success());
    (program, record)
}

fn check_line(file: &Path, label: Option<&str>, launchctl: &Path) -> (i32, String) {
    let mut out = Vec::new();
    let code =
        keepalive::keepalive_check_with(file, Duration::from_secs(30), label, launchctl, &mut out);
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 1, "one line: {text:?}");
    (code, text)
}

#[test]
fn keepalive_check_restarts_only_a_stale_labelled_job() {
    let dir = tempfile::tempdir().unwrap();
    let (launchctl, record) = fake_launchctl(dir.path());
    let file = dir.path().join("agentd.keepalive");

    let (code, line) = check_line(&file, Some("org.agentd.agentd"), &launchctl);
    assert_eq!(code, keepalive::EXIT_UNKNOWN, "{line}");
    assert!(line.starts_with("missing:"), "{line}");

    keepalive::touch(&file).unwrap();
    let (code, line) = check_line(&file, Some("org.agentd.agentd"), &launchctl);
    assert_eq!(code, keepalive::EXIT_FRESH, "{line}");
    assert!(line.starts_with("fresh:"), "{line}");
    assert!(!record.exists(), "no restart while fresh or missing");

    set_age(&file, Duration::from_secs(120));
    let (code, line) = check_line(&file, None, &launchctl);
    assert_eq!(code, keepalive::EXIT_STALE, "{line}");
    assert!(line.contains("not restarting"), "{line}");
    assert!(!record.exists(), "no restart without a label");

    let (code, line) = check_line(&file, Some("org.agentd.agentd"), &launchctl);
    assert_eq!(code, keepalive::EXIT_STALE, "{line}");
    assert!(line.starts_with("stale:"), "{line}");
    assert!(
        line.contains("ran `launchctl kickstart -k system/org.agentd.agentd`"),
        "{line}"
    );
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        "kickstart -k system/org.agentd.agentd\n"
    );
}

#[test]
fn keepalive_check_without_launchctl_still_reports_stale() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agentd.keepalive");
    keepalive::touch(&file).unwrap();
    set_age(&file, Duration::from_secs(120));
    let (code, line) = check_line(
        &file,
        Some("org.agentd.agentd"),
        &dir.path().join("no-launchctl"),
    );
    assert_eq!(code, keepalive::EXIT_STALE, "{line}");
    assert!(line.contains("launchctl not found"), "{line}");
}

// ------------------------------------------------------- child process entry

/// Environment variable naming the scenario a re-executed child runs.
const CHILD_ENV: &str = "AGENTD_INIT_TEST_CHILD";

/// This test binary, re-run to execute one scenario in a fresh process.
/// `prelude` is shell run before `exec` (e.g. `ulimit`); `LISTEN_PID` is set to
/// the pid the binary will have.
fn child_command_with(scenario: &str, prelude: &str) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!(
            "{prelude} && LISTEN_PID=$$ exec \"$0\" --exact child_process_entry --nocapture --test-threads=1"
        ))
        .arg(exe)
        .env(CHILD_ENV, scenario)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn child_command(scenario: &str) -> Command {
    child_command_with(scenario, "true")
}

fn child_output(mut command: Command) -> Output {
    command.output().expect("run the test binary as a child")
}

/// Run a child scenario and return its `CHILD-RESULT:` text.
fn run_child(command: Command) -> String {
    let output = child_output(command);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "child failed: {}\n{stdout}\n{stderr}",
        output.status
    );
    stdout
        .lines()
        .find_map(|l| l.split_once("CHILD-RESULT: ").map(|(_, result)| result))
        .unwrap_or_else(|| panic!("no CHILD-RESULT line:\n{stdout}\n{stderr}"))
        .to_owned()
}

/// The child side of the scenarios above; a no-op in a normal test run.
#[test]
fn child_process_entry() {
    let Ok(scenario) = std::env::var(CHILD_ENV) else {
        return;
    };
    let result = match scenario.as_str() {
        "activation" => child_activation(),
        "rlimit" => child_rlimit(),
        "journal-detect" => {
            let value = std::env::var("JOURNAL_STREAM").ok();
            logging::stderr_is_journal(value.as_deref()).to_string()
        }
        "logging" => child_logging(),
        "journald-fields" => child_journald_fields(),
        other => panic!("unknown child scenario {other:?}"),
    };
    // The harness has already printed "test child_process_entry ... " on
    // this line; start a fresh one.
    println!("\nCHILD-RESULT: {result}");
}
