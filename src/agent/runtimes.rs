//! The subprocess runtimes — `command` (any argv), `claude-code` and `gemini` —
//! and `build_runtime`, which picks one (or the built-in `echo`) from config.
//!
//! Each runtime only decides argv and what goes on stdin; spawning, limits,
//! signals and output parsing are all `process::run_child`. Nothing here
//! classifies outcomes (that is `classify`).

use std::path::Path;
use std::sync::Arc;

use crate::agent::process::{run_child, ChildCommand, ChildLimits};
use crate::agent::runtime::{
    Echo, ExecutionContext, ExecutionKind, RunFuture, RunRequest, Runtime,
};
use crate::config::{RuntimeConfig, RuntimeKind};

/// The placeholder a `command` argument may contain; the prompt replaces it
/// and stdin is then left empty.
pub const PROMPT_PLACEHOLDER: &str = "{prompt}";

/// The runtime the configuration names.
pub fn build_runtime(cfg: &RuntimeConfig) -> Arc<dyn Runtime> {
    let limits = ChildLimits::from_config(cfg);
    match cfg.kind {
        RuntimeKind::Echo => Arc::new(Echo),
        RuntimeKind::Command => Arc::new(CommandRuntime {
            argv: cfg.command.clone(),
            limits,
        }),
        RuntimeKind::ClaudeCode => Arc::new(ClaudeCode {
            bin: cfg.claude_bin.clone(),
            args: cfg.claude_args.clone(),
            system_prompt: cfg.system_prompt.clone(),
            limits,
        }),
        RuntimeKind::Gemini => Arc::new(Gemini {
            bin: cfg.gemini_bin.clone(),
            args: cfg.gemini_args.clone(),
            system_prompt: cfg.system_prompt.clone(),
            limits,
        }),
    }
}

