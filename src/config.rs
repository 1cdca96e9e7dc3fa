//! Every knob agentd has: defaults, the optional TOML file, environment variables
//! and command-line flags, merged and validated in one place.
//!
//! Each setting is declared once, in `settings::SETTINGS`: name (TOML key),
//! variable, flag, default, parser and bound, meaning. This file reads the
//! sources, runs every value through its entry, and applies the rules that
//! weigh several settings together (the API token's one source, a token for
//! a non-loopback address, a command for the runtimes that need one, the
//! trend ring's size). It is not where a setting is added: that is one entry
//! in the list (and one row in the README, which a test compares).
//!
//! Precedence, lowest first: built-in default < TOML file < environment < flag.
//! The rest of the program receives a typed `Config` and never reads the
//! environment itself. An invalid value is an error that names the setting and
//! the value; the only exception is the history limit, which users already
//! know to fall back to its default with a warning. Its variable is
//! `AGENTD_HISTORY_LIMIT`; the older `AGENT_HISTORY_LIMIT` stays accepted as an
//! alias (when both are set, `AGENTD_HISTORY_LIMIT` wins, with a warning).

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

mod settings;
#[cfg(test)]
mod settings_tests;
mod values;

pub use settings::TREND_MAX_SAMPLES;
use settings::{setting, Parse, Setting, SETTINGS};
pub use values::*;

#[derive(Debug, Error)]
pub enum ConfigError {
    /// A value the setting does not accept: `setting` is the name it was
    /// given under (flag, variable or TOML key) and `key` the setting's own
    /// name when that differs.
    #[error("invalid {setting}={value:?}{}: {reason}", of_setting(.key))]
    Invalid {
        setting: &'static str,
        key: Option<&'static str>,
        value: String,
        reason: String,
    },
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {reason}")]
    ParseFile { path: PathBuf, reason: String },
    #[error("{0}")]
    Refused(String),
}

/// Values given on the command line; they win over everything else.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub config_file: Option<PathBuf>,
    /// Load only what finds the server (`agentd health`): the API token is
    /// not read from any source (its file may be readable by agentd's user
    /// only) and the rule that a non-loopback address needs one is not
    /// applied, since nothing is bound.
    pub address_only: bool,
}

/// The settings part of `agentd serve --help`, made from the list of settings.
pub fn settings_help() -> String {
    settings::help()
}

/// The help of the `serve` flag of the setting called `name` (`listen`,
/// `state_dir`, `config`), made from the list of settings.
pub fn flag_help(name: &str) -> String {
    settings::flag_help(name)
}

/// The systemd credential agentd reads its API token from
/// (`LoadCredential=agentd.api-token` → `$CREDENTIALS_DIRECTORY/agentd.api-token`).
pub const API_TOKEN_CREDENTIAL: &str = "agentd.api-token";

/// What every variable of agentd's own starts with. None of them reaches a
/// child (see `is_own_variable`).
pub const ENV_PREFIX: &str = "AGENTD_";

/// True for a variable that configures agentd itself: every `AGENTD_*` and
/// the history limit's old alias. The runtimes remove each of them from a
/// child's environment (it would otherwise read `AGENTD_API_TOKEN`, or the
/// path of the token's file); the one `AGENTD_` variable a child gets,
/// `AGENTD_EXECUTION_ID`, is set for it afresh.
pub fn is_own_variable(name: &std::ffi::OsStr) -> bool {
    let name = name.as_encoded_bytes();
    name.starts_with(ENV_PREFIX.as_bytes()) || name == HISTORY_LIMIT_ALIAS.as_bytes()
}

/// The values given, each with the name it was given under, so an error can
/// name the right thing.
struct Raw {
    /// By setting name: the text and the flag, variable or TOML key it came
    /// from, the highest-precedence source only.
    values: BTreeMap<&'static str, (String, &'static str)>,
    /// Defaults taken from the environment (`Setting::default_from`), by
    /// setting name.
    defaults: BTreeMap<&'static str, String>,
    /// Warnings found while collecting the values (an alias shadowed by its
    /// new name); `build` passes them on in `Config::warnings`.
    warnings: Vec<String>,
    /// `$CREDENTIALS_DIRECTORY` (systemd's credentials of this service), where
    /// the `agentd.api-token` credential is looked for.
    credentials_directory: Option<PathBuf>,
    /// `Overrides::address_only`.
    address_only: bool,
}

impl Raw {
    fn get(&self, key: &str) -> Option<(&str, &'static str)> {
        self.values.get(key).map(|(v, name)| (v.as_str(), *name))
    }

    /// The setting's default text: from the environment where the setting
    /// says so and it is set, else the list's.
    fn default_of(&self, s: &'static Setting) -> &str {
        self.defaults.get(s.name).map_or(s.default, String::as_str)
    }

    /// The setting's text as given, or its default, with the name to blame.
    fn value_of(&self, s: &'static Setting) -> (&str, &'static str) {
        self.get(s.name).unwrap_or((self.default_of(s), s.env))
    }
}

impl Config {
    /// Load from the process environment (and the config file it names).
    pub fn from_env(overrides: Overrides) -> Result<Config, ConfigError> {
        Config::load(overrides, |name| std::env::var(name).ok())
    }

