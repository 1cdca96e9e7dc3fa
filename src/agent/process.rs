//! Spawning and supervising one agent child process, with every wait bounded.
//!
//! This is the only place agentd forks. It owns the child's lifecycle: process
//! group, scrubbed environment (no supervisor variable, no `AGENTD_*` but the
//! execution's id), stdin delivery, capped stdout/stderr reading,
//! timeout and cancellation (SIGINT → SIGTERM → SIGKILL to the group), and the
//! final reap. It does not build argv (that is `runtimes`) and does not decide
//! what an outcome means (that is `classify`).
//!
//! Invariants:
//! * The child leads its own process group (pgid = pid, recorded at spawn), so
//!   signals reach everything it started without touching agentd.
//! * The child starts with every signal at its default action and an empty
//!   signal mask, whatever agentd inherited (`nohup` and background jobs
//!   start it with SIGINT and SIGQUIT ignored), so SIGINT-first termination
//!   works wherever agentd was started.
//! * When `run_child` returns, the group has been sent SIGKILL (stragglers do
//!   not outlive their execution) and its members reaped, every process
//!   still carrying the execution's `AGENTD_EXECUTION_ID` (a `setsid` escapee
//!   that left the group) has been SIGKILLed, waited for and reaped, all
//!   bounded by `EXECUTION_SWEEP_BOUND`, so no zombie is left; the child has
//!   been reaped or handed to tokio's orphan reaper, and every pipe is closed.
//!   What had to be killed is reported in `RunOutcome::cleanup`. Nothing is spawned onto the
//!   runtime: stdin, stdout and stderr are futures polled inside the caller's
//!   task, so no task, thread or descriptor can outlive the call.
//! * Dropping the future early (executor shutdown) SIGKILLs the group too.
//! * Pipes are never left unread while the child runs (excess output is read
//!   and dropped), so a chatty child cannot block on a full pipe.
//! * After the child exits, pipes are drained for at most `pipe_drain`: a
//!   grandchild that escaped the group with the pipe open cannot hold the
//!   execution.

use std::io;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::time::{timeout, Instant};

use crate::agent::runtime::{Cleanup, ExecutionContext, RunEnd, RunOutcome, RunRequest};
use crate::agent::streamjson::StreamParser;
use crate::config::RuntimeConfig;
use crate::init::reaper::{self, EXECUTION_SWEEP_BOUND};

/// Variables through which the supervisor talks to agentd; a child must not
/// see them (it could pet the watchdog or take the listener). One list, kept
/// by the init room.
pub use crate::init::SUPERVISOR_ENV_VARS as SCRUBBED_ENV;

/// Set in every child so an agent (or a hook it runs) can name its execution.
pub const EXECUTION_ID_ENV: &str = "AGENTD_EXECUTION_ID";

/// Bytes read from a pipe at a time: the default Linux pipe capacity, so one
/// read usually empties the pipe.
const READ_CHUNK: usize = 64 * 1024;

/// How long to wait for the kernel to finish a SIGKILLed child before giving it
/// to tokio's orphan reaper. SIGKILL cannot be refused, but a process in
/// uninterruptible sleep (a hung NFS read) only dies when that sleep ends; the
/// execution must not wait for that.
pub const REAP_AFTER_KILL: Duration = Duration::from_secs(5);

