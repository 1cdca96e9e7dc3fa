//! The typed values a loaded configuration holds, and nothing that loads
//! them: `Config` and its parts, the runtime and sync choices. Below both
//! the list of settings (`settings`, which writes into them) and the loader
//! (`config`), so neither imports the other for these.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The history limit's name before every variable took the `AGENTD_` prefix.
/// Still read, so existing deployments keep their limit; `AGENTD_HISTORY_LIMIT`
/// wins when both are set.
pub const HISTORY_LIMIT_ALIAS: &str = "AGENT_HISTORY_LIMIT";

/// Which agent backend runs prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    Echo,
    Command,
    ClaudeCode,
    Gemini,
    Codex,
    Acp,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Echo => "echo",
            RuntimeKind::Command => "command",
            RuntimeKind::ClaudeCode => "claude-code",
            RuntimeKind::Gemini => "gemini",
            RuntimeKind::Codex => "codex",
            RuntimeKind::Acp => "acp",
        }
    }
}

/// Codex's sandbox for the commands the model runs (`codex exec -s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodexSandbox {
    ReadOnly,
    WorkspaceWrite,
    DangerFullAccess,
}

impl CodexSandbox {
    pub fn as_str(self) -> &'static str {
        match self {
            CodexSandbox::ReadOnly => "read-only",
            CodexSandbox::WorkspaceWrite => "workspace-write",
            CodexSandbox::DangerFullAccess => "danger-full-access",
        }
    }
}

