//! Where log records go: the systemd journal (structured, via
//! `tracing-journald`) when stderr is connected to it, else human-readable
//! lines on stderr.
//!
//! Detection follows systemd's own rule (systemd.exec(5), `JOURNAL_STREAM`):
//! systemd sets `JOURNAL_STREAM=<device>:<inode>` to identify the stream socket
//! it connected to stdout/stderr; stderr "is the journal" only if fd 2 still
//! has that device and inode. A stale variable inherited by a process whose
//! stderr was redirected therefore does not count.
//!
//! Field mapping (tracing-journald 0.3.2; asserted on a real datagram by
//! `tests/init.rs`, `journald_records_carry_unprefixed_uppercase_fields`): a field's name
//! is upper-cased, `.` becomes `_`, leading `_` and characters other than ASCII
//! alphanumerics and `_` are dropped. By default every field except `message`
//! is also prefixed `F_`; agentd turns the prefix off
//! (`Layer::with_field_prefix(None)`), so
//! `tracing::warn!(health_check = "store", health_status = "failed", elapsed_ms = 12, "...")`
//! becomes `HEALTH_CHECK=store HEALTH_STATUS=failed ELAPSED_MS=12
//! MESSAGE=...`, which `journalctl HEALTH_CHECK=store` finds. Consequence:
//! a field must not be named like a journal field agentd does not mean to set
//! (`priority`, `message_id`, `code_file`, ...). The layer also sets
//! `PRIORITY` (error 3, warn 4, info 5, debug 6, trace 7), `TARGET`,
//! `CODE_FILE`, `CODE_LINE` and `SYSLOG_IDENTIFIER`; span fields are added
//! with the same mapping and `SPAN_NAME` names the enclosing span.
//!
//! Not here: what to log (every room logs its own events), the filter's value
//! (config, `AGENTD_LOG`).

use std::io::IsTerminal;
use std::os::fd::{AsFd, BorrowedFd};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// `SYSLOG_IDENTIFIER` of agentd's journal records: the same name whether it
/// runs as `/usr/bin/agentd`, a test binary or a renamed copy, so
/// `journalctl -t agentd` always finds it.
pub const SYSLOG_IDENTIFIER: &str = "agentd";

/// Filter used when the configured one does not parse.
pub const FALLBACK_FILTER: &str = "info";

/// Which sink `init_logging` installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogTarget {
    Journald,
    Stderr,
}

/// Whether this process's stderr is the journal stream `journal_stream`
/// (the value of `JOURNAL_STREAM`) names.
pub fn stderr_is_journal(journal_stream: Option<&str>) -> bool {
    fd_is_journal_stream(std::io::stderr().as_fd(), journal_stream)
}

/// Whether `fd` is the stream `journal_stream` (`<device>:<inode>`, both
/// decimal) names. False for a missing or malformed value, or an fd that
/// cannot be inspected.
pub fn fd_is_journal_stream(fd: BorrowedFd<'_>, journal_stream: Option<&str>) -> bool {
    let Some((dev, ino)) = journal_stream.and_then(parse_journal_stream) else {
        return false;
    };
    // dev_t and ino_t are u64 on Linux but narrower or signed elsewhere.
    #[allow(clippy::unnecessary_cast)]
    match nix::sys::stat::fstat(fd) {
        Ok(stat) => stat.st_dev as u64 == dev && stat.st_ino as u64 == ino,
        Err(_) => false,
    }
}

fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.trim().split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// Install the global `tracing` subscriber: journald when stderr is the
/// journal and journald's socket accepts a datagram, else readable stderr.
/// An unparsable `filter` falls back to `FALLBACK_FILTER` with a warning. If a
/// global subscriber is already installed (tests), it is left in place and the
/// target that would have been chosen is returned.
pub fn init_logging(filter: &str) -> LogTarget {
    let (env_filter, filter_error) = match EnvFilter::try_new(filter) {
        Ok(f) => (f, None),
        Err(err) => (EnvFilter::new(FALLBACK_FILTER), Some(err.to_string())),
    };
    let journal_stream = std::env::var("JOURNAL_STREAM").ok();
    let mut journald_error = None;
    let target = if stderr_is_journal(journal_stream.as_deref()) {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned());
                let _ = tracing_subscriber::registry()
                    .with(env_filter)
                    .with(layer)
                    .try_init();
                LogTarget::Journald
            }
            Err(err) => {
                journald_error = Some(err.to_string());
                install_stderr(env_filter);
                LogTarget::Stderr
            }
        }
    } else {
        install_stderr(env_filter);
        LogTarget::Stderr
    };
    if let Some(err) = filter_error {
        tracing::warn!(filter, error = %err, "invalid log filter; using {FALLBACK_FILTER}");
    }
    if let Some(err) = journald_error {
        tracing::warn!(error = %err, "stderr is the journal but journald's socket is unusable; logging to stderr");
    }
    target
}

fn install_stderr(env_filter: EnvFilter) {
    let _ = tracing_subscriber::registry()
        .with(env_filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour only for a person at a terminal: launchd's
                // StandardErrorPath file and captured pipes get plain text.
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(true),
        )
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn dev_ino(fd: BorrowedFd<'_>) -> String {
        let stat = nix::sys::stat::fstat(fd).unwrap();
        format!("{}:{}", stat.st_dev, stat.st_ino)
    }

    #[test]
    fn stream_socket_matches_its_own_dev_and_inode_only() {
        // journald connects stderr to one end of a stream socket; a socket
        // pair is the same kind of file.
        let (journal_end, _peer) = UnixStream::pair().unwrap();
        let (other, _other_peer) = UnixStream::pair().unwrap();
        let value = dev_ino(journal_end.as_fd());
        assert!(fd_is_journal_stream(journal_end.as_fd(), Some(&value)));
        assert!(!fd_is_journal_stream(other.as_fd(), Some(&value)));
    }

    #[test]
    fn missing_or_malformed_journal_stream_is_not_the_journal() {
        let (sock, _peer) = UnixStream::pair().unwrap();
        for bad in ["", "12", "a:b", "1:2:3", ":"] {
            assert!(!fd_is_journal_stream(sock.as_fd(), Some(bad)), "{bad:?}");
        }
        assert!(!fd_is_journal_stream(sock.as_fd(), None));
        assert!(!stderr_is_journal(None));
    }

    #[test]
    fn inode_off_by_one_does_not_match() {
        let (sock, _peer) = UnixStream::pair().unwrap();
        let stat = nix::sys::stat::fstat(sock.as_fd()).unwrap();
        let wrong = format!("{}:{}", stat.st_dev, stat.st_ino + 1);
        assert!(!fd_is_journal_stream(sock.as_fd(), Some(&wrong)));
    }
}
