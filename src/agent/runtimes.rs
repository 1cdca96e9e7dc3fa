//! The subprocess runtimes — `command` (any argv), `claude-code`, `gemini` and
//! `codex` —
//! `build_runtime`, which picks one (or the built-in `echo`) from config, and
//! what is learned about the configured runtime once at start (its working
//! directory, whether its program is runnable, the CLI's version).
//!
//! Each runtime only decides argv, working directory and what goes on stdin;
//! spawning, limits, signals and output parsing are all `process::run_child`.
//! Claude Code and Gemini CLI repair a disagreement between the store and the
//! CLI by retrying once with the other session flag (rules in `sessions`);
//! Codex, which names its own threads, resumes the thread the store recorded
//! and starts a fresh one when Codex no longer has it. Nothing here classifies outcomes (that is `classify`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::ser::SerializeStruct;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::agent::acp::{Acp, AcpOptions};
use crate::agent::process::{run_child, scrub_env, ChildCommand, ChildLimits};
use crate::agent::runtime::{
    Echo, ExecutionContext, ExecutionKind, RunEnd, RunFuture, RunOutcome, RunRequest, Runtime,
};
use crate::agent::sessions::{recovery, SessionFlag};
use crate::config::{CodexSandbox, RuntimeConfig, RuntimeKind};

/// Set for Gemini CLI children: it makes Gemini treat agentd's work
/// directory as trusted, so it reads the workspace settings agentd writes.
pub const GEMINI_TRUST_ENV: &str = "GEMINI_CLI_TRUST_WORKSPACE";

/// Codex's home directory variable.
pub const CODEX_HOME_ENV: &str = "CODEX_HOME";

/// The placeholder a `command` argument may contain; the prompt replaces it
/// and stdin is then left empty.
pub const PROMPT_PLACEHOLDER: &str = "{prompt}";

/// Longest wait for `<cli> --version` at start. Gemini CLI 0.61 is a Node
/// program that took 8-12 s to print its version on a loaded two-core machine;
/// a CLI that takes longer reports no version rather than holding anything up
/// (the read runs beside start-up, never before `READY=1`).
pub const VERSION_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Most bytes of `--version` output read; a version is one short line.
const VERSION_OUTPUT_CAP: u64 = 4096;

/// The runtime the configuration names.
pub fn build_runtime(cfg: &RuntimeConfig) -> Arc<dyn Runtime> {
    let limits = ChildLimits::from_config(cfg);
    let workdir = Some(cfg.workdir.clone());
    match cfg.kind {
        RuntimeKind::Echo => Arc::new(Echo),
        RuntimeKind::Command => {
            let mut argv = cfg.command.clone();
            if let Some(program) = argv.first_mut() {
                *program = absolute_program(program);
            }
            Arc::new(CommandRuntime {
                argv,
                limits,
                workdir,
            })
        }
        RuntimeKind::ClaudeCode => Arc::new(ClaudeCode {
            bin: absolute_program(&cfg.claude_bin),
            args: cfg.claude_args.clone(),
            system_prompt: cfg.system_prompt.clone(),
            limits,
            workdir,
        }),
        RuntimeKind::Gemini => Arc::new(Gemini {
            bin: absolute_program(&cfg.gemini_bin),
            args: cfg.gemini_args.clone(),
            system_prompt: cfg.system_prompt.clone(),
            limits,
            workdir,
        }),
        RuntimeKind::Codex => Arc::new(Codex {
            bin: absolute_program(&cfg.codex_bin),
            args: cfg.codex_args.clone(),
            sandbox: cfg.codex_sandbox,
            system_prompt: cfg.system_prompt.clone(),
            home: cfg.codex_home_default.then(|| cfg.codex_home.clone()),
            limits,
            workdir,
        }),
        RuntimeKind::Acp => {
            let mut argv = cfg.acp_command.clone();
            if let Some(program) = argv.first_mut() {
                *program = absolute_program(program);
            }
            let env = if acp_runs_gemini(cfg) {
                vec![(GEMINI_TRUST_ENV, "true".into())]
            } else {
                Vec::new()
            };
            Arc::new(Acp::new(AcpOptions {
                argv,
                workdir: cfg.workdir.clone(),
                max_agents: cfg.acp_max_agents,
                idle: cfg.acp_idle,
                permissions: cfg.acp_permissions,
                permission_timeout: cfg.acp_permission_timeout,
                kill_grace: cfg.kill_grace,
                max_line: cfg.stdout_cap,
                env,
            }))
        }
    }
}

/// True when the ACP agent is Gemini CLI (`gemini --acp`): it then gets the
/// same workspace trust and settings as the `gemini` runtime's runs.
fn acp_runs_gemini(cfg: &RuntimeConfig) -> bool {
    cfg.acp_command
        .first()
        .and_then(|p| Path::new(p).file_name())
        .is_some_and(|name| name == "gemini")
}

