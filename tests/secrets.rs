//! An agent never holds agentd's credentials: the real binary runs real
//! agent children that look for the API token where they could find it (their
//! environment, agentd's `/proc/<pid>/environ`), whichever way the token was
//! given (variable, file, systemd credential). And agentd, non-dumpable for
//! that, still dumps core on the watchdog's SIGABRT.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;

use common::notify::{has_line, NotifyReceiver};
use common::{Conn, Daemon};
use serde_json::json;

const TOKEN: &str = "s3cret-token-0123456789abcdef";

/// The user agentd runs as in the tests that need an unprivileged agentd:
/// root's CAP_SYS_PTRACE reads any process's `/proc/<pid>/environ`, so only
/// an agentd (and agents) without it shows what the same user can read.
const NOBODY: u32 = 65534;

/// `agentd` as `NOBODY`, no capabilities, no groups.
const AS_NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
];

/// One task through the API with the token; its answer's text.
fn task_answer(d: &Daemon, prompt: &str) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = Conn::open(d.addr).await.unwrap().with_token(TOKEN);
        let r = c.post_json("/api/task", &json!({"prompt": prompt})).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["response"].as_str().unwrap().to_owned()
    })
}

/// The environment an `env` child printed holds no variable of agentd's but
/// its execution id, and nothing of the token.
fn assert_no_credentials(env: &str) {
    assert!(!env.contains(TOKEN), "the token reached the agent:\n{env}");
    let own: Vec<&str> = env
        .lines()
        .filter(|l| l.starts_with("AGENTD_") || l.starts_with("CREDENTIALS_DIRECTORY="))
        .collect();
    assert_eq!(own.len(), 1, "{own:?}");
    assert!(own[0].starts_with("AGENTD_EXECUTION_ID="), "{own:?}");
    assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
}

#[test]
fn a_token_in_the_environment_never_reaches_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &[
            ("AGENTD_API_TOKEN", TOKEN),
            ("AGENTD_RUNTIME", "command"),
            ("AGENTD_RUNTIME_CMD", "env"),
            ("AGENTD_MAX_QUEUE", "7"),
        ],
        dir.path(),
    );
    assert_no_credentials(&task_answer(&d, "env"));
}

#[test]
fn a_token_from_a_file_never_reaches_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let d = Daemon::start(
        &[
            ("AGENTD_API_TOKEN_FILE", file.to_str().unwrap()),
            ("AGENTD_RUNTIME", "command"),
            ("AGENTD_RUNTIME_CMD", "env"),
        ],
        dir.path(),
    );
    // The token from the file (its newline removed) is the one in force.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let denied = rt.block_on(common::post_json(
        d.addr,
        "/api/task",
        &json!({"prompt": "x"}),
    ));
    assert_eq!(denied.status, 401);
    let env = task_answer(&d, "env");
    assert_no_credentials(&env);
    let path = file.to_str().unwrap();
    assert!(
        !env.contains(path),
        "the file's path reached the agent: {env}"
    );
}

#[test]
fn a_token_from_a_systemd_credential_never_reaches_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("agentd.api-token"), format!("{TOKEN}\n")).unwrap();
    let d = Daemon::start(
        &[
            ("CREDENTIALS_DIRECTORY", creds.to_str().unwrap()),
            ("AGENTD_RUNTIME", "command"),
            ("AGENTD_RUNTIME_CMD", "env"),
        ],
        dir.path(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let denied = rt.block_on(common::post_json(
        d.addr,
        "/api/task",
        &json!({"prompt": "x"}),
    ));
    assert_eq!(denied.status, 401);
    assert_no_credentials(&task_answer(&d, "env"));
}

/// A state directory `NOBODY` owns, inside a temp dir it may enter.
fn nobody_state_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    dir
}

/// The agent, a child of agentd and of the same user, tries agentd's
/// `/proc/<pid>/environ`: refused, since agentd is not dumpable. The same
/// agent reads its own, so `/proc` itself is readable to it.
#[test]
fn the_agent_cannot_read_the_token_from_agentd_proc_environ() {
    let dir = nobody_state_dir();
    let script = "echo ppid=$PPID; \
                  if tr '\\0' '\\n' < /proc/$PPID/environ; then echo parent-read; \
                  else echo parent-refused; fi; \
                  if grep -q AGENTD_EXECUTION_ID /proc/$$/environ; then echo self-read; fi";
    let cmd = shell_words::join(["sh", "-c", script]);
    // Abstract: a socket file in a root-owned temp dir is closed to NOBODY.
    let rx = NotifyReceiver::abstract_name();
    let socket = rx.env_value();
    let d = Daemon::start_under(
        AS_NOBODY,
        &[
            ("AGENTD_API_TOKEN", TOKEN),
            ("AGENTD_RUNTIME", "command"),
            ("AGENTD_RUNTIME_CMD", &cmd),
            ("NOTIFY_SOCKET", socket.as_str()),
        ],
        dir.path(),
    );
    assert!(rx
        .wait_for(|m| has_line(m, "READY=1"), common::WAIT)
        .is_some());
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains(&NOBODY.to_string())),
        "agentd runs as {NOBODY}: {status}"
    );
    let out = task_answer(&d, "look");
    assert!(out.contains(&format!("ppid={}", d.pid())), "{out}");
    assert!(out.contains("parent-refused"), "{out}");
    assert!(!out.contains("parent-read"), "{out}");
    assert!(out.contains("self-read"), "{out}");
    assert!(!out.contains(TOKEN), "{out}");
    // Non-dumpable costs agentd none of its own /proc gauges: the ticks pass
    // (READY=1 above) and /health reports the process's fds and threads.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let h = rt.block_on(common::get(d.addr, "/health"));
    assert_eq!(h.status, 200, "{}", h.text());
    let diagnostics = &h.json()["diagnostics"];
    assert!(diagnostics["open_fds"].as_i64() > Some(0), "{diagnostics}");
    assert!(
        diagnostics["thread_count"].as_i64() > Some(0),
        "{diagnostics}"
    );
}

/// Non-dumpable, and still a core dump when SIGABRT comes (the watchdog's
/// kill, the sentinel's abort): the handler makes agentd dumpable again and
/// lets the signal take its default action.
#[test]
fn sigabrt_still_dumps_core() {
    let dir = nobody_state_dir();
    let mut wrapper = vec!["prlimit", "--core=unlimited"];
    wrapper.extend_from_slice(AS_NOBODY);
    let mut d = Daemon::start_under(&wrapper, &[], dir.path());
    // While it runs: not dumpable, so its /proc files belong to root, not to
    // the user it runs as.
    let environ = std::fs::metadata(format!("/proc/{}/environ", d.pid())).unwrap();
    assert_eq!(environ.uid(), 0, "agentd is not dumpable while it runs");
    d.signal(nix::sys::signal::Signal::SIGABRT);
    let status = d.wait_status();
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status:?}");
    // Where the kernel writes the core itself (a file pattern, not a pipe to
    // a helper this machine may lack), it must have dumped one.
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    if !pattern.starts_with('|') {
        assert!(status.core_dumped(), "no core dump: {status:?}");
    }
    if pattern.starts_with("core") {
        assert!(
            core_file_in(dir.path()),
            "a core file in the working directory"
        );
    }
}

fn core_file_in(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with("core"))
}
