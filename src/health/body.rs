//! The `GET /health` body, built for the rate `/health` is asked at.
//!
//! The body has two parts, and each is built as often as it changes:
//!
//! * **Per tick**: the `watchdog` block, `rlimit_nofile`, `runtime`, `agents`
//!   (the `acp` runtime's pool), `checks` and `trends` change only when the health loop publishes (a tick, or a
//!   trend sample). The loop renders them once into the verdict it publishes
//!   ([`render_tail`], kept in `Published`), as JSON text ready to copy.
//! * **Per request**: `status` (it goes stale by the clock), `uptime_seconds`,
//!   `accept_loop` and `diagnostics` are read when the request comes: atomics
//!   and the cached `/proc` snapshot, written with integer formatting straight
//!   into the response buffer, ahead of the copied tail ([`write_body`]).
//!
//! So a request builds no JSON tree, runs no serializer and allocates nothing
//! but the body itself; every gauge is still read live.
//!
//! Not here: routing and status codes (`server::health`), deciding health
//! (`checks`, `watchdog`).

use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use super::state::{Published, WatchdogMode};
use crate::accept::{AcceptCounts, REJECT_RATE_WINDOW_S};
use crate::app::App;
use crate::init::rlimit::RlimitOutcome;

// `rejected_per_second` is written as milli-rejections per second: exact
// only while the window divides 1000.
const _: () = assert!(1000 % REJECT_RATE_WINDOW_S == 0);

/// Seconds since the epoch for a unix-ms atomic (`None` → null: never).
fn at(ms: u64) -> Option<f64> {
    (ms != 0).then(|| ms as f64 / 1000.0)
}

/// Live gauges: atomics and the cached `/proc` snapshot only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Diagnostics {
    pub thread_count: i64,
    pub tokio_alive_tasks: i64,
    /// The same figure as `tokio_alive_tasks`, under the name clients of
    /// the original agent server read.
    pub asyncio_task_count: i64,
    pub running_executions: usize,
    pub queued_executions: usize,
    pub conversation_history_size: usize,
    pub conversation_history_limit: usize,
    pub open_fds: i64,
    pub fd_soft_limit: i64,
    pub fd_hard_limit: i64,
    pub rss_bytes: i64,
    pub store_queue: usize,
    /// Bytes every execution's replay buffer holds together, and their
    /// bound (`stream_replay_total`).
    pub stream_replay_bytes: usize,
    pub stream_replay_total: usize,
}

/// Read every live gauge now (no lock, no `/proc` read unless the cached
/// snapshot expired).
pub fn diagnostics(app: &App) -> Diagnostics {
    let p = app.health.gauges.get();
    let e = app.executor.gauges();
    let (size, limit) = app.history_gauges();
    let tasks = tokio::runtime::Handle::try_current()
        .map(|h| h.metrics().num_alive_tasks() as i64)
        .unwrap_or(-1);
    Diagnostics {
        thread_count: p.thread_count,
        tokio_alive_tasks: tasks,
        asyncio_task_count: tasks,
        running_executions: e.running,
        queued_executions: e.queued,
        conversation_history_size: size,
        conversation_history_limit: limit,
        open_fds: p.open_fds,
        fd_soft_limit: p.fd_soft,
        fd_hard_limit: p.fd_hard,
        rss_bytes: p.rss_bytes,
        store_queue: app.store.queued(),
        stream_replay_bytes: e.replay_bytes,
        stream_replay_total: e.replay_limit,
    }
}

#[derive(Serialize)]
pub struct WatchdogReport {
    mode: WatchdogMode,
    interval_ms: u64,
    deadline_ms: u64,
    last_tick_at: Option<f64>,
    last_ok_at: Option<f64>,
    consecutive_failures: u32,
    pings_sent: u64,
    ticks: u64,
}

/// The loop's counters. Only the loop changes them, in its tick, before it
/// publishes: so the per-tick rendering is as current as a live read.
pub fn watchdog_report(app: &App) -> WatchdogReport {
    let h = &app.health;
    WatchdogReport {
        mode: h.mode,
        interval_ms: h.interval.as_millis() as u64,
        deadline_ms: h.deadline.as_millis() as u64,
        last_tick_at: at(h.last_tick_ms.load(Relaxed)),
        last_ok_at: at(h.last_ok_ms.load(Relaxed)),
        consecutive_failures: h.consecutive_failures.load(Relaxed),
        pings_sent: h.notifier.pings_sent(),
        ticks: h.ticks.load(Relaxed),
    }
}

#[derive(Serialize)]
struct RlimitJson {
    outcome: RlimitOutcome,
    soft: i64,
    hard: i64,
}

