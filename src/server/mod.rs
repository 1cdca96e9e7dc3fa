//! The HTTP server: our own accept loop over hyper 1.x connections.
//!
//! The accept loop is ours (no framework hides it) because health depends on
//! it: it counts accepts and completed requests, caps concurrent connections
//! (an over-limit connection gets a fast 503 + `Connection: close`, never an
//! unbounded queue), bounds header reads in time (slowloris) and in bytes
//! (`AGENTD_MAX_HEADER_BYTES`, 431), closes idle keep-alive connections, and
//! drains in-flight requests on shutdown. Connections are tasks, never
//! threads.
//!
//! Busy is not wedged: the self-probe never competes with clients, neither
//! for a connection slot nor for a place in the kernel's accept queue. It
//! enters through its own door into this same loop (`ProbeDoor`: one end of
//! an in-memory byte pipe, handed over a bounded channel that the loop
//! selects on beside the listener; `crate::accept`) and is served on one of `PROBE_RESERVED_SLOTS`
//! slots no client can take, through hyper and the `/health` handler like
//! any request. A stalled loop therefore still fails the probe (the door is
//! not taken), while a flood that fills every client slot and overflows the
//! listen backlog only shows as `saturated` in `/health` and `busy:` in
//! `STATUS=`. The listening socket itself is watched by what the loop counts
//! (`accept_errors`, `last_accept_at`) and, under systemd, by the end-to-end
//! suite's wedges.
//!
//! `run` takes its listener and its shutdown future as arguments, so tests bind
//! port 0 and pass a future they control. Routing and handlers live in
//! `router`, `api`, `health`, `metrics` (Prometheus) and `status` (the
//! page for people).

pub mod answer;
pub mod api;
pub mod executions;
pub mod health;
pub mod http;
pub mod input;
pub mod metrics;
pub mod parse_errors;
pub mod router;
pub mod status;

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::accept::PROBE_RESERVED_SLOTS;
use crate::app::App;
use parse_errors::JsonParseErrors;

/// Connections being turned away at once. Rejecting costs a task for up to
/// `REJECT_BUDGET`; past this many, extra connections are closed without an
/// answer so a flood cannot grow tasks without bound.
const MAX_REJECTING: usize = 256;

/// Time spent on one rejected connection (read its request, answer 503).
const REJECT_BUDGET: Duration = Duration::from_millis(500);

/// Pause after an accept error such as EMFILE, so a full fd table does not
/// turn the accept loop into a busy spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// At most one accept-error warning per this period; the rest are counted
/// (`accept_errors` in `/health`) and logged at debug, so an fd storm cannot
/// flood the journal.
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// hyper's smallest allowed read buffer (`max_buf_size` panics below it).
const HYPER_MIN_BUF: usize = 8192;

/// Body of the over-limit answer, written by hand: no hyper connection (and no
/// allocation per byte) is spent on a connection we will not serve.
const OVER_LIMIT_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nconnection: close\r\nretry-after: 1\r\ncontent-length: 86\r\n\r\n\
{\"error\":{\"code\":\"too_many_connections\",\"message\":\"connection limit reached; retry\"}}\n";

/// What the server listens on: a socket it bound, or one inherited from
/// systemd (socket activation), TCP or Unix.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// A human-readable address (`127.0.0.1:8420`, `unix:/run/agentd.sock`).
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp:?".into()),
            Listener::Unix(l) => match l.local_addr() {
                Ok(a) => match a.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:(unnamed)".into(),
                },
                Err(_) => "unix:?".into(),
            },
        }
    }

    pub fn is_loopback(&self) -> bool {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.ip().is_loopback())
                .unwrap_or(false),
            // A Unix socket is reachable only from this host.
            Listener::Unix(_) => true,
        }
    }
}

