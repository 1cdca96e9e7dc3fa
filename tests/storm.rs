//! Storm and slowloris against the real binary, on loopback: a connection
//! storm with a reconnect loop, slowloris connections, and connections that
//! send large unfinished headers.
//!
//! What must hold: a flood that fills every connection slot is load, not a
//! wedge (the health loop keeps passing, `/health` says `saturated`, the
//! self-probe is served on its reserved slot); threads stay at the worker
//! count plus a few (connections are tasks); RSS stays within what the
//! header limit allows. Figures (RSS, threads, a separate keep-alive client's
//! `/health` latency) are printed, never asserted as times.
//!
//! Counts are reduced by default; `AGENTD_FULL_SUITES=1` runs the full ones
//! (5,000 storm connections, 1,000 slowloris, 1,000 large headers).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Conn, Daemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The sizes of one run.
struct Counts {
    storm: usize,
    slowloris: usize,
    large_headers: usize,
    /// Reconnects per storm connection, at most.
    reconnects: usize,
    /// How long each phase holds its connections.
    phase: Duration,
}

fn counts() -> Counts {
    if std::env::var("AGENTD_FULL_SUITES").as_deref() == Ok("1") {
        Counts {
            storm: 5_000,
            slowloris: 1_000,
            large_headers: 1_000,
            reconnects: 100,
            phase: Duration::from_secs(8),
        }
    } else {
        Counts {
            // Twice the cap, so the flood fills it however slowly the
            // clients' connects complete on a loaded machine.
            storm: 2 * MAX_CONNECTIONS,
            slowloris: 200,
            large_headers: 200,
            reconnects: 50,
            phase: Duration::from_secs(3),
        }
    }
}

/// Health tick of the server under test: `WatchdogSec=6` / 3, the setting
/// under which a 5,000-connection storm used to stop the pings.
const HEALTH_INTERVAL: &str = "2s";
/// systemd restarts when no ping came for this long (3 ticks).
const WATCHDOG_SEC: f64 = 6.0;

/// Connection cap of the server under test (the shipped default).
const MAX_CONNECTIONS: usize = 1024;
/// Header limit of the server under test (the shipped default).
const MAX_HEADER_BYTES: usize = 64 << 10;
/// Bytes an unfinished large header sends: just under the limit, so the
/// server must keep it buffered.
const UNFINISHED_HEADER_BYTES: usize = 60 << 10;
/// Bytes an over-limit header tries to send (the size that took RSS to
/// 400 MB before the limit existed).
const OVERSIZED_HEADER_BYTES: usize = 384 << 10;

/// One process's gauges from /proc.
fn proc_status(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("Threads:"), field("VmRSS:") * 1024)
}

/// Peak threads and RSS of `pid`, sampled every 50 ms until `stop`.
fn sample_peaks(pid: u32, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let (mut threads, mut rss) = (0, 0);
        // Bounded: the phases end well within 10 minutes.
        for _ in 0..12_000 {
            let (t, r) = proc_status(pid);
            threads = threads.max(t);
            rss = rss.max(r);
            if stop.load(Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (threads, rss)
    })
}

/// A separate keep-alive client polling `/health` every 20 ms: latencies,
/// and whether it saw a tick that passed while the accept loop was
/// saturated (and the probe used a reserved slot).
struct Monitor {
    latencies_us: Vec<u64>,
    non_200: usize,
    /// Most failed ticks in a row seen.
    max_consecutive_failures: u64,
    /// Longest time between two passing ticks (`watchdog.last_ok_at`): the
    /// longest a systemd watchdog would have gone without a ping.
    max_ping_gap_s: f64,
    /// Reopened connections that were turned away at the cap.
    turned_away: usize,
    saturated_and_healthy: usize,
    max_rejected_per_second: f64,
    max_probe_reserved: u64,
    /// Most client connections open at once, as `/health` reported them.
    max_open: u64,
}

