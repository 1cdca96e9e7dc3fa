//! The `/health` benchmark's like-for-like baseline: a bare hyper server that
//! answers every request with the bytes of one real `/health` body.
//!
//! At start it fetches `GET <url>` once (agentd's `/health`), keeps the body
//! and its `Content-Type`, and then serves exactly those bytes on every path,
//! with the same accept loop, runtime and socket options as `bare_hello`. So
//! the two servers write the same response to the socket, and the ratio of
//! agentd's `/health` to this one isolates what agentd does per request
//! (its accept-loop bookkeeping, router and the live gauges) from the cost
//! of sending a 1.6 kB body.
//!
//! Usage: `same_bytes URL [ADDR]` (URL `http://HOST:PORT/PATH`; ADDR default
//! `127.0.0.1:0`). The first line on stdout is the bound address, the second
//! the body length, so a script can start it on port 0.

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use bytes::Bytes;
use http::{header, HeaderValue};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// One `GET` with `Connection: close`: the body and its content type.
fn fetch(url: &str) -> std::io::Result<(Bytes, HeaderValue)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| invalid(format!("{url}: only http:// URLs")))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut stream = TcpStream::connect(host)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid(format!("{url}: no end of headers")))?;
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let body = &answer[split + 4..];
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        return Err(invalid(format!("{url}: {status}")));
    }
    let mut content_type = HeaderValue::from_static("application/json");
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-type") {
            content_type = HeaderValue::from_str(value).map_err(|e| invalid(e.to_string()))?;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid(format!("{url}: chunked answers are not supported")));
        }
    }
    let body = match length {
        Some(n) if n <= body.len() => &body[..n],
        Some(n) => return Err(invalid(format!("{url}: {} of {n} body bytes", body.len()))),
        None => body,
    };
    Ok((Bytes::copy_from_slice(body), content_type))
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "usage: same_bytes URL [ADDR]",
        )
    })?;
    let addr: SocketAddr = match args.next() {
        Some(a) => a.parse().map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{a}: {e}"))
        })?,
        None => SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let (body, content_type) = fetch(&url)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(addr, body, content_type))
}

async fn serve(addr: SocketAddr, body: Bytes, content_type: HeaderValue) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", listener.local_addr()?)?;
        writeln!(out, "{}", body.len())?;
        out.flush()?;
    }
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // EMFILE and friends: keep serving the connections we have.
            Err(_) => continue,
        };
        // Same socket option agentd sets, so the comparison is like for like.
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let content_type = content_type.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                let mut resp = Response::new(Full::new(body.clone()));
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, content_type.clone());
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
