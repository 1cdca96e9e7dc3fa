//! The HTTP API against the real server on port 0: chat, history, sessions,
//! bad input, auth, and the accept loop's limits.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{get, post_json, request, Conn, TestServer};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn chat_round_trip_records_both_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[], dir.path()).await;
    let r = post_json(
        server.addr,
        "/api/chat",
        &json!({"message": "hello agent", "session_id": "s1"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["response"], "hello agent");
    assert_eq!(body["session_id"], "s1");
    assert!(body["execution_id"].as_str().unwrap().len() >= 32);
    assert!(body["metadata"]["duration_ms"].is_u64());
    assert!(body["metadata"]["cost_usd"].is_null());

    let h = get(server.addr, "/api/chat/history?session_id=s1")
        .await
        .json();
    let msgs = h["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(msgs[1]["role"], "assistant");
    assert_eq!(msgs[1]["content"], "hello agent");
    assert!(msgs[0]["timestamp"].as_f64().unwrap() > 1.6e9);
    assert_eq!(h["size"], 2);
    assert_eq!(h["limit"], 1000);

    let s = get(server.addr, "/api/chat/session").await.json();
    assert_eq!(s["total_messages"], 2);
    assert_eq!(s["sessions"][0]["session_id"], "s1");
    server.stop().await;
}

#[tokio::test]
async fn chat_without_session_uses_default_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[], dir.path()).await;
    let r = post_json(server.addr, "/api/chat", &json!({"message": "x"}))
        .await
        .json();
    assert_eq!(r["session_id"], "default");
    server.stop().await;
}

#[tokio::test]
async fn history_keeps_the_newest_messages_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[("AGENT_HISTORY_LIMIT", "3")], dir.path()).await;
    let mut conn = Conn::open(server.addr).await.unwrap();
    for i in 1..=7 {
        let r = conn
            .post_json("/api/chat", &json!({"message": format!("m{i}")}))
            .await;
        assert_eq!(r.status, 200);
    }
    let h = conn.get("/api/chat/history").await.json();
    let got: Vec<(String, String)> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().into(),
                m["content"].as_str().unwrap().into(),
            )
        })
        .collect();
    // 7 chats = 14 messages; the newest three are m6's reply and all of m7.
    assert_eq!(
        got,
        [
            ("assistant".to_string(), "m6".to_string()),
            ("user".into(), "m7".into()),
            ("assistant".into(), "m7".into())
        ]
    );
    assert_eq!(h["size"], 3);
    assert_eq!(h["limit"], 3);
    // The store keeps everything (retention is separate from the memory limit).
    let s = conn.get("/api/chat/session").await.json();
    assert_eq!(s["total_messages"], 14);
    drop(conn);
    server.stop().await;
}

#[tokio::test]
async fn history_survives_a_restart_on_the_same_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[("AGENT_HISTORY_LIMIT", "4")], dir.path()).await;
    for i in 0..5 {
        post_json(
            server.addr,
            "/api/chat",
            &json!({"message": format!("r{i}"), "session_id": "keep"}),
        )
        .await;
    }
    let before = get(server.addr, "/api/chat/history").await.json();
    server.stop().await;

    let server = TestServer::start(&[("AGENT_HISTORY_LIMIT", "4")], dir.path()).await;
    let after = get(server.addr, "/api/chat/history").await.json();
    assert_eq!(before["messages"], after["messages"]);
    assert_eq!(after["messages"].as_array().unwrap().len(), 4);
    assert_eq!(after["messages"][3]["content"], "r4");
    server.stop().await;
}

