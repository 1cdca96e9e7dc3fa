//! Tasks, chats and executions over HTTP with real child processes: the
//! classification table end to end, the executor's bounds and ordering,
//! termination, streaming, and a flat resource count over 1,000 tasks.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use common::{get, post_json, procs, request, user_messages, Conn, Daemon, TestServer};
use serde_json::{json, Value};

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

/// Settings for the `command` runtime running `cmd`, with short grace periods.
fn command_runtime(cmd: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AGENTD_RUNTIME", "command".into()),
        ("AGENTD_RUNTIME_CMD", cmd.into()),
        ("AGENTD_KILL_GRACE", "200ms".into()),
        ("AGENTD_PIPE_DRAIN", "100ms".into()),
    ]
}

async fn start(vars: &[(&'static str, String)], dir: &std::path::Path) -> TestServer {
    let v: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    TestServer::start(&v, dir).await
}

#[tokio::test]
async fn chat_with_cat_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&command_runtime("cat"), dir.path()).await;
    let r = post_json(
        server.addr,
        "/api/chat",
        &json!({"message": "through a real child"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["response"], "through a real child");
    let h = get(server.addr, "/api/chat/history").await.json();
    assert_eq!(h["messages"][1]["content"], "through a real child");
    server.stop().await;
}

#[tokio::test]
async fn every_classification_row_over_http() {
    let rows: Vec<(&str, u16, &str, Option<&str>)> = vec![
        ("stream-json.sh", 200, "success", None),
        ("plain-text.sh", 200, "success", None),
        ("empty-result.sh", 200, "success", None),
        ("silent.sh", 502, "failed", Some("empty_result")),
        ("fail-stderr.sh", 500, "failed", Some("nonzero_exit")),
        ("rate-limited.sh", 429, "failed", Some("rate_limited")),
        (
            "/nonexistent/agent-cli",
            502,
            "failed",
            Some("runtime_unavailable"),
        ),
    ];
    for (cmd, status, word, code) in rows {
        let dir = tempfile::tempdir().unwrap();
        let path = if cmd.starts_with('/') {
            cmd.to_owned()
        } else {
            fixture(cmd)
        };
        let server = start(&command_runtime(&path), dir.path()).await;
        let r = post_json(server.addr, "/api/task", &json!({"prompt": "go"})).await;
        let body = r.json();
        assert_eq!(r.status, status, "{cmd}: {body}");
        assert_eq!(body["status"], word, "{cmd}: {body}");
        assert_eq!(body["error"]["code"].as_str(), code, "{cmd}: {body}");
        if cmd == "empty-result.sh" {
            assert_eq!(body["response"], "(task completed with no direct output)");
        }
        if cmd == "fail-stderr.sh" {
            assert_eq!(body["metadata"]["exit_code"], 3);
            assert!(body["stderr_tail"]
                .as_str()
                .unwrap()
                .contains("cannot reach the model"));
        }
        if cmd.starts_with('/') {
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("agent-cli"),
                "{body}"
            );
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn a_task_reports_the_agent_session_id_as_metadata_session_id() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        &command_runtime(&fixture("session-empty-result.sh")),
        dir.path(),
    )
    .await;
    let r = post_json(server.addr, "/api/task", &json!({"prompt": "x"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["metadata"]["session_id"], "session-abc", "{body}");
    assert_eq!(body["metadata"]["agent_session_id"], "session-abc");
    assert_eq!(
        body["response"],
        agentd::agent::classify::NO_OUTPUT_PLACEHOLDER
    );
    // The execution's own id is still there, apart from the agent's.
    let id = body["execution_id"]
        .as_str()
        .expect("execution_id")
        .to_owned();
    assert_ne!(id, "session-abc");

    // An async task: its stream ends when it finished, then the execution
    // carries the same metadata.
    let r = post_json(
        server.addr,
        "/api/task",
        &json!({"prompt": "x", "async": true}),
    )
    .await;
    assert_eq!(r.status, 202);
    let id = r.json()["execution_id"].as_str().unwrap().to_owned();
    let s = request(
        server.addr,
        "GET",
        &format!("/api/executions/{id}/stream"),
        &[],
        Bytes::new(),
    )
    .await;
    let text = s.text();
    let end: Value = serde_json::from_str(
        text.split("event: end\ndata: ")
            .nth(1)
            .expect("an end event")
            .trim(),
    )
    .unwrap();
    assert_eq!(end["metadata"]["session_id"], "session-abc", "{end}");
    let e = get(server.addr, &format!("/api/executions/{id}"))
        .await
        .json();
    assert_eq!(e["execution_id"], id.as_str());
    assert_eq!(e["result"]["metadata"]["session_id"], "session-abc", "{e}");
    server.stop().await;
}

#[tokio::test]
async fn timeout_gives_504_and_kills_the_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&command_runtime(&fixture("stubborn.sh")), dir.path()).await;
    let r = post_json(
        server.addr,
        "/api/task",
        &json!({"prompt": "x", "timeout_s": 0.5, "async": true}),
    )
    .await;
    assert_eq!(r.status, 202);
    let id = r.json()["execution_id"].as_str().unwrap().to_owned();
    // Poll the execution until it is finished (bounded).
    let mut conn = Conn::open(server.addr).await.unwrap();
    let mut pid = None;
    let finished = loop {
        let e = conn.get(&format!("/api/executions/{id}")).await.json();
        if pid.is_none() {
            pid = e["pid"].as_u64();
        }
        if e["finished_at"].is_number() {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(finished["status"], "timeout", "{finished}");
    assert_eq!(finished["http_status"], 504);
    let pgid = pid.expect("the child had a pid") as u32;
    assert!(
        procs::live_group_members(pgid).is_empty(),
        "group {pgid} survived: {:?}",
        procs::live_group_members(pgid)
    );
    drop(conn);
    server.stop().await;
}

#[tokio::test]
async fn terminate_cancels_a_running_task_and_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&command_runtime(&fixture("sleepy.sh")), dir.path()).await;
    let r = post_json(
        server.addr,
        "/api/task",
        &json!({"prompt": "x", "async": true}),
    )
    .await;
    let id = r.json()["execution_id"].as_str().unwrap().to_owned();
    // Wait until it runs and has a pid.
    let mut conn = Conn::open(server.addr).await.unwrap();
    let pid = loop {
        let running = conn.get("/api/executions/running").await.json();
        if let Some(e) = running["executions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["execution_id"] == id.as_str())
        {
            if let Some(pid) = e["pid"].as_u64() {
                assert_eq!(e["kind"], "task");
                break pid as u32;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let t = conn
        .send(
            "POST",
            &format!("/api/executions/{id}/terminate"),
            &[],
            Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(t.status, 200);
    assert_eq!(t.json()["status"], "cancelled");
    assert!(
        procs::live_group_members(pid).is_empty(),
        "group {pid} survived"
    );
    let unknown = conn
        .send("POST", "/api/executions/nope/terminate", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(unknown.status, 404);
    drop(conn);
    server.stop().await;
}

#[tokio::test]
async fn full_executor_answers_429_and_cancelled_queued_work_answers_409() {
    let dir = tempfile::tempdir().unwrap();
    let mut vars = command_runtime(&fixture("sleepy.sh"));
    vars.push(("AGENTD_MAX_CONCURRENT", "1".into()));
    vars.push(("AGENTD_MAX_QUEUE", "1".into()));
    let server = start(&vars, dir.path()).await;
    let a = server.addr;
    let first = post_json(a, "/api/task", &json!({"prompt": "1", "async": true}))
        .await
        .json();
    // The second waits for the only slot: a synchronous request.
    let waiting =
        tokio::spawn(async move { post_json(a, "/api/task", &json!({"prompt": "2"})).await });
    let mut conn = Conn::open(a).await.unwrap();
    loop {
        if conn.get("/api/executions/running").await.json()["queued"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let third = post_json(a, "/api/task", &json!({"prompt": "3"})).await;
    assert_eq!(third.status, 429, "{}", third.text());
    assert_eq!(third.headers["retry-after"], "1");
    // Cancel the queued one: its waiting request gets 409.
    let queued_id = server
        .app
        .executor
        .active()
        .into_iter()
        .find(|e| e.phase() == agentd::agent::executor::Phase::Queued)
        .unwrap()
        .id
        .clone();
    conn.send(
        "POST",
        &format!("/api/executions/{queued_id}/terminate"),
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    let r = waiting.await.unwrap();
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["status"], "cancelled");
    let id = first["execution_id"].as_str().unwrap();
    conn.send(
        "POST",
        &format!("/api/executions/{id}/terminate"),
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    drop(conn);
    server.stop().await;
}

#[tokio::test]
async fn chats_of_one_session_run_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut vars = command_runtime("cat");
    vars.push(("AGENTD_MAX_CONCURRENT", "4".into()));
    let server = start(&vars, dir.path()).await;
    let a = server.addr;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            tokio::spawn(async move {
                // Stagger submissions so arrival order is defined.
                tokio::time::sleep(Duration::from_millis(i * 15)).await;
                post_json(
                    a,
                    "/api/chat",
                    &json!({"message": format!("n{i}"), "session_id": "ordered"}),
                )
                .await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    let h = get(a, "/api/chat/history?session_id=ordered").await.json();
    let users = user_messages(&h);
    assert_eq!(users, ["n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7"]);
    server.stop().await;
}

#[tokio::test]
async fn stream_sends_output_then_end() {
    let dir = tempfile::tempdir().unwrap();
    // Output starts after the subscriber joined: a stream carries output from
    // subscription on (the `end` event carries the whole result).
    let server = start(
        &command_runtime("sh -c 'sleep 0.3; echo late-output; sleep 30'"),
        dir.path(),
    )
    .await;
    let r = post_json(
        server.addr,
        "/api/task",
        &json!({"prompt": "x", "async": true, "timeout_s": 1.5}),
    )
    .await;
    let id = r.json()["execution_id"].as_str().unwrap().to_owned();
    let s = request(
        server.addr,
        "GET",
        &format!("/api/executions/{id}/stream"),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(s.status, 200);
    assert_eq!(s.headers["content-type"], "text/event-stream");
    let text = s.text();
    assert!(text.contains("data: late-output"), "{text}");
    let end = text
        .split("event: end\ndata: ")
        .nth(1)
        .expect("an end event");
    let end: Value = serde_json::from_str(end.trim()).unwrap();
    assert_eq!(end["status"], "timeout");
    let missing = request(
        server.addr,
        "GET",
        "/api/executions/none/stream",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(missing.status, 404);
    server.stop().await;
}

#[tokio::test]
async fn stream_subscribers_are_capped_and_finished_executions_are_a_bounded_ring() {
    let dir = tempfile::tempdir().unwrap();
    let mut vars = command_runtime(&fixture("sleepy.sh"));
    vars.push(("AGENTD_MAX_SUBSCRIBERS", "1".into()));
    vars.push(("AGENTD_FINISHED_RETAINED", "2".into()));
    let server = start(&vars, dir.path()).await;
    let a = server.addr;
    let r = post_json(
        a,
        "/api/task",
        &json!({"prompt": "x", "async": true, "timeout_s": 2}),
    )
    .await;
    let id = r.json()["execution_id"].as_str().unwrap().to_owned();
    // The first subscriber holds the only slot while the task runs.
    let path = format!("/api/executions/{id}/stream");
    let first = tokio::spawn({
        let path = path.clone();
        async move { request(a, "GET", &path, &[], Bytes::new()).await }
    });
    loop {
        if server
            .app
            .executor
            .get(&id)
            .unwrap()
            .subscribers
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = request(a, "GET", &path, &[], Bytes::new()).await;
    assert_eq!(second.status, 429, "{}", second.text());
    assert_eq!(first.await.unwrap().status, 200);

    // Two more finished executions push the first out of the ring of 2.
    for _ in 0..2 {
        let r = post_json(a, "/api/task", &json!({"prompt": "x", "timeout_s": 0.2})).await;
        assert_eq!(r.status, 504);
    }
    assert_eq!(get(a, &format!("/api/executions/{id}")).await.status, 404);
    server.stop().await;
}

/// 1,000 sequential tasks whose agent leaves a grandchild holding its stdout:
/// threads, open fds and child processes of the server end where they began.
#[test]
fn thousand_grandchild_tasks_leave_counts_flat() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = format!("{} 0.2", fixture("grandchild.sh"));
    let d = Daemon::start(
        &[
            ("AGENTD_RUNTIME", "command"),
            ("AGENTD_RUNTIME_CMD", &cmd),
            ("AGENTD_PIPE_DRAIN", "20ms"),
            ("AGENTD_KILL_GRACE", "200ms"),
            ("AGENTD_HEALTH_INTERVAL", "1h"),
        ],
        dir.path(),
    );
    let pid = d.pid();
    let count = |what: &str| -> usize {
        match what {
            "threads" => std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .count(),
            "fds" => d.open_fds(),
            _ => procs::children(pid).len(),
        }
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut conn = rt.block_on(Conn::open(d.addr)).unwrap();
    let body = serde_json::to_vec(&json!({"prompt": "p"})).unwrap();
    let run = |conn: &mut Conn| {
        let r = rt
            .block_on(conn.send("POST", "/api/task", &[], body.clone()))
            .unwrap_or_else(|e| panic!("{e}; agentd's log:\n{}", d.log_text()));
        assert_eq!(r.status, 200, "{}", r.text());
    };
    run(&mut conn);
    let before = (count("threads"), count("fds"), count("children"));
    for _ in 0..1000 {
        run(&mut conn);
    }
    let after = (count("threads"), count("fds"), count("children"));
    eprintln!("threads, fds, children: before {before:?}, after {after:?}");
    assert_eq!(after.1, before.1, "open fds");
    assert_eq!(after.2, 0, "no child process left");
    // tokio's blocking pool may keep an idle thread it had before; never more.
    assert!(after.0 <= before.0, "threads grew: {before:?} -> {after:?}");
}

// ------------------------------------------------- no process outlives its run

/// The execution's tag as it appears in a child's environment.
fn tag(execution_id: &str) -> String {
    format!("AGENTD_EXECUTION_ID={execution_id}")
}

/// A `setsid` grandchild and a double-forked orphan, both outside the agent's
/// process group and holding none of its pipes: when the task's answer
/// arrives, no process with its execution id runs any more, and the real
/// binary has no child left, zombies included.
#[test]
fn setsid_and_double_forked_escapees_die_with_their_execution() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (fixture_name, word) in [
        ("setsid-sleeper.sh", "escapee"),
        ("double-fork.sh", "orphan"),
    ] {
        let cmd = fixture(fixture_name);
        let d = Daemon::start(
            &[
                ("AGENTD_RUNTIME", "command"),
                ("AGENTD_RUNTIME_CMD", &cmd),
                ("AGENTD_HEALTH_INTERVAL", "1h"),
            ],
            dir.path(),
        );
        let r = rt.block_on(post_json(d.addr, "/api/task", &json!({"prompt": "go"})));
        assert_eq!(r.status, 200, "{fixture_name}: {}", r.text());
        let body = r.json();
        let id = body["execution_id"].as_str().unwrap();
        let escapee: u32 = body["response"]
            .as_str()
            .unwrap()
            .strip_prefix(&format!("{word} "))
            .unwrap_or_else(|| panic!("{fixture_name}: {body}"))
            .parse()
            .unwrap();
        // The fixture answered only once the escapee ran in its own session.
        assert!(
            procs::live_with_env(&tag(id)).is_empty(),
            "{fixture_name}: processes of execution {id} outlived it: {:?}",
            procs::live_with_env(&tag(id))
        );
        assert!(
            !procs::processes()
                .iter()
                .any(|p| p.pid == escapee && p.is_live()),
            "{fixture_name}: escapee {escapee} still runs"
        );
        let pid = d.pid();
        assert!(
            procs::wait_until(common::WAIT, || procs::children(pid).is_empty()),
            "{fixture_name}: children of agentd left: {:?}",
            procs::children(pid)
        );
        drop(d);
    }
}

/// An agent that exits leaving a background shell and a `sleep` in its group:
/// when the execution's answer arrives, both were killed *and reaped* (agentd
/// has no child left, not even a zombie), and the answer says what was killed.
#[test]
fn an_execution_answers_with_no_process_and_no_zombie_left() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &[
            ("AGENTD_RUNTIME", "command"),
            ("AGENTD_RUNTIME_CMD", &fixture("background-children.sh")),
            ("AGENTD_HEALTH_INTERVAL", "1h"),
        ],
        dir.path(),
    );
    let agentd = d.pid();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for round in 0..3 {
        let r = rt.block_on(post_json(d.addr, "/api/task", &json!({"prompt": "p"})));
        // Read at once: the orphan reaper's backstop (1 s grace, 10 s sweep)
        // has not run, so only the end-of-execution sweep can have reaped them.
        let children = procs::children(agentd);
        let zombies = procs::zombie_children(agentd);
        assert_eq!(r.status, 200, "{}", r.text());
        let body = r.json();
        assert_eq!(body["response"], "left two behind\n", "{body}");
        assert!(
            children.is_empty(),
            "round {round}: agentd has children at the answer: {children:?} (zombies {zombies:?})"
        );
        let killed = body["cleanup"]["group_killed"].as_u64().unwrap_or(0);
        assert!(killed >= 2, "round {round}: cleanup {}", body["cleanup"]);
        assert_eq!(body["cleanup"]["survivors"], 0, "{body}");
        assert_eq!(body["cleanup"]["stopped_with"], Value::Null, "{body}");
        eprintln!(
            "round {round}: answered with children {children:?}, zombies {zombies:?}; cleanup {}",
            body["cleanup"]
        );
    }
    drop(d);
}

/// An agent that exits by itself leaving nothing gets no `cleanup` block.
#[tokio::test]
async fn a_clean_execution_reports_no_cleanup() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(
        &[("AGENTD_RUNTIME", "command"), ("AGENTD_RUNTIME_CMD", "cat")],
        dir.path(),
    )
    .await;
    let r = post_json(server.addr, "/api/task", &json!({"prompt": "p"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json().get("cleanup").is_none(), "{}", r.text());
    server.stop().await;
}

/// Orphans that dropped the execution tag (so only adoption can catch them)
/// reparent to agentd and are reaped when they exit: agentd's children,
/// zombies included, come back to none after many orphaning executions.
fn orphans_are_adopted_and_reaped(wrapper: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let cmd = format!("{} 1", fixture("untagged-orphan.sh"));
    let d = Daemon::start_under(
        wrapper,
        &[
            ("AGENTD_RUNTIME", "command"),
            ("AGENTD_RUNTIME_CMD", &cmd),
            ("AGENTD_HEALTH_INTERVAL", "1h"),
        ],
        dir.path(),
    );
    // Under a wrapper agentd is the wrapper's only child.
    let agentd = if wrapper.is_empty() {
        d.pid()
    } else {
        let mut kids = Vec::new();
        assert!(procs::wait_until(common::WAIT, || {
            kids = procs::children(d.pid());
            kids.len() == 1
        }));
        kids[0]
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut conn = rt.block_on(Conn::open(d.addr)).unwrap();
    let mut adopted_seen = 0;
    for _ in 0..20 {
        let r = rt.block_on(conn.post_json("/api/task", &json!({"prompt": "p"})));
        assert_eq!(r.status, 200, "{}", r.text());
        // The orphan sleeps for 1 s after its parent exited: it is agentd's
        // child now (not PID 1's).
        adopted_seen += procs::processes()
            .iter()
            .filter(|p| p.ppid == agentd && p.is_live())
            .count();
    }
    assert!(adopted_seen > 0, "no orphan was ever adopted by agentd");
    assert!(
        procs::wait_until(common::WAIT, || procs::children(agentd).is_empty()),
        "agentd still has children (zombies included): {:?}, zombies {:?}",
        procs::children(agentd),
        procs::zombie_children(agentd)
    );
    drop(conn);
}

#[test]
fn agentd_is_a_subreaper_and_reaps_orphans() {
    orphans_are_adopted_and_reaped(&[]);
}

/// As PID 1 of its own PID namespace (a container's init), agentd reaps every
/// orphan of the namespace. Needs root for `unshare -p`.
#[test]
fn as_pid_1_in_a_pid_namespace_agentd_reaps_orphans() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: a PID namespace cannot be created; run as root (CI does)");
        return;
    }
    orphans_are_adopted_and_reaped(&["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]);
}

// ------------------------------------------------------------ SSE with replay

/// One parsed Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
struct SseEvent {
    id: Option<u64>,
    /// `message` when the event names none.
    event: String,
    /// `data:` lines joined with `\n`, as a browser's EventSource does.
    data: String,
}

/// An open SSE response read incrementally.
struct SseStream {
    status: u16,
    body: hyper::body::Incoming,
    buf: String,
}

impl SseStream {
    async fn open(addr: std::net::SocketAddr, path: &str, last_event_id: Option<u64>) -> SseStream {
        use hyper::client::conn::http1;
        use hyper_util::rt::TokioIo;
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let mut req = http::Request::get(path).header("host", addr.to_string());
        if let Some(n) = last_event_id {
            req = req.header("last-event-id", n.to_string());
        }
        let req = req.body(http_body_util::Full::new(Bytes::new())).unwrap();
        let resp = tokio::time::timeout(common::WAIT, sender.send_request(req))
            .await
            .expect("stream answers within the bound")
            .unwrap();
        SseStream {
            status: resp.status().as_u16(),
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The next event (comments skipped); `None` at the end of the stream.
    /// Bounded by `WAIT` in total, keepalive comments included.
    async fn next(&mut self) -> Option<SseEvent> {
        use http_body_util::BodyExt;
        let deadline = tokio::time::Instant::now() + common::WAIT;
        loop {
            if let Some(at) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..at + 2).collect();
                let mut ev = SseEvent {
                    id: None,
                    event: "message".into(),
                    data: String::new(),
                };
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        ev.id = Some(v.parse().expect("numeric id"));
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        ev.event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v);
                    }
                }
                if data.is_empty() && ev.id.is_none() {
                    continue; // a keepalive comment
                }
                ev.data = data.join("\n");
                return Some(ev);
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .expect("an event within the bound")?
                .expect("body frame");
            if let Ok(bytes) = frame.into_data() {
                self.buf.push_str(std::str::from_utf8(&bytes).unwrap());
            }
        }
    }

    /// Output events until (and including) `end`; asserts ids count up by one.
    async fn rest(&mut self) -> Vec<SseEvent> {
        let mut out: Vec<SseEvent> = Vec::new();
        while let Some(ev) = self.next().await {
            let end = ev.event == "end";
            out.push(ev);
            if end {
                break;
            }
        }
        assert_eq!(out.last().map(|e| e.event.as_str()), Some("end"), "{out:?}");
        let ids: Vec<u64> = out.iter().filter_map(|e| e.id).collect();
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "ids {ids:?}");
        out
    }
}

/// Output text of a run of events (chunks in order).
fn output_of(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.event == "message")
        .map(|e| e.data.as_str())
        .collect()
}

/// Start `lines-then-wait.sh` as an async task, wait (bounded, no sleep
/// guessing) until its 50 lines are in the replay buffer; returns the
/// execution id and the fifo that lets it go on.
async fn task_with_output_waiting(server: &TestServer, dir: &std::path::Path) -> (String, PathBuf) {
    let fifo = dir.join("go");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let r = post_json(
        server.addr,
        "/api/task",
        &json!({"prompt": fifo.display().to_string(), "async": true}),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["execution_id"].as_str().unwrap().to_owned();
    let exec = server.app.executor.get(&id).unwrap();
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let mut reader = exec.ctx.output.subscribe();
        let mut seen = String::new();
        loop {
            let batch = reader.try_batch();
            if batch.is_empty() {
                break;
            }
            for c in batch.chunks {
                seen.push_str(&c.text);
            }
        }
        if seen.contains("line-50\n") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no output: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (id, fifo)
}

fn release(fifo: &std::path::Path) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(fifo)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"go\n"))
        .unwrap();
}

fn fifty_lines() -> String {
    (1..=50).map(|i| format!("line-{i}\n")).collect()
}

#[tokio::test]
async fn late_subscriber_gets_output_from_the_start_then_live_then_end() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&command_runtime(&fixture("lines-then-wait.sh")), dir.path()).await;
    let (id, fifo) = task_with_output_waiting(&server, dir.path()).await;
    // Subscribed after all 50 lines were produced: they come from the replay.
    let mut s = SseStream::open(server.addr, &format!("/api/executions/{id}/stream"), None).await;
    assert_eq!(s.status, 200);
    let mut replayed = Vec::new();
    while output_of(&replayed) != fifty_lines() {
        let ev = s.next().await.expect("replayed output");
        assert_eq!(ev.event, "message", "{ev:?}");
        replayed.push(ev);
    }
    assert_eq!(replayed[0].id, Some(1));
    // Then live output, then the end with the whole result and its own id.
    release(&fifo);
    let live = s.rest().await;
    let text = output_of(&live);
    assert!(text.starts_with("after-release\n"), "{text:?}");
    let end = live.last().unwrap();
    let last_chunk = live
        .iter()
        .rev()
        .find_map(|e| (e.event == "message").then_some(e.id))
        .flatten();
    assert_eq!(end.id, Some(last_chunk.unwrap() + 1));
    assert_eq!(live[0].id, Some(replayed.last().unwrap().id.unwrap() + 1));
    let result: Value = serde_json::from_str(&end.data).unwrap();
    assert_eq!(result["status"], "success", "{result}");
    assert_eq!(result["response"], "released");
    server.stop().await;
}

#[tokio::test]
async fn reconnect_with_last_event_id_resumes_after_it_and_a_finished_execution_replays() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&command_runtime(&fixture("lines-then-wait.sh")), dir.path()).await;
    let (id, fifo) = task_with_output_waiting(&server, dir.path()).await;
    let path = format!("/api/executions/{id}/stream");
    // First connection: take the first event, then go away.
    let first = {
        let mut s = SseStream::open(server.addr, &path, None).await;
        s.next().await.unwrap()
    };
    assert_eq!(first.id, Some(1));
    // Reconnect while it runs (the 50 lines may all be event 1): only what
    // follows event 1, then live output once the fixture goes on.
    let mut s = SseStream::open(server.addr, &path, Some(1)).await;
    assert_eq!(s.status, 200);
    release(&fifo);
    let after = s.rest().await;
    assert_eq!(after[0].id, Some(2), "{:?}", after[0]);
    let whole = format!("{}{}", first.data, output_of(&after));
    assert!(whole.starts_with(&fifty_lines()), "{whole:?}");
    assert!(whole.contains("after-release\n"), "{whole:?}");

    // The execution has finished: a new subscriber gets all of it, then end.
    let mut s = SseStream::open(server.addr, &path, None).await;
    let all = s.rest().await;
    assert_eq!(all[0].id, Some(1));
    assert_eq!(output_of(&all), whole);
    let end = all.last().unwrap();
    assert_eq!(end.id, after.last().unwrap().id);
    // After `end`, a reconnect is told there is nothing more (204), and a
    // malformed id is refused naming the header.
    let done = SseStream::open(server.addr, &path, end.id).await;
    assert_eq!(done.status, 204);
    let bad = request(
        server.addr,
        "GET",
        &path,
        &[("last-event-id", "x")],
        Bytes::new(),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("Last-Event-ID"), "{}", bad.text());
    server.stop().await;
}

#[tokio::test]
async fn tiny_replay_buffer_announces_dropped_events_then_continues() {
    let dir = tempfile::tempdir().unwrap();
    // 40,000 lines (229 KiB) are more than one pipe read (64 KiB), so there
    // are several chunks; a 1-byte bound keeps only the newest.
    let mut vars = command_runtime("seq 1 40000");
    vars.push(("AGENTD_STREAM_REPLAY_BYTES", "1".into()));
    let server = start(&vars, dir.path()).await;
    let r = post_json(server.addr, "/api/task", &json!({"prompt": "x"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["execution_id"].as_str().unwrap().to_owned();
    let path = format!("/api/executions/{id}/stream");
    let mut s = SseStream::open(server.addr, &path, None).await;
    let events = s.rest().await;
    assert_eq!(events[0].event, "dropped", "{:?}", events[0]);
    let missed = serde_json::from_str::<Value>(&events[0].data).unwrap()["missed_events"]
        .as_u64()
        .unwrap();
    assert!(missed >= 3, "missed {missed}");
    // It continues from the oldest retained chunk, which ends the output.
    assert_eq!(events[1].event, "message");
    assert_eq!(events[1].id, Some(missed + 1));
    assert!(output_of(&events).ends_with("39999\n40000\n"));
    assert_eq!(events.last().unwrap().event, "end");
    server.stop().await;
}

#[tokio::test]
async fn the_replay_total_holds_and_finished_executions_give_back_first() {
    let dir = tempfile::tempdir().unwrap();
    // Each task prints 229 KiB; the total holds one of them, not two.
    let mut vars = command_runtime("seq 1 40000");
    vars.push(("AGENTD_STREAM_REPLAY_TOTAL", "300KiB".into()));
    let server = start(&vars, dir.path()).await;
    let replay = |v: &Value| {
        let d = &v["diagnostics"];
        (
            d["stream_replay_bytes"].as_u64().unwrap(),
            d["stream_replay_total"].as_u64().unwrap(),
        )
    };
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = post_json(server.addr, "/api/task", &json!({"prompt": "x"})).await;
        assert_eq!(r.status, 200, "{}", r.text());
        ids.push(r.json()["execution_id"].as_str().unwrap().to_owned());
        let (held, total) = replay(&get(server.addr, "/health").await.json());
        assert_eq!(total, 300 << 10);
        assert!(held > 200 << 10 && held <= total, "{held} of {total}");
    }
    // The first task gave its buffer back: a subscriber is told so.
    let first = SseStream::open(
        server.addr,
        &format!("/api/executions/{}/stream", ids[0]),
        None,
    )
    .await
    .rest()
    .await;
    assert_eq!(first[0].event, "dropped", "{:?}", first[0]);
    // The second, newest, kept all of its output.
    let second = SseStream::open(
        server.addr,
        &format!("/api/executions/{}/stream", ids[1]),
        None,
    )
    .await
    .rest()
    .await;
    assert_eq!(second[0].id, Some(1));
    assert!(output_of(&second).starts_with("1\n2\n3\n"));
    assert!(output_of(&second).ends_with("39999\n40000\n"));
    // The compatibility name carries the tokio figure.
    let d = get(server.addr, "/health").await.json()["diagnostics"].clone();
    assert!(d["asyncio_task_count"].as_i64().unwrap() > 0, "{d}");
    assert!(d["tokio_alive_tasks"].as_i64().unwrap() > 0, "{d}");
    server.stop().await;
}