/// Serve until `shutdown` resolves, then stop accepting and give in-flight
/// requests up to `drain_timeout` to finish.
pub async fn run(listener: Listener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    let max = app.config.max_connections;
    let slots = Arc::new(Semaphore::new(max));
    // Beside the client cap, never taken by a client: see the module doc.
    let probe_slots = Arc::new(Semaphore::new(PROBE_RESERVED_SLOTS));
    let rejecting = Arc::new(Semaphore::new(MAX_REJECTING));
    let draining = CancellationToken::new();
    app.stats.connections_max.store(max, Relaxed);
    app.faults
        .loopback_listener
        .store(listener.is_loopback(), Relaxed);
    let mut shutdown = pin!(shutdown);
    let mut last_accept_warning: Option<Instant> = None;
    // Only one accept loop serves the door; a second `run` (tests) has none.
    let mut door = app.probe_door.take_receiver();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            _ = app.faults.accept_stalled() => {
                // Fault injection: stop accepting, keep the socket in LISTEN.
                shutdown.as_mut().await;
                break;
            }
            Some(stream) = async { door.as_mut()?.recv().await } => {
                serve_probe(stream, &app, &slots, &probe_slots, &draining);
                continue;
            }
            r = accept(&listener) => r,
        };
        let conn = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                let total = app.stats.accept_errors.fetch_add(1, Relaxed) + 1;
                if last_accept_warning.is_none_or(|t| t.elapsed() >= ACCEPT_ERROR_LOG_EVERY) {
                    last_accept_warning = Some(Instant::now());
                    tracing::warn!(error = %e, accept_errors_total = total, "accept failed; backing off");
                } else {
                    tracing::debug!(error = %e, "accept failed; backing off");
                }
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        app.stats.accepted();
        let slot = slots.clone().try_acquire_owned().ok();
        match slot {
            Some(permit) => {
                let app = app.clone();
                let draining = draining.clone();
                tokio::spawn(async move {
                    app.stats.connections_open.fetch_add(1, Relaxed);
                    app.stats.client_slots_used.fetch_add(1, Relaxed);
                    match conn {
                        Conn::Tcp(s) => serve(s, &app, draining).await,
                        Conn::Unix(s) => serve(s, &app, draining).await,
                    }
                    app.stats.client_slots_used.fetch_sub(1, Relaxed);
                    app.stats.connections_open.fetch_sub(1, Relaxed);
                    drop(permit);
                });
            }
            None => {
                app.stats.rejected();
                if let Ok(permit) = rejecting.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        match conn {
                            Conn::Tcp(s) => reject(s).await,
                            Conn::Unix(s) => reject(s).await,
                        }
                        drop(permit);
                    });
                }
            }
        }
    }
    drop(listener);
    draining.cancel();
    let open = max - slots.available_permits();
    tracing::info!(open_connections = open, "stopped accepting; draining");
    let drained = tokio::time::timeout(app.config.drain_timeout, async {
        let _clients = slots.acquire_many(max as u32).await;
        let _probes = probe_slots.acquire_many(PROBE_RESERVED_SLOTS as u32).await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            still_open = max - slots.available_permits(),
            "drain deadline passed; closing remaining connections"
        );
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(listener: &Listener) -> io::Result<Conn> {
    match listener {
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            // Small JSON answers: do not wait for Nagle.
            let _ = s.set_nodelay(true);
            Ok(Conn::Tcp(s))
        }
        Listener::Unix(l) => Ok(Conn::Unix(l.accept().await?.0)),
    }
}

/// Serve a connection that came through the probe door on a reserved slot.
/// With both reserved slots busy (two probes still running), it is dropped:
/// the probe then fails, which is right, because probes should not pile up.
fn serve_probe(
    stream: DuplexStream,
    app: &Arc<App>,
    slots: &Semaphore,
    probe_slots: &Arc<Semaphore>,
    draining: &CancellationToken,
) {
    let Ok(permit) = probe_slots.clone().try_acquire_owned() else {
        return;
    };
    if slots.available_permits() == 0 {
        app.stats.probe_connections_reserved.fetch_add(1, Relaxed);
    }
    let app = app.clone();
    let draining = draining.clone();
    tokio::spawn(async move {
        serve(stream, &app, draining).await;
        drop(permit);
    });
}