#[tokio::test]
async fn invalid_history_limit_falls_back_to_default() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["abc", "0", "-3", "2.5"] {
        let server = TestServer::start(&[("AGENT_HISTORY_LIMIT", bad)], dir.path()).await;
        let h = get(server.addr, "/health").await.json();
        assert_eq!(
            h["diagnostics"]["conversation_history_limit"], 1000,
            "value {bad}"
        );
        assert!(server
            .app
            .config
            .warnings
            .iter()
            .any(|w| w.contains("AGENT_HISTORY_LIMIT")));
        server.stop().await;
    }
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[("AGENTD_MAX_BODY_BYTES", "1024")], dir.path()).await;
    let a = server.addr;
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "POST",
            "/api/chat",
            b"{not json".to_vec(),
            400,
            "invalid_json",
        ),
        ("POST", "/api/chat", b"[1,2]".to_vec(), 400, "invalid_json"),
        ("POST", "/api/chat", b"".to_vec(), 400, "invalid_json"),
        (
            "POST",
            "/api/chat",
            br#"{"message": 42}"#.to_vec(),
            400,
            "invalid_field",
        ),
        (
            "POST",
            "/api/chat",
            br#"{"message": "x", "session_id": 7}"#.to_vec(),
            400,
            "invalid_field",
        ),
        (
            "POST",
            "/api/chat",
            br#"{"message": "x", "session_id": "a b"}"#.to_vec(),
            400,
            "invalid_session_id",
        ),
        (
            "POST",
            "/api/chat",
            br#"{"message": "x", "timeout_s": -1}"#.to_vec(),
            400,
            "invalid_field",
        ),
        (
            "POST",
            "/api/chat",
            br#"{"message": "x", "timeout_s": "soon"}"#.to_vec(),
            400,
            "invalid_field",
        ),
        (
            "POST",
            "/api/chat",
            br#"{"session_id": "s"}"#.to_vec(),
            400,
            "missing_field",
        ),
        (
            "POST",
            "/api/chat",
            br#"{"message": "   "}"#.to_vec(),
            400,
            "empty_field",
        ),
        (
            "POST",
            "/api/chat",
            b"{\"message\": \"\xff\xfe\"}".to_vec(),
            400,
            "invalid_utf8",
        ),
        (
            "POST",
            "/api/chat",
            format!(r#"{{"message": "{}"}}"#, "x".repeat(2000)).into_bytes(),
            413,
            "payload_too_large",
        ),
        ("GET", "/api/nope", vec![], 404, "not_found"),
        ("GET", "/nope", vec![], 404, "not_found"),
        ("GET", "/api/chat", vec![], 405, "method_not_allowed"),
        (
            "PUT",
            "/api/chat/history",
            vec![],
            405,
            "method_not_allowed",
        ),
        ("POST", "/health", vec![], 405, "method_not_allowed"),
        (
            "GET",
            "/api/chat/history?limit=0",
            vec![],
            400,
            "invalid_query",
        ),
        (
            "GET",
            "/api/chat/history?limit=abc",
            vec![],
            400,
            "invalid_query",
        ),
        (
            "GET",
            "/api/chat/history?session_id=..%2F..",
            vec![],
            400,
            "invalid_session_id",
        ),
        (
            "DELETE",
            "/api/chat/history?session_id=%20",
            vec![],
            400,
            "invalid_session_id",
        ),
    ];
    post_json(a, "/api/chat", &json!({"message": "keep me"})).await;
    for (method, path, body, status, code) in cases {
        let r = request(
            a,
            method,
            path,
            &[("content-type", "application/json")],
            body,
        )
        .await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        let e = r.json();
        assert_eq!(e["error"]["code"], code, "{method} {path}: {e}");
        assert!(!e["error"]["message"].as_str().unwrap().is_empty());
    }
    let h = get(a, "/api/chat/history").await.json();
    assert_eq!(h["size"], 2, "bad requests must not change history");
    let s = get(a, "/api/chat/session").await.json();
    assert_eq!(
        s["total_messages"], 2,
        "bad requests must not change the store"
    );
    let r = request(a, "GET", "/api/chat", &[], Bytes::new()).await;
    assert_eq!(r.headers["allow"], "POST");
    server.stop().await;
}

#[tokio::test]
async fn delete_history_clears_memory_and_store_per_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[], dir.path()).await;
    for s in ["a", "a", "b"] {
        post_json(
            server.addr,
            "/api/chat",
            &json!({"message": "x", "session_id": s}),
        )
        .await;
    }
    let r = request(
        server.addr,
        "DELETE",
        "/api/chat/history?session_id=a",
        &[],
        Bytes::new(),
    )
    .await
    .json();
    assert_eq!(r["cleared"], 4);
    assert_eq!(r["deleted"], 4);
    let s = get(server.addr, "/api/chat/session").await.json();
    assert_eq!(s["total_messages"], 2);
    let r = request(
        server.addr,
        "DELETE",
        "/api/chat/history",
        &[],
        Bytes::new(),
    )
    .await
    .json();
    assert_eq!(r["deleted"], 2);
    assert_eq!(
        get(server.addr, "/api/chat/history").await.json()["size"],
        0
    );
    server.stop().await;
}

