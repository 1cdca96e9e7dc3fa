//! The watchdog loop, the heart of agentd: each tick runs every check
//! concurrently under a deadline, publishes the verdict for `/health`, and —
//! only when every check passed — sends `WATCHDOG=1` to systemd and touches the
//! launchd keepalive file.
//!
//! Invariant: `tick` below is the only caller of `Notifier::watchdog_ping` and
//! of `keepalive::touch` in the whole program. A wedged process therefore stops
//! petting by construction, and systemd (or launchd) restarts it.
//!
//! Not here: what each check does (`checks`, `probe`, the closures built in
//! `build_checks`), watching the loop itself (`sentinel`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use serde::Serialize;
use serde_json::value::RawValue;

use super::checks::{run_checks, Check, CheckStatus, Verdict};
use super::gauges::ProcGauges;
use super::sentinel::Heartbeat;
use super::single_flight::SingleFlight;

use crate::app::App;
use crate::config::HealthConfig;
use crate::init::keepalive;
use crate::init::notify::Notifier;
use crate::init::rlimit::RlimitReport;
use crate::server::stats::now_unix_ms;

/// How the loop tells the outside world it is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WatchdogMode {
    Systemd,
    KeepaliveFile,
    Both,
    Off,
}

/// A verdict as `/health` serves it: the checks are rendered to JSON once per
/// tick, not once per request, so `/health` stays as cheap as a bare answer.
pub struct Published {
    pub verdict: Verdict,
    pub checks_json: Box<RawValue>,
}

impl Published {
    pub fn new(verdict: Verdict) -> Published {
        let checks_json = render_checks(&verdict);
        Published {
            verdict,
            checks_json,
        }
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
    keepalive_file: Option<PathBuf>,
    trigger_after: Option<u32>,
    /// The last tick's verdict, with its checks already rendered for `/health`.
    pub last: ArcSwapOption<Published>,
    pub last_tick_ms: AtomicU64,
    pub last_ok_ms: AtomicU64,
    pub consecutive_failures: AtomicU32,
    pub ticks: AtomicU64,
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
            last: ArcSwapOption::empty(),
            last_tick_ms: AtomicU64::new(0),
            last_ok_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ticks: AtomicU64::new(0),
            checks: OnceLock::new(),
            deep: SingleFlight::new(),
        }
    }

    pub fn install_checks(&self, checks: Vec<Check>) {
        let _ = self.checks.set(checks);
    }

    fn checks(&self) -> &[Check] {
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

/// Run ticks until shutdown. `first_pass` fires after the first passing tick
/// (the daemon sends `READY=1` then).
pub async fn run(app: Arc<App>, first_pass: tokio::sync::oneshot::Sender<()>) {
    let health = app.health.clone();
    let mut first_pass = Some(first_pass);
    let mut failing: BTreeSet<&'static str> = BTreeSet::new();
    let mut status = StatusLine::default();
    let mut ticker = tokio::time::interval(health.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = app.shutdown.triggered() => return,
        }
        let passed = tick(&app, &mut failing, &mut status).await;
        if passed {
            if let Some(tx) = first_pass.take() {
                let _ = tx.send(());
            }
        }
    }
}

/// One tick. Returns whether every check passed.
async fn tick(
    app: &Arc<App>,
    failing: &mut BTreeSet<&'static str>,
    status: &mut StatusLine,
) -> bool {
    let health = &app.health;
    let started = Instant::now();
    let verdict = run_checks(health.checks(), health.deadline).await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let passed = verdict.passed();
    health.ticks.fetch_add(1, Relaxed);
    health.last_tick_ms.store(now_unix_ms(), Relaxed);
    health.heartbeat.beat();

    log_transitions(&verdict, failing, elapsed_ms);
    if passed {
        health.last_ok_ms.store(now_unix_ms(), Relaxed);
        health.consecutive_failures.store(0, Relaxed);
        // The only WATCHDOG=1 in the program, and only when systemd's watchdog
        // is meant for this process (WATCHDOG_USEC set, WATCHDOG_PID ours).
        if matches!(health.mode, WatchdogMode::Systemd | WatchdogMode::Both) {
            health.notifier.watchdog_ping();
        }
        if let Some(path) = &health.keepalive_file {
            if let Err(e) = keepalive::touch(path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot touch the keepalive file");
            }
        }
        status.set(&health.notifier, status_line(app));
    } else {
        let n = health.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if let Some((name, result)) = verdict.first_failure() {
            let detail = result.detail.as_deref().unwrap_or("failed");
            status.set(&health.notifier, format!("degraded: {name}: {detail}"));
        }
        let systemd = matches!(health.mode, WatchdogMode::Systemd | WatchdogMode::Both);
        if systemd && health.trigger_after.is_some_and(|limit| n >= limit) {
            tracing::error!(consecutive_failures = n, "sending WATCHDOG=trigger");
            health.notifier.watchdog_trigger();
        }
    }
    health.last.store(Some(Arc::new(Published::new(verdict))));
    passed
}

/// Ticks between re-sends of an unchanged `STATUS=` line: others (the
/// sentinel, a reload) may have written a different line meanwhile.
const STATUS_RESEND_TICKS: u32 = 30;

/// The last `STATUS=` text sent, so an unchanged line is not sent every tick.
#[derive(Default)]
struct StatusLine {
    text: String,
    unchanged_ticks: u32,
}

impl StatusLine {
    fn set(&mut self, notifier: &Notifier, text: String) {
        self.unchanged_ticks += 1;
        if text != self.text || self.unchanged_ticks >= STATUS_RESEND_TICKS {
            notifier.status(&text);
            self.text = text;
            self.unchanged_ticks = 0;
        }
    }
}

/// One structured record per transition of a check (failing or recovered),
/// with the journal fields `HEALTH_CHECK`, `HEALTH_STATUS`, `ELAPSED_MS`.
fn log_transitions(verdict: &Verdict, failing: &mut BTreeSet<&'static str>, elapsed_ms: u64) {
    for (name, result) in &verdict.checks {
        let bad = result.status != CheckStatus::Ok;
        let detail = result.detail.as_deref().unwrap_or("");
        if bad && failing.insert(name) {
            let status = match result.status {
                CheckStatus::Timeout => "timeout",
                _ => "failed",
            };
            tracing::warn!(
                health_check = *name,
                health_status = status,
                elapsed_ms,
                check_ms = result.ms,
                detail,
                "health check {name} {status}: {detail}"
            );
        } else if !bad && failing.remove(name) {
            tracing::info!(
                health_check = *name,
                health_status = "ok",
                elapsed_ms,
                "health check {name} recovered"
            );
        }
    }
}

/// The `STATUS=` line a person reads in `systemctl status`.
pub fn status_line(app: &App) -> String {
    let g = app.executor.gauges();
    let (size, limit) = app.history_gauges();
    let p = app.health.gauges.get();
    // Saturation is load, not a wedge: said here, while the pings go on.
    let busy = app
        .stats
        .saturation()
        .busy_summary()
        .map(|b| format!(" · {b}"))
        .unwrap_or_default();
    format!(
        "healthy{busy} · {} running · {} queued · history {size}/{limit} · fds {}/{}",
        g.running, g.queued, p.open_fds, p.fd_soft
    )
}
