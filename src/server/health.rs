//! `GET /health`, `GET /health/trends` and the fault-injection endpoint
//! (`/metrics` is `metrics`).
//!
//! `/health` is cheap by rule: it takes no lock that handlers take and never
//! touches the database. Everything it reports is an atomic or a snapshot;
//! its body is the loop's per-tick rendering with the live gauges spliced in
//! (`health::body`).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::http::{full, ApiError, Body};
use crate::app::{App, Lifecycle};
use crate::health::body::{diagnostics, render_tail, watchdog_report, write_body, Live};
use crate::health::checks::Verdict;
use crate::health::watchdog::Published;

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
    if deep {
        let published = Published::new(app.health.deep().await.as_ref().clone());
        return answer(app, Some(&published), true);
    }
    // A guard, not a clone of the `Arc`: no reference count that every
    // worker's requests would bounce between cores.
    let last = app.health.last.load();
    answer(app, last.as_deref(), false)
}

/// The `/health` answer for `published` (the loop's last verdict, or a deep
/// run's).
fn answer(app: &App, published: Option<&Published>, deep: bool) -> Response<Body> {
    let verdict = published.map(|p| &p.verdict);
    let (status, detail) = verdict_status(app, verdict, deep);
    let code = if status == "healthy" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Live gauges now; the per-tick part as the loop rendered it (a deep
    // run's verdict, or one before the first tick, renders its own).
    let live = Live::read(app);
    let rendered;
    let tail_guard = published.map(Published::tail_guard);
    let tail: &[u8] = match tail_guard.as_ref().and_then(|g| g.as_deref()) {
        Some(tail) => tail,
        None => {
            rendered = render_tail(app, published);
            &rendered
        }
    };
    let deep = deep.then(|| {
        (
            verdict.map(|v| v.elapsed_ms).unwrap_or(0.0),
            app.health.deep.runs(),
        )
    });
    let body = write_body(status, detail.as_deref(), &live, tail, deep);
    let mut resp = Response::new(full(body));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
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
            return Err(super::http::not_allowed(&req, "POST"));
        }
        match inject(app, &kind) {
            Ok(()) => Ok(super::http::json(
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

/// Wedge the named part now (the endpoint above answers first, then calls
/// this).
#[cfg(feature = "fault-injection")]
fn inject(app: &Arc<App>, kind: &str) -> Result<(), crate::faults::FaultError> {
    use crate::faults::FaultError;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    tracing::warn!(fault = %kind, "fault injection requested");
    match kind {
        "block-runtime" => {
            // Occupy every worker thread with a blocking wait, after this answer
            // had time to leave.
            let workers = tokio::runtime::Handle::current().metrics().num_workers();
            for _ in 0..workers + 1 {
                tokio::spawn(async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    loop {
                        std::thread::park();
                    }
                });
            }
        }
        "deadlock-state" => {
            let app = app.clone();
            tokio::spawn(async move {
                let _held = app.state.lock().await;
                std::future::pending::<()>().await;
            });
        }
        "stall-accept" => app.faults.stall_accept(),
        "hang-store" => {
            if !app.store.inject_hang() {
                return Err(FaultError::Unavailable("store queue is full".into()));
            }
        }
        "exhaust-fds" => {
            let mut leaked = 0usize;
            while let Ok(f) = std::fs::File::open("/dev/null") {
                std::mem::forget(f);
                leaked += 1;
            }
            tracing::warn!(leaked, "fault injection: file descriptors exhausted");
        }
        "stall-executor" => {
            app.executor.stall();
            // Queue work so the stall is observable.
            let _ = app.executor.submit(crate::agent::executor::Submission {
                kind: crate::agent::runtime::ExecutionKind::Task,
                session_id: "fault-injection".into(),
                prompt: "stalled".into(),
                timeout: Duration::from_secs(1),
                cli_session: None,
                transcript: None,
            });
        }
        "leak-fd-per-tick" => app.faults.leak_fd_per_tick.store(true, Ordering::SeqCst),
        _ => return Err(FaultError::Unknown(kind.to_owned())),
    }
    Ok(())
}
