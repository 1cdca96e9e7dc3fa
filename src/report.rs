//! `agentd health`: ask a running server for `/health` and tell a person (or a
//! Docker `HEALTHCHECK`, or cron) what it says.
//!
//! The exit code is the contract for programs: 0 healthy, 1 the server answered
//! but is not healthy (degraded, starting, stopping), 2 no usable answer
//! (nothing listening, timeout, not agentd). The text is for people: the
//! verdict, failing checks first with their detail, gauges against their
//! limits, the watchdog state and, when the server keeps them, trends with
//! suspected leaks. `--json` prints the raw body instead.
//!
//! The address is `--url` (`http://HOST:PORT`, `HOST:PORT`, or `unix:/PATH`
//! for a Unix socket systemd passes by socket activation), else the `listen`
//! setting loaded by `config` exactly as `agentd serve` loads it (flag, env,
//! config file). Every wait is bounded by one overall timeout.
//!
//! Not here: deciding health (the server does), parsing arguments (`main`).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use thiserror::Error;

use crate::config::{Config, Overrides};

/// Largest `/health` answer read. A real one is a few KiB; anything bigger is
/// not agentd.
const MAX_ANSWER_BYTES: u64 = 1 << 20;

/// Exit codes (also documented in `--help`).
pub const EXIT_HEALTHY: u8 = 0;
pub const EXIT_UNHEALTHY: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 2;

