//! Routing: path + method → handler, the bearer-token gate on `/api/*`, and
//! 404/405 answers. Every handler error becomes a response here, in one place.

use std::sync::Arc;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

use super::http::{ApiError, Body};
use super::{api, executions, health};
use crate::app::App;

pub async fn route(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    // `/health` first: it is the hot, cheap path.
    if path == "/health" {
        return match *req.method() {
            Method::GET | Method::HEAD => health::get(app, &req).await,
            _ => not_allowed(&req, "GET, HEAD").into_response(),
        };
    }
    let result = if path.starts_with("/api/") {
        match authorize(app, &req) {
            Ok(()) => api_route(app, req).await,
            Err(e) => Err(e),
        }
    } else if path == "/health/trends" {
        match *req.method() {
            Method::GET => Ok(health::trends(app)),
            _ => Err(not_allowed(&req, "GET")),
        }
    } else if path == "/metrics" {
        match *req.method() {
            Method::GET => Ok(health::metrics(app)),
            _ => Err(not_allowed(&req, "GET")),
        }
    } else if path.starts_with("/debug/fault/") {
        health::fault(app, req).await
    } else {
        Err(ApiError::NotFound(path.to_owned()))
    };
    result.unwrap_or_else(ApiError::into_response)
}

async fn api_route(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (path.as_str(), method) {
        ("/api/chat", Method::POST) => api::chat(app, req).await,
        ("/api/chat", _) => Err(not_allowed(&req, "POST")),
        ("/api/chat/history", Method::GET) => api::history(app, &req).await,
        ("/api/chat/history", Method::DELETE) => api::clear_history(app, &req).await,
        ("/api/chat/history", _) => Err(not_allowed(&req, "GET, DELETE")),
        ("/api/chat/session", Method::GET) => api::sessions(app).await,
        ("/api/chat/session", _) => Err(not_allowed(&req, "GET")),
        ("/api/task", Method::POST) => executions::task(app, req).await,
        ("/api/task", _) => Err(not_allowed(&req, "POST")),
        ("/api/executions/running", Method::GET) => Ok(executions::running(app)),
        ("/api/executions/running", _) => Err(not_allowed(&req, "GET")),
        (p, m) if p.starts_with("/api/executions/") => {
            let rest = &p["/api/executions/".len()..];
            match (rest.split_once('/'), m) {
                (None, Method::GET) => executions::get(app, rest),
                (None, _) => Err(not_allowed(&req, "GET")),
                (Some((id, "stream")), Method::GET) => executions::stream(app, id, req.headers()),
                (Some((_, "stream")), _) => Err(not_allowed(&req, "GET")),
                (Some((id, "terminate")), Method::POST) => executions::terminate(app, id).await,
                (Some((_, "terminate")), _) => Err(not_allowed(&req, "POST")),
                _ => Err(ApiError::NotFound(path)),
            }
        }
        _ => Err(ApiError::NotFound(path)),
    }
}

pub fn not_allowed<B>(req: &Request<B>, allowed: &'static str) -> ApiError {
    ApiError::MethodNotAllowed {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        allowed,
    }
}

/// `Authorization: Bearer <token>` when a token is configured; constant-time
/// comparison so the token cannot be guessed byte by byte.
fn authorize<B>(app: &App, req: &Request<B>) -> Result<(), ApiError> {
    let Some(expected) = app.config.api_token.as_deref() else {
        return Ok(());
    };
    let given = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}
