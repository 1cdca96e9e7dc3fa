//! The `Runtime` trait: what every agent backend (echo, any command, Claude Code,
//! Gemini CLI, Codex) implements, and the built-in `echo` runtime.
//!
//! This is the runtime contract, and every runtime builds on it: the trait,
//! the run request (with the CLI session it names) and its outcome, the
//! agent's report, the result line and the warm agents' report. So it imports
//! no runtime (`acp`, `runtimes`, `process`, `streamjson`) nor `sessions`,
//! which import it.
//!
//! A runtime turns one prompt into one `RunOutcome`. It does not classify the
//! outcome into HTTP terms (that is `classify`), does not queue (that is the
//! executor) and does not touch history or the store.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::permissions::Permissions;
use super::replay::{OutputLog, ReplayBudget, DEFAULT_REPLAY_BYTES};
use crate::agent::history::Message;

/// Why an execution exists; runtimes may treat them differently (a chat
/// continues its CLI session, each headless task gets a fresh one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutionKind {
    Chat,
    Task,
}

impl ExecutionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionKind::Chat => "chat",
            ExecutionKind::Task => "task",
        }
    }
}

/// One prompt to run.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub execution_id: String,
    pub session_id: String,
    pub kind: ExecutionKind,
    pub prompt: String,
    /// Wall-clock budget; past it the runtime stops the child and reports `TimedOut`.
    pub timeout: Duration,
    /// The CLI session a chat turn continues, decided from the store (see
    /// `sessions`); `None` for tasks and for runtimes that keep no sessions.
    pub cli_session: Option<CliSession>,
    /// agentd's own transcript of the chat session, read only when a runtime
    /// finds that its agent lost context; `None` for tasks.
    pub transcript: Option<TranscriptSource>,
}

/// Which CLI session a chat turn continues, as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliSession {
    /// The CLI session UUID, hyphenated lower case.
    pub id: String,
    /// True when the store recorded a successful turn in it, so the turn
    /// resumes (`--resume`) instead of creating it (`--session-id`).
    pub exists: bool,
    /// The id the CLI itself gave the session, as recorded with the turn
    /// that ran in it: Codex picks its own thread ids, so a later turn
    /// resumes this one. `None` before the first successful turn.
    pub agent_id: Option<String>,
    /// How many turns the agent's own session holds by agentd's account:
    /// the successful turns recorded in it since the agent last started it
    /// afresh (a lost session restarts the count). `None` when not counted
    /// (before the first turn, or a record older than the count). A runtime
    /// that can see what the agent holds compares the two
    /// ([`memory`](crate::agent::sessions::memory)).
    pub turns: Option<u64>,
}

/// The messages of a chat session as agentd's store holds them, read on
/// demand (the runtime does not touch the store: the handler hands it this).
pub type TranscriptFuture = Pin<Box<dyn Future<Output = Option<Vec<Message>>> + Send>>;

/// Reads a chat session's newest messages, oldest first, whose contents
/// together stay within the byte bound it is given; `None` when the store
/// could not answer.
#[derive(Clone)]
pub struct TranscriptSource(Arc<dyn Fn(usize) -> TranscriptFuture + Send + Sync>);

impl TranscriptSource {
    pub fn new(read: impl Fn(usize) -> TranscriptFuture + Send + Sync + 'static) -> Self {
        TranscriptSource(Arc::new(read))
    }

    /// The session's newest messages within `max_bytes` of content.
    pub async fn read(&self, max_bytes: usize) -> Option<Vec<Message>> {
        (self.0)(max_bytes).await
    }
}

impl std::fmt::Debug for TranscriptSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TranscriptSource")
    }
}

/// Shared between the executor and a running execution.
#[derive(Debug, Clone)]
pub struct ExecutionContext {
    /// Cancelled by `POST /api/executions/{id}/terminate` or shutdown.
    pub cancel: CancellationToken,
    /// The child's pid once spawned (0 = none); read by `/api/executions/running`.
    pub pid: Arc<AtomicU32>,
    /// Output chunks as they are produced, numbered and kept in a bounded
    /// replay buffer, so an SSE subscriber gets the output from its start
    /// however late it subscribes. The writer never waits for a subscriber;
    /// one that falls behind the buffer is told how many chunks it missed.
    pub output: Arc<OutputLog>,
    /// Permission requests of an ACP agent waiting for a person
    /// (`AGENTD_ACP_PERMISSIONS=ask`); empty for every other runtime.
    pub permissions: Arc<Permissions>,
}

