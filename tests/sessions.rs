//! Chat sessions over HTTP with the `claude-code` and `gemini` runtimes, run
//! against `tests/fixtures/session-cli.py`, a fixture that keeps sessions by
//! the real CLIs' rules (UUIDs only, "already in use" for a reused
//! `--session-id`, "No conversation found" for an unknown `--resume`,
//! sessions kept in its working directory) and answers with every prompt its
//! session has seen. Proves that the second turn carries the first in every
//! kind of session and after a restart, a failed first turn, a delete and an
//! eviction from memory; that disagreements repair themselves; and what the
//! client learns (agent session id, model, errors, `Retry-After`, `/health`).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{get, post_json, request, Daemon, TestServer, WAIT};
use serde_json::{json, Value};

const U: &str = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b";
/// agentd's UUID v5 namespace for session names (`agent::sessions::NAMESPACE`).
const NS: &str = "5d1f6c2e-8a4b-4c7e-9f30-a1b2c3d4e5f6";

fn fixture() -> String {
    format!(
        "{}/tests/fixtures/session-cli.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// The settings for a runtime run by the session fixture.
fn runtime_vars(runtime: &'static str) -> Vec<(&'static str, String)> {
    let bin = match runtime {
        "claude-code" => "AGENTD_CLAUDE_BIN",
        _ => "AGENTD_GEMINI_BIN",
    };
    vec![("AGENTD_RUNTIME", runtime.to_owned()), (bin, fixture())]
}

async fn start(runtime: &'static str, extra: &[(&str, &str)], dir: &Path) -> TestServer {
    let vars = runtime_vars(runtime);
    let mut all: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    TestServer::start(&all, dir).await
}

async fn chat(server: &TestServer, session: Option<&str>, message: &str) -> common::Resp {
    let mut body = json!({"message": message});
    if let Some(s) = session {
        body["session_id"] = json!(s);
    }
    post_json(server.addr, "/api/chat", &body).await
}

/// A chat turn that must succeed; returns its body.
async fn turn(server: &TestServer, session: Option<&str>, message: &str) -> Value {
    let r = chat(server, session, message).await;
    assert_eq!(r.status, 200, "{session:?} {message:?}: {}", r.text());
    r.json()
}

/// The session flags of every call the fixture saw, oldest first.
fn calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("workspace/.sessions/calls.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn v5(name: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::parse_str(NS).unwrap(), name.as_bytes()).to_string()
}

#[tokio::test]
async fn second_turn_resumes_in_default_named_and_uuid_sessions() {
    for runtime in ["claude-code", "gemini"] {
        let dir = tempfile::tempdir().unwrap();
        let server = start(runtime, &[], dir.path()).await;
        for (session, cli_session) in [
            (None, v5("default")),
            (Some("demo"), v5("demo")),
            (Some(U), U.to_owned()),
        ] {
            let first = turn(&server, session, "one").await;
            assert_eq!(first["response"], "seen: one", "{runtime} {session:?}");
            let second = turn(&server, session, "two").await;
            assert_eq!(
                second["response"], "seen: one | two",
                "{runtime} {session:?}"
            );
            assert_eq!(second["metadata"]["agent_session_id"], cli_session.as_str());
            // Where clients of the original agent server read it.
            assert_eq!(second["metadata"]["session_id"], cli_session.as_str());
            assert_eq!(second["metadata"]["model"], "fixture-model");
        }
        // Create, then resume, directly: no call needed a repair.
        let flags: Vec<_> = calls(dir.path())
            .iter()
            .map(|c| c.split(' ').next().unwrap().to_owned())
            .collect();
        assert_eq!(flags, ["--session-id", "--resume"].repeat(3), "{runtime}");
        server.stop().await;
    }
}

#[tokio::test]
async fn every_spelling_of_a_uuid_is_one_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = start("claude-code", &[], dir.path()).await;
    let spellings = [
        U.to_uppercase(),
        U.replace('-', ""),
        format!("urn:uuid:{U}"),
        format!("{{{U}}}"),
    ];
    let mut seen = Vec::new();
    for (i, spelling) in spellings.iter().enumerate() {
        let message = format!("m{i}");
        let body = turn(&server, Some(spelling), &message).await;
        seen.push(message);
        assert_eq!(body["session_id"], U, "{spelling}");
        assert_eq!(body["response"], format!("seen: {}", seen.join(" | ")));
        assert_eq!(body["metadata"]["agent_session_id"], U);
    }
    let h = get(
        server.addr,
        &format!("/api/chat/history?session_id=URN:UUID:{U}"),
    )
    .await
    .json();
    assert_eq!(common::user_messages(&h), ["m0", "m1", "m2", "m3"]);
    server.stop().await;
}

#[tokio::test]
async fn resume_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start("claude-code", &[], dir.path()).await;
    turn(&server, Some("demo"), "one").await;
    server.stop().await;
    let server = start("claude-code", &[], dir.path()).await;
    let body = turn(&server, Some("demo"), "two").await;
    assert_eq!(body["response"], "seen: one | two");
    let id = v5("demo");
    assert_eq!(
        calls(dir.path()),
        [format!("--session-id {id}"), format!("--resume {id}")],
        "the store, not a repair, chose --resume"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_failed_first_turn_is_repaired_by_resuming() {
    for runtime in ["claude-code", "gemini"] {
        let dir = tempfile::tempdir().unwrap();
        let server = start(runtime, &[], dir.path()).await;
        let r = chat(&server, Some("demo"), "FAIL one").await;
        assert_eq!(r.status, 502, "{runtime}: {}", r.text());
        let body = r.json();
        assert_eq!(body["error"]["code"], "agent_error");
        assert_eq!(
            body["error"]["message"],
            "API Error: 500 Internal server error from the model"
        );
        // The CLI kept the failed turn's session; the store did not record it.
        // The next turn's --session-id is refused and retried with --resume.
        // Claude Code resumes it; Gemini CLI cannot resume a session with no
        // answered turn either, so agentd moves on to a new CLI session.
        let body = turn(&server, Some("demo"), "two").await;
        let id = v5("demo");
        let mut expected = vec![
            format!("--session-id {id}"),
            format!("--session-id {id}"),
            format!("--resume {id}"),
        ];
        let resumed = if runtime == "claude-code" {
            assert_eq!(body["response"], "seen: FAIL one | two");
            id
        } else {
            assert_eq!(body["response"], "seen: two");
            let fresh = v5("demo#1");
            expected.push(format!("--session-id {fresh}"));
            fresh
        };
        assert_eq!(body["metadata"]["agent_session_id"], resumed.as_str());
        assert_eq!(calls(dir.path()), expected, "{runtime}");
        // Now recorded: the third turn resumes at once.
        let body = turn(&server, Some("demo"), "three").await;
        assert!(
            body["response"].as_str().unwrap().ends_with("two | three"),
            "{runtime}: {body}"
        );
        assert_eq!(
            calls(dir.path())[expected.len()..],
            [format!("--resume {resumed}")]
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn a_session_the_cli_lost_is_started_again() {
    for runtime in ["claude-code", "gemini"] {
        let dir = tempfile::tempdir().unwrap();
        let server = start(runtime, &[], dir.path()).await;
        turn(&server, Some("demo"), "one").await;
        // The CLI's own state is gone (a new HOME, a wiped cache).
        let id = v5("demo");
        std::fs::remove_file(dir.path().join(format!("workspace/.sessions/{id}.json"))).unwrap();
        let body = turn(&server, Some("demo"), "two").await;
        assert_eq!(body["response"], "seen: two", "{runtime}");
        assert_eq!(
            calls(dir.path())[1..],
            [format!("--resume {id}"), format!("--session-id {id}")],
            "{runtime}"
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn deleting_history_starts_a_new_cli_session_and_old_context_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let server = start("claude-code", &[], dir.path()).await;
    let before = turn(&server, Some("demo"), "secret").await;
    turn(&server, Some("other"), "kept").await;

    // An empty session_id is refused and deletes nothing.
    let r = request(
        server.addr,
        "DELETE",
        "/api/chat/history?session_id=",
        &[],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "invalid_session_id");
    let all = get(server.addr, "/api/chat/history").await.json();
    assert_eq!(all["size"], 4);

    let r = request(
        server.addr,
        "DELETE",
        "/api/chat/history?session_id=demo",
        &[],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let after = turn(&server, Some("demo"), "fresh").await;
    assert_eq!(after["response"], "seen: fresh");
    assert_ne!(
        after["metadata"]["agent_session_id"],
        before["metadata"]["agent_session_id"]
    );
    // Still a new session after a restart, and the other session kept its own.
    server.stop().await;
    let server = start("claude-code", &[], dir.path()).await;
    let again = turn(&server, Some("demo"), "again").await;
    assert_eq!(again["response"], "seen: fresh | again");
    let other = turn(&server, Some("other"), "still").await;
    assert_eq!(other["response"], "seen: kept | still");

    // Deleting everything moves every session on.
    let r = request(
        server.addr,
        "DELETE",
        "/api/chat/history",
        &[],
        bytes::Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        turn(&server, Some("other"), "new").await["response"],
        "seen: new"
    );
    server.stop().await;
}

#[tokio::test]
async fn eviction_from_memory_does_not_lose_the_cli_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = start("gemini", &[("AGENT_HISTORY_LIMIT", "2")], dir.path()).await;
    turn(&server, Some("demo"), "one").await;
    turn(&server, Some("other"), "push demo out").await;
    let h = get(server.addr, "/api/chat/history?session_id=demo")
        .await
        .json();
    assert_eq!(h["messages"].as_array().unwrap().len(), 0, "evicted");
    let body = turn(&server, Some("demo"), "two").await;
    assert_eq!(body["response"], "seen: one | two");
    let (demo, other) = (v5("demo"), v5("other"));
    assert_eq!(
        calls(dir.path()),
        [
            format!("--session-id {demo}"),
            format!("--session-id {other}"),
            format!("--resume {demo}")
        ],
        "the store, not a repair, chose --resume"
    );
    server.stop().await;
}

#[tokio::test]
async fn tasks_get_a_fresh_session_each() {
    let dir = tempfile::tempdir().unwrap();
    let server = start("claude-code", &[], dir.path()).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = post_json(server.addr, "/api/task", &json!({"prompt": "task"})).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let body = r.json();
        assert_eq!(body["response"], "seen: task", "no context carried");
        assert_eq!(body["metadata"]["model"], "fixture-model");
        let id = body["metadata"]["agent_session_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let exec = get(
            server.addr,
            &format!("/api/executions/{}", body["execution_id"].as_str().unwrap()),
        )
        .await
        .json();
        assert_eq!(exec["result"]["metadata"]["agent_session_id"], id.as_str());
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
    server.stop().await;
}

#[tokio::test]
async fn rate_limits_and_quota_are_429_with_retry_after() {
    for runtime in ["claude-code", "gemini"] {
        let dir = tempfile::tempdir().unwrap();
        let server = start(runtime, &[], dir.path()).await;
        for r in [
            chat(&server, Some("demo"), "RATELIMIT").await,
            post_json(server.addr, "/api/task", &json!({"prompt": "RATELIMIT"})).await,
        ] {
            assert_eq!(r.status, 429, "{runtime}: {}", r.text());
            assert_eq!(r.headers["retry-after"], "7", "{runtime}");
            let body = r.json();
            assert_eq!(body["error"]["code"], "rate_limited");
            assert_eq!(
                body["error"]["message"],
                "API Error: Request rejected (429) · rate limit reached, retry in 7s"
            );
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn children_run_in_the_private_work_directory() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let server = start("gemini", &[], dir.path()).await;
    turn(&server, None, "hi").await;
    let work = dir.path().join("workspace");
    assert_eq!(
        std::fs::metadata(&work).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert!(work.join(".sessions/calls.log").is_file());
    server.stop().await;

    let custom = dir.path().join("elsewhere");
    let vars = [("AGENTD_WORKDIR", custom.to_str().unwrap())];
    let server = start("gemini", &vars, dir.path()).await;
    turn(&server, None, "hi").await;
    assert!(custom.join(".sessions/calls.log").is_file());
    server.stop().await;
}

#[test]
fn an_unusable_workdir_stops_start_up_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"").unwrap();
    let out = std::process::Command::new(common::agentd_bin())
        .arg("serve")
        .env_clear()
        .env("AGENTD_LISTEN", "127.0.0.1:0")
        .env("AGENTD_STATE_DIR", dir.path())
        .env("AGENTD_WORKDIR", &file)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("AGENTD_WORKDIR"), "{stderr}");
    assert!(stderr.contains("not a directory"), "{stderr}");
}

/// `/health` until its runtime block has a version, bounded by `WAIT`.
async fn runtime_block(addr: std::net::SocketAddr) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let h = get(addr, "/health").await.json();
        if !h["runtime"]["version"].is_null() || Instant::now() > deadline {
            return h["runtime"].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn health_reports_the_runtime_and_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let server = start("claude-code", &[], dir.path()).await;
    assert_eq!(
        runtime_block(server.addr).await,
        json!({"name": "claude-code", "command": fixture(), "runnable": true, "version": "9.9.9 (Fixture CLI)"})
    );
    server.stop().await;

    let server = TestServer::start(&[], dir.path()).await;
    let h = get(server.addr, "/health").await.json();
    assert_eq!(
        h["runtime"],
        json!({"name": "echo", "command": null, "runnable": true, "version": null})
    );
    server.stop().await;

    let server = TestServer::start(
        &[
            ("AGENTD_RUNTIME", "claude-code"),
            ("AGENTD_CLAUDE_BIN", "agentd-test-no-such-claude"),
        ],
        dir.path(),
    )
    .await;
    let h = get(server.addr, "/health").await.json();
    assert_eq!(h["runtime"]["runnable"], false);
    assert_eq!(h["runtime"]["command"], "agentd-test-no-such-claude");
    server.stop().await;
}

#[test]
fn a_failed_execution_is_logged_once_without_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let vars = runtime_vars("claude-code");
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let daemon = Daemon::start(&vars, dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = rt.block_on(async {
        let r = post_json(
            daemon.addr,
            "/api/chat",
            &json!({"message": "FAIL private-words-xyzzy", "session_id": "demo"}),
        )
        .await;
        assert_eq!(r.status, 502, "{}", r.text());
        r.json()
    });
    let id = body["execution_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + WAIT;
    let line = loop {
        let log = daemon.log_text();
        if let Some(line) = log.lines().find(|l| l.contains("execution failed")) {
            break line.to_owned();
        }
        assert!(Instant::now() < deadline, "no failure record: {log}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(&id), "{line}");
    assert!(line.contains("agent_error"), "{line}");
    assert!(line.contains("Exited"), "{line}");
    let log = daemon.log_text();
    assert_eq!(log.matches("execution failed").count(), 1, "{log}");
    assert!(
        !log.contains("xyzzy"),
        "the prompt leaked into the log: {log}"
    );
}
