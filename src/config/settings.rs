//! The list of agentd's settings: one entry per setting, with its name (the
//! TOML key), its environment variable, its flag, its default, how its text
//! is parsed and bounded, where the value goes in `Config`, and one line of
//! meaning. Loading, the errors that name a bad value, the defaults and the
//! settings part of `agentd serve --help` are all made from this list, and a
//! test holds it and the README's settings tables together.
//!
//! This file declares; it does not load. Reading the sources, precedence and
//! the rules that weigh several settings together are in `config.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::values::{
    CodexSandbox, Config, PermissionPolicy, RuntimeKind, SyncMode, HISTORY_LIMIT_ALIAS,
};

/// One setting.
pub(super) struct Setting {
    /// The setting's name: its TOML key, and what `--help` calls it.
    pub name: &'static str,
    /// Its environment variable.
    pub env: &'static str,
    /// An older variable still read; `env` wins when both are set.
    pub alias: Option<&'static str>,
    /// Its command-line flag of `agentd serve`, when it has one.
    pub flag: Option<&'static str>,
    /// False for a setting the TOML file cannot give (the file's own path,
    /// another program's variable): such a key in the file is unknown.
    pub toml: bool,
    /// The value when none is given, as text parsed like a given value; ""
    /// is none (the setting is off, or its `parse` derives a value).
    pub default: &'static str,
    /// A variable whose value, when set, is the default instead of
    /// `default` (systemd's `$STATE_DIRECTORY`; the first of its
    /// colon-separated directories).
    pub default_from: Option<&'static str>,
    /// The default as the README and `--help` write it, when not `default`
    /// itself (prose such as "$STATE_DIRECTORY, else ./agentd-state").
    pub shown: Option<&'static str>,
    /// One line of meaning, for `--help`.
    pub meaning: &'static str,
    pub parse: Parse,
}

impl Setting {
    /// The fields most entries leave as they are.
    const BASE: Setting = Setting {
        name: "",
        env: "",
        alias: None,
        flag: None,
        toml: true,
        default: "",
        default_from: None,
        shown: None,
        meaning: "",
        parse: Parse::Rule,
    };

    /// The default as the README writes it.
    pub fn shown(&self) -> &'static str {
        self.shown.unwrap_or(self.default)
    }
}

/// How a setting's text becomes its value, and where the value goes: each
/// `set` writes its field of the `Config` being built. Setters run in the
/// list's order, so one may read a setting listed before it (`workdir` and
/// `codex_home` default to a directory under `state_dir`).
#[derive(Clone, Copy)]
pub(super) enum Parse {
    /// An integer from `min` to `max`.
    Int {
        min: u64,
        max: u64,
        set: fn(&mut Config, u64),
    },
    /// A size in bytes from `min` to `max`: plain bytes or with a
    /// `KiB`/`MiB`/`GiB` (or `K`/`M`/`G`) suffix.
    Size {
        min: u64,
        max: u64,
        set: fn(&mut Config, u64),
    },
    /// A duration from `min` to `max`: plain seconds or with a unit.
    Time {
        min: Duration,
        max: Duration,
        set: fn(&mut Config, Duration),
    },
    /// 1/0, true/false, yes/no, on/off; empty is off.
    Bool(fn(&mut Config, bool)),
    /// Shell-style words, no shell; empty is none.
    Words(fn(&mut Config, Vec<String>)),
    /// Text; empty is the default (`None` when that is empty too).
    Text(fn(&mut Config, Option<String>)),
    /// One of `words`; an alias word stands for the word it names. Empty is
    /// the default. `set` receives one of `words`.
    Choice {
        words: &'static [&'static str],
        aliases: &'static [(&'static str, &'static str)],
        set: fn(&mut Config, &'static str),
    },
    /// An address to bind, `IP:PORT` or `HOST:PORT` resolved once; `set`
    /// receives the address and the text as given.
    Listen(fn(&mut Config, SocketAddr, String)),
    /// A positive integer; anything else is the default, with a warning
    /// (the history limit, as users of other agent servers expect).
    Lenient(fn(&mut Config, u64)),
    /// Text read by a rule that weighs it with other sources (the API
    /// token's); no field of its own.
    Rule,
}

pub(super) const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub(super) const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub(super) const HOUR: u64 = 3600;
pub(super) const DAY: u64 = 86_400;