    /// Load with an explicit environment lookup (tests pass a map).
    /// Precedence: flag > environment (`env`, then its alias) > TOML file >
    /// default.
    pub fn load(
        overrides: Overrides,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut raw = Raw {
            values: BTreeMap::new(),
            defaults: BTreeMap::new(),
            warnings: Vec::new(),
            credentials_directory: env("CREDENTIALS_DIRECTORY")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            address_only: overrides.address_only,
        };
        let above_file = given_outside_the_file(&overrides, &env, &mut raw);
        // The file's own path comes from a flag or the environment only.
        if let Some((path, _)) = above_file.get("config").filter(|(p, _)| !p.is_empty()) {
            for (key, value) in read_toml(Path::new(path))? {
                let s = SETTINGS.iter().find(|s| s.name == key).expect("checked");
                raw.values.insert(s.name, (value, s.name));
            }
        }
        raw.values.extend(above_file);
        for s in SETTINGS {
            let Some(from) = s.default_from else { continue };
            // systemd may pass several colon-separated directories; the first is ours.
            let first = env(from).and_then(|v| v.split(':').next().map(str::to_owned));
            if let Some(first) = first.filter(|v| !v.is_empty()) {
                raw.defaults.insert(s.name, first);
            }
        }
        build(&raw)
    }

    /// Re-read reloadable settings (SIGHUP). Settings that need a restart
    /// (listen address, state dir) keep their current values.
    pub fn reload(&self, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut next = Config::load(
            Overrides {
                listen: Some(self.listen.to_string()),
                state_dir: Some(self.state_dir.clone()),
                config_file: self.config_file.clone(),
                address_only: false,
            },
            env,
        )?;
        next.listen = self.listen;
        next.listen_text = self.listen_text.clone();
        next.state_dir = self.state_dir.clone();
        Ok(next)
    }
}

/// The values the environment and the flags give, the flag winning, each
/// with the name it was given under.
fn given_outside_the_file(
    overrides: &Overrides,
    env: &impl Fn(&str) -> Option<String>,
    raw: &mut Raw,
) -> BTreeMap<&'static str, (String, &'static str)> {
    let mut given = BTreeMap::new();
    for s in SETTINGS {
        let value = env(s.env);
        // The alias counts only where the variable itself is not set.
        if let Some(alias) = s.alias {
            if let Some(old) = env(alias) {
                if value.is_some() {
                    raw.warnings.push(format!(
                        "both {} and {alias} are set; using {} and ignoring {alias}={old:?}",
                        s.env, s.env
                    ));
                } else {
                    given.insert(s.name, (old, alias));
                }
            }
        }
        if let Some(v) = value {
            given.insert(s.name, (v, s.env));
        }
    }
    let flags = [
        ("listen", overrides.listen.clone()),
        ("state_dir", path_text(&overrides.state_dir)),
        ("config", path_text(&overrides.config_file)),
    ];
    for (name, value) in flags {
        let s = setting(name);
        if let (Some(v), Some(flag)) = (value, s.flag) {
            given.insert(s.name, (v, flag));
        }
    }
    given
}

fn path_text(path: &Option<PathBuf>) -> Option<String> {
    path.as_ref().map(|p| p.to_string_lossy().into_owned())
}

fn read_toml(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::ParseFile {
            path: path.to_owned(),
            reason: e.message().to_owned(),
        })?;
    let mut out = Vec::new();
    for (key, value) in table {
        if !SETTINGS.iter().any(|s| s.toml && s.name == key) {
            return Err(ConfigError::ParseFile {
                path: path.to_owned(),
                reason: format!("unknown setting `{key}`"),
            });
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => {
                let words: Vec<String> = items
                    .into_iter()
                    .map(|v| match v {
                        toml::Value::String(s) => s,
                        other => other.to_string(),
                    })
                    .collect();
                shell_words::join(words)
            }
            other => {
                return Err(ConfigError::ParseFile {
                    path: path.to_owned(),
                    reason: format!("`{key}` has an unsupported type: {other}"),
                })
            }
        };
        out.push((key, text));
    }
    Ok(out)
}