/// The per-tick blocks, in the order the body has them.
#[derive(Serialize)]
struct TailJson<'a> {
    watchdog: WatchdogReport,
    rlimit_nofile: RlimitJson,
    /// The configured runtime, its program, and the CLI's version (read once
    /// at start).
    runtime: &'a crate::agent::runtimes::RuntimeReport,
    /// The warm ACP agent pool (`acp` runtime only), as of the tick.
    #[serde(skip_serializing_if = "Option::is_none")]
    agents: Option<crate::agent::runtime::AgentsReport>,
    checks: &'a RawValue,
    /// Leak trends, pre-rendered when the last sample was taken.
    trends: &'a RawValue,
}

/// `,"watchdog":{…},"rlimit_nofile":{…},"runtime":{…},"checks":{…},"trends":{…}`:
/// the per-tick part of the body, for the verdict `published` (`None`:
/// before the first tick, checks `{}`).
pub fn render_tail(app: &App, published: Option<&Published>) -> Bytes {
    let r = &app.health.rlimit;
    let empty = RawValue::from_string("{}".to_owned()).expect("valid JSON");
    let trends = app.health.trends.summary_json();
    let tail = TailJson {
        watchdog: watchdog_report(app),
        rlimit_nofile: RlimitJson {
            outcome: r.outcome,
            soft: r.soft,
            hard: r.hard,
        },
        runtime: &app.runtime_report,
        agents: app.runtime().agents(),
        checks: published.map(|p| &*p.checks_json).unwrap_or(&empty),
        trends: &trends,
    };
    let mut text = serde_json::to_vec(&tail).expect("the tail serializes");
    // `{…}` → `,…`: a fragment to append after the live blocks.
    text.pop();
    text[0] = b',';
    Bytes::from(text)
}

/// Render the per-tick part for `published` and keep it there, for every
/// `/health` until the next publication. Called by the loop after each tick
/// (before it publishes the verdict) and after each trend sample.
pub fn publish_tail(app: &App, published: &Published) {
    published.set_tail(render_tail(app, Some(published)));
}

/// Everything `/health` reads at request time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    pub uptime_us: u64,
    pub accept: AcceptCounts,
    pub diagnostics: Diagnostics,
}

impl Live {
    pub fn read(app: &App) -> Live {
        Live {
            uptime_us: app.started.elapsed().as_micros() as u64,
            accept: app.stats.counts(),
            diagnostics: diagnostics(app),
        }
    }
}

/// Room for the live part of the body: about 900 bytes with every gauge at
/// its widest ordinary value.
const LIVE_CAPACITY: usize = 1024;

