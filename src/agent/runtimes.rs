//! The subprocess runtimes — `command` (any argv), `claude-code` and `gemini` —
//! `build_runtime`, which picks one (or the built-in `echo`) from config, and
//! what is learned about the configured runtime once at start (its working
//! directory, whether its program is runnable, the CLI's version).
//!
//! Each runtime only decides argv, working directory and what goes on stdin;
//! spawning, limits, signals and output parsing are all `process::run_child`.
//! The two CLIs that keep sessions of their own also repair a disagreement
//! between the store and the CLI by retrying once with the other session flag
//! (rules in `sessions`). Nothing here classifies outcomes (that is `classify`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::ser::SerializeStruct;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use crate::agent::process::{run_child, scrub_env, ChildCommand, ChildLimits};
use crate::agent::runtime::{
    Echo, ExecutionContext, ExecutionKind, RunFuture, RunOutcome, RunRequest, Runtime,
};
use crate::agent::sessions::{recovery, SessionFlag};
use crate::config::{RuntimeConfig, RuntimeKind};

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
    }
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

/// `<cli> --version` for `claude-code` and `gemini` (never for `command`: an
/// arbitrary program may do anything with an unknown flag), in the work
/// directory with the children's scrubbed environment, bounded by
/// `VERSION_READ_TIMEOUT`. The first non-empty line of stdout, or `None`.
pub async fn read_version(cfg: &RuntimeConfig) -> Option<String> {
    if !matches!(cfg.kind, RuntimeKind::ClaudeCode | RuntimeKind::Gemini) {
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
    let outcome = run_child(command(flag), req, ctx, limits).await;
    let Some(flag) = flag else {
        return outcome;
    };
    let Some(retry) = recovery(flag, &outcome) else {
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
            }),
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
}
