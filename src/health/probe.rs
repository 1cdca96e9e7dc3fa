//! The `self_probe` check: a real HTTP request to the server itself.
//!
//! Each run opens a new connection, so it goes through the accept loop, hyper
//! and a handler, exactly the path that broke when a server kept its port in
//! LISTEN while answering nothing. It passes only on status 200.
//!
//! `self_probe_check` connects to a listener address (TCP or Unix). agentd's
//! own tick uses `self_probe_via_door`: the same request over an in-memory
//! connection handed straight to the accept loop (`accept::ProbeDoor`), so a
//! flood that fills every client slot and the listen backlog cannot fail it,
//! while a stalled accept loop still does.
//!
//! Not for: probing other services, or reusing connections (a kept-alive
//! connection would bypass the accept loop, which is the thing under test).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::checks::Check;
use crate::accept::ProbeDoor;

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

/// Most bytes of an answer's head the probe reads: far above the head of
/// `/health?probe=1`, and a bound on what a strange peer can make it read.
const MAX_HEAD: usize = 1024;

/// `GET path_and_query` with `Connection: close` over `stream`; the status
/// of the answer once its whole head has arrived. The request is written by
/// hand and only the head is read: the server side (the accept loop, hyper,
/// the handler) is what the probe proves, and a client connection machinery
/// of its own would only add work to every tick.
async fn request<S>(mut stream: S, host: &str, path_and_query: &str) -> Result<StatusCode, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let head = format!(
        "GET {path_and_query} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\
         user-agent: agentd-self-probe\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| format!("request: {e}"))?;
    let mut buf = [0u8; MAX_HEAD];
    let mut got = 0;
    loop {
        let n = stream
            .read(&mut buf[got..])
            .await
            .map_err(|e| format!("connection: {e}"))?;
        if n == 0 {
            return Err("connection: closed before a complete answer head".into());
        }
        let from = got.saturating_sub(3);
        got += n;
        if buf[from..got].windows(4).any(|w| w == b"\r\n\r\n") {
            return status_of(&buf[..got]);
        }
        if got == buf.len() {
            return Err(format!("response: no end of the head in {MAX_HEAD} bytes"));
        }
    }
}

/// The status code of an HTTP/1.x answer head.
fn status_of(head: &[u8]) -> Result<StatusCode, String> {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    line.strip_prefix(b"HTTP/1.1 ")
        .or_else(|| line.strip_prefix(b"HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| std::str::from_utf8(code).ok()?.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| {
            format!(
                "response: not an HTTP status line: {:?}",
                String::from_utf8_lossy(line)
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_comes_from_the_status_line_only() {
        assert_eq!(
            status_of(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            Ok(StatusCode::OK)
        );
        assert_eq!(
            status_of(b"HTTP/1.0 503 Service Unavailable\r\n\r\n"),
            Ok(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert!(status_of(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(status_of(b"HTTP/1.1 2x0 OK\r\n\r\n").is_err());
    }
}
