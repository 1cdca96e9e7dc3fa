//! agentd sessions and the agent CLIs' own sessions: how a session name maps to
//! the CLI session UUID a chat turn continues, and how a disagreement between
//! the store and the CLI is recognised and repaired.
//!
//! The rules:
//! * A session id that is a UUID in any spelling (hyphenated, 32 hex digits,
//!   `urn:uuid:…`, `{…}`, any case) *is* that UUID: it is normalised to the
//!   hyphenated lower-case form before anything else sees it, so every spelling
//!   names the same agentd session (history, order, store rows).
//! * Generation 0 of a session maps to a fixed CLI session: the UUID itself for
//!   a UUID-shaped name (so a CLI session started elsewhere can be continued,
//!   and `metadata.agent_session_id` equals the `session_id`), otherwise
//!   UUID v5 of the name in [`NAMESPACE`].
//! * Deleting a session's history moves it to the next generation, which maps
//!   to UUID v5 of `"<name>#<generation>"` (`#` cannot occur in a session id,
//!   so no other name collides). The deleted CLI session is never named again,
//!   so deleted context cannot come back.
//! * Whether a CLI session exists is recorded in the store with the turn that
//!   created it; the store's answer, not the in-memory history, decides between
//!   `--session-id` (new) and `--resume`. When the CLI disagrees (the session
//!   is "already in use" / "already exists", or "No conversation found"), the
//!   runtime retries once with the other flag ([`recovery`]).
//!
//! Not here: the SQL (`store`), argv (`runtimes`), the HTTP checks (`server::api`).

use uuid::Uuid;

pub use crate::agent::runtime::CliSession;
use crate::agent::runtime::{RunEnd, RunOutcome};

/// agentd's UUID v5 namespace for session names. Fixed forever: changing it
/// would map every existing session to a new CLI session and lose its context.
pub const NAMESPACE: Uuid = Uuid::from_u128(0x5d1f_6c2e_8a4b_4c7e_9f30_a1b2_c3d4_e5f6);

/// Longest accepted session id (the braced UUID spelling, 38 characters, fits).
pub const MAX_SESSION_ID_LEN: usize = 128;

/// The canonical agentd session id for what a client sent, or `None` when it
/// is not a valid session id (1–128 characters from `A-Z a-z 0-9 - _ . :`, or
/// a UUID in any spelling).
pub fn normalise_session_id(raw: &str) -> Option<String> {
    if raw.is_empty() || raw.len() > MAX_SESSION_ID_LEN {
        return None;
    }
    if let Some(uuid) = parse_uuid(raw) {
        return Some(uuid.hyphenated().to_string());
    }
    raw.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        .then(|| raw.to_owned())
}

/// A UUID in any of the spellings the `uuid` crate reads (hyphenated, simple,
/// `urn:uuid:`, braced; any case).
fn parse_uuid(s: &str) -> Option<Uuid> {
    Uuid::try_parse(s).ok()
}

/// The CLI session UUID (hyphenated, lower case: the only form the CLIs
/// accept) of generation `generation` of the canonical session `session_id`.
pub fn cli_session_id(session_id: &str, generation: u64) -> String {
    let uuid = match (generation, parse_uuid(session_id)) {
        (0, Some(uuid)) => uuid,
        (0, None) => Uuid::new_v5(&NAMESPACE, session_id.as_bytes()),
        (g, _) => Uuid::new_v5(&NAMESPACE, format!("{session_id}#{g}").as_bytes()),
    };
    uuid.hyphenated().to_string()
}

/// What an agent's own session holds, against agentd's count of the turns
/// that ran in it (`CliSession::turns`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// agentd has no count to compare with.
    Uncounted,
    /// The agent holds at least every turn agentd recorded (it may hold
    /// more: a turn that failed after the agent kept the prompt).
    Whole,
    /// The agent holds fewer turns than agentd recorded: it lost context
    /// (a process killed before it wrote its last turns to disk).
    Short { recorded: u64, held: u64 },
}

/// Compare the turns the agent showed it holds with those agentd recorded.
pub fn memory(recorded: Option<u64>, held: u64) -> Memory {
    match recorded {
        None => Memory::Uncounted,
        Some(recorded) if held < recorded => Memory::Short { recorded, held },
        Some(_) => Memory::Whole,
    }
}

