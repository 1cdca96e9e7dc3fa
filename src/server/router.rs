//! Routing: path + method → handler, the `Host` rule, the bearer-token gate on
//! `/api/*`, and 404/405 answers. Every handler error becomes a response here,
//! in one place.

use std::sync::Arc;

use http::{header, Method, Request, Response, Version};
use hyper::body::Incoming;
use subtle::ConstantTimeEq;

use super::http::{not_allowed, ApiError, Body};
use super::{api, executions, health, metrics, status};
use crate::app::App;

pub async fn route(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    if let Err(e) = check_host(&req) {
        return e.into_response();
    }
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
            Method::GET => Ok(metrics::metrics(app)),
            _ => Err(not_allowed(&req, "GET")),
        }
    } else if path == "/status" {
        // Outside the token gate on purpose: see `status`.
        match *req.method() {
            Method::GET | Method::HEAD => Ok(status::page()),
            _ => Err(not_allowed(&req, "GET, HEAD")),
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
                (Some((id, tail)), Method::POST) if tail.starts_with("permissions/") => {
                    let (id, request_id) = (id.to_owned(), tail["permissions/".len()..].to_owned());
                    executions::answer_permission(app, &id, &request_id, req).await
                }
                _ => Err(ApiError::NotFound(path)),
            }
        }
        _ => Err(ApiError::NotFound(path)),
    }
}

/// RFC 9112 §3.2: a server must answer 400 to an HTTP/1.1 request without a
/// `Host` field, and to any request with more than one. (HTTP/1.0 clients may
/// omit it.)
fn check_host<B>(req: &Request<B>) -> Result<(), ApiError> {
    let hosts = req.headers().get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(ApiError::bad(
            format!("{hosts} Host header fields; a request must carry exactly one"),
            "bad_host",
        ));
    }
    if hosts == 0 && req.version() == Version::HTTP_11 {
        return Err(ApiError::bad(
            "missing Host header field (required in HTTP/1.1)",
            "bad_host",
        ));
    }
    Ok(())
}

/// The credentials of an `Authorization: Bearer <token>` value. The scheme
/// is case-insensitive (RFC 9110 §11.1): `bearer` and `BEARER` are `Bearer`.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
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
        .and_then(bearer_token)
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_other_schemes_are_not_bearer() {
        for v in ["Bearer abc", "bearer abc", "BEARER abc", "bEaReR   abc  "] {
            assert_eq!(bearer_token(v), Some("abc"), "{v:?}");
        }
        for v in ["Basic abc", "Bearerabc", "Token abc", "abc", ""] {
            assert_eq!(bearer_token(v), None, "{v:?}");
        }
    }

    #[test]
    fn host_must_appear_once_in_http_1_1() {
        let req = |version, hosts: &[&str]| {
            let mut b = Request::builder().uri("/health").version(version);
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            b.body(()).unwrap()
        };
        assert!(check_host(&req(Version::HTTP_11, &["a"])).is_ok());
        assert!(check_host(&req(Version::HTTP_11, &[])).is_err());
        assert!(check_host(&req(Version::HTTP_11, &["a", "b"])).is_err());
        assert!(check_host(&req(Version::HTTP_10, &[])).is_ok());
        assert!(check_host(&req(Version::HTTP_10, &["a", "a"])).is_err());
    }
}