/// What to run: argv and what to write to stdin.
#[derive(Debug, Clone)]
pub struct ChildCommand {
    pub program: String,
    pub args: Vec<String>,
    /// Written to stdin, which is then closed; `None` gives the child
    /// `/dev/null` as stdin.
    pub stdin: Option<Vec<u8>>,
    /// Working directory of the child (`AGENTD_WORKDIR`); `None` keeps agentd's.
    pub cwd: Option<std::path::PathBuf>,
    /// Variables set for this child on top of agentd's (scrubbed) environment.
    pub env: Vec<(&'static str, std::ffi::OsString)>,
}

/// The bounds applied to one child; taken from `RuntimeConfig`.
#[derive(Debug, Clone, Copy)]
pub struct ChildLimits {
    pub stdout_cap: usize,
    pub stderr_cap: usize,
    pub kill_grace: Duration,
    pub pipe_drain: Duration,
}

impl ChildLimits {
    pub fn from_config(cfg: &RuntimeConfig) -> Self {
        ChildLimits {
            stdout_cap: cfg.stdout_cap,
            stderr_cap: cfg.stderr_cap,
            kill_grace: cfg.kill_grace,
            pipe_drain: cfg.pipe_drain,
        }
    }
}

/// Remove the supervisor's variables (see `SCRUBBED_ENV`) and every variable
/// of agentd's own (`AGENTD_*`: the API token, the path of its file, every
/// setting) from a child's environment, and name the execution. Call it
/// before setting the child's own variables: it removes agentd's by name,
/// whatever set them.
///
/// `AGENTD_EXECUTION_ID` is the only `AGENTD_` variable a child sees, set
/// here to its execution (an agentd started by another agentd must not pass
/// its own tag on); the end-of-execution sweep finds escapees by it.
pub fn scrub_env(cmd: &mut Command, execution_id: &str) {
    for name in SCRUBBED_ENV {
        cmd.env_remove(name);
    }
    for (name, _) in std::env::vars_os() {
        if crate::config::is_own_variable(&name) {
            cmd.env_remove(name);
        }
    }
    cmd.env(EXECUTION_ID_ENV, execution_id);
}

/// Give the child default signal dispositions and an empty signal mask.
///
/// A disposition of "ignore" survives `exec`; a handler does not. agentd
/// installs handlers for the signals it uses, but whatever it inherited as
/// ignored (SIGINT and SIGQUIT under `nohup` or `&`, anything a parent set)
/// would otherwise reach every agent, which then shrugs off the SIGINT that
/// stops it and waits out the grace period.
pub fn start_with_default_signals(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe system calls (rt_sigaction, sigprocmask) on stack
    // values; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            // The kernel's `struct sigaction`, all zero: SIG_DFL, no flags, an
            // empty mask. The raw call also reaches the C library's reserved
            // real-time signals, whose wrapper refuses them (an ignored
            // signal 32 or 33 is inherited like any other).
            let default = [0u64; 4];
            for sig in 1..=64 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    // EINVAL past the kernel's last signal is expected.
                    libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig,
                        default.as_ptr(),
                        std::ptr::null_mut::<u64>(),
                        8usize,
                    );
                }
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
}

/// Why supervision stopped waiting for the child on its own.
#[derive(Debug, Clone, Copy, PartialEq)]
enum StopReason {
    TimedOut,
    Cancelled,
}