/// Startup check that the configured runtime's program can be executed, so a
/// missing CLI is a warning in the log at start rather than a surprise on the
/// first request. `Err` is the warning text ("runtime command not found:
/// claude"). Not fatal: the CLI may be installed later.
pub fn check_available(cfg: &RuntimeConfig) -> Result<(), String> {
    let program = match cfg.kind {
        RuntimeKind::Echo => return Ok(()),
        RuntimeKind::Command => match cfg.command.first() {
            Some(program) => program.as_str(),
            None => return Err("the command runtime has no command".into()),
        },
        RuntimeKind::ClaudeCode => cfg.claude_bin.as_str(),
        RuntimeKind::Gemini => cfg.gemini_bin.as_str(),
    };
    if is_executable_on_path(program) {
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

/// Any argv. The prompt replaces `{prompt}` wherever an argument contains it;
/// with no placeholder it goes on stdin. Output is plain text unless the
/// program speaks stream-json.
#[derive(Debug, Clone)]
pub struct CommandRuntime {
    argv: Vec<String>,
    limits: ChildLimits,
}

impl CommandRuntime {
    pub fn new(argv: Vec<String>, limits: ChildLimits) -> Self {
        CommandRuntime { argv, limits }
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

/// Claude Code in print mode with stream-json output; the prompt on stdin.
#[derive(Debug, Clone)]
pub struct ClaudeCode {
    bin: String,
    args: Vec<String>,
    /// Passed as `--append-system-prompt`: Claude Code has a flag for it, so
    /// it is not mixed into the prompt.
    system_prompt: Option<String>,
    limits: ChildLimits,
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
        }
    }

    fn command(&self, req: &RunRequest) -> ChildCommand {
        let mut args: Vec<String> = ["--print", "--output-format", "stream-json", "--verbose"]
            .map(String::from)
            .to_vec();
        match req.kind {
            // A chat continues its session; the first turn names it, but Claude
            // Code only accepts a UUID there, so other ids start an anonymous one.
            ExecutionKind::Chat if req.resume => {
                args.extend(["--resume".into(), req.session_id.clone()]);
            }
            ExecutionKind::Chat => {
                if uuid::Uuid::parse_str(&req.session_id).is_ok() {
                    args.extend(["--session-id".into(), req.session_id.clone()]);
                }
            }
            // Headless tasks never share context with each other or the chat.
            ExecutionKind::Task => {
                args.extend(["--session-id".into(), uuid::Uuid::new_v4().to_string()]);
            }
        }
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
        }
    }
}

impl Runtime for ClaudeCode {
    fn name(&self) -> &'static str {
        "claude-code"
    }

    fn run<'a>(&'a self, req: RunRequest, ctx: &'a ExecutionContext) -> RunFuture<'a> {
        Box::pin(async move {
            let command = self.command(&req);
            run_child(command, &req, ctx, self.limits).await
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
        }
    }

    fn command(&self, req: &RunRequest) -> ChildCommand {
        let mut args: Vec<String> = ["--output-format", "stream-json"]
            .map(String::from)
            .to_vec();
        args.extend(self.args.iter().cloned());
        let input = match &self.system_prompt {
            Some(system_prompt) => format!("{system_prompt}\n\n{}", req.prompt),
            None => req.prompt.clone(),
        };
        ChildCommand {
            program: self.bin.clone(),
            args,
            stdin: Some(input.into_bytes()),
        }
    }
}

impl Runtime for Gemini {
    fn name(&self) -> &'static str {
        "gemini"
    }

    fn run<'a>(&'a self, req: RunRequest, ctx: &'a ExecutionContext) -> RunFuture<'a> {
        Box::pin(async move {
            let command = self.command(&req);
            run_child(command, &req, ctx, self.limits).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits() -> ChildLimits {
        ChildLimits {
            stdout_cap: 1024,
            stderr_cap: 1024,
            kill_grace: Duration::from_millis(100),
            pipe_drain: Duration::from_millis(100),
        }
    }

    fn request(kind: ExecutionKind, session_id: &str, resume: bool) -> RunRequest {
        RunRequest {
            execution_id: "e1".into(),
            session_id: session_id.into(),
            kind,
            prompt: "do it".into(),
            timeout: Duration::from_secs(5),
            resume,
        }
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
        let cmd = rt.command(&request(ExecutionKind::Chat, "abc", true));
        assert_eq!(
            cmd.args,
            vec![
                "--print",
                "--output-format",
                "stream-json",
                "--verbose",
                "--resume",
                "abc",
                "--model",
                "opus"
            ]
        );
        assert_eq!(cmd.stdin.as_deref(), Some(&b"do it"[..]));
    }

    #[test]
    fn claude_first_chat_turn_names_a_uuid_session_only() {
        let rt = ClaudeCode::new("claude".into(), vec![], None, limits());
        let id = "123e4567-e89b-12d3-a456-426614174000";
        let cmd = rt.command(&request(ExecutionKind::Chat, id, false));
        assert_eq!(&cmd.args[4..], &["--session-id", id]);
        let cmd = rt.command(&request(ExecutionKind::Chat, "default", false));
        assert_eq!(cmd.args.len(), 4, "{:?}", cmd.args);
    }

    #[test]
    fn claude_task_gets_a_fresh_session_each_time() {
        let rt = ClaudeCode::new("claude".into(), vec![], Some("be brief".into()), limits());
        let a = rt.command(&request(ExecutionKind::Task, "default", true));
        let b = rt.command(&request(ExecutionKind::Task, "default", true));
        assert_eq!(a.args[4], "--session-id");
        assert!(uuid::Uuid::parse_str(&a.args[5]).is_ok());
        assert_ne!(a.args[5], b.args[5]);
        assert_eq!(&a.args[6..], &["--append-system-prompt", "be brief"]);
    }

    #[test]
    fn gemini_prepends_system_prompt_to_input() {
        let rt = Gemini::new(
            "gemini".into(),
            vec!["-m".into(), "flash".into()],
            Some("You are terse.".into()),
            limits(),
        );
        let cmd = rt.command(&request(ExecutionKind::Chat, "s", false));
        assert_eq!(
            cmd.args,
            vec!["--output-format", "stream-json", "-m", "flash"]
        );
        assert_eq!(cmd.stdin.as_deref(), Some(&b"You are terse.\n\ndo it"[..]));
    }

    #[test]
    fn check_available_names_a_missing_command() {
        let mut cfg = RuntimeConfig {
            kind: RuntimeKind::ClaudeCode,
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
        };
        assert_eq!(
            check_available(&cfg),
            Err("runtime command not found: agentd-no-such-claude".into())
        );
        cfg.kind = RuntimeKind::Gemini;
        assert_eq!(check_available(&cfg), Ok(()));
        cfg.kind = RuntimeKind::Echo;
        assert_eq!(check_available(&cfg), Ok(()));
    }
}