/// Children run in the work directory, so a relative program path
/// (`./agent.sh`) is resolved against agentd's own directory first, where the
/// user meant it. Bare names stay bare for the `PATH` search.
fn absolute_program(program: &str) -> String {
    if !program.contains('/') || Path::new(program).is_absolute() {
        return program.to_owned();
    }
    let relative = program.trim_start_matches("./");
    std::env::current_dir()
        .map(|dir| dir.join(relative).display().to_string())
        .unwrap_or_else(|_| program.to_owned())
}

/// The program the configured runtime runs (`None` for `echo`).
pub fn program(cfg: &RuntimeConfig) -> Option<String> {
    match cfg.kind {
        RuntimeKind::Echo => None,
        RuntimeKind::Command => cfg.command.first().cloned(),
        RuntimeKind::ClaudeCode => Some(cfg.claude_bin.clone()),
        RuntimeKind::Gemini => Some(cfg.gemini_bin.clone()),
        RuntimeKind::Codex => Some(cfg.codex_bin.clone()),
        RuntimeKind::Acp => cfg.acp_command.first().cloned(),
    }
}

/// Startup check that the configured runtime's program can be executed, so a
/// missing CLI is a warning in the log at start rather than a surprise on the
/// first request. `Err` is the warning text ("runtime command not found:
/// claude"). Not fatal: the CLI may be installed later.
pub fn check_available(cfg: &RuntimeConfig) -> Result<(), String> {
    let program = match (cfg.kind, program(cfg)) {
        (RuntimeKind::Echo, _) => return Ok(()),
        (_, Some(program)) => program,
        (_, None) => return Err("the command runtime has no command".into()),
    };
    if is_executable_on_path(&absolute_program(&program)) {
        Ok(())
    } else {
        Err(format!("runtime command not found: {program}"))
    }
}

/// The lookup `execvp` will do: a name with a slash is a path, anything else is
/// searched in `PATH` (the same `PATH` the child inherits).
fn is_executable_on_path(program: &str) -> bool {
    if program.contains('/') {
        return is_executable_file(Path::new(program));
    }
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| is_executable_file(&dir.join(program)))
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Create the work directory (0700) if it is missing and prove agentd can
/// write there, at start rather than at the first request. `Err` is the
/// reason; the caller names the setting.
pub fn prepare_workdir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create it: {e}"))?;
    }
    let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err("not a directory".into());
    }
    let probe = dir.join(".agentd-write-test");
    std::fs::write(&probe, b"")
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| format!("not writable: {e}"))
}

/// The settings agentd's own Gemini CLI runs need in the workspace's
/// `.gemini/settings.json`: with session retention on (Gemini's default),
/// a Gemini start may delete session files of the project, and a chat
/// resumed later would lose its context.
const GEMINI_WORKSPACE_SETTINGS: &[(&str, &str, bool)] = &[("general", "sessionRetention", false)];

/// Prepare what the configured CLI needs on disk, at start: Codex's home
/// (0700) when it is agentd's default; for Gemini CLI, session retention off
/// in the workspace's settings (other keys there are kept). `Err` names
/// what, where and why.
pub fn prepare_cli_files(cfg: &RuntimeConfig) -> Result<(), (&'static str, PathBuf, String)> {
    match cfg.kind {
        RuntimeKind::Codex if cfg.codex_home_default => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&cfg.codex_home)
                .map_err(|e| ("CODEX_HOME", cfg.codex_home.clone(), e.to_string()))
        }
        RuntimeKind::Gemini | RuntimeKind::Acp
            if cfg.kind == RuntimeKind::Gemini || acp_runs_gemini(cfg) =>
        {
            let path = cfg.workdir.join(".gemini").join("settings.json");
            write_gemini_settings(&path)
                .map_err(|reason| ("Gemini CLI's workspace settings", path, reason))
        }
        _ => Ok(()),
    }
}

/// Merge `GEMINI_WORKSPACE_SETTINGS` into the JSON object at `path` (created
/// with its directory if missing); rewritten only when something changed.
fn write_gemini_settings(path: &Path) -> Result<(), String> {
    let mut settings = match std::fs::read(path) {
        Ok(raw) => match serde_json::from_slice::<serde_json::Value>(&raw) {
            Ok(v @ serde_json::Value::Object(_)) => v,
            _ => return Err("not a JSON object; fix or remove it".into()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => return Err(e.to_string()),
    };
    let before = settings.clone();
    for (section, key, enabled) in GEMINI_WORKSPACE_SETTINGS {
        let section = settings
            .as_object_mut()
            .expect("an object")
            .entry(*section)
            .or_insert_with(|| serde_json::json!({}));
        if !section.is_object() {
            *section = serde_json::json!({});
        }
        section[*key] = serde_json::json!({ "enabled": enabled });
    }
    if settings == before {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| e.to_string())?;
    }
    let text = serde_json::to_string_pretty(&settings).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| e.to_string())
}

/// What `/health` says about the runtime: computed once at start (the version
/// arrives from a background read shortly after), rendered without I/O.
#[derive(Debug)]
pub struct RuntimeReport {
    pub name: &'static str,
    /// The program it runs; `None` for `echo`.
    pub command: Option<String>,
    /// The program was found and executable at start (always true for `echo`).
    pub runnable: bool,
    /// The first line of `<cli> --version`; stays empty when it could not be
    /// read (and for `echo` and `command`, which are never asked).
    version: OnceLock<String>,
}

