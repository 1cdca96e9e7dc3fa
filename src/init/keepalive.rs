//! The launchd keepalive file: agentd's equivalent of `WATCHDOG=1` where the
//! init system has no watchdog.
//!
//! launchd's `KeepAlive` restarts a process that exits, but cannot see one that
//! is alive and wedged. So the health loop touches a file after every passing
//! tick, and a companion launchd job (`StartInterval`) runs
//! `agentd keepalive-check`, which restarts agentd with
//! `launchctl kickstart -k system/<label>` when the file's mtime is too old.
//! The file's content is irrelevant; only its mtime speaks.
//!
//! Invariant (same as for `WATCHDOG=1`): only the health loop's passing tick
//! calls `touch`.
//!
//! Not here: when to touch (health loop), the launchd job definitions
//! (`launchd/`), argument parsing for the subcommand (`main`).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Exit code of `keepalive-check` when the file is fresh.
pub const EXIT_FRESH: i32 = 0;
/// Exit code when the file is stale (whether or not a restart was requested).
pub const EXIT_STALE: i32 = 1;
/// Exit code when freshness cannot be judged: the file is missing or
/// unreadable. No restart is requested: a missing file is normal before the
/// first passing tick after installation, and restarting on it would loop
/// forever on a mistyped path.
pub const EXIT_UNKNOWN: i32 = 2;

/// How long `launchctl kickstart` may take before the check gives up on it.
/// kickstart returns once the job is signalled and relaunched, normally well
/// under a second; a hang must not pile up check processes, since launchd
/// starts the next one only after this one exits.
pub const KICKSTART_TIMEOUT: Duration = Duration::from_secs(30);

/// Default `--max-age` of `keepalive-check`, in seconds. It must exceed the
/// launchd job's `ThrottleInterval` (10 s) + two health intervals (2 × 10 s):
/// a restarted agentd waits out the throttle, starts, and touches the file
/// after its first passing tick, and one failed tick is tolerated. 60 s
/// leaves twice that, so a healthy agentd is never restarted; the shipped
/// plists pass the same value (tests/launchd_plist.rs checks both).
pub const DEFAULT_MAX_AGE_SECS: u64 = 60;

/// The launchd domain of the job to restart: where a LaunchDaemon or a
/// per-user LaunchAgent lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchdDomain {
    /// `system/<label>`: a LaunchDaemon (the check must run as root).
    System,
    /// `gui/<uid>/<label>` of the user running the check: a LaunchAgent.
    Gui,
}

impl LaunchdDomain {
    /// Parse `system` or `gui` (the names `launchctl` uses).
    pub fn parse(s: &str) -> Option<LaunchdDomain> {
        match s {
            "system" => Some(LaunchdDomain::System),
            "gui" => Some(LaunchdDomain::Gui),
            _ => None,
        }
    }

    /// The service target `launchctl kickstart` takes for `label`.
    pub fn service_target(self, label: &str) -> String {
        match self {
            LaunchdDomain::System => format!("system/{label}"),
            LaunchdDomain::Gui => format!("gui/{}/{label}", current_uid()),
        }
    }
}

/// The real user id of this process.
fn current_uid() -> u32 {
    // SAFETY: getuid(2) takes no arguments, touches no memory and cannot fail.
    unsafe { libc::getuid() }
}

/// How often the check looks whether `launchctl` has exited.
const KICKSTART_POLL: Duration = Duration::from_millis(20);

/// Freshness of the keepalive file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeepaliveVerdict {
    /// Touched within the allowed age.
    Fresh(Duration),
    /// Not touched for longer than the allowed age.
    Stale(Duration),
    /// The file does not exist.
    Missing,
    /// The file exists but its mtime cannot be read.
    Unreadable(String),
}

