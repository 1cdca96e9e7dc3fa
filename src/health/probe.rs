//! The `self_probe` check: a real HTTP request to the server's own listener.
//!
//! Each run opens a new connection (TCP or Unix socket), so it goes through
//! the kernel's accept queue, the accept loop and a handler, exactly the path
//! that broke when a server kept its port in LISTEN while answering nothing.
//! It passes only on status 200.
//!
//! Busy is not wedged: before connecting over TCP the probe binds its own
//! source address and registers it with the accept loop (`ProbePeers`), which
//! then serves it on a slot reserved for the probe even when clients hold
//! every connection slot. (Over a Unix socket the accept loop recognises the
//! probe by its pid.) A saturated server therefore still passes; a stalled
//! accept loop still fails.
//!
//! Not for: probing other services, or reusing connections (a kept-alive
//! connection would bypass the accept loop, which is the thing under test).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, UnixStream};

use super::checks::Check;
use crate::server::stats::ProbePeers;

/// Where the server's own listener is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeTarget {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A check named `self_probe` that sends `GET <path_and_query>` with
/// `Connection: close` over a new connection to `target` and passes on 200.
///
/// The check has no timeout of its own; the runner's deadline bounds it. All
/// I/O, including the hyper connection task, lives inside the check's future,
/// so when the deadline drops it the socket is closed and nothing is left
/// running (a spawned connection task would outlive a server that never
/// answers, one per tick).
pub fn self_probe_check(target: ProbeTarget, path_and_query: &'static str) -> Check {
    self_probe_check_registered(target, path_and_query, None)
}

/// `self_probe_check` that registers its source address in `peers` before
/// connecting, so the accept loop serves it on a reserved slot.
pub fn self_probe_check_registered(
    target: ProbeTarget,
    path_and_query: &'static str,
    peers: Option<Arc<ProbePeers>>,
) -> Check {
    Check::new("self_probe", move || {
        let target = target.clone();
        let peers = peers.clone();
        async move {
            let status = match &target {
                ProbeTarget::Tcp(addr) => {
                    let socket = if addr.is_ipv4() {
                        TcpSocket::new_v4()
                    } else {
                        TcpSocket::new_v6()
                    }
                    .map_err(|e| format!("socket: {e}"))?;
                    socket
                        .bind(SocketAddr::new(addr.ip(), 0))
                        .map_err(|e| format!("bind {}: {e}", addr.ip()))?;
                    let local = socket
                        .local_addr()
                        .map_err(|e| format!("local address: {e}"))?;
                    // Held until the answer is in: the accept loop looks the
                    // address up when it accepts this connection.
                    let _registered = peers.as_ref().and_then(|p| p.register(local));
                    let stream = socket
                        .connect(*addr)
                        .await
                        .map_err(|e| format!("connect {addr}: {e}"))?;
                    // Small request, answer awaited: don't let Nagle delay it.
                    let _ = stream.set_nodelay(true);
                    request(stream, &addr.to_string(), path_and_query).await?
                }
                ProbeTarget::Unix(path) => {
                    let stream = UnixStream::connect(path)
                        .await
                        .map_err(|e| format!("connect {}: {e}", path.display()))?;
                    request(stream, "localhost", path_and_query).await?
                }
            };
            if status == StatusCode::OK {
                Ok(Some("HTTP 200".into()))
            } else {
                Err(format!("HTTP {}", status.as_u16()))
            }
        }
    })
}

async fn request<S>(stream: S, host: &str, path_and_query: &str) -> Result<StatusCode, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let req = Request::get(path_and_query)
        .header(header::HOST, host)
        .header(header::CONNECTION, "close")
        .header(header::USER_AGENT, "agentd-self-probe")
        .body(Empty::new())
        .map_err(|e| format!("request: {e}"))?;
    let mut response = std::pin::pin!(sender.send_request(req));
    let mut conn = Box::pin(conn);
    // Drive the connection and wait for the response head together.
    let head = tokio::select! {
        biased;
        answer = &mut response => Ok(answer),
        ended = &mut conn => Err(ended),
    };
    let answer = match head {
        Ok(answer) => answer,
        // The connection ended first: closed, failed, or done right after
        // handing over the response. Dropping it resolves the response future
        // at once (with the response if it was delivered, else an error)
        // rather than leaving it to the runner's deadline.
        Err(ended) => {
            drop(conn);
            match (response.await, ended) {
                (Ok(r), _) => Ok(r),
                (Err(_), Err(e)) => return Err(format!("connection: {e}")),
                (Err(e), Ok(())) => Err(e),
            }
        }
    };
    // Only the status matters; dropping the body and the connection closes
    // the socket (we asked for `Connection: close` anyway).
    answer
        .map(|r| r.status())
        .map_err(|e| format!("request: {e}"))
}
