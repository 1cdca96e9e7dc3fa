//! The `acp` runtime with a minimal real ACP agent
//! (`tests/fixtures/acp-echo-agent.py`, JSON-RPC lines on its pipes) and with
//! an agent that cannot start: warm multi-turn context in one process, an
//! agent that lost turns it had answered (`acp-memory-agent.py`) and gets
//! agentd's transcript back, and a
//! crash loop that backs off and makes the `agents` check degraded while
//! `WATCHDOG=1` goes on. The real agents (Gemini CLI, the Claude and Codex
//! adapters, Qwen Code) are `tests/agent_clis/acp.sh`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::notify::{has_line, NotifyReceiver};
use common::{Conn, Daemon, TestServer};
use serde_json::json;

fn echo_agent() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/acp-echo-agent.py")
        .display()
        .to_string()
}

#[tokio::test]
async fn a_warm_agent_keeps_the_conversation_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = echo_agent();
    let server = TestServer::start(
        &[("AGENTD_RUNTIME", "acp"), ("AGENTD_ACP_CMD", cmd.as_str())],
        dir.path(),
    )
    .await;
    let mut conn = Conn::open(server.addr).await.unwrap();
    let mut ids = Vec::new();
    for (n, text) in ["one", "two", "three"].iter().enumerate() {
        let r = conn
            .post_json("/api/chat", &json!({"message": text, "session_id": "s"}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let body = r.json();
        assert_eq!(
            body["response"],
            format!("You said: {text} [turns={}]", n + 1),
            "the agent's own turn counter says one process and one ACP session held the chat"
        );
        assert_eq!(body["metadata"]["session_restarted"], false);
        ids.push(body["metadata"]["agent_session_id"].clone());
    }
    assert!(
        ids[0].is_string() && ids.iter().all(|i| *i == ids[0]),
        "{ids:?}"
    );
    let report = server.app.runtime().agents().expect("acp reports its pool");
    assert_eq!((report.started, report.running, report.restarts), (1, 1, 0));

    // Tasks run on a process kept for tasks, each in an ACP session of its
    // own; the chat's process is not theirs.
    for prompt in ["alone", "apart"] {
        let r = conn
            .post_json("/api/task", &json!({"prompt": prompt}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json()["response"],
            format!("You said: {prompt} [turns=1]")
        );
    }
    let report = server.app.runtime().agents().unwrap();
    assert_eq!(
        (report.started, report.running),
        (2, 2),
        "one process for the chat, one shared by both tasks"
    );
    server.stop().await;
}

fn memory_agent() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/acp-memory-agent.py")
        .display()
        .to_string()
}

/// Wait (bounded) until the pool counted `n` restarts.
async fn restarts_reach(server: &TestServer, n: u64) {
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while server.app.runtime().agents().unwrap().restarts < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent's exit was never noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An agent that answered a turn and died before it wrote the turn down
/// loads the session without error but holds fewer turns than agentd
/// recorded: the next turn says so and hands the agent agentd's transcript.
/// Once the agent holds what it was given, a later load is whole again. Both
/// with a replay that comes before the load's answer and one that comes
/// after it (as Gemini CLI 0.61 sends it).
#[tokio::test]
async fn an_agent_that_loads_fewer_turns_than_recorded_gets_the_transcript_back() {
    for late in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let sessions = tempfile::tempdir().unwrap();
        let cmd = format!(
            "{} {}{}",
            memory_agent(),
            sessions.path().display(),
            if late { " late" } else { "" }
        );
        let server = TestServer::start(
            &[("AGENTD_RUNTIME", "acp"), ("AGENTD_ACP_CMD", cmd.as_str())],
            dir.path(),
        )
        .await;
        let mut conn = Conn::open(server.addr).await.unwrap();
        let mut chat = async |text: &str| {
            let r = conn
                .post_json("/api/chat", &json!({"message": text, "session_id": "m"}))
                .await;
            assert_eq!(r.status, 200, "{text}: {}", r.text());
            r.json()
        };
        let b = chat("remember apples").await;
        assert_eq!(b["response"], "You said: remember apples [turns=1]");
        // Answered, then gone before it wrote the turn.
        let b = chat("and UNSAVED pears EXIT").await;
        assert_eq!(b["metadata"]["session_restarted"], false);
        let acp_session = b["metadata"]["agent_session_id"].clone();
        restarts_reach(&server, 1).await;

        let b = chat("what did I say?").await;
        let answer = b["response"].as_str().unwrap();
        assert_eq!(
            b["metadata"]["agent_session_id"], acp_session,
            "late={late}: the load worked: {b}"
        );
        assert_eq!(
            b["metadata"]["session_restarted"], true,
            "late={late}: one turn of two was lost: {b}"
        );
        assert_eq!(b["metadata"]["session_restored"], "transcript", "{b}");
        assert!(
            answer.contains("[User]\nand UNSAVED pears EXIT\n")
                && answer.contains("[User]\nremember apples\n")
                && answer.ends_with(" / what did I say? [turns=2]"),
            "late={late}: the agent got agentd's transcript, then the prompt: {answer}"
        );
        assert!(
            !answer.starts_with("You said: remember apples"),
            "late={late}: no replayed text leaked into the answer: {answer}"
        );

        // The same process: nothing is lost, nothing restored.
        let b = chat("and now?").await;
        assert_eq!(b["metadata"]["session_restarted"], false, "{b}");
        assert_eq!(b["metadata"]["session_restored"], json!(null));
        assert_eq!(b["response"], "You said: and now? [turns=3]");

        // A crash after the agent wrote everything: the load is whole.
        let b = chat("saved EXIT").await;
        assert_eq!(b["response"], "You said: saved EXIT [turns=4]");
        restarts_reach(&server, 2).await;
        let b = chat("still there?").await;
        assert_eq!(
            (
                &b["metadata"]["session_restarted"],
                &b["metadata"]["session_restored"]
            ),
            (&json!(false), &json!(null)),
            "late={late}: {b}"
        );
        assert_eq!(b["response"], "You said: still there? [turns=5]");
        drop(conn);
        server.stop().await;
    }
}

/// An idle agent killed between turns, before agentd noticed, takes the
/// next prompt with it unanswered and having shown nothing: the turn runs
/// again on a new process, which loads the session, finds it short and gets
/// the transcript. The client sees one answer.
#[tokio::test]
async fn a_turn_sent_to_an_agent_that_died_unnoticed_runs_again_in_a_new_process() {
    let dir = tempfile::tempdir().unwrap();
    let sessions = tempfile::tempdir().unwrap();
    let cmd = format!("{} {}", memory_agent(), sessions.path().display());
    let server = TestServer::start(
        &[("AGENTD_RUNTIME", "acp"), ("AGENTD_ACP_CMD", cmd.as_str())],
        dir.path(),
    )
    .await;
    let mut conn = Conn::open(server.addr).await.unwrap();
    for text in ["remember apples", "UNSAVED pears VANISH"] {
        let r = conn
            .post_json("/api/chat", &json!({"message": text, "session_id": "v"}))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = conn
        .post_json(
            "/api/chat",
            &json!({"message": "what did I say?", "session_id": "v"}),
        )
        .await;
    assert_eq!(
        r.status,
        200,
        "one answer, from the new process: {}",
        r.text()
    );
    let b = r.json();
    assert_eq!(b["metadata"]["session_restarted"], true, "{b}");
    assert_eq!(b["metadata"]["session_restored"], "transcript", "{b}");
    let answer = b["response"].as_str().unwrap();
    assert!(
        answer.contains("[User]\nUNSAVED pears VANISH\n")
            && answer.ends_with(" / what did I say? [turns=2]"),
        "{answer}"
    );
    let report = server.app.runtime().agents().unwrap();
    assert_eq!((report.started, report.restarts), (2, 1), "{report:?}");
    drop(conn);
    server.stop().await;
}

/// An agent that cannot load the session at all gets the transcript in the
/// new ACP session it is given.
#[tokio::test]
async fn a_session_the_agent_cannot_load_starts_anew_with_the_transcript() {
    let dir = tempfile::tempdir().unwrap();
    let sessions = tempfile::tempdir().unwrap();
    let cmd = format!("{} {}", memory_agent(), sessions.path().display());
    let server = TestServer::start(
        &[("AGENTD_RUNTIME", "acp"), ("AGENTD_ACP_CMD", cmd.as_str())],
        dir.path(),
    )
    .await;
    let mut conn = Conn::open(server.addr).await.unwrap();
    // Never written: the load fails ("no such session").
    let r = conn
        .post_json(
            "/api/chat",
            &json!({"message": "UNSAVED plums EXIT", "session_id": "n"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let first = r.json()["metadata"]["agent_session_id"].clone();
    restarts_reach(&server, 1).await;
    let r = conn
        .post_json(
            "/api/chat",
            &json!({"message": "which fruit?", "session_id": "n"}),
        )
        .await;
    let b = r.json();
    assert_eq!(b["metadata"]["session_restarted"], true, "{b}");
    assert_eq!(b["metadata"]["session_restored"], "transcript", "{b}");
    assert_ne!(
        b["metadata"]["agent_session_id"], first,
        "a new ACP session"
    );
    let answer = b["response"].as_str().unwrap();
    assert!(
        answer.contains("[User]\nUNSAVED plums EXIT\n")
            && answer.contains("[Assistant]\nYou said: UNSAVED plums EXIT [turns=1]\n")
            && answer.ends_with(" / which fruit? [turns=1]"),
        "{answer}"
    );
    drop(conn);
    server.stop().await;
}

fn is_ping(m: &str) -> bool {
    has_line(m, "WATCHDOG=1")
}

#[test]
fn an_agent_that_cannot_start_backs_off_and_degrades_but_the_watchdog_goes_on() {
    let rx = NotifyReceiver::path();
    let socket = rx.env_value();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &[
            ("NOTIFY_SOCKET", socket.as_str()),
            // Interval 0.5 s.
            ("WATCHDOG_USEC", "1500000"),
            ("AGENTD_RUNTIME", "acp"),
            ("AGENTD_ACP_CMD", "sh -c 'echo no model here >&2; exit 3'"),
        ],
        dir.path(),
    );
    assert!(rx
        .wait_for(|m| has_line(m, "READY=1"), common::WAIT)
        .is_some());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for _ in 0..3 {
            let r = common::post_json(d.addr, "/api/task", &json!({"prompt": "hi"})).await;
            assert_eq!(r.status, 502, "{}", r.text());
            let text = r.text();
            assert!(
                text.contains("did not start") && text.contains("no model here"),
                "the error names the failed start and the agent's stderr: {text}"
            );
        }
        // A later tick sees the pool's state after the third failure.
        let deadline = tokio::time::Instant::now() + common::WAIT;
        let body = loop {
            let b = common::get(d.addr, "/health").await.json();
            if b["checks"]["agents"]["status"] == "degraded"
                && b["agents"]["degraded"]
                    .as_str()
                    .is_some_and(|r| r.contains("3 time(s)"))
            {
                break b;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never degraded: {b}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let reason = body["agents"]["degraded"].as_str().unwrap_or_default();
        assert!(
            reason.contains("failed to start 3 time(s) in a row"),
            "{body}"
        );
        assert_ne!(body["status"], "unhealthy", "{body}");
    });
    // Still degraded, and pings keep coming: a failing agent is not agentd's wedge.
    let before = rx.count(is_ping);
    assert!(
        rx.wait_for_count(is_ping, before + 3, common::WAIT),
        "WATCHDOG=1 stopped while the agent failed: {}",
        d.log_text()
    );
    let log = d.log_text();
    for wait in [
        "next try in 500 ms",
        "next try in 1000 ms",
        "next try in 2000 ms",
    ] {
        assert!(log.contains(wait), "the back-off doubles ({wait}): {log}");
    }
}

#[tokio::test]
async fn an_agent_that_ignores_cancel_is_killed_counted_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = echo_agent();
    let server = TestServer::start(
        &[
            ("AGENTD_RUNTIME", "acp"),
            ("AGENTD_ACP_CMD", cmd.as_str()),
            ("AGENTD_KILL_GRACE", "300ms"),
        ],
        dir.path(),
    )
    .await;
    let mut conn = Conn::open(server.addr).await.unwrap();
    let r = conn
        .post_json("/api/task", &json!({"prompt": "HANG now", "async": true}))
        .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["execution_id"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + common::WAIT;
    let pid = loop {
        let running = conn.get("/api/executions/running").await.json();
        let pid = running["executions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["execution_id"] == id.as_str())
            .and_then(|e| e["pid"].as_u64());
        if let Some(pid) = pid.filter(|p| *p > 0) {
            break pid as u32;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let t = conn
        .post_json(&format!("/api/executions/{id}/terminate"), &json!({}))
        .await;
    assert_eq!(t.status, 200, "{}", t.text());
    assert_eq!(t.json()["status"], "cancelled");
    // The answer may come at terminate's own bound, while the escalation to
    // SIGKILL is still under way: wait for the group and the count.
    let deadline = tokio::time::Instant::now() + common::WAIT;
    let report = loop {
        let report = server.app.runtime().agents().unwrap();
        if report.restarts == 1 && common::procs::live_group_members(pid).is_empty() {
            break report;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the wedged agent's group {pid} survived: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        report.last_restart_reason.as_deref(),
        Some("unresponsive: no answer to session/cancel")
    );
    assert_eq!(
        report.degraded, None,
        "an agent killed for not answering is a restart, not a failed start"
    );
    let r = conn
        .post_json("/api/task", &json!({"prompt": "after"}))
        .await;
    assert_eq!(
        r.status,
        200,
        "a new process serves the next turn: {}",
        r.text()
    );
    assert_eq!(r.json()["response"], "You said: after [turns=1]");
    assert_eq!(server.app.runtime().agents().unwrap().started, 2);
    server.stop().await;
}
