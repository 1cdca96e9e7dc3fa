//! Bad input, table-driven, over raw TCP sockets: malformed and truncated
//! JSON, wrong types for every field, invalid UTF-8, `%00` and `../`,
//! conflicting lengths, bad chunking, request smuggling, huge and many
//! headers, old and unknown protocol versions, garbage, a TLS ClientHello,
//! bad tokens, every method on every route, bad `limit`/`timeout_s`.
//!
//! Each case must get a clear 4xx with the JSON error shape (or, where HTTP
//! itself is broken, a closed connection), `/health` must answer 200 after
//! it, and when the table is done nothing may have been stored or started.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{get, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "bad-input-token-0123456789";
/// Bound of one case's exchange.
const CASE_BOUND: Duration = Duration::from_secs(5);

/// One parsed answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// What came back on one connection.
#[derive(Debug)]
struct Exchange {
    answers: Vec<Answer>,
    /// The server closed the connection within the bound.
    closed: bool,
}

/// Parse every complete response in `buf` (content-length framed).
fn parse_answers(buf: &[u8], eof: bool) -> Vec<Answer> {
    let mut out = Vec::new();
    let mut rest = buf;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let len = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        });
        let body_start = end + 4;
        let body_len = match len {
            Some(n) => n,
            None if eof => rest.len() - body_start,
            None => break,
        };
        if rest.len() < body_start + body_len {
            break;
        }
        out.push(Answer {
            status,
            head,
            body: rest[body_start..body_start + body_len].to_vec(),
        });
        rest = &rest[body_start + body_len..];
    }
    out
}

/// Send `bytes` on a fresh connection (optionally half-closing after), then
/// read until one answer arrived (or, with `until_eof`, until the server
/// closes), within `CASE_BOUND`.
async fn exchange(addr: SocketAddr, bytes: &[u8], half_close: bool, until_eof: bool) -> Exchange {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // The server may answer and close before it read everything (431 on a
    // huge header): a failed write is part of the outcome, not a test error.
    let _ = tokio::time::timeout(CASE_BOUND, s.write_all(bytes)).await;
    if half_close {
        let _ = s.shutdown().await;
    }
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let deadline = tokio::time::Instant::now() + CASE_BOUND;
    let mut closed = false;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break,
        }
        if !until_eof && !parse_answers(&buf, false).is_empty() {
            break;
        }
    }
    Exchange {
        answers: parse_answers(&buf, closed),
        closed,
    }
}

