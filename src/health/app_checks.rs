//! The six checks every tick runs, built over the running `App`:
//! `self_probe`, `runtime_lag`, `state_lock`, `store`, `executor`, `resources`,
//! and `agents` when the runtime keeps agent processes (`acp`).
//!
//! Each proves one part of the data path still moves; the runner gives each its
//! own deadline, so a check here may simply await and let the deadline decide.

use std::sync::Arc;
use std::time::Duration;

use super::checks::{resources_check, runtime_lag_check, Check, CheckFailure};
use super::probe::self_probe_via_door;
use crate::app::App;
use crate::store::StoreError;

/// Path the self-probe requests: `/health` answers it with 200 whenever the
/// accept loop and a handler run, whatever the verdict (so a degraded verdict
/// cannot keep itself degraded).
pub const PROBE_PATH: &str = "/health?probe=1";

pub fn build_checks(app: &Arc<App>) -> Vec<Check> {
    let deadline = app.health.deadline;
    let mut checks = vec![
        self_probe_via_door(app.probe_door.clone(), PROBE_PATH),
        runtime_lag_check(deadline),
        state_lock_check(app.clone()),
        store_check(app.clone()),
        executor_check(app.clone(), deadline),
        resources_check(app.config.health.max_threads, app.health.gauges.clone()),
    ];
    if app.runtime().agents().is_some() {
        checks.push(agents_check(app.clone()));
    }
    // Every one of them awaits (none blocks its thread), so the runner polls
    // them in its own task: a tick spawns no task per check (`runtime_lag`
    // judges how late the tick started, see `runtime_lag_check`).
    checks.into_iter().map(Check::inline).collect()
}

/// The `acp` runtime's agent processes: *degraded* while their starts keep
/// failing (the pool backs off), never a wedge. A failing agent is the
/// agent's problem; restarting agentd would not mend it, so it must never
/// stop `WATCHDOG=1`.
fn agents_check(app: Arc<App>) -> Check {
    Check::graded("agents", move || {
        let app = app.clone();
        Box::pin(async move {
            let Some(r) = app.runtime().agents() else {
                return Ok(None);
            };
            match r.degraded {
                Some(reason) => Err(CheckFailure::Degraded(reason)),
                None => Ok(Some(format!(
                    "{} running ({} busy), limit {}, {} restarts",
                    r.running, r.busy, r.limit, r.restarts
                ))),
            }
        })
    })
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

/// A round trip through the SQLite thread that commits a real write (the
/// heartbeat row) and checks that `state.db` is still the open file and the
/// disk has room; at most once per `AGENTD_STORE_PROOF_INTERVAL`, ticks in
/// between reusing the last proof that passed without a round trip
/// (`store::Store::heartbeat`). A `?deep=1` run always proves anew.
///
/// It only awaits the store thread's answer: no SQLite call runs on the
/// tick's worker.
///
/// Wedge or load: a full disk and a write lock that another process holds
/// are *degraded* (reads are still served, and each clears by itself, so a
/// restart would not help); a deleted or replaced `state.db`, an I/O error,
/// a read-only file system and a store thread that does not answer are
/// wedges (a restart reopens the database, on a fresh file if it was
/// deleted).
fn store_check(app: Arc<App>) -> Check {
    Check::graded("store", move || {
        let app = app.clone();
        let fresh = !crate::health::checks::in_tick();
        Box::pin(async move {
            match app.store.heartbeat(fresh).await {
                Ok(()) => Ok(None),
                Err(e @ (StoreError::DiskFull(_) | StoreError::Locked(_))) => {
                    Err(CheckFailure::Degraded(e.to_string()))
                }
                Err(e) => Err(CheckFailure::Wedge(e.to_string())),
            }
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
