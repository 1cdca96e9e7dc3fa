//! `GET /metrics`: the Prometheus text exposition (format 0.0.4) of what
//! `/health` reports, for programs that scrape and graph it.
//!
//! Same rule as `/health`: every number comes from an atomic, the cached
//! `/proc` snapshot or the watchdog's last published verdict. No handler lock,
//! no database, no check run per scrape. Names follow the Prometheus
//! conventions: `agentd_` prefix, `_total` for counters, base units (seconds,
//! bytes) in the name, and a `HELP` and `TYPE` line per family.
//!
//! Not here: deciding health (the watchdog loop does), or `/health`'s JSON.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use http::{header, HeaderValue, Response};

use super::health::verdict_status;
use super::http::{full, Body};
use crate::agent::executor::{KINDS, OUTCOMES};
use crate::app::App;
use crate::health::checks::CheckStatus;
use crate::health::gauges::UNREADABLE;
use crate::health::watchdog::WatchdogMode;

/// The content type Prometheus expects for the text format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every `status` word `/health` can answer; exported as a state set (the
/// current one is 1, the others 0) so a query never meets a missing series.
const STATUSES: [&str; 4] = ["healthy", "degraded", "starting", "stopping"];

/// Every watchdog mode, exported as a state set like [`STATUSES`].
const MODES: [(WatchdogMode, &str); 4] = [
    (WatchdogMode::Systemd, "systemd"),
    (WatchdogMode::KeepaliveFile, "keepalive-file"),
    (WatchdogMode::Both, "both"),
    (WatchdogMode::Off, "off"),
];

/// Size the text buffer once: the exposition is about 6 KiB.
const INITIAL_CAPACITY: usize = 8 * 1024;

#[derive(Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

/// Builds the exposition text: one family header, then its samples.
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        push_value(&mut self.out, value);
        self.out.push('\n');
    }

    /// A family with one unlabelled sample.
    fn one(&mut self, name: &str, kind: Kind, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A `/proc` gauge: left out (family and all) when it could not be read,
    /// so a graph shows a gap instead of a fake `-1`.
    fn proc_gauge(&mut self, name: &str, help: &str, value: i64) {
        if value != UNREADABLE {
            self.one(name, Kind::Gauge, help, limit_value(value));
        }
    }
}

/// `i64::MAX` stands for "unlimited" in the rlimit gauges.
fn limit_value(v: i64) -> f64 {
    if v == i64::MAX {
        f64::INFINITY
    } else {
        v as f64
    }
}

fn push_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v == f64::INFINITY {
        out.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let _ = write!(out, "{v}");
    }
}

/// Label values escape backslash, double quote and newline.
fn escape_label(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return v.into();
    }
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

fn seconds_from_ms(ms: u64) -> Option<f64> {
    (ms != 0).then(|| ms as f64 / 1000.0)
}

/// `GET /metrics`.
pub fn metrics(app: &Arc<App>) -> Response<Body> {
    let mut resp = Response::new(full(render(app)));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    resp
}

/// The whole exposition text.
pub fn render(app: &App) -> String {
    let mut m = Exposition {
        out: String::with_capacity(INITIAL_CAPACITY),
    };
    build_and_uptime(&mut m, app);
    health(&mut m, app);
    watchdog(&mut m, app);
    accept_loop(&mut m, app);
    work(&mut m, app);
    process(&mut m, app);
    runtime(&mut m, app);
    trends(&mut m, app);
    m.out
}