/// What `agentd health` was asked.
#[derive(Debug, Clone)]
pub struct HealthRequest {
    /// Explicit server address; wins over the configuration.
    pub url: Option<String>,
    /// `--listen`, kept for compatibility: an override of the `listen` setting.
    pub listen: Option<String>,
    /// `--config`: the TOML file `agentd serve` reads.
    pub config_file: Option<PathBuf>,
    /// `/health?deep=1`: run the checks now.
    pub deep: bool,
    /// Print the raw body instead of the report.
    pub json: bool,
    /// Bound on the whole exchange (connect, send, read). `--timeout`
    /// defaults to 5 s: well under Docker's default HEALTHCHECK timeout (30 s)
    /// and longer than `--deep` needs (each check has a deadline of half the
    /// health interval).
    pub timeout: Duration,
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// TCP: the `host:port` to connect to and the path prefix before `/health`.
    Tcp {
        authority: String,
        prefix: String,
    },
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp { authority, prefix } => write!(f, "http://{authority}{prefix}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Error)]
pub enum ReportError {
    #[error("invalid --url {url:?}: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("cannot tell where agentd listens: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot reach {target}: {reason}")]
    Unreachable { target: String, reason: String },
    #[error("{target} did not answer within {timeout:?}")]
    Timeout { target: String, timeout: Duration },
    #[error("{target} answered, but not like agentd: {reason}")]
    NotAgentd { target: String, reason: String },
}

/// Parse `--url`.
pub fn parse_url(url: &str) -> Result<Target, ReportError> {
    let bad = |reason| ReportError::BadUrl {
        url: url.to_owned(),
        reason,
    };
    if let Some(path) = url.strip_prefix("unix:") {
        let path = path.trim_start_matches("//");
        if !path.starts_with('/') {
            return Err(bad(
                "a Unix socket needs an absolute path, e.g. unix:/run/agentd.sock",
            ));
        }
        return Ok(Target::Unix(PathBuf::from(path)));
    }
    if url.starts_with('/') {
        return Ok(Target::Unix(PathBuf::from(url)));
    }
    if url.starts_with("https://") {
        return Err(bad(
            "agentd speaks plain HTTP; put a TLS proxy's inner address here",
        ));
    }
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(bad("no host, e.g. http://127.0.0.1:8420"));
    }
    let authority = if authority.rsplit_once(':').is_some_and(|(_, p)| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !authority.ends_with(']')
    }) {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    // `/health` is appended; a URL that already names it is accepted too.
    let prefix = path
        .trim_end_matches('/')
        .trim_end_matches("/health")
        .to_owned();
    Ok(Target::Tcp { authority, prefix })
}

/// The server's address from the configuration, as `agentd serve` would bind
/// it. A wildcard address (`0.0.0.0`, `::`) is asked on loopback.
pub fn target_from_config(
    listen: Option<String>,
    config_file: Option<PathBuf>,
) -> Result<Target, ReportError> {
    let config = Config::from_env(Overrides {
        listen,
        state_dir: None,
        config_file,
        address_only: true,
    })?;
    Ok(target_for_listen(config.listen))
}

fn target_for_listen(listen: SocketAddr) -> Target {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Target::Tcp {
        authority: addr.to_string(),
        prefix: String::new(),
    }
}

/// An HTTP answer: status code and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// `GET {path}` on the target, HTTP/1.0 (the server closes after answering),
/// everything within `timeout`.
pub fn fetch(target: &Target, path: &str, timeout: Duration) -> Result<Answer, ReportError> {
    let deadline = Instant::now() + timeout;
    let name = target.to_string();
    let io_err = |e: std::io::Error| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            ReportError::Timeout {
                target: name.clone(),
                timeout,
            }
        } else {
            ReportError::Unreachable {
                target: name.clone(),
                reason: e.to_string(),
            }
        }
    };
    let raw = match target {
        Target::Tcp { authority, prefix } => {
            let addrs: Vec<SocketAddr> = authority.to_socket_addrs().map_err(io_err)?.collect();
            let mut last = None;
            let mut stream = None;
            for addr in addrs {
                let left = remaining(deadline).ok_or_else(|| io_err(timed_out()))?;
                match TcpStream::connect_timeout(&addr, left) {
                    Ok(s) => {
                        stream = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let stream = stream.ok_or_else(|| {
                io_err(last.unwrap_or_else(|| std::io::Error::other("no address")))
            })?;
            let path = format!("{prefix}{path}");
            exchange(stream, authority, &path, deadline).map_err(io_err)?
        }
        Target::Unix(p) => {
            let stream = UnixStream::connect(p).map_err(io_err)?;
            exchange(stream, "localhost", path, deadline).map_err(io_err)?
        }
    };
    let text = String::from_utf8_lossy(&raw);
    let not_agentd = |reason: &str| ReportError::NotAgentd {
        target: name.clone(),
        reason: reason.to_owned(),
    };
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| not_agentd("no HTTP header"))?;
    let status = head
        .strip_prefix("HTTP/1.")
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| not_agentd("not an HTTP status line"))?;
    Ok(Answer {
        status,
        body: body.to_owned(),
    })
}

fn timed_out() -> std::io::Error {
    std::io::Error::from(std::io::ErrorKind::TimedOut)
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// A stream both kinds of socket offer: timeouts per read and write.
trait Timed: Read + Write {
    fn set_timeouts(&self, d: Duration) -> std::io::Result<()>;
}

impl Timed for TcpStream {
    fn set_timeouts(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

impl Timed for UnixStream {
    fn set_timeouts(&self, d: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(d))?;
        self.set_write_timeout(Some(d))
    }
}

/// Send the request and read the whole answer, renewing the per-call timeout
/// from the overall deadline so a server that drips bytes cannot stretch it.
fn exchange(
    mut stream: impl Timed,
    host: &str,
    path: &str,
    deadline: Instant,
) -> std::io::Result<Vec<u8>> {
    stream.set_timeouts(remaining(deadline).ok_or_else(timed_out)?)?;
    // One buffer, one write: `write!` on a socket would send each fragment
    // as its own segment.
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\nUser-Agent: agentd-health\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        stream.set_timeouts(remaining(deadline).ok_or_else(timed_out)?)?;
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(raw);
        }
        raw.extend_from_slice(&chunk[..n]);
        if raw.len() as u64 > MAX_ANSWER_BYTES {
            return Err(std::io::Error::other("answer larger than 1 MiB"));
        }
    }
}

