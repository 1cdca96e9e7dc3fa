//! The runtimes driven through the library API over real child processes (the
//! fixture agents in `tests/fixtures/`): classification of every fixture,
//! prompt delivery, environment scrubbing, timeout/cancel/kill escalation on the
//! whole process group, escaped grandchildren, output caps, spawn failure, and
//! the leak proof (threads and descriptors flat over 500 executions).
//!
//! Two tests need a process of their own — one sets `NOTIFY_SOCKET` in its real
//! environment, one counts the whole process's threads and descriptors, which
//! tests running in parallel would disturb. They re-run this test binary
//! filtered to an `isolated_*` test with a marker variable set; without the
//! marker those `isolated_*` entries return at once (they are the child halves,
//! not tests on their own), and the parent asserts the child half really ran.

#[path = "common/procs.rs"]
mod procs;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd::agent::classify::{classify, NO_OUTPUT_PLACEHOLDER};
use agentd::agent::process::SCRUBBED_ENV;
use agentd::agent::runtime::{
    ExecutionContext, ExecutionKind, RunEnd, RunOutcome, RunRequest, Runtime,
};
use agentd::agent::runtimes::build_runtime;
use agentd::config::{RuntimeConfig, RuntimeKind};

const GRACE: Duration = Duration::from_millis(200);
const PIPE_DRAIN: Duration = Duration::from_millis(200);
/// Slack for process start-up and scheduling on a loaded two-core machine.
/// These bounds only tell "finished" from "hung"; every grandchild the tests
/// start holds its pipe longer than `PIPE_DRAIN + MARGIN`.
const MARGIN: Duration = Duration::from_secs(20);
const LONG: Duration = Duration::from_secs(30);

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn config(kind: RuntimeKind) -> RuntimeConfig {
    RuntimeConfig {
        kind,
        command: Vec::new(),
        claude_bin: "claude".into(),
        claude_args: Vec::new(),
        gemini_bin: "gemini".into(),
        gemini_args: Vec::new(),
        codex_bin: "codex".into(),
        codex_args: Vec::new(),
        codex_sandbox: agentd::config::CodexSandbox::WorkspaceWrite,
        codex_home: std::env::temp_dir().join("agentd-test-codex"),
        codex_home_default: false,
        acp_command: Vec::new(),
        acp_max_agents: 1,
        acp_idle: LONG,
        acp_permissions: agentd::config::PermissionPolicy::Deny,
        acp_permission_timeout: LONG,
        system_prompt: None,
        default_timeout: LONG,
        max_timeout: LONG,
        stdout_cap: 1 << 20,
        stderr_cap: 64 << 10,
        kill_grace: GRACE,
        pipe_drain: PIPE_DRAIN,
        workdir: std::env::temp_dir(),
    }
}

fn command(argv: &[&str]) -> RuntimeConfig {
    RuntimeConfig {
        command: argv.iter().map(|s| s.to_string()).collect(),
        ..config(RuntimeKind::Command)
    }
}

fn fixture_command(name: &str) -> RuntimeConfig {
    command(&[&fixture(name)])
}

fn request(prompt: &str, timeout: Duration) -> RunRequest {
    RunRequest {
        // Unique like the executor's: the end-of-run sweep kills every
        // process tagged with this id, so tests running at once must differ.
        execution_id: format!("exec-test-{}", uuid::Uuid::new_v4()),
        session_id: "default".into(),
        kind: ExecutionKind::Task,
        prompt: prompt.into(),
        timeout,
        cli_session: None,
        transcript: None,
    }
}

/// Run one prompt; returns the outcome, the context (for the pid) and the time taken.
async fn run(
    cfg: &RuntimeConfig,
    prompt: &str,
    timeout: Duration,
) -> (RunOutcome, ExecutionContext, Duration) {
    let runtime = build_runtime(cfg);
    let ctx = ExecutionContext::new(64);
    let started = Instant::now();
    let outcome = runtime.run(request(prompt, timeout), &ctx).await;
    (outcome, ctx, started.elapsed())
}