impl RuntimeReport {
    pub fn new(cfg: &RuntimeConfig) -> Self {
        RuntimeReport {
            name: cfg.kind.as_str(),
            command: program(cfg),
            runnable: check_available(cfg).is_ok(),
            version: OnceLock::new(),
        }
    }

    pub fn version(&self) -> Option<&str> {
        self.version.get().map(String::as_str)
    }

    /// Record the version read at start (once; later calls are ignored).
    pub fn set_version(&self, version: String) {
        let _ = self.version.set(version);
    }
}

impl Serialize for RuntimeReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("RuntimeReport", 4)?;
        st.serialize_field("name", self.name)?;
        st.serialize_field("command", &self.command)?;
        st.serialize_field("runnable", &self.runnable)?;
        st.serialize_field("version", &self.version())?;
        st.end()
    }
}

/// `<cli> --version` for `claude-code`, `gemini` and `codex` (never for `command`: an
/// arbitrary program may do anything with an unknown flag), in the work
/// directory with the children's scrubbed environment, bounded by
/// `VERSION_READ_TIMEOUT`. The first non-empty line of stdout, or `None`.
pub async fn read_version(cfg: &RuntimeConfig) -> Option<String> {
    if !matches!(
        cfg.kind,
        RuntimeKind::ClaudeCode | RuntimeKind::Gemini | RuntimeKind::Codex
    ) {
        return None;
    }
    let program = absolute_program(&program(cfg)?);
    let mut cmd = tokio::process::Command::new(&program);
    cmd.arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    if cfg.workdir.is_dir() {
        cmd.current_dir(&cfg.workdir);
    }
    scrub_env(&mut cmd, "version-check");
    if cfg.kind == RuntimeKind::Codex && cfg.codex_home_default {
        cmd.env(CODEX_HOME_ENV, &cfg.codex_home);
    }
    let mut child = cmd.spawn().ok()?;
    let pgid = child.id();
    let read = async {
        let mut out = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            let _ = stdout.take(VERSION_OUTPUT_CAP).read_to_end(&mut out).await;
        }
        let status = child.wait().await.ok()?;
        status.success().then_some(out)
    };
    let out = tokio::time::timeout(VERSION_READ_TIMEOUT, read).await;
    if let Some(pgid) = pgid {
        // Whatever it started goes with it.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let out = out.ok()??;
    String::from_utf8_lossy(&out)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.chars().take(200).collect())
}

/// Any argv. The prompt replaces `{prompt}` wherever an argument contains it;
/// with no placeholder it goes on stdin. Output is plain text unless the
/// program speaks stream-json.
#[derive(Debug, Clone)]
pub struct CommandRuntime {
    argv: Vec<String>,
    limits: ChildLimits,
    /// The children's working directory (`AGENTD_WORKDIR`).
    workdir: Option<PathBuf>,
}

impl CommandRuntime {
    pub fn new(argv: Vec<String>, limits: ChildLimits) -> Self {
        CommandRuntime {
            argv,
            limits,
            workdir: None,
        }
    }

    fn command(&self, prompt: &str) -> ChildCommand {
        // Config validation guarantees a program; an empty one fails to spawn.
        let (program, args) = self
            .argv
            .split_first()
            .map_or(("", &[][..]), |(p, a)| (p.as_str(), a));
        let substituted = args.iter().any(|a| a.contains(PROMPT_PLACEHOLDER));
        ChildCommand {
            program: program.to_owned(),
            args: args
                .iter()
                .map(|a| a.replace(PROMPT_PLACEHOLDER, prompt))
                .collect(),
            stdin: (!substituted).then(|| prompt.as_bytes().to_vec()),
            cwd: self.workdir.clone(),
            env: Vec::new(),
        }
    }
}

impl Runtime for CommandRuntime {
    fn name(&self) -> &'static str {
        "command"
    }

    fn run<'a>(&'a self, req: RunRequest, ctx: &'a ExecutionContext) -> RunFuture<'a> {
        Box::pin(async move {
            let command = self.command(&req.prompt);
            run_child(command, &req, ctx, self.limits).await
        })
    }
}

