//! JSON bodies for the answers hyper writes by itself.
//!
//! When a request cannot be parsed, hyper answers before any handler runs:
//! 400 (bad start line, header syntax, `Content-Length`, `Transfer-Encoding`),
//! 414 (request target too long) or 431 (headers over
//! `AGENTD_MAX_HEADER_BYTES` or too many fields), each with an empty body, and
//! then closes the connection. hyper 1.x has no hook for that answer, so the
//! connection's byte stream is wrapped here: a response head that hyper wrote
//! for a parse error is replaced by the same status with the
//! `{"error": {"code", "message"}}` body every other error has.
//!
//! How such a head is recognised: it is a whole write that is exactly one
//! response head (`HTTP/1.x 4xx|5xx ...\r\n\r\n`) with `content-length: 0` and
//! no `content-type`. Every response agentd's handlers produce has a
//! `content-type`, so none of theirs matches.
//!
//! Not for: errors a handler produces (`http::ApiError` renders those), or
//! reading requests (reads pass through untouched).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Header fields hyper parses per request (its default); more get 431.
pub const MAX_HEADER_FIELDS: usize = 100;

/// A connection whose parse-error answers get a JSON body.
pub struct JsonParseErrors<IO> {
    inner: IO,
    /// The replacement answer still to be written, and how much of it was.
    pending: Option<(Bytes, usize)>,
    /// For the 431 message.
    max_header_bytes: usize,
}

impl<IO> JsonParseErrors<IO> {
    pub fn new(inner: IO, max_header_bytes: usize) -> Self {
        JsonParseErrors {
            inner,
            pending: None,
            max_header_bytes,
        }
    }
}

/// The status of `buf` when it is a bodiless error head written by hyper.
fn hyper_error_status(buf: &[u8]) -> Option<u16> {
    let rest = buf
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| buf.strip_prefix(b"HTTP/1.0 "))?;
    let code = std::str::from_utf8(rest.get(..3)?)
        .ok()?
        .parse::<u16>()
        .ok()?;
    if !(400..=599).contains(&code) || !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    // Exactly one head, nothing after it.
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    if end + 4 != buf.len() {
        return None;
    }
    let head = buf.to_ascii_lowercase();
    let has = |needle: &[u8]| head.windows(needle.len()).any(|w| w == needle);
    (has(b"\r\ncontent-length: 0\r\n") && !has(b"\r\ncontent-type:")).then_some(code)
}

/// The JSON answer that replaces hyper's empty one.
fn json_answer(code: u16, max_header_bytes: usize) -> Bytes {
    let (reason, error_code, message) = match code {
        400 => (
            "Bad Request",
            "bad_request",
            "malformed HTTP request (start line, header syntax, Content-Length or \
             Transfer-Encoding)"
                .to_owned(),
        ),
        414 => (
            "URI Too Long",
            "uri_too_long",
            "the request target is too long".to_owned(),
        ),
        431 => (
            "Request Header Fields Too Large",
            "headers_too_large",
            format!(
                "request headers exceed {max_header_bytes} bytes (AGENTD_MAX_HEADER_BYTES) \
                 or {MAX_HEADER_FIELDS} fields"
            ),
        ),
        _ => ("Error", "http_error", format!("HTTP error {code}")),
    };
    let body = serde_json::json!({"error": {"code": error_code, "message": message}}).to_string();
    Bytes::from(format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ))
}

impl<IO: AsyncWrite + Unpin> JsonParseErrors<IO> {
    /// Write what is left of a replacement answer.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.pending {
            if *done == bytes.len() {
                self.pending = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
        }
        Poll::Ready(Ok(()))
    }

    /// If `buf` is hyper's error head, take it (all of it) and queue the
    /// JSON answer instead.
    fn take_error_head(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Option<io::Result<usize>> {
        let code = hyper_error_status(buf)?;
        self.pending = Some((json_answer(code, self.max_header_bytes), 0));
        match self.poll_pending(cx) {
            // Not all written yet: flush/shutdown finish it.
            Poll::Pending | Poll::Ready(Ok(())) => Some(Ok(buf.len())),
            Poll::Ready(Err(e)) => Some(Err(e)),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for JsonParseErrors<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        if let Some(r) = this.take_error_head(cx, buf) {
            return Poll::Ready(r);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            if let Some(r) = this.take_error_head(cx, first) {
                return Poll::Ready(r);
            }
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_hyper_bodiless_error_heads() {
        let hyper_431 =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(hyper_error_status(hyper_431), Some(431));
        // Our own errors carry a content type; successes are never touched.
        let ours = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(hyper_error_status(ours), None);
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(hyper_error_status(ok), None);
        // A head followed by body bytes is not a bodiless answer.
        let with_body = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nx";
        assert_eq!(hyper_error_status(with_body), None);
        assert_eq!(hyper_error_status(b"data: HTTP/1.1 400\r\n\r\n"), None);
    }

    #[test]
    fn the_answer_declares_its_true_length_and_the_json_shape() {
        let answer = json_answer(431, 65536);
        let text = std::str::from_utf8(&answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "));
        let declared: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(declared, body.len());
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "headers_too_large");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("AGENTD_MAX_HEADER_BYTES"));
    }
}