fn invalid(setting: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        key: None,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

fn of_setting(key: &Option<&'static str>) -> String {
    key.map(|k| format!(" (setting {k})")).unwrap_or_default()
}

/// Names setting `s` in an error about its value, when the name the value
/// was given under is not the setting's own (a variable, a flag).
fn naming(s: &Setting, mut err: ConfigError) -> ConfigError {
    if let ConfigError::Invalid { setting, key, .. } = &mut err {
        if *setting != s.name && key.is_none() {
            *key = Some(s.name);
        }
    }
    err
}

/// Parse the setting's value (given, or its default) and write it into `c`;
/// an error names the setting, where its value came from, and the value.
fn apply(s: &'static Setting, c: &mut Config, raw: &Raw) -> Result<(), ConfigError> {
    parse_into(s, c, raw).map_err(|e| naming(s, e))
}

fn parse_into(s: &'static Setting, c: &mut Config, raw: &Raw) -> Result<(), ConfigError> {
    let (text, name) = raw.value_of(s);
    // For text, a choice and an address, empty is the default.
    let or_default = if text.is_empty() {
        raw.default_of(s)
    } else {
        text
    };
    let bad = |example: &str| {
        invalid(
            name,
            text,
            format!("expected {}{example}", s.parse.accepts()),
        )
    };
    match s.parse {
        Parse::Int { min, max, set } => match text.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => set(c, n),
            _ => return Err(bad("")),
        },
        Parse::Size { min, max, set } => match parse_bytes(text) {
            Some(n) if (min..=max).contains(&n) => set(c, n),
            _ => return Err(bad(" (e.g. 1048576, 512KiB, 8MiB)")),
        },
        Parse::Time { min, max, set } => match parse_duration(text) {
            Some(d) if d >= min && d <= max => set(c, d),
            _ => return Err(bad(" (e.g. 10, 10s, 500ms, 2m)")),
        },
        Parse::Bool(set) => set(c, parse_bool(text).ok_or_else(|| bad(""))?),
        Parse::Words(set) => set(
            c,
            shell_words::split(text)
                .map_err(|e| invalid(name, text, format!("cannot split into words: {e}")))?,
        ),
        Parse::Text(set) => set(c, Some(or_default.to_owned()).filter(|v| !v.is_empty())),
        Parse::Choice {
            words,
            aliases,
            set,
        } => {
            let word = aliases
                .iter()
                .find(|(alias, _)| *alias == or_default)
                .map_or(or_default, |(_, word)| word);
            let word = words.iter().find(|w| **w == word).ok_or_else(|| {
                invalid(name, or_default, format!("expected {}", s.parse.accepts()))
            })?;
            set(c, word)
        }
        Parse::Listen(set) => set(c, resolve_listen(name, or_default)?, or_default.to_owned()),
        Parse::Lenient(set) => {
            let n = lenient(name, text, raw.default_of(s), &mut c.warnings);
            set(c, n)
        }
        Parse::Rule => {}
    }
    Ok(())
}

/// A positive integer, else `default` with a warning naming the value.
fn lenient(name: &str, text: &str, default: &str, warnings: &mut Vec<String>) -> u64 {
    match text.trim().parse::<i64>() {
        Ok(n) if n > 0 => n as u64,
        _ => {
            warnings.push(format!(
                "invalid {name}={text:?} (expected a positive integer); using {default}"
            ));
            default
                .parse()
                .expect("the list's default is a positive integer")
        }
    }
}

fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" | "" => Some(false),
        _ => None,
    }
}

fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A duration: plain seconds (`10`, `0.5`) or with a unit (`500ms`, `10s`, `2m`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

/// The `listen` setting as an address: `IP:PORT` as written, or
/// `HOST:PORT` resolved once, here, at start. Of the addresses a name
/// resolves to, a loopback one goes before any other and IPv4 before IPv6
/// (127.0.0.1 exists wherever IPv6 may be off); otherwise the resolver's
/// order stands. Choosing loopback first means a name that also names a
/// public address never widens what agentd listens on.
fn resolve_listen(name: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let expected =
        "expected IP:PORT or HOST:PORT, e.g. 127.0.0.1:8420, [::1]:8420 or localhost:8420";
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(invalid(name, text, expected));
    };
    let Ok(port) = port.parse::<u16>() else {
        return Err(invalid(name, text, expected));
    };
    if host.is_empty() || host.contains(':') || host.contains(['[', ']']) {
        return Err(invalid(name, text, expected));
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| invalid(name, text, format!("cannot resolve {host}: {e}")))?
        .collect();
    choose_listen(&addrs)
        .ok_or_else(|| invalid(name, text, format!("{host} resolves to no address")))
}

/// The address to bind among those a name resolved to: loopback first, then
/// IPv4, ties in the resolver's order.
fn choose_listen(addrs: &[SocketAddr]) -> Option<SocketAddr> {
    addrs
        .iter()
        .enumerate()
        .min_by_key(|(i, a)| (!a.ip().is_loopback(), !a.is_ipv4(), *i))
        .map(|(_, a)| *a)
}

