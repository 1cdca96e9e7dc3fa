//! The watchdog loop's clock: the instant each tick is due, with one wake-up
//! of the runtime per tick.
//!
//! tokio's timer wheel rounds a sleep into slots of growing width: a 50 ms
//! sleep that crosses a 64 ms slot boundary is first woken at the boundary to
//! move down a level, and a worker parked until the next expiration of any
//! timer wakes for each. Measured on an idle runtime, `tokio::time::interval`
//! at 50 ms returned from `epoll_wait` 2.76 times per tick. On Linux the
//! ticker is instead a periodic `timerfd` in the runtime's own epoll set,
//! which the kernel fires once per period; elsewhere (or if the timerfd
//! cannot be made) it is `tokio::time::interval`.
//!
//! Not for: timers of requests or connections (tokio's, which coalesce
//! fine under load); the sentinel, which runs on a thread of its own.

use std::time::{Duration, Instant};

/// Yields the instant each tick was due: the first at once, then one every
/// `period`. A tick that ran past one or more periods makes the next one due
/// at once, as the latest period that passed (missed ones are skipped, not
/// replayed).
pub struct Ticker {
    period: Duration,
    /// The first tick is due when the ticker is made.
    first: Option<Instant>,
    clock: Clock,
}

enum Clock {
    #[cfg(target_os = "linux")]
    Fd(fd::Periodic),
    Tokio(tokio::time::Interval),
}

impl Ticker {
    /// A ticker on the current tokio runtime (must be called inside one).
    pub fn new(period: Duration) -> Ticker {
        let first = Instant::now();
        #[cfg(target_os = "linux")]
        match fd::Periodic::new(first, period) {
            Ok(clock) => {
                return Ticker {
                    period,
                    first: Some(first),
                    clock: Clock::Fd(clock),
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                "cannot make a timerfd for the health tick; using tokio's timer"
            ),
        }
        Ticker {
            period,
            first: Some(first),
            clock: tokio_clock(first + period, period),
        }
    }

    /// The instant the next tick was due, once it is.
    pub async fn tick(&mut self) -> Instant {
        if let Some(first) = self.first.take() {
            return first;
        }
        match &mut self.clock {
            #[cfg(target_os = "linux")]
            Clock::Fd(fd) => match fd.tick().await {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        "cannot read the health tick's timerfd; using tokio's timer from now on"
                    );
                    let now = Instant::now();
                    self.clock = tokio_clock(now + self.period, self.period);
                    now
                }
            },
            Clock::Tokio(interval) => interval.tick().await.into_std(),
        }
    }
}

fn tokio_clock(first: Instant, period: Duration) -> Clock {
    let mut interval = tokio::time::interval_at(first.into(), period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    Clock::Tokio(interval)
}

#[cfg(target_os = "linux")]
mod fd {
    use std::io;
    use std::os::fd::OwnedFd;
    use std::time::{Duration, Instant};

    use nix::sys::time::TimeSpec;
    use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;

    /// A `CLOCK_MONOTONIC` timerfd firing every `period` after `start`
    /// (the clock `Instant` reads on Linux, so the due instants are
    /// `start + n × period`).
    pub struct Periodic {
        fd: AsyncFd<OwnedFd>,
        period: Duration,
        /// When the latest period that fired was due (`start` before any).
        due: Instant,
    }

    impl Periodic {
        pub fn new(start: Instant, period: Duration) -> io::Result<Periodic> {
            let timer = TimerFd::new(
                ClockId::CLOCK_MONOTONIC,
                TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
            )?;
            let every = TimeSpec::from_duration(period.max(Duration::from_micros(1)));
            timer.set(
                Expiration::IntervalDelayed(every, every),
                TimerSetTimeFlags::empty(),
            )?;
            // SAFETY: the `OwnedFd` is the timerfd just made, owned by the
            // `AsyncFd` for its whole life and never replaced.
            let fd = unsafe {
                AsyncFd::register_with_interest(OwnedFd::from(timer), Interest::READABLE)
            }?;
            Ok(Periodic {
                fd,
                period,
                due: start,
            })
        }

        /// Waits for the timer; returns the instant of the latest period
        /// that fired.
        pub async fn tick(&mut self) -> io::Result<Instant> {
            loop {
                let mut ready = self.fd.readable().await?;
                let mut count = [0u8; 8];
                match nix::unistd::read(self.fd.get_ref(), &mut count) {
                    Ok(8) => {
                        // Reading took every expiration: the timerfd is not
                        // readable until the next one, which the kernel
                        // reports as a new edge.
                        ready.clear_ready();
                        let fired = u32::try_from(u64::from_ne_bytes(count)).unwrap_or(u32::MAX);
                        self.due += self.period * fired;
                        return Ok(self.due);
                    }
                    Ok(n) => {
                        return Err(io::Error::other(format!("timerfd read {n} bytes, not 8")))
                    }
                    Err(nix::errno::Errno::EAGAIN) => ready.clear_ready(),
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ticks_are_due_one_period_apart_and_never_early() {
        let period = Duration::from_millis(20);
        let mut ticker = Ticker::new(period);
        let first = ticker.tick().await;
        let mut last = first;
        for n in 1..=5u32 {
            let due = ticker.tick().await;
            assert!(Instant::now() >= due, "tick {n} returned before it was due");
            assert_eq!(due, first + period * n, "tick {n}");
            last = due;
        }
        assert!(last > first);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tick_that_overran_periods_skips_them() {
        let period = Duration::from_millis(20);
        let mut ticker = Ticker::new(period);
        let first = ticker.tick().await;
        // Overrun three and a half periods without awaiting the ticker.
        std::thread::sleep(period * 7 / 2);
        let due = ticker.tick().await;
        assert_eq!(due, first + period * 3, "the latest period that passed");
        let next = ticker.tick().await;
        assert_eq!(next, first + period * 4, "then the schedule goes on");
    }
}