/// What `agentd health` prints and its exit code.
#[derive(Debug)]
pub struct Outcome {
    pub stdout: String,
    pub stderr: String,
    pub code: u8,
}

/// Run `agentd health` (everything but printing and exiting).
pub fn run(req: &HealthRequest) -> Outcome {
    let unreachable = |e: ReportError| Outcome {
        stdout: String::new(),
        stderr: format!("agentd health: {e}\n"),
        code: EXIT_UNREACHABLE,
    };
    let target = match &req.url {
        Some(url) => parse_url(url),
        None => target_from_config(req.listen.clone(), req.config_file.clone()),
    };
    let target = match target {
        Ok(t) => t,
        Err(e) => return unreachable(e),
    };
    let path = if req.deep {
        "/health?deep=1"
    } else {
        "/health"
    };
    let answer = match fetch(&target, path, req.timeout) {
        Ok(a) => a,
        Err(e) => return unreachable(e),
    };
    let body: Value = match serde_json::from_str(&answer.body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return unreachable(ReportError::NotAgentd {
                target: target.to_string(),
                reason: format!("HTTP {} without a JSON /health body", answer.status),
            })
        }
    };
    let healthy = answer.status == 200 && body["status"] == "healthy";
    let code = if healthy {
        EXIT_HEALTHY
    } else {
        EXIT_UNHEALTHY
    };
    let stdout = if req.json {
        format!("{}\n", answer.body.trim_end())
    } else {
        render(&body, &target, unix_now())
    };
    Outcome {
        stdout,
        stderr: String::new(),
        code,
    }
}

fn unix_now() -> f64 {
    crate::clock::unix_now()
}

/// Column where values start in the report.
const LABEL_WIDTH: usize = 22;

