//! `GET /status`: one self-contained HTML page for people — the verdict, each
//! check, the gauges against their limits and the leak-trend samples as small
//! plots — refreshing itself from `/health` and `/health/trends`.
//!
//! The page is a static asset compiled into the binary (`status.html`): this
//! handler reads nothing, takes no lock and never touches the database, so a
//! wedged server still serves it. All data arrives in the browser from
//! `/health` (the machine interface stays the one source of truth); no external
//! assets, no framework, a little inline CSS and JavaScript.
//!
//! No API token is asked for `/status`: the page holds no data of its own and
//! shows only what `/health` already answers without a token (gauges, check
//! verdicts, never conversation content), so guarding it would protect nothing
//! and would break the "open it in a browser" use.

use bytes::Bytes;
use http::{header, HeaderValue, Response};

use super::http::{full, Body};

/// The page, embedded at build time.
const PAGE: &str = include_str!("status.html");

/// `GET /status`.
pub fn page() -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from_static(PAGE.as_bytes())));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // The page is fixed per build; its data is fetched live.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Nothing may load from elsewhere: the page stays self-contained even if an
    // edit slips in an external URL.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; connect-src 'self'; script-src 'unsafe-inline'; \
             style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::PAGE;

    #[test]
    fn page_loads_nothing_from_elsewhere() {
        for needle in ["http://", "https://", "//cdn", "<link", "src=\""] {
            assert!(!PAGE.contains(needle), "status.html contains {needle:?}");
        }
    }

    #[test]
    fn page_reads_the_health_endpoints() {
        assert!(PAGE.contains(r#"get("health")"#));
        assert!(PAGE.contains(r#"get("health/trends")"#));
    }
}