/// Where the API token comes from. At most one source may be given: two
/// would leave it to a precedence rule nobody remembers which token is in
/// force, so that is refused, naming both.
#[derive(Debug)]
enum TokenSource {
    /// `AGENTD_API_TOKEN` / `api_token`: the value itself.
    Value(&'static str, String),
    /// `AGENTD_API_TOKEN_FILE` / `api_token_file`: a file holding it.
    File(&'static str, PathBuf),
    /// systemd's `$CREDENTIALS_DIRECTORY/agentd.api-token`.
    Credential(PathBuf),
}

impl TokenSource {
    fn describe(&self) -> String {
        match self {
            TokenSource::Value(name, _) => (*name).to_owned(),
            TokenSource::File(name, path) => format!("{name}={}", path.display()),
            TokenSource::Credential(path) => {
                format!("the credential {API_TOKEN_CREDENTIAL} ({})", path.display())
            }
        }
    }
}

/// The API token from whichever one source gives it, validated: at least 16
/// characters, no surrounding whitespace (a file's one trailing newline is
/// removed first). A file or credential that cannot be read, or is empty,
/// is an error naming its path; no error ever echoes the token.
fn api_token(raw: &Raw) -> Result<Option<String>, ConfigError> {
    let mut sources = Vec::new();
    if let Some((value, name)) = raw.get("api_token").filter(|(v, _)| !v.is_empty()) {
        sources.push(TokenSource::Value(name, value.to_owned()));
    }
    if let Some((path, name)) = raw.get("api_token_file").filter(|(v, _)| !v.is_empty()) {
        sources.push(TokenSource::File(name, PathBuf::from(path)));
    }
    if let Some(dir) = &raw.credentials_directory {
        let path = dir.join(API_TOKEN_CREDENTIAL);
        // A credential the unit names but the store lacks is simply absent
        // (systemd skips it), so only an existing file counts.
        if std::fs::symlink_metadata(&path).is_ok() {
            sources.push(TokenSource::Credential(path));
        }
    }
    if sources.len() > 1 {
        let named: Vec<String> = sources.iter().map(TokenSource::describe).collect();
        return Err(ConfigError::Refused(format!(
            "the API token is given twice: by {}; give it one way only",
            named.join(" and by ")
        )));
    }
    let Some(source) = sources.pop() else {
        return Ok(None);
    };
    let (setting, shown, token) = match source {
        TokenSource::Value(name, value) => (name, "<hidden>".to_owned(), value),
        TokenSource::File(name, path) => {
            let token = read_token_file(&path)
                .map_err(|reason| invalid(name, &path.display().to_string(), reason))?;
            (name, path.display().to_string(), token)
        }
        TokenSource::Credential(path) => {
            let token = read_token_file(&path).map_err(|reason| {
                invalid(
                    "credential agentd.api-token",
                    &path.display().to_string(),
                    reason,
                )
            })?;
            (
                "credential agentd.api-token",
                path.display().to_string(),
                token,
            )
        }
    };
    // A token with surrounding whitespace would pass and then match no
    // request (clients send it trimmed): refuse it, never echo it.
    if token.trim() != token {
        return Err(invalid(
            setting,
            &shown,
            "the token has leading or trailing whitespace; remove it",
        ));
    }
    if token.len() < 16 {
        return Err(invalid(
            setting,
            &shown,
            "a token needs at least 16 characters",
        ));
    }
    Ok(Some(token))
}

/// Most bytes a token file may hold: a token is tens of bytes, and a path
/// pointing at a large file by mistake must not be read whole.
const TOKEN_FILE_MAX: u64 = 4096;

/// A token file's text without its one trailing newline (`\n` or `\r\n`,
/// as `echo` and editors leave it). `Err` is the reason, for the caller to
/// name with the path.
fn read_token_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut bytes = Vec::new();
    file.take(TOKEN_FILE_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() as u64 > TOKEN_FILE_MAX {
        return Err(format!(
            "larger than {TOKEN_FILE_MAX} bytes; is it the token?"
        ));
    }
    let mut text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err("the file is empty".into());
    }
    Ok(text)
}

/// Every setting through its entry in the list, then the rules that weigh
/// several settings together.
fn build(raw: &Raw) -> Result<Config, ConfigError> {
    let mut c = blank();
    c.warnings = raw.warnings.clone();
    for s in SETTINGS {
        apply(s, &mut c, raw)?;
    }
    token_rules(&mut c, raw)?;
    runtime_rules(&mut c)?;
    trend_rule(&c, raw)?;
    if c.runtime.kind == RuntimeKind::Acp
        && c.runtime.acp_permissions == PermissionPolicy::Ask
        && c.api_token.is_none()
        && !raw.address_only
    {
        c.warnings.push(
            "AGENTD_ACP_PERMISSIONS=ask without an API token: any local process, \
             the agent itself included, can answer a permission request over the API \
             (set AGENTD_API_TOKEN_FILE or AGENTD_API_TOKEN)"
                .to_owned(),
        );
    }
    Ok(c)
}

/// The API token from its one source, and the rule that a non-loopback
/// address needs one. `address_only` (`agentd health`) reads no token and
/// binds nothing, so the rule does not apply.
fn token_rules(c: &mut Config, raw: &Raw) -> Result<(), ConfigError> {
    if raw.address_only {
        return Ok(());
    }
    c.api_token = api_token(raw)?;
    if !c.listen.ip().is_loopback() && c.api_token.is_none() {
        let named = if c.listen_text == c.listen.to_string() {
            c.listen.to_string()
        } else {
            format!("{} ({})", c.listen, c.listen_text)
        };
        return Err(ConfigError::Refused(format!(
            "refusing to listen on non-loopback address {named} without an API token \
             (set AGENTD_API_TOKEN or AGENTD_API_TOKEN_FILE, or listen on 127.0.0.1 / [::1])"
        )));
    }
    Ok(())
}

/// What the runtime's settings demand of each other: a command for the
/// runtimes that run one, a default timeout within the largest, and no more
/// ACP turns at once than agent processes.
fn runtime_rules(c: &mut Config) -> Result<(), ConfigError> {
    let r = &mut c.runtime;
    if r.kind == RuntimeKind::Command && r.command.is_empty() {
        return Err(invalid(
            "AGENTD_RUNTIME_CMD",
            "",
            "the command runtime needs a command, e.g. AGENTD_RUNTIME_CMD=\"cat\"",
        ));
    }
    if r.kind == RuntimeKind::Acp && r.acp_command.is_empty() {
        return Err(invalid(
            "AGENTD_ACP_CMD",
            "",
            "the acp runtime needs the agent's command, e.g. AGENTD_ACP_CMD=\"gemini --acp\"",
        ));
    }
    r.default_timeout = r.default_timeout.min(r.max_timeout);
    let agents = r.acp_max_agents;
    if r.kind == RuntimeKind::Acp && c.executor.max_concurrent > agents {
        // A turn needs an agent process of its own: more turns at once than
        // processes would only wait inside the executor's running slots.
        c.warnings.push(format!(
            "AGENTD_MAX_CONCURRENT={} is more than AGENTD_ACP_MAX_AGENTS={agents}; \
             at most {agents} turns run at once",
            c.executor.max_concurrent
        ));
        c.executor.max_concurrent = agents;
    }
    Ok(())
}

/// The leak-trend window must hold at least two samples of the interval and
/// at most `TREND_MAX_SAMPLES` of them.
fn trend_rule(c: &Config, raw: &Raw) -> Result<(), ConfigError> {
    let (window, interval) = (c.health.trend_window, c.health.trend_interval);
    let samples = window.as_secs_f64() / interval.as_secs_f64();
    let max = TREND_MAX_SAMPLES;
    if samples < 2.0 || samples > max as f64 {
        let (value, name) = raw.value_of(setting("trend_window"));
        return Err(invalid(
            name,
            value,
            format!(
                "the window must hold between 2 and {max} samples of \
                 AGENTD_TREND_INTERVAL ({interval:?}); it holds {samples:.0}"
            ),
        ));
    }
    Ok(())
}

/// A `Config` whose every field `build` overwrites: each is written by a
/// setter of the list (or, `api_token` and `warnings`, by `build` itself), so
/// no value here is ever seen. It names every field once, hence its length.
fn blank() -> Config {
    let zero = Duration::ZERO;
    Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        listen_text: String::new(),
        state_dir: PathBuf::new(),
        config_file: None,
        api_token: None,
        history_limit: 0,
        max_connections: 0,
        header_read_timeout: zero,
        idle_timeout: zero,
        max_body_bytes: 0,
        max_header_bytes: 0,
        drain_timeout: zero,
        store: StoreConfig {
            queue: 0,
            max_batch: 0,
            retention_messages: 0,
            synchronous: SyncMode::Full,
            enqueue_timeout: zero,
            quick_check_interval: zero,
            proof_interval: zero,
        },
        runtime: RuntimeConfig {
            kind: RuntimeKind::Echo,
            command: Vec::new(),
            claude_bin: String::new(),
            claude_args: Vec::new(),
            gemini_bin: String::new(),
            gemini_args: Vec::new(),
            codex_bin: String::new(),
            codex_args: Vec::new(),
            codex_sandbox: CodexSandbox::WorkspaceWrite,
            codex_home: PathBuf::new(),
            codex_home_default: true,
            acp_command: Vec::new(),
            acp_max_agents: 0,
            acp_idle: zero,
            acp_permissions: PermissionPolicy::Deny,
            acp_permission_timeout: zero,
            system_prompt: None,
            default_timeout: zero,
            max_timeout: zero,
            stdout_cap: 0,
            stderr_cap: 0,
            kill_grace: zero,
            pipe_drain: zero,
            workdir: PathBuf::new(),
        },
        executor: ExecutorConfig {
            max_concurrent: 0,
            max_queue: 0,
            finished_retained: 0,
            max_subscribers: 0,
            stream_buffer: 0,
            stream_replay_bytes: 0,
            stream_replay_total: 0,
        },
        health: HealthConfig {
            interval: zero,
            keepalive_file: None,
            trigger_after: None,
            self_abort_after: 0,
            max_threads: 0,
            diagnostics_keep: 0,
            nofile_target: 0,
            trend_window: zero,
            trend_interval: zero,
        },
        log_filter: String::new(),
        fault_injection: false,
        warnings: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(Overrides::default(), |k| map.get(k).cloned())
    }