/// Largest leak-trend ring the settings may ask for (window / interval):
/// 100,000 samples of six gauges is about 6 MB and a `/health/trends`
/// answer of a few MB; beyond that the window should be coarser, not longer.
pub const TREND_MAX_SAMPLES: u64 = 100_000;

fn runtime_kind(word: &str) -> RuntimeKind {
    match word {
        "echo" => RuntimeKind::Echo,
        "command" => RuntimeKind::Command,
        "claude-code" => RuntimeKind::ClaudeCode,
        "gemini" => RuntimeKind::Gemini,
        "codex" => RuntimeKind::Codex,
        "acp" => RuntimeKind::Acp,
        other => unreachable!("{other} is not among the runtime's words"),
    }
}

fn codex_sandbox(word: &str) -> CodexSandbox {
    match word {
        "read-only" => CodexSandbox::ReadOnly,
        "workspace-write" => CodexSandbox::WorkspaceWrite,
        "danger-full-access" => CodexSandbox::DangerFullAccess,
        other => unreachable!("{other} is not among the sandbox's words"),
    }
}

fn permission_policy(word: &str) -> PermissionPolicy {
    match word {
        "deny" => PermissionPolicy::Deny,
        "allow" => PermissionPolicy::Allow,
        "ask" => PermissionPolicy::Ask,
        other => unreachable!("{other} is not among the policy's words"),
    }
}

fn sync_mode(word: &str) -> SyncMode {
    match word {
        "full" => SyncMode::Full,
        "normal" => SyncMode::Normal,
        other => unreachable!("{other} is not among the sync modes"),
    }
}

