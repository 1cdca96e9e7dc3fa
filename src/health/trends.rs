//! Leak trends: a bounded ring of gauge samples taken by the health loop, the
//! least-squares slope of each gauge over the window, and the rule that names
//! a gauge in `suspected_leak`.
//!
//! This answers "is thread_count trending up?" from one `GET /health` instead
//! of a multi-day soak. The ring is written only by the health loop. The
//! `trends` block of `/health` is rendered when a sample is taken and served
//! as pre-rendered text, so `/health` never computes a slope or takes a lock.
//! `GET /health/trends` (for status pages, not for probes) renders the ring
//! on request under the ring's own mutex, which no request handler takes.
//!
//! Not here: reading the gauges (`gauges`, the executor, the store), deciding
//! health (a suspected leak is reported, it never fails a check: a slow leak
//! is not a wedge, and the `resources` check already fails at the hard bound).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use serde_json::value::RawValue;

/// The sampled gauges, in the order of [`Sample::values`].
pub const GAUGES: [&str; 6] = [
    "thread_count",
    "open_fds",
    "rss_bytes",
    "tokio_alive_tasks",
    "conversation_history_size",
    "store_queue",
];

/// Largest ring the settings may ask for (window / interval); the settings
/// hold the value and why (`config::TREND_MAX_SAMPLES`).
pub const MAX_SAMPLES: u64 = crate::config::TREND_MAX_SAMPLES;

/// One reading of every gauge. A gauge that could not be read is -1 and is
/// left out of its slope.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Unix seconds.
    pub at: f64,
    pub values: [i64; GAUGES.len()],
}

/// When a gauge counts as "grown steadily" (see [`suspected_leak`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeakRule {
    /// Fewer samples than this never suggest a leak: a few points make any
    /// warm-up look like a trend.
    pub min_samples: usize,
    /// The fitted rise over the window must exceed this many units...
    pub min_rise: f64,
    /// ...and this fraction of the first sample's value (so 16 fds are a
    /// leak for a process holding 15, not for one holding 3,000).
    pub min_relative_rise: f64,
    /// Share of consecutive steps that must be non-decreasing: a sawtooth
    /// (a cache filling and being trimmed) is not a leak.
    pub min_non_decreasing: f64,
}

/// Samples needed before any gauge is named.
pub const MIN_SAMPLES: usize = 10;
/// Relative rise shared by every gauge: 10 % of the first value.
pub const MIN_RELATIVE_RISE: f64 = 0.10;
/// 80 % of steps up or flat.
pub const MIN_NON_DECREASING: f64 = 0.80;

/// The rule per gauge; `None` for gauges bounded by a knob of their own
/// (history size by `AGENT_HISTORY_LIMIT`, the store queue by
/// `AGENTD_STORE_QUEUE`): they grow with use up to their bound by design, so
/// only their slope is reported.
pub fn rule_for(gauge: &str) -> Option<LeakRule> {
    // Absolute rises: a few threads may come and go with the blocking pool;
    // 16 fds, 32 MiB and 64 tasks are beyond what load alone leaves behind.
    let min_rise = match gauge {
        "thread_count" => 4.0,
        "open_fds" => 16.0,
        "rss_bytes" => (32u64 << 20) as f64,
        "tokio_alive_tasks" => 64.0,
        _ => return None,
    };
    Some(LeakRule {
        min_samples: MIN_SAMPLES,
        min_rise,
        min_relative_rise: MIN_RELATIVE_RISE,
        min_non_decreasing: MIN_NON_DECREASING,
    })
}

/// Least-squares slope of `points` (x, y) in y per x unit; 0 for fewer than
/// two points or when every x is the same.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (x, y) in points {
        sxy += (x - mean_x) * (y - mean_y);
        sxx += (x - mean_x) * (x - mean_x);
    }
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

/// A gauge has "grown steadily" when all of these hold over the window:
/// at least `min_samples` points; a positive least-squares slope; a fitted
/// rise (slope × time span) above both `min_rise` and `min_relative_rise` ×
/// the first value; and at least `min_non_decreasing` of the steps between
/// consecutive samples not going down.
pub fn suspected_leak(points: &[(f64, f64)], rule: &LeakRule) -> bool {
    if points.len() < rule.min_samples.max(2) {
        return false;
    }
    let s = slope(points);
    if s <= 0.0 {
        return false;
    }
    let first = points[0];
    let last = points[points.len() - 1];
    let rise = s * (last.0 - first.0);
    if rise <= rule.min_rise || rise <= rule.min_relative_rise * first.1.abs() {
        return false;
    }
    let steps = points.len() - 1;
    let up_or_flat = points.windows(2).filter(|w| w[1].1 >= w[0].1).count();
    up_or_flat as f64 >= rule.min_non_decreasing * steps as f64
}