/// SIGKILL is delivered asynchronously: a member signalled just before `run`
/// returned may need a moment to finish dying. A survivor (these fixtures sleep
/// for 60 s) still fails this after the bounded wait.
async fn assert_group_gone(pgid: u32) {
    assert_ne!(pgid, 0, "the pid was never recorded");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let members = procs::live_group_members(pgid);
        if members.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process group {pgid} still has live members {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- classification

#[tokio::test]
async fn stream_json_fixture_is_success_with_result_metadata() {
    let (outcome, _, _) = run(&fixture_command("stream-json.sh"), "hello", LONG).await;
    assert_eq!(outcome.end, RunEnd::Exited { code: 0 });
    assert_eq!(outcome.text, "Looking at it.\nAll done.");
    let result = outcome.result.clone().expect("result line");
    assert_eq!(result.text, "All done.");
    assert_eq!(result.cost_usd, Some(0.0125));
    assert_eq!(result.duration_ms, Some(321));
    assert!(!result.is_error);
    let c = classify(&outcome);
    assert_eq!((c.http_status, c.status, c.code), (200, "success", None));
    assert_eq!(c.response, "All done.");
}

#[tokio::test]
async fn claude_code_runtime_runs_its_binary_with_prompt_on_stdin() {
    // The fixture drains stdin before answering; it would still answer if the
    // prompt were missing, so this checks the preset's wiring end to end.
    let cfg = RuntimeConfig {
        claude_bin: fixture("stream-json.sh"),
        ..config(RuntimeKind::ClaudeCode)
    };
    let (outcome, ctx, _) = run(&cfg, "hello", LONG).await;
    assert_ne!(ctx.pid.load(Ordering::Relaxed), 0);
    let c = classify(&outcome);
    assert_eq!((c.http_status, c.response.as_str()), (200, "All done."));
}

#[tokio::test]
async fn gemini_runtime_prepends_system_prompt_and_parses_deltas() {
    let cfg = RuntimeConfig {
        gemini_bin: fixture("gemini-echo.py"),
        system_prompt: Some("You are terse.".into()),
        ..config(RuntimeKind::Gemini)
    };
    let (outcome, _, _) = run(&cfg, "What is 2+2?", LONG).await;
    assert_eq!(outcome.end, RunEnd::Exited { code: 0 });
    // The fixture streams back exactly the input it received.
    assert_eq!(outcome.text, "You are terse.\n\nWhat is 2+2?");
    assert_eq!(outcome.result.as_ref().unwrap().duration_ms, Some(12));
    assert_eq!(classify(&outcome).http_status, 200);
}

#[tokio::test]
async fn plain_text_fixture_is_success_with_its_stdout() {
    let (outcome, _, _) = run(&fixture_command("plain-text.sh"), "hi", LONG).await;
    assert_eq!(outcome.text, "first line\nsecond line\n");
    assert_eq!(outcome.result, None);
    let c = classify(&outcome);
    assert_eq!((c.http_status, c.status), (200, "success"));
    assert_eq!(c.response, "first line\nsecond line\n");
}

#[tokio::test]
async fn result_line_with_empty_text_is_success_with_placeholder() {
    let (outcome, _, _) = run(&fixture_command("empty-result.sh"), "hi", LONG).await;
    assert_eq!(outcome.end, RunEnd::Exited { code: 0 });
    assert_eq!(outcome.text, "");
    assert!(outcome.result.is_some());
    let c = classify(&outcome);
    assert_eq!((c.http_status, c.status), (200, "success"));
    assert_eq!(c.response, NO_OUTPUT_PLACEHOLDER);
}

#[tokio::test]
async fn no_output_at_all_is_empty_result() {
    let (outcome, _, _) = run(&fixture_command("silent.sh"), "hi", LONG).await;
    assert_eq!(outcome.end, RunEnd::Exited { code: 0 });
    let c = classify(&outcome);
    assert_eq!(
        (c.http_status, c.status, c.code),
        (502, "failed", Some("empty_result"))
    );
}

#[tokio::test]
async fn nonzero_exit_reports_code_and_stderr_tail() {
    let (outcome, _, _) = run(&fixture_command("fail-stderr.sh"), "hi", LONG).await;
    assert_eq!(outcome.end, RunEnd::Exited { code: 3 });
    let c = classify(&outcome);
    assert_eq!(
        (c.http_status, c.status, c.code),
        (500, "failed", Some("nonzero_exit"))
    );
    assert_eq!(c.exit_code, Some(3));
    assert_eq!(
        c.stderr_tail.as_deref(),
        Some("warning: something odd\nfatal: cannot reach the model")
    );
}

#[tokio::test]
async fn rate_limited_result_is_429() {
    let (outcome, _, _) = run(&fixture_command("rate-limited.sh"), "hi", LONG).await;
    assert_eq!(outcome.end, RunEnd::Exited { code: 1 });
    assert!(outcome.result.as_ref().unwrap().is_error);
    let c = classify(&outcome);
    assert_eq!(
        (c.http_status, c.status, c.code),
        (429, "failed", Some("rate_limited"))
    );
}

#[tokio::test]
async fn missing_binary_is_spawn_failed_naming_the_command() {
    let cfg = RuntimeConfig {
        claude_bin: "agentd-test-no-such-claude".into(),
        ..config(RuntimeKind::ClaudeCode)
    };
    let (outcome, ctx, _) = run(&cfg, "hi", LONG).await;
    assert_eq!(
        outcome.end,
        RunEnd::SpawnFailed {
            command: "agentd-test-no-such-claude".into(),
            reason: "not found".into(),
        }
    );
    assert_eq!(ctx.pid.load(Ordering::Relaxed), 0);
    let c = classify(&outcome);
    assert_eq!((c.http_status, c.code), (502, Some("runtime_unavailable")));
    assert_eq!(
        c.message.as_deref(),
        Some("runtime command not found: agentd-test-no-such-claude")
    );
}

#[tokio::test]
async fn echo_runtime_needs_no_process() {
    let (outcome, ctx, _) = run(&config(RuntimeKind::Echo), "ping", LONG).await;
    assert_eq!(outcome.end, RunEnd::Completed);
    assert_eq!(outcome.text, "ping");
    assert_eq!(ctx.pid.load(Ordering::Relaxed), 0);
}

// ---------------------------------------------------------------- prompt delivery

#[tokio::test]
async fn prompt_goes_to_stdin_without_placeholder() {
    let (outcome, _, _) = run(&command(&["cat"]), "line one\nline two", LONG).await;
    assert_eq!(outcome.end, RunEnd::Exited { code: 0 });
    assert_eq!(outcome.text, "line one\nline two");
}

#[tokio::test]
async fn placeholder_is_substituted_and_stdin_left_empty() {
    // `cat` prints stdin: if the prompt went there too it would appear twice.
    let cfg = command(&[
        "sh",
        "-c",
        "echo \"arg=$1\"; cat; echo end",
        "sh",
        "--say={prompt}!",
    ]);
    let (outcome, _, _) = run(&cfg, "hello world", LONG).await;
    assert_eq!(outcome.end, RunEnd::Exited { code: 0 });
    assert_eq!(outcome.text, "arg=--say=hello world!\nend\n");
}

#[tokio::test]
async fn child_that_never_reads_a_large_prompt_does_not_hang() {
    // 4 MiB is far beyond the pipe buffer: a blocking write would never return.
    let prompt = "x".repeat(4 << 20);
    let (outcome, _, elapsed) = run(&fixture_command("silent.sh"), &prompt, LONG).await;
    assert_eq!(outcome.end, RunEnd::Exited { code: 0 });
    assert!(elapsed < PIPE_DRAIN + MARGIN, "took {elapsed:?}");
}

#[tokio::test]
async fn output_chunks_are_broadcast_to_subscribers() {
    let runtime = build_runtime(&fixture_command("plain-text.sh"));
    let ctx = ExecutionContext::new(64);
    let mut rx = ctx.output.subscribe();
    let outcome = runtime.run(request("hi", LONG), &ctx).await;
    let mut seen = String::new();
    while let Ok(chunk) = rx.try_recv() {
        seen.push_str(&chunk);
    }
    assert_eq!(seen, outcome.text);
    assert_eq!(seen, "first line\nsecond line\n");
}

// ---------------------------------------------------------------- environment

const ISOLATED_MARKER: &str = "AGENTD_TEST_ISOLATED";

/// Re-run this test binary with only `test` selected and `envs` set in its real
/// environment; returns its stdout after asserting it passed and that the child
/// half printed `isolated-ran: <test>` (so it did not just return early).
fn run_isolated(test: &str, envs: &[(&str, &str)]) -> String {
    run_isolated_with(test, envs, |_| {})
}

/// `run_isolated`, with `prepare` applied to the command first.
fn run_isolated_with(
    test: &str,
    envs: &[(&str, &str)],
    prepare: impl FnOnce(&mut std::process::Command),
) -> String {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ISOLATED_MARKER, test)
        .envs(envs.iter().copied());
    prepare(&mut cmd);
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "isolated {test} failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("isolated-ran: {test}")),
        "isolated {test} did not run:\n{stdout}\n{stderr}"
    );
    stdout
}

