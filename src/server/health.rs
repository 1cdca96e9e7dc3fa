//! `GET /health`, `GET /health/trends` and the fault-injection endpoint
//! (`/metrics` is `metrics`).
//!
//! `/health` is cheap by rule: it takes no lock that handlers take and never
//! touches the database. Everything it reports is an atomic or a snapshot.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::http::{full, json, ApiError, Body};
use crate::app::{App, Lifecycle};
use crate::health::checks::Verdict;
use crate::health::watchdog::{Published, WatchdogMode};
use crate::init::rlimit::RlimitOutcome;
use crate::server::stats::AcceptSnapshot;

fn has_query_flag<B>(req: &Request<B>, name: &str) -> bool {
    req.uri().query().is_some_and(|q| {
        q.split('&').any(|kv| {
            kv == name
                || kv
                    .strip_prefix(name)
                    .and_then(|r| r.strip_prefix('='))
                    .is_some_and(|v| v == "1" || v == "true")
        })
    })
}

/// Seconds since the epoch for a unix-ms atomic (`None` → null: never).
fn at(ms: u64) -> Option<f64> {
    (ms != 0).then(|| ms as f64 / 1000.0)
}

/// Live gauges: atomics and the cached `/proc` snapshot only.
#[derive(Serialize)]
pub struct Diagnostics {
    thread_count: i64,
    tokio_alive_tasks: i64,
    /// The same figure as `tokio_alive_tasks`, under the name clients of
    /// the original agent server read.
    asyncio_task_count: i64,
    running_executions: usize,
    queued_executions: usize,
    conversation_history_size: usize,
    conversation_history_limit: usize,
    open_fds: i64,
    fd_soft_limit: i64,
    fd_hard_limit: i64,
    rss_bytes: i64,
    store_queue: usize,
    /// Bytes every execution's replay buffer holds together, and their
    /// bound (`stream_replay_total`).
    stream_replay_bytes: usize,
    stream_replay_total: usize,
}

fn diagnostics(app: &App) -> Diagnostics {
    let p = app.health.gauges.get();
    let e = app.executor.gauges();
    let (size, limit) = app.history_gauges();
    let tasks = tokio::runtime::Handle::try_current()
        .map(|h| h.metrics().num_alive_tasks() as i64)
        .unwrap_or(-1);
    Diagnostics {
        thread_count: p.thread_count,
        tokio_alive_tasks: tasks,
        asyncio_task_count: tasks,
        running_executions: e.running,
        queued_executions: e.queued,
        conversation_history_size: size,
        conversation_history_limit: limit,
        open_fds: p.open_fds,
        fd_soft_limit: p.fd_soft,
        fd_hard_limit: p.fd_hard,
        rss_bytes: p.rss_bytes,
        store_queue: app.store.queued(),
        stream_replay_bytes: e.replay_bytes,
        stream_replay_total: e.replay_limit,
    }
}

#[derive(Serialize)]
pub struct WatchdogReport {
    mode: WatchdogMode,
    interval_ms: u64,
    deadline_ms: u64,
    last_tick_at: Option<f64>,
    last_ok_at: Option<f64>,
    consecutive_failures: u32,
    pings_sent: u64,
    ticks: u64,
}

fn watchdog_report(app: &App) -> WatchdogReport {
    let h = &app.health;
    WatchdogReport {
        mode: h.mode,
        interval_ms: h.interval.as_millis() as u64,
        deadline_ms: h.deadline.as_millis() as u64,
        last_tick_at: at(h.last_tick_ms.load(Relaxed)),
        last_ok_at: at(h.last_ok_ms.load(Relaxed)),
        consecutive_failures: h.consecutive_failures.load(Relaxed),
        pings_sent: h.notifier.pings_sent(),
        ticks: h.ticks.load(Relaxed),
    }
}

#[derive(Serialize)]
struct RlimitJson {
    outcome: RlimitOutcome,
    soft: i64,
    hard: i64,
}

#[derive(Serialize)]
struct DeepJson {
    elapsed_ms: f64,
    runs: u64,
}

/// The `/health` body, serialized straight from borrowed values (no JSON
/// tree is built per request; the checks arrive pre-rendered).
#[derive(Serialize)]
struct HealthBody<'a> {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    version: &'static str,
    uptime_seconds: f64,
    accept_loop: AcceptSnapshot,
    diagnostics: Diagnostics,
    watchdog: WatchdogReport,
    rlimit_nofile: RlimitJson,
    /// The configured runtime, its program, and the CLI's version (read once
    /// at start).
    runtime: &'a crate::agent::runtimes::RuntimeReport,
    checks: &'a RawValue,
    /// Leak trends, pre-rendered when the last sample was taken.
    trends: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    deep: Option<DeepJson>,
}