/// Run one child to completion, timeout or cancellation and report what
/// happened. Never panics on spawn failure; see the module invariants.
///
/// Longest possible duration: `req.timeout + 2 * kill_grace + REAP_AFTER_KILL
/// + pipe_drain + EXECUTION_SWEEP_BOUND`.
pub async fn run_child(
    command: ChildCommand,
    req: &RunRequest,
    ctx: &ExecutionContext,
    limits: ChildLimits,
) -> RunOutcome {
    let deadline = Instant::now() + req.timeout;
    if ctx.cancel.is_cancelled() {
        return outcome_without_output(RunEnd::Cancelled);
    }

    let mut cmd = Command::new(&command.program);
    cmd.args(&command.args)
        .process_group(0)
        .stdin(if command.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Backstop only: `GroupGuard` kills the whole group first.
        .kill_on_drop(true);
    if let Some(cwd) = &command.cwd {
        cmd.current_dir(cwd);
    }
    scrub_env(&mut cmd, &req.execution_id);
    cmd.envs(command.env.iter().map(|(k, v)| (k, v)));
    start_with_default_signals(&mut cmd);

    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(err) => {
            tracing::warn!(
                execution_id = %req.execution_id,
                command = %command.program,
                error = %err,
                "cannot start agent"
            );
            return outcome_without_output(RunEnd::SpawnFailed {
                command: command.program,
                reason: spawn_error_reason(&err),
            });
        }
    };
    let Some(pid) = child.id() else {
        // Only possible once the child was reaped, which nothing has done yet.
        return outcome_without_output(RunEnd::SpawnFailed {
            command: command.program,
            reason: "exited before its pid could be read".into(),
        });
    };
    // process_group(0): the pgid is the pid. The value stays after the run so
    // callers can still name the group in logs.
    ctx.pid.store(pid, Ordering::Relaxed);
    // tokio collects this child's exit status; the orphan reaper must not.
    let _tracked = reaper::track_child(pid);
    // Everything tagged with this execution descends from the child, so the
    // end-of-run sweep need not read older processes' environments.
    let started = reaper::read_stat(pid).map(|s| s.start_time);
    let group = GroupGuard::new(pid, &req.execution_id, started);
    tracing::debug!(execution_id = %req.execution_id, pid, "agent started");

    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();

    let mut parser = StreamParser::new(limits.stdout_cap);
    // Every stdout byte read; gates the replay buffer at the cap.
    let mut stdout_bytes: u64 = 0;
    let mut stderr_tail = TailBuffer::new(limits.stderr_cap);
    let mut utf8 = Utf8Carry::default();

    let end = {
        let io = async {
            tokio::join!(
                write_stdin(stdin, command.stdin),
                read_stdout(
                    stdout,
                    &mut parser,
                    &mut stdout_bytes,
                    &mut utf8,
                    ctx,
                    limits
                ),
                read_stderr(stderr, &mut stderr_tail),
            )
        };
        let supervise = supervise(&mut child, &group, deadline, ctx, limits.kill_grace);
        tokio::pin!(io);
        tokio::pin!(supervise);

        // Poll both: output must keep flowing while we wait for the child and
        // while it handles SIGINT/SIGTERM, or it could block on a full pipe.
        let mut io_done = false;
        let end = loop {
            tokio::select! {
                end = &mut supervise => break end,
                _ = &mut io, if !io_done => io_done = true,
            }
        };
        // The child is gone. Kill the rest of its group, let whoever still
        // holds the pipes (an escaped grandchild) have `pipe_drain` to finish
        // its output, then kill every process still tagged with this
        // execution (a `setsid` escapee left the group), and reap all of
        // them: the answer goes out with no process and no zombie left.
        group.kill_remaining();
        if !io_done && timeout(limits.pipe_drain, &mut io).await.is_err() {
            tracing::debug!(
                execution_id = %req.execution_id,
                pid,
                "pipes still open after the agent exited; closing them"
            );
        }
        let sweep_deadline = Instant::now() + EXECUTION_SWEEP_BOUND;
        let escapees = reaper::kill_tagged(
            EXECUTION_ID_ENV,
            &req.execution_id,
            started,
            Some(group.pgid),
            sweep_deadline,
        )
        .await;
        let (group_killed, group_left) =
            reaper::kill_and_reap_group(group.pgid, sweep_deadline).await;
        let (end, stopped_with) = end;
        let cleanup = Cleanup {
            stopped_with,
            group_killed,
            escapees_killed: escapees.killed,
            survivors: escapees.left.len() as u32 + u32::from(group_left),
        };
        if cleanup.group_killed + cleanup.escapees_killed > 0 {
            tracing::info!(
                execution_id = %req.execution_id,
                pid,
                group_killed,
                escapees_killed = escapees.killed,
                "killed what the agent left running"
            );
        }
        (end, cleanup)
        // `io` is dropped here, closing stdin/stdout/stderr.
    };
    let (end, cleanup) = end;

    let parsed = parser.finish();
    RunOutcome {
        end,
        text: parsed.text,
        result: parsed.result,
        // Answer text was cut. Stream-json events that are not part of the
        // answer (tool calls, init) are parsed and dropped by design; bytes
        // spent on them do not make the answer "truncated".
        stdout_truncated: parsed.truncated,
        stderr_truncated: stderr_tail.is_truncated(),
        stderr_tail: stderr_tail.into_string(),
        agent: parsed.agent,
        cleanup,
    }
}

fn outcome_without_output(end: RunEnd) -> RunOutcome {
    RunOutcome::ended(end)
}

/// Short, stable reasons for the common spawn errors ("not found" is matched
/// by `classify` to say "runtime command not found: <cmd>").
pub fn spawn_error_reason(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::NotFound => "not found".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => err.to_string(),
    }
}

/// Wait for the child to exit; on timeout or cancel, stop the group and reap.
/// Returns how it ended and, when agentd stopped it, the last signal sent.
async fn supervise(
    child: &mut Child,
    group: &GroupGuard,
    deadline: Instant,
    ctx: &ExecutionContext,
    grace: Duration,
) -> (RunEnd, Option<i32>) {
    let reason = tokio::select! {
        status = child.wait() => return (exit_end(status), None),
        _ = tokio::time::sleep_until(deadline) => StopReason::TimedOut,
        _ = ctx.cancel.cancelled() => StopReason::Cancelled,
    };
    let signal = stop_group(child, group, grace).await;
    let end = match reason {
        StopReason::TimedOut => RunEnd::TimedOut,
        StopReason::Cancelled => RunEnd::Cancelled,
    };
    (end, Some(signal as i32))
}

/// SIGINT (agent CLIs save their session on it), then SIGTERM, then SIGKILL,
/// each to the whole group, with `grace` for the child to exit in between.
/// Returns once the child is reaped, or after `REAP_AFTER_KILL` at worst,
/// with the signal after which it exited.
async fn stop_group(child: &mut Child, group: &GroupGuard, grace: Duration) -> Signal {
    stop_child_group(child, group.pgid, grace).await
}