/// How a turn names its CLI session on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionFlag {
    /// `--session-id <uuid>`: create the session under this id.
    Create,
    /// `--resume <uuid>`: continue it.
    Resume,
}

impl SessionFlag {
    pub fn for_session(session: &CliSession) -> SessionFlag {
        if session.exists {
            SessionFlag::Resume
        } else {
            SessionFlag::Create
        }
    }

    pub fn as_arg(self) -> &'static str {
        match self {
            SessionFlag::Create => "--session-id",
            SessionFlag::Resume => "--resume",
        }
    }
}

/// What the CLIs print when the session they were told to create exists:
/// Claude Code "Session ID … is already in use.", Gemini CLI (exit 42)
/// "Session ID "…" already exists.".
const EXISTS_SIGNS: &[&str] = &["is already in use", "already exists"];

/// What they print when the session they were told to resume does not:
/// Claude Code "No conversation found with session ID: …", Gemini CLI
/// (exit 42) "Error resuming session: Invalid session identifier "…"", and,
/// when the project's session files are gone, "Error resuming session: No
/// previous sessions found for this project.".
const MISSING_SIGNS: &[&str] = &[
    "no conversation found",
    "invalid session identifier",
    "no previous sessions found",
];

/// The flag to retry with when `outcome` shows the CLI disagreed with the
/// store about the session `flag` assumed, or `None` when the turn should
/// stand as it is. Only a child that exited non-zero by itself qualifies: a
/// timeout, a cancel or a successful turn is never retried.
pub fn recovery(flag: SessionFlag, outcome: &RunOutcome) -> Option<SessionFlag> {
    if !matches!(outcome.end, RunEnd::Exited { code } if code != 0) {
        return None;
    }
    let mut said = outcome.stderr_tail.to_ascii_lowercase();
    if let Some(result) = &outcome.result {
        if let Some(message) = &result.error_message {
            said.push('\n');
            said.push_str(&message.to_ascii_lowercase());
        }
    }
    let (signs, retry) = match flag {
        SessionFlag::Create => (EXISTS_SIGNS, SessionFlag::Resume),
        SessionFlag::Resume => (MISSING_SIGNS, SessionFlag::Create),
    };
    signs.iter().any(|s| said.contains(s)).then_some(retry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::runtime::ResultLine;

    const U: &str = "0506414a-ca91-44ab-9432-4dbe4876e5ac";

    #[test]
    fn every_uuid_spelling_normalises_to_hyphenated_lower_case() {
        for spelling in [
            U.to_owned(),
            U.to_uppercase(),
            U.replace('-', ""),
            U.replace('-', "").to_uppercase(),
            format!("urn:uuid:{U}"),
            format!("{{{U}}}"),
            format!("{{{}}}", U.to_uppercase()),
        ] {
            assert_eq!(
                normalise_session_id(&spelling).as_deref(),
                Some(U),
                "{spelling}"
            );
        }
    }

    #[test]
    fn names_are_kept_and_invalid_ids_refused() {
        assert_eq!(normalise_session_id("demo").as_deref(), Some("demo"));
        assert_eq!(
            normalise_session_id("a1b2-c3_d.e:f").as_deref(),
            Some("a1b2-c3_d.e:f")
        );
        // Case matters for names: only UUIDs are case-insensitive.
        assert_eq!(normalise_session_id("Demo").as_deref(), Some("Demo"));
        for bad in ["", "has space", "../etc", "{demo}", "a#1"] {
            assert_eq!(normalise_session_id(bad), None, "{bad:?}");
        }
        assert_eq!(normalise_session_id(&"x".repeat(129)), None);
        assert!(normalise_session_id(&"x".repeat(128)).is_some());
    }

    #[test]
    fn a_name_maps_to_a_stable_v5_uuid() {
        let id = cli_session_id("demo", 0);
        assert_eq!(id, cli_session_id("demo", 0));
        let parsed = Uuid::parse_str(&id).unwrap();
        assert_eq!(parsed.get_version_num(), 5);
        assert_eq!(id, parsed.hyphenated().to_string(), "hyphenated lower case");
        assert_eq!(
            parsed,
            Uuid::new_v5(&NAMESPACE, b"demo"),
            "generation 0 is v5 of the bare name"
        );
        assert_ne!(id, cli_session_id("default", 0));
        // Pinned: a change here would orphan every existing CLI session.
        assert_eq!(cli_session_id("default", 0), DEFAULT_GEN0);
    }

    const DEFAULT_GEN0: &str = "451ff90a-b1c8-5080-b86f-12ab6e6cd756";

    #[test]
    fn a_uuid_maps_to_itself_until_its_history_is_deleted() {
        assert_eq!(cli_session_id(U, 0), U);
        let next = cli_session_id(U, 1);
        assert_ne!(next, U);
        assert_eq!(
            Uuid::parse_str(&next).unwrap(),
            Uuid::new_v5(&NAMESPACE, format!("{U}#1").as_bytes())
        );
    }

    #[test]
    fn every_generation_is_a_new_cli_session() {
        let ids: std::collections::HashSet<_> =
            (0..50).map(|g| cli_session_id("demo", g)).collect();
        assert_eq!(ids.len(), 50);
    }

    #[test]
    fn an_agent_holding_fewer_turns_than_recorded_is_short() {
        assert_eq!(
            memory(Some(3), 2),
            Memory::Short {
                recorded: 3,
                held: 2
            }
        );
        assert_eq!(
            memory(Some(1), 0),
            Memory::Short {
                recorded: 1,
                held: 0
            }
        );
        assert_eq!(memory(Some(3), 3), Memory::Whole);
        // More than recorded: a failed turn the agent kept; nothing lost.
        assert_eq!(memory(Some(3), 5), Memory::Whole);
        assert_eq!(memory(Some(0), 0), Memory::Whole);
        // No count (a record from before counting): no verdict either way.
        assert_eq!(memory(None, 0), Memory::Uncounted);
    }

    fn failed(code: i32, stderr: &str, error_message: Option<&str>) -> RunOutcome {
        RunOutcome {
            end: RunEnd::Exited { code },
            text: String::new(),
            result: error_message.map(|m| ResultLine {
                is_error: true,
                error_message: Some(m.into()),
                ..ResultLine::default()
            }),
            stderr_tail: stderr.into(),
            stdout_truncated: false,
            stderr_truncated: false,
            agent: Default::default(),
            cleanup: Default::default(),
        }
    }

    #[test]
    fn recovery_reads_what_each_cli_says() {
        use SessionFlag::*;
        let claude_in_use = failed(
            1,
            &format!("Error: Session ID {U} is already in use.\n"),
            None,
        );
        assert_eq!(recovery(Create, &claude_in_use), Some(Resume));
        let gemini_exists = failed(
            42,
            &format!("Error starting session: Session ID \"{U}\" already exists. Use --resume to resume it, or provide a different ID.\n"),
            None,
        );
        assert_eq!(recovery(Create, &gemini_exists), Some(Resume));
        let claude_missing = failed(
            1,
            "",
            Some(&format!("No conversation found with session ID: {U}")),
        );
        assert_eq!(recovery(Resume, &claude_missing), Some(Create));
        let gemini_missing = failed(
            42,
            &format!("Error resuming session: Invalid session identifier \"{U}\".\n"),
            None,
        );
        assert_eq!(recovery(Resume, &gemini_missing), Some(Create));
        let gemini_files_gone = failed(
            42,
            "Error resuming session: No previous sessions found for this project.\n",
            None,
        );
        assert_eq!(recovery(Resume, &gemini_files_gone), Some(Create));
    }

    #[test]
    fn recovery_only_answers_the_matching_disagreement() {
        use SessionFlag::*;
        // "already in use" after --resume is not a missing session.
        let in_use = failed(1, "Session ID x is already in use.", None);
        assert_eq!(recovery(Resume, &in_use), None);
        // Any other failure stands.
        assert_eq!(recovery(Create, &failed(1, "API Error: 500", None)), None);
        // A successful or stopped turn is never retried.
        let mut ok = failed(0, "is already in use", None);
        assert_eq!(recovery(Create, &ok), None);
        ok.end = RunEnd::TimedOut;
        assert_eq!(recovery(Create, &ok), None);
    }
}
