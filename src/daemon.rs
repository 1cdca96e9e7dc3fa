//! The `serve` lifecycle: the order of start-up steps, signal handling and the
//! order of shutdown. Each step's work lives in its own room; this file only
//! sequences them so the order (and what a failure at each step means) reads
//! top to bottom:
//!
//! 1. non-dumpable (agents cannot read agentd's environment or memory), then
//!    the notifier (so even a config error reaches `systemctl status`)
//! 2. config → logging → RLIMIT_NOFILE → child subreaper (+ orphan reaper)
//! 3. listener (inherited by socket activation, or bound; not yet accepting),
//!    before anything touches the state directory: a start that cannot
//!    listen leaves nothing behind
//! 4. state-dir lock (one process per directory) → store (migrations extend
//!    the start timeout) → history → runtime
//! 5. server + health loop + sentinel; `READY=1` after the first passing tick
//! 6. SIGTERM/SIGINT → `STOPPING=1`, drain, cancel executions, close the store
//!    (SIGINT cancels executions at once; a second signal exits at once)
//!    SIGHUP → `RELOADING=1`, re-read the config file, `READY=1`

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::agent::runtimes;
use crate::app::{App, Lifecycle};
use crate::config::{Config, Overrides};
use crate::health::app_checks::build_checks;
use crate::health::gauges::ProcGauges;
use crate::health::sentinel::{self, SentinelConfig};
use crate::health::watchdog::{self, HealthState, WatchdogMode};
use crate::init::activation::{self, Inherited};
use crate::init::dumpable;
use crate::init::logging::init_logging;
use crate::init::notify::Notifier;
use crate::init::reaper::{self, OrphanReaper, EXECUTION_SWEEP_BOUND};
use crate::init::rlimit::{raise_nofile, RlimitReport};
use crate::server::{self, Listener};
use crate::shutdown::Shutdown;
use crate::state_dir::StateDirLock;

/// Exit code for invalid configuration (nothing was bound).
const EXIT_CONFIG: u8 = 2;
/// Exit code for a start-up failure after the configuration was valid.
const EXIT_START: u8 = 1;

/// How much more start-up time to ask systemd for before a slow step
/// (`EXTEND_TIMEOUT_USEC`).
const SLOW_STEP_EXTENSION: Duration = Duration::from_secs(60);

/// How long `/proc` gauges are cached for `/health` (a fresh read per request
/// would cost more than the rest of the answer).
pub const GAUGE_TTL: Duration = Duration::from_secs(1);

