//! The in-memory conversation history: a FIFO cache of the newest messages,
//! never longer than its limit. The durable history lives in the store; this is
//! what `GET /api/chat/history` reads without touching the database.

use std::collections::VecDeque;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// Seconds since the Unix epoch, with milliseconds.
    pub timestamp: f64,
    pub session_id: String,
}

/// Newest-`limit` messages, oldest first.
#[derive(Debug)]
pub struct History {
    messages: VecDeque<Message>,
    limit: usize,
}

impl History {
    pub fn new(limit: usize) -> Self {
        History {
            messages: VecDeque::with_capacity(limit.min(4096)),
            limit: limit.max(1),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Append, dropping the oldest messages past the limit.
    pub fn push(&mut self, message: Message) {
        while self.messages.len() >= self.limit {
            self.messages.pop_front();
        }
        self.messages.push_back(message);
    }

    /// Change the limit (config reload), trimming the oldest if it shrank.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.max(1);
        while self.messages.len() > self.limit {
            self.messages.pop_front();
        }
    }

    /// The newest `limit` messages of one session (or all), oldest first.
    pub fn recent(&self, session: Option<&str>, limit: usize) -> Vec<Message> {
        let mut out: Vec<Message> = self
            .messages
            .iter()
            .rev()
            .filter(|m| session.is_none_or(|s| m.session_id == s))
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Remove all messages, or one session's. Returns how many were removed.
    pub fn clear(&mut self, session: Option<&str>) -> usize {
        let before = self.messages.len();
        match session {
            None => self.messages.clear(),
            Some(s) => self.messages.retain(|m| m.session_id != s),
        }
        before - self.messages.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: usize, session: &str) -> Message {
        Message {
            role: if i.is_multiple_of(2) {
                Role::User
            } else {
                Role::Assistant
            },
            content: format!("m{i}"),
            timestamp: i as f64,
            session_id: session.into(),
        }
    }

    #[test]
    fn history_keeps_newest_when_over_limit() {
        let mut h = History::new(3);
        for i in 0..7 {
            h.push(msg(i, "s"));
        }
        let contents: Vec<_> = h.recent(None, 100).into_iter().map(|m| m.content).collect();
        assert_eq!(contents, ["m4", "m5", "m6"]);
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn recent_filters_by_session_and_limit() {
        let mut h = History::new(10);
        for i in 0..6 {
            h.push(msg(i, if i % 3 == 0 { "a" } else { "b" }));
        }
        let a: Vec<_> = h
            .recent(Some("a"), 10)
            .into_iter()
            .map(|m| m.content)
            .collect();
        assert_eq!(a, ["m0", "m3"]);
        let b: Vec<_> = h
            .recent(Some("b"), 2)
            .into_iter()
            .map(|m| m.content)
            .collect();
        assert_eq!(b, ["m4", "m5"]);
    }

    #[test]
    fn shrinking_limit_trims_oldest_and_clear_by_session() {
        let mut h = History::new(5);
        for i in 0..5 {
            h.push(msg(i, if i < 2 { "a" } else { "b" }));
        }
        h.set_limit(4);
        assert_eq!(h.recent(None, 10)[0].content, "m1");
        assert_eq!(h.clear(Some("a")), 1);
        assert_eq!(h.len(), 3);
        assert_eq!(h.clear(None), 3);
        assert!(h.is_empty());
    }
}
