//! The count of a `session/load` replay: the user messages (the turns the
//! agent holds) and the answers an agent repeats when it loads a session,
//! told apart chunk by chunk.
//!
//! Counting only: the routing that feeds it is `client`'s, and comparing
//! the count with the turns the store recorded is the turn's (`turn`). It
//! imports no other room of `acp/`, and never waits: `see` runs in the
//! SDK's dispatch loop.

use std::sync::Mutex;

use acp::v1::schema::SessionUpdate;
use agent_client_protocol as acp;
use tokio::sync::Notify;

/// One update of a `session/load` replay, as the count sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Replayed {
    /// A chunk of a user message (with the message's id, when the agent
    /// gives one).
    User(Option<String>),
    /// A chunk of the agent's answer text.
    Answer(Option<String>),
    /// The rest of an agent's turn (thoughts, tool calls, plans): it ends a
    /// user message.
    Activity,
    /// Session-level news (commands, modes, usage, ...): no part of the
    /// conversation.
    Other,
}

impl Replayed {
    fn of(update: &SessionUpdate) -> Replayed {
        let id = |c: &acp::v1::schema::ContentChunk| c.message_id.as_ref().map(|m| m.0.to_string());
        match update {
            SessionUpdate::UserMessageChunk(c) => Replayed::User(id(c)),
            SessionUpdate::AgentMessageChunk(c) => Replayed::Answer(id(c)),
            SessionUpdate::AgentThoughtChunk(_)
            | SessionUpdate::ToolCall(_)
            | SessionUpdate::ToolCallUpdate(_)
            | SessionUpdate::Plan(_) => Replayed::Activity,
            _ => Replayed::Other,
        }
    }
}

/// The conversation a `session/load` replayed: its user messages (the
/// turns the agent holds) and answers. Consecutive chunks of one kind are
/// one message, unless their message ids differ.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct ReplayTally {
    pub(super) users: u64,
    answers: u64,
    last: Option<Replayed>,
}

impl ReplayTally {
    fn see(&mut self, update: Replayed) {
        let continues = match (&self.last, &update) {
            (Some(Replayed::User(a)), Replayed::User(b))
            | (Some(Replayed::Answer(a)), Replayed::Answer(b)) => {
                a.is_none() || b.is_none() || a == b
            }
            _ => false,
        };
        match update {
            Replayed::User(_) if !continues => self.users += 1,
            Replayed::Answer(_) if !continues => self.answers += 1,
            Replayed::Other => return,
            _ => {}
        }
        self.last = Some(update);
    }

    /// True when the replay holds at least `turns` turns, each answered:
    /// nothing more of it is expected.
    pub(super) fn covers(&self, turns: u64) -> bool {
        self.users >= turns && self.answers >= turns
    }
}

/// A replay being counted, for the turn that waits for it to complete.
#[derive(Default)]
pub(super) struct ReplayCount {
    tally: Mutex<ReplayTally>,
    /// Woken at every counted update.
    pub(super) changed: Notify,
}

impl ReplayCount {
    /// Runs in the SDK's dispatch loop; never waits.
    pub(super) fn see(&self, update: &SessionUpdate) {
        self.tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .see(Replayed::of(update));
        self.changed.notify_waiters();
    }

    pub(super) fn tally(&self) -> ReplayTally {
        self.tally.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(json: serde_json::Value) -> SessionUpdate {
        serde_json::from_value(json).unwrap()
    }

    fn chunk(kind: &str, text: &str) -> SessionUpdate {
        update(
            serde_json::json!({"sessionUpdate": kind, "content": {"type": "text", "text": text}}),
        )
    }

    fn tally(updates: &[SessionUpdate]) -> ReplayTally {
        let mut t = ReplayTally::default();
        for u in updates {
            t.see(Replayed::of(u));
        }
        t
    }

    #[test]
    fn a_replay_counts_user_messages_and_answers() {
        let t = tally(&[
            chunk("user_message_chunk", "first"),
            chunk("agent_message_chunk", "one"),
            chunk("agent_message_chunk", " more"),
            chunk("user_message_chunk", "second,"),
            chunk("user_message_chunk", " in two chunks"),
            chunk("agent_thought_chunk", "hmm"),
            chunk("agent_message_chunk", "two"),
        ]);
        assert_eq!((t.users, t.answers), (2, 2));
        assert!(t.covers(2));
        assert!(!t.covers(3));
    }

    #[test]
    fn agent_activity_ends_a_user_message_and_session_news_does_not() {
        // Two prompts whose turns were only tool calls: two user messages.
        let call = update(serde_json::json!({
            "sessionUpdate": "tool_call", "toolCallId": "t1", "title": "ls"
        }));
        let t = tally(&[
            chunk("user_message_chunk", "list"),
            call.clone(),
            chunk("user_message_chunk", "again"),
            call,
        ]);
        assert_eq!((t.users, t.answers), (2, 0));
        assert!(!t.covers(2), "unanswered turns may still be on their way");
        // Commands announced in the middle of a message split nothing.
        let news = update(serde_json::json!({
            "sessionUpdate": "available_commands_update", "availableCommands": []
        }));
        let t = tally(&[
            chunk("user_message_chunk", "one message"),
            news,
            chunk("user_message_chunk", " still the same"),
        ]);
        assert_eq!(t.users, 1);
    }

    #[test]
    fn message_ids_tell_messages_apart() {
        let with_id = |kind: &str, id: &str| {
            update(serde_json::json!({
                "sessionUpdate": kind, "messageId": id,
                "content": {"type": "text", "text": "x"}
            }))
        };
        let t = tally(&[
            with_id("user_message_chunk", "m1"),
            with_id("user_message_chunk", "m1"),
            with_id("user_message_chunk", "m2"),
            with_id("agent_message_chunk", "a1"),
            with_id("agent_message_chunk", "a2"),
        ]);
        assert_eq!((t.users, t.answers), (2, 2));
    }
}