/// How durable an answered write is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Every answered write was fsynced first: an acknowledged message
    /// survives power loss. SQLite commits at `NORMAL` and the store's sync
    /// thread fsyncs the WAL, one fsync for every batch committed meanwhile
    /// (`store_sync`).
    Full,
    /// fsync at WAL checkpoints only: survives a crash or kill of agentd, not a
    /// power loss.
    Normal,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Requests waiting for the store thread. Bounded so a hung database turns
    /// into fast 503s instead of unbounded memory.
    pub queue: usize,
    /// Most appends folded into one transaction (group commit).
    pub max_batch: usize,
    /// Messages kept in `state.db`; older ones are deleted. 0 keeps everything.
    pub retention_messages: u64,
    pub synchronous: SyncMode,
    /// How long a request waits for room in the store queue before a 503.
    pub enqueue_timeout: Duration,
    /// How often the store runs `PRAGMA quick_check` (bounded by
    /// `store::QUICK_CHECK_BUDGET` each time) to find damage inside
    /// `state.db` that its header does not show. Zero turns it off.
    pub quick_check_interval: Duration,
    /// How old the `store` check's last proof of writing may be before a
    /// tick makes a new one (`store::Worker::heartbeat`): ticks closer
    /// together than this reuse it. Zero proves on every tick.
    pub proof_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub kind: RuntimeKind,
    /// argv for the `command` runtime (shell-style words, no shell).
    pub command: Vec<String>,
    pub claude_bin: String,
    pub claude_args: Vec<String>,
    pub gemini_bin: String,
    pub gemini_args: Vec<String>,
    pub codex_bin: String,
    pub codex_args: Vec<String>,
    /// Codex's `--sandbox` mode (`AGENTD_CODEX_SANDBOX`).
    pub codex_sandbox: CodexSandbox,
    /// Codex's home (`CODEX_HOME`: its config, credentials and sessions). When
    /// the operator sets none, `<state_dir>/codex`, so Codex's sessions live
    /// with agentd's state; created 0700 at start.
    pub codex_home: PathBuf,
    /// True when `codex_home` is agentd's default rather than the operator's
    /// `CODEX_HOME`: children then get `CODEX_HOME` set to it.
    pub codex_home_default: bool,
    /// The ACP agent's argv (`AGENTD_ACP_CMD`, e.g. `gemini --acp`).
    pub acp_command: Vec<String>,
    /// Most warm ACP agent processes (`AGENTD_ACP_MAX_AGENTS`).
    pub acp_max_agents: usize,
    /// Idle ACP agents are closed after this long (`AGENTD_ACP_IDLE`).
    pub acp_idle: Duration,
    /// How ACP permission requests are answered (`AGENTD_ACP_PERMISSIONS`).
    pub acp_permissions: PermissionPolicy,
    /// An `ask` permission request nobody answered is refused after this
    /// long (`AGENTD_ACP_PERMISSION_TIMEOUT`).
    pub acp_permission_timeout: Duration,
    /// Prepended to the prompt by runtimes that have no flag for it (gemini).
    pub system_prompt: Option<String>,
    /// Timeout of an execution whose request names none.
    pub default_timeout: Duration,
    /// Largest timeout a request may ask for.
    pub max_timeout: Duration,
    /// Bytes of stdout kept per execution; the rest is dropped and reported.
    pub stdout_cap: usize,
    /// Bytes of stderr kept (the tail) per execution.
    pub stderr_cap: usize,
    /// Wait after SIGINT before SIGTERM, and after SIGTERM before SIGKILL.
    pub kill_grace: Duration,
    /// After the main child exits, how long its pipes may still be drained (a
    /// grandchild holding them open must not keep the execution alive).
    pub pipe_drain: Duration,
    /// Working directory of every agent child: a directory agentd owns, so the
    /// CLIs find their sessions (kept per directory) again after a restart and
    /// Gemini CLI can be told to trust it. Created 0700 at start if missing.
    pub workdir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Executions running at once.
    pub max_concurrent: usize,
    /// Executions waiting for a slot; beyond this a request gets 429.
    pub max_queue: usize,
    /// Finished executions remembered for `GET /api/executions/{id}`.
    pub finished_retained: usize,
    /// SSE subscribers per execution.
    pub max_subscribers: usize,
    /// Output chunks kept per execution in its SSE replay buffer (with
    /// `stream_replay_bytes`, whichever bound is hit first; the oldest go).
    /// 4096 covers a 1 MiB replay of typical stream-json lines.
    pub stream_buffer: usize,
    /// Bytes of output kept per execution for SSE replay, so a subscriber
    /// that arrives late or reconnects (`Last-Event-ID`) gets the output from
    /// the start; past it the oldest chunks go and a subscriber that wanted
    /// them gets `event: dropped`. Default 1 MiB (one typical agent turn).
    pub stream_replay_bytes: usize,
    /// All executions' replay buffers together (`stream_replay_total`);
    /// finished executions give theirs back first.
    pub stream_replay_total: usize,
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// Tick interval when systemd's watchdog is off.
    pub interval: Duration,
    /// Touched after every passing tick (launchd keepalive companion).
    pub keepalive_file: Option<PathBuf>,
    /// After this many consecutive failed ticks send `WATCHDOG=trigger`.
    pub trigger_after: Option<u32>,
    /// In keepalive-file mode, abort after the loop stalled this many intervals.
    /// 0 disables.
    pub self_abort_after: u32,
    /// The `resources` check fails above this many threads.
    pub max_threads: usize,
    /// Diagnostics bundles kept in `<state-dir>/diagnostics`.
    pub diagnostics_keep: usize,
    /// RLIMIT_NOFILE soft target.
    pub nofile_target: u64,
    /// How far back the leak-trend ring reaches (`AGENTD_TREND_WINDOW`,
    /// default 24 h: a slow leak shows over a day, not over minutes).
    pub trend_window: Duration,
    /// Time between trend samples (`AGENTD_TREND_INTERVAL`, default 1 min).
    /// The ring holds window / interval samples, at most
    /// `health::trends::MAX_SAMPLES`.
    pub trend_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The address to bind: `listen` as given, or the address its host name
    /// resolved to at start (see `resolve_listen`).
    pub listen: SocketAddr,
    /// `listen` as given (`localhost:8420`), for messages that should name
    /// what the operator wrote as well as what it resolved to.
    pub listen_text: String,
    pub state_dir: PathBuf,
    pub config_file: Option<PathBuf>,
    /// The bearer token `/api/*` needs: from `AGENTD_API_TOKEN`,
    /// `AGENTD_API_TOKEN_FILE` or the systemd credential `agentd.api-token`
    /// (exactly one of them; see `api_token`). Never passed to a child.
    pub api_token: Option<String>,
    pub history_limit: usize,
    /// Connections served at once; more get a fast 503 and are closed.
    pub max_connections: usize,
    /// Time a client has to send a request's headers (slowloris bound).
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request in flight for this long is
    /// closed, so idle clients cannot hold every connection slot.
    pub idle_timeout: Duration,
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Bytes a request's start line and headers may take; more get 431. Also
    /// caps each connection's read buffer, so header memory is bounded by
    /// `max_connections` × this value.
    pub max_header_bytes: usize,
    /// On shutdown, how long in-flight requests may take to finish.
    pub drain_timeout: Duration,
    pub store: StoreConfig,
    pub runtime: RuntimeConfig,
    pub executor: ExecutorConfig,
    pub health: HealthConfig,
    /// `tracing` filter directive (`AGENTD_LOG`).
    pub log_filter: String,
    /// Enables `/debug/fault/*` when built with the `fault-injection` feature.
    pub fault_injection: bool,
    /// Warnings produced while loading (fallbacks); logged once logging is up.
    pub warnings: Vec<String>,
}

/// What `session/request_permission` is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermissionPolicy {
    /// Pick the agent's reject option (the default).
    Deny,
    /// Pick the agent's allow-once option.
    Allow,
    /// Hold the request on the execution for a client to answer.
    Ask,
}

impl PermissionPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PermissionPolicy::Deny => "deny",
            PermissionPolicy::Allow => "allow",
            PermissionPolicy::Ask => "ask",
        }
    }
}
