//! `GET /metrics` against the real binary: well-formed exposition, every
//! `/health` gauge present with the same value, executions counted by kind and
//! outcome, store commits, and check/watchdog series that follow a real fault.
//! (`promtool check metrics` and a real Prometheus scrape are in
//! tests/people/run.sh.)

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use common::Daemon;
use serde_json::json;

/// Samples by `name{labels}` (labels as written), parsed from the text format.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("name value");
            let v = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")),
            };
            (series.to_owned(), v)
        })
        .collect()
}

fn get(rt: &tokio::runtime::Runtime, addr: SocketAddr, path: &str) -> common::Resp {
    rt.block_on(common::get(addr, path))
}

fn post(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    path: &str,
    body: serde_json::Value,
) -> u16 {
    rt.block_on(common::post_json(addr, path, &body)).status
}

/// Runtime that answers its prompt, except the prompt `fail` (exit 1, no
/// output), so one server produces both outcomes.
const PICKY: &str = r#"sh -c 'test "$0" != fail && echo "$0"' {prompt}"#;

#[test]
fn exposition_is_well_formed_and_follows_the_naming_rules() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&[("AGENTD_HEALTH_INTERVAL", "200ms")], dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = get(&rt, d.addr, "/metrics");
    assert_eq!(r.status, 200);
    let ct = r.headers["content-type"].to_str().unwrap();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let text = r.text();
    let mut helped = BTreeSet::new();
    let mut typed = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(helped.insert(name.to_owned()), "HELP twice for {name}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(helped.contains(name), "TYPE before HELP for {name}");
            assert!(typed.insert(name.to_owned(), kind.to_owned()).is_none());
        } else {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(name.starts_with("agentd_"), "{line}");
            let kind = typed
                .get(name)
                .unwrap_or_else(|| panic!("no TYPE for {line}"));
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
        }
    }
    let s = samples(&text);
    assert_eq!(
        s[&format!(
            "agentd_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )],
        1.0
    );
}

#[test]
fn metrics_carry_every_health_gauge_and_count_executions() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &[
            ("AGENTD_HEALTH_INTERVAL", "1h"),
            ("AGENTD_RUNTIME", "command"),
            ("AGENTD_RUNTIME_CMD", PICKY),
        ],
        dir.path(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    for prompt in ["one", "two", "fail"] {
        post(&rt, d.addr, "/api/chat", json!({"message": prompt}));
    }
    post(&rt, d.addr, "/api/task", json!({"prompt": "three"}));
    post(&rt, d.addr, "/api/task", json!({"prompt": "fail"}));

    let h = get(&rt, d.addr, "/health").json();
    let s = samples(&get(&rt, d.addr, "/metrics").text());
    let diag = &h["diagnostics"];
    // Gauges that do not move between the two reads (no traffic, no tick).
    for (health, metric) in [
        ("conversation_history_size", "agentd_history_size"),
        ("conversation_history_limit", "agentd_history_limit"),
        ("running_executions", "agentd_executions_running"),
        ("queued_executions", "agentd_executions_queued"),
        ("store_queue", "agentd_store_queue"),
        ("fd_soft_limit", "agentd_process_max_fds"),
        ("fd_hard_limit", "agentd_process_max_fds_hard"),
    ] {
        assert_eq!(
            diag[health].as_f64().unwrap(),
            s[metric],
            "{health} vs {metric}"
        );
    }
    // Gauges that may move a little between the reads: present and plausible.
    for metric in [
        "agentd_process_open_fds",
        "agentd_process_threads",
        "agentd_process_resident_memory_bytes",
        "agentd_tokio_alive_tasks",
        "agentd_uptime_seconds",
        "agentd_connections_open",
    ] {
        assert!(s[metric] > 0.0, "{metric}");
    }
    let count = |kind: &str, outcome: &str| {
        s[&format!("agentd_executions_total{{kind=\"{kind}\",outcome=\"{outcome}\"}}")]
    };
    assert_eq!(count("chat", "success"), 2.0);
    assert_eq!(count("chat", "failed"), 1.0);
    assert_eq!(count("task", "success"), 1.0);
    assert_eq!(count("task", "failed"), 1.0);
    assert_eq!(count("task", "timeout"), 0.0);
    assert_eq!(s["agentd_executions_started_total"], 5.0);
    // Every message in memory was committed first (the store started empty).
    assert_eq!(
        s["agentd_store_committed_messages_total"],
        diag["conversation_history_size"].as_f64().unwrap()
    );
    assert!(s["agentd_store_commits_total"] >= 1.0);
    let a = &h["accept_loop"];
    assert_eq!(
        s["agentd_connections_max"],
        a["connections_max"].as_f64().unwrap()
    );
    assert_eq!(s["agentd_accept_loop_saturated"], 0.0);
    assert_eq!(a["saturated"], false);
    assert_eq!(s["agentd_connections_rejected_per_second"], 0.0);
    assert_eq!(s["agentd_health_status{status=\"healthy\"}"], 1.0);
    for check in ["self_probe", "state_lock", "store", "executor"] {
        assert_eq!(
            s[&format!("agentd_health_check_ok{{check=\"{check}\"}}")],
            1.0
        );
        let secs = s[&format!("agentd_health_check_duration_seconds{{check=\"{check}\"}}")];
        assert!((0.0..60.0).contains(&secs), "{check}: {secs}");
    }
    let w = &h["watchdog"];
    assert_eq!(
        s["agentd_watchdog_ticks_total"],
        w["ticks"].as_f64().unwrap()
    );
    assert_eq!(
        s["agentd_watchdog_pings_total"],
        w["pings_sent"].as_f64().unwrap()
    );
    assert_eq!(s["agentd_watchdog_failed_ticks_total"], 0.0);
    assert_eq!(s["agentd_watchdog_mode{mode=\"off\"}"], 1.0);
    assert_eq!(s["agentd_watchdog_interval_seconds"], 3600.0);
    assert_eq!(
        s["agentd_watchdog_check_deadline_seconds"],
        w["deadline_ms"].as_f64().unwrap() / 1000.0
    );
}

#[cfg(feature = "fault-injection")]
#[test]
fn a_failing_check_shows_in_check_and_watchdog_series() {
    use common::WAIT;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &[
            ("AGENTD_HEALTH_INTERVAL", "200ms"),
            ("AGENTD_FAULT_INJECTION", "1"),
        ],
        dir.path(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let injected = rt.block_on(common::inject_fault(d.addr, "deadlock-state"));
    assert_eq!(injected, 200);
    let deadline = Instant::now() + WAIT;
    let s = loop {
        let s = samples(&get(&rt, d.addr, "/metrics").text());
        if s["agentd_watchdog_failed_ticks_total"] >= 2.0 {
            break s;
        }
        assert!(Instant::now() < deadline, "no failed tick counted: {s:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(s["agentd_health_check_ok{check=\"state_lock\"}"], 0.0);
    assert_eq!(s["agentd_health_check_ok{check=\"store\"}"], 1.0);
    assert_eq!(s["agentd_health_status{status=\"degraded\"}"], 1.0);
    assert_eq!(s["agentd_health_status{status=\"healthy\"}"], 0.0);
    assert!(s["agentd_watchdog_consecutive_failures"] >= 1.0);
    // The deadline shows in the duration: the lock wait ran until it expired.
    assert!(s["agentd_health_check_duration_seconds{check=\"state_lock\"}"] > 0.05);
}

#[test]
fn runtime_and_leak_trends_match_health() {
    use common::WAIT;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &[
            ("AGENTD_HEALTH_INTERVAL", "1h"),
            ("AGENTD_TREND_INTERVAL", "50ms"),
            ("AGENTD_TREND_WINDOW", "10s"),
        ],
        dir.path(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Wait (bounded) for a few samples, so every gauge has a slope.
    let deadline = Instant::now() + WAIT;
    let h = loop {
        let h = get(&rt, d.addr, "/health").json();
        if h["trends"]["samples"].as_u64().unwrap_or(0) >= 3 {
            break h;
        }
        assert!(Instant::now() < deadline, "no trend samples: {h}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = get(&rt, d.addr, "/metrics").text();
    let s = samples(&text);
    // Samples keep arriving between the two reads: at least as many.
    assert!(s["agentd_trend_samples"] >= h["trends"]["samples"].as_f64().unwrap());
    let slopes = h["trends"]["slope_per_hour"].as_object().unwrap();
    assert!(!slopes.is_empty());
    for gauge in slopes.keys() {
        let slope = format!("agentd_trend_slope_per_second{{gauge=\"{gauge}\"}}");
        let leak = format!("agentd_trend_suspected_leak{{gauge=\"{gauge}\"}}");
        assert!(s.contains_key(&slope), "{slope} missing:\n{text}");
        assert!([0.0, 1.0].contains(&s[&leak]), "{leak}");
    }
    let r = &h["runtime"];
    assert_eq!(r["name"], "echo");
    let info = format!(
        "agentd_runtime_info{{name=\"echo\",command=\"\",version=\"{}\"}}",
        r["version"].as_str().unwrap_or("")
    );
    assert_eq!(s[&info], 1.0, "{text}");
    assert_eq!(s["agentd_runtime_runnable"], 1.0);
}