    #[test]
    fn defaults_need_no_environment() {
        let c = load(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8420");
        assert_eq!(c.history_limit, 1000);
        assert_eq!(c.state_dir, PathBuf::from("./agentd-state"));
        assert_eq!(c.runtime.kind, RuntimeKind::Echo);
        assert_eq!(c.runtime.workdir, PathBuf::from("./agentd-state/workspace"));
        assert!(c.warnings.is_empty());
    }

    #[test]
    fn history_limit_falls_back_with_warning() {
        for bad in ["abc", "0", "-5", "1.5", ""] {
            let c = load(&[("AGENT_HISTORY_LIMIT", bad)]).unwrap();
            assert_eq!(c.history_limit, 1000, "value {bad:?}");
            assert_eq!(c.warnings.len(), 1, "value {bad:?}");
            assert!(c.warnings[0].contains("AGENT_HISTORY_LIMIT"));
        }
        assert_eq!(
            load(&[("AGENT_HISTORY_LIMIT", "3")]).unwrap().history_limit,
            3
        );
    }

    #[test]
    fn history_limit_new_name_wins_over_the_alias() {
        let c = load(&[("AGENTD_HISTORY_LIMIT", "5")]).unwrap();
        assert_eq!(c.history_limit, 5);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);

        let c = load(&[("AGENT_HISTORY_LIMIT", "6")]).unwrap();
        assert_eq!(c.history_limit, 6, "the old name still works");
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);

        let c = load(&[("AGENTD_HISTORY_LIMIT", "5"), ("AGENT_HISTORY_LIMIT", "6")]).unwrap();
        assert_eq!(c.history_limit, 5);
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(
            c.warnings[0].contains("using AGENTD_HISTORY_LIMIT")
                && c.warnings[0].contains("AGENT_HISTORY_LIMIT=\"6\""),
            "{}",
            c.warnings[0]
        );