/// Run a chat turn of a CLI that keeps sessions: with the flag the store's
/// answer implies, and once more with the other flag when the CLI disagreed
/// (see `sessions::recovery`). The retry gets what is left of the timeout.
async fn run_with_session_recovery(
    runtime: &'static str,
    req: &RunRequest,
    ctx: &ExecutionContext,
    limits: ChildLimits,
    command: impl Fn(Option<SessionFlag>) -> ChildCommand,
) -> RunOutcome {
    let started = Instant::now();
    let flag = match (req.kind, &req.cli_session) {
        (ExecutionKind::Chat, Some(session)) => Some(SessionFlag::for_session(session)),
        _ => None,
    };
    let mut outcome = run_child(command(flag), req, ctx, limits).await;
    let Some(flag) = flag else {
        return outcome;
    };
    // The turns the CLI session holds after this one. These CLIs print
    // nothing countable about what they resumed (Claude Code's init line
    // names the session, tools and model; Gemini CLI's the session and
    // model; Codex's `thread.started` the thread), so agentd cannot check
    // their memory against its own and counts by its own record: a created
    // session holds this turn, a resumed one the recorded turns and this.
    let prior = req.cli_session.as_ref().and_then(|s| s.turns);
    let Some(retry) = recovery(flag, &outcome) else {
        outcome.agent.session_turns = match flag {
            SessionFlag::Create => Some(1),
            SessionFlag::Resume => prior.map(|n| n + 1),
        };
        return outcome;
    };
    let left = req.timeout.saturating_sub(started.elapsed());
    if ctx.cancel.is_cancelled() || left.is_zero() {
        return outcome;
    }
    tracing::info!(
        execution_id = %req.execution_id,
        runtime,
        cli_session = req.cli_session.as_ref().map(|s| s.id.as_str()).unwrap_or_default(),
        "the CLI disagreed with the store about its session after {}; retrying with {}",
        flag.as_arg(),
        retry.as_arg()
    );
    let mut again = req.clone();
    again.timeout = left;
    let mut outcome = run_child(command(Some(retry)), &again, ctx, limits).await;
    // Refused both ways: no flag can reach this CLI session any more.
    outcome.agent.session_refused = recovery(retry, &outcome).is_some();
    // Created after all: this turn alone. Resumed although the store knew
    // of no turn: uncounted.
    outcome.agent.session_turns = (retry == SessionFlag::Create).then_some(1);
    if flag == SessionFlag::Resume && !outcome.agent.session_refused {
        // The store had a turn in this session and the CLI had lost it: the
        // turn ran without the earlier context, and says so.
        outcome.agent.session_restarted = true;
        tracing::warn!(
            execution_id = %req.execution_id,
            session_id = %req.session_id,
            runtime,
            "the CLI had lost its session; the turn started a fresh one without the earlier context"
        );
    }
    outcome
}

/// The session arguments of a chat turn (`--session-id U` / `--resume U`), or
/// for a task a fresh session of its own when `fresh_task_session` (Claude
/// Code: a task never continues anything).
fn session_args(
    req: &RunRequest,
    flag: Option<SessionFlag>,
    fresh_task_session: bool,
) -> Vec<String> {
    match (req.kind, flag, &req.cli_session) {
        (ExecutionKind::Chat, Some(flag), Some(session)) => {
            vec![flag.as_arg().into(), session.id.clone()]
        }
        (ExecutionKind::Task, _, _) if fresh_task_session => {
            vec!["--session-id".into(), uuid::Uuid::new_v4().to_string()]
        }
        _ => Vec::new(),
    }
}

/// Claude Code in print mode with stream-json output; the prompt on stdin.
#[derive(Debug, Clone)]
pub struct ClaudeCode {
    bin: String,
    args: Vec<String>,
    /// Passed as `--append-system-prompt`: Claude Code has a flag for it, so
    /// it is not mixed into the prompt.
    system_prompt: Option<String>,
    limits: ChildLimits,
    /// The children's working directory: Claude Code keeps sessions per
    /// directory, so a fixed one is what makes `--resume` find them.
    workdir: Option<PathBuf>,
}

impl ClaudeCode {
    pub fn new(
        bin: String,
        args: Vec<String>,
        system_prompt: Option<String>,
        limits: ChildLimits,
    ) -> Self {
        ClaudeCode {
            bin,
            args,
            system_prompt,
            limits,
            workdir: None,
        }
    }

    fn command(&self, req: &RunRequest, flag: Option<SessionFlag>) -> ChildCommand {
        let mut args: Vec<String> = ["--print", "--output-format", "stream-json", "--verbose"]
            .map(String::from)
            .to_vec();
        // A chat continues its CLI session; a headless task never shares
        // context with another task or the chat.
        args.extend(session_args(req, flag, true));
        if let Some(system_prompt) = &self.system_prompt {
            args.extend(["--append-system-prompt".into(), system_prompt.clone()]);
        }
        // User arguments come after ours, so a `--` among them cannot turn
        // our flags into positional arguments.
        args.extend(self.args.iter().cloned());
        ChildCommand {
            program: self.bin.clone(),
            args,
            stdin: Some(req.prompt.as_bytes().to_vec()),
            cwd: self.workdir.clone(),
            env: Vec::new(),
        }
    }
}

impl Runtime for ClaudeCode {
    fn name(&self) -> &'static str {
        "claude-code"
    }

    fn keeps_sessions(&self) -> bool {
        true
    }

    fn run<'a>(&'a self, req: RunRequest, ctx: &'a ExecutionContext) -> RunFuture<'a> {
        Box::pin(async move {
            run_with_session_recovery(self.name(), &req, ctx, self.limits, |flag| {
                self.command(&req, flag)
            })
            .await
        })
    }
}