#[tokio::test]
async fn bearer_token_guards_api_but_not_health() {
    let dir = tempfile::tempdir().unwrap();
    let token = "s3cret-token-0123456789";
    let server = TestServer::start(&[("AGENTD_API_TOKEN", token)], dir.path()).await;
    let a = server.addr;
    let none = post_json(a, "/api/chat", &json!({"message": "x"})).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.headers["www-authenticate"], "Bearer");
    let wrong = request(
        a,
        "GET",
        "/api/chat/history",
        &[("authorization", "Bearer nope")],
        Bytes::new(),
    )
    .await;
    assert_eq!(wrong.status, 401);
    let mut ok = Conn::open(a).await.unwrap().with_token(token);
    assert_eq!(
        ok.post_json("/api/chat", &json!({"message": "x"}))
            .await
            .status,
        200
    );
    assert_eq!(get(a, "/health").await.status, 200);
    // Unauthorized requests changed nothing.
    assert_eq!(ok.get("/api/chat/history").await.json()["size"], 2);
    drop(ok);
    server.stop().await;

    // Without a token, no header is needed.
    let server = TestServer::start(&[], dir.path()).await;
    assert_eq!(
        post_json(server.addr, "/api/chat", &json!({"message": "y"}))
            .await
            .status,
        200
    );
    server.stop().await;
}

#[tokio::test]
async fn over_the_connection_limit_gets_a_fast_503() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[("AGENTD_MAX_CONNECTIONS", "2")], dir.path()).await;
    let mut c1 = Conn::open(server.addr).await.unwrap();
    let mut c2 = Conn::open(server.addr).await.unwrap();
    assert_eq!(c1.get("/health").await.status, 200);
    assert_eq!(c2.get("/health").await.status, 200);
    let r = get(server.addr, "/health").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["connection"], "close");
    assert_eq!(r.json()["error"]["code"], "too_many_connections");
    assert_eq!(
        server
            .app
            .stats
            .connections_rejected
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // A slot frees when a connection closes.
    drop(c1);
    let mut served = false;
    for _ in 0..200 {
        if get(server.addr, "/health").await.status == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served, "a freed slot is reused");
    drop(c2);
    server.stop().await;
}

#[tokio::test]
async fn slow_header_senders_are_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[("AGENTD_HEADER_READ_TIMEOUT", "300ms")], dir.path()).await;
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never finish the headers: the server must close the connection.
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed by the header timeout");
    assert!(n.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&[("AGENTD_IDLE_TIMEOUT", "300ms")], dir.path()).await;
    let mut s = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("idle connection closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    server.stop().await;
}

#[tokio::test]
async fn health_counts_accepts_and_requests() {
    let dir = tempfile::tempdir().unwrap();
    // A long interval: no health tick (whose self-probe is a request too) runs
    // during the counting below.
    let server = TestServer::start(&[("AGENTD_HEALTH_INTERVAL", "1h")], dir.path()).await;
    let mut c = Conn::open(server.addr).await.unwrap();
    let first = c.get("/health").await.json();
    for _ in 0..5 {
        c.get("/health").await;
    }
    let h = c.get("/health").await.json();
    assert_eq!(h["status"], "healthy");
    let delta =
        |k: &str| h["accept_loop"][k].as_u64().unwrap() - first["accept_loop"][k].as_u64().unwrap();
    assert_eq!(delta("connections_total"), 0, "one keep-alive connection");
    assert_eq!(delta("requests_total"), 6);
    assert!(h["accept_loop"]["last_request_at"].as_f64().unwrap() > 1.6e9);
    assert!(h["uptime_seconds"].as_f64().unwrap() >= 0.0);
    let total = h["accept_loop"]["requests_total"].as_u64().unwrap();
    let m = c.get("/metrics").await.text();
    assert!(
        m.contains(&format!("agentd_requests_total {}", total + 1)),
        "{m}"
    );
    drop(c);
    server.stop().await;
}
