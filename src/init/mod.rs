//! The init-system boundary: sd_notify, socket activation, the launchd keepalive
//! file, RLIMIT_NOFILE and log-target detection.
//!
//! Everything agentd says to or takes from its supervisor (systemd or launchd)
//! passes through this room, and nothing here decides *when* to say it: the
//! health loop decides when to pet the watchdog, `main` decides when start-up is
//! done. This room only knows *how*.
//!
//! * `notify`     — the `NOTIFY_SOCKET` datagram client (`READY=1`, `STATUS=`,
//!   `WATCHDOG=1`, …), non-blocking and never fatal.
//! * `activation` — listening sockets inherited from systemd (`LISTEN_FDS`).
//! * `rlimit`     — raising the RLIMIT_NOFILE soft limit, with a report for
//!   `/health`.
//! * `logging`    — journald when stderr is the journal, else readable stderr.
//! * `keepalive`  — the file launchd's companion job checks for freshness, and
//!   the `agentd keepalive-check` logic.
//! * `reaper`     — agentd as child subreaper: reaping orphans of agents and
//!   killing every process still tagged with a finished execution's id.
//! * `dumpable`   — agentd non-dumpable (its agents cannot read its
//!   environment or memory), dumpable again on SIGABRT for the core dump.
//!
//! Nothing here reads configuration or mutates the process environment: the
//! process is multi-threaded soon after start, and `setenv` is not thread-safe.

pub mod activation;
pub mod dumpable;
pub mod keepalive;
pub mod logging;
pub mod notify;
pub mod reaper;
pub mod rlimit;

/// Environment variables through which the init system talks to agentd itself.
///
/// A child process agentd spawns (an agent runtime) must not inherit them: a
/// child that found `NOTIFY_SOCKET` could send `READY=1` or `WATCHDOG=1` on
/// agentd's behalf, one that found `LISTEN_FDS` could take agentd's
/// listener, and `CREDENTIALS_DIRECTORY` would point it at agentd's
/// credentials (the API token). The runtimes remove these, and every
/// `AGENTD_*` variable (`config::is_own_variable`), from every child's
/// environment.
pub const SUPERVISOR_ENV_VARS: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "JOURNAL_STREAM",
    "CREDENTIALS_DIRECTORY",
];
