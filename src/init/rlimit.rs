//! Raising the RLIMIT_NOFILE soft limit at start-up, and the report of what
//! happened that `/health` shows.
//!
//! Why: launchd and many shells start processes with a soft limit of 256 or
//! 1024 open files, which a busy agent server (connections, child pipes, the
//! database) exhausts long before the hard limit. Raising the soft limit is
//! allowed without privileges up to the hard limit.
//!
//! Rules: raise the soft limit to `min(target, hard)` when it is below that;
//! never lower it (an operator who set it higher meant it); never touch the
//! hard limit; never fail start-up — every outcome, including errors, is a
//! report.
//!
//! Not here: deciding the target (config, `AGENTD_NOFILE_TARGET`), counting
//! open fds (health gauges).

use rlimit::Resource;
use serde::Serialize;

/// What `raise_nofile` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RlimitOutcome {
    /// The soft limit was raised.
    Raised,
    /// The soft limit was already at or above the target (or at the hard limit).
    Unchanged,
    /// The platform has no RLIMIT_NOFILE.
    Unsupported,
    /// Reading or setting the limit failed; see `error`.
    Error,
}

/// The limits after `raise_nofile`, for `/health`. Limits are `i64` so JSON
/// consumers get plain numbers; `-1` means unlimited (`RLIM_INFINITY`), and is
/// also the value when the limits could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RlimitReport {
    pub outcome: RlimitOutcome,
    pub soft: i64,
    pub hard: i64,
    pub error: Option<String>,
}

/// The soft limit to set, or `None` to leave it. Never lowers, never exceeds
/// `hard`.
pub fn nofile_soft_target(soft: u64, hard: u64, target: u64) -> Option<u64> {
    let wanted = target.min(hard);
    (soft < wanted).then_some(wanted)
}

/// Raise RLIMIT_NOFILE's soft limit towards `target` (see the module doc).
pub fn raise_nofile(target: u64) -> RlimitReport {
    if !Resource::NOFILE.is_supported() {
        return RlimitReport {
            outcome: RlimitOutcome::Unsupported,
            soft: -1,
            hard: -1,
            error: None,
        };
    }
    let (soft, hard) = match Resource::NOFILE.get() {
        Ok(limits) => limits,
        Err(err) => {
            return RlimitReport {
                outcome: RlimitOutcome::Error,
                soft: -1,
                hard: -1,
                error: Some(format!("getrlimit(RLIMIT_NOFILE): {err}")),
            }
        }
    };
    let Some(new_soft) = nofile_soft_target(soft, hard, platform_cap(target)) else {
        return report(RlimitOutcome::Unchanged, soft, hard, None);
    };
    match Resource::NOFILE.set(new_soft, hard) {
        Ok(()) => report(RlimitOutcome::Raised, new_soft, hard, None),
        Err(err) => report(
            RlimitOutcome::Error,
            soft,
            hard,
            Some(format!(
                "setrlimit(RLIMIT_NOFILE, soft {new_soft}, hard {}): {err}",
                limit_i64(hard)
            )),
        ),
    }
}

/// macOS reports an unlimited hard limit but refuses a soft limit above
/// `OPEN_MAX` (10240) through setrlimit; cap there so "unlimited" does not
/// turn a reachable target into an error.
#[cfg(target_os = "macos")]
fn platform_cap(target: u64) -> u64 {
    /// `OPEN_MAX` from <sys/syslimits.h>.
    const MACOS_OPEN_MAX: u64 = 10240;
    target.min(MACOS_OPEN_MAX)
}

#[cfg(not(target_os = "macos"))]
fn platform_cap(target: u64) -> u64 {
    target
}

fn report(outcome: RlimitOutcome, soft: u64, hard: u64, error: Option<String>) -> RlimitReport {
    RlimitReport {
        outcome,
        soft: limit_i64(soft),
        hard: limit_i64(hard),
        error,
    }
}

fn limit_i64(limit: u64) -> i64 {
    if limit == rlimit::INFINITY {
        -1
    } else {
        i64::try_from(limit).unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limit_is_raised_to_target_or_hard_and_never_lowered() {
        assert_eq!(nofile_soft_target(1024, 524_288, 4096), Some(4096));
        assert_eq!(nofile_soft_target(256, 2048, 4096), Some(2048));
        assert_eq!(nofile_soft_target(8192, 524_288, 4096), None);
        assert_eq!(nofile_soft_target(4096, 524_288, 4096), None);
        assert_eq!(nofile_soft_target(2048, 2048, 4096), None);
        assert_eq!(nofile_soft_target(1024, rlimit::INFINITY, 4096), Some(4096));
    }

    #[test]
    fn report_serializes_outcome_lowercase_and_infinity_as_minus_one() {
        let r = report(RlimitOutcome::Unchanged, 4096, rlimit::INFINITY, None);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"outcome": "unchanged", "soft": 4096, "hard": -1, "error": null})
        );
    }

    #[test]
    fn raising_to_the_current_soft_limit_changes_nothing() {
        // Asking for what we already have must not call setrlimit nor lower
        // anything; safe to run inside the shared test process.
        let (soft, hard) = Resource::NOFILE.get().unwrap();
        let r = raise_nofile(soft.min(hard));
        assert_eq!(r.outcome, RlimitOutcome::Unchanged, "{r:?}");
        assert_eq!(r.soft, limit_i64(soft));
        assert_eq!(Resource::NOFILE.get().unwrap(), (soft, hard));
    }
}