/// Every setting, in the order `--help` lists them and their setters run.
pub(super) const SETTINGS: &[Setting] = &[
    Setting {
        name: "listen",
        env: "AGENTD_LISTEN",
        flag: Some("--listen"),
        default: "127.0.0.1:8420",
        meaning: "address to listen on, IP:PORT or HOST:PORT (a name is resolved once, at start); port 0 picks a free port",
        parse: Parse::Listen(|c, addr, text| {
            c.listen = addr;
            c.listen_text = text;
        }),
        ..Setting::BASE
    },
    Setting {
        name: "state_dir",
        env: "AGENTD_STATE_DIR",
        flag: Some("--state-dir"),
        default: "./agentd-state",
        default_from: Some("STATE_DIRECTORY"),
        shown: Some("$STATE_DIRECTORY, else ./agentd-state"),
        meaning: "directory for state.db and diagnostics; created 0700, one agentd serve per directory",
        parse: Parse::Text(|c, v| c.state_dir = PathBuf::from(v.unwrap_or_default())),
        ..Setting::BASE
    },
    Setting {
        name: "config",
        env: "AGENTD_CONFIG",
        flag: Some("--config"),
        toml: false,
        shown: Some("none"),
        meaning: "the optional TOML file, keys as listed here",
        parse: Parse::Text(|c, v| c.config_file = v.map(PathBuf::from)),
        ..Setting::BASE
    },
    Setting {
        name: "api_token",
        env: "AGENTD_API_TOKEN",
        shown: Some("none"),
        meaning: "bearer token for /api/*, 16 characters or more; required on a non-loopback address",
        ..Setting::BASE
    },
    Setting {
        name: "api_token_file",
        env: "AGENTD_API_TOKEN_FILE",
        shown: Some("none"),
        meaning: "a file holding the token (one trailing newline removed)",
        ..Setting::BASE
    },
    Setting {
        name: "history_limit",
        env: "AGENTD_HISTORY_LIMIT",
        alias: Some(HISTORY_LIMIT_ALIAS),
        // The value users of other agent servers already know.
        default: "1000",
        meaning: "messages kept in memory (FIFO); an invalid value is the default, with a warning",
        parse: Parse::Lenient(|c, n| c.history_limit = n as usize),
        ..Setting::BASE
    },
    Setting {
        name: "max_connections",
        env: "AGENTD_MAX_CONNECTIONS",
        default: "1024",
        meaning: "connections served at once; more get 503",
        parse: Parse::Int {
            min: 1,
            max: 1 << 20,
            set: |c, n| c.max_connections = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "header_read_timeout",
        env: "AGENTD_HEADER_READ_TIMEOUT",
        default: "10s",
        meaning: "time to send request headers",
        parse: Parse::Time {
            min: ms(100),
            max: secs(HOUR),
            set: |c, d| c.header_read_timeout = d,
        },
        ..Setting::BASE
    },
    Setting {
        name: "idle_timeout",
        env: "AGENTD_IDLE_TIMEOUT",
        default: "60s",
        meaning: "idle keep-alive connections are closed after this",
        parse: Parse::Time {
            min: ms(100),
            max: secs(DAY),
            set: |c, d| c.idle_timeout = d,
        },
        ..Setting::BASE
    },
    Setting {
        name: "max_body_bytes",
        env: "AGENTD_MAX_BODY_BYTES",
        default: "1MiB",
        meaning: "largest request body; larger ones get 413",
        parse: Parse::Size {
            min: 1,
            max: 1 << 30,
            set: |c, n| c.max_body_bytes = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "max_header_bytes",
        env: "AGENTD_MAX_HEADER_BYTES",
        // 64 KiB holds any real client's headers (browsers stay under 16 KiB)
        // while 1,024 connections then hold at most 64 MiB of header buffers.
        default: "64KiB",
        meaning: "start line and headers of a request; more get 431",
        parse: Parse::Size {
            min: 1 << 10,
            max: 16 << 20,
            set: |c, n| c.max_header_bytes = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "drain_timeout",
        env: "AGENTD_DRAIN_TIMEOUT",
        default: "20s",
        meaning: "on SIGTERM, time for in-flight requests",
        parse: Parse::Time {
            min: Duration::ZERO,
            max: secs(HOUR),
            set: |c, d| c.drain_timeout = d,
        },
        ..Setting::BASE
    },
    Setting {
        name: "store_queue",
        env: "AGENTD_STORE_QUEUE",
        default: "8192",
        meaning: "requests waiting for the SQLite thread",
        parse: Parse::Int {
            min: 1,
            max: 1 << 20,
            set: |c, n| c.store.queue = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "store_max_batch",
        env: "AGENTD_STORE_MAX_BATCH",
        default: "1024",
        meaning: "appends folded into one transaction",
        parse: Parse::Int {
            min: 1,
            max: 1 << 16,
            set: |c, n| c.store.max_batch = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "store_enqueue_timeout",
        env: "AGENTD_STORE_ENQUEUE_TIMEOUT",
        default: "5s",
        meaning: "wait for room in the store queue before 503",
        parse: Parse::Time {
            min: ms(1),
            max: secs(300),
            set: |c, d| c.store.enqueue_timeout = d,
        },
        ..Setting::BASE
    },
    Setting {
        name: "store_quick_check_interval",
        env: "AGENTD_STORE_QUICK_CHECK_INTERVAL",
        default: "15m",
        meaning: "how often PRAGMA quick_check looks for damage inside state.db; 0 turns it off",
        parse: Parse::Time {
            min: Duration::ZERO,
            max: secs(7 * DAY),
            set: |c, d| c.store.quick_check_interval = d,
        },
        ..Setting::BASE
    },
    Setting {
        name: "store_proof_interval",
        env: "AGENTD_STORE_PROOF_INTERVAL",
        default: "1s",
        meaning: "how old the store check's last proof of writing may be before a tick makes a new one; 0 proves every tick",
        parse: Parse::Time {
            min: Duration::ZERO,
            max: secs(60),
            set: |c, d| c.store.proof_interval = d,
        },
        ..Setting::BASE
    },
    Setting {
        name: "store_synchronous",
        env: "AGENTD_STORE_SYNCHRONOUS",
        default: "full",
        meaning: "full: every write answered after its fsync; normal: survives a crash of agentd, not a power loss",
        parse: Parse::Choice {
            words: &["full", "normal"],
            aliases: &[("FULL", "full"), ("NORMAL", "normal")],
            set: |c, w| c.store.synchronous = sync_mode(w),
        },
        ..Setting::BASE
    },
    Setting {
        name: "retention_messages",
        env: "AGENTD_RETENTION_MESSAGES",
        default: "1000000",
        meaning: "messages kept in state.db (0 = all)",
        parse: Parse::Int {
            min: 0,
            max: u64::MAX / 2,
            set: |c, n| c.store.retention_messages = n,
        },
        ..Setting::BASE
    },
    Setting {
        name: "max_concurrent",
        env: "AGENTD_MAX_CONCURRENT",
        default: "4",
        meaning: "executions running at once",
        parse: Parse::Int {
            min: 1,
            max: 4096,
            set: |c, n| c.executor.max_concurrent = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "max_queue",
        env: "AGENTD_MAX_QUEUE",
        default: "64",
        meaning: "executions waiting; more get 429",
        parse: Parse::Int {
            min: 0,
            max: 1 << 20,
            set: |c, n| c.executor.max_queue = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "finished_retained",
        env: "AGENTD_FINISHED_RETAINED",
        default: "256",
        meaning: "finished executions kept for GET /api/executions/{id}",
        parse: Parse::Int {
            min: 0,
            max: 1 << 20,
            set: |c, n| c.executor.finished_retained = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "max_subscribers",
        env: "AGENTD_MAX_SUBSCRIBERS",
        default: "16",
        meaning: "SSE subscribers per execution",
        parse: Parse::Int {
            min: 1,
            max: 4096,
            set: |c, n| c.executor.max_subscribers = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "stream_buffer",
        env: "AGENTD_STREAM_BUFFER",
        // 4096 covers a 1 MiB replay of typical stream-json lines.
        default: "4096",
        meaning: "output chunks kept per execution for SSE replay",
        parse: Parse::Int {
            min: 1,
            max: 1 << 16,
            set: |c, n| c.executor.stream_buffer = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "stream_replay_bytes",
        env: "AGENTD_STREAM_REPLAY_BYTES",
        // 1 MiB holds the whole output of a typical agent turn (a stream-json
        // turn with tool calls is tens to hundreds of KiB), so a client that
        // subscribes late or reconnects misses nothing.
        default: "1MiB",
        meaning: "output bytes kept per execution for SSE replay",
        parse: Parse::Size {
            min: 1,
            max: 1 << 30,
            set: |c, n| c.executor.stream_replay_bytes = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "stream_replay_total",
        env: "AGENTD_STREAM_REPLAY_TOTAL",
        // Without it, finished_retained × stream_replay_bytes (256 MiB with
        // the defaults) could be held. 64 MiB keeps the full replay of 64
        // typical turns; past it, finished executions give theirs back first.
        default: "64MiB",
        meaning: "every execution's replay buffer together; finished ones give theirs back first",
        parse: Parse::Size {
            min: 1,
            max: 1 << 40,
            set: |c, n| c.executor.stream_replay_total = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "health_interval",
        env: "AGENTD_HEALTH_INTERVAL",
        default: "10s",
        meaning: "tick interval when systemd's watchdog is off (with it: WATCHDOG_USEC / 3)",
        parse: Parse::Time {
            min: ms(50),
            max: secs(DAY),
            set: |c, d| c.health.interval = d,
        },
        ..Setting::BASE
    },
    Setting {
        name: "trend_window",
        env: "AGENTD_TREND_WINDOW",
        // A slow leak shows over a day, not over minutes.
        default: "24h",
        meaning: "how far back the leak-trend ring reaches (2 to 100,000 samples of trend_interval)",
        parse: Parse::Time {
            min: ms(20),
            max: secs(30 * DAY),
            set: |c, d| c.health.trend_window = d,
        },
        ..Setting::BASE
    },
    Setting {
        name: "trend_interval",
        env: "AGENTD_TREND_INTERVAL",
        // From 10 ms, because tests compress time.
        default: "1m",
        meaning: "time between trend samples",
        parse: Parse::Time {
            min: ms(10),
            max: secs(HOUR),
            set: |c, d| c.health.trend_interval = d,
        },
        ..Setting::BASE
    },
    Setting {
        name: "keepalive_file",
        env: "AGENTD_KEEPALIVE_FILE",
        shown: Some("none"),
        meaning: "touched after every passing tick (launchd)",
        parse: Parse::Text(|c, v| c.health.keepalive_file = v.map(PathBuf::from)),
        ..Setting::BASE
    },
    Setting {
        name: "watchdog_trigger_after",
        env: "AGENTD_WATCHDOG_TRIGGER_AFTER",
        default: "0",
        shown: Some("off"),
        meaning: "after N failed ticks in a row send WATCHDOG=trigger (0 = never)",
        parse: Parse::Int {
            min: 0,
            max: 1_000_000,
            set: |c, n| c.health.trigger_after = (n != 0).then_some(n as u32),
        },
        ..Setting::BASE
    },
    Setting {
        name: "self_abort_after",
        env: "AGENTD_SELF_ABORT_AFTER",
        default: "3",
        meaning: "keepalive-file mode: abort after the loop stalled this many intervals (0 = never)",
        parse: Parse::Int {
            min: 0,
            max: 1_000_000,
            set: |c, n| c.health.self_abort_after = n as u32,
        },
        ..Setting::BASE
    },
    Setting {
        name: "max_threads",
        env: "AGENTD_MAX_THREADS",
        default: "512",
        meaning: "the resources check fails above this many threads",
        parse: Parse::Int {
            min: 8,
            max: 1 << 20,
            set: |c, n| c.health.max_threads = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "diagnostics_keep",
        env: "AGENTD_DIAGNOSTICS_KEEP",
        default: "20",
        meaning: "diagnostics bundles kept in <state-dir>/diagnostics",
        parse: Parse::Int {
            min: 1,
            max: 10_000,
            set: |c, n| c.health.diagnostics_keep = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "nofile_target",
        env: "AGENTD_NOFILE_TARGET",
        default: "4096",
        meaning: "RLIMIT_NOFILE soft limit raised towards this (never above the hard limit)",
        parse: Parse::Int {
            min: 64,
            max: 1 << 24,
            set: |c, n| c.health.nofile_target = n,
        },
        ..Setting::BASE
    },
    Setting {
        name: "fault_injection",
        env: "AGENTD_FAULT_INJECTION",
        default: "off",
        meaning: "enables /debug/fault/* in builds with the fault-injection feature",
        parse: Parse::Bool(|c, b| c.fault_injection = b),
        ..Setting::BASE
    },
    Setting {
        name: "log",
        env: "AGENTD_LOG",
        default: "info",
        meaning: "log filter (tracing syntax)",
        parse: Parse::Text(|c, v| c.log_filter = v.unwrap_or_default()),
        ..Setting::BASE
    },
    Setting {
        name: "runtime",
        env: "AGENTD_RUNTIME",
        default: "echo",
        meaning: "the agent backend that runs prompts",
        parse: Parse::Choice {
            words: &["echo", "command", "claude-code", "gemini", "codex", "acp"],
            aliases: &[("claude", "claude-code")],
            set: |c, w| c.runtime.kind = runtime_kind(w),
        },
        ..Setting::BASE
    },
    Setting {
        name: "acp_cmd",
        env: "AGENTD_ACP_CMD",
        shown: Some("—"),
        meaning: "the ACP agent's argv for acp, e.g. gemini --acp",
        parse: Parse::Words(|c, w| c.runtime.acp_command = w),
        ..Setting::BASE
    },
    Setting {
        name: "acp_max_agents",
        env: "AGENTD_ACP_MAX_AGENTS",
        default: "4",
        meaning: "most warm ACP agent processes; max_concurrent is lowered to it",
        parse: Parse::Int {
            min: 1,
            max: 1024,
            set: |c, n| c.runtime.acp_max_agents = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "acp_idle",
        env: "AGENTD_ACP_IDLE",
        default: "300s",
        meaning: "an ACP agent process idle this long is closed",
        parse: Parse::Time {
            min: secs(1),
            max: secs(7 * DAY),
            set: |c, d| c.runtime.acp_idle = d,
        },
        ..Setting::BASE
    },
    Setting {
        name: "acp_permissions",
        env: "AGENTD_ACP_PERMISSIONS",
        default: "deny",
        meaning: "answer to an ACP agent's permission requests",
        parse: Parse::Choice {
            words: &["deny", "allow", "ask"],
            aliases: &[],
            set: |c, w| c.runtime.acp_permissions = permission_policy(w),
        },
        ..Setting::BASE
    },
    Setting {
        name: "acp_permission_timeout",
        env: "AGENTD_ACP_PERMISSION_TIMEOUT",
        default: "60s",
        meaning: "an ask request nobody answered is refused after this long",
        parse: Parse::Time {
            min: secs(1),
            max: secs(DAY),
            set: |c, d| c.runtime.acp_permission_timeout = d,
        },
        ..Setting::BASE
    },
    Setting {
        name: "codex_sandbox",
        env: "AGENTD_CODEX_SANDBOX",
        default: "workspace-write",
        meaning: "Codex's -s for the commands the model runs",
        parse: Parse::Choice {
            words: &["read-only", "workspace-write", "danger-full-access"],
            aliases: &[],
            set: |c, w| c.runtime.codex_sandbox = codex_sandbox(w),
        },
        ..Setting::BASE
    },
    Setting {
        name: "codex_home",
        env: "CODEX_HOME",
        toml: false,
        shown: Some("<state-dir>/codex"),
        meaning: "Codex's own variable: where its config and threads live",
        parse: Parse::Text(|c, v| {
            c.runtime.codex_home_default = v.is_none();
            c.runtime.codex_home = v
                .map(PathBuf::from)
                .unwrap_or_else(|| c.state_dir.join("codex"));
        }),
        ..Setting::BASE
    },
    Setting {
        name: "runtime_cmd",
        env: "AGENTD_RUNTIME_CMD",
        shown: Some("—"),
        meaning: "argv for the command runtime",
        parse: Parse::Words(|c, w| c.runtime.command = w),
        ..Setting::BASE
    },
    Setting {
        name: "claude_bin",
        env: "AGENTD_CLAUDE_BIN",
        default: "claude",
        meaning: "the Claude Code CLI claude-code runs",
        parse: Parse::Text(|c, v| c.runtime.claude_bin = v.unwrap_or_default()),
        ..Setting::BASE
    },
    Setting {
        name: "claude_args",
        env: "AGENTD_CLAUDE_ARGS",
        shown: Some("—"),
        meaning: "more arguments for claude, e.g. --model sonnet --max-turns 5",
        parse: Parse::Words(|c, w| c.runtime.claude_args = w),
        ..Setting::BASE
    },
    Setting {
        name: "gemini_bin",
        env: "AGENTD_GEMINI_BIN",
        default: "gemini",
        meaning: "the Gemini CLI gemini runs",
        parse: Parse::Text(|c, v| c.runtime.gemini_bin = v.unwrap_or_default()),
        ..Setting::BASE
    },
    Setting {
        name: "gemini_args",
        env: "AGENTD_GEMINI_ARGS",
        shown: Some("—"),
        meaning: "more arguments for gemini",
        parse: Parse::Words(|c, w| c.runtime.gemini_args = w),
        ..Setting::BASE
    },
    Setting {
        name: "codex_bin",
        env: "AGENTD_CODEX_BIN",
        default: "codex",
        meaning: "the Codex CLI codex runs",
        parse: Parse::Text(|c, v| c.runtime.codex_bin = v.unwrap_or_default()),
        ..Setting::BASE
    },
    Setting {
        name: "codex_args",
        env: "AGENTD_CODEX_ARGS",
        shown: Some("—"),
        meaning: "more codex exec flags, e.g. -m gpt-5",
        parse: Parse::Words(|c, w| c.runtime.codex_args = w),
        ..Setting::BASE
    },
    Setting {
        name: "system_prompt",
        env: "AGENTD_SYSTEM_PROMPT",
        shown: Some("—"),
        meaning: "claude's --append-system-prompt; prepended to the prompt by gemini and codex",
        parse: Parse::Text(|c, v| c.runtime.system_prompt = v),
        ..Setting::BASE
    },
    Setting {
        name: "task_timeout",
        env: "AGENTD_TASK_TIMEOUT",
        default: "600s",
        meaning: "timeout when a request names none (at most max_task_timeout)",
        parse: Parse::Time {
            min: secs(1),
            max: secs(DAY),
            set: |c, d| c.runtime.default_timeout = d,
        },
        ..Setting::BASE
    },
    Setting {
        name: "max_task_timeout",
        env: "AGENTD_MAX_TASK_TIMEOUT",
        default: "3600s",
        meaning: "largest timeout_s a request may ask for",
        parse: Parse::Time {
            min: secs(1),
            max: secs(7 * DAY),
            set: |c, d| c.runtime.max_timeout = d,
        },
        ..Setting::BASE
    },
    Setting {
        name: "stdout_cap",
        env: "AGENTD_STDOUT_CAP",
        default: "8MiB",
        meaning: "stdout kept per execution (the rest is dropped and reported)",
        parse: Parse::Size {
            min: 1024,
            max: 1 << 30,
            set: |c, n| c.runtime.stdout_cap = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "stderr_cap",
        env: "AGENTD_STDERR_CAP",
        default: "256KiB",
        meaning: "stderr tail kept per execution",
        parse: Parse::Size {
            min: 1024,
            max: 64 << 20,
            set: |c, n| c.runtime.stderr_cap = n as usize,
        },
        ..Setting::BASE
    },
    Setting {
        name: "kill_grace",
        env: "AGENTD_KILL_GRACE",
        default: "5s",
        meaning: "wait after SIGINT, and after SIGTERM",
        parse: Parse::Time {
            min: Duration::ZERO,
            max: secs(300),
            set: |c, d| c.runtime.kill_grace = d,
        },
        ..Setting::BASE
    },
    Setting {
        name: "pipe_drain",
        env: "AGENTD_PIPE_DRAIN",
        default: "2s",
        meaning: "reading after the child exited (escaped grandchildren)",
        parse: Parse::Time {
            min: Duration::ZERO,
            max: secs(60),
            set: |c, d| c.runtime.pipe_drain = d,
        },
        ..Setting::BASE
    },
    Setting {
        name: "workdir",
        env: "AGENTD_WORKDIR",
        shown: Some("<state-dir>/workspace"),
        meaning: "working directory of every agent child; created 0700 if missing",
        parse: Parse::Text(|c, v| {
            c.runtime.workdir = v
                .map(PathBuf::from)
                .unwrap_or_else(|| c.state_dir.join("workspace"));
        }),
        ..Setting::BASE
    },
];

/// The setting called `name`. Panics on a name not in the list: callers
/// name settings in code, so a miss is a typo found by any test.
pub(super) fn setting(name: &str) -> &'static Setting {
    SETTINGS
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no setting {name}"))
}

impl Parse {
    /// What a value must be, for `--help` and for the error naming a bad one.
    pub fn accepts(&self) -> String {
        match self {
            Parse::Int { min, max, .. } => format!("an integer from {min} to {max}"),
            Parse::Size { min, max, .. } => {
                format!("a size from {} to {}", fmt_bytes(*min), fmt_bytes(*max))
            }
            Parse::Time { min, max, .. } => format!(
                "a duration from {} to {}",
                fmt_duration(*min),
                fmt_duration(*max)
            ),
            Parse::Bool(_) => "1/0, true/false, yes/no or on/off".to_owned(),
            Parse::Words(_) => "shell-style words (no shell)".to_owned(),
            Parse::Text(_) | Parse::Rule => "text".to_owned(),
            Parse::Choice { words, .. } => format!("one of {}", words.join(", ")),
            Parse::Listen(_) => "IP:PORT or HOST:PORT".to_owned(),
            Parse::Lenient(_) => "a positive integer".to_owned(),
        }
    }
}

/// A duration as the settings accept it, in the largest unit that writes it
/// whole.
pub(super) fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_nanos() != 0 || s == 0 {
        format!("{}ms", d.as_millis())
    } else if s.is_multiple_of(HOUR) {
        format!("{}h", s / HOUR)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// A size as the settings accept it, in the largest unit that writes it whole.
pub(super) fn fmt_bytes(n: u64) -> String {
    match n {
        0 => "0".to_owned(),
        n if n.is_multiple_of(1 << 30) => format!("{}GiB", n >> 30),
        n if n.is_multiple_of(1 << 20) => format!("{}MiB", n >> 20),
        n if n.is_multiple_of(1 << 10) => format!("{}KiB", n >> 10),
        n => n.to_string(),
    }
}

/// The help of `--name`'s flag: the setting's meaning, variable and default.
pub fn flag_help(name: &str) -> String {
    let s = setting(name);
    format!("{} [env: {}] [default: {}]", s.meaning, s.env, s.shown())
}

/// The settings part of `agentd serve --help`: every setting with its
/// variable, TOML key, default, what it accepts and its meaning.
pub fn help() -> String {
    let mut out = String::from(
        "Settings (flag > environment > TOML file > default; durations take 10, 10s, \
         500ms, 2m; sizes take 1048576, 512KiB, 8MiB):\n",
    );
    for s in SETTINGS {
        out.push_str("\n  ");
        out.push_str(s.env);
        if let Some(alias) = s.alias {
            out.push_str(&format!(" (alias {alias})"));
        }
        if let Some(flag) = s.flag {
            out.push_str(&format!(", {flag}"));
        }
        if s.toml {
            out.push_str(&format!(", TOML {}", s.name));
        }
        out.push_str(&format!(
            "\n      {}\n      default: {}",
            s.meaning,
            s.shown()
        ));
        if !matches!(s.parse, Parse::Text(_) | Parse::Rule) {
            out.push_str(&format!("; {}", s.parse.accepts()));
        }
        out.push('\n');
    }
    out
}
