//! The `serve` lifecycle: the order of start-up steps, signal handling and the
//! order of shutdown. Each step's work lives in its own room; this file only
//! sequences them so the order (and what a failure at each step means) reads
//! top to bottom.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::runtime::{Echo, Runtime};
use crate::app::{App, Lifecycle};
use crate::config::{Config, Overrides};
use crate::server::{self, Listener};
use crate::shutdown::Shutdown;

/// Exit code for invalid configuration (nothing was bound).
const EXIT_CONFIG: u8 = 2;
/// Exit code for a start-up failure after the configuration was valid.
const EXIT_START: u8 = 1;

pub fn serve(overrides: Overrides) -> ExitCode {
    let config = match Config::from_env(overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(&config.log_filter);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("agentd-worker")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    let code = runtime.block_on(run(config));
    // Tasks still parked (a wedged child reader, say) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn run(config: Config) -> ExitCode {
    let shutdown = Shutdown::new();
    let agent: Arc<dyn Runtime> = Arc::new(Echo);
    let listen = config.listen;
    let (app, store_thread) = match App::start(config, agent, shutdown.clone(), &|step| {
        tracing::info!("{step}");
    })
    .await
    {
        Ok(started) => started,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    let listener = match bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(EXIT_START);
        }
    };
    tracing::info!("listening on {}", listener.describe());
    spawn_signal_handler(shutdown.clone());
    app.set_lifecycle(Lifecycle::Running);

    // Executions get the drain deadline to finish, then are cancelled (their
    // process groups get SIGINT → SIGTERM → SIGKILL).
    {
        let app = app.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.triggered().await;
            app.set_lifecycle(Lifecycle::Stopping);
            tokio::time::sleep(app.config.drain_timeout).await;
            app.executor.close_and_cancel_all();
        });
    }
    server::run(listener, app.clone(), shutdown.triggered()).await;

    app.set_lifecycle(Lifecycle::Stopping);
    app.executor.close_and_cancel_all();
    let rt = &app.config.runtime;
    let bound = rt.kill_grace * 2 + rt.pipe_drain + Duration::from_secs(1);
    if !app.executor.wait_idle(bound).await {
        tracing::warn!("executions still running after {bound:?}; exiting anyway");
    }
    if let Err(e) = app.store.close().await {
        tracing::error!("closing the store: {e}");
    }
    tokio::task::spawn_blocking(move || store_thread.join())
        .await
        .ok();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

async fn bind(addr: SocketAddr) -> Result<Listener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map(Listener::Tcp)
        .map_err(|e| format!("cannot listen on {addr}: {e}"))
}

fn spawn_signal_handler(shutdown: Shutdown) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.trigger();
    });
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// How long `agentd health` waits for an answer.
const HEALTH_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// `agentd health`: print the server's `/health` body; exit 0 when it answers
/// 200, 1 when it answers otherwise, 2 when it cannot be reached.
pub fn health_command(listen: &str, deep: bool) -> ExitCode {
    let path = if deep { "/health?deep=1" } else { "/health" };
    match http_get(listen, path) {
        Ok((status, body)) => {
            println!("{body}");
            if status == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("agentd: cannot reach {listen}: {e}");
            ExitCode::from(2)
        }
    }
}

fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let addr: SocketAddr = addr.parse().map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}"))
    })?;
    let mut stream = TcpStream::connect_timeout(&addr, HEALTH_COMMAND_TIMEOUT)?;
    stream.set_read_timeout(Some(HEALTH_COMMAND_TIMEOUT))?;
    stream.set_write_timeout(Some(HEALTH_COMMAND_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.take(16 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer")
        })?;
    Ok((status, body.to_owned()))
}
