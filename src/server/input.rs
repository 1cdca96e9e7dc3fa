//! Reading a request's input: the body as one JSON object within
//! `max_body_bytes`, and the fields every handler validates the same way
//! (required text, optional strings, `timeout_s`), each error a 400 naming
//! the field. Shared by `api` and `executions`, below both.

use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use serde_json::{Map, Value};

use super::http::{parse_json_object, read_body, ApiError};
use crate::app::App;

pub fn optional_string(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ApiError::bad(
            format!("`{field}` must be a string, got {}", type_name(other)),
            "invalid_field",
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `timeout_s`: a positive number of seconds up to the configured maximum.
pub fn timeout_field(obj: &Map<String, Value>, app: &App) -> Result<Duration, ApiError> {
    let max = app.config.runtime.max_timeout;
    match obj.get("timeout_s") {
        None | Some(Value::Null) => Ok(app.config.runtime.default_timeout),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(s) if s > 0.0 && s <= max.as_secs_f64() => Ok(Duration::from_secs_f64(s)),
            _ => Err(ApiError::bad(
                format!(
                    "`timeout_s` must be a number of seconds above 0 and at most {}",
                    max.as_secs()
                ),
                "invalid_field",
            )),
        },
        Some(other) => Err(ApiError::bad(
            format!("`timeout_s` must be a number, got {}", type_name(other)),
            "invalid_field",
        )),
    }
}

/// The required, non-empty text field `field` of a request body.
pub fn required_text(obj: &Map<String, Value>, field: &str) -> Result<String, ApiError> {
    match optional_string(obj, field)? {
        None => Err(ApiError::bad(
            format!("`{field}` is required"),
            "missing_field",
        )),
        Some(s) if s.trim().is_empty() => Err(ApiError::bad(
            format!("`{field}` must not be empty"),
            "empty_field",
        )),
        Some(s) => Ok(s),
    }
}

pub async fn json_body(app: &App, req: Request<Incoming>) -> Result<Map<String, Value>, ApiError> {
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bytes = read_body(req.into_body(), declared, app.config.max_body_bytes).await?;
    parse_json_object(&bytes)
}
