//! Health: gauges read from the kernel, deep checks with deadlines, the watchdog
//! loop that alone pets systemd, and the sentinel thread that watches the loop.
//!
//! * `watchdog`      — the loop: tick → checks → verdict → `WATCHDOG=1`,
//!   keepalive touch, `STATUS=`; it also takes the trend samples.
//! * `ticker`        — the loop's clock: one wake-up per tick (a periodic
//!   timerfd on Linux).
//! * `state`         — `HealthState`, shared by the loop, `/health`, the
//!   sentinel and `App`; below both `app` and `watchdog`, importing neither.
//! * `body`          — the `/health` body: per-tick part rendered by the loop,
//!   live gauges spliced in per request with integer formatting.
//! * `trends`        — the bounded ring of gauge samples, slopes and the
//!   suspected-leak rule, pre-rendered for `/health`.
//! * `app_checks`    — the six checks built over the running app.
//! * `gauges`        — `/proc/self` readers (threads, fds, rss, rlimit) and the
//!   `ProcGauges` cache that keeps `GET /health` as cheap as a bare "hello".
//! * `checks`        — `Check`, the concurrent runner with per-check deadlines
//!   (`run_checks` → `Verdict`), and the self-contained runtime-lag and
//!   resources checks.
//! * `probe`         — the self-probe check: a real HTTP request through the
//!   server's own listener and accept loop.
//! * `single_flight` — concurrent `/health?deep=1` callers share one run.
//! * `sentinel`      — the OS thread that watches the loop's heartbeat and writes
//!   a diagnostics bundle (and, in launchd mode, aborts) when the loop stalls.
//! * `bundle`        — atomic, time-named, retention-bounded diagnostics files.
//!
//! Only `watchdog` talks to systemd about liveness.

pub mod app_checks;
pub mod body;
pub mod bundle;
pub mod checks;
pub mod gauges;
pub mod probe;
pub mod sentinel;
pub mod single_flight;
pub mod state;
pub mod ticker;
pub mod trends;
pub mod watchdog;