/// Gemini CLI with stream-json output; the prompt on stdin. Gemini CLI has no
/// system-prompt flag, so the configured one is prepended to the input.
#[derive(Debug, Clone)]
pub struct Gemini {
    bin: String,
    args: Vec<String>,
    system_prompt: Option<String>,
    limits: ChildLimits,
    /// The children's working directory: Gemini CLI keeps sessions per
    /// directory and runs headless only in one it trusts (`--skip-trust`).
    workdir: Option<PathBuf>,
}

impl Gemini {
    pub fn new(
        bin: String,
        args: Vec<String>,
        system_prompt: Option<String>,
        limits: ChildLimits,
    ) -> Self {
        Gemini {
            bin,
            args,
            system_prompt,
            limits,
            workdir: None,
        }
    }

    fn command(&self, req: &RunRequest, flag: Option<SessionFlag>) -> ChildCommand {
        // `--skip-trust`: Gemini CLI 0.61 refuses to run headless in a
        // directory it was not told to trust (exit 55); the work directory
        // is agentd's own.
        let mut args: Vec<String> = ["--output-format", "stream-json", "--skip-trust"]
            .map(String::from)
            .to_vec();
        // A task needs no flag: without one Gemini CLI starts a new session.
        args.extend(session_args(req, flag, false));
        args.extend(self.args.iter().cloned());
        let input = match &self.system_prompt {
            Some(system_prompt) => format!("{system_prompt}\n\n{}", req.prompt),
            None => req.prompt.clone(),
        };
        ChildCommand {
            program: self.bin.clone(),
            args,
            stdin: Some(input.into_bytes()),
            cwd: self.workdir.clone(),
            // Gemini CLI reads the workspace's `.gemini/settings.json` (where
            // agentd keeps session retention off, see `prepare`) only in a
            // trusted workspace; `--skip-trust` alone does not make it read
            // them. The work directory is agentd's own.
            env: vec![(GEMINI_TRUST_ENV, "true".into())],
        }
    }
}

impl Runtime for Gemini {
    fn name(&self) -> &'static str {
        "gemini"
    }

    fn keeps_sessions(&self) -> bool {
        true
    }

    fn run<'a>(&'a self, req: RunRequest, ctx: &'a ExecutionContext) -> RunFuture<'a> {
        Box::pin(async move {
            run_with_session_recovery(self.name(), &req, ctx, self.limits, |flag| {
                self.command(&req, flag)
            })
            .await
        })
    }
}

/// Codex CLI: `codex exec --json` with the prompt on stdin. Codex names its
/// own threads, so a chat turn resumes the thread id the store recorded with
/// the session's last turn (`resume <thread_id>`, after every flag); a turn
/// whose thread Codex no longer has runs in a fresh thread, flagged
/// `session_restarted`.
#[derive(Debug, Clone)]
pub struct Codex {
    bin: String,
    args: Vec<String>,
    sandbox: CodexSandbox,
    /// Prepended to the input: `codex exec` has no flag for it.
    system_prompt: Option<String>,
    /// `CODEX_HOME` for the children when it is agentd's default; `None`
    /// leaves the operator's variable as inherited.
    home: Option<PathBuf>,
    limits: ChildLimits,
    workdir: Option<PathBuf>,
}

/// What Codex says when `resume` names a thread it does not have.
const CODEX_MISSING_THREAD_SIGNS: &[&str] = &[
    "no rollout found",
    "thread not found",
    "session not found",
    "no saved session",
    "conversation not found",
];

impl Codex {
    pub fn new(bin: String, args: Vec<String>, limits: ChildLimits) -> Self {
        Codex {
            bin,
            args,
            sandbox: CodexSandbox::WorkspaceWrite,
            system_prompt: None,
            home: None,
            limits,
            workdir: None,
        }
    }

    fn command(&self, req: &RunRequest, thread: Option<&str>) -> ChildCommand {
        let mut args: Vec<String> = ["exec", "--json", "--skip-git-repo-check"]
            .map(String::from)
            .to_vec();
        if let Some(dir) = &self.workdir {
            args.extend(["-C".into(), dir.display().to_string()]);
        }
        args.extend(["-s".into(), self.sandbox.as_str().into()]);
        // User flags are exec flags: they go before the `resume` subcommand.
        args.extend(self.args.iter().cloned());
        if let Some(thread) = thread {
            args.extend(["resume".into(), thread.to_owned()]);
        }
        // `-`: the prompt is read from stdin, which is then closed.
        args.push("-".into());
        let input = match &self.system_prompt {
            Some(system_prompt) => format!("{system_prompt}\n\n{}", req.prompt),
            None => req.prompt.clone(),
        };
        ChildCommand {
            program: self.bin.clone(),
            args,
            stdin: Some(input.into_bytes()),
            cwd: self.workdir.clone(),
            env: self
                .home
                .iter()
                .map(|home| (CODEX_HOME_ENV, home.clone().into_os_string()))
                .collect(),
        }
    }

    /// The thread a chat turn resumes: the one recorded with the session.
    fn thread_of(req: &RunRequest) -> Option<&str> {
        match (req.kind, &req.cli_session) {
            (ExecutionKind::Chat, Some(session)) if session.exists => session.agent_id.as_deref(),
            _ => None,
        }
    }
}