fn build_and_uptime(m: &mut Exposition, app: &App) {
    m.family(
        "agentd_build_info",
        Kind::Gauge,
        "Always 1; the labels say which agentd build is running.",
    );
    m.sample(
        "agentd_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    let uptime = app.started.elapsed().as_secs_f64();
    m.one(
        "agentd_uptime_seconds",
        Kind::Gauge,
        "Seconds since the server started.",
        uptime,
    );
    m.one(
        "agentd_start_time_seconds",
        Kind::Gauge,
        "Start time of the server, seconds since the Unix epoch.",
        crate::clock::unix_now() - uptime,
    );
}

fn health(m: &mut Exposition, app: &App) {
    let published = app.health.last.load_full();
    let verdict = published.as_ref().map(|p| &p.verdict);
    let (status, _) = verdict_status(app, verdict, false);
    m.family(
        "agentd_health_status",
        Kind::Gauge,
        "1 for the status /health reports now (healthy, degraded, starting, stopping), 0 for the others.",
    );
    for s in STATUSES {
        m.sample(
            "agentd_health_status",
            &[("status", s)],
            f64::from(u8::from(s == status)),
        );
    }
    if let Some(v) = verdict {
        m.family(
            "agentd_health_check_ok",
            Kind::Gauge,
            "1 when the check passed on the watchdog loop's last tick, 0 when it failed or timed out.",
        );
        for (name, r) in &v.checks {
            m.sample(
                "agentd_health_check_ok",
                &[("check", name)],
                f64::from(u8::from(r.status == CheckStatus::Ok)),
            );
        }
        m.family(
            "agentd_health_check_duration_seconds",
            Kind::Gauge,
            "How long the check took on the watchdog loop's last tick.",
        );
        for (name, r) in &v.checks {
            m.sample(
                "agentd_health_check_duration_seconds",
                &[("check", name)],
                // Whole nanoseconds: finer digits are float noise.
                (r.ms * 1e6).round() / 1e9,
            );
        }
    }
    m.one(
        "agentd_health_deep_runs_total",
        Kind::Counter,
        "Check runs started by /health?deep=1 (concurrent callers share one).",
        app.health.deep.runs() as f64,
    );
}

fn watchdog(m: &mut Exposition, app: &App) {
    let h = &app.health;
    m.family(
        "agentd_watchdog_mode",
        Kind::Gauge,
        "1 for how the watchdog loop signals liveness (systemd, keepalive-file, both, off).",
    );
    for (mode, label) in MODES {
        m.sample(
            "agentd_watchdog_mode",
            &[("mode", label)],
            f64::from(u8::from(mode == h.mode)),
        );
    }
    m.one(
        "agentd_watchdog_interval_seconds",
        Kind::Gauge,
        "Time between two watchdog loop ticks.",
        h.interval.as_secs_f64(),
    );
    m.one(
        "agentd_watchdog_check_deadline_seconds",
        Kind::Gauge,
        "Deadline of each check within a tick (half the interval).",
        h.deadline.as_secs_f64(),
    );
    m.one(
        "agentd_watchdog_ticks_total",
        Kind::Counter,
        "Watchdog loop ticks run.",
        h.ticks.load(Relaxed) as f64,
    );
    m.one(
        "agentd_watchdog_failed_ticks_total",
        Kind::Counter,
        "Watchdog loop ticks where a check failed, so no liveness ping was sent.",
        h.failed_ticks.load(Relaxed) as f64,
    );
    m.one(
        "agentd_watchdog_consecutive_failures",
        Kind::Gauge,
        "Failed ticks since the last passing one.",
        f64::from(h.consecutive_failures.load(Relaxed)),
    );
    m.one(
        "agentd_watchdog_pings_total",
        Kind::Counter,
        "WATCHDOG=1 notifications sent to systemd.",
        h.notifier.pings_sent() as f64,
    );
    if let Some(t) = seconds_from_ms(h.last_tick_ms.load(Relaxed)) {
        m.one(
            "agentd_watchdog_last_tick_timestamp_seconds",
            Kind::Gauge,
            "When the last tick ended, seconds since the Unix epoch.",
            t,
        );
    }
    if let Some(t) = seconds_from_ms(h.last_ok_ms.load(Relaxed)) {
        m.one(
            "agentd_watchdog_last_ok_timestamp_seconds",
            Kind::Gauge,
            "When the last passing tick ended, seconds since the Unix epoch.",
            t,
        );
    }
}

fn accept_loop(m: &mut Exposition, app: &App) {
    let s = app.stats.snapshot();
    m.one(
        "agentd_connections_total",
        Kind::Counter,
        "Connections accepted.",
        s.connections_total as f64,
    );
    m.one(
        "agentd_connections_open",
        Kind::Gauge,
        "Connections being served now.",
        s.connections_open as f64,
    );
    m.one(
        "agentd_connections_rejected_total",
        Kind::Counter,
        "Connections turned away with 503 at the connection limit.",
        s.connections_rejected as f64,
    );
    m.one(
        "agentd_connections_max",
        Kind::Gauge,
        "Client connections served at once before new ones get a fast 503 (AGENTD_MAX_CONNECTIONS).",
        s.connections_max as f64,
    );
    m.one(
        "agentd_accept_loop_saturated",
        Kind::Gauge,
        "1 while every client slot is taken or connections were turned away in the last few seconds (load, not a wedge).",
        f64::from(u8::from(s.saturated)),
    );
    m.one(
        "agentd_connections_rejected_per_second",
        Kind::Gauge,
        "Connections turned away per second over the last few seconds.",
        s.rejected_per_second,
    );
    m.one(
        "agentd_probe_connections_reserved_total",
        Kind::Counter,
        "Self-probe connections served while every client slot was taken.",
        s.probe_connections_reserved as f64,
    );
    m.one(
        "agentd_requests_total",
        Kind::Counter,
        "HTTP requests completed.",
        s.requests_total as f64,
    );
    m.one(
        "agentd_accept_errors_total",
        Kind::Counter,
        "Errors returned by accept().",
        s.accept_errors as f64,
    );
    if let Some(t) = s.last_accept_at {
        m.one(
            "agentd_last_accept_timestamp_seconds",
            Kind::Gauge,
            "When the accept loop last accepted a connection, seconds since the Unix epoch.",
            t,
        );
    }
    if let Some(t) = s.last_request_completed_at {
        m.one(
            "agentd_last_request_timestamp_seconds",
            Kind::Gauge,
            "When a request last completed, seconds since the Unix epoch.",
            t,
        );
    }
}

fn work(m: &mut Exposition, app: &App) {
    let e = app.executor.gauges();
    m.one(
        "agentd_executions_running",
        Kind::Gauge,
        "Executions running now.",
        e.running as f64,
    );
    m.one(
        "agentd_executions_queued",
        Kind::Gauge,
        "Executions admitted and waiting to start.",
        e.queued as f64,
    );
    m.one(
        "agentd_stream_replay_bytes",
        Kind::Gauge,
        "Bytes all executions' replay buffers hold together.",
        e.replay_bytes as f64,
    );
    m.one(
        "agentd_stream_replay_limit_bytes",
        Kind::Gauge,
        "Bound on all replay buffers together (AGENTD_STREAM_REPLAY_TOTAL).",
        e.replay_limit as f64,
    );
    m.one(
        "agentd_executions_started_total",
        Kind::Counter,
        "Executions started.",
        e.started_total as f64,
    );
    m.family(
        "agentd_executions_total",
        Kind::Counter,
        "Finished executions by kind (chat, task) and outcome (success, failed, timeout, cancelled).",
    );
    let done = app.executor.completions();
    for kind in KINDS {
        for outcome in OUTCOMES {
            m.sample(
                "agentd_executions_total",
                &[("kind", kind.as_str()), ("outcome", outcome)],
                done.get(kind, outcome) as f64,
            );
        }
    }
    let (size, limit) = app.history_gauges();
    m.one(
        "agentd_history_size",
        Kind::Gauge,
        "Messages in the in-memory conversation history.",
        size as f64,
    );
    m.one(
        "agentd_history_limit",
        Kind::Gauge,
        "Most messages the in-memory history keeps (AGENT_HISTORY_LIMIT).",
        limit as f64,
    );
    m.one(
        "agentd_store_queue",
        Kind::Gauge,
        "Requests waiting for the store thread.",
        app.store.queued() as f64,
    );
    let commits = app.store.commits();
    m.one(
        "agentd_store_commits_total",
        Kind::Counter,
        "Append transactions committed to state.db (group commit folds many appends into one).",
        commits.commits.load(Relaxed) as f64,
    );
    m.one(
        "agentd_store_committed_messages_total",
        Kind::Counter,
        "Messages committed to state.db.",
        commits.rows.load(Relaxed) as f64,
    );
    m.one(
        "agentd_store_syncs_total",
        Kind::Counter,
        "fsyncs of the WAL at synchronous=full, each covering every batch committed while the one before ran.",
        commits.syncs.load(Relaxed) as f64,
    );
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        m.one(
            "agentd_tokio_alive_tasks",
            Kind::Gauge,
            "Tasks alive in the tokio runtime.",
            h.metrics().num_alive_tasks() as f64,
        );
    }
}