/// A number as JSON: an integer when it is whole (`60`, not `60.0`).
fn seconds_number(d: Duration) -> serde_json::Number {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        serde_json::Number::from(s as u64)
    } else {
        serde_json::Number::from_f64(s).unwrap_or_else(|| 0.into())
    }
}

/// The ring itself: owned by the health loop (through [`Trends`]).
#[derive(Debug)]
pub struct TrendRing {
    window: Duration,
    interval: Duration,
    capacity: usize,
    samples: VecDeque<Sample>,
}

/// What `/health` shows under `trends`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TrendSummary {
    pub window_seconds: serde_json::Number,
    pub sample_interval_seconds: serde_json::Number,
    pub samples: usize,
    pub slope_per_hour: serde_json::Map<String, serde_json::Value>,
    pub suspected_leak: Vec<&'static str>,
}

impl TrendRing {
    /// A ring holding `window / interval` samples (at least 2).
    pub fn new(window: Duration, interval: Duration) -> TrendRing {
        let capacity = (window.as_secs_f64() / interval.as_secs_f64().max(1e-3))
            .round()
            .clamp(2.0, MAX_SAMPLES as f64) as usize;
        TrendRing {
            window,
            interval,
            capacity,
            samples: VecDeque::with_capacity(capacity.min(4096)),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Add a sample, dropping the oldest when full.
    pub fn push(&mut self, sample: Sample) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// (hours since the first sample, value) of one gauge, readable ones only.
    fn points(&self, gauge: usize) -> Vec<(f64, f64)> {
        let origin = self.samples.front().map(|s| s.at).unwrap_or(0.0);
        self.samples
            .iter()
            .filter(|s| s.values[gauge] >= 0)
            .map(|s| ((s.at - origin) / 3600.0, s.values[gauge] as f64))
            .collect()
    }

    pub fn summary(&self) -> TrendSummary {
        let mut slope_per_hour = serde_json::Map::new();
        let mut suspected = Vec::new();
        for (i, name) in GAUGES.iter().enumerate() {
            let points = self.points(i);
            let s = (slope(&points) * 1000.0).round() / 1000.0;
            slope_per_hour.insert(
                (*name).to_owned(),
                serde_json::Number::from_f64(s)
                    .map(serde_json::Value::Number)
                    .unwrap_or(serde_json::Value::Null),
            );
            if rule_for(name).is_some_and(|rule| suspected_leak(&points, &rule)) {
                suspected.push(*name);
            }
        }
        TrendSummary {
            window_seconds: seconds_number(self.window),
            sample_interval_seconds: seconds_number(self.interval),
            samples: self.samples.len(),
            slope_per_hour,
            suspected_leak: suspected,
        }
    }

    /// The `GET /health/trends` body: every sample, oldest first.
    pub fn samples_json(&self) -> serde_json::Value {
        let samples: Vec<serde_json::Value> = self
            .samples
            .iter()
            .map(|s| {
                let mut row = serde_json::Map::new();
                let at = (s.at * 1000.0).round() / 1000.0;
                row.insert("at".into(), serde_json::json!(at));
                for (i, name) in GAUGES.iter().enumerate() {
                    row.insert((*name).to_owned(), serde_json::json!(s.values[i]));
                }
                serde_json::Value::Object(row)
            })
            .collect();
        serde_json::json!({
            "sample_interval_seconds": seconds_number(self.interval),
            "gauges": GAUGES,
            "samples": samples,
        })
    }
}

/// Pre-rendered JSON text.
type Rendered = Arc<Box<RawValue>>;

fn raw(value: &impl Serialize) -> Rendered {
    Arc::new(
        serde_json::value::to_raw_value(value)
            .unwrap_or_else(|_| RawValue::from_string("{}".to_owned()).expect("valid JSON")),
    )
}

/// The ring plus the `/health` block, pre-rendered after every sample.
pub struct Trends {
    /// Taken by the health loop (to push) and by `GET /health/trends` (to
    /// render); never by `/health` or a request handler.
    ring: Mutex<TrendRing>,
    /// The `trends` block of `/health`.
    summary: ArcSwap<Box<RawValue>>,
    pub interval: Duration,
}

impl Trends {
    pub fn new(window: Duration, interval: Duration) -> Trends {
        let ring = TrendRing::new(window, interval);
        Trends {
            summary: ArcSwap::new(raw(&ring.summary())),
            ring: Mutex::new(ring),
            interval,
        }
    }

    /// Add a sample and re-render the `/health` block (called by the
    /// health loop).
    pub fn record(&self, sample: Sample) {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.push(sample);
        let summary = raw(&ring.summary());
        drop(ring);
        self.summary.store(summary);
    }

    /// The `trends` block of `/health`, pre-rendered.
    pub fn summary_json(&self) -> Rendered {
        self.summary.load_full()
    }

    /// The `GET /health/trends` body, rendered now from the ring.
    pub fn samples_json(&self) -> String {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.samples_json().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize, start: f64, step: f64) -> Vec<(f64, f64)> {
        (0..n)
            .map(|i| (i as f64 / 60.0, start + step * i as f64))
            .collect()
    }

    const FDS: LeakRule = LeakRule {
        min_samples: 10,
        min_rise: 16.0,
        min_relative_rise: 0.10,
        min_non_decreasing: 0.80,
    };

    #[test]
    fn slope_of_a_line_is_its_gradient() {
        let pts = [(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)];
        assert!((slope(&pts) - 2.0).abs() < 1e-9);
        assert_eq!(slope(&[(0.0, 5.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 5.0), (1.0, 9.0)]), 0.0);
        assert!(slope(&line(50, 100.0, -1.0)) < 0.0);
    }

    #[test]
    fn steady_growth_beyond_both_thresholds_is_a_leak() {
        // One fd a minute for 40 minutes, starting at 15: rise 39.
        assert!(suspected_leak(&line(40, 15.0, 1.0), &FDS));
    }

    #[test]
    fn flat_small_short_or_falling_series_are_not_leaks() {
        assert!(!suspected_leak(&line(40, 15.0, 0.0), &FDS), "flat");
        assert!(
            !suspected_leak(&line(9, 15.0, 10.0), &FDS),
            "too few samples"
        );
        assert!(
            !suspected_leak(&line(40, 15.0, 0.3), &FDS),
            "rise 11.7 < 16"
        );
        assert!(
            !suspected_leak(&line(40, 3000.0, 1.0), &FDS),
            "rise 39 < 10% of 3000"
        );
        assert!(!suspected_leak(&line(40, 100.0, -1.0), &FDS), "falling");
    }

    #[test]
    fn sawtooth_with_upward_drift_is_not_steady() {
        // Up 10, down 8, up 10, down 8...: drifts up, but half the steps fall.
        let mut v = 15.0;
        let pts: Vec<_> = (0..40)
            .map(|i| {
                v += if i % 2 == 0 { 10.0 } else { -8.0 };
                (i as f64 / 60.0, v)
            })
            .collect();
        assert!(slope(&pts) > 0.0);
        assert!(!suspected_leak(&pts, &FDS));
    }

    #[test]
    fn ring_is_bounded_and_names_the_growing_gauge() {
        let mut ring = TrendRing::new(Duration::from_secs(60), Duration::from_secs(1));
        assert_eq!(ring.capacity(), 60);
        for i in 0..100 {
            ring.push(Sample {
                at: 1_000.0 + i as f64,
                values: [5, 15 + i, 8 << 20, 10, 0, -1],
            });
        }
        assert_eq!(ring.len(), 60);
        let s = ring.summary();
        assert_eq!(s.suspected_leak, vec!["open_fds"]);
        assert_eq!(s.samples, 60);
        assert_eq!(s.window_seconds, serde_json::Number::from(60u64));
        // One fd a second is 3,600 an hour.
        assert_eq!(s.slope_per_hour["open_fds"], serde_json::json!(3600.0));
        assert_eq!(s.slope_per_hour["thread_count"], serde_json::json!(0.0));
        // An unreadable gauge has no points, so no slope.
        assert_eq!(s.slope_per_hour["store_queue"], serde_json::json!(0.0));
        let body = ring.samples_json();
        assert_eq!(body["samples"].as_array().unwrap().len(), 60);
        assert_eq!(body["samples"][0]["open_fds"], 55);
        assert_eq!(body["gauges"].as_array().unwrap().len(), GAUGES.len());
    }

    #[test]
    fn bounded_gauges_are_never_named() {
        let mut ring = TrendRing::new(Duration::from_secs(60), Duration::from_secs(1));
        for i in 0..60 {
            ring.push(Sample {
                at: i as f64,
                values: [5, 15, 8 << 20, 10, 10 * i, 0],
            });
        }
        let s = ring.summary();
        assert!(s.suspected_leak.is_empty(), "{:?}", s.suspected_leak);
        assert!(
            s.slope_per_hour["conversation_history_size"]
                .as_f64()
                .unwrap()
                > 0.0
        );
    }
}