/// Mark agentd healthy now: create the file if missing (atomically: a temp file
/// in the same directory, then rename, so a checker never sees a half-made
/// file), else set its mtime to now.
pub fn touch(path: &Path) -> io::Result<()> {
    match OpenOptions::new().write(true).open(path) {
        Ok(file) => file.set_modified(SystemTime::now()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => create_atomically(path),
        Err(err) => Err(err),
    }
}

fn create_atomically(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("keepalive path {} has no file name", path.display()),
        )
    })?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(file_name);
    temp_name.push(format!(".tmp.{}", std::process::id()));
    let temp = dir.join(temp_name);
    let result = File::create(&temp).and_then(|_| std::fs::rename(&temp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Time since the file was last touched. A modification time in the future
/// (clock stepped back) counts as zero.
pub fn age(path: &Path) -> io::Result<Duration> {
    let modified = std::fs::metadata(path)?.modified()?;
    Ok(SystemTime::now()
        .duration_since(modified)
        .unwrap_or(Duration::ZERO))
}

/// Judge the file against `max_age` (an age equal to `max_age` is still fresh).
pub fn check(path: &Path, max_age: Duration) -> KeepaliveVerdict {
    match age(path) {
        Ok(age) if age <= max_age => KeepaliveVerdict::Fresh(age),
        Ok(age) => KeepaliveVerdict::Stale(age),
        Err(err) if err.kind() == io::ErrorKind::NotFound => KeepaliveVerdict::Missing,
        Err(err) => KeepaliveVerdict::Unreadable(err.to_string()),
    }
}

/// `agentd keepalive-check --file F --max-age S [--label L]`: print one line,
/// and when the file is stale and a label is given, restart the job with
/// `launchctl kickstart -k system/<label>` (a label that already names a
/// domain, such as `gui/501/org.agentd.agentd`, is used as it is). Returns the process exit code
/// (`EXIT_FRESH`, `EXIT_STALE`, `EXIT_UNKNOWN`).
pub fn keepalive_check_main(file: &Path, max_age: Duration, label: Option<&str>) -> i32 {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    keepalive_check_with(file, max_age, label, Path::new("launchctl"), &mut out)
}

/// `keepalive_check_main` with the `launchctl` program and the output given,
/// so tests can substitute both.
pub fn keepalive_check_with(
    file: &Path,
    max_age: Duration,
    label: Option<&str>,
    launchctl: &Path,
    out: &mut dyn Write,
) -> i32 {
    let max = max_age.as_secs_f64();
    let shown = file.display();
    let (line, code) = match check(file, max_age) {
        KeepaliveVerdict::Fresh(age) => (
            format!("fresh: {shown} touched {:.1}s ago (max {max:.1}s)", age.as_secs_f64()),
            EXIT_FRESH,
        ),
        KeepaliveVerdict::Stale(age) => {
            let action = match label {
                Some(label) => kickstart(launchctl, label),
                None => "no --label, not restarting".to_owned(),
            };
            (
                format!(
                    "stale: {shown} touched {:.1}s ago (max {max:.1}s); {action}",
                    age.as_secs_f64()
                ),
                EXIT_STALE,
            )
        }
        KeepaliveVerdict::Missing => (
            format!("missing: {shown} does not exist; not restarting (agentd has not passed a health check since it was installed, or the path is wrong)"),
            EXIT_UNKNOWN,
        ),
        KeepaliveVerdict::Unreadable(err) => (
            format!("unreadable: {shown}: {err}; not restarting"),
            EXIT_UNKNOWN,
        ),
    };
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    code
}

/// Run `launchctl kickstart -k system/<label>` (or `-k <label>` when the label
/// names its domain), bounded by `KICKSTART_TIMEOUT`; returns what happened,
/// for the output line. launchctl's own error text goes to this process's
/// stderr (the check job's log).
fn kickstart(launchctl: &Path, label: &str) -> String {
    let service = if label.contains('/') {
        label.to_owned()
    } else {
        LaunchdDomain::System.service_target(label)
    };
    let shown = format!("launchctl kickstart -k {service}");
    let mut child = match Command::new(launchctl)
        .args(["kickstart", "-k", &service])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return format!("launchctl not found, cannot run `{shown}`")
        }
        Err(err) => return format!("`{shown}` could not start: {err}"),
    };
    let deadline = Instant::now() + KICKSTART_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return format!("ran `{shown}`"),
            Ok(Some(status)) => return format!("`{shown}` failed ({status})"),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return format!(
                    "`{shown}` did not finish within {}s",
                    KICKSTART_TIMEOUT.as_secs()
                );
            }
            // std offers no wait with a timeout; a one-shot command polling a
            // child that normally exits within milliseconds is cheap.
            Ok(None) => std::thread::sleep(KICKSTART_POLL),
            Err(err) => return format!("`{shown}` could not be waited for: {err}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_age(path: &Path, age: Duration) {
        let file = OpenOptions::new().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn touch_creates_then_advances_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keepalive");
        assert_eq!(
            check(&path, Duration::from_secs(10)),
            KeepaliveVerdict::Missing
        );
        touch(&path).unwrap();
        assert!(path.exists());
        // No temp file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        set_age(&path, Duration::from_secs(3600));
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        touch(&path).unwrap();
        let after = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert!(after > before + Duration::from_secs(3000));
        assert!(age(&path).unwrap() < Duration::from_secs(60));
    }

    #[test]
    fn check_reports_fresh_stale_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keepalive");
        assert_eq!(
            check(&path, Duration::from_secs(30)),
            KeepaliveVerdict::Missing
        );
        touch(&path).unwrap();
        assert!(matches!(
            check(&path, Duration::from_secs(30)),
            KeepaliveVerdict::Fresh(_)
        ));
        set_age(&path, Duration::from_secs(120));
        match check(&path, Duration::from_secs(30)) {
            KeepaliveVerdict::Stale(age) => assert!(age >= Duration::from_secs(120)),
            other => panic!("expected stale, got {other:?}"),
        }
    }

    #[test]
    fn domains_name_the_service_target() {
        assert_eq!(LaunchdDomain::parse("system"), Some(LaunchdDomain::System));
        assert_eq!(LaunchdDomain::parse("gui"), Some(LaunchdDomain::Gui));
        assert_eq!(LaunchdDomain::parse("user/501"), None);
        assert_eq!(
            LaunchdDomain::System.service_target("org.agentd.agentd"),
            "system/org.agentd.agentd"
        );
        let uid = current_uid();
        assert_eq!(
            LaunchdDomain::Gui.service_target("org.agentd.agentd"),
            format!("gui/{uid}/org.agentd.agentd")
        );
    }

    #[test]
    fn a_label_with_its_domain_is_kickstarted_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keepalive");
        touch(&path).unwrap();
        set_age(&path, Duration::from_secs(600));
        // `echo` stands in for launchctl: it succeeds, and the output line
        // shows the exact target that would have been restarted.
        let mut out = Vec::new();
        let code = keepalive_check_with(
            &path,
            Duration::from_secs(30),
            Some("gui/501/org.agentd.agentd"),
            Path::new("echo"),
            &mut out,
        );
        let line = String::from_utf8(out).unwrap();
        assert_eq!(code, EXIT_STALE, "{line}");
        assert!(
            line.contains("ran `launchctl kickstart -k gui/501/org.agentd.agentd`"),
            "{line}"
        );
    }

    #[test]
    fn future_mtime_counts_as_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keepalive");
        touch(&path).unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() + Duration::from_secs(600))
            .unwrap();
        assert_eq!(age(&path).unwrap(), Duration::ZERO);
    }

    #[test]
    fn touch_in_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("keepalive");
        assert!(touch(&path).is_err());
    }
}
