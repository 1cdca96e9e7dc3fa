//! A write lock on `state.db` held by another process (an operator's
//! `sqlite3` shell, a backup script) makes agentd *degraded*, never wedged:
//! `/health` keeps answering at once, the self-probe passes, the `store`
//! check says `database is locked`, writes answer 503 within the busy
//! timeout and store nothing, `WATCHDOG=1` goes on, and all of it heals by
//! itself when the lock goes. The real binary, a real file, and the lock
//! taken by this test process through its own SQLite connection.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use agentd::store_watch::BUSY_TIMEOUT;
use common::notify::{has_line, NotifyReceiver};
use common::{agentd_bin, get, post_json, Daemon, WAIT};
use serde_json::json;

/// How long the lock is held: many ticks and many busy timeouts. The
/// real-systemd suite holds it for 60 s (`tests/systemd`).
const HOLD: Duration = Duration::from_secs(10);

/// Interval 0.5 s, deadline 0.25 s: a tick blocked behind the lock would
/// miss its deadline many times over within `HOLD`.
const WATCHDOG_USEC: &str = "1500000";

fn chat(text: &str) -> serde_json::Value {
    json!({"message": text, "session_id": "locked"})
}

async fn get_within(addr: std::net::SocketAddr, path: &str) -> (common::Resp, Duration) {
    let began = Instant::now();
    let r = tokio::time::timeout(WAIT, get(addr, path))
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no answer within {WAIT:?}"));
    (r, began.elapsed())
}

fn store_detail(body: &serde_json::Value) -> String {
    body["checks"]["store"]["detail"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_by_another_process_degrades_and_heals_without_a_wedge() {
    let dir = tempfile::tempdir().unwrap();
    let rx = NotifyReceiver::path();
    let socket = rx.env_value();
    let d = Daemon::start(
        &[
            ("NOTIFY_SOCKET", socket.as_str()),
            ("WATCHDOG_USEC", WATCHDOG_USEC),
        ],
        dir.path(),
    );
    assert!(
        rx.wait_for(|m| has_line(m, "READY=1"), WAIT).is_some(),
        "READY=1: {}",
        d.log_text()
    );
    let addr = d.addr;
    assert_eq!(
        post_json(addr, "/api/chat", &chat("before")).await.status,
        200
    );

    let other = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let locked_at = Instant::now();
    let pings_at_lock = rx.count(|m| has_line(m, "WATCHDOG=1"));

    // The check names the lock within a tick plus the busy timeout (bounded
    // here by WAIT, not timed).
    let body = loop {
        let (r, _) = get_within(addr, "/health").await;
        let body = r.json();
        if r.status == 503 && body["checks"]["store"]["status"] == "degraded" {
            break body;
        }
        assert!(
            locked_at.elapsed() < WAIT,
            "store not degraded within {WAIT:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body["status"], "degraded", "{body}");
    assert!(store_detail(&body).contains("database is locked"), "{body}");

    // While the lock is held: every answer comes, and quickly; the deep
    // run proves anew and names the lock; writes are refused within the
    // busy timeout; `agentd health --deep` exits non-zero.
    let mut slowest = Duration::ZERO;
    let mut rounds = 0;
    let mut refused = Vec::new();
    while locked_at.elapsed() < HOLD {
        rounds += 1;
        let (r, took) = get_within(addr, "/health").await;
        slowest = slowest.max(took);
        assert_eq!(r.status, 503, "{}", r.text());
        let body = r.json();
        assert_eq!(body["checks"]["self_probe"]["status"], "ok", "{body}");
        assert_eq!(body["checks"]["store"]["status"], "degraded", "{body}");

        let (r, _) = get_within(addr, "/health?deep=1").await;
        assert_eq!(r.status, 503, "{}", r.text());
        let deep = r.json();
        assert_eq!(deep["status"], "degraded", "{deep}");
        assert_eq!(deep["checks"]["store"]["status"], "degraded", "{deep}");
        assert!(store_detail(&deep).contains("database is locked"), "{deep}");
        assert_eq!(deep["checks"]["self_probe"]["status"], "ok", "{deep}");

        let text = format!("refused-{rounds}");
        let began = Instant::now();
        let r = tokio::time::timeout(WAIT, post_json(addr, "/api/chat", &chat(&text)))
            .await
            .expect("a write is answered");
        let took = began.elapsed();
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.text().contains("database is locked"), "{}", r.text());
        assert!(
            took < BUSY_TIMEOUT * 2,
            "a write waited {took:?} (busy timeout {BUSY_TIMEOUT:?})"
        );
        refused.push(text);

        let health = Command::new(agentd_bin())
            .args(["health", "--deep", "--url", &format!("http://{addr}")])
            .output()
            .unwrap();
        assert_eq!(
            health.status.code(),
            Some(1),
            "agentd health --deep: {}",
            String::from_utf8_lossy(&health.stdout)
        );
    }
    assert!(rounds >= 2, "{rounds} rounds within {HOLD:?}");
    // A worker blocked behind the lock would hold a request for the busy
    // timeout or for ever; an answer from the snapshot takes microseconds.
    assert!(
        slowest < BUSY_TIMEOUT,
        "slowest /health while locked: {slowest:?}"
    );
    let pings = rx.count(|m| has_line(m, "WATCHDOG=1")) - pings_at_lock;
    let ticks = (locked_at.elapsed().as_millis() / 500) as usize;
    assert!(
        pings * 2 >= ticks,
        "{pings} WATCHDOG=1 in {ticks} ticks while locked: {}",
        d.log_text()
    );
    assert!(
        !d.log_text().contains("stalled"),
        "the sentinel saw a stall: {}",
        d.log_text()
    );

    other.execute_batch("ROLLBACK").unwrap();
    drop(other);
    let released = Instant::now();
    loop {
        let (r, _) = get_within(addr, "/health").await;
        if r.status == 200 {
            assert_eq!(r.json()["status"], "healthy");
            break;
        }
        assert!(
            released.elapsed() < WAIT,
            "not healthy within {WAIT:?} of the release: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (r, _) = get_within(addr, "/health?deep=1").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        post_json(addr, "/api/chat", &chat("after")).await.status,
        200
    );
    let (r, _) = get_within(addr, "/api/chat/history?session_id=locked").await;
    let history = r.json();
    let stored = common::user_messages(&history);
    assert_eq!(stored, ["before", "after"], "refused: {refused:?}");
}