/// `stop_group` for a child that leads process group `pgid` (the ACP
/// runtime's long-lived agents use it too).
pub async fn stop_child_group(child: &mut Child, pgid: i32, grace: Duration) -> Signal {
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // ESRCH (group already empty) is the expected way for this to fail.
        let _ = killpg(Pid::from_raw(pgid), signal);
        if timeout(grace, child.wait()).await.is_ok() {
            return signal;
        }
    }
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    if timeout(REAP_AFTER_KILL, child.wait()).await.is_err() {
        // Dropping the `Child` (kill_on_drop) hands it to tokio's orphan
        // reaper, which collects it whenever the kernel lets it die.
        tracing::warn!(
            pgid,
            "agent did not die within {REAP_AFTER_KILL:?} of SIGKILL; leaving it to the reaper"
        );
    }
    Signal::SIGKILL
}

pub fn exit_end(status: io::Result<ExitStatus>) -> RunEnd {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => RunEnd::Exited { code },
            (None, Some(signal)) => RunEnd::Signaled { signal },
            (None, None) => RunEnd::Exited { code: -1 },
        },
        // waitpid failed: the child is not ours to wait for any more. Report it
        // like an abnormal exit rather than pretending success.
        Err(err) => {
            tracing::warn!(error = %err, "cannot wait for agent");
            RunEnd::Exited { code: -1 }
        }
    }
}

/// The child's process group. SIGKILLs the group, and every process tagged
/// with the execution's id, when dropped while armed, so an execution future
/// dropped mid-run leaves nothing behind.
struct GroupGuard {
    pgid: i32,
    /// `AGENTD_EXECUTION_ID=<id>`, the tag the drop path sweeps for.
    tag: Vec<u8>,
    /// The child's start time: tagged processes are no older.
    started: Option<u64>,
    /// Cleared once the group was swept after the child was reaped. Interior
    /// mutability because the supervising future holds a shared borrow
    /// meanwhile; atomic only so the execution future stays `Send`.
    armed: AtomicBool,
}

impl GroupGuard {
    fn new(pid: u32, execution_id: &str, started: Option<u64>) -> Self {
        GroupGuard {
            pgid: pid as i32,
            tag: format!("{EXECUTION_ID_ENV}={execution_id}").into_bytes(),
            started,
            armed: AtomicBool::new(true),
        }
    }

    fn signal(&self, signal: Signal) {
        // ESRCH (group already empty) is the expected way for this to fail.
        let _ = killpg(Pid::from_raw(self.pgid), signal);
    }

    /// SIGKILL whatever is left of the group after the leader exited, once.
    ///
    /// The leader is reaped by now, so its pid could in principle be reused —
    /// but the kernel never hands out a pid that is still some process's pgid,
    /// so while any member remains the number is ours; and when none remains
    /// the signal would only reach a newcomer that made itself a group leader
    /// with exactly this id in the microseconds since the reap.
    fn kill_remaining(&self) {
        if self.armed.swap(false, Ordering::Relaxed) {
            self.signal(Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed.load(Ordering::Relaxed) {
            self.kill_remaining();
            // Nothing can be awaited here: one synchronous pass, no waiting for
            // the killed to die (the orphan reaper or init collects them).
            // The group itself was SIGKILLed just above.
            reaper::kill_tagged_once(
                &self.tag,
                self.started,
                Some(self.pgid),
                &mut Default::default(),
            );
        }
    }
}

/// Write the prompt and close stdin. Runs concurrently with the readers, so a
/// child that never reads stdin cannot stall anything: the write either
/// finishes, fails with EPIPE when the child exits, or is dropped at the end.
async fn write_stdin(stdin: Option<ChildStdin>, input: Option<Vec<u8>>) {
    let (Some(mut stdin), Some(input)) = (stdin, input) else {
        return;
    };
    // EPIPE just means the child did not want (all of) its input.
    let _ = stdin.write_all(&input).await;
    let _ = stdin.shutdown().await;
}

/// Read stdout to EOF: every byte is counted, fed to the parser (which caps
/// what it keeps) and, while within the cap, appended to the replay buffer.
async fn read_stdout(
    stdout: Option<impl AsyncRead + Unpin>,
    parser: &mut StreamParser,
    total: &mut u64,
    utf8: &mut Utf8Carry,
    ctx: &ExecutionContext,
    limits: ChildLimits,
) {
    let Some(mut stdout) = stdout else { return };
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = match stdout.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        *total += n as u64;
        parser.feed(chunk);
        // Subscribers see the same capped stream the response is built from;
        // a flood past the cap is not worth a replay allocation per chunk.
        // The push never waits for a subscriber.
        if *total <= limits.stdout_cap as u64 {
            ctx.output.push(utf8.decode(chunk));
        }
    }
}

/// Read stderr to EOF, keeping only the tail.
async fn read_stderr(stderr: Option<impl AsyncRead + Unpin>, tail: &mut TailBuffer) {
    let Some(mut stderr) = stderr else { return };
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => tail.push(&buf[..n]),
        }
    }
}