/// Serve one connection until it closes, goes quiet too long, or the drain
/// asks it to finish its current request and close.
///
/// Time limits, kept by one timer per connection that is re-armed only when
/// it fires or when a request head starts arriving (never once per request):
/// * a request head must arrive in full within `header_read_timeout` of its
///   first byte (a new connection's first head: of the accept), else the
///   connection is closed at once (slowloris);
/// * a kept-alive connection with no request in flight and no byte of a next
///   head is closed (gracefully) after `idle_timeout`.
///
/// Neither runs while a request is in flight (from its parsed head until its
/// handler answered). hyper's own header timer is off: it cost a boxed timer
/// and two timer-wheel operations per request.
async fn serve<IO>(io: IO, app: &Arc<App>, draining: CancellationToken)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // One Arc per connection for what every request needs: cloning it per
    // request touches only this connection's cache line, not `App`'s
    // reference count that every worker shares.
    let ctx = Arc::new(ConnCtx {
        app: app.clone(),
        activity: Activity::new(),
    });
    let service = {
        let ctx = ctx.clone();
        service_fn(move |req| {
            let ctx = ctx.clone();
            async move {
                ctx.activity.begin();
                let resp = router::route(&ctx.app, req).await;
                ctx.app.stats.request_completed();
                ctx.activity.end();
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let max_header_bytes = app.config.max_header_bytes;
    let mut builder = http1::Builder::new();
    builder
        // The header time limit is ours (see above); without a timer hyper
        // arms none of its own.
        .header_read_timeout(None)
        // Headers over the limit get 431; the read buffer never grows past
        // it (hyper's floor is 8 KiB), so header memory per connection is
        // bounded whatever a client sends.
        .max_header_size(max_header_bytes)
        .max_buf_size(max_header_bytes.max(HYPER_MIN_BUF))
        .max_headers(parse_errors::MAX_HEADER_FIELDS)
        .keep_alive(true);
    let io = HeadClock {
        inner: JsonParseErrors::new(io, max_header_bytes),
        ctx: ctx.clone(),
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = pin!(conn);
    let limits = Limits {
        header: app.config.header_read_timeout,
        idle: app.config.idle_timeout,
    };
    let activity = &ctx.activity;
    let mut timer = pin!(tokio::time::sleep_until(
        activity.instant(limits.header.as_millis() as u64)
    ));
    // The activity the timer was last armed after.
    let mut armed_head = activity.head_started_ms.load(Relaxed);
    let mut armed_end = activity.last_end_ms.load(Relaxed);
    let mut drain = pin!(draining.cancelled());
    // The waker the drain future and the timer last saw: while the task's
    // waker stays the same (it does for a spawned task), polling them again
    // would only re-register it, and the drain future's poll takes the
    // mutex every connection's drain future shares.
    let mut seen: Option<Waker> = None;
    let mut closing = false;
    let ended = poll_fn(|cx| loop {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(r);
        }
        if closing {
            return Poll::Pending;
        }
        let same = seen.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        let drained = if same {
            draining.is_cancelled()
        } else {
            drain.as_mut().poll(cx).is_ready()
        };
        if drained {
            conn.as_mut().graceful_shutdown();
            closing = true;
            continue;
        }
        // A head started arriving, or a request ended, since the timer was
        // armed: that limit may come before the one armed (later ones are
        // found when it fires).
        let head = activity.head_started_ms.load(Relaxed);
        let end = activity.last_end_ms.load(Relaxed);
        if head != armed_head || end != armed_end {
            let due = activity.instant(limits.due_ms(head, end));
            (armed_head, armed_end) = (head, end);
            if due < timer.deadline() {
                timer.as_mut().reset(due);
                seen = None;
            }
        }
        let fired = if same && seen.is_some() {
            timer.is_elapsed()
        } else {
            seen = Some(cx.waker().clone());
            timer.as_mut().poll(cx).is_ready()
        };
        if !fired {
            return Poll::Pending;
        }
        match activity.check(limits) {
            Quiet::HeadTooSlow => return Poll::Ready(Ok(())),
            Quiet::Idle => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            Quiet::Until(at) => {
                armed_head = activity.head_started_ms.load(Relaxed);
                armed_end = activity.last_end_ms.load(Relaxed);
                timer.as_mut().reset(at);
                seen = None;
            }
        }
    })
    .await;
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// What every request of one connection shares.
struct ConnCtx {
    app: Arc<App>,
    activity: Activity,
}

#[derive(Clone, Copy)]
struct Limits {
    header: Duration,
    idle: Duration,
}

impl Limits {
    /// When (ms after the accept) the limit that applies runs out: the
    /// header limit while a head is arriving (`head`, one more than its
    /// first byte's time, not 0), else the idle limit after the last
    /// request ended at `end`.
    fn due_ms(self, head: u64, end: u64) -> u64 {
        if head != 0 {
            head - 1 + self.header.as_millis() as u64
        } else {
            end + self.idle.as_millis() as u64
        }
    }
}

/// What the connection's timer found.
enum Quiet {
    /// A head took longer than `header_read_timeout`: close now.
    HeadTooSlow,
    /// Kept alive and idle for `idle_timeout`: close gracefully.
    Idle,
    /// Nothing due yet: look again then.
    Until(tokio::time::Instant),
}

/// A connection's request activity, in milliseconds since it was accepted.
struct Activity {
    started: Instant,
    in_flight: AtomicU64,
    /// When the last request's handler answered (0: none yet).
    last_end_ms: AtomicU64,
    /// One more than when the first byte of a head not yet parsed was read;
    /// 0 while no head is arriving. A new connection waits for its first head
    /// from the accept.
    head_started_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            in_flight: AtomicU64::new(0),
            last_end_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(1),
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The moment `ms` after the accept.
    fn instant(&self, ms: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.started + Duration::from_millis(ms))
    }

    /// A head was parsed: the request is in flight, no head is arriving.
    fn begin(&self) {
        self.in_flight.fetch_add(1, Relaxed);
        self.head_started_ms.store(0, Relaxed);
    }

    fn end(&self) {
        self.last_end_ms.store(self.now_ms(), Relaxed);
        self.head_started_ms.store(0, Relaxed);
        self.in_flight.fetch_sub(1, Relaxed);
    }

    /// Bytes were read: if no head was arriving, one starts now. (Bytes of a
    /// request body read while it is in flight are cleared by its `end`.)
    fn read_some(&self) {
        if self.head_started_ms.load(Relaxed) == 0 {
            self.head_started_ms.store(self.now_ms() + 1, Relaxed);
        }
    }

    fn check(&self, limits: Limits) -> Quiet {
        let now = self.now_ms();
        if self.in_flight.load(Relaxed) > 0 {
            // Not timed while in flight; look again a limit from now.
            let next = limits.header.min(limits.idle).as_millis() as u64;
            return Quiet::Until(self.instant(now + next));
        }
        let head = self.head_started_ms.load(Relaxed);
        let due = limits.due_ms(head, self.last_end_ms.load(Relaxed));
        match (now >= due, head != 0) {
            (true, true) => Quiet::HeadTooSlow,
            (true, false) => Quiet::Idle,
            (false, _) => Quiet::Until(self.instant(due)),
        }
    }
}

/// The connection's byte stream, noting when a head starts arriving.
struct HeadClock<IO> {
    inner: IO,
    ctx: Arc<ConnCtx>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for HeadClock<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.ctx.activity.read_some();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for HeadClock<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Answer an over-limit connection with 503 and close it. The request is read
/// first (briefly) so closing does not reset the connection before the client
/// sees the answer.
async fn reject<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO) {
    let _ = tokio::time::timeout(REJECT_BUDGET, async {
        let mut buf = [0u8; 2048];
        let _ = tokio::time::timeout(REJECT_BUDGET / 4, io.read(&mut buf)).await;
        io.write_all(OVER_LIMIT_RESPONSE).await?;
        io.shutdown().await?;
        // Let the client read the answer before we close; stop at EOF.
        while io.read(&mut buf).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn over_limit_response_declares_its_true_length() {
        let text = std::str::from_utf8(OVER_LIMIT_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let declared: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(declared, body.len());
        let parsed: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(parsed["error"]["code"], "too_many_connections");
    }
}
