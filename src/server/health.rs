//! `GET /health`, `GET /metrics` and the fault-injection endpoint.
//!
//! `/health` is cheap by rule: it takes no lock that handlers take and never
//! touches the database. Everything it reports is an atomic or a snapshot.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::http::{full, json, ApiError, Body};
use crate::app::{App, Lifecycle};

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

/// `GET /health` (and `?probe=1`, the self-probe's target: 200 whenever the
/// accept loop and a handler run, whatever the verdict).
pub async fn get(app: &Arc<App>, req: &Request<Incoming>) -> Response<Body> {
    if has_query_flag(req, "probe") {
        return json(StatusCode::OK, &json!({"status": "ok"}));
    }
    let (size, limit) = app.history_gauges();
    let status = match app.lifecycle() {
        Lifecycle::Starting => "starting",
        Lifecycle::Running => "healthy",
        Lifecycle::Stopping => "stopping",
    };
    let code = if status == "healthy" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        code,
        &json!({
            "status": status,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": app.started.elapsed().as_secs_f64(),
            "accept_loop": app.stats.snapshot(),
            "diagnostics": {
                "conversation_history_size": size,
                "conversation_history_limit": limit,
            },
        }),
    )
}

/// `GET /metrics`: Prometheus text exposition of the same lock-free gauges.
pub fn metrics(app: &Arc<App>) -> Response<Body> {
    let s = &app.stats;
    let (size, limit) = app.history_gauges();
    let mut out = String::with_capacity(1024);
    let mut gauge = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    gauge(
        "agentd_uptime_seconds",
        "gauge",
        "Seconds since start.",
        app.started.elapsed().as_secs_f64(),
    );
    gauge(
        "agentd_connections_total",
        "counter",
        "Connections accepted.",
        s.connections_total.load(Relaxed) as f64,
    );
    gauge(
        "agentd_connections_open",
        "gauge",
        "Connections being served.",
        s.connections_open.load(Relaxed) as f64,
    );
    gauge(
        "agentd_connections_rejected_total",
        "counter",
        "Connections refused at the connection limit.",
        s.connections_rejected.load(Relaxed) as f64,
    );
    gauge(
        "agentd_requests_total",
        "counter",
        "HTTP requests completed.",
        s.requests_total.load(Relaxed) as f64,
    );
    gauge(
        "agentd_accept_errors_total",
        "counter",
        "accept() errors.",
        s.accept_errors.load(Relaxed) as f64,
    );
    gauge(
        "agentd_history_size",
        "gauge",
        "Messages in the in-memory history.",
        size as f64,
    );
    gauge(
        "agentd_history_limit",
        "gauge",
        "Limit of the in-memory history.",
        limit as f64,
    );
    gauge(
        "agentd_store_queue",
        "gauge",
        "Requests waiting for the store thread.",
        app.store.queued() as f64,
    );
    let mut resp = Response::new(full(out));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

/// `POST /debug/fault/{kind}`: 404 unless built with `fault-injection`.
pub async fn fault(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    #[cfg(feature = "fault-injection")]
    {
        crate::faults::inject(app, req).await
    }
    #[cfg(not(feature = "fault-injection"))]
    {
        let _ = app;
        Err(ApiError::NotFound(req.uri().path().to_owned()))
    }
}
