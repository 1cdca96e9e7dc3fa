//! The tail of an agent's stderr: its last bytes, read by a task of their
//! own, which name why an agent died or did not start.
//!
//! Bounded (`STDERR_TAIL`), never waited on by the reader of the tail; the
//! end of the pipe is told by `eof`. Imports nothing of `acp/`.

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// Bytes of an agent's stderr kept (its last lines name why it died).
const STDERR_TAIL: usize = 16 << 10;

/// The last `STDERR_TAIL` bytes of an agent's stderr.
#[derive(Default)]
pub(super) struct Tail {
    bytes: std::collections::VecDeque<u8>,
    /// Cancelled when the stderr pipe reached its end.
    pub(super) eof: CancellationToken,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend(chunk);
        let over = self.bytes.len().saturating_sub(STDERR_TAIL);
        self.bytes.drain(..over);
    }

    pub(super) fn text(&self) -> String {
        let (a, b) = self.bytes.as_slices();
        let mut v = a.to_vec();
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }
}

pub(super) async fn read_stderr(mut stderr: tokio::process::ChildStderr, tail: Arc<Mutex<Tail>>) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 8192];
    while let Ok(n) = stderr.read(&mut buf).await {
        if n == 0 {
            break;
        }
        tail.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(&buf[..n]);
    }
    tail.lock().unwrap_or_else(|e| e.into_inner()).eof.cancel();
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_tail_keeps_the_last_bytes() {
        let mut t = Tail::default();
        t.push(&vec![b'a'; STDERR_TAIL]);
        t.push(b"the end");
        let text = t.text();
        assert_eq!(text.len(), STDERR_TAIL);
        assert!(text.ends_with("the end"));
    }
}