fn process(m: &mut Exposition, app: &App) {
    let p = app.health.gauges.get();
    m.proc_gauge(
        "agentd_process_resident_memory_bytes",
        "Resident set size of the process.",
        p.rss_bytes,
    );
    m.proc_gauge(
        "agentd_process_open_fds",
        "Open file descriptors.",
        p.open_fds,
    );
    m.proc_gauge(
        "agentd_process_max_fds",
        "Soft RLIMIT_NOFILE: the open fd limit that applies (+Inf when unlimited).",
        p.fd_soft,
    );
    m.proc_gauge(
        "agentd_process_max_fds_hard",
        "Hard RLIMIT_NOFILE: how far the soft limit could be raised.",
        p.fd_hard,
    );
    m.proc_gauge(
        "agentd_process_threads",
        "OS threads in the process.",
        p.thread_count,
    );
}

fn runtime(m: &mut Exposition, app: &App) {
    let r = &app.runtime_report;
    m.family(
        "agentd_runtime_info",
        Kind::Gauge,
        "Always 1; the labels name the configured runtime, its program and the CLI's version (empty when unknown).",
    );
    m.sample(
        "agentd_runtime_info",
        &[
            ("name", r.name),
            ("command", r.command.as_deref().unwrap_or("")),
            ("version", r.version().unwrap_or("")),
        ],
        1.0,
    );
    m.one(
        "agentd_runtime_runnable",
        Kind::Gauge,
        "1 when the runtime's program was found and executable at start.",
        f64::from(u8::from(r.runnable)),
    );
    agents(m, app);
}