/// What the sentinel adds to a diagnostics bundle: gauges and the last verdict.
pub fn diagnostics_context(app: &App) -> Value {
    let last = app.health.last.load_full();
    json!({
        "diagnostics": diagnostics(app),
        "watchdog": watchdog_report(app),
        "accept_loop": app.stats.snapshot(),
        "last_verdict": last.as_ref().map(|p| &p.checks_json),
    })
}

/// The `status` word of `/health` (and its `detail`) for a verdict: shared
/// with `/metrics` so both always agree.
pub fn verdict_status(
    app: &App,
    verdict: Option<&Verdict>,
    deep: bool,
) -> (&'static str, Option<String>) {
    let mut detail = None;
    let status = match (app.lifecycle(), verdict) {
        (Lifecycle::Stopping, _) => "stopping",
        (_, Some(v)) if !v.passed() => {
            detail = v
                .first_failure()
                .map(|(name, r)| format!("{name}: {}", r.detail.as_deref().unwrap_or("failed")));
            "degraded"
        }
        (_, _) if !deep && app.health.stale() => {
            detail = Some("health loop stale".to_owned());
            "degraded"
        }
        (Lifecycle::Starting, _) if !deep => "starting",
        (_, None) => "starting",
        (_, Some(_)) => "healthy",
    };
    (status, detail)
}

/// `GET /health` (and `?probe=1`, the self-probe's target: 200 whenever the
/// accept loop and a handler run, whatever the verdict; `?deep=1` runs the
/// checks now, single-flight).
pub async fn get(app: &Arc<App>, req: &Request<Incoming>) -> Response<Body> {
    if has_query_flag(req, "probe") {
        let mut resp = Response::new(full(Bytes::from_static(b"{\"status\":\"ok\"}")));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        return resp;
    }
    let deep = has_query_flag(req, "deep");
    let published = if deep {
        Some(Arc::new(Published::new(
            app.health.deep().await.as_ref().clone(),
        )))
    } else {
        app.health.last.load_full()
    };
    let verdict = published.as_ref().map(|p| &p.verdict);
    let (status, detail) = verdict_status(app, verdict, deep);
    let code = if status == "healthy" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let r = &app.health.rlimit;
    let empty = RawValue::from_string("{}".to_owned()).expect("valid JSON");
    let trends = app.health.trends.summary_json();
    let body = HealthBody {
        status,
        detail,
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: app.started.elapsed().as_secs_f64(),
        accept_loop: app.stats.snapshot(),
        diagnostics: diagnostics(app),
        watchdog: watchdog_report(app),
        rlimit_nofile: RlimitJson {
            outcome: r.outcome,
            soft: r.soft,
            hard: r.hard,
        },
        runtime: &app.runtime_report,
        checks: published
            .as_ref()
            .map(|p| &*p.checks_json)
            .unwrap_or(&empty),
        trends: &trends,
        deep: deep.then(|| DeepJson {
            elapsed_ms: verdict.map(|v| v.elapsed_ms).unwrap_or(0.0),
            runs: app.health.deep.runs(),
        }),
    };
    json(code, &body)
}

/// `GET /health/trends`: every trend sample in the window, oldest first.
/// Rendered under the trend ring's own lock, which no handler takes.
pub fn trends(app: &App) -> Response<Body> {
    let mut resp = Response::new(full(app.health.trends.samples_json()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// `POST /debug/fault/{kind}`: 404 unless built with `fault-injection`.
pub async fn fault(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    #[cfg(feature = "fault-injection")]
    {
        use crate::faults::FaultError;
        use std::sync::atomic::Ordering;
        let path = req.uri().path().to_owned();
        let kind = path.trim_start_matches("/debug/fault/").to_owned();
        if !app.config.fault_injection || !app.faults.loopback_listener.load(Ordering::SeqCst) {
            return Err(ApiError::NotFound(path));
        }
        if req.method() != http::Method::POST {
            return Err(crate::server::router::not_allowed(&req, "POST"));
        }
        match crate::faults::inject(app, &kind) {
            Ok(()) => Ok(json(
                StatusCode::OK,
                &json!({"fault": kind, "injected": true}),
            )),
            Err(e @ FaultError::Unknown(_)) => Err(ApiError::bad(e.to_string(), "unknown_fault")),
            Err(e @ FaultError::Unavailable(_)) => Err(ApiError::Unavailable(e.to_string())),
        }
    }
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = app;
        Err(ApiError::NotFound(req.uri().path().to_owned()))
    }
}
