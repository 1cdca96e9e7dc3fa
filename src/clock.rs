//! Wall-clock time since the Unix epoch, the one clock every room reads for
//! timestamps it reports (`/health`, execution JSON, stored messages). Below
//! everything else, so no room imports a clock from above it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> f64 {
    since_epoch().as_secs_f64()
}

/// Milliseconds since the Unix epoch (0 if the clock is before it; 0 also
/// means "never" in the atomics that store it).
pub fn now_unix_ms() -> u64 {
    since_epoch().as_millis() as u64
}

fn since_epoch() -> std::time::Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}