        // An invalid value names the variable it came from.
        let c = load(&[("AGENTD_HISTORY_LIMIT", "many")]).unwrap();
        assert_eq!(c.history_limit, 1000);
        assert!(
            c.warnings[0].contains("invalid AGENTD_HISTORY_LIMIT"),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn invalid_value_names_setting_and_value() {
        let err = load(&[("AGENTD_MAX_CONNECTIONS", "lots")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("AGENTD_MAX_CONNECTIONS"), "{err}");
        assert!(err.contains("lots"), "{err}");
        let err = load(&[("AGENTD_HEALTH_INTERVAL", "soon")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("AGENTD_HEALTH_INTERVAL") && err.contains("soon"),
            "{err}"
        );
    }

    #[test]
    fn non_loopback_without_token_is_refused() {
        let err = load(&[("AGENTD_LISTEN", "0.0.0.0:8420")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("AGENTD_API_TOKEN"), "{err}");
        let ok = load(&[
            ("AGENTD_LISTEN", "0.0.0.0:8420"),
            ("AGENTD_API_TOKEN", "0123456789abcdef0123"),
        ]);
        assert!(ok.is_ok());
    }

    #[test]
    fn listen_takes_a_host_name_resolved_to_loopback_first() {
        let c = load(&[("AGENTD_LISTEN", "localhost:8420")]).unwrap();
        assert!(c.listen.ip().is_loopback(), "{}", c.listen);
        assert_eq!(c.listen.port(), 8420);
        assert_eq!(c.listen_text, "localhost:8420");
        // An address stays what it says.
        let c = load(&[("AGENTD_LISTEN", "[::1]:0")]).unwrap();
        assert_eq!(c.listen.to_string(), "[::1]:0");
        for bad in [
            "localhost",
            "localhost:http",
            ":8420",
            "no-such-host.invalid:8420",
        ] {
            let err = load(&[("AGENTD_LISTEN", bad)]).unwrap_err().to_string();
            assert!(
                err.contains("AGENTD_LISTEN") && err.contains(bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_loopback_rule_applies_to_the_resolved_address() {
        // Names the resolver turns into addresses without asking a server:
        // the C library's numeric shorthand ("0" is 0.0.0.0, "127.1" is
        // 127.0.0.1), which an IP:PORT parse does not accept.
        let err = load(&[("AGENTD_LISTEN", "0:8420")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("API token") && err.contains("0.0.0.0:8420 (0:8420)"),
            "{err}"
        );
        let c = load(&[("AGENTD_LISTEN", "0:8420"), ("AGENTD_API_TOKEN", TOKEN)]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8420");
        let c = load(&[("AGENTD_LISTEN", "127.1:8420")]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8420");
        assert_eq!(c.api_token, None);
    }

    #[test]
    fn a_name_with_several_addresses_binds_loopback_then_ipv4() {
        let pick = |list: &[&str]| {
            let addrs: Vec<SocketAddr> = list.iter().map(|a| a.parse().unwrap()).collect();
            choose_listen(&addrs).map(|a| a.to_string())
        };
        let public_first = ["192.0.2.7:80", "[::1]:80", "127.0.0.1:80"];
        assert_eq!(pick(&public_first).as_deref(), Some("127.0.0.1:80"));
        assert_eq!(
            pick(&["[::1]:80", "192.0.2.7:80"]).as_deref(),
            Some("[::1]:80")
        );
        let none_loopback = ["[2001:db8::1]:80", "192.0.2.7:80", "198.51.100.1:80"];
        assert_eq!(pick(&none_loopback).as_deref(), Some("192.0.2.7:80"));
        assert_eq!(pick(&[]), None);
    }

    #[test]
    fn own_variables_are_every_agentd_one_and_the_alias() {
        use std::ffi::OsStr;
        for own in [
            "AGENTD_API_TOKEN",
            "AGENTD_API_TOKEN_FILE",
            "AGENTD_X",
            HISTORY_LIMIT_ALIAS,
        ] {
            assert!(is_own_variable(OsStr::new(own)), "{own}");
        }
        for other in ["PATH", "MY_AGENTD_X", "AGENT_X", "agentd_api_token"] {
            assert!(!is_own_variable(OsStr::new(other)), "{other}");
        }
    }

    const TOKEN: &str = "0123456789abcdef0123";

    #[test]
    fn token_file_is_read_without_its_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        for written in [
            format!("{TOKEN}\n"),
            format!("{TOKEN}\r\n"),
            TOKEN.to_owned(),
        ] {
            std::fs::write(&path, written).unwrap();
            let c = load(&[("AGENTD_API_TOKEN_FILE", path.to_str().unwrap())]).unwrap();
            assert_eq!(c.api_token.as_deref(), Some(TOKEN));
        }
    }

    #[test]
    fn token_file_errors_name_the_path_and_never_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "0123456789\n").unwrap();
        let spaced = dir.path().join("spaced");
        std::fs::write(&spaced, format!(" {TOKEN}\n")).unwrap();
        let cases = [
            (missing.as_path(), "No such file"),
            (empty.as_path(), "empty"),
            (dir.path(), "cannot read it"),
            (short.as_path(), "16 characters"),
            (spaced.as_path(), "whitespace"),
        ];
        for (path, why) in cases {
            let shown = path.to_str().unwrap();
            let err = load(&[("AGENTD_API_TOKEN_FILE", shown)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("AGENTD_API_TOKEN_FILE"), "{err}");
            assert!(err.contains(shown), "the path is named: {err}");
            assert!(err.contains(why), "{why}: {err}");
            assert!(!err.contains("0123456789"), "token echoed: {err}");
        }
    }

    #[test]
    fn token_from_the_systemd_credential_when_present() {
        let creds = tempfile::tempdir().unwrap();
        let dir = creds.path().to_str().unwrap();
        // The unit names the credential but the store has none: no token.
        let c = load(&[("CREDENTIALS_DIRECTORY", dir)]).unwrap();
        assert_eq!(c.api_token, None);
        std::fs::write(
            creds.path().join(API_TOKEN_CREDENTIAL),
            format!("{TOKEN}\n"),
        )
        .unwrap();
        let c = load(&[("CREDENTIALS_DIRECTORY", dir)]).unwrap();
        assert_eq!(c.api_token.as_deref(), Some(TOKEN));
        std::fs::write(creds.path().join(API_TOKEN_CREDENTIAL), "").unwrap();
        let err = load(&[("CREDENTIALS_DIRECTORY", dir)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(API_TOKEN_CREDENTIAL) && err.contains("empty"),
            "{err}"
        );
    }

    #[test]
    fn a_token_given_two_ways_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, TOKEN).unwrap();
        std::fs::write(dir.path().join(API_TOKEN_CREDENTIAL), TOKEN).unwrap();
        let file = file.to_str().unwrap();
        let creds = dir.path().to_str().unwrap();
        let cases: [&[(&str, &str)]; 3] = [
            &[("AGENTD_API_TOKEN", TOKEN), ("AGENTD_API_TOKEN_FILE", file)],
            &[
                ("AGENTD_API_TOKEN", TOKEN),
                ("CREDENTIALS_DIRECTORY", creds),
            ],
            &[
                ("AGENTD_API_TOKEN_FILE", file),
                ("CREDENTIALS_DIRECTORY", creds),
            ],
        ];
        for vars in cases {
            let err = load(vars).unwrap_err().to_string();
            assert!(err.contains("twice"), "{err}");
            let named = |n: &str| err.contains(n);
            match vars[0].0 {
                "AGENTD_API_TOKEN" if vars[1].0 == "AGENTD_API_TOKEN_FILE" => {
                    assert!(named("AGENTD_API_TOKEN ") && named(file), "{err}")
                }
                "AGENTD_API_TOKEN" => assert!(
                    named("AGENTD_API_TOKEN ") && named(API_TOKEN_CREDENTIAL),
                    "{err}"
                ),
                _ => assert!(named(file) && named(API_TOKEN_CREDENTIAL), "{err}"),
            }
            assert!(!err.contains(TOKEN), "token echoed: {err}");
        }
        // An empty AGENTD_API_TOKEN means none, so the file alone is used.
        let c = load(&[("AGENTD_API_TOKEN", ""), ("AGENTD_API_TOKEN_FILE", file)]).unwrap();
        assert_eq!(c.api_token.as_deref(), Some(TOKEN));
    }

    #[test]
    fn address_only_reads_no_token() {
        let map: HashMap<&str, &str> = [
            ("AGENTD_LISTEN", "0.0.0.0:8420"),
            ("AGENTD_API_TOKEN_FILE", "/nonexistent/token"),
        ]
        .into_iter()
        .collect();
        let c = Config::load(
            Overrides {
                address_only: true,
                ..Default::default()
            },
            |k| map.get(k).map(|v| v.to_string()),
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8420");
        assert_eq!(c.api_token, None);
    }

    #[test]
    fn ask_without_a_token_warns_that_anyone_local_may_answer() {
        let ask = [
            ("AGENTD_RUNTIME", "acp"),
            ("AGENTD_ACP_CMD", "agent --acp"),
            ("AGENTD_ACP_PERMISSIONS", "ask"),
        ];
        let c = load(&ask).unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("ask") && w.contains("any local process")),
            "{:?}",
            c.warnings
        );
        let mut with_token = ask.to_vec();
        with_token.push(("AGENTD_API_TOKEN", TOKEN));
        assert!(load(&with_token).unwrap().warnings.is_empty());
    }

    #[test]
    fn token_with_surrounding_whitespace_is_refused_without_echoing_it() {
        for bad in [
            " 0123456789abcdef0123",
            "0123456789abcdef0123\n",
            "\t0123456789abcdef0123 ",
        ] {
            let err = load(&[("AGENTD_API_TOKEN", bad)]).unwrap_err().to_string();
            assert!(err.contains("AGENTD_API_TOKEN"), "{err}");
            assert!(err.contains("whitespace"), "{err}");
            assert!(!err.contains("0123456789abcdef"), "token echoed: {err}");
        }
        assert!(load(&[("AGENTD_API_TOKEN", "0123456789abcdef0123")]).is_ok());
    }

    #[test]
    fn header_limit_defaults_to_64_kib_and_names_itself_when_invalid() {
        assert_eq!(load(&[]).unwrap().max_header_bytes, 64 << 10);
        assert_eq!(
            load(&[("AGENTD_MAX_HEADER_BYTES", "16KiB")])
                .unwrap()
                .max_header_bytes,
            16 << 10
        );
        let err = load(&[("AGENTD_MAX_HEADER_BYTES", "12")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("AGENTD_MAX_HEADER_BYTES"), "{err}");
    }

    #[test]
    fn state_directory_from_systemd_is_the_default() {
        let c = load(&[("STATE_DIRECTORY", "/var/lib/agentd:/var/lib/other")]).unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/agentd"));
        let c = load(&[
            ("STATE_DIRECTORY", "/var/lib/agentd"),
            ("AGENTD_STATE_DIR", "/srv/agentd"),
        ])
        .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/srv/agentd"));
    }

    #[test]
    fn workdir_follows_the_state_dir_unless_set() {
        let c = load(&[("AGENTD_STATE_DIR", "/srv/agentd")]).unwrap();
        assert_eq!(c.runtime.workdir, PathBuf::from("/srv/agentd/workspace"));
        let c = load(&[
            ("AGENTD_STATE_DIR", "/srv/agentd"),
            ("AGENTD_WORKDIR", "/srv/work"),
        ])
        .unwrap();
        assert_eq!(c.runtime.workdir, PathBuf::from("/srv/work"));
    }

    #[test]
    fn store_proof_interval_defaults_to_a_second_and_is_bounded() {
        assert_eq!(
            load(&[]).unwrap().store.proof_interval,
            Duration::from_secs(1)
        );
        let c = load(&[("AGENTD_STORE_PROOF_INTERVAL", "0")]).unwrap();
        assert_eq!(c.store.proof_interval, Duration::ZERO);
        let err = load(&[("AGENTD_STORE_PROOF_INTERVAL", "2h")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("AGENTD_STORE_PROOF_INTERVAL"), "{err}");
    }

    #[test]
    fn trend_window_must_hold_between_two_and_max_samples() {
        let c = load(&[]).unwrap();
        assert_eq!(c.health.trend_window, Duration::from_secs(86400));
        assert_eq!(c.health.trend_interval, Duration::from_secs(60));
        let c = load(&[
            ("AGENTD_TREND_WINDOW", "2s"),
            ("AGENTD_TREND_INTERVAL", "20ms"),
        ])
        .unwrap();
        assert_eq!(c.health.trend_window, Duration::from_secs(2));
        let err = load(&[
            ("AGENTD_TREND_WINDOW", "720h"),
            ("AGENTD_TREND_INTERVAL", "1s"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("AGENTD_TREND_WINDOW") && err.contains("samples"),
            "{err}"
        );
        let err = load(&[("AGENTD_TREND_INTERVAL", "5ms")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("AGENTD_TREND_INTERVAL"), "{err}");
    }

    #[test]
    fn durations_and_sizes_accept_units() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_bytes("8MiB"), Some(8 << 20));
        assert_eq!(parse_bytes("512K"), Some(512 << 10));
        assert_eq!(parse_bytes("12 parsecs"), None);
    }

    #[test]
    fn toml_file_is_read_and_env_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentd.toml");
        std::fs::write(
            &path,
            "history_limit = 7\nmax_concurrent = 2\nruntime = \"command\"\nruntime_cmd = [\"cat\", \"-\"]\n",
        )
        .unwrap();
        let map: HashMap<&str, &str> = [("AGENT_HISTORY_LIMIT", "9")].into_iter().collect();
        let c = Config::load(
            Overrides {
                config_file: Some(path.clone()),
                ..Default::default()
            },
            |k| map.get(k).map(|v| v.to_string()),
        )
        .unwrap();
        assert_eq!(c.history_limit, 9);
        assert_eq!(c.executor.max_concurrent, 2);
        assert_eq!(c.runtime.command, vec!["cat", "-"]);

        std::fs::write(&path, "histroy_limit = 7\n").unwrap();
        let err = Config::load(
            Overrides {
                config_file: Some(path),
                ..Default::default()
            },
            |_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("histroy_limit"), "{err}");
    }

    #[test]
    fn codex_settings_and_its_home() {
        let c = load(&[
            ("AGENTD_RUNTIME", "codex"),
            ("AGENTD_STATE_DIR", "/srv/agentd"),
        ])
        .unwrap();
        assert_eq!(c.runtime.kind, RuntimeKind::Codex);
        assert_eq!(c.runtime.codex_bin, "codex");
        assert_eq!(c.runtime.codex_sandbox, CodexSandbox::WorkspaceWrite);
        assert_eq!(c.runtime.codex_home, PathBuf::from("/srv/agentd/codex"));
        assert!(c.runtime.codex_home_default);
        let c = load(&[
            ("AGENTD_RUNTIME", "codex"),
            ("AGENTD_CODEX_SANDBOX", "danger-full-access"),
            (
                "AGENTD_CODEX_ARGS",
                "-m gpt-5 -c 'model_reasoning_effort=\"low\"'",
            ),
            ("CODEX_HOME", "/home/op/.codex"),
        ])
        .unwrap();
        assert_eq!(c.runtime.codex_sandbox, CodexSandbox::DangerFullAccess);
        assert_eq!(
            c.runtime.codex_args,
            vec!["-m", "gpt-5", "-c", "model_reasoning_effort=\"low\""]
        );
        assert_eq!(c.runtime.codex_home, PathBuf::from("/home/op/.codex"));
        assert!(!c.runtime.codex_home_default);
        let err = load(&[("AGENTD_CODEX_SANDBOX", "full-auto")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("AGENTD_CODEX_SANDBOX") && err.contains("full-auto"),
            "{err}"
        );
    }
}