/// The whole body: `status`, `detail`, `version`, the live blocks, the tail
/// (per tick), then `deep` (for `?deep=1`: its elapsed time and run count).
pub fn write_body(
    status: &str,
    detail: Option<&str>,
    live: &Live,
    tail: &[u8],
    deep: Option<(f64, u64)>,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(LIVE_CAPACITY + tail.len() + 64);
    b.extend_from_slice(b"{\"status\":\"");
    b.extend_from_slice(status.as_bytes());
    b.push(b'"');
    if let Some(detail) = detail {
        b.extend_from_slice(b",\"detail\":");
        serde_json::to_writer(&mut b, detail).expect("a string serializes");
    }
    b.extend_from_slice(concat!(",\"version\":\"", env!("CARGO_PKG_VERSION"), "\"").as_bytes());
    b.extend_from_slice(b",\"uptime_seconds\":");
    decimal(&mut b, live.uptime_us, 1_000_000);

    let a = &live.accept;
    b.extend_from_slice(b",\"accept_loop\":{\"connections_total\":");
    int(&mut b, a.connections_total);
    b.extend_from_slice(b",\"connections_open\":");
    int(&mut b, a.connections_open);
    b.extend_from_slice(b",\"connections_rejected\":");
    int(&mut b, a.connections_rejected);
    b.extend_from_slice(b",\"connections_max\":");
    int(&mut b, a.connections_max);
    b.extend_from_slice(if a.saturated {
        b",\"saturated\":true"
    } else {
        b",\"saturated\":false"
    });
    b.extend_from_slice(b",\"rejected_per_second\":");
    decimal(
        &mut b,
        a.rejected_in_window * (1000 / REJECT_RATE_WINDOW_S),
        1000,
    );
    b.extend_from_slice(b",\"probe_connections_reserved\":");
    int(&mut b, a.probe_connections_reserved);
    b.extend_from_slice(b",\"requests_total\":");
    int(&mut b, a.requests_total);
    b.extend_from_slice(b",\"accept_errors\":");
    int(&mut b, a.accept_errors);
    b.extend_from_slice(b",\"last_accept_at\":");
    unix_ms(&mut b, a.last_accept_ms);
    b.extend_from_slice(b",\"last_request_completed_at\":");
    unix_ms(&mut b, a.last_request_completed_ms);
    b.extend_from_slice(b",\"last_request_at\":");
    unix_ms(&mut b, a.last_request_completed_ms);

    let d = &live.diagnostics;
    b.extend_from_slice(b"},\"diagnostics\":{\"thread_count\":");
    int(&mut b, d.thread_count);
    b.extend_from_slice(b",\"tokio_alive_tasks\":");
    int(&mut b, d.tokio_alive_tasks);
    b.extend_from_slice(b",\"asyncio_task_count\":");
    int(&mut b, d.asyncio_task_count);
    b.extend_from_slice(b",\"running_executions\":");
    int(&mut b, d.running_executions);
    b.extend_from_slice(b",\"queued_executions\":");
    int(&mut b, d.queued_executions);
    b.extend_from_slice(b",\"conversation_history_size\":");
    int(&mut b, d.conversation_history_size);
    b.extend_from_slice(b",\"conversation_history_limit\":");
    int(&mut b, d.conversation_history_limit);
    b.extend_from_slice(b",\"open_fds\":");
    int(&mut b, d.open_fds);
    b.extend_from_slice(b",\"fd_soft_limit\":");
    int(&mut b, d.fd_soft_limit);
    b.extend_from_slice(b",\"fd_hard_limit\":");
    int(&mut b, d.fd_hard_limit);
    b.extend_from_slice(b",\"rss_bytes\":");
    int(&mut b, d.rss_bytes);
    b.extend_from_slice(b",\"store_queue\":");
    int(&mut b, d.store_queue);
    b.extend_from_slice(b",\"stream_replay_bytes\":");
    int(&mut b, d.stream_replay_bytes);
    b.extend_from_slice(b",\"stream_replay_total\":");
    int(&mut b, d.stream_replay_total);
    b.push(b'}');

    b.extend_from_slice(tail);
    if let Some((elapsed_ms, runs)) = deep {
        #[derive(Serialize)]
        struct DeepJson {
            elapsed_ms: f64,
            runs: u64,
        }
        b.extend_from_slice(b",\"deep\":");
        serde_json::to_writer(&mut b, &DeepJson { elapsed_ms, runs }).expect("serializes");
    }
    b.push(b'}');
    b
}

