//! Permission requests an agent asks a person about (`AGENTD_ACP_PERMISSIONS=ask`):
//! held on the execution while they wait, shown by `GET /api/executions/{id}`,
//! answered by `POST /api/executions/{id}/permissions/{request_id}`.
//!
//! The runtime that received the request waits on the answer with its own
//! deadline (`AGENTD_ACP_PERMISSION_TIMEOUT`); this room only keeps what is
//! pending, bounded, and hands an answer to the waiting runtime. It never
//! decides anything itself.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;

/// Most requests one execution holds pending at once; an agent asking for
/// more before any is answered has the extra ones refused at once.
pub const MAX_PENDING: usize = 16;

/// One pending request as a client sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Pending {
    /// The id to answer it by (unique within the execution).
    pub request_id: String,
    /// What the agent wants to do (the ACP tool call, as the agent sent it).
    pub tool_call: Value,
    /// The answers the agent offered: `option_id`, `name`, `kind`
    /// (`allow_once`, `allow_always`, `reject_once`, `reject_always`).
    pub options: Vec<PermissionChoice>,
    /// When it was asked, Unix milliseconds.
    pub asked_at_ms: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PermissionChoice {
    pub option_id: String,
    pub name: String,
    pub kind: String,
}

/// Why an answer was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("no pending permission request {0} on this execution")]
    NoSuchRequest(String),
    #[error("{option:?} is not one of the options offered: {offered}")]
    NoSuchOption { option: String, offered: String },
}

struct Waiting {
    pending: Pending,
    answer: oneshot::Sender<String>,
}

/// The pending requests of one execution.
#[derive(Default)]
pub struct Permissions {
    waiting: Mutex<VecDeque<Waiting>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Permissions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permissions")
            .field("pending", &self.pending().len())
            .finish()
    }
}

impl Permissions {
    /// Hold a request; `None` when `MAX_PENDING` are already waiting. The
    /// receiver gets the chosen option id; it errs when the request is
    /// withdrawn (`withdraw`) or the execution is gone.
    pub fn ask(
        &self,
        tool_call: Value,
        options: Vec<PermissionChoice>,
        asked_at_ms: u64,
    ) -> Option<(Pending, oneshot::Receiver<String>)> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.retain(|w| !w.answer.is_closed());
        if waiting.len() >= MAX_PENDING {
            return None;
        }
        let n = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let pending = Pending {
            request_id: format!("p{n}"),
            tool_call,
            options,
            asked_at_ms,
        };
        let (tx, rx) = oneshot::channel();
        waiting.push_back(Waiting {
            pending: pending.clone(),
            answer: tx,
        });
        Some((pending, rx))
    }

    /// Answer `request_id` with `option_id`, which must be one it offered.
    pub fn answer(&self, request_id: &str, option_id: &str) -> Result<(), AnswerError> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.retain(|w| !w.answer.is_closed());
        let Some(at) = waiting
            .iter()
            .position(|w| w.pending.request_id == request_id)
        else {
            return Err(AnswerError::NoSuchRequest(request_id.to_owned()));
        };
        let offered = &waiting[at].pending.options;
        if !offered.iter().any(|o| o.option_id == option_id) {
            return Err(AnswerError::NoSuchOption {
                option: option_id.to_owned(),
                offered: offered
                    .iter()
                    .map(|o| o.option_id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let w = waiting.remove(at).expect("found above");
        // The runtime may have given up this very moment; then the answer
        // is late and nothing waits for it.
        let _ = w.answer.send(option_id.to_owned());
        Ok(())
    }

    /// Forget `request_id` (it was answered by a timeout or the turn ended).
    pub fn withdraw(&self, request_id: &str) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.retain(|w| w.pending.request_id != request_id && !w.answer.is_closed());
    }

    /// The requests waiting now, oldest first.
    pub fn pending(&self) -> Vec<Pending> {
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting
            .iter()
            .filter(|w| !w.answer.is_closed())
            .map(|w| w.pending.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choices() -> Vec<PermissionChoice> {
        ["allow", "reject"]
            .map(|id| PermissionChoice {
                option_id: id.into(),
                name: id.into(),
                kind: format!("{id}_once"),
            })
            .to_vec()
    }

    #[tokio::test]
    async fn an_offered_option_reaches_the_waiting_runtime() {
        let p = Permissions::default();
        let (pending, rx) = p
            .ask(serde_json::json!({"title": "ls"}), choices(), 1)
            .unwrap();
        assert_eq!(p.pending().len(), 1);
        let err = p.answer(&pending.request_id, "maybe").unwrap_err();
        assert_eq!(
            err,
            AnswerError::NoSuchOption {
                option: "maybe".into(),
                offered: "allow, reject".into()
            }
        );
        assert!(matches!(
            p.answer("p99", "allow"),
            Err(AnswerError::NoSuchRequest(_))
        ));
        p.answer(&pending.request_id, "reject").unwrap();
        assert_eq!(rx.await.unwrap(), "reject");
        assert!(p.pending().is_empty());
    }

    #[test]
    fn pending_requests_are_bounded_and_a_dropped_waiter_frees_its_place() {
        let p = Permissions::default();
        let mut held = Vec::new();
        for _ in 0..MAX_PENDING {
            held.push(p.ask(Value::Null, choices(), 1).unwrap());
        }
        assert!(p.ask(Value::Null, choices(), 1).is_none());
        let (first, rx) = held.remove(0);
        drop(rx);
        assert!(p.pending().iter().all(|w| w.request_id != first.request_id));
        assert!(p.ask(Value::Null, choices(), 1).is_some());
    }
}
