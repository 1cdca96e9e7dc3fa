//! Leak trends on a compressed time base: a real `agentd serve` sampling
//! every 50 ms. With the `leak-fd-per-tick` fault (one fd leaked per health
//! tick) `suspected_leak` names `open_fds`; a flat run names nothing.
//! Each server is its own process: fds are per process, so a leak in one
//! test cannot show in another's gauges.

mod common;

use std::time::{Duration, Instant};

use common::{get, post_json, Daemon, WAIT};
use serde_json::json;

const COMPRESSED: &[(&str, &str)] = &[
    ("AGENTD_HEALTH_INTERVAL", "50ms"),
    ("AGENTD_TREND_INTERVAL", "50ms"),
    ("AGENTD_TREND_WINDOW", "5s"),
    ("AGENTD_FAULT_INJECTION", "1"),
];

/// Poll `/health` until `done` holds for its `trends` block, bounded by WAIT.
async fn trends_until(
    addr: std::net::SocketAddr,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let body = get(addr, "/health").await.json();
        let trends = body["trends"].clone();
        if done(&trends) {
            return trends;
        }
        assert!(
            started.elapsed() < WAIT,
            "{what}: not reached within {WAIT:?}; last trends: {trends}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn names(trends: &serde_json::Value) -> Vec<String> {
    trends["suspected_leak"]
        .as_array()
        .expect("suspected_leak is a list")
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// Needs the `fault-injection` feature (`cargo test --all-features`, as CI runs).
#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn leaking_one_fd_per_tick_is_named_open_fds() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(COMPRESSED, dir.path());
    let r = post_json(daemon.addr, "/debug/fault/leak-fd-per-tick", &json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let fds_before = daemon.open_fds();
    let trends = trends_until(daemon.addr, "open_fds suspected", |t| {
        names(t).iter().any(|n| n == "open_fds")
    })
    .await;
    assert_eq!(names(&trends), ["open_fds"], "{trends}");
    assert!(trends["slope_per_hour"]["open_fds"].as_f64().unwrap() > 0.0);
    assert!(trends["samples"].as_u64().unwrap() >= 10);
    assert!(
        daemon.open_fds() >= fds_before + 10,
        "the fault really leaks"
    );
    eprintln!("leak run: {trends}");
}

#[tokio::test]
async fn a_flat_run_names_nothing_and_trends_lists_samples_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(COMPRESSED, dir.path());
    // Some ordinary traffic while the ring fills.
    for i in 0..20 {
        let body = json!({"message": format!("m{i}"), "session_id": "flat"});
        assert_eq!(post_json(daemon.addr, "/api/chat", &body).await.status, 200);
    }
    let trends = trends_until(daemon.addr, "40 samples", |t| {
        t["samples"].as_u64().unwrap_or(0) >= 40
    })
    .await;
    assert!(names(&trends).is_empty(), "{trends}");
    assert_eq!(trends["window_seconds"], 5);
    assert_eq!(trends["sample_interval_seconds"], 0.05);
    for gauge in [
        "thread_count",
        "open_fds",
        "rss_bytes",
        "tokio_alive_tasks",
        "conversation_history_size",
        "store_queue",
    ] {
        assert!(
            trends["slope_per_hour"][gauge].is_number(),
            "{gauge}: {trends}"
        );
    }

    let all = get(daemon.addr, "/health/trends").await;
    assert_eq!(all.status, 200);
    let all = all.json();
    assert_eq!(all["sample_interval_seconds"], 0.05);
    assert_eq!(all["gauges"].as_array().unwrap().len(), 6);
    let samples = all["samples"].as_array().unwrap();
    assert!(samples.len() >= 40 && samples.len() <= 100, "bounded ring");
    let at: Vec<f64> = samples.iter().map(|s| s["at"].as_f64().unwrap()).collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]), "oldest first");
    assert!(samples[0]["open_fds"].as_i64().unwrap() > 0);
    eprintln!("flat run: {trends}");
}
