//! The six checks every tick runs, built over the running `App`:
//! `self_probe`, `runtime_lag`, `state_lock`, `store`, `executor`, `resources`.
//!
//! Each proves one part of the data path still moves; the runner gives each its
//! own deadline, so a check here may simply await and let the deadline decide.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::checks::{resources_check, runtime_lag_check, Check};
use super::probe::{self_probe_check_registered, ProbeTarget};
use crate::app::App;

/// Path the self-probe requests: `/health` answers it with 200 whenever the
/// accept loop and a handler run, whatever the verdict (so a degraded verdict
/// cannot keep itself degraded).
pub const PROBE_PATH: &str = "/health?probe=1";

/// Where the self-probe connects for a listener bound to `addr`: the wildcard
/// addresses are reached over loopback.
pub fn probe_target_for_tcp(addr: SocketAddr) -> ProbeTarget {
    let ip = match addr.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    ProbeTarget::Tcp(SocketAddr::new(ip, addr.port()))
}

pub fn probe_target_for_unix(path: PathBuf) -> ProbeTarget {
    ProbeTarget::Unix(path)
}

pub fn build_checks(app: &Arc<App>, probe: ProbeTarget) -> Vec<Check> {
    let deadline = app.health.deadline;
    vec![
        self_probe_check_registered(probe, PROBE_PATH, Some(app.stats.probe_peers.clone())),
        runtime_lag_check(deadline),
        state_lock_check(app.clone()),
        store_check(app.clone()),
        executor_check(app.clone(), deadline),
        resources_check(app.config.health.max_threads, app.health.gauges.clone()),
    ]
}

/// The shared state lock can be taken (the runner's deadline bounds the wait).
fn state_lock_check(app: Arc<App>) -> Check {
    Check::new("state_lock", move || {
        let app = app.clone();
        Box::pin(async move {
            let _guard = app.state.lock().await;
            Ok(None)
        })
    })
}

/// A round trip through the SQLite thread: a read, and the write lock.
fn store_check(app: Arc<App>) -> Check {
    Check::new("store", move || {
        let app = app.clone();
        Box::pin(async move {
            app.store
                .probe()
                .await
                .map(|_| None)
                .map_err(|e| e.to_string())
        })
    })
}

/// If work waits for a free slot while a slot is free, the executor must start
/// something within the deadline. A full pool alone is not a failure.
fn executor_check(app: Arc<App>, deadline: Duration) -> Check {
    Check::new("executor", move || {
        let app = app.clone();
        Box::pin(async move {
            let before = app.executor.gauges();
            if before.waiting_for_slot == 0 || before.free_slots == 0 {
                return Ok(Some(format!(
                    "{} running, {} queued",
                    before.running, before.queued
                )));
            }
            // Leave a margin inside the runner's deadline to report why.
            let watch = deadline.mul_f32(0.8);
            let progressed = tokio::time::timeout(watch, async {
                loop {
                    let next = app.executor.next_start();
                    let now = app.executor.gauges();
                    if now.started_total > before.started_total || now.waiting_for_slot == 0 {
                        return;
                    }
                    next.await;
                }
            })
            .await;
            if progressed.is_ok() {
                return Ok(None);
            }
            let now = app.executor.gauges();
            Err(format!(
                "{} queued with {} free slots, nothing started in {} ms",
                now.waiting_for_slot,
                now.free_slots,
                watch.as_millis()
            ))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listeners_are_probed_over_loopback() {
        let t = probe_target_for_tcp("0.0.0.0:8420".parse().unwrap());
        assert!(matches!(t, ProbeTarget::Tcp(a) if a.to_string() == "127.0.0.1:8420"));
        let t = probe_target_for_tcp("[::]:1".parse().unwrap());
        assert!(matches!(t, ProbeTarget::Tcp(a) if a.to_string() == "[::1]:1"));
    }
}