/// The `acp` runtime's agent pool (absent for every other runtime).
fn agents(m: &mut Exposition, app: &App) {
    let Some(a) = app.runtime().agents() else {
        return;
    };
    m.family(
        "agentd_acp_agents",
        Kind::Gauge,
        "ACP agent processes alive now, by state.",
    );
    m.sample("agentd_acp_agents", &[("state", "busy")], a.busy as f64);
    m.sample("agentd_acp_agents", &[("state", "idle")], a.idle as f64);
    m.one(
        "agentd_acp_agents_limit",
        Kind::Gauge,
        "AGENTD_ACP_MAX_AGENTS: the most ACP agent processes at once.",
        a.limit as f64,
    );
    m.one(
        "agentd_acp_agents_started_total",
        Kind::Counter,
        "ACP agent processes started.",
        a.started as f64,
    );
    m.one(
        "agentd_acp_agent_restarts_total",
        Kind::Counter,
        "ACP agent processes that died or were killed for not answering.",
        a.restarts as f64,
    );
    m.one(
        "agentd_acp_agents_closed_total",
        Kind::Counter,
        "Idle ACP agent processes closed (idle timeout, room for another session, deleted history).",
        a.closed as f64,
    );
    m.one(
        "agentd_acp_agents_degraded",
        Kind::Gauge,
        "1 while ACP agent starts keep failing and the pool backs off.",
        f64::from(u8::from(a.degraded.is_some())),
    );
}

/// The leak trends, from the `/health` block the health loop pre-renders
/// after each sample (a few hundred bytes, parsed per scrape; the sample ring
/// and its lock are not touched).
fn trends(m: &mut Exposition, app: &App) {
    #[derive(serde::Deserialize)]
    struct Summary {
        samples: u64,
        slope_per_hour: std::collections::BTreeMap<String, f64>,
        suspected_leak: Vec<String>,
    }
    let rendered = app.health.trends.summary_json();
    let Ok(summary) = serde_json::from_str::<Summary>(rendered.get()) else {
        return;
    };
    m.one(
        "agentd_trend_samples",
        Kind::Gauge,
        "Leak-trend samples in the window.",
        summary.samples as f64,
    );
    if summary.slope_per_hour.is_empty() {
        return;
    }
    m.family(
        "agentd_trend_slope_per_second",
        Kind::Gauge,
        "Least-squares slope of each gauge over the trend window, in the gauge's unit per second.",
    );
    for (gauge, slope) in &summary.slope_per_hour {
        m.sample(
            "agentd_trend_slope_per_second",
            &[("gauge", gauge)],
            slope / 3600.0,
        );
    }
    m.family(
        "agentd_trend_suspected_leak",
        Kind::Gauge,
        "1 when the gauge grew steadily over the trend window (the /health trends rule).",
    );
    for gauge in summary.slope_per_hour.keys() {
        let leak = summary.suspected_leak.iter().any(|g| g == gauge);
        m.sample(
            "agentd_trend_suspected_leak",
            &[("gauge", gauge)],
            f64::from(u8::from(leak)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("plain"), "plain");
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn special_values_use_prometheus_spelling() {
        let mut s = String::new();
        push_value(&mut s, f64::INFINITY);
        s.push(' ');
        push_value(&mut s, f64::NAN);
        s.push(' ');
        push_value(&mut s, 3.0);
        s.push(' ');
        push_value(&mut s, 0.25);
        assert_eq!(s, "+Inf NaN 3 0.25");
    }

    #[test]
    fn unreadable_proc_gauges_are_left_out() {
        let mut m = Exposition { out: String::new() };
        m.proc_gauge("agentd_x", "x", UNREADABLE);
        assert!(m.out.is_empty());
        m.proc_gauge("agentd_x", "x", i64::MAX);
        assert!(m.out.ends_with("agentd_x +Inf\n"), "{}", m.out);
    }
}