/// A well-framed request with Host, the token and `Connection: close`.
fn req(method: &str, path: &str, extra: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TOKEN}\r\n\
         Connection: close\r\n"
    );
    for (k, v) in extra {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn chat(body: &str) -> Vec<u8> {
    req("POST", "/api/chat", &[], body.as_bytes())
}

fn task(body: &str) -> Vec<u8> {
    req("POST", "/api/task", &[], body.as_bytes())
}

fn get_req(path: &str) -> Vec<u8> {
    req("GET", path, &[], b"")
}

fn with_auth(path: &str, auth: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// What a case must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// This status with this `error.code`.
    Error(u16, &'static str),
    /// This status, any error code (the JSON shape is still checked).
    Status(u16),
    /// Either a 4xx with the JSON shape or a connection closed without an
    /// answer: HTTP itself is broken.
    RefusedOrClosed,
    /// Exactly one answer with this status, then the connection closes (no
    /// smuggled second request is ever served).
    OneThenClosed(u16),
}

struct Case {
    name: String,
    bytes: Vec<u8>,
    half_close: bool,
    expect: Expect,
}

fn case(name: impl Into<String>, bytes: Vec<u8>, expect: Expect) -> Case {
    Case {
        name: name.into(),
        bytes,
        half_close: false,
        expect,
    }
}

fn case_half_closed(name: impl Into<String>, bytes: Vec<u8>, expect: Expect) -> Case {
    Case {
        half_close: true,
        ..case(name, bytes, expect)
    }
}

/// Every 4xx a handler or the HTTP layer produces has `{"error": {"code",
/// "message"}}` with non-empty strings.
fn assert_error_shape(name: &str, a: &Answer) {
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_else(|e| {
        panic!(
            "{name}: {} body is not JSON ({e}): {:?}\n{}",
            a.status,
            String::from_utf8_lossy(&a.body),
            a.head
        )
    });
    let code = v["error"]["code"].as_str().unwrap_or("");
    let message = v["error"]["message"].as_str().unwrap_or("");
    assert!(
        !code.is_empty() && !message.is_empty(),
        "{name}: not the error shape: {v}"
    );
    assert!(
        a.head
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{name}: {}",
        a.head
    );
}

fn error_code(a: &Answer) -> String {
    serde_json::from_slice::<serde_json::Value>(&a.body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn check(c: &Case, x: &Exchange) {
    let name = &c.name;
    match c.expect {
        Expect::Error(status, code) => {
            let a = x
                .answers
                .first()
                .unwrap_or_else(|| panic!("{name}: no answer ({x:?})"));
            assert_eq!(
                a.status,
                status,
                "{name}: {}",
                String::from_utf8_lossy(&a.body)
            );
            assert_error_shape(name, a);
            assert_eq!(error_code(a), code, "{name}");
        }
        Expect::Status(status) => {
            let a = x
                .answers
                .first()
                .unwrap_or_else(|| panic!("{name}: no answer ({x:?})"));
            assert_eq!(
                a.status,
                status,
                "{name}: {}",
                String::from_utf8_lossy(&a.body)
            );
            assert_error_shape(name, a);
        }
        Expect::RefusedOrClosed => match x.answers.first() {
            Some(a) => {
                assert!((400..500).contains(&a.status), "{name}: got {}", a.status);
                assert_error_shape(name, a);
            }
            None => assert!(x.closed, "{name}: neither an answer nor a close"),
        },
        Expect::OneThenClosed(status) => {
            assert_eq!(x.answers.len(), 1, "{name}: answers {:?}", x.answers);
            assert_eq!(x.answers[0].status, status, "{name}");
            assert_error_shape(name, &x.answers[0]);
            assert!(
                x.closed,
                "{name}: the connection stayed open after a smuggling attempt"
            );
        }
    }
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn cases() -> Vec<Case> {
    use Expect::*;
    let mut v = vec![
        // --- malformed, truncated, deeply nested JSON
        case("json: not JSON", chat("{not json"), Error(400, "invalid_json")),
        case("json: truncated", chat(r#"{"message": "hel"#), Error(400, "invalid_json")),
        case("json: truncated after key", chat(r#"{"message""#), Error(400, "invalid_json")),
        case("json: trailing garbage", chat(r#"{"message": "x"} x"#), Error(400, "invalid_json")),
        case("json: empty body", chat(""), Error(400, "invalid_json")),
        case("json: whitespace body", chat("  \n "), Error(400, "invalid_json")),
        case("json: top-level array", chat("[1,2]"), Error(400, "invalid_json")),
        case("json: top-level string", chat(r#""hello""#), Error(400, "invalid_json")),
        case("json: top-level null", chat("null"), Error(400, "invalid_json")),
        case("json: top-level number", chat("42"), Error(400, "invalid_json")),
        case("json: nested 10000 deep", chat(&nested(10_000)), Error(400, "invalid_json")),
        case(
            "json: message nested 5000 deep",
            chat(&format!(r#"{{"message": {}}}"#, nested(5_000))),
            Error(400, "invalid_json"),
        ),
        case("json: single quotes", chat("{'message': 'x'}"), Error(400, "invalid_json")),
        case("json: NaN", chat(r#"{"message": "x", "timeout_s": NaN}"#), Error(400, "invalid_json")),
        // --- wrong types for every field of every body
        case("chat.message number", chat(r#"{"message": 42}"#), Error(400, "invalid_field")),
        case("chat.message bool", chat(r#"{"message": true}"#), Error(400, "invalid_field")),
        case("chat.message null", chat(r#"{"message": null}"#), Status(400)),
        case("chat.message array", chat(r#"{"message": ["x"]}"#), Error(400, "invalid_field")),
        case("chat.message object", chat(r#"{"message": {"a": 1}}"#), Error(400, "invalid_field")),
        case("chat.message missing", chat(r#"{"session_id": "s"}"#), Error(400, "missing_field")),
        case("chat.message blank", chat(r#"{"message": "  "}"#), Error(400, "empty_field")),
        case(
            "chat.session_id number",
            chat(r#"{"message": "x", "session_id": 7}"#),
            Error(400, "invalid_field"),
        ),
        case(
            "chat.session_id array",
            chat(r#"{"message": "x", "session_id": ["s"]}"#),
            Error(400, "invalid_field"),
        ),
        case(
            "chat.session_id object",
            chat(r#"{"message": "x", "session_id": {}}"#),
            Error(400, "invalid_field"),
        ),
        case(
            "chat.session_id ../",
            chat(r#"{"message": "x", "session_id": "../../etc/passwd"}"#),
            Error(400, "invalid_session_id"),
        ),
        case(
            "chat.session_id NUL",
            chat(r#"{"message": "x", "session_id": "a\u0000b"}"#),
            Error(400, "invalid_session_id"),
        ),
        case(
            "chat.session_id too long",
            chat(&format!(r#"{{"message": "x", "session_id": "{}"}}"#, "s".repeat(200))),
            Error(400, "invalid_session_id"),
        ),
        case(
            "chat.timeout_s string",
            chat(r#"{"message": "x", "timeout_s": "10"}"#),
            Error(400, "invalid_field"),
        ),
        case(
            "chat.timeout_s bool",
            chat(r#"{"message": "x", "timeout_s": true}"#),
            Error(400, "invalid_field"),
        ),
        case(
            "chat.timeout_s zero",
            chat(r#"{"message": "x", "timeout_s": 0}"#),
            Error(400, "invalid_field"),
        ),
        case(
            "chat.timeout_s negative",
            chat(r#"{"message": "x", "timeout_s": -1}"#),
            Error(400, "invalid_field"),
        ),
        case(
            "chat.timeout_s above the maximum",
            chat(r#"{"message": "x", "timeout_s": 1e12}"#),
            Error(400, "invalid_field"),
        ),
        case(
            "chat.timeout_s huge",
            chat(r#"{"message": "x", "timeout_s": 1e308}"#),
            Error(400, "invalid_field"),
        ),
        case("task.prompt number", task(r#"{"prompt": 1}"#), Error(400, "invalid_field")),
        case("task.prompt null", task(r#"{"prompt": null}"#), Status(400)),
        case("task.prompt array", task(r#"{"prompt": []}"#), Error(400, "invalid_field")),
        case("task.prompt missing", task(r#"{"async": true}"#), Error(400, "missing_field")),
        case(
            "task.async string",
            task(r#"{"prompt": "x", "async": "yes"}"#),
            Error(400, "invalid_field"),
        ),
        case(
            "task.async number",
            task(r#"{"prompt": "x", "async": 1}"#),
            Error(400, "invalid_field"),
        ),
        case(
            "task.timeout_s string",
            task(r#"{"prompt": "x", "timeout_s": "x", "async": true}"#),
            Error(400, "invalid_field"),
        ),
        case(
            "task.timeout_s negative",
            task(r#"{"prompt": "x", "timeout_s": -5, "async": true}"#),
            Error(400, "invalid_field"),
        ),
        case("task: malformed", task("{\"prompt\": "), Error(400, "invalid_json")),
        // --- invalid UTF-8 in body, path, query
        case(
            "utf8: body",
            req("POST", "/api/chat", &[], b"{\"message\": \"\xff\xfe\"}"),
            Error(400, "invalid_utf8"),
        ),
        case(
            "utf8: raw bytes in path",
            b"GET /api/chat/\xff\xfe HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(),
            RefusedOrClosed,
        ),
        case(
            "utf8: percent-encoded in query",
            get_req("/api/chat/history?session_id=%FF%FE"),
            Error(400, "invalid_session_id"),
        ),
        case(
            "utf8: percent-encoded in execution id",
            get_req("/api/executions/%FF%FE"),
            Error(404, "not_found"),
        ),
        // --- %00 and ../ in paths and ids
        case("path: %00 in route", get_req("/api/chat%00"), Error(404, "not_found")),
        case("path: %00 as execution id", get_req("/api/executions/%00"), Error(404, "not_found")),
        case(
            "path: %00 in session_id",
            get_req("/api/chat/history?session_id=a%00b"),
            Error(400, "invalid_session_id"),
        ),
        case("path: ../ out of /api", get_req("/api/../health"), Error(404, "not_found")),
        case(
            "path: ../ as execution id",
            get_req("/api/executions/../../etc/passwd"),
            Error(404, "not_found"),
        ),
        case(
            "path: encoded ../ as execution id",
            get_req("/api/executions/..%2F..%2Fetc%2Fpasswd"),
            Error(404, "not_found"),
        ),
        case(
            "path: ../ in terminate id",
            req("POST", "/api/executions/../terminate", &[], b""),
            Error(404, "not_found"),
        ),
        case(
            "path: ../ in session_id of DELETE",
            req("DELETE", "/api/chat/history?session_id=../x", &[], b""),
            Error(400, "invalid_session_id"),
        ),
        case(
            "path: space in session_id of DELETE",
            req("DELETE", "/api/chat/history?session_id=%20", &[], b""),
            Error(400, "invalid_session_id"),
        ),
        // --- Content-Length
        case(
            "length: two different Content-Length",
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Length: 5\r\nContent-Length: 16\r\n\r\n{{\"message\":\"x\"}}"
            )
            .into_bytes(),
            Error(400, "bad_request"),
        ),
        case(
            "length: not a number",
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Length: abc\r\n\r\n{{}}"
            )
            .into_bytes(),
            Error(400, "bad_request"),
        ),
        case(
            "length: negative",
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Length: -1\r\n\r\n{{}}"
            )
            .into_bytes(),
            Error(400, "bad_request"),
        ),
        case(
            "length: declared over the body limit",
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 2000000\r\n\r\n{{\"message\":"
            )
            .into_bytes(),
            Error(413, "payload_too_large"),
        ),
        case_half_closed(
            "length: body shorter than declared",
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Length: 100\r\n\r\n{{\"message\": \"x\"}}"
            )
            .into_bytes(),
            RefusedOrClosed,
        ),
        // --- chunking
        case(
            "chunked: size not hex",
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Transfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
            )
            .into_bytes(),
            RefusedOrClosed,
        ),
        case_half_closed(
            "chunked: truncated chunk",
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Transfer-Encoding: chunked\r\n\r\n40\r\n{{\"message\": \"x\"}}"
            )
            .into_bytes(),
            RefusedOrClosed,
        ),
        case(
            "chunked: size overflows",
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nx\r\n0\r\n\r\n"
            )
            .into_bytes(),
            RefusedOrClosed,
        ),
        case(
            "chunked: not the last encoding",
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
            Error(400, "bad_request"),
        ),
        case(
            "chunked: unknown encoding",
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
            Error(400, "bad_request"),
        ),
        case(
            "chunked: in HTTP/1.0",
            format!(
                "POST /api/chat HTTP/1.0\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
            Error(400, "bad_request"),
        ),
        case(
            "chunked: space before the colon",
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
            Error(400, "bad_request"),
        ),
        // --- smuggling: the second request must never be served
        case(
            "smuggling: CL.TE",
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
                 POST /api/chat HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Length: 19\r\n\r\n{{\"message\":\"smug1\"}}"
            )
            .into_bytes(),
            OneThenClosed(400),
        ),
        case(
            "smuggling: TE.CL",
            format!(
                "POST /api/chat HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n\
                 8\r\nSMUGGLED\r\n0\r\n\r\n\
                 POST /api/chat HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Length: 19\r\n\r\n{{\"message\":\"smug2\"}}"
            )
            .into_bytes(),
            OneThenClosed(400),
        ),
        // --- headers: huge, many, Host
        case(
            "headers: one 100 KB header",
            format!(
                "GET /health HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
                "a".repeat(100_000)
            )
            .into_bytes(),
            Error(431, "headers_too_large"),
        ),
        case(
            "headers: one 1 MB header",
            format!(
                "GET /health HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
                "a".repeat(1 << 20)
            )
            .into_bytes(),
            RefusedOrClosed,
        ),
        case(
            "headers: 200 small headers",
            format!(
                "GET /health HTTP/1.1\r\nHost: t\r\n{}\r\n",
                (0..200).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()
            )
            .into_bytes(),
            Error(431, "headers_too_large"),
        ),
        case(
            "headers: 70 KB request target",
            format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(70_000)).into_bytes(),
            Error(431, "headers_too_large"),
        ),
        case(
            "headers: no Host in HTTP/1.1",
            b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(),
            Error(400, "bad_host"),
        ),
        case(
            "headers: two Host fields",
            b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n".to_vec(),
            Error(400, "bad_host"),
        ),
        case(
            "headers: two Host fields in HTTP/1.0",
            b"GET /health HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n".to_vec(),
            Error(400, "bad_host"),
        ),
        case(
            "headers: no colon",
            b"GET /health HTTP/1.1\r\nHost: t\r\nNoColonHere\r\n\r\n".to_vec(),
            Error(400, "bad_request"),
        ),
        case(
            "headers: NUL in a value",
            b"GET /health HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n".to_vec(),
            Error(400, "bad_request"),
        ),
        // --- protocol versions, garbage, TLS
        case(
            "version: HTTP/0.9",
            b"GET /health\r\n\r\n".to_vec(),
            RefusedOrClosed,
        ),
        case(
            "version: HTTP/1.2",
            b"GET /health HTTP/1.2\r\nHost: t\r\n\r\n".to_vec(),
            Error(400, "bad_request"),
        ),
        case(
            "version: HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            RefusedOrClosed,
        ),
        case(
            "version: HTTP/3.0",
            b"GET /health HTTP/3.0\r\nHost: t\r\n\r\n".to_vec(),
            Error(400, "bad_request"),
        ),
        case("garbage: text", b"hello there\r\n\r\n".to_vec(), RefusedOrClosed),
        case(
            "garbage: binary",
            (0u8..=255).cycle().take(4096).collect(),
            RefusedOrClosed,
        ),
        // Empty lines before a request are allowed (RFC 9112 §2.2): the server
        // waits for the request and closes at end of input.
        case_half_closed("garbage: blank lines only", b"\r\n\r\n\r\n\r\n".to_vec(), RefusedOrClosed),
        case_half_closed("garbage: NUL bytes", vec![0u8; 512], RefusedOrClosed),
        case("garbage: TLS ClientHello", tls_client_hello(), RefusedOrClosed),
        case(
            "method: lower case",
            b"get /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(),
            Status(405),
        ),
        case(
            "method: unknown",
            req("BREW", "/api/chat", &[], b""),
            Error(405, "method_not_allowed"),
        ),
        // --- tokens
        case(
            "token: missing",
            b"GET /api/chat/history HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(),
            Error(401, "unauthorized"),
        ),
        case(
            "token: wrong",
            with_auth("/api/chat/history", "Bearer not-the-token-at-all-123"),
            Error(401, "unauthorized"),
        ),
        case(
            "token: last character off",
            with_auth("/api/chat/history", &format!("Bearer {}X", &TOKEN[..TOKEN.len() - 1])),
            Error(401, "unauthorized"),
        ),
        case(
            "token: first character off",
            with_auth("/api/chat/history", &format!("Bearer X{}", &TOKEN[1..])),
            Error(401, "unauthorized"),
        ),
        case(
            "token: one character short",
            with_auth("/api/chat/history", &format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
            Error(401, "unauthorized"),
        ),
        case(
            "token: one character extra",
            with_auth("/api/chat/history", &format!("Bearer {TOKEN}x")),
            Error(401, "unauthorized"),
        ),
        case(
            "token: Basic scheme",
            with_auth("/api/chat/history", &format!("Basic {TOKEN}")),
            Error(401, "unauthorized"),
        ),
        case(
            "token: no scheme",
            with_auth("/api/chat/history", TOKEN),
            Error(401, "unauthorized"),
        ),
        case(
            "token: scheme only",
            with_auth("/api/chat/history", "Bearer"),
            Error(401, "unauthorized"),
        ),
        case(
            "token: in the query instead",
            format!(
                "GET /api/chat/history?access_token={TOKEN} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
            .into_bytes(),
            Error(401, "unauthorized"),
        ),
        case(
            "token: missing on a write",
            b"POST /api/chat HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\
              Content-Length: 19\r\n\r\n{\"message\":\"nope1\"}"
                .to_vec(),
            Error(401, "unauthorized"),
        ),
        // --- limit and timeout_s in queries
        case("limit: 0", get_req("/api/chat/history?limit=0"), Error(400, "invalid_query")),
        case("limit: negative", get_req("/api/chat/history?limit=-1"), Error(400, "invalid_query")),
        case("limit: text", get_req("/api/chat/history?limit=abc"), Error(400, "invalid_query")),
        case("limit: fraction", get_req("/api/chat/history?limit=1.5"), Error(400, "invalid_query")),
        case("limit: empty", get_req("/api/chat/history?limit="), Error(400, "invalid_query")),
        case(
            "limit: overflows u64",
            get_req("/api/chat/history?limit=99999999999999999999999"),
            Error(400, "invalid_query"),
        ),
        case("limit: exponent", get_req("/api/chat/history?limit=1e3"), Error(400, "invalid_query")),
        case(
            "limit: %00",
            get_req("/api/chat/history?limit=1%00"),
            Error(400, "invalid_query"),
        ),
    ];
    // --- every method on every route (the allowed ones are not bad input)
    let routes: [(&str, &[&str]); 10] = [
        ("/api/chat", &["POST"]),
        ("/api/chat/history", &["GET", "DELETE"]),
        ("/api/chat/session", &["GET"]),
        ("/api/task", &["POST"]),
        ("/api/executions/running", &["GET"]),
        ("/api/executions/some-id", &["GET"]),
        ("/api/executions/some-id/stream", &["GET"]),
        ("/api/executions/some-id/terminate", &["POST"]),
        ("/health", &["GET", "HEAD"]),
        ("/metrics", &["GET"]),
    ];
    for (path, allowed) in routes {
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"] {
            if !allowed.contains(&method) {
                v.push(case(
                    format!("method: {method} {path}"),
                    req(method, path, &[], b""),
                    Error(405, "method_not_allowed"),
                ));
            }
        }
    }
    v
}

/// The start of a TLS 1.2 ClientHello, as a client speaking HTTPS to an
/// HTTP port sends it.
fn tls_client_hello() -> Vec<u8> {
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
    ];
    hello.extend((0u8..32).map(|i| i.wrapping_mul(7)));
    hello.extend([
        0x00, 0x00, 0x20, 0xc0, 0x2b, 0xc0, 0x2f, 0x00, 0x9e, 0x01, 0x00,
    ]);
    hello.resize(170, 0);
    hello
}

#[tokio::test]
async fn every_bad_request_gets_a_clear_4xx_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[("AGENTD_API_TOKEN", TOKEN)], dir.path()).await;
    let a = server.addr;
    // One real exchange, so "nothing changed" has something to compare with.
    let first = exchange(a, &chat(r#"{"message": "keep me"}"#), false, false).await;
    assert_eq!(first.answers[0].status, 200, "{first:?}");
    let started_before = server.app.executor.gauges().started_total;

    let cases = cases();
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    // Every case runs; the mismatches are reported together.
    let mut failures = Vec::new();
    for c in &cases {
        let until_eof = matches!(c.expect, Expect::OneThenClosed(_));
        let x = exchange(a, &c.bytes, c.half_close, until_eof).await;
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(c, &x)))
        {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(why);
        }
        let h = get(a, "/health").await;
        assert_eq!(h.status, 200, "/health after {}: {}", c.name, h.text());
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // Nothing stored, nothing started.
    let history = exchange(a, &get_req("/api/chat/history"), false, false).await;
    let h: serde_json::Value = serde_json::from_slice(&history.answers[0].body).unwrap();
    assert_eq!(h["size"], 2, "bad requests changed the history: {h}");
    let contents: Vec<&str> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["content"].as_str())
        .collect();
    assert_eq!(contents, ["keep me", "keep me"]);
    let sessions = exchange(a, &get_req("/api/chat/session"), false, false).await;
    let s: serde_json::Value = serde_json::from_slice(&sessions.answers[0].body).unwrap();
    assert_eq!(
        s["total_messages"], 2,
        "bad requests changed the store: {s}"
    );
    assert_eq!(
        server.app.executor.gauges().started_total,
        started_before,
        "a bad request started an execution"
    );
    eprintln!("{} bad-input cases passed", cases.len());
    server.stop().await;
}

/// The bearer scheme is case-insensitive (RFC 9110 §11.1).
#[tokio::test]
async fn bearer_scheme_in_any_case_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[("AGENTD_API_TOKEN", TOKEN)], dir.path()).await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let x = exchange(
            server.addr,
            &with_auth("/api/chat/history", &format!("{scheme} {TOKEN}")),
            false,
            false,
        )
        .await;
        assert_eq!(x.answers[0].status, 200, "{scheme}: {x:?}");
    }
    server.stop().await;
}

/// HTTP/1.0 may omit Host (RFC 9112 §3.2 requires it of HTTP/1.1 only).
#[tokio::test]
async fn http_1_0_without_host_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[], dir.path()).await;
    let x = exchange(server.addr, b"GET /health HTTP/1.0\r\n\r\n", false, true).await;
    assert_eq!(x.answers[0].status, 200, "{x:?}");
    server.stop().await;
}

/// `DELETE /api/chat/history?session_id=` (an empty value) must be refused,
/// not read as "every session".
#[tokio::test]
async fn delete_with_an_empty_session_id_is_refused_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[("AGENTD_API_TOKEN", TOKEN)], dir.path()).await;
    let a = server.addr;
    let first = exchange(a, &chat(r#"{"message": "keep me"}"#), false, false).await;
    assert_eq!(first.answers[0].status, 200);
    let x = exchange(
        a,
        &req("DELETE", "/api/chat/history?session_id=", &[], b""),
        false,
        false,
    )
    .await;
    let answer = &x.answers[0];
    assert_eq!(
        answer.status,
        400,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_error_shape("empty session_id", answer);
    let sessions = exchange(a, &get_req("/api/chat/session"), false, false).await;
    let s: serde_json::Value = serde_json::from_slice(&sessions.answers[0].body).unwrap();
    assert_eq!(s["total_messages"], 2, "{s}");
    server.stop().await;
}