pub fn serve(overrides: Overrides) -> ExitCode {
    // First, while agentd is one thread and before any agent exists: a
    // process of the same user (an agent) can then read neither its
    // environment (the API token) nor its memory. Logged once logging is up.
    let protected = dumpable::protect();
    let notifier = Arc::new(Notifier::from_env());
    let config = match Config::from_env(overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentd: {e}");
            notifier.status_failed(&format!("failed: {e}"), Some(libc::EINVAL));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let log_target = init_logging(&config.log_filter);
    tracing::debug!(?log_target, "logging initialised");
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    if let Err(e) = protected {
        tracing::warn!(
            "cannot make agentd non-dumpable ({e}); its agents may read its environment and memory"
        );
    }
    let rlimit = raise_nofile(config.health.nofile_target);
    tracing::info!(
        outcome = ?rlimit.outcome,
        soft = rlimit.soft,
        hard = rlimit.hard,
        "RLIMIT_NOFILE {:?}: soft {}, hard {}",
        rlimit.outcome,
        rlimit.soft,
        rlimit.hard
    );
    // Before any child exists: orphans of agents reparent to agentd (not to
    // PID 1, which may never reap them in a container) and are reaped here.
    match reaper::become_subreaper() {
        Ok(()) => tracing::debug!("child subreaper: orphans of agents reparent to agentd"),
        Err(e) => {
            tracing::warn!("cannot become a child subreaper ({e}); orphans of agents go to PID 1")
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("agentd-worker")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            notifier.status_failed(&format!("failed: async runtime: {e}"), e.raw_os_error());
            return ExitCode::from(EXIT_START);
        }
    };
    let code = runtime.block_on(run(config, notifier, rlimit));
    // Tasks still parked (a wedged child reader, say) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// Build the health state the loop, `/health` and the sentinel share.
pub fn health_state(config: &Config, notifier: Arc<Notifier>, rlimit: RlimitReport) -> HealthState {
    HealthState::new(
        &config.health,
        notifier,
        rlimit,
        Arc::new(ProcGauges::new(GAUGE_TTL)),
    )
}

async fn run(config: Config, notifier: Arc<Notifier>, rlimit: RlimitReport) -> ExitCode {
    let fail = |msg: String, errno: Option<i32>| {
        tracing::error!("{msg}");
        notifier.status_failed(&format!("failed: {msg}"), errno);
        ExitCode::from(EXIT_START)
    };
    let shutdown = Shutdown::new();
    // Lives as long as the runtime: orphans keep arriving until the last
    // execution ended.
    tokio::spawn(OrphanReaper::default().run());
    if let Err(e) = runtimes::check_available(&config.runtime) {
        tracing::warn!("{e} (requests will fail with 502 until it is installed)");
    }
    let agent = runtimes::build_runtime(&config.runtime);
    let health = health_state(&config, notifier.clone(), rlimit);
    // The listener before the state directory: a start that cannot listen
    // (the port taken, a bad inherited socket) leaves nothing on disk. Bound
    // is not accepting: connections wait in the kernel's backlog until the
    // accept loop starts below, once the app is ready.
    let listener = match listen(&config).await {
        Ok(l) => l,
        Err((msg, errno)) => return fail(msg, errno),
    };
    // One process per state directory, taken before the store opens; held
    // (by this binding) until `run` returns.
    let _state_lock = match StateDirLock::acquire(&config.state_dir) {
        Ok(lock) => lock,
        Err(e) => return fail(format!("cannot start: {e}"), None),
    };
    notifier.status("starting: opening the store");
    let on_slow_step = |step: &str| {
        notifier.extend_timeout(SLOW_STEP_EXTENSION);
        notifier.status(&format!("starting: {step}"));
        tracing::info!("{step}");
    };
    let (app, store_thread) =
        match App::start(config, agent, shutdown.clone(), health, &on_slow_step).await {
            Ok(started) => started,
            Err(e) => return fail(format!("cannot start: {e}"), None),
        };
    tracing::info!("listening on {}", listener.describe());
    spawn_signal_handlers(app.clone());
    // The health loop ends when shutdown starts, so the sentinel must too: a
    // drain that waits out an agent's grace period is not a stall.
    if let Some(sentinel) = spawn_sentinel(&app) {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.triggered().await;
            let _ = tokio::task::spawn_blocking(move || sentinel.stop()).await;
        });
    }

    let (serving, first_pass) = start_serving(&app, listener);
    notifier.status("starting: waiting for the first passing health check");
    tokio::select! {
        _ = first_pass => {
            app.set_lifecycle(Lifecycle::Running);
            notifier.ready();
            notifier.status(&watchdog::status_line(&app));
            let (mode, interval_ms) = (app.health.mode, app.health.interval.as_millis() as u64);
            tracing::info!(
                ?mode,
                interval_ms,
                "ready: watchdog mode {mode:?}, health tick every {interval_ms} ms"
            );
        }
        _ = shutdown.triggered() => {}
    }

    let _ = serving.server.await;
    notifier.status("stopping: cancelling executions");
    app.set_lifecycle(Lifecycle::Stopping);
    app.executor.close_and_cancel_all();
    let rt = &app.config.runtime;
    let bound = rt.kill_grace * 2 + rt.pipe_drain + EXECUTION_SWEEP_BOUND + Duration::from_secs(1);
    if !app.executor.wait_idle(bound).await {
        tracing::warn!("executions still running after {bound:?}; exiting anyway");
    }
    serving.health_loop.abort();
    notifier.status("stopping: closing the store");
    if let Err(e) = app.store.close().await {
        tracing::error!("closing the store: {e}");
    }
    if FORCED_EXIT.load(Ordering::SeqCst) {
        // A second signal's forced exit is under way: it exits non-zero
        // once the store (closed once, for both) is closed.
        std::future::pending::<()>().await;
    }
    let _ = tokio::task::spawn_blocking(move || store_thread.join()).await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// The tasks that serve a started `App`.
pub struct Serving {
    pub server: JoinHandle<()>,
    pub health_loop: JoinHandle<()>,
}

/// Install the checks (the self-probe enters through the probe door), start the accept
/// loop and the health loop. The receiver fires after the first passing tick.
/// Shared by `serve` and the in-process tests, so both run the same path.
pub fn start_serving(app: &Arc<App>, listener: Listener) -> (Serving, oneshot::Receiver<()>) {
    app.health.install_checks(build_checks(app));
    // The CLI's version, once, beside start-up (a Node CLI takes seconds to
    // answer; READY=1 must not wait for it). `/health` shows null until then.
    {
        let app = app.clone();
        tokio::spawn(async move {
            if let Some(version) = runtimes::read_version(&app.config.runtime).await {
                tracing::info!(runtime = app.runtime_report.name, %version, "agent CLI version");
                app.runtime_report.set_version(version);
                // `/health` shows it now, not at the next tick.
                if let Some(published) = app.health.last.load_full() {
                    crate::health::body::publish_tail(&app, &published);
                }
            }
        });
    }
    // Executions get the drain deadline to finish once shutdown starts, then
    // are cancelled (their process groups get SIGINT → SIGTERM → SIGKILL).
    {
        let app = app.clone();
        tokio::spawn(async move {
            app.shutdown.triggered().await;
            app.set_lifecycle(Lifecycle::Stopping);
            tokio::time::sleep(app.config.drain_timeout).await;
            app.executor.close_and_cancel_all();
        });
    }
    let (tx, rx) = oneshot::channel();
    let health_loop = tokio::spawn(watchdog::run(app.clone(), tx));
    let server = {
        let app = app.clone();
        tokio::spawn(async move {
            let shutdown = app.shutdown.clone();
            server::run(listener, app, shutdown.triggered()).await;
        })
    };
    (
        Serving {
            server,
            health_loop,
        },
        rx,
    )
}

/// The inherited socket (socket activation), else a freshly bound one.
async fn listen(config: &Config) -> Result<Listener, (String, Option<i32>)> {
    match activation::inherited_listeners() {
        Ok(mut inherited) if !inherited.is_empty() => {
            if inherited.len() > 1 {
                tracing::warn!(
                    count = inherited.len(),
                    "several sockets inherited; serving the first only"
                );
            }
            let first = inherited.remove(0);
            tracing::info!(name = first.name(), "using the socket passed by systemd");
            let listener = match first {
                Inherited::Tcp { listener, .. } => {
                    tokio::net::TcpListener::from_std(listener).map(Listener::Tcp)
                }
                Inherited::Unix { listener, .. } => {
                    tokio::net::UnixListener::from_std(listener).map(Listener::Unix)
                }
            };
            listener.map_err(|e| {
                (
                    format!("cannot use the inherited socket: {e}"),
                    e.raw_os_error(),
                )
            })
        }
        Ok(_) => tokio::net::TcpListener::bind(config.listen)
            .await
            .map(Listener::Tcp)
            .map_err(|e| {
                let named = if config.listen_text == config.listen.to_string() {
                    config.listen.to_string()
                } else {
                    format!("{} ({})", config.listen, config.listen_text)
                };
                (format!("cannot listen on {named}: {e}"), e.raw_os_error())
            }),
        Err(e) => Err((format!("socket activation: {e}"), Some(libc::EBADF))),
    }
}

/// How long a forced exit (a second SIGINT/SIGTERM) waits for the store to
/// close: a hung store must not turn "exit now" into "exit eventually".
const FORCED_EXIT_STORE_CLOSE: Duration = Duration::from_secs(2);

/// Signals: SIGHUP reloads. The first SIGTERM or SIGINT starts the graceful
/// stop; a second one during it exits at once.
///
/// SIGTERM (systemd, launchd, `kill`) drains: in-flight requests get up to
/// `AGENTD_DRAIN_TIMEOUT`, running executions too, then they are cancelled.
/// SIGINT is a person at a terminal pressing Ctrl-C: running executions are
/// cancelled at once (their process groups get SIGINT → SIGTERM → SIGKILL),
/// so the requests waiting on them are answered "cancelled" and the drain
/// ends as soon as those answers are written, instead of waiting out the
/// whole drain for work nobody will read. Either way a second signal closes
/// the store (bounded), kills every execution's process group and exits
/// with 128 + the signal number.
fn spawn_signal_handlers(app: Arc<App>) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        let interactive = loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM: shutting down (a second signal exits at once)");
                    break false;
                }
                _ = int.recv() => {
                    tracing::info!(
                        "SIGINT: shutting down, cancelling running executions \
                         (a second signal exits at once)"
                    );
                    break true;
                }
                _ = hup.recv() => reload(&app).await,
            }
        };
        app.health.notifier.stopping();
        app.health.notifier.status("stopping: draining requests");
        if interactive {
            app.executor.close_and_cancel_all();
        }
        app.shutdown.trigger();
        let signo = tokio::select! {
            _ = term.recv() => libc::SIGTERM,
            _ = int.recv() => libc::SIGINT,
        };
        forced_exit(&app, signo).await;
    });
}

