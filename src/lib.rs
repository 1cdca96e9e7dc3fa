//! agentd: an agent server native to systemd.
//!
//! Map of the crate (one concern per room):
//!
//! * `config`   — every knob: declared once in `config::settings` (defaults,
//!   TOML key, env var, flag, bound, meaning); loading and validation.
//! * `server`   — the hyper accept loop (counters, connection limit, the
//!   self-probe's door, header size and time limits, graceful shutdown), the
//!   router and the HTTP handlers.
//! * `accept`   — what the accept loop shares: its counters and the
//!   self-probe's door (below `app`, `server` and `health`).
//! * `agent`    — bounded conversation history and the runtimes that answer
//!   prompts.
//! * `store`    — the single SQLite connection, owned by one thread (actor).
//! * `store_sync` — the store's sync thread: one fsync of the WAL for every
//!   batch committed while the last one ran, answers after it (pipelined
//!   group commit at `synchronous=full`).
//! * `store_watch` — what the store thread tells the `store` check without
//!   a round trip: how long the last proof stands, a request it is stuck in,
//!   a write lock another process holds (SQLite's busy handler).
//! * `store_file` — proof that `state.db` is still the database the store
//!   opened (identity, header, length), checked around every write.
//! * `health`   — gauges, deep checks, the watchdog loop and the sentinel.
//! * `init`     — the init-system boundary: sd_notify, socket activation,
//!   keepalive file, RLIMIT_NOFILE, journald detection, child subreaper and
//!   orphan reaper.
//! * `report`   — `agentd health`: asks `/health` and prints a report for
//!   people, with exit codes for scripts.
//! * `clock`    — seconds and milliseconds since the Unix epoch, below every
//!   room that stamps times.
//! * `shutdown` — the shutdown signal shared by every long-running task.
//! * `state_dir` — the private state directory (0700/0600) and its
//!   one-process lock.
//! * `app`      — the shared application state handlers receive.
//! * `daemon`   — the `serve` lifecycle: start-up order, signals, shutdown order.
//! * `faults`   — fault injection for wedge tests (feature `fault-injection`).

pub mod accept;
pub mod agent;
pub mod app;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod faults;
pub mod health;
pub mod init;
pub mod report;
pub mod server;
pub mod shutdown;
pub mod state_dir;
pub mod store;
pub mod store_file;
pub mod store_sync;
pub mod store_watch;