fn is_isolated_run(test: &str) -> bool {
    std::env::var(ISOLATED_MARKER).as_deref() == Ok(test)
}

/// `SigIgn` and `SigBlk` of `/proc/<pid>/status`, as hexadecimal masks.
fn signal_masks(status: &str) -> (u64, u64) {
    let field = |name: &str| {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"));
        u64::from_str_radix(line.trim(), 16).unwrap()
    };
    (field("SigIgn:"), field("SigBlk:"))
}

/// Started the way `nohup`, `&` in a script or a CI runner start a job (SIGINT
/// and SIGQUIT ignored, here also SIGHUP and a blocked SIGUSR1), the runtime
/// still gives its agents default dispositions and an empty mask, so the
/// SIGINT of a timeout ends them.
#[test]
fn agents_start_with_default_signals_whatever_the_server_inherited() {
    use std::os::unix::process::CommandExt;
    let prepare = |cmd: &mut std::process::Command| {
        // SAFETY: signal and sigprocmask are async-signal-safe; the closure
        // allocates nothing.
        unsafe {
            cmd.pre_exec(|| {
                for sig in [libc::SIGINT, libc::SIGQUIT, libc::SIGHUP] {
                    libc::signal(sig, libc::SIG_IGN);
                }
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGUSR1);
                libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
    };
    run_isolated_with("isolated_inherited_signals", &[], prepare);
}

#[test]
fn isolated_inherited_signals() {
    if !is_isolated_run("isolated_inherited_signals") {
        return;
    }
    // The setup took: this process really ignores SIGINT.
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let (ignored, _) = signal_masks(&own);
    assert_ne!(
        ignored & (1 << (libc::SIGINT - 1)),
        0,
        "SIGINT not ignored here"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = command(&["grep", "-E", "^Sig(Ign|Blk):", "/proc/self/status"]);
        let (outcome, _, _) = run(&cfg, "", LONG).await;
        assert_eq!(outcome.end, RunEnd::Exited { code: 0 });
        assert_eq!(signal_masks(&outcome.text), (0, 0), "{}", outcome.text);

        let cfg = RuntimeConfig {
            kill_grace: Duration::from_secs(3),
            ..fixture_command("sleepy.sh")
        };
        let (outcome, ctx, _) = run(&cfg, "", Duration::from_millis(300)).await;
        assert_eq!(outcome.end, RunEnd::TimedOut);
        assert_eq!(outcome.cleanup.stopped_with, Some(libc::SIGINT));
        assert_group_gone(ctx.pid.load(Ordering::Relaxed)).await;
    });
    println!("isolated-ran: isolated_inherited_signals");
}

#[test]
fn supervisor_and_own_variables_never_reach_the_child() {
    run_isolated(
        "isolated_env_scrub",
        &[
            ("NOTIFY_SOCKET", "/run/systemd/notify"),
            ("WATCHDOG_USEC", "30000000"),
            ("WATCHDOG_PID", "1"),
            ("LISTEN_FDS", "1"),
            ("LISTEN_PID", "1"),
            ("LISTEN_FDNAMES", "http"),
            ("CREDENTIALS_DIRECTORY", "/run/credentials/agentd.service"),
            ("AGENTD_API_TOKEN", "0123456789abcdef0123"),
            ("AGENTD_API_TOKEN_FILE", "/etc/agentd/token"),
            ("AGENT_HISTORY_LIMIT", "5"),
            ("AGENTD_EXECUTION_ID", "inherited-tag"),
            ("TEST_KEEP", "kept"),
        ],
    );
}

/// Child half of `supervisor_and_own_variables_never_reach_the_child`.
#[tokio::test]
async fn isolated_env_scrub() {
    if !is_isolated_run("isolated_env_scrub") {
        return;
    }
    // The variables really are in this process's environment...
    assert_eq!(
        std::env::var("NOTIFY_SOCKET").as_deref(),
        Ok("/run/systemd/notify")
    );
    let (outcome, _, _) = run(&fixture_command("print-env.sh"), "", LONG).await;
    assert_eq!(outcome.end, RunEnd::Exited { code: 0 });
    let env: Vec<&str> = outcome.text.lines().collect();
    // ...and not in the child's, which still inherits everything else.
    for name in SCRUBBED_ENV {
        assert!(
            !env.iter().any(|l| l.starts_with(&format!("{name}="))),
            "{name} leaked into the child"
        );
    }
    // No variable of agentd's own reaches it (the token least of all); the
    // only AGENTD_ one is its own execution's id, not the inherited one.
    let own: Vec<&&str> = env
        .iter()
        .filter(|l| l.starts_with("AGENTD_") || l.starts_with("AGENT_HISTORY_LIMIT="))
        .collect();
    assert_eq!(own.len(), 1, "{own:?}");
    assert!(
        own[0].starts_with("AGENTD_EXECUTION_ID=exec-test-"),
        "{own:?}"
    );
    assert!(!outcome.text.contains("0123456789abcdef0123"));
    assert!(env.contains(&"TEST_KEEP=kept"));
    println!("isolated-ran: isolated_env_scrub");
}

// ---------------------------------------------------------------- stopping

#[tokio::test]
async fn timeout_interrupts_the_whole_group() {
    let timeout = Duration::from_millis(300);
    // A long grace period, so "SIGINT was enough" is unmistakable below.
    let grace = Duration::from_secs(3);
    let cfg = RuntimeConfig {
        kill_grace: grace,
        ..fixture_command("sleepy.sh")
    };
    let (outcome, ctx, elapsed) = run(&cfg, "", timeout).await;
    assert_eq!(outcome.end, RunEnd::TimedOut);
    assert_eq!(outcome.text, "started\n");
    let c = classify(&outcome);
    assert_eq!(
        (c.http_status, c.status, c.code),
        (504, "timeout", Some("timeout"))
    );
    // SIGINT sufficed (the fixture's shell and its `sleep` die of it, unless
    // SIGINT reached them ignored): told by the signal, not by the clock.
    assert!(elapsed >= timeout, "took {elapsed:?}");
    assert_eq!(
        outcome.cleanup.stopped_with,
        Some(libc::SIGINT),
        "the agent did not end on SIGINT: {:?}",
        outcome.cleanup
    );
    // The fixture's `sleep 60` is a second member of the group.
    assert_group_gone(ctx.pid.load(Ordering::Relaxed)).await;
}

#[tokio::test]
async fn cancel_stops_the_whole_group() {
    let runtime = build_runtime(&fixture_command("sleepy.sh"));
    let ctx = ExecutionContext::new(64);
    let mut rx = ctx.output.subscribe();
    let (outcome, ()) = tokio::join!(runtime.run(request("", LONG), &ctx), async {
        // Cancel once the agent is demonstrably running.
        let first = rx.recv().await.unwrap();
        assert_eq!(first, "started\n");
        ctx.cancel.cancel();
    });
    assert_eq!(outcome.end, RunEnd::Cancelled);
    let c = classify(&outcome);
    assert_eq!((c.http_status, c.status), (200, "cancelled"));
    assert_group_gone(ctx.pid.load(Ordering::Relaxed)).await;
}

#[tokio::test]
async fn dropping_a_running_execution_kills_its_group() {
    let runtime = build_runtime(&fixture_command("sleepy.sh"));
    let ctx = ExecutionContext::new(64);
    let mut rx = ctx.output.subscribe();
    {
        let run = runtime.run(request("", LONG), &ctx);
        tokio::pin!(run);
        tokio::select! {
            _ = &mut run => panic!("the sleepy fixture finished on its own"),
            first = rx.recv() => assert_eq!(first.unwrap(), "started\n"),
        }
        // `run` is dropped here, mid-execution (as on executor shutdown).
    }
    assert_group_gone(ctx.pid.load(Ordering::Relaxed)).await;
}

#[tokio::test]
async fn cancelled_before_spawn_starts_nothing() {
    let runtime = build_runtime(&fixture_command("sleepy.sh"));
    let ctx = ExecutionContext::new(4);
    ctx.cancel.cancel();
    let outcome = runtime.run(request("", LONG), &ctx).await;
    assert_eq!(outcome.end, RunEnd::Cancelled);
    assert_eq!(ctx.pid.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn child_ignoring_sigint_and_sigterm_is_sigkilled() {
    let timeout = Duration::from_millis(300);
    let (outcome, ctx, elapsed) = run(&fixture_command("stubborn.sh"), "", timeout).await;
    assert_eq!(outcome.end, RunEnd::TimedOut);
    // Both grace periods were waited out before SIGKILL...
    assert!(elapsed >= timeout + 2 * GRACE, "took {elapsed:?}");
    assert_eq!(outcome.cleanup.stopped_with, Some(libc::SIGKILL));
    // ...and SIGKILL reached the leader and its ignoring `sleep` alike.
    assert_group_gone(ctx.pid.load(Ordering::Relaxed)).await;
}

#[tokio::test]
async fn escaped_grandchild_holding_stdout_does_not_hold_the_execution() {
    // The grandchild would keep stdout open for a minute after the agent
    // has answered.
    let cfg = command(&[&fixture("grandchild.sh"), "60"]);
    let (outcome, _, elapsed) = run(&cfg, "", LONG).await;
    assert_eq!(outcome.end, RunEnd::Exited { code: 0 });
    // The grandchild did hold the pipe (the drain ran out), did not hold it
    // for its minute, and was killed by the sweep (it carried the tag).
    assert!(elapsed >= PIPE_DRAIN, "took {elapsed:?}");
    assert!(elapsed < PIPE_DRAIN + MARGIN, "took {elapsed:?}");
    assert_eq!(outcome.cleanup.escapees_killed, 1, "{:?}", outcome.cleanup);
    assert_eq!(outcome.cleanup.survivors, 0, "{:?}", outcome.cleanup);
    let c = classify(&outcome);
    assert_eq!(c.http_status, 200);
    assert_eq!(c.response, "answered before the grandchild ended");
}

// ---------------------------------------------------------------- caps

#[tokio::test]
async fn hundred_mib_of_output_is_capped_and_the_run_finishes() {
    let cfg = fixture_command("flood.sh");
    let (outcome, _, elapsed) = run(&cfg, "", LONG).await;
    assert_eq!(outcome.end, RunEnd::Exited { code: 0 });
    assert!(outcome.stdout_truncated);
    assert_eq!(outcome.text.len(), cfg.stdout_cap);
    assert!(outcome.text.starts_with("flooding the pipe"));
    // The result line after the flood was still parsed.
    assert_eq!(outcome.result.as_ref().unwrap().text, "flood finished");
    assert_eq!(classify(&outcome).http_status, 200);
    eprintln!("100 MiB flood read in {elapsed:?}");
}

#[tokio::test]
async fn stderr_keeps_its_tail_under_the_cap() {
    let cfg = RuntimeConfig {
        stderr_cap: 1024,
        ..command(&[
            "sh",
            "-c",
            "yes noise | head -c 100000 >&2; echo last-words >&2; exit 1",
        ])
    };
    let (outcome, _, _) = run(&cfg, "", LONG).await;
    assert_eq!(outcome.end, RunEnd::Exited { code: 1 });
    assert!(outcome.stderr_truncated);
    assert!(outcome.stderr_tail.len() <= 1024);
    assert!(outcome.stderr_tail.ends_with("last-words\n"));
}

// ---------------------------------------------------------------- leaks

/// Executions in the leak proof, and how many run at once.
const LEAK_RUNS: usize = 500;
const LEAK_CONCURRENCY: usize = 25;

#[test]
fn five_hundred_executions_leak_no_thread_or_descriptor() {
    let started = Instant::now();
    let stdout = run_isolated("isolated_leak_check", &[]);
    let elapsed = started.elapsed();
    eprintln!("leak check took {elapsed:?}");
    // libtest prints the child's line after "test isolated_leak_check ... ".
    for line in stdout
        .lines()
        .filter_map(|l| l.find("leak-check:").map(|i| &l[i..]))
    {
        eprintln!("{line}");
    }
}

fn thread_count() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Child half of `five_hundred_executions_leak_no_thread_or_descriptor`: alone
/// in its process, so the counts are this test's only.
#[test]
fn isolated_leak_check() {
    if !is_isolated_run("isolated_leak_check") {
        return;
    }
    // A fixed-size runtime: worker threads do not come and go. Nothing in the
    // runtimes uses the blocking pool, so the thread count must not move at all.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The grandchild would hold stdout for a minute, longer than
        // pipe_drain, so every run takes the "escaped grandchild" path.
        let runtime: Arc<dyn Runtime> = build_runtime(&command(&[&fixture("grandchild.sh"), "60"]));
        // Warm-up: the first child installs tokio's SIGCHLD handling (a
        // self-pipe that lives for the whole process).
        for _ in 0..3 {
            let ctx = ExecutionContext::new(16);
            let outcome = runtime.run(request("", LONG), &ctx).await;
            assert_eq!(classify(&outcome).http_status, 200);
        }
        // What is compared: this process's OS thread count (/proc/self/status
        // `Threads`) and open descriptor count (/proc/self/fd), after warm-up
        // and after all 500 runs returned. Both must be exactly equal.
        let threads_before = thread_count();
        let fds_before = open_fd_count();

        let started = Instant::now();
        let slots = Arc::new(tokio::sync::Semaphore::new(LEAK_CONCURRENCY));
        let mut runs = tokio::task::JoinSet::new();
        for _ in 0..LEAK_RUNS {
            let runtime = runtime.clone();
            let slots = slots.clone();
            runs.spawn(async move {
                let _slot = slots.acquire_owned().await.unwrap();
                let ctx = ExecutionContext::new(16);
                let begun = Instant::now();
                let outcome = runtime.run(request("", LONG), &ctx).await;
                (classify(&outcome).http_status, begun.elapsed())
            });
        }
        let mut slowest = Duration::ZERO;
        let mut fastest = Duration::MAX;
        let mut fds_peak = fds_before;
        while let Some(joined) = runs.join_next().await {
            let (status, took) = joined.unwrap();
            assert_eq!(status, 200);
            slowest = slowest.max(took);
            fastest = fastest.min(took);
            fds_peak = fds_peak.max(open_fd_count());
        }
        let runs_took = started.elapsed();

        let threads_after = thread_count();
        let fds_after = open_fd_count();
        println!(
            "leak-check: {LEAK_RUNS} runs ({LEAK_CONCURRENCY} at once) in {runs_took:?}, fastest {fastest:?}, slowest {slowest:?}; \
             threads {threads_before} -> {threads_after}; fds {fds_before} -> {fds_after} (peak {fds_peak})"
        );
        // Every run went through the drain (the grandchild held stdout) and
        // none waited for the grandchild itself.
        assert!(fastest >= PIPE_DRAIN, "a run took only {fastest:?}");
        assert!(slowest < PIPE_DRAIN + MARGIN, "a run took {slowest:?}");
        assert_eq!(fds_after, fds_before, "descriptors leaked");
        assert_eq!(threads_after, threads_before, "threads leaked");
    });
    println!("isolated-ran: isolated_leak_check");
}