/// Set when a second signal's forced exit begins: the stop then leaves the
/// exit to it.
static FORCED_EXIT: AtomicBool = AtomicBool::new(false);

/// A second SIGINT/SIGTERM during the stop: close the store, kill what still
/// runs, exit non-zero now.
async fn forced_exit(app: &App, signo: i32) -> ! {
    FORCED_EXIT.store(true, Ordering::SeqCst);
    tracing::warn!(signal = signo, "second signal during the stop: exiting now");
    app.health
        .notifier
        .status("stopping: second signal, exiting now");
    for execution in app.executor.active() {
        if let Some(pid) = execution.pid() {
            // Each child leads its own process group (pgid = pid).
            // SAFETY: kill(2) with a negative pid signals that group only.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        }
    }
    match tokio::time::timeout(FORCED_EXIT_STORE_CLOSE, app.store.close()).await {
        Ok(Ok(())) => tracing::info!("store closed"),
        Ok(Err(e)) => tracing::error!("closing the store: {e}"),
        Err(_) => tracing::error!(
            "the store did not close within {FORCED_EXIT_STORE_CLOSE:?}; exiting anyway"
        ),
    }
    std::process::exit(128 + signo)
}

/// SIGHUP: re-read the configuration and apply what can change while running.
async fn reload(app: &Arc<App>) {
    let notifier = &app.health.notifier;
    notifier.reloading();
    match app.config.reload(|name| std::env::var(name).ok()) {
        Ok(next) => {
            for w in &next.warnings {
                tracing::warn!("{w}");
            }
            app.set_history_limit(next.history_limit).await;
            tracing::info!(
                history_limit = next.history_limit,
                "configuration reloaded (listen address, state dir, limits and \
                 intervals other than history_limit apply at the next restart)"
            );
        }
        Err(e) => tracing::error!("reload failed, keeping the running configuration: {e}"),
    }
    notifier.ready();
    notifier.status(&watchdog::status_line(app));
}

/// The sentinel watches the health loop from a plain OS thread.
fn spawn_sentinel(app: &Arc<App>) -> Option<sentinel::SentinelHandle> {
    let health = &app.health;
    let interval = health.interval;
    let abort_after = match (health.mode, app.config.health.self_abort_after) {
        (WatchdogMode::KeepaliveFile, n) if n > 0 => Some(interval * n),
        _ => None,
    };
    let config = SentinelConfig {
        // The sentinel wakes when the heartbeat would turn stale; this only
        // bounds the wait in between.
        poll: (interval * 2).clamp(Duration::from_millis(20), Duration::from_secs(1)),
        stall_after: interval * 2,
        abort_after,
        bundle_dir: app.config.state_dir.join("diagnostics"),
        keep: app.config.health.diagnostics_keep,
    };
    // Called once per incident, from the sentinel thread: say it where a person
    // looks (STATUS=, one structured journal record), then hand over the
    // context for the bundle. Saying is not petting: no WATCHDOG=1 here.
    let context = {
        let app = app.clone();
        Box::new(move || {
            let stalled_ms = app.health.heartbeat.since_last().as_millis() as u64;
            app.health.notifier.status(&format!(
                "degraded: health_loop: no tick for {stalled_ms} ms (runtime wedged?)"
            ));
            tracing::error!(
                health_check = "health_loop",
                health_status = "stalled",
                elapsed_ms = stalled_ms,
                "health loop stalled for {stalled_ms} ms; writing a diagnostics bundle"
            );
            crate::server::health::diagnostics_context(&app)
        })
    };
    match sentinel::spawn(
        health.heartbeat.clone(),
        config,
        context,
        Box::new(|| std::process::abort()),
    ) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::error!("cannot start the sentinel thread: {e}");
            None
        }
    }
}
