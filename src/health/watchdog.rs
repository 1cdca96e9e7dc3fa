//! The watchdog loop, the heart of agentd: each tick runs every check
//! concurrently under a deadline, publishes the verdict for `/health`, and —
//! only when no check found a wedge — sends `WATCHDOG=1` to systemd and
//! touches the launchd keepalive file. A check that is merely degraded (load,
//! or a condition that clears by itself such as a full disk) is reported in
//! `/health` and `STATUS=` but keeps the pings going. The loop also takes the
//! leak-trend samples (`trends`) on their own cadence.
//!
//! Invariant: `tick` below is the only caller of `Notifier::watchdog_ping` and
//! of `keepalive::touch` in the whole program. A wedged process therefore stops
//! petting by construction, and systemd (or launchd) restarts it.
//!
//! Not here: what each check does (`checks`, `probe`, the closures built in
//! `build_checks`), watching the loop itself (`sentinel`).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::checks::{run_checks_due_at, CheckStatus, Verdict};
use super::ticker::Ticker;
use super::trends::Sample;
use crate::clock::now_unix_ms;

// Re-exported: the state moved below `app` so the two no longer import each
// other; callers that name it through the loop keep working.
pub use super::state::{HealthState, Published, WatchdogMode};

use crate::app::App;
use crate::init::keepalive;
use crate::init::notify::Notifier;

/// Run ticks until shutdown. `first_pass` fires after the first passing tick
/// (the daemon sends `READY=1` then).
pub async fn run(app: Arc<App>, first_pass: tokio::sync::oneshot::Sender<()>) {
    let health = app.health.clone();
    let mut first_pass = Some(first_pass);
    let mut failing: BTreeSet<&'static str> = BTreeSet::new();
    let mut status = StatusLine::default();
    let mut ticker = Ticker::new(health.interval);
    // Trend samples keep their own cadence (a minute by default), independent
    // of the check interval.
    let mut sampler = tokio::time::interval(health.trends.interval);
    sampler.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the last tick ended: a tick that ran past the interval makes the
    // next one due at once, which is no lag of the runtime's.
    let mut ended = Instant::now();
    loop {
        let due = tokio::select! {
            due = ticker.tick() => due.max(ended),
            _ = sampler.tick() => {
                health.trends.record(take_sample(&app));
                if let Some(published) = health.last.load_full() {
                    super::body::publish_tail(&app, &published);
                }
                continue;
            }
            _ = app.shutdown.triggered() => return,
        };
        let passed = tick(&app, &mut failing, &mut status, due).await;
        ended = Instant::now();
        if passed {
            if let Some(tx) = first_pass.take() {
                let _ = tx.send(());
            }
        }
    }
}

/// One reading of every trend gauge (a fresh `/proc` read: at one sample a
/// minute it costs nothing, and a stale cached value would flatten the slope).
fn take_sample(app: &App) -> Sample {
    let p = app.health.gauges.refresh();
    let tasks = tokio::runtime::Handle::try_current()
        .map(|h| h.metrics().num_alive_tasks() as i64)
        .unwrap_or(-1);
    let (history, _) = app.history_gauges();
    Sample {
        at: now_unix_ms() as f64 / 1000.0,
        values: [
            p.thread_count,
            p.open_fds,
            p.rss_bytes,
            tasks,
            history as i64,
            app.store.queued() as i64,
        ],
    }
}

/// One tick. Returns whether the process is free of wedges (every check
/// passed or is only degraded by load or a condition that clears by itself;
/// see `CheckStatus::Degraded`).
async fn tick(
    app: &Arc<App>,
    failing: &mut BTreeSet<&'static str>,
    status: &mut StatusLine,
    due: Instant,
) -> bool {
    let health = &app.health;
    app.faults.on_health_tick();
    let started = Instant::now();
    let verdict = run_checks_due_at(health.checks(), health.deadline, due).await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let passed = !verdict.wedged();
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
        match verdict.first_failure() {
            // Degraded, not wedged: say so, and keep petting.
            Some((name, result)) => {
                let detail = result.detail.as_deref().unwrap_or("degraded");
                status.set(&health.notifier, format!("degraded: {name}: {detail}"));
            }
            None => status.set(&health.notifier, status_line(app)),
        }
    } else {
        let n = health.consecutive_failures.fetch_add(1, Relaxed) + 1;
        health.failed_ticks.fetch_add(1, Relaxed);
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
    let published = Arc::new(Published::new(verdict));
    super::body::publish_tail(app, &published);
    health.last.store(Some(published));
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
                CheckStatus::Degraded => "degraded",
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
