//! The benchmark's context for the watchdog tick: what this machine charges
//! for the thread wake-ups a tick cannot avoid, with no work done in them.
//!
//! A tick of agentd's health loop wakes a tokio worker on its timer, hands
//! the `store` check's request to the SQLite thread and waits for its answer
//! (the store thread wakes, then the worker again), and every other interval
//! or so the sentinel thread wakes to look at the heartbeat. This program
//! does exactly those wake-ups and nothing else: a tokio multi-thread
//! runtime (two workers, as agentd) whose task waits for each tick on
//! agentd's own ticker (`health::ticker`), sends one
//! message to a plain thread over a channel and awaits its oneshot answer,
//! beside a thread that sleeps two intervals at a time. It reports its own
//! CPU time per tick, from `getrusage`.
//!
//! On an idle virtual machine a wake-up from idle is far dearer than on bare
//! metal (the CPU leaves its idle state and caches are cold), so the tick's
//! cost has a floor that no code of agentd's can lower; `bench/run.sh` prints
//! this floor beside the tick's CPU.
//!
//! Usage: `wake_floor INTERVAL TICKS`, the interval as `50ms` or `1s`.
//! Prints `FLOOR us_per_tick=... ticks=...`.

use std::sync::mpsc;
use std::time::Duration;

fn cpu_us() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is valid for writes of one rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    // SAFETY: getrusage filled it (or left it zeroed).
    let u = unsafe { usage.assume_init() };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(u.ru_utime) + us(u.ru_stime)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let interval = args.next().unwrap_or_else(|| "50ms".into());
    let interval = match (interval.strip_suffix("ms"), interval.strip_suffix('s')) {
        (Some(ms), _) => ms.parse().map(Duration::from_millis),
        (None, Some(s)) => s.parse().map(Duration::from_secs),
        (None, None) => interval.parse().map(Duration::from_millis),
    }
    .unwrap_or_else(|_| panic!("cannot read the interval {interval:?}: say 50ms or 1s"));
    let ticks: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(300);

    // The store thread's stand-in: answers each request at once.
    let (tx, rx) = mpsc::sync_channel::<tokio::sync::oneshot::Sender<()>>(16);
    std::thread::Builder::new()
        .name("floor-store".into())
        .spawn(move || {
            for reply in rx {
                let _ = reply.send(());
            }
        })
        .expect("thread");
    // The sentinel's stand-in: wakes every two intervals.
    std::thread::Builder::new()
        .name("floor-sentinel".into())
        .spawn(move || loop {
            std::thread::sleep(interval * 2);
        })
        .expect("thread");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // On a worker, as agentd's loop (the main thread only waits for the end).
    let run = runtime.spawn(async move {
        // agentd's own clock for the tick (a timerfd on Linux).
        let mut ticker = agentd::health::ticker::Ticker::new(interval);
        ticker.tick().await;
        // Settle, as the watchdog benchmark does before its window.
        for _ in 0..10 {
            ticker.tick().await;
        }
        let before = cpu_us();
        for _ in 0..ticks {
            ticker.tick().await;
            let (reply, answer) = tokio::sync::oneshot::channel();
            tx.send(reply).expect("store stand-in");
            answer.await.expect("answer");
        }
        (cpu_us() - before) / f64::from(ticks)
    });
    let per_tick = runtime.block_on(run).expect("tick loop");
    println!(
        "FLOOR us_per_tick={per_tick:.1} ticks={ticks} interval_ms={}",
        interval.as_millis()
    );
}