fn int(b: &mut Vec<u8>, n: impl itoa::Integer) {
    b.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `value / scale` (scale a power of ten) as the shortest decimal, with at
/// least one fractional digit: `1796486515.98`, `3.0`. For values with at
/// most 15 significant digits this is exactly what a JSON serializer prints
/// for the same quotient as an `f64`.
fn decimal(b: &mut Vec<u8>, value: u64, scale: u64) {
    int(b, value / scale);
    b.push(b'.');
    let mut frac = value % scale;
    if frac == 0 {
        b.push(b'0');
        return;
    }
    let mut digits = scale.ilog10();
    while frac.is_multiple_of(10) {
        frac /= 10;
        digits -= 1;
    }
    let text = itoa::Buffer::new().format(frac).len() as u32;
    b.extend(std::iter::repeat_n(b'0', (digits - text) as usize));
    int(b, frac);
}

/// Unix seconds for a unix-ms value, `null` for 0 (never).
fn unix_ms(b: &mut Vec<u8>, ms: u64) {
    if ms == 0 {
        b.extend_from_slice(b"null");
    } else {
        decimal(b, ms, 1000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accept::AcceptSnapshot;

    fn serde_text(v: f64) -> String {
        serde_json::to_string(&v).unwrap()
    }

    #[test]
    fn decimals_are_what_a_serializer_prints_for_the_same_quotient() {
        for ms in [
            1_796_486_515_986u64,
            1_796_486_515_000,
            1_796_486_515_050,
            1_796_486_515_005,
            1_796_486_515_100,
            1_000,
            1_234,
        ] {
            let mut b = Vec::new();
            unix_ms(&mut b, ms);
            assert_eq!(
                String::from_utf8(b).unwrap(),
                serde_text(ms as f64 / 1000.0)
            );
        }
        for us in [
            1_029_882u64,
            86_400_000_001,
            3_000_000,
            12_345_678_900,
            100_000,
        ] {
            let mut b = Vec::new();
            decimal(&mut b, us, 1_000_000);
            assert_eq!(String::from_utf8(b).unwrap(), serde_text(us as f64 / 1e6));
        }
        for rejected in [0u64, 1, 4, 5, 7, 12_345] {
            let mut b = Vec::new();
            decimal(&mut b, rejected * 200, 1000);
            assert_eq!(
                String::from_utf8(b).unwrap(),
                serde_text(rejected as f64 / REJECT_RATE_WINDOW_S as f64)
            );
        }
        let mut b = Vec::new();
        unix_ms(&mut b, 0);
        assert_eq!(b, b"null");
    }

    /// The body as a serializer writes it from the same values: the spliced
    /// body must be byte for byte the same.
    #[derive(Serialize)]
    struct Reference<'a> {
        status: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<&'a str>,
        version: &'static str,
        uptime_seconds: f64,
        accept_loop: AcceptSnapshot,
        diagnostics: Diagnostics,
        watchdog: serde_json::Value,
        checks: serde_json::Value,
    }

    #[test]
    fn spliced_body_is_byte_for_byte_the_serialized_body() {
        let live = Live {
            uptime_us: 93_784_123_456,
            accept: AcceptCounts {
                connections_total: 1_234_567,
                connections_open: 256,
                connections_rejected: 17,
                connections_max: 1024,
                saturated: true,
                rejected_in_window: 17,
                probe_connections_reserved: 3,
                requests_total: 9_876_543_210,
                accept_errors: 0,
                last_accept_ms: 1_796_486_515_986,
                last_request_completed_ms: 0,
            },
            diagnostics: Diagnostics {
                thread_count: 5,
                tokio_alive_tasks: 7,
                asyncio_task_count: 7,
                running_executions: 1,
                queued_executions: 2,
                conversation_history_size: 1000,
                conversation_history_limit: 1000,
                open_fds: -1,
                fd_soft_limit: i64::MAX,
                fd_hard_limit: i64::MAX,
                rss_bytes: 8_052_736,
                store_queue: 0,
                stream_replay_bytes: 123,
                stream_replay_total: 67_108_864,
            },
        };
        let tail = br#","watchdog":{"ticks":3},"checks":{"store":{"status":"ok"}}"#;
        let tail_json: serde_json::Value =
            serde_json::from_str(r#"{"watchdog":{"ticks":3},"checks":{"store":{"status":"ok"}}}"#)
                .unwrap();
        let detail = "store: \"state.db\" deleted\n";
        let spliced = write_body("degraded", Some(detail), &live, tail, None);
        let a = &live.accept;
        let reference = Reference {
            status: "degraded",
            detail: Some(detail),
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: live.uptime_us as f64 / 1e6,
            accept_loop: AcceptSnapshot {
                connections_total: a.connections_total,
                connections_open: a.connections_open,
                connections_rejected: a.connections_rejected,
                connections_max: a.connections_max,
                saturated: a.saturated,
                rejected_per_second: a.rejected_in_window as f64 / REJECT_RATE_WINDOW_S as f64,
                probe_connections_reserved: a.probe_connections_reserved,
                requests_total: a.requests_total,
                accept_errors: a.accept_errors,
                last_accept_at: at(a.last_accept_ms),
                last_request_completed_at: at(a.last_request_completed_ms),
                last_request_at: at(a.last_request_completed_ms),
            },
            diagnostics: live.diagnostics,
            watchdog: tail_json["watchdog"].clone(),
            checks: tail_json["checks"].clone(),
        };
        let expected = serde_json::to_string(&reference).unwrap();
        let got = String::from_utf8(spliced).unwrap();
        assert_eq!(got, expected);
        // Byte for byte: the live numbers as the serializer writes them.
        for (key, text) in [
            ("uptime_seconds", "93784.123456"),
            ("rejected_per_second", "3.4"),
            ("last_accept_at", "1796486515.986"),
            ("last_request_at", "null"),
            ("fd_soft_limit", "9223372036854775807"),
            ("open_fds", "-1"),
        ] {
            assert!(got.contains(&format!("\"{key}\":{text}")), "{key} in {got}");
        }
        assert!(got.starts_with(
            "{\"status\":\"degraded\",\"detail\":\"store: \\\"state.db\\\" deleted\\n\",\"version\":"
        ));
        assert!(got
            .ends_with(",\"watchdog\":{\"ticks\":3},\"checks\":{\"store\":{\"status\":\"ok\"}}}"));
        let diag = serde_json::to_string(&live.diagnostics).unwrap();
        assert!(got.contains(&format!("\"diagnostics\":{diag}")), "{got}");
    }
}
