//! Single-flight: concurrent callers of the same expensive operation share one
//! in-progress run. `GET /health?deep=1` uses it so a burst of deep requests
//! (a dashboard, a load balancer and a person with curl) runs the checks once.
//!
//! Not for: caching. Once a run completes, the next call starts a new run; a
//! result is never served after its run has finished.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

/// Shares one in-progress run of an async operation among concurrent callers.
pub struct SingleFlight<T: Clone + Send + Sync + 'static> {
    /// The run in progress, if any. Callers that find one subscribe to it.
    /// A std mutex is right here: it is held only to look at or replace the
    /// slot, never across an await.
    inflight: Arc<Mutex<Option<watch::Receiver<Option<T>>>>>,
    runs: AtomicU64,
    /// Callers currently waiting for a result (started or joined).
    waiting: AtomicUsize,
}

impl<T: Clone + Send + Sync + 'static> Default for SingleFlight<T> {
    fn default() -> Self {
        SingleFlight::new()
    }
}

impl<T: Clone + Send + Sync + 'static> std::fmt::Debug for SingleFlight<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFlight")
            .field("runs", &self.runs())
            .field("waiting", &self.waiting())
            .finish()
    }
}

impl<T: Clone + Send + Sync + 'static> SingleFlight<T> {
    pub fn new() -> SingleFlight<T> {
        SingleFlight {
            inflight: Arc::new(Mutex::new(None)),
            runs: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Returns the result of the run in progress, or starts one with `f`.
    ///
    /// The run is spawned on the current tokio runtime, so it completes even
    /// if every caller is dropped (a cancelled HTTP request cannot leave the
    /// others waiting on a run nobody drives). If `f` panics, every caller
    /// waiting on that run panics too; the next call starts a new run.
    pub async fn run<F, Fut>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let _waiting = Waiting(&self.waiting);

        let mut rx = self.join_or_start(f);
        let value = match rx.wait_for(Option::is_some).await {
            Ok(value) => value.clone().expect("waited for Some"),
            Err(_) => panic!("single-flight run panicked"),
        };
        value
    }

    /// Runs started so far.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Callers waiting for a result right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn join_or_start<F, Fut>(&self, f: F) -> watch::Receiver<Option<T>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let mut slot = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        // The slot is cleared under this lock when a run finishes, so a
        // receiver found here belongs to a run still in progress, unless that
        // run panicked and is being torn down (its sender is gone).
        if let Some(rx) = slot.as_ref().filter(|rx| rx.has_changed().is_ok()) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        *slot = Some(rx.clone());
        self.runs.fetch_add(1, Ordering::Relaxed);
        let fut = f();
        let inflight = Arc::clone(&self.inflight);
        let ours = rx.clone();
        tokio::spawn(async move {
            // Clears the slot even if `fut` panics, so one panicking run does
            // not leave every later caller subscribed to a dead channel.
            let _clear = ClearSlot {
                inflight: &inflight,
                ours: &ours,
            };
            let value = fut.await;
            // Publish and clear under one lock: a caller either joins this run
            // and sees the value, or finds the slot empty and starts anew.
            let mut slot = inflight.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = tx.send(Some(value));
            if slot.as_ref().is_some_and(|rx| rx.same_channel(&ours)) {
                *slot = None;
            }
        });
        rx
    }
}

struct ClearSlot<'a, T> {
    inflight: &'a Mutex<Option<watch::Receiver<Option<T>>>>,
    ours: &'a watch::Receiver<Option<T>>,
}

impl<T> Drop for ClearSlot<'_, T> {
    fn drop(&mut self) {
        let mut slot = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_some_and(|rx| rx.same_channel(self.ours)) {
            *slot = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn next_call_after_completion_starts_a_new_run() {
        let flight = SingleFlight::new();
        assert_eq!(flight.run(|| async { 1 }).await, 1);
        assert_eq!(flight.run(|| async { 2 }).await, 2);
        assert_eq!(flight.runs(), 2);
        assert_eq!(flight.waiting(), 0);
    }

    #[tokio::test]
    async fn panicking_run_panics_its_callers_and_does_not_wedge_the_next() {
        let flight = Arc::new(SingleFlight::<u32>::new());
        let f2 = flight.clone();
        let caller = tokio::spawn(async move { f2.run(|| async { panic!("run bug") }).await });
        assert!(caller.await.unwrap_err().is_panic());
        assert_eq!(flight.run(|| async { 7 }).await, 7);
        assert_eq!(flight.runs(), 2);
    }
}
