//! The shutdown signal: one token every long-running task watches.
//!
//! Triggered by SIGTERM/SIGINT in `main`, or by tests. Not a flag sprinkled
//! through handlers: the accept loop, the health loop and the executor each
//! await `triggered()` in their own `select!`.

use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Start shutting down. Idempotent.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once shutdown has been triggered.
    pub async fn triggered(&self) {
        self.token.cancelled().await
    }
}