impl ExecutionContext {
    /// A context keeping at most `max_chunks` output chunks and
    /// `DEFAULT_REPLAY_BYTES` for replay.
    pub fn new(max_chunks: usize) -> Self {
        Self::with_replay(max_chunks, DEFAULT_REPLAY_BYTES)
    }

    /// A context whose replay buffer keeps at most `max_chunks` chunks and
    /// `max_bytes` bytes (the newest chunk always).
    pub fn with_replay(max_chunks: usize, max_bytes: usize) -> Self {
        Self::with_output(OutputLog::new(max_chunks, max_bytes))
    }

    /// Like `with_replay`, the bytes also counting against `budget`, the
    /// bound of all executions' replay buffers together.
    pub fn with_budget(max_chunks: usize, max_bytes: usize, budget: Arc<ReplayBudget>) -> Self {
        Self::with_output(OutputLog::with_budget(max_chunks, max_bytes, budget))
    }

    fn with_output(output: OutputLog) -> Self {
        ExecutionContext {
            cancel: CancellationToken::new(),
            pid: Arc::new(AtomicU32::new(0)),
            output: Arc::new(output),
            permissions: Arc::default(),
        }
    }
}

/// How the execution ended, before classification.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    /// Finished in-process (echo), no child.
    Completed,
    /// The child exited by itself with this code.
    Exited { code: i32 },
    /// The child was killed by a signal nobody in agentd sent.
    Signaled { signal: i32 },
    /// agentd stopped it because the timeout passed.
    TimedOut,
    /// agentd stopped it because it was cancelled.
    Cancelled,
    /// The child could not be started (binary missing, not executable, ...).
    SpawnFailed { command: String, reason: String },
}

/// The final `{"type":"result"}` line of a stream-json runtime.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResultLine {
    /// The answer (`result` / `response`); empty when the CLI sent none.
    pub text: String,
    pub cost_usd: Option<f64>,
    pub duration_ms: Option<u64>,
    pub is_error: bool,
    /// Claude's `subtype` (`success`, `error_max_turns`,
    /// `error_during_execution`, ...).
    pub subtype: Option<String>,
    /// The agent's own words about an error (Claude `errors[]` or the result
    /// text of an error result, Gemini `error.message`), bounded to
    /// `streamjson::MAX_ERROR_MESSAGE` characters. `None` for a success.
    pub error_message: Option<String>,
    /// Tokens the model read and wrote in the turn, when the CLI reports
    /// them (Codex `turn.completed.usage`, Claude `usage`).
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// The model API's HTTP status behind an error (Claude `api_error_status`,
    /// or a status a Gemini error names).
    pub api_error_status: Option<u16>,
    /// The error's kind as the CLI names it (Claude `api_error_type`, e.g.
    /// `rate_limit_error`; Gemini `error.type`).
    pub error_type: Option<String>,
}

/// What the agent said about itself while running: its own session id (from
/// the init and result lines) and the model it used, returned to clients as
/// `metadata.agent_session_id` / `metadata.model`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentReport {
    pub session_id: Option<String>,
    pub model: Option<String>,
    /// The CLI refused both to create (`--session-id`) and to resume
    /// (`--resume`) the CLI session the store named: its copy is unusable
    /// (Gemini CLI keeps the session of a failed first turn but cannot resume
    /// it). The chat handler then moves the agentd session to a new CLI
    /// session instead of failing every later turn.
    pub session_refused: bool,
    /// The CLI had lost the session the store named (its files are gone)
    /// and the turn ran in a fresh one: the earlier context is not in this
    /// answer. Reported as `metadata.session_restarted`.
    pub session_restarted: bool,
    /// The turns the agent's session holds after this turn, as the runtime
    /// counted them (recorded with the turn; see `CliSession::turns`).
    /// `None` when it could not count.
    pub session_turns: Option<u64>,
    /// The agent had lost context and agentd gave it its own transcript of
    /// the session with the prompt (`metadata.session_restored:
    /// "transcript"`).
    pub session_restored: bool,
}

