//! The health state shared by the watchdog loop, `/health`, the sentinel and
//! the application (`App` holds it): mode and interval, the last published
//! verdict, counters, the notifier, cached gauges and the leak-trend ring.
//!
//! It sits below both `app` and `watchdog` and imports neither, so imports
//! flow one way: `app` → `health::state` ← `health::watchdog` → `app`.
//! Only atomics and lock-free snapshots live here: `/health` must never wait
//! on anything a wedged handler could hold.
//!
//! Not here: running the loop (`watchdog`), the checks themselves.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use super::checks::{run_checks, Check, CheckStatus, Verdict};
use super::gauges::ProcGauges;
use super::sentinel::Heartbeat;
use super::single_flight::SingleFlight;
use super::trends::Trends;

use crate::clock::now_unix_ms;
use crate::config::HealthConfig;
use crate::init::notify::Notifier;
use crate::init::rlimit::RlimitReport;

/// How the loop tells the outside world it is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WatchdogMode {
    Systemd,
    KeepaliveFile,
    Both,
    Off,
}

/// A verdict as `/health` serves it: the checks, and with them every other
/// per-tick part of the body (`body::render_tail`), are rendered to JSON once
/// per tick, not once per request, so `/health` stays as cheap as a bare
/// answer.
pub struct Published {
    pub verdict: Verdict,
    pub checks_json: Box<RawValue>,
    /// The per-tick part of the `/health` body, set by the loop before it
    /// publishes and again after each trend sample; empty for a verdict no
    /// tick published (`?deep=1`), whose request renders its own.
    tail: ArcSwapOption<Bytes>,
}

impl Published {
    pub fn new(verdict: Verdict) -> Published {
        let checks_json = render_checks(&verdict);
        Published {
            verdict,
            checks_json,
            tail: ArcSwapOption::empty(),
        }
    }

    pub fn set_tail(&self, tail: Bytes) {
        self.tail.store(Some(Arc::new(tail)));
    }

    /// The pre-rendered per-tick part of the body, if the loop rendered one.
    pub fn tail(&self) -> Option<Arc<Bytes>> {
        self.tail.load_full()
    }

    /// The same as [`tail`](Self::tail) without taking a reference: for the
    /// `/health` request path, which copies it at once.
    pub fn tail_guard(&self) -> arc_swap::Guard<Option<Arc<Bytes>>> {
        self.tail.load()
    }
}

#[derive(Serialize)]
struct CheckJson<'a> {
    status: CheckStatus,
    /// Rounded to 0.01 ms: finer digits are noise.
    ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
}

/// `{"<check>": {"status", "ms", "detail"?}, ...}`
pub fn render_checks(verdict: &Verdict) -> Box<RawValue> {
    let map: std::collections::BTreeMap<&str, CheckJson<'_>> = verdict
        .checks
        .iter()
        .map(|(name, r)| {
            (
                *name,
                CheckJson {
                    status: r.status,
                    ms: (r.ms * 100.0).round() / 100.0,
                    detail: r.detail.as_deref(),
                },
            )
        })
        .collect();
    serde_json::value::to_raw_value(&map)
        .unwrap_or_else(|_| RawValue::from_string("{}".to_owned()).expect("valid JSON"))
}

/// Fraction of the systemd watchdog timeout used as the tick interval: one
/// failed (or late) tick is tolerated, two are not.
const WATCHDOG_DIVISOR: u32 = 3;

/// The health state shared by the loop, `/health` and the sentinel. Only
/// atomics and lock-free snapshots: `/health` must never wait on anything a
/// wedged handler could hold.
pub struct HealthState {
    pub mode: WatchdogMode,
    pub interval: Duration,
    /// Per-check deadline: at most half the interval.
    pub deadline: Duration,
    pub notifier: Arc<Notifier>,
    pub rlimit: RlimitReport,
    pub gauges: Arc<ProcGauges>,
    pub heartbeat: Arc<Heartbeat>,
    /// Touched after every passing tick (launchd keepalive companion).
    pub keepalive_file: Option<PathBuf>,
    /// Consecutive wedged ticks after which `WATCHDOG=trigger` is sent.
    pub trigger_after: Option<u32>,
    /// The leak-trend ring and its pre-rendered answers.
    pub trends: Trends,
    /// The last tick's verdict, with its checks already rendered for `/health`.
    pub last: ArcSwapOption<Published>,
    pub last_tick_ms: AtomicU64,
    pub last_ok_ms: AtomicU64,
    pub consecutive_failures: AtomicU32,
    pub ticks: AtomicU64,
    /// Ticks where a check failed (no ping was sent), since start.
    pub failed_ticks: AtomicU64,
    /// The checks, installed once the listener (the self-probe's target) is
    /// known.
    checks: OnceLock<Vec<Check>>,
    /// `/health?deep=1` callers share one run.
    pub deep: SingleFlight<Arc<Verdict>>,
}

impl HealthState {
    pub fn new(
        config: &HealthConfig,
        notifier: Arc<Notifier>,
        rlimit: RlimitReport,
        gauges: Arc<ProcGauges>,
    ) -> HealthState {
        let systemd = notifier.watchdog_timeout();
        let interval = match systemd {
            Some(timeout) => (timeout / WATCHDOG_DIVISOR).max(Duration::from_millis(10)),
            None => config.interval,
        };
        let mode = match (systemd.is_some(), config.keepalive_file.is_some()) {
            (true, true) => WatchdogMode::Both,
            (true, false) => WatchdogMode::Systemd,
            (false, true) => WatchdogMode::KeepaliveFile,
            (false, false) => WatchdogMode::Off,
        };
        HealthState {
            mode,
            interval,
            deadline: interval / 2,
            notifier,
            rlimit,
            gauges,
            heartbeat: Heartbeat::new(),
            keepalive_file: config.keepalive_file.clone(),
            trigger_after: config.trigger_after,
            trends: Trends::new(config.trend_window, config.trend_interval),
            last: ArcSwapOption::empty(),
            last_tick_ms: AtomicU64::new(0),
            last_ok_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ticks: AtomicU64::new(0),
            failed_ticks: AtomicU64::new(0),
            checks: OnceLock::new(),
            deep: SingleFlight::new(),
        }
    }

    pub fn install_checks(&self, checks: Vec<Check>) {
        let _ = self.checks.set(checks);
    }

    pub fn checks(&self) -> &[Check] {
        self.checks.get().map(Vec::as_slice).unwrap_or(&[])
    }

    /// Run every check now (for `/health?deep=1`); concurrent callers share
    /// one run.
    pub async fn deep(self: &Arc<Self>) -> Arc<Verdict> {
        let this = self.clone();
        self.deep
            .run(move || async move { Arc::new(run_checks(this.checks(), this.deadline).await) })
            .await
    }

    /// True when the last tick is older than two intervals plus a deadline:
    /// the loop itself has stopped.
    pub fn stale(&self) -> bool {
        let last = self.last_tick_ms.load(Relaxed);
        if last == 0 {
            return false;
        }
        let allowed = (self.interval * 2 + self.deadline).as_millis() as u64;
        now_unix_ms().saturating_sub(last) > allowed
    }
}