/// The report a person reads, from a `/health` body. Fields the server does
/// not send (older or newer versions) are left out, never invented.
pub fn render(h: &Value, target: &Target, now: f64) -> String {
    let mut out = String::new();
    let status = h["status"].as_str().unwrap_or("unknown");
    let _ = write!(
        out,
        "agentd {} at {target}: {}",
        str_or(&h["version"], "?"),
        status.to_uppercase()
    );
    if let Some(up) = h["uptime_seconds"].as_f64() {
        let _ = write!(out, " (up {})", duration(up));
    }
    out.push('\n');
    if let Some(d) = h["detail"].as_str() {
        let _ = writeln!(out, "  {d}");
    }

    if let Some(checks) = h["checks"].as_object().filter(|c| !c.is_empty()) {
        out.push_str("\nchecks (failing first)\n");
        let mut list: Vec<(&String, &Value)> = checks.iter().collect();
        list.sort_by_key(|(name, c)| (c["status"] == "ok", name.as_str()));
        for (name, c) in list {
            let st = str_or(&c["status"], "?");
            let mark = if st == "ok" { "ok  " } else { "FAIL" };
            let ms = c["ms"]
                .as_f64()
                .map(|m| format!("{m:.2} ms"))
                .unwrap_or_default();
            let _ = write!(out, "  {mark} {name:<w$} {ms:>10}", w = LABEL_WIDTH - 5);
            if st != "ok" && st != "failed" {
                let _ = write!(out, "  {st}");
            }
            if let Some(d) = c["detail"].as_str() {
                let _ = write!(out, "  {d}");
            }
            out.push('\n');
        }
    }

    let d = &h["diagnostics"];
    if d.is_object() {
        out.push_str("\ngauges\n");
        gauge(&mut out, "open fds", &d["open_fds"], &d["fd_soft_limit"]);
        gauge(
            &mut out,
            "history",
            &d["conversation_history_size"],
            &d["conversation_history_limit"],
        );
        gauge(&mut out, "threads", &d["thread_count"], &d["thread_limit"]);
        gauge(
            &mut out,
            "executions running",
            &d["running_executions"],
            &d["max_concurrent"],
        );
        gauge(
            &mut out,
            "executions queued",
            &d["queued_executions"],
            &d["max_queue"],
        );
        gauge(
            &mut out,
            "store queue",
            &d["store_queue"],
            &d["store_queue_limit"],
        );
        gauge(
            &mut out,
            "tokio tasks",
            &d["tokio_alive_tasks"],
            &Value::Null,
        );
        if let Some(rss) = d["rss_bytes"].as_f64().filter(|v| *v >= 0.0) {
            line(&mut out, "rss", &mib(rss));
        }
    }

    let a = &h["accept_loop"];
    if a.is_object() {
        let open = match a["connections_max"].as_u64() {
            Some(max) => format!("{} / {max}", num(&a["connections_open"])),
            None => num(&a["connections_open"]),
        };
        let mut text = format!(
            "{open} open, {} accepted, {} rejected, {} requests",
            num(&a["connections_total"]),
            num(&a["connections_rejected"]),
            num(&a["requests_total"]),
        );
        if let Some(s) = a["saturated"].as_bool() {
            text.push_str(if s { ", SATURATED" } else { ", not saturated" });
        }
        if let Some(r) = a["rejected_per_second"].as_f64().filter(|r| *r > 0.0) {
            let _ = write!(text, " ({r:.1} rejected/s)");
        }
        out.push_str("\naccept loop\n");
        line(&mut out, "connections", &text);
    }

    let w = &h["watchdog"];
    if w.is_object() {
        out.push_str("\nwatchdog\n");
        let interval = w["interval_ms"]
            .as_f64()
            .map(|ms| format!(", tick every {}", duration(ms / 1000.0)))
            .unwrap_or_default();
        line(
            &mut out,
            "mode",
            &format!("{}{interval}", str_or(&w["mode"], "?")),
        );
        line(&mut out, "last tick", &ago(&w["last_tick_at"], now));
        line(&mut out, "last passing tick", &ago(&w["last_ok_at"], now));
        line(
            &mut out,
            "failures in a row",
            &num(&w["consecutive_failures"]),
        );
        line(
            &mut out,
            "ticks / pings sent",
            &format!("{} / {}", num(&w["ticks"]), num(&w["pings_sent"])),
        );
    }

    let r = &h["runtime"];
    if r.is_object() {
        out.push_str("\nruntime\n");
        let mut text = str_or(&r["name"], "?").to_owned();
        if let Some(c) = r["command"].as_str().filter(|c| !c.is_empty()) {
            let _ = write!(text, " ({c})");
        }
        if let Some(v) = r["version"].as_str().filter(|v| !v.is_empty()) {
            let _ = write!(text, ", version {v}");
        }
        if r["runnable"] == Value::Bool(false) {
            text.push_str(", NOT RUNNABLE");
        }
        line(&mut out, "name", &text);
    }

    let t = &h["trends"];
    if t.is_object() {
        out.push_str("\ntrends\n");
        let samples = match &t["samples"] {
            Value::Array(a) => a.len().to_string(),
            v => num(v),
        };
        line(
            &mut out,
            "window",
            &format!(
                "{} samples every {}, over {}",
                samples,
                t["sample_interval_seconds"]
                    .as_f64()
                    .map(duration)
                    .unwrap_or_else(|| "?".into()),
                t["window_seconds"]
                    .as_f64()
                    .map(duration)
                    .unwrap_or_else(|| "?".into()),
            ),
        );
        let leaks: Vec<&str> = t["suspected_leak"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(slopes) = t["slope_per_hour"].as_object() {
            for (name, slope) in slopes {
                let Some(s) = slope.as_f64() else { continue };
                let mark = if leaks.contains(&name.as_str()) {
                    "  SUSPECTED LEAK"
                } else {
                    ""
                };
                let label = trend_label(name);
                let value = if name == "rss_bytes" {
                    format!("{}{}/h", if s < 0.0 { "-" } else { "+" }, mib(s.abs()))
                } else {
                    format!("{s:+.2}/h")
                };
                line(&mut out, label, &format!("{value}{mark}"));
            }
        }
        if leaks.is_empty() {
            line(&mut out, "suspected leaks", "none");
        } else {
            line(&mut out, "suspected leaks", &leaks.join(", "));
        }
    }
    out
}

/// The report's name for a trend gauge (as in its gauges section).
fn trend_label(gauge: &str) -> &str {
    match gauge {
        "thread_count" => "threads",
        "open_fds" => "open fds",
        "rss_bytes" => "rss",
        "tokio_alive_tasks" => "tokio tasks",
        "conversation_history_size" => "history",
        "store_queue" => "store queue",
        other => other,
    }
}

fn line(out: &mut String, label: &str, value: &str) {
    let _ = writeln!(out, "  {label:<LABEL_WIDTH$} {value}");
}

/// `value / limit (pct%)` when the server sends a limit, else the value.
fn gauge(out: &mut String, label: &str, value: &Value, limit: &Value) {
    let Some(v) = value.as_f64() else { return };
    if v < 0.0 {
        line(out, label, "unreadable");
        return;
    }
    match limit.as_f64().filter(|l| *l > 0.0) {
        Some(l) if l >= 9.0e15 => line(out, label, &format!("{} / unlimited", num(value))),
        Some(l) => line(
            out,
            label,
            &format!("{} / {} ({:.0}%)", num(value), num(limit), 100.0 * v / l),
        ),
        None => line(out, label, &num(value)),
    }
}

fn str_or<'a>(v: &'a Value, default: &'a str) -> &'a str {
    v.as_str().unwrap_or(default)
}

/// An integer-looking number without a fraction, else two decimals.
fn num(v: &Value) -> String {
    match v {
        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        Value::Number(n) => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
        _ => "?".into(),
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

fn ago(at: &Value, now: f64) -> String {
    match at.as_f64() {
        Some(t) => format!("{} ago", duration((now - t).max(0.0))),
        None => "never".into(),
    }
}

/// `1d 2h`, `3h 4m`, `5m 6s`, `7.3 s`, `250 ms`.
fn duration(secs: f64) -> String {
    if secs < 1.0 {
        return format!("{:.0} ms", secs * 1000.0);
    }
    if secs < 60.0 {
        let text = format!("{secs:.1} s");
        return text.replace(".0 s", " s");
    }
    let s = secs as u64;
    let (d, h, m, s) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    match (d, h) {
        (0, 0) => format!("{m}m {s}s"),
        (0, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn url_forms() {
        let tcp = |a: &str, p: &str| Target::Tcp {
            authority: a.into(),
            prefix: p.into(),
        };
        assert_eq!(
            parse_url("127.0.0.1:8420").unwrap(),
            tcp("127.0.0.1:8420", "")
        );
        assert_eq!(parse_url("http://[::1]:9/").unwrap(), tcp("[::1]:9", ""));
        assert_eq!(
            parse_url("http://localhost").unwrap(),
            tcp("localhost:80", "")
        );
        assert_eq!(
            parse_url("http://h:1/agentd/health").unwrap(),
            tcp("h:1", "/agentd")
        );
        assert_eq!(
            parse_url("unix:/run/agentd.sock").unwrap(),
            Target::Unix("/run/agentd.sock".into())
        );
        assert_eq!(
            parse_url("/run/agentd.sock").unwrap(),
            Target::Unix("/run/agentd.sock".into())
        );
        for bad in ["unix:relative.sock", "https://h:1", "http://"] {
            let e = parse_url(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn wildcard_listen_is_asked_on_loopback() {
        let t = target_for_listen("0.0.0.0:8420".parse().unwrap());
        assert_eq!(t.to_string(), "http://127.0.0.1:8420");
        let t = target_for_listen("[::]:8420".parse().unwrap());
        assert_eq!(t.to_string(), "http://[::1]:8420");
    }

    #[test]
    fn report_puts_failing_checks_first_and_gauges_against_limits() {
        let body = json!({
            "status": "degraded",
            "detail": "store: database is locked",
            "version": "9.9.9",
            "uptime_seconds": 3725.0,
            "checks": {
                "executor": {"status": "ok", "ms": 0.1},
                "store": {"status": "failed", "ms": 12.5, "detail": "database is locked"},
                "self_probe": {"status": "timeout", "ms": 500.0, "detail": "no answer"}
            },
            "diagnostics": {"open_fds": 23, "fd_soft_limit": 4096,
                "conversation_history_size": 120, "conversation_history_limit": 1000,
                "thread_count": 9, "rss_bytes": 10485760},
            "accept_loop": {"connections_open": 4, "connections_max": 4, "connections_total": 9,
                "connections_rejected": 3, "requests_total": 20, "saturated": true,
                "rejected_per_second": 2.5},
            "runtime": {"name": "claude-code", "command": "claude", "runnable": false, "version": null},
            "watchdog": {"mode": "systemd", "interval_ms": 10000, "last_tick_at": 990.0,
                "last_ok_at": null, "consecutive_failures": 2, "ticks": 7, "pings_sent": 5},
            "trends": {"window_seconds": 3600, "sample_interval_seconds": 30, "samples": 120,
                "slope_per_hour": {"open_fds": 12.0, "rss_bytes": -1048576.0},
                "suspected_leak": ["open_fds"]}
        });
        let target = parse_url("127.0.0.1:1").unwrap();
        let text = render(&body, &target, 1000.0);
        assert!(
            text.starts_with("agentd 9.9.9 at http://127.0.0.1:1: DEGRADED (up 1h 2m)"),
            "{text}"
        );
        let store = text.find("FAIL self_probe").unwrap();
        let store2 = text.find("FAIL store").unwrap();
        let ok = text.find("ok   executor").unwrap();
        assert!(store < ok && store2 < ok, "{text}");
        assert!(text.contains("database is locked"), "{text}");
        assert!(text.contains("23 / 4096 (1%)"), "{text}");
        assert!(text.contains("120 / 1000 (12%)"), "{text}");
        assert!(text.contains("10.0 MiB"), "{text}");
        assert!(text.contains("10 s ago"), "{text}");
        assert!(
            text.contains(
                "4 / 4 open, 9 accepted, 3 rejected, 20 requests, SATURATED (2.5 rejected/s)"
            ),
            "{text}"
        );
        assert!(
            text.contains("claude-code (claude), NOT RUNNABLE"),
            "{text}"
        );
        assert!(text.contains("never"), "{text}");
        let trend = text.lines().find(|l| l.contains("/h  SUSPECTED")).unwrap();
        assert_eq!(
            trend.split_whitespace().collect::<Vec<_>>(),
            ["open", "fds", "+12.00/h", "SUSPECTED", "LEAK"]
        );
        assert!(text.contains("-1.0 MiB/h"), "{text}");
        let leaks = text
            .lines()
            .find(|l| l.contains("suspected leaks"))
            .unwrap();
        assert!(leaks.ends_with(" open_fds"), "{text}");
    }

    #[test]
    fn report_leaves_out_what_the_server_does_not_send() {
        let text = render(
            &json!({"status": "starting"}),
            &Target::Unix("/s".into()),
            0.0,
        );
        assert_eq!(text, "agentd ? at unix:/s: STARTING\n");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(0.25), "250 ms");
        assert_eq!(duration(7.31), "7.3 s");
        assert_eq!(duration(10.0), "10 s");
        assert_eq!(duration(125.0), "2m 5s");
        assert_eq!(duration(90_061.0), "1d 1h");
    }
}
