//! Integration tests of the health room's parts: the check runner's
//! deadlines, the self-probe against real hyper servers, single-flight, the
//! sentinel and bundle retention. The gauges, which count this whole
//! process, are tested alone in `tests/gauges.rs`.
//!
//! Every test here takes `SERIAL`: the deadline tests judge scheduling,
//! which a test running alongside would disturb.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use agentd::health::bundle::{is_bundle_name, write_bundle};
use agentd::health::checks::{
    run_checks, run_checks_due_at, runtime_lag_check, runtime_lag_check_on, Check, CheckStatus,
    COLLECT_MARGIN,
};
use agentd::health::probe::{self_probe_check, ProbeTarget};
use agentd::health::sentinel::{self, Heartbeat, SentinelConfig, SentinelHandle};
use agentd::health::single_flight::SingleFlight;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::{oneshot, Mutex, Notify};

static SERIAL: Mutex<()> = Mutex::const_new(());

/// Slack for "about the deadline" on a shared, busy CI machine.
const SCHEDULING_SLACK: Duration = Duration::from_millis(400);

// ---------------------------------------------------------------- checks

#[tokio::test]
async fn run_checks_reports_ok_failed_and_timeout_within_the_deadline() {
    let _serial = SERIAL.lock().await;
    let deadline = Duration::from_millis(300);
    // Dropped with the hanging check's future: proves its task is not left behind.
    let (dropped_tx, dropped_rx) = oneshot::channel::<()>();
    let dropped_tx = Arc::new(std::sync::Mutex::new(Some(dropped_tx)));
    let checks = [
        Check::new("fine", || async { Ok(Some("all good".to_owned())) }),
        Check::new("broken", || async { Err("disk on fire".to_owned()) }),
        Check::new("hangs", move || {
            let guard = dropped_tx.lock().unwrap().take();
            async move {
                let _guard = guard;
                std::future::pending::<()>().await;
                Ok(None)
            }
        }),
    ];
    let started = Instant::now();
    let verdict = run_checks(&checks, deadline).await;
    let took = started.elapsed();

    assert!(took >= deadline, "{took:?}");
    assert!(
        took < deadline + COLLECT_MARGIN + SCHEDULING_SLACK,
        "{took:?}"
    );
    assert!(!verdict.passed());
    let fine = &verdict.checks["fine"];
    assert_eq!(fine.status, CheckStatus::Ok);
    assert_eq!(fine.detail.as_deref(), Some("all good"));
    assert!(fine.ms < 300.0);
    let broken = &verdict.checks["broken"];
    assert_eq!(broken.status, CheckStatus::Failed);
    assert_eq!(broken.detail.as_deref(), Some("disk on fire"));
    let hangs = &verdict.checks["hangs"];
    assert_eq!(hangs.status, CheckStatus::Timeout);
    assert_eq!(hangs.detail.as_deref(), Some("no answer within 300 ms"));
    assert_eq!(verdict.first_failure().map(|(n, _)| n), Some("broken"));
    assert!(verdict.elapsed_ms >= 300.0);
    // The sender was dropped (receiver sees an error), not kept by a live task.
    assert!(dropped_rx.await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_that_blocks_its_thread_cannot_hold_the_verdict() {
    let _serial = SERIAL.lock().await;
    let deadline = Duration::from_millis(200);
    let checks = [
        Check::new("blocks", || async {
            std::thread::sleep(Duration::from_millis(1500));
            Ok(None)
        }),
        Check::new("fine", || async { Ok(None) }),
    ];
    let started = Instant::now();
    let verdict = run_checks(&checks, deadline).await;
    let took = started.elapsed();
    assert!(
        took < deadline + COLLECT_MARGIN + SCHEDULING_SLACK,
        "{took:?}"
    );
    assert_eq!(verdict.checks["blocks"].status, CheckStatus::Timeout);
    assert_eq!(verdict.checks["fine"].status, CheckStatus::Ok);
}

#[tokio::test]
async fn a_tick_that_starts_late_fails_runtime_lag_by_how_late_it_started() {
    let _serial = SERIAL.lock().await;
    // Inline, as the tick's checks are: a check in a task of its own cannot
    // see when the run was due.
    let check = [runtime_lag_check(Duration::from_millis(100)).inline()];
    let late = run_checks_due_at(
        &check,
        Duration::from_secs(1),
        Instant::now() - Duration::from_millis(300),
    )
    .await;
    let lag = &late.checks["runtime_lag"];
    assert_eq!(lag.status, CheckStatus::Failed, "{lag:?}");
    let detail = lag.detail.as_deref().unwrap();
    let ms: f64 = detail
        .strip_prefix("lag ")
        .and_then(|d| d.strip_suffix(" ms over 100 ms"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{detail}"));
    assert!(ms >= 300.0, "{detail}");

    let on_time = run_checks_due_at(&check, Duration::from_secs(1), Instant::now()).await;
    let lag = &on_time.checks["runtime_lag"];
    assert_eq!(lag.status, CheckStatus::Ok, "{lag:?}");
}

#[tokio::test]
async fn runtime_lag_passes_on_an_idle_runtime() {
    let _serial = SERIAL.lock().await;
    let verdict = run_checks(
        &[runtime_lag_check(Duration::from_millis(250))],
        Duration::from_secs(1),
    )
    .await;
    let lag = &verdict.checks["runtime_lag"];
    assert_eq!(lag.status, CheckStatus::Ok, "{lag:?}");
    assert!(
        lag.detail.as_deref().unwrap().starts_with("lag "),
        "{lag:?}"
    );
}

#[test]
fn runtime_lag_fails_while_every_worker_is_blocked_and_recovers() {
    let _serial = SERIAL.blocking_lock();
    // The runtime under test: one worker, which a task will block.
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // The check is driven from another runtime, as a health loop on its own
    // runtime would; on the blocked one nothing (not even the check) runs.
    let driver = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let check = runtime_lag_check_on(server.handle().clone(), Duration::from_millis(100));

    let (started_tx, started) = mpsc::channel::<()>();
    let (release, wait) = mpsc::channel::<()>();
    server.spawn(async move {
        started_tx.send(()).unwrap();
        // Blocks the only worker thread until released.
        let _ = wait.recv();
    });
    started.recv().unwrap();

    let verdict = driver.block_on(run_checks(
        std::slice::from_ref(&check),
        Duration::from_secs(2),
    ));
    let lag = &verdict.checks["runtime_lag"];
    assert_eq!(lag.status, CheckStatus::Failed, "{lag:?}");
    assert!(
        lag.detail.as_deref().unwrap().contains("did not run"),
        "{lag:?}"
    );
    assert!(lag.ms >= 100.0 && lag.ms < 1000.0, "{lag:?}");

    release.send(()).unwrap();
    let verdict = driver.block_on(run_checks(&[check], Duration::from_secs(2)));
    assert_eq!(
        verdict.checks["runtime_lag"].status,
        CheckStatus::Ok,
        "{verdict:?}"
    );
}

// ---------------------------------------------------------------- self-probe

/// A tiny hyper server answering every request with `status`; counts accepted
/// connections so tests can see that each probe opens a new one.
fn serve<L>(listener: L, status: StatusCode) -> Arc<AtomicUsize>
where
    L: Accept + Send + 'static,
{
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let io = listener.accept_io().await;
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                    let body = format!("{} {}", req.method(), req.uri());
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = status;
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    accepted
}

/// TCP and Unix listeners behind one shape, for `serve`.
trait Accept {
    fn accept_io(&self) -> impl std::future::Future<Output = TokioIo<Box<dyn IoStream>>> + Send;
}

trait IoStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> IoStream for T {}

impl Accept for tokio::net::TcpListener {
    async fn accept_io(&self) -> TokioIo<Box<dyn IoStream>> {
        let (stream, _) = self.accept().await.unwrap();
        TokioIo::new(Box::new(stream))
    }
}

impl Accept for tokio::net::UnixListener {
    async fn accept_io(&self) -> TokioIo<Box<dyn IoStream>> {
        let (stream, _) = self.accept().await.unwrap();
        TokioIo::new(Box::new(stream))
    }
}

async fn tcp_server(status: StatusCode) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, serve(listener, status))
}

async fn probe_once(target: ProbeTarget, deadline: Duration) -> (CheckStatus, String, Duration) {
    let check = self_probe_check(target, "/health?probe=1");
    let started = Instant::now();
    let verdict = run_checks(&[check], deadline).await;
    let result = &verdict.checks["self_probe"];
    (
        result.status,
        result.detail.clone().unwrap_or_default(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn self_probe_passes_against_a_tcp_server_with_a_new_connection_each_time() {
    let _serial = SERIAL.lock().await;
    let (addr, accepted) = tcp_server(StatusCode::OK).await;
    for round in 1..=2 {
        let (status, detail, _) = probe_once(ProbeTarget::Tcp(addr), Duration::from_secs(60)).await;
        assert_eq!(status, CheckStatus::Ok, "{detail}");
        assert_eq!(detail, "HTTP 200");
        assert_eq!(accepted.load(Ordering::SeqCst), round);
    }
}

#[tokio::test]
async fn self_probe_passes_against_a_unix_socket_server() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.sock");
    let accepted = serve(
        tokio::net::UnixListener::bind(&path).unwrap(),
        StatusCode::OK,
    );
    let (status, detail, _) = probe_once(ProbeTarget::Unix(path), Duration::from_secs(2)).await;
    assert_eq!(status, CheckStatus::Ok, "{detail}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn self_probe_fails_on_a_503() {
    let _serial = SERIAL.lock().await;
    let (addr, _) = tcp_server(StatusCode::SERVICE_UNAVAILABLE).await;
    let (status, detail, _) = probe_once(ProbeTarget::Tcp(addr), Duration::from_secs(60)).await;
    assert_eq!(status, CheckStatus::Failed);
    assert_eq!(detail, "HTTP 503");
}

#[tokio::test]
async fn self_probe_fails_fast_when_nothing_listens() {
    let _serial = SERIAL.lock().await;
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let (status, detail, took) = probe_once(ProbeTarget::Tcp(addr), Duration::from_secs(60)).await;
    assert_eq!(status, CheckStatus::Failed);
    assert!(detail.starts_with("connect "), "{detail}");
    // Fast: far inside the deadline, not waiting it out.
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[tokio::test]
async fn self_probe_fails_fast_when_the_server_closes_without_answering() {
    let _serial = SERIAL.lock().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            drop(stream); // the "connection reset" wedge
        }
    });
    let (status, detail, took) = probe_once(ProbeTarget::Tcp(addr), Duration::from_secs(60)).await;
    assert_eq!(status, CheckStatus::Failed, "{detail}");
    // Fast: far inside the deadline, not waiting it out.
    assert!(took < Duration::from_secs(20), "{took:?}");
}

#[tokio::test]
async fn self_probe_times_out_against_a_listener_that_never_accepts() {
    let _serial = SERIAL.lock().await;
    let deadline = Duration::from_millis(300);
    // Bound and listening (the kernel completes handshakes into the backlog)
    // but never accepted: the wedge where the port is in LISTEN and nobody
    // serves it.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (status, detail, took) =
        probe_once(ProbeTarget::Tcp(tcp.local_addr().unwrap()), deadline).await;
    assert_eq!(status, CheckStatus::Timeout, "{detail}");
    assert!(
        took < deadline + COLLECT_MARGIN + SCHEDULING_SLACK,
        "{took:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wedged.sock");
    let _unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let (status, detail, took) = probe_once(ProbeTarget::Unix(path), deadline).await;
    assert_eq!(status, CheckStatus::Timeout, "{detail}");
    assert!(
        took < deadline + COLLECT_MARGIN + SCHEDULING_SLACK,
        "{took:?}"
    );
}

// ---------------------------------------------------------------- single-flight

/// Waits (yielding, bounded) until `flight` has `n` callers waiting.
async fn until_waiting<T: Clone + Send + Sync + 'static>(flight: &SingleFlight<T>, n: usize) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while flight.waiting() < n {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {} of {n} callers arrived", flight.waiting()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_flight_shares_one_run_among_100_callers() {
    let _serial = SERIAL.lock().await;
    let flight = Arc::new(SingleFlight::<u64>::new());
    let gate = Arc::new(Notify::new());
    let calls = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for _ in 0..100 {
        let (flight, gate, calls) = (flight.clone(), gate.clone(), calls.clone());
        callers.push(tokio::spawn(async move {
            flight
                .run(move || async move {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    gate.notified().await;
                    n * 1000
                })
                .await
        }));
    }
    until_waiting(&flight, 100).await;
    gate.notify_one();
    for caller in callers {
        let value = tokio::time::timeout(Duration::from_secs(5), caller)
            .await
            .expect("every caller gets the shared result");
        assert_eq!(value.unwrap(), 1000);
    }
    assert_eq!(flight.runs(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(flight.waiting(), 0);
}

#[tokio::test]
async fn single_flight_run_survives_its_starter_being_dropped() {
    let _serial = SERIAL.lock().await;
    let flight = Arc::new(SingleFlight::<&'static str>::new());
    let gate = Arc::new(Notify::new());
    let starter = {
        let (flight, gate) = (flight.clone(), gate.clone());
        tokio::spawn(async move {
            flight
                .run(move || async move {
                    gate.notified().await;
                    "done"
                })
                .await
        })
    };
    until_waiting(&flight, 1).await;
    let joiner = {
        let flight = flight.clone();
        tokio::spawn(async move { flight.run(|| async { "second run" }).await })
    };
    until_waiting(&flight, 2).await;
    starter.abort();
    assert!(starter.await.unwrap_err().is_cancelled());
    gate.notify_one();
    let joined = tokio::time::timeout(Duration::from_secs(5), joiner)
        .await
        .expect("the run outlives its starter");
    assert_eq!(joined.unwrap(), "done");
    assert_eq!(flight.runs(), 1);
}

// ---------------------------------------------------------------- sentinel

fn bundles_in(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().path())
                .filter(|p| is_bundle_name(p.file_name().unwrap().to_str().unwrap()))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

fn start_sentinel(
    heartbeat: Arc<Heartbeat>,
    dir: &Path,
    stall_after: Duration,
    abort_after: Option<Duration>,
    abort: Box<dyn Fn() + Send>,
) -> SentinelHandle {
    sentinel::spawn(
        heartbeat,
        SentinelConfig {
            poll: Duration::from_millis(10),
            stall_after,
            abort_after,
            bundle_dir: dir.to_owned(),
            keep: 10,
        },
        Box::new(|| json!({ "last_verdict": { "passed": false, "failure": "runtime_lag" } })),
        abort,
    )
    .unwrap()
}

#[test]
fn sentinel_writes_one_bundle_per_incident_and_rearms_after_a_beat() {
    let _serial = SERIAL.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let heartbeat = Heartbeat::new();
    let stall_after = Duration::from_millis(100);
    let handle = start_sentinel(
        heartbeat.clone(),
        dir.path(),
        stall_after,
        None,
        Box::new(|| panic!("abort must not be called without abort_after")),
    );

    assert!(handle.wait_for_incidents(1, Duration::from_secs(5)));
    let written = bundles_in(dir.path());
    assert_eq!(written.len(), 1);
    assert_eq!(handle.last_bundle().as_ref(), Some(&written[0]));

    let bundle: Value = serde_json::from_slice(&std::fs::read(&written[0]).unwrap()).unwrap();
    assert!(bundle["stalled_ms"].as_u64().unwrap() >= 100, "{bundle}");
    assert_eq!(
        bundle["context"]["last_verdict"]["failure"], "runtime_lag",
        "{bundle}"
    );
    assert!(bundle["gauges"]["thread_count"].as_i64().unwrap() >= 2);
    let listed_threads = bundle["threads"].as_array().unwrap();
    let sentinel_thread = listed_threads
        .iter()
        .find(|t| t["name"] == sentinel::THREAD_NAME)
        .expect("the sentinel lists itself");
    assert_eq!(sentinel_thread["state"], "R", "it is the one running");
    for t in listed_threads {
        for key in ["tid", "name", "state", "wchan"] {
            assert!(t.get(key).is_some(), "{key} missing in {t}");
        }
    }
    let listed_fds = bundle["fds"].as_array().unwrap();
    assert!(!listed_fds.is_empty());
    assert!(listed_fds.iter().all(|f| f["target"].is_string()));

    // Still the same stall: no second bundle, however long it lasts.
    assert!(!handle.wait_for_incidents(2, Duration::from_millis(300)));
    assert_eq!(bundles_in(dir.path()).len(), 1);

    // The loop resumes, then stalls again: a new incident.
    heartbeat.beat();
    assert!(handle.wait_for_incidents(2, Duration::from_secs(5)));
    assert_eq!(bundles_in(dir.path()).len(), 2);
    handle.stop();
}

#[test]
fn sentinel_stays_quiet_while_the_heartbeat_is_fresh() {
    let _serial = SERIAL.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let heartbeat = Heartbeat::new();
    let handle = start_sentinel(
        heartbeat.clone(),
        dir.path(),
        Duration::from_millis(200),
        Some(Duration::from_millis(300)),
        Box::new(|| panic!("a beating loop must not be aborted")),
    );
    // Play a healthy loop ticking every 20 ms for well over stall_after.
    let until = Instant::now() + Duration::from_millis(600);
    while Instant::now() < until {
        heartbeat.beat();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(handle.incidents(), 0);
    assert!(bundles_in(dir.path()).is_empty());
    handle.stop();
}

#[test]
fn sentinel_aborts_once_when_the_stall_outlasts_abort_after() {
    let _serial = SERIAL.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let heartbeat = Heartbeat::new();
    let (aborted_tx, aborted) = mpsc::channel::<Duration>();
    let hb = heartbeat.clone();
    let abort_after = Duration::from_millis(300);
    let handle = start_sentinel(
        heartbeat.clone(),
        dir.path(),
        Duration::from_millis(100),
        Some(abort_after),
        Box::new(move || aborted_tx.send(hb.since_last()).unwrap()),
    );
    let stalled = aborted.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(stalled > abort_after, "{stalled:?}");
    // The bundle came first, and the abort is not repeated for this incident.
    assert_eq!(handle.incidents(), 1);
    assert_eq!(bundles_in(dir.path()).len(), 1);
    assert!(aborted.recv_timeout(Duration::from_millis(300)).is_err());
    handle.stop();
}

// ---------------------------------------------------------------- bundle

#[test]
fn bundle_retention_keeps_the_newest_and_only_touches_bundles() {
    let _serial = SERIAL.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let diagnostics = dir.path().join("diagnostics");
    std::fs::create_dir_all(&diagnostics).unwrap();
    std::fs::write(diagnostics.join("notes.json"), "{}").unwrap();
    std::fs::write(diagnostics.join("state.db"), "").unwrap();

    let written: Vec<PathBuf> = (0..6)
        .map(|i| write_bundle(&diagnostics, &json!({ "n": i }), 3).unwrap())
        .collect();
    let mut in_order = written.clone();
    in_order.sort();
    assert_eq!(in_order, written, "names sort in writing order");

    assert_eq!(bundles_in(&diagnostics), written[3..].to_vec());
    let last: Value = serde_json::from_slice(&std::fs::read(&written[5]).unwrap()).unwrap();
    assert_eq!(last, json!({ "n": 5 }));
    assert!(diagnostics.join("notes.json").exists());
    assert!(diagnostics.join("state.db").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&diagnostics)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bundle_creates_its_directory_and_keep_zero_still_keeps_the_new_one() {
    let _serial = SERIAL.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b/diagnostics");
    let path = write_bundle(&nested, &json!({}), 0).unwrap();
    assert!(path.exists());
    assert_eq!(bundles_in(&nested), vec![path]);
}
