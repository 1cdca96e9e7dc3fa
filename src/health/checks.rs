//! Deep health checks: the `Check` type, the runner that runs them all
//! concurrently under one deadline and folds the results into a `Verdict`, and
//! the two checks that need nothing but the process itself (runtime lag and
//! resources).
//!
//! Not for: deciding what to do with a verdict (the watchdog loop does that),
//! or checks that belong to another room (state lock, store, executor); those
//! rooms build their `Check`s with [`Check::new`].

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use serde::{Serialize, Serializer};
use tokio::runtime::Handle;
use tokio::task::JoinSet;

use super::gauges::{ProcGauges, UNREADABLE};

/// How long `run_checks` waits beyond the deadline for tasks to report.
/// A check normally ends at its own deadline (its timeout drops it); this
/// margin only matters for a check that blocks its worker thread, where the
/// per-task timeout cannot fire. Large enough to absorb scheduling jitter on a
/// busy two-core machine, small against watchdog intervals of seconds.
pub const COLLECT_MARGIN: Duration = Duration::from_millis(50);

/// Share of RLIMIT_NOFILE (soft) that open fds may reach before `resources`
/// fails: leaves room to still accept, log and write a diagnostics bundle.
pub const FD_LIMIT_PERCENT: i64 = 90;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Ok,
    /// A wedge: something that will not recover by itself. Stops the pings.
    Failed,
    /// No answer within the deadline: treated as a wedge.
    Timeout,
    /// Not serving fully, but not wedged: load or a condition that clears by
    /// itself (a full disk). `/health` is 503 and `STATUS=` says why, but
    /// the watchdog keeps petting: a restart would not help.
    Degraded,
}

/// Why a check did not pass: a wedge (stop petting) or a degradation
/// (report, keep petting). A plain `String` error is a wedge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckFailure {
    Wedge(String),
    Degraded(String),
}

impl From<String> for CheckFailure {
    fn from(why: String) -> Self {
        CheckFailure::Wedge(why)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckResult {
    pub status: CheckStatus,
    /// Wall time the check took (up to the deadline for a timeout).
    pub ms: f64,
    /// What the check saw (`lag 0.2 ms`) or why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `Ok(detail)` passes, `Err(why)` fails.
pub type CheckFuture = Pin<Box<dyn Future<Output = Result<Option<String>, String>> + Send>>;

/// What a check's future resolves to inside the runner.
type Outcome = Pin<Box<dyn Future<Output = Result<Option<String>, CheckFailure>> + Send>>;

/// One named health check. Cloning is cheap; every run calls the function for
/// a new future.
#[derive(Clone)]
pub struct Check {
    pub name: &'static str,
    run: Arc<dyn Fn() -> Outcome + Send + Sync>,
    /// Polled by the runner itself instead of in a task of its own (see
    /// [`Check::inline`]).
    inline: bool,
}

impl std::fmt::Debug for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Check").field("name", &self.name).finish()
    }
}

impl Check {
    pub fn new<F, Fut>(name: &'static str, f: F) -> Check
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<String>, String>> + Send + 'static,
    {
        Check::graded(name, move || {
            let fut = f();
            async move { fut.await.map_err(CheckFailure::Wedge) }
        })
    }

    /// A check that can tell a wedge from a degradation
    /// ([`CheckFailure`]).
    pub fn graded<F, Fut>(name: &'static str, f: F) -> Check
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<String>, CheckFailure>> + Send + 'static,
    {
        Check {
            name,
            run: Arc::new(move || Box::pin(f()) as Outcome),
            inline: false,
        }
    }

    /// Run this check inside the runner's own task, beside the other inline
    /// checks, instead of spawning a task for it: no task, no timer and no
    /// wake-up of another worker of its own each run. Only for a check that
    /// never blocks its thread (it awaits, so the runner's deadline can drop
    /// it); a check that may block must keep its own task, where the runner
    /// can still report it as `Timeout`.
    pub fn inline(mut self) -> Check {
        self.inline = true;
        self
    }
}

/// The outcome of one run of all checks.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// When the run started.
    #[serde(serialize_with = "unix_seconds")]
    pub at: SystemTime,
    pub elapsed_ms: f64,
    pub checks: BTreeMap<&'static str, CheckResult>,
}

impl Verdict {
    /// True when every check is `Ok` (an empty run passes).
    pub fn passed(&self) -> bool {
        self.checks.values().all(|r| r.status == CheckStatus::Ok)
    }