/// The last `cap` bytes of a stream. Grows to at most twice the cap before
/// compacting, so keeping the tail of a long stream costs amortised O(1) per
/// byte instead of a memmove of the whole buffer per chunk.
#[derive(Debug)]
struct TailBuffer {
    buf: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl TailBuffer {
    fn new(cap: usize) -> Self {
        TailBuffer {
            buf: Vec::new(),
            cap,
            truncated: false,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if bytes.len() >= self.cap {
            self.truncated |= !self.buf.is_empty() || bytes.len() > self.cap;
            self.buf.clear();
            self.buf.extend_from_slice(&bytes[bytes.len() - self.cap..]);
            return;
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > 2 * self.cap {
            let excess = self.buf.len() - self.cap;
            self.buf.drain(..excess);
            self.truncated = true;
        }
    }

    fn is_truncated(&self) -> bool {
        self.truncated || self.buf.len() > self.cap
    }

    fn into_string(self) -> String {
        let start = self.buf.len().saturating_sub(self.cap);
        let truncated = self.is_truncated();
        let tail = &self.buf[start..];
        // A cut tail may begin inside a character; skip its continuation bytes
        // rather than starting with a replacement character.
        let tail = if truncated {
            let skip = tail
                .iter()
                .take(3)
                .take_while(|&&b| b & 0xC0 == 0x80)
                .count();
            &tail[skip..]
        } else {
            tail
        };
        String::from_utf8_lossy(tail).into_owned()
    }
}

/// Decodes a byte stream chunk by chunk without splitting characters: an
/// incomplete character at the end of a chunk is carried into the next.
#[derive(Debug, Default)]
struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    fn decode(&mut self, chunk: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.pending);
        bytes.extend_from_slice(chunk);
        match std::str::from_utf8(&bytes) {
            Ok(s) => s.to_owned(),
            Err(e) if e.error_len().is_none() => {
                // Incomplete sequence at the end (at most 3 bytes): keep it.
                let valid = e.valid_up_to();
                self.pending = bytes[valid..].to_vec();
                String::from_utf8_lossy(&bytes[..valid]).into_owned()
            }
            Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_buffer_keeps_the_last_bytes() {
        let mut tail = TailBuffer::new(8);
        for chunk in [&b"0123"[..], b"4567", b"89ab", b"cdef", b"gh"] {
            tail.push(chunk);
        }
        assert!(tail.is_truncated());
        assert_eq!(tail.into_string(), "abcdefgh");
    }

    #[test]
    fn tail_buffer_under_cap_is_untouched() {
        let mut tail = TailBuffer::new(64);
        tail.push(b"error: boom\n");
        assert!(!tail.is_truncated());
        assert_eq!(tail.into_string(), "error: boom\n");
    }

    #[test]
    fn tail_buffer_with_one_huge_chunk() {
        let mut tail = TailBuffer::new(4);
        tail.push(b"abcdefgh");
        assert!(tail.is_truncated());
        assert_eq!(tail.into_string(), "efgh");
    }

    #[test]
    fn utf8_carry_never_splits_a_character() {
        let mut carry = Utf8Carry::default();
        let bytes = "aé€".as_bytes();
        let mut out = String::new();
        for b in bytes {
            out.push_str(&carry.decode(std::slice::from_ref(b)));
        }
        assert_eq!(out, "aé€");
    }

    #[tokio::test]
    async fn scrub_env_removes_supervisor_variables() {
        let mut cmd = Command::new("env");
        cmd.env("NOTIFY_SOCKET", "/run/systemd/notify")
            .env("WATCHDOG_USEC", "30000000")
            .env("LISTEN_FDS", "1")
            .env("KEEP_ME", "yes");
        scrub_env(&mut cmd, "exec-1");
        let out = cmd.output().await.unwrap();
        let env = String::from_utf8(out.stdout).unwrap();
        for name in SCRUBBED_ENV {
            assert!(!env.contains(&format!("{name}=")), "{name} leaked: {env}");
        }
        assert!(env.contains("KEEP_ME=yes"));
        assert!(env.contains("AGENTD_EXECUTION_ID=exec-1"));
    }
}