/// `seen` turns true once a passing tick under saturation and a rejection
/// rate were both observed, so the storm can end as soon as it has shown
/// what it is for.
async fn monitor(addr: SocketAddr, stop: Arc<AtomicBool>, seen: Arc<AtomicBool>) -> Monitor {
    let mut conn = Conn::open(addr).await.expect("monitor connects first");
    let mut reconnects = 0;
    let mut m = Monitor {
        latencies_us: Vec::new(),
        non_200: 0,
        max_consecutive_failures: 0,
        max_ping_gap_s: 0.0,
        turned_away: 0,
        saturated_and_healthy: 0,
        max_rejected_per_second: 0.0,
        max_probe_reserved: 0,
        max_open: 0,
    };
    let mut first_tick_while_saturated: Option<u64> = None;
    let mut last_ok: Option<f64> = None;
    // Bounded by count and by the stop flag.
    for _ in 0..30_000 {
        if stop.load(Relaxed) {
            break;
        }
        let t = Instant::now();
        let r = match conn.send("GET", "/health", &[], bytes::Bytes::new()).await {
            Ok(r) => r,
            Err(_) => {
                // The server closed our keep-alive connection (its header
                // timeout, if this client was starved of CPU): reopen it,
                // which during the flood may take a few tries.
                reconnects += 1;
                assert!(reconnects < 1_000, "the monitor cannot reconnect");
                if let Ok(c) = Conn::open(addr).await {
                    conn = c;
                }
                continue;
            }
        };
        if r.status == 503 && r.json()["error"]["code"] == "too_many_connections" {
            // Reopening during the flood was turned away: load, as designed.
            m.turned_away += 1;
            if let Ok(c) = Conn::open(addr).await {
                conn = c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        m.latencies_us.push(t.elapsed().as_micros() as u64);
        let v = r.json();
        if r.status != 200 {
            m.non_200 += 1;
            eprintln!(
                "monitor: /health {}: {} ({})",
                r.status, v["detail"], v["checks"]
            );
        }
        m.max_consecutive_failures = m
            .max_consecutive_failures
            .max(v["watchdog"]["consecutive_failures"].as_u64().unwrap_or(0));
        if let Some(ok) = v["watchdog"]["last_ok_at"].as_f64() {
            if let Some(prev) = last_ok {
                m.max_ping_gap_s = m.max_ping_gap_s.max(ok - prev);
            }
            last_ok = Some(ok);
        }
        let accept = &v["accept_loop"];
        let ticks = v["watchdog"]["ticks"].as_u64().unwrap_or(0);
        m.max_rejected_per_second = m
            .max_rejected_per_second
            .max(accept["rejected_per_second"].as_f64().unwrap_or(0.0));
        m.max_open = m
            .max_open
            .max(accept["connections_open"].as_u64().unwrap_or(0));
        m.max_probe_reserved = m
            .max_probe_reserved
            .max(accept["probe_connections_reserved"].as_u64().unwrap_or(0));
        if accept["saturated"] == true {
            // A tick that ran after saturation began and passed.
            match first_tick_while_saturated {
                None => first_tick_while_saturated = Some(ticks),
                Some(t0) if ticks > t0 && v["status"] == "healthy" => m.saturated_and_healthy += 1,
                _ => {}
            }
        }
        if m.saturated_and_healthy > 0 && m.max_rejected_per_second > 0.0 {
            seen.store(true, Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    m
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Pause before a reconnect: the turned-away clients keep the cap under
/// pressure for the whole phase instead of spending their reconnects in
/// the first milliseconds.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// Hold a connection that sends nothing; when the server closes it,
/// reconnect (at most `reconnects` times, `RECONNECT_PAUSE` apart) until
/// `stop`.
async fn storm_client(
    addr: SocketAddr,
    reconnects: usize,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
) {
    for _ in 0..=reconnects {
        if stop.load(Relaxed) {
            return;
        }
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
        else {
            tokio::time::sleep(RECONNECT_PAUSE).await;
            continue;
        };
        opened.fetch_add(1, Relaxed);
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                },
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if stop.load(Relaxed) {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

/// Slowloris: a request line, then one header byte every 200 ms, never the
/// end of the headers, until the server closes or `stop`.
async fn slowloris_client(addr: SocketAddr, stop: Arc<AtomicBool>) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return;
    };
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .is_err()
    {
        return;
    }
    for _ in 0..10_000 {
        if stop.load(Relaxed) || s.write_all(b"a").await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Send `bytes` of one never-ending header, then hold the connection until
/// the server closes it or `stop`. Returns the status the server answered
/// with, if any.
async fn large_header_client(addr: SocketAddr, bytes: usize, stop: Arc<AtomicBool>) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let mut head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Large: ".to_vec();
    head.resize(bytes, b'a');
    // The server may answer 431 and close before all of it is written.
    let _ = s.write_all(&head).await;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        tokio::select! {
            r = s.read(&mut chunk) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if stop.load(Relaxed) {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_slowloris_and_large_headers_are_load_not_a_wedge() {
    let c = counts();
    // Clients and server both need descriptors: raise ours (the server
    // inherits the hard limit and raises its own).
    let rl = agentd::init::rlimit::raise_nofile(1 << 16);
    let need = (c.storm + c.slowloris.max(c.large_headers) + 256) as i64;
    assert!(
        rl.soft >= need,
        "RLIMIT_NOFILE soft limit {} is below the {need} descriptors this suite needs",
        rl.soft
    );

    let dir = tempfile::tempdir().unwrap();
    let max_conn = MAX_CONNECTIONS.to_string();
    let header = MAX_HEADER_BYTES.to_string();
    let d = Daemon::start(
        &[
            ("AGENTD_MAX_CONNECTIONS", max_conn.as_str()),
            ("AGENTD_MAX_HEADER_BYTES", header.as_str()),
            // Short enough that the storm's idle connections are closed and
            // reopened (the reconnect loop) within a phase.
            ("AGENTD_HEADER_READ_TIMEOUT", "2s"),
            // The tick systemd's `WatchdogSec=6` gives (a third of it).
            ("AGENTD_HEALTH_INTERVAL", HEALTH_INTERVAL),
            ("AGENTD_NOFILE_TARGET", "65536"),
        ],
        dir.path(),
    );
    let addr = d.addr;
    let pid = d.pid();
    // Wait (bounded) for the first passing tick.
    let mut probe = Conn::open(addr).await.unwrap();
    for _ in 0..200 {
        if probe.get("/health").await.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    drop(probe);
    let (idle_threads, idle_rss) = proc_status(pid);

    let stop_all = Arc::new(AtomicBool::new(false));
    let peaks = sample_peaks(pid, stop_all.clone());
    let monitor_stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicBool::new(false));
    // On a thread and runtime of its own, so the flood's client tasks do not
    // delay it.
    let monitor = {
        let stop = monitor_stop.clone();
        let seen = seen.clone();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(monitor(addr, stop, seen))
        })
    };

    // --- phase 1: storm + reconnect loop
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    let storm: Vec<_> = (0..c.storm)
        .map(|_| {
            tokio::spawn(storm_client(
                addr,
                c.reconnects,
                stop.clone(),
                opened.clone(),
            ))
        })
        .collect();
    // At least one phase, and on a loaded machine longer: until the monitor
    // saw a tick pass under saturation (bounded; the storm clients'
    // reconnects keep the pressure up for about this long).
    tokio::time::sleep(c.phase).await;
    let storm_deadline = Instant::now() + Duration::from_secs(20);
    while !seen.load(Relaxed) && Instant::now() < storm_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Relaxed);
    for t in storm {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    let storm_opened = opened.load(Relaxed);

    // --- phase 2: slowloris
    let stop = Arc::new(AtomicBool::new(false));
    let slow: Vec<_> = (0..c.slowloris)
        .map(|_| tokio::spawn(slowloris_client(addr, stop.clone())))
        .collect();
    tokio::time::sleep(c.phase).await;
    stop.store(true, Relaxed);
    for t in slow {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }

    // --- phase 3: large unfinished headers (half just under the limit and
    // held, half far over it)
    let (_, rss_before_headers) = proc_status(pid);
    let stop = Arc::new(AtomicBool::new(false));
    let large: Vec<_> = (0..c.large_headers)
        .map(|i| {
            let bytes = if i % 2 == 0 {
                UNFINISHED_HEADER_BYTES
            } else {
                OVERSIZED_HEADER_BYTES
            };
            tokio::spawn(large_header_client(addr, bytes, stop.clone()))
        })
        .collect();
    // Peak RSS of this phase, sampled while the connections are held.
    let mut header_phase_rss = 0;
    let phase_end = Instant::now() + c.phase;
    while Instant::now() < phase_end {
        header_phase_rss = header_phase_rss.max(proc_status(pid).1);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Relaxed);
    let mut answered_431 = 0;
    for t in large {
        if let Ok(Ok(Some(431))) = tokio::time::timeout(Duration::from_secs(30), t).await {
            answered_431 += 1;
        }
    }

    monitor_stop.store(true, Relaxed);
    let m = monitor.join().unwrap();
    stop_all.store(true, Relaxed);
    let (peak_threads, peak_rss) = peaks.join().unwrap();

    // After the storm: healthy, and every connection slot free again.
    let mut after = Conn::open(addr).await.unwrap();
    let mut health = after.get("/health").await;
    for _ in 0..200 {
        if health.status == 200 && health.json()["accept_loop"]["connections_open"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        health = after.get("/health").await;
    }
    let v = health.json();

    let mut lat = m.latencies_us.clone();
    lat.sort_unstable();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "storm: {} clients, {storm_opened} connections opened (with reconnects); \
         slowloris: {}; large headers: {} ({} answered 431)",
        c.storm, c.slowloris, c.large_headers, answered_431
    );
    eprintln!(
        "server threads: idle {idle_threads}, peak {peak_threads}; RSS: idle {:.1} MiB, \
         before headers {:.1} MiB, header phase peak {:.1} MiB, overall peak {:.1} MiB",
        mib(idle_rss),
        mib(rss_before_headers),
        mib(header_phase_rss),
        mib(peak_rss)
    );
    eprintln!(
        "separate keep-alive client /health: {} requests, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, \
         {} not 200 (most failed ticks in a row: {}, longest gap between passing ticks {:.1} s), {} reopened connections turned away; ticks passed while saturated: {}; max rejected/s {:.0}; \
         probe connections on a reserved slot: {}; most connections open at once: {}/{MAX_CONNECTIONS}",
        lat.len(),
        percentile(&lat, 0.5) as f64 / 1000.0,
        percentile(&lat, 0.99) as f64 / 1000.0,
        lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        m.non_200,
        m.max_consecutive_failures,
        m.max_ping_gap_s,
        m.turned_away,
        m.saturated_and_healthy,
        m.max_rejected_per_second,
        m.max_probe_reserved,
        m.max_open
    );

    // Load, not a wedge.
    // A tick may fail when the clients take the CPU of a small machine; what
    // must not happen is a gap in the pings as long as `WatchdogSec`.
    assert!(
        m.max_ping_gap_s < WATCHDOG_SEC,
        "passing ticks {:.1} s apart during the storm (WatchdogSec {WATCHDOG_SEC})",
        m.max_ping_gap_s
    );
    assert!(
        m.saturated_and_healthy > 0,
        "no passing tick was seen while the accept loop was saturated"
    );
    assert!(
        m.max_rejected_per_second > 0.0,
        "no rejection rate was reported"
    );
    assert!(
        m.max_probe_reserved > 0,
        "the self-probe never needed its reserved slot: the flood did not fill the cap"
    );
    assert_eq!(v["status"], "healthy", "{v}");
    assert_eq!(v["watchdog"]["consecutive_failures"], 0, "{v}");
    // Connections are tasks: a handful of threads beyond the idle set (the
    // blocking pool may start one or two).
    assert!(
        peak_threads <= idle_threads + 4,
        "threads grew from {idle_threads} to {peak_threads}"
    );
    // Header memory is bounded by connections × the header limit; allow the
    // same again for hyper's and the allocator's slack, plus 64 MiB.
    let held = (c.large_headers.min(MAX_CONNECTIONS)) as u64;
    let bound = rss_before_headers + 2 * held * MAX_HEADER_BYTES as u64 + (64 << 20);
    assert!(
        header_phase_rss <= bound,
        "RSS {:.1} MiB over the bound {:.1} MiB",
        mib(header_phase_rss),
        mib(bound)
    );
    assert!(answered_431 > 0, "no oversized header was answered 431");
    drop(after);
}

/// With every client slot held, the self-probe still passes (it comes in
/// through its door on a reserved slot) and `/health` says saturated.
#[tokio::test]
async fn the_probe_passes_while_clients_hold_every_slot() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::TestServer::start(&[("AGENTD_MAX_CONNECTIONS", "2")], dir.path()).await;
    let mut c1 = Conn::open(server.addr).await.unwrap();
    let mut c2 = Conn::open(server.addr).await.unwrap();
    assert_eq!(c1.get("/health").await.status, 200);
    assert_eq!(c2.get("/health").await.status, 200);
    // A third client is turned away: the cap is full.
    assert_eq!(common::get(server.addr, "/health").await.status, 503);

    let verdict = server.app.health.deep().await;
    let probe = &verdict.checks["self_probe"];
    assert_eq!(
        probe.status,
        agentd::health::checks::CheckStatus::Ok,
        "{:?}",
        probe.detail
    );
    assert!(verdict.passed(), "{:?}", verdict.checks);
    let stats = &server.app.stats;
    assert!(stats.probe_connections_reserved.load(Relaxed) >= 1);
    let v = c1.get("/health").await.json();
    assert_eq!(v["accept_loop"]["saturated"], true, "{v}");
    assert!(v["accept_loop"]["connections_rejected"].as_u64().unwrap() >= 1);
    let status = agentd::health::watchdog::status_line(&server.app);
    assert!(
        status.starts_with("healthy · busy: connections 2/2"),
        "{status}"
    );
    drop((c1, c2));
    server.stop().await;
}

/// The door does not bypass the loop: when the accept loop stops, the probe
/// fails.
#[cfg(feature = "fault-injection")]
#[tokio::test]
async fn a_stalled_accept_loop_still_fails_the_probe() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::TestServer::start(&[], dir.path()).await;
    server.app.faults.stall_accept();
    let verdict = server.app.health.deep().await;
    let probe = &verdict.checks["self_probe"];
    assert_ne!(
        probe.status,
        agentd::health::checks::CheckStatus::Ok,
        "{:?}",
        probe.detail
    );
    assert!(!verdict.passed());
    server.stop().await;
}
