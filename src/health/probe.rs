//! The `self_probe` check: a real HTTP request to the server's own listener.
//!
//! Each run opens a new connection (TCP or Unix socket), so it goes through
//! the kernel's accept queue, the accept loop and a handler, exactly the path
//! that broke when a server kept its port in LISTEN while answering nothing.
//! It passes only on status 200.
//!
//! `self_probe_check` connects to a listener address (TCP or Unix). agentd's
//! own tick uses `self_probe_via_door`: the same request over a connection
//! handed straight to the accept loop (`server::ProbeDoor`), so a flood that
//! fills every client slot and the listen backlog cannot fail it, while a
//! stalled accept loop still does.
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
use tokio::net::{TcpStream, UnixStream};

use super::checks::Check;
use crate::server::ProbeDoor;

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
    Check::new("self_probe", move || {
        let target = target.clone();
        async move {
            let status = match &target {
                ProbeTarget::Tcp(addr) => {
                    let stream = TcpStream::connect(addr)
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

/// The `self_probe` check over the accept loop's probe door: a new
/// connection each run, served by the accept loop, hyper and the handler;
/// passes on 200. A door that is not taken (the loop stalled) ends at the
/// runner's deadline.
pub fn self_probe_via_door(door: Arc<ProbeDoor>, path_and_query: &'static str) -> Check {
    Check::new("self_probe", move || {
        let door = door.clone();
        async move {
            let stream = door.connect().await.map_err(|e| e.to_string())?;
            let status = request(stream, "localhost", path_and_query).await?;
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