    /// True when a check failed or timed out: a wedge, so no `WATCHDOG=1`.
    /// A `Degraded` check alone is not a wedge.
    pub fn wedged(&self) -> bool {
        self.checks
            .values()
            .any(|r| matches!(r.status, CheckStatus::Failed | CheckStatus::Timeout))
    }

    /// The first check, by name, that found a wedge; else the first degraded
    /// one.
    pub fn first_failure(&self) -> Option<(&'static str, &CheckResult)> {
        let wedge = self
            .checks
            .iter()
            .find(|(_, r)| matches!(r.status, CheckStatus::Failed | CheckStatus::Timeout));
        wedge
            .or_else(|| {
                self.checks
                    .iter()
                    .find(|(_, r)| r.status != CheckStatus::Ok)
            })
            .map(|(name, r)| (*name, r))
    }
}

fn unix_seconds<S: Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let secs = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    s.serialize_f64(secs)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A finished check's outcome as its result.
fn result_of(outcome: Result<Option<String>, CheckFailure>, ms: f64) -> CheckResult {
    match outcome {
        Ok(detail) => CheckResult {
            status: CheckStatus::Ok,
            ms,
            detail,
        },
        Err(CheckFailure::Wedge(why)) => CheckResult {
            status: CheckStatus::Failed,
            ms,
            detail: Some(why),
        },
        Err(CheckFailure::Degraded(why)) => CheckResult {
            status: CheckStatus::Degraded,
            ms,
            detail: Some(why),
        },
    }
}

fn timeout_result(deadline: Duration) -> CheckResult {
    CheckResult {
        status: CheckStatus::Timeout,
        ms: millis(deadline),
        detail: Some(format!("no answer within {} ms", deadline.as_millis())),
    }
}

/// Runs every check concurrently, each as its own task under `deadline`, and
/// returns within `deadline + COLLECT_MARGIN` whatever the checks do.
///
/// One task per check means a slow check cannot hide another's result, and a
/// check past its deadline is dropped by its timeout (its task ends). A check
/// that blocks its thread instead of awaiting cannot be interrupted; as long
/// as the runner itself runs on another thread (a multi-thread runtime, or a
/// runtime of its own), that check is reported as `Timeout` when the margin
/// runs out and its task is aborted, which takes effect when it next yields.
///
/// Checks marked [`Check::inline`] are polled together in the runner's own
/// task under one timer for the deadline; each still reports its own result,
/// and one that does not finish is `Timeout` without holding up the others.
pub async fn run_checks(checks: &[Check], deadline: Duration) -> Verdict {
    let at = SystemTime::now();
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    let mut names = BTreeMap::new();
    let mut inline = FuturesUnordered::new();
    for check in checks.iter().filter(|c| c.inline) {
        let name = check.name;
        let run = (check.run)();
        inline.push(async move {
            let begun = Instant::now();
            // A panic fails this check, as it would in a task of its own,
            // instead of unwinding through the runner.
            let outcome = AssertUnwindSafe(run).catch_unwind().await;
            let ms = millis(begun.elapsed());
            let result = match outcome {
                Ok(outcome) => result_of(outcome, ms),
                Err(_) => CheckResult {
                    status: CheckStatus::Failed,
                    ms,
                    detail: Some("check panicked".into()),
                },
            };
            (name, result)
        });
    }
    let mut results = BTreeMap::new();
    let mut inline_results = Vec::new();
    let inline_run = async {
        if inline.is_empty() {
            return;
        }
        let _ = tokio::time::timeout(deadline, async {
            while let Some(done) = inline.next().await {
                inline_results.push(done);
            }
        })
        .await;
    };
    for check in checks.iter().filter(|c| !c.inline) {
        let check = check.clone();
        let handle = tasks.spawn(async move {
            let begun = Instant::now();
            let outcome = tokio::time::timeout(deadline, (check.run)()).await;
            let ms = millis(begun.elapsed());
            match outcome {
                Ok(outcome) => result_of(outcome, ms),
                Err(_) => timeout_result(deadline),
            }
        });
        names.insert(handle.id(), check.name);
    }

    let any_spawned = !names.is_empty();
    let collect = async {
        while let Some(joined) = tasks.join_next_with_id().await {
            match joined {
                Ok((id, result)) => {
                    results.insert(names[&id], result);
                }
                Err(err) => {
                    let why = if err.is_panic() {
                        "check panicked"
                    } else {
                        "check was cancelled"
                    };
                    results.insert(
                        names[&err.id()],
                        CheckResult {
                            status: CheckStatus::Failed,
                            ms: millis(started.elapsed()),
                            detail: Some(why.into()),
                        },
                    );
                }
            }
        }
    };
    // Only a check that blocks its thread gets here; see the doc above.
    let spawned = async {
        if any_spawned {
            let _ = tokio::time::timeout(deadline + COLLECT_MARGIN, collect).await;
        }
    };
    tokio::join!(inline_run, spawned);
    drop(inline);
    tasks.abort_all();
    results.extend(inline_results);
    for name in names
        .values()
        .chain(checks.iter().filter(|c| c.inline).map(|c| &c.name))
    {
        results
            .entry(*name)
            .or_insert_with(|| timeout_result(deadline));
    }
    Verdict {
        at,
        elapsed_ms: millis(started.elapsed()),
        checks: results,
    }
}

tokio::task_local! {
    /// How late the run in this task started after it was due: set by the
    /// watchdog loop around its tick's checks (see [`runtime_lag_check`]).
    static STARTED_LATE: Duration;
}

/// Runs `checks` as the run that was due at `due`: `runtime_lag` then judges
/// how late the run started instead of scheduling anything of its own.
pub async fn run_checks_due_at(checks: &[Check], deadline: Duration, due: Instant) -> Verdict {
    STARTED_LATE
        .scope(due.elapsed(), run_checks(checks, deadline))
        .await
}

/// Whether the caller runs inside a watchdog tick's run (one started with
/// [`run_checks_due_at`]) rather than an on-demand `?deep=1` run or a
/// test's. Read it where the run makes a check's future, as
/// [`runtime_lag_check`] does: an inline check sees the run's task-locals.
pub fn in_tick() -> bool {
    STARTED_LATE.try_with(|_| ()).is_ok()
}

/// `runtime_lag` on the runtime that runs the check: how long a task that
/// was ready waited for the scheduler, failing past `max_lag`.
///
/// Inline ([`Check::inline`]) in a run started with [`run_checks_due_at`]
/// (the watchdog's tick) that is how late the run started after it was due:
/// its timer fired and the task waited behind whatever was ready on the
/// runtime. Elsewhere (an on-demand
/// `?deep=1` run, tests) the check yields and measures the delay until it
/// runs again: a yielded task goes to the back of its worker's run queue,
/// after a turn of the I/O and timer driver. A runtime that never comes back
/// is left to the runner's deadline.
///
/// Neither schedules a task: a task made ready on every tick (a spawned one,
/// or a yield) made the worker wake its idle sibling, a context switch each
/// way on every tick.
pub fn runtime_lag_check(max_lag: Duration) -> Check {
    Check::new("runtime_lag", move || {
        // Read when the run makes the check's future: in the runner's task
        // when the check is inline (as the tick's are); a check in a task of
        // its own does not see the run's task-locals and yields instead.
        let started_late = STARTED_LATE.try_with(|late| *late).ok();
        async move {
            if Handle::try_current().is_err() {
                return Err("not running inside a tokio runtime".into());
            }
            if let Some(late) = started_late {
                return judge_lag(late, max_lag);
            }
            let queued = Instant::now();
            tokio::task::yield_now().await;
            judge_lag(queued.elapsed(), max_lag)
        }
    })
}

fn judge_lag(lag: Duration, max_lag: Duration) -> Result<Option<String>, String> {
    if lag <= max_lag {
        Ok(Some(format!("lag {:.2} ms", millis(lag))))
    } else {
        Err(format!(
            "lag {:.2} ms over {} ms",
            millis(lag),
            max_lag.as_millis()
        ))
    }
}

/// `runtime_lag` for a given runtime: spawns a task on `runtime` and measures
/// the delay until it runs; fails when it does not run within `max_lag`.
///
/// Use this when the health loop runs on a runtime of its own: a wedged
/// server runtime then shows up as a failed check, not as a loop that cannot
/// run its checks at all.
pub fn runtime_lag_check_on(runtime: Handle, max_lag: Duration) -> Check {
    Check::new("runtime_lag", move || lag_probe(runtime.clone(), max_lag))
}

async fn lag_probe(runtime: Handle, max_lag: Duration) -> Result<Option<String>, String> {
    let queued = Instant::now();
    let mut probe = runtime.spawn(async move { queued.elapsed() });
    // Waiting at most `max_lag` makes the check fail as soon as the answer is
    // known, instead of running into the runner's deadline.
    match tokio::time::timeout(max_lag, &mut probe).await {
        Ok(Ok(lag)) => judge_lag(lag, max_lag),
        Ok(Err(err)) => Err(format!("lag probe task failed: {err}")),
        Err(_) => {
            // Still queued behind whatever blocks the runtime; it would only
            // measure a number nobody reads.
            probe.abort();
            Err(format!(
                "lag over {} ms: a spawned task did not run",
                max_lag.as_millis()
            ))
        }
    }
}

/// `resources`: open fds below [`FD_LIMIT_PERCENT`] of the soft limit and
/// fewer than `max_threads` threads, from a fresh reading of those (which
/// also goes into the `/health` cache; RSS is not read). An unreadable gauge
/// fails: where the fd count needs a listing of `/proc/self/fd` (kernels
/// before 6.2), a full fd table refuses to open it, so "cannot read" is
/// itself the symptom.
pub fn resources_check(max_threads: usize, gauges: Arc<ProcGauges>) -> Check {
    let max_threads = i64::try_from(max_threads).unwrap_or(i64::MAX);
    Check::new("resources", move || {
        let snapshot = gauges.refresh_counts();
        async move {
            let fds = snapshot.open_fds;
            let soft = snapshot.fd_soft;
            let threads = snapshot.thread_count;
            if fds == UNREADABLE {
                return Err("cannot list open fds (fd table full?)".into());
            }
            if threads == UNREADABLE {
                return Err("cannot read thread count".into());
            }
            let summary = format!("fds {fds}/{soft}, threads {threads}/{max_threads}");
            // soft == UNREADABLE: no limit known, so no fd bound to enforce.
            if soft != UNREADABLE
                && fds.saturating_mul(100) >= soft.saturating_mul(FD_LIMIT_PERCENT)
            {
                return Err(format!(
                    "open fds at or above {FD_LIMIT_PERCENT}% of the soft limit: {summary}"
                ));
            }
            if threads >= max_threads {
                return Err(format!("thread count at or above max_threads: {summary}"));
            }
            Ok(Some(summary))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(statuses: &[(&'static str, CheckStatus)]) -> Verdict {
        Verdict {
            at: SystemTime::now(),
            elapsed_ms: 1.0,
            checks: statuses
                .iter()
                .map(|(name, status)| {
                    (
                        *name,
                        CheckResult {
                            status: *status,
                            ms: 1.0,
                            detail: None,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn verdict_passes_only_when_every_check_is_ok() {
        assert!(verdict(&[]).passed());
        assert!(verdict(&[("a", CheckStatus::Ok), ("b", CheckStatus::Ok)]).passed());
        let v = verdict(&[
            ("a", CheckStatus::Ok),
            ("c", CheckStatus::Failed),
            ("b", CheckStatus::Timeout),
        ]);
        assert!(!v.passed());
        assert!(v.wedged());
        assert_eq!(v.first_failure().map(|(n, _)| n), Some("b"));
    }

    #[test]
    fn a_degraded_check_is_not_a_wedge_but_a_wedge_is_named_first() {
        let v = verdict(&[("a", CheckStatus::Degraded), ("b", CheckStatus::Ok)]);
        assert!(!v.passed());
        assert!(!v.wedged());
        assert_eq!(v.first_failure().map(|(n, _)| n), Some("a"));
        let v = verdict(&[("a", CheckStatus::Degraded), ("z", CheckStatus::Failed)]);
        assert!(v.wedged());
        assert_eq!(v.first_failure().map(|(n, _)| n), Some("z"));
    }

    #[tokio::test]
    async fn graded_check_reports_degraded() {
        let checks = [Check::graded("disk", || async {
            Err(CheckFailure::Degraded("disk full".into()))
        })];
        let v = run_checks(&checks, Duration::from_secs(1)).await;
        assert_eq!(v.checks["disk"].status, CheckStatus::Degraded);
        assert_eq!(v.checks["disk"].detail.as_deref(), Some("disk full"));
        assert!(!v.wedged());
    }

    #[test]
    fn verdict_serializes_status_words_and_unix_time() {
        let v = verdict(&[("a", CheckStatus::Ok), ("b", CheckStatus::Timeout)]);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["checks"]["a"]["status"], "ok");
        assert_eq!(json["checks"]["b"]["status"], "timeout");
        assert!(json["checks"]["a"].get("detail").is_none());
        let at = json["at"].as_f64().unwrap();
        assert!(at > 1.6e9, "{at}");
    }

    #[tokio::test]
    async fn panicking_check_fails_without_hiding_others() {
        let checks = [
            Check::new("boom", || async { panic!("check bug") }),
            Check::new("fine", || async { Ok(None) }),
        ];
        let v = run_checks(&checks, Duration::from_secs(1)).await;
        assert_eq!(v.checks["boom"].status, CheckStatus::Failed);
        assert_eq!(v.checks["boom"].detail.as_deref(), Some("check panicked"));
        assert_eq!(v.checks["fine"].status, CheckStatus::Ok);
    }

    #[tokio::test]
    async fn resources_check_fails_when_threads_reach_the_bound() {
        let gauges = Arc::new(ProcGauges::new(Duration::from_secs(60)));
        let v = run_checks(
            &[resources_check(1, gauges.clone())],
            Duration::from_secs(1),
        )
        .await;
        let r = &v.checks["resources"];
        assert_eq!(r.status, CheckStatus::Failed);
        assert!(
            r.detail.as_deref().unwrap().contains("max_threads"),
            "{r:?}"
        );
        // The reading went into the cache /health reads, without a full
        // refresh (no RSS read).
        assert_eq!(gauges.get().fd_soft, crate::health::gauges::fd_limits().0);
        assert_eq!(gauges.refreshes(), 0);

        let v = run_checks(&[resources_check(1 << 20, gauges)], Duration::from_secs(1)).await;
        let r = &v.checks["resources"];
        assert_eq!(r.status, CheckStatus::Ok, "{r:?}");
        let detail = r.detail.as_deref().unwrap();
        assert!(
            detail.starts_with("fds ") && detail.contains(", threads "),
            "{detail}"
        );
    }
}
