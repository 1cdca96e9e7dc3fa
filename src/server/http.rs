//! HTTP plumbing shared by every handler: the response body type, JSON
//! responses, bounded body reading, and `ApiError`, the one place where errors
//! become status codes and `{"error": {"code", "message"}}` bodies.

use std::convert::Infallible;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use thiserror::Error;

use crate::store::StoreError;

pub type Body = BoxBody<Bytes, Infallible>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A JSON response with the given status.
pub fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut resp = Response::new(full(body));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => ApiError::Internal(format!("cannot encode response: {e}")).into_response(),
    }
}

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String, &'static str),
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method {method} is not allowed on {path}; allowed: {allowed}")]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: &'static str,
    },
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("{message}")]
    TooManyRequests { message: String, retry_after_s: u64 },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    /// 507: the write could not be stored for lack of space.
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad(message: impl Into<String>, code: &'static str) -> Self {
        ApiError::BadRequest(message.into(), code)
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(..) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::InsufficientStorage(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_, code) => code,
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::TooManyRequests { .. } => "too_many_requests",
            ApiError::Conflict(_) => "conflict",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::InsufficientStorage(_) => "disk_full",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}});
        let mut resp = json(self.status(), &body);
        match &self {
            ApiError::Unauthorized => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::MethodNotAllowed { allowed, .. } => {
                resp.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allowed));
            }
            ApiError::TooManyRequests { retry_after_s, .. } => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
            }
            ApiError::Unavailable(_) => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Busy(_)
            | StoreError::Stopped
            | StoreError::NoAnswer(_)
            | StoreError::Lost(_)
            | StoreError::Corrupt(_)
            | StoreError::Unwritable(_)
            | StoreError::Locked(_) => ApiError::Unavailable(e.to_string()),
            StoreError::DiskFull(_) => ApiError::InsufficientStorage(format!(
                "not stored: {e}; free space in the state directory"
            )),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// Read the whole body, refusing more than `limit` bytes (413). A declared
/// `Content-Length` over the limit is refused before reading anything.
pub async fn read_body(
    body: Incoming,
    declared: Option<u64>,
    limit: usize,
) -> Result<Bytes, ApiError> {
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::TooLarge(limit)),
        Err(e) => Err(ApiError::bad(
            format!("cannot read request body: {e}"),
            "bad_body",
        )),
    }
}

/// Parse a JSON object body, with errors that say what was wrong.
pub fn parse_json_object(
    bytes: &[u8],
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::bad(
            format!("request body is not valid UTF-8: {e}"),
            "invalid_utf8",
        )
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::bad(
            "request body is empty; expected a JSON object",
            "invalid_json",
        ));
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad(
            "request body must be a JSON object",
            "invalid_json",
        )),
        Err(e) => Err(ApiError::bad(
            format!("malformed JSON: {e}"),
            "invalid_json",
        )),
    }
}

/// 405 for `req`, naming the methods its path allows (`Allow`).
pub fn not_allowed<B>(req: &http::Request<B>, allowed: &'static str) -> ApiError {
    ApiError::MethodNotAllowed {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
        allowed,
    }
}