/// True when a `resume` turn failed because Codex has no such thread.
fn codex_lost_thread(outcome: &RunOutcome) -> bool {
    if !matches!(outcome.end, RunEnd::Exited { code } if code != 0) {
        return false;
    }
    let mut said = outcome.stderr_tail.to_ascii_lowercase();
    if let Some(message) = outcome
        .result
        .as_ref()
        .and_then(|r| r.error_message.as_ref())
    {
        said.push('\n');
        said.push_str(&message.to_ascii_lowercase());
    }
    CODEX_MISSING_THREAD_SIGNS.iter().any(|s| said.contains(s))
}

impl Runtime for Codex {
    fn name(&self) -> &'static str {
        "codex"
    }

    fn keeps_sessions(&self) -> bool {
        true
    }

    fn run<'a>(&'a self, req: RunRequest, ctx: &'a ExecutionContext) -> RunFuture<'a> {
        Box::pin(async move {
            let started = Instant::now();
            // `thread.started` names the thread and nothing of what it
            // holds, so the count is agentd's own (see
            // `run_with_session_recovery`).
            let Some(thread) = Self::thread_of(&req) else {
                let mut outcome = run_child(self.command(&req, None), &req, ctx, self.limits).await;
                outcome.agent.session_turns =
                    (req.kind == ExecutionKind::Chat && req.cli_session.is_some()).then_some(1);
                return outcome;
            };
            let mut outcome =
                run_child(self.command(&req, Some(thread)), &req, ctx, self.limits).await;
            let left = req.timeout.saturating_sub(started.elapsed());
            if codex_lost_thread(&outcome) && !ctx.cancel.is_cancelled() && !left.is_zero() {
                let mut again = req.clone();
                again.timeout = left;
                outcome = run_child(self.command(&again, None), &again, ctx, self.limits).await;
                outcome.agent.session_restarted = true;
            } else if outcome
                .agent
                .session_id
                .as_deref()
                .is_some_and(|t| t != thread)
            {
                // Codex started another thread instead of the one asked for.
                outcome.agent.session_restarted = true;
            }
            outcome.agent.session_turns = if outcome.agent.session_restarted {
                Some(1)
            } else {
                req.cli_session
                    .as_ref()
                    .and_then(|s| s.turns)
                    .map(|n| n + 1)
            };
            if outcome.agent.session_restarted {
                tracing::warn!(
                    execution_id = %req.execution_id,
                    session_id = %req.session_id,
                    runtime = self.name(),
                    thread,
                    "Codex no longer has the session's thread; the turn started a fresh one without the earlier context"
                );
            }
            outcome
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::sessions::CliSession;

    const U: &str = "123e4567-e89b-12d3-a456-426614174000";

    fn limits() -> ChildLimits {
        ChildLimits {
            stdout_cap: 1024,
            stderr_cap: 1024,
            kill_grace: Duration::from_millis(100),
            pipe_drain: Duration::from_millis(100),
        }
    }

    fn request(kind: ExecutionKind, exists: Option<bool>) -> RunRequest {
        RunRequest {
            execution_id: "e1".into(),
            session_id: "s".into(),
            kind,
            prompt: "do it".into(),
            timeout: Duration::from_secs(5),
            cli_session: exists.map(|exists| CliSession {
                id: U.into(),
                exists,
                agent_id: None,
                turns: None,
            }),
            transcript: None,
        }
    }

    fn chat_flag(req: &RunRequest) -> Option<SessionFlag> {
        req.cli_session.as_ref().map(SessionFlag::for_session)
    }

    #[test]
    fn command_substitutes_prompt_and_leaves_stdin_empty() {
        let rt = CommandRuntime::new(
            vec!["agent".into(), "--ask={prompt}".into(), "-v".into()],
            limits(),
        );
        let cmd = rt.command("hi there");
        assert_eq!(cmd.program, "agent");
        assert_eq!(cmd.args, vec!["--ask=hi there", "-v"]);
        assert_eq!(cmd.stdin, None);
    }

    #[test]
    fn command_without_placeholder_sends_prompt_on_stdin() {
        let rt = CommandRuntime::new(vec!["cat".into()], limits());
        let cmd = rt.command("hi");
        assert!(cmd.args.is_empty());
        assert_eq!(cmd.stdin.as_deref(), Some(&b"hi"[..]));
    }

    #[test]
    fn claude_chat_resumes_an_existing_session() {
        let rt = ClaudeCode::new(
            "claude".into(),
            vec!["--model".into(), "opus".into()],
            None,
            limits(),
        );
        let req = request(ExecutionKind::Chat, Some(true));
        let cmd = rt.command(&req, chat_flag(&req));
        assert_eq!(
            cmd.args,
            vec![
                "--print",
                "--output-format",
                "stream-json",
                "--verbose",
                "--resume",
                U,
                "--model",
                "opus"
            ]
        );
        assert_eq!(cmd.stdin.as_deref(), Some(&b"do it"[..]));
    }

    #[test]
    fn claude_first_chat_turn_creates_the_session_by_id() {
        let rt = ClaudeCode::new("claude".into(), vec![], None, limits());
        let req = request(ExecutionKind::Chat, Some(false));
        let cmd = rt.command(&req, chat_flag(&req));
        assert_eq!(&cmd.args[4..], &["--session-id", U]);
        // The recovery retry swaps the flag, same id.
        let cmd = rt.command(&req, Some(SessionFlag::Resume));
        assert_eq!(&cmd.args[4..], &["--resume", U]);
    }

    #[test]
    fn claude_task_gets_a_fresh_session_each_time() {
        let rt = ClaudeCode::new("claude".into(), vec![], Some("be brief".into()), limits());
        let req = request(ExecutionKind::Task, None);
        let a = rt.command(&req, None);
        let b = rt.command(&req, None);
        assert_eq!(a.args[4], "--session-id");
        assert!(uuid::Uuid::parse_str(&a.args[5]).is_ok());
        assert_ne!(a.args[5], b.args[5]);
        assert_eq!(&a.args[6..], &["--append-system-prompt", "be brief"]);
    }

    #[test]
    fn gemini_skips_trust_names_its_session_and_prepends_system_prompt() {
        let rt = Gemini::new(
            "gemini".into(),
            vec!["-m".into(), "flash".into()],
            Some("You are terse.".into()),
            limits(),
        );
        let req = request(ExecutionKind::Chat, Some(false));
        let cmd = rt.command(&req, chat_flag(&req));
        assert_eq!(
            cmd.args,
            vec![
                "--output-format",
                "stream-json",
                "--skip-trust",
                "--session-id",
                U,
                "-m",
                "flash"
            ]
        );
        assert_eq!(cmd.stdin.as_deref(), Some(&b"You are terse.\n\ndo it"[..]));
        let req = request(ExecutionKind::Chat, Some(true));
        assert_eq!(
            &rt.command(&req, chat_flag(&req)).args[3..5],
            &["--resume", U]
        );
        let task = rt.command(&request(ExecutionKind::Task, None), None);
        assert_eq!(
            task.args,
            vec![
                "--output-format",
                "stream-json",
                "--skip-trust",
                "-m",
                "flash"
            ]
        );
    }

    fn runtime_config(kind: RuntimeKind) -> RuntimeConfig {
        RuntimeConfig {
            kind,
            command: vec![],
            claude_bin: "agentd-no-such-claude".into(),
            claude_args: vec![],
            gemini_bin: "sh".into(),
            gemini_args: vec![],
            codex_bin: "agentd-no-such-codex".into(),
            codex_args: vec![],
            codex_sandbox: CodexSandbox::WorkspaceWrite,
            codex_home: std::env::temp_dir().join("codex"),
            codex_home_default: true,
            acp_command: vec![],
            acp_max_agents: 1,
            acp_idle: Duration::from_secs(60),
            acp_permissions: crate::config::PermissionPolicy::Deny,
            acp_permission_timeout: Duration::from_secs(1),
            system_prompt: None,
            default_timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(1),
            stdout_cap: 1024,
            stderr_cap: 1024,
            kill_grace: Duration::ZERO,
            pipe_drain: Duration::ZERO,
            workdir: std::env::temp_dir(),
        }
    }

    #[test]
    fn check_available_names_a_missing_command() {
        let mut cfg = runtime_config(RuntimeKind::ClaudeCode);
        assert_eq!(
            check_available(&cfg),
            Err("runtime command not found: agentd-no-such-claude".into())
        );
        cfg.kind = RuntimeKind::Gemini;
        assert_eq!(check_available(&cfg), Ok(()));
        cfg.kind = RuntimeKind::Echo;
        assert_eq!(check_available(&cfg), Ok(()));
    }

    #[test]
    fn children_run_in_the_work_directory() {
        let mut cfg = runtime_config(RuntimeKind::Command);
        cfg.command = vec!["./agent.sh".into()];
        let rt = CommandRuntime {
            argv: vec![absolute_program("./agent.sh")],
            limits: limits(),
            workdir: Some(cfg.workdir.clone()),
        };
        let cmd = rt.command("x");
        assert_eq!(cmd.cwd.as_deref(), Some(cfg.workdir.as_path()));
        // A relative program is resolved where agentd runs, not in the workdir.
        let here = std::env::current_dir().unwrap().join("agent.sh");
        assert_eq!(cmd.program, here.display().to_string());
        assert_eq!(absolute_program("claude"), "claude");
        assert_eq!(absolute_program("/usr/bin/claude"), "/usr/bin/claude");
    }

    #[test]
    fn workdir_is_created_private_and_a_file_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("a/workspace");
        prepare_workdir(&work).unwrap();
        let mode = std::fs::metadata(&work).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(prepare_workdir(&file), Err("not a directory".into()));
    }

    #[test]
    fn runtime_report_renders_name_command_and_version() {
        let cfg = runtime_config(RuntimeKind::Gemini);
        let report = RuntimeReport::new(&cfg);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"name": "gemini", "command": "sh", "runnable": true, "version": null})
        );
        report.set_version("0.61.0".into());
        report.set_version("ignored".into());
        assert_eq!(serde_json::to_value(&report).unwrap()["version"], "0.61.0");
        let echo =
            serde_json::to_value(RuntimeReport::new(&runtime_config(RuntimeKind::Echo))).unwrap();
        assert_eq!(echo["command"], serde_json::Value::Null);
        assert_eq!(echo["runnable"], true);
    }

    fn codex_request(kind: ExecutionKind, thread: Option<&str>) -> RunRequest {
        let mut req = request(kind, thread.map(|_| true));
        if let Some(session) = req.cli_session.as_mut() {
            session.agent_id = thread.map(str::to_owned);
        }
        req
    }

    #[test]
    fn codex_runs_exec_json_and_resumes_the_recorded_thread_after_every_flag() {
        let mut rt = Codex::new("codex".into(), vec!["-m".into(), "gpt-5".into()], limits());
        rt.workdir = Some(PathBuf::from("/srv/ws"));
        rt.home = Some(PathBuf::from("/var/lib/agentd/codex"));
        let first = codex_request(ExecutionKind::Chat, None);
        assert_eq!(Codex::thread_of(&first), None);
        let cmd = rt.command(&first, Codex::thread_of(&first));
        assert_eq!(
            cmd.args,
            vec![
                "exec",
                "--json",
                "--skip-git-repo-check",
                "-C",
                "/srv/ws",
                "-s",
                "workspace-write",
                "-m",
                "gpt-5",
                "-"
            ]
        );
        assert_eq!(cmd.stdin.as_deref(), Some(&b"do it"[..]));
        assert_eq!(
            cmd.env,
            vec![(
                "CODEX_HOME",
                std::ffi::OsString::from("/var/lib/agentd/codex")
            )]
        );
        assert!(!cmd.args.iter().any(|a| a == "--full-auto"));
        let later = codex_request(ExecutionKind::Chat, Some("019a-t"));
        let cmd = rt.command(&later, Codex::thread_of(&later));
        assert_eq!(&cmd.args[7..], &["-m", "gpt-5", "resume", "019a-t", "-"]);
        // A task never resumes anything; an operator's CODEX_HOME is left alone.
        let task = codex_request(ExecutionKind::Task, Some("019a-t"));
        assert_eq!(Codex::thread_of(&task), None);
        rt.home = None;
        assert!(rt.command(&task, None).env.is_empty());
    }

    #[test]
    fn codex_lost_thread_reads_only_a_failed_exit() {
        let mut outcome = RunOutcome::completed(String::new());
        outcome.end = RunEnd::Exited { code: 1 };
        outcome.stderr_tail = "Error: thread not found: 019a".into();
        assert!(codex_lost_thread(&outcome));
        outcome.stderr_tail = "unexpected status 500".into();
        assert!(!codex_lost_thread(&outcome));
        outcome.stderr_tail = "thread not found".into();
        outcome.end = RunEnd::TimedOut;
        assert!(!codex_lost_thread(&outcome));
    }

    #[test]
    fn gemini_workspace_settings_turn_retention_off_and_keep_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = runtime_config(RuntimeKind::Gemini);
        cfg.workdir = dir.path().join("ws");
        prepare_cli_files(&cfg).unwrap();
        let path = cfg.workdir.join(".gemini/settings.json");
        let read = || -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
        };
        assert_eq!(
            read(),
            serde_json::json!({"general": {"sessionRetention": {"enabled": false}}})
        );
        std::fs::write(
            &path,
            r#"{"model": {"name": "x"}, "general": {"sessionRetention": {"enabled": true}, "maxAttempts": 2}}"#,
        )
        .unwrap();
        prepare_cli_files(&cfg).unwrap();
        assert_eq!(
            read(),
            serde_json::json!({"model": {"name": "x"},
                "general": {"sessionRetention": {"enabled": false}, "maxAttempts": 2}})
        );
        std::fs::write(&path, "[1]").unwrap();
        let (what, at, reason) = prepare_cli_files(&cfg).unwrap_err();
        assert_eq!(
            (what, at),
            ("Gemini CLI's workspace settings", path.clone())
        );
        assert!(reason.contains("not a JSON object"), "{reason}");
        // Gemini children trust the workspace, so they read that file.
        let req = request(ExecutionKind::Chat, Some(false));
        let rt = Gemini::new("gemini".into(), vec![], None, limits());
        assert_eq!(
            rt.command(&req, chat_flag(&req)).env,
            vec![(GEMINI_TRUST_ENV, std::ffi::OsString::from("true"))]
        );
    }

    #[test]
    fn codex_home_is_created_private_when_it_is_the_default() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = runtime_config(RuntimeKind::Codex);
        cfg.codex_home = dir.path().join("state/codex");
        prepare_cli_files(&cfg).unwrap();
        let mode = std::fs::metadata(&cfg.codex_home)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        cfg.codex_home = dir.path().join("operator-home");
        cfg.codex_home_default = false;
        prepare_cli_files(&cfg).unwrap();
        assert!(
            !cfg.codex_home.exists(),
            "an operator's CODEX_HOME is not created"
        );
    }
}