/// Everything a runtime learned about one execution.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub end: RunEnd,
    /// Assistant text (stream-json) or plain stdout.
    pub text: String,
    pub result: Option<ResultLine>,
    /// The last bytes of stderr (capped).
    pub stderr_tail: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Session id and model, when the agent reported them.
    pub agent: AgentReport,
    /// What agentd had to do to end the execution's processes.
    pub cleanup: Cleanup,
}

/// What ending an execution took: the signal that stopped its agent, and the
/// processes it left behind that agentd killed and reaped. All zero for an
/// agent that exited by itself and left nothing; the execution's JSON carries
/// it (`cleanup`) only when something was done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// The last signal agentd sent the agent's group before the agent exited
    /// (SIGINT, SIGTERM or SIGKILL), when a timeout or a cancel stopped it.
    pub stopped_with: Option<i32>,
    /// Processes of the agent's group still there after the agent exited,
    /// SIGKILLed and reaped (none is left as a zombie).
    pub group_killed: u32,
    /// Processes outside the group that still carried the execution's
    /// `AGENTD_EXECUTION_ID` (`setsid` or double-forked escapees), SIGKILLed
    /// and reaped.
    pub escapees_killed: u32,
    /// Processes still not dead when the sweep's bound ran out (stuck in
    /// uninterruptible sleep); the orphan reaper collects them later.
    pub survivors: u32,
}

impl Cleanup {
    /// True when agentd had to stop or kill anything.
    pub fn acted(&self) -> bool {
        *self != Cleanup::default()
    }
}

impl RunOutcome {
    /// An outcome with no output: only how it ended.
    pub fn ended(end: RunEnd) -> Self {
        RunOutcome {
            end,
            ..RunOutcome::completed(String::new())
        }
    }

    pub fn completed(text: String) -> Self {
        RunOutcome {
            end: RunEnd::Completed,
            text,
            result: None,
            stderr_tail: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            agent: AgentReport::default(),
            cleanup: Cleanup::default(),
        }
    }
}

/// The pool as `/health`, `/metrics` and `/status` show it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct AgentsReport {
    /// Agent processes alive now (busy + idle).
    pub running: u64,
    /// Of them, running a turn now.
    pub busy: u64,
    pub idle: u64,
    /// `AGENTD_ACP_MAX_AGENTS`.
    pub limit: u64,
    /// Processes started since agentd started.
    pub started: u64,
    /// Processes that died or were killed for not answering (each is
    /// replaced at the next turn that needs it).
    pub restarts: u64,
    /// Idle processes closed (idle timeout or to make room), not failures.
    pub closed: u64,
    /// Why the last restart happened, and when (Unix seconds).
    pub last_restart_reason: Option<String>,
    pub last_restart_at: Option<u64>,
    /// Set while starts keep failing (the pool backs off): the reason.
    pub degraded: Option<String>,
}

pub type RunFuture<'a> = Pin<Box<dyn Future<Output = RunOutcome> + Send + 'a>>;

/// An agent backend.
pub trait Runtime: Send + Sync + 'static {
    /// The name users configure (`echo`, `command`, `claude-code`, `gemini`,
    /// `codex`).
    fn name(&self) -> &'static str;
    /// True for runtimes whose CLI keeps sessions of its own (`claude-code`,
    /// `gemini`, `codex`): chats then carry a `CliSession` and the store records which
    /// CLI sessions exist.
    fn keeps_sessions(&self) -> bool {
        false
    }
    /// Run one prompt to completion, timeout or cancellation. Must never hang past
    /// `req.timeout` plus the configured kill grace periods.
    fn run<'a>(&'a self, req: RunRequest, ctx: &'a ExecutionContext) -> RunFuture<'a>;
    /// The warm agent processes, for runtimes that keep any (`acp`).
    fn agents(&self) -> Option<AgentsReport> {
        None
    }
    /// The chat history of `session_id` (`None`: of every session) was
    /// deleted: forget whatever the runtime keeps of it in memory.
    fn session_cleared(&self, _session_id: Option<&str>) {}
}

/// The default runtime: answers with the prompt itself, no subprocess, so a fresh
/// install works with no agent CLI present.
#[derive(Debug, Default)]
pub struct Echo;

impl Runtime for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn run<'a>(&'a self, req: RunRequest, ctx: &'a ExecutionContext) -> RunFuture<'a> {
        Box::pin(async move {
            ctx.output.push(req.prompt.as_str());
            RunOutcome::completed(req.prompt)
        })
    }
}
