//! Validates the launchd job definitions in `launchd/` without a Mac: each
//! file must parse as an XML property list (Python's `plistlib`, the same
//! format rules as Apple's parser), use only keys launchd.plist(5) documents,
//! with the documented value types, and the two jobs must agree with each
//! other (same keepalive file, the check restarts the right label, the max
//! age leaves room for a restart).
//!
//! The same holds for the per-user LaunchAgents in `launchd/LaunchAgents/`,
//! which must also carry what a user's job lacks by default (`PATH` with the
//! npm/Homebrew directories, `HOME`, a `Umask`, a soft `NumberOfFiles`), and
//! for `keepalive-check`'s built-in `--max-age`, which must satisfy the same
//! rule as the plists.
//!
//! Not here: whether launchd really restarts agentd (not testable on Linux);
//! the keepalive-check logic itself (tests/init.rs).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Every top-level key launchd.plist(5) documents, with the value type it
/// takes. A key not listed here is almost always a typo that launchd would
/// silently ignore (e.g. `KeepAlives`), which is why the test refuses it.
const DOCUMENTED_KEYS: &[(&str, &str)] = &[
    ("Label", "string"),
    ("Disabled", "bool"),
    ("UserName", "string"),
    ("GroupName", "string"),
    ("inetdCompatibility", "dict"),
    ("LimitLoadToHosts", "array"),
    ("LimitLoadFromHosts", "array"),
    ("LimitLoadToSessionType", "string|array"),
    ("LimitLoadToHardware", "dict"),
    ("LimitLoadFromHardware", "dict"),
    ("Program", "string"),
    ("ProgramArguments", "array"),
    ("EnableGlobbing", "bool"),
    ("EnableTransactions", "bool"),
    ("EnablePressuredExit", "bool"),
    ("OnDemand", "bool"),
    ("KeepAlive", "bool|dict"),
    ("RunAtLoad", "bool"),
    ("RootDirectory", "string"),
    ("WorkingDirectory", "string"),
    ("EnvironmentVariables", "dict"),
    ("Umask", "integer|string"),
    ("TimeOut", "integer"),
    ("ExitTimeOut", "integer"),
    ("ThrottleInterval", "integer"),
    ("InitGroups", "bool"),
    ("WatchPaths", "array"),
    ("QueueDirectories", "array"),
    ("StartOnMount", "bool"),
    ("StartInterval", "integer"),
    ("StartCalendarInterval", "dict|array"),
    ("StandardInPath", "string"),
    ("StandardOutPath", "string"),
    ("StandardErrorPath", "string"),
    ("Debug", "bool"),
    ("WaitForDebugger", "bool"),
    ("SoftResourceLimits", "dict"),
    ("HardResourceLimits", "dict"),
    ("Nice", "integer"),
    ("ProcessType", "string"),
    ("AbandonProcessGroup", "bool"),
    ("LowPriorityIO", "bool"),
    ("LowPriorityBackgroundIO", "bool"),
    ("MaterializeDatalessFiles", "bool"),
    ("LaunchOnlyOnce", "bool"),
    ("MachServices", "dict"),
    ("Sockets", "dict"),
    ("LaunchEvents", "dict"),
    ("SessionCreate", "bool"),
    ("LegacyTimers", "bool"),
    ("AssociatedBundleIdentifiers", "string|array"),
];

/// Keys of `SoftResourceLimits` / `HardResourceLimits` (all integers).
const RESOURCE_LIMIT_KEYS: &[&str] = &[
    "Core",
    "CPU",
    "Data",
    "FileSize",
    "MemoryLock",
    "NumberOfFiles",
    "NumberOfProcesses",
    "ResidentSetSize",
    "Stack",
];

/// Keys of a `KeepAlive` dictionary.
const KEEPALIVE_KEYS: &[(&str, &str)] = &[
    ("SuccessfulExit", "bool"),
    ("NetworkState", "bool"),
    ("PathState", "dict"),
    ("OtherJobEnabled", "dict"),
    ("Crashed", "bool"),
];

/// Turns a plist into JSON that keeps each value's plist type, so booleans,
/// integers and strings are not confused. Refuses binary plists: the files are
/// meant to be read and reviewed as XML.
const PLIST_TO_JSON: &str = r#"
import datetime, json, plistlib, sys
data = open(sys.argv[1], "rb").read()
if not data.lstrip().startswith(b"<?xml"):
    sys.exit("not an XML property list")
def typed(v):
    if isinstance(v, bool): return {"type": "bool", "value": v}
    if isinstance(v, int): return {"type": "integer", "value": v}
    if isinstance(v, float): return {"type": "real", "value": v}
    if isinstance(v, str): return {"type": "string", "value": v}
    if isinstance(v, bytes): return {"type": "data", "value": None}
    if isinstance(v, datetime.datetime): return {"type": "date", "value": v.isoformat()}
    if isinstance(v, list): return {"type": "array", "value": [typed(x) for x in v]}
    if isinstance(v, dict): return {"type": "dict", "value": {k: typed(x) for k, x in v.items()}}
    sys.exit("unexpected value type %r" % type(v))
print(json.dumps(typed(plistlib.loads(data, fmt=plistlib.FMT_XML))))
"#;

/// A parsed plist value with its type.
#[derive(Debug, Clone)]
struct Typed {
    kind: String,
    value: Value,
}

impl Typed {
    fn from_json(v: &Value) -> Typed {
        Typed {
            kind: v["type"].as_str().unwrap().to_owned(),
            value: v["value"].clone(),
        }
    }
    fn dict(&self) -> BTreeMap<String, Typed> {
        assert_eq!(self.kind, "dict");
        self.value
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), Typed::from_json(v)))
            .collect()
    }
    fn array(&self) -> Vec<Typed> {
        assert_eq!(self.kind, "array");
        self.value
            .as_array()
            .unwrap()
            .iter()
            .map(Typed::from_json)
            .collect()
    }
    fn str(&self) -> &str {
        assert_eq!(self.kind, "string", "{self:?}");
        self.value.as_str().unwrap()
    }
    fn int(&self) -> i64 {
        assert_eq!(self.kind, "integer", "{self:?}");
        self.value.as_i64().unwrap()
    }
    fn bool(&self) -> bool {
        assert_eq!(self.kind, "bool", "{self:?}");
        self.value.as_bool().unwrap()
    }
}

fn launchd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("launchd")
}

/// Parse `path` as an XML plist whose root is a dictionary.
fn parse(path: &Path) -> Result<BTreeMap<String, Typed>, String> {
    let output = Command::new("python3")
        .arg("-c")
        .arg(PLIST_TO_JSON)
        .arg(path)
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{} is not a valid XML property list: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let json: Value = serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())?;
    let root = Typed::from_json(&json);
    if root.kind != "dict" {
        return Err(format!(
            "{}: root is a {}, not a dict",
            path.display(),
            root.kind
        ));
    }
    Ok(root.dict())
}

fn type_matches(expected: &str, actual: &str) -> bool {
    expected.split('|').any(|t| t == actual)
}

/// Every problem with a job definition: undocumented keys, wrong types,
/// missing required keys.
fn problems(job: &BTreeMap<String, Typed>) -> Vec<String> {
    let mut found = Vec::new();
    for (key, value) in job {
        let Some((_, expected)) = DOCUMENTED_KEYS.iter().find(|(k, _)| k == key) else {
            found.push(format!("undocumented key {key}"));
            continue;
        };
        if !type_matches(expected, &value.kind) {
            found.push(format!(
                "{key} is a {}, launchd expects {expected}",
                value.kind
            ));
            continue;
        }
        match key.as_str() {
            "ProgramArguments" | "WatchPaths" | "QueueDirectories" => {
                for (i, item) in value.array().iter().enumerate() {
                    if item.kind != "string" {
                        found.push(format!("{key}[{i}] is a {}, expected string", item.kind));
                    }
                }
            }
            "EnvironmentVariables" => {
                for (name, item) in value.dict() {
                    if item.kind != "string" {
                        found.push(format!("{key}.{name} is a {}, expected string", item.kind));
                    }
                }
            }
            "SoftResourceLimits" | "HardResourceLimits" => {
                for (name, item) in value.dict() {
                    if !RESOURCE_LIMIT_KEYS.contains(&name.as_str()) {
                        found.push(format!("undocumented key {key}.{name}"));
                    } else if item.kind != "integer" {
                        found.push(format!("{key}.{name} is a {}, expected integer", item.kind));
                    }
                }
            }
            "KeepAlive" if value.kind == "dict" => {
                for (name, item) in value.dict() {
                    match KEEPALIVE_KEYS.iter().find(|(k, _)| *k == name) {
                        None => found.push(format!("undocumented key {key}.{name}")),
                        Some((_, t)) if !type_matches(t, &item.kind) => {
                            found.push(format!("{key}.{name} is a {}, expected {t}", item.kind))
                        }
                        Some(_) => {}
                    }
                }
            }
            _ => {}
        }
    }
    if !job.contains_key("Label") {
        found.push("missing Label".into());
    }
    if !job.contains_key("ProgramArguments") && !job.contains_key("Program") {
        found.push("missing ProgramArguments (or Program)".into());
    }
    found
}

fn load_valid(file: &str) -> BTreeMap<String, Typed> {
    let job = parse(&launchd_dir().join(file)).unwrap();
    assert_eq!(
        job["Label"].str(),
        Path::new(file).file_stem().unwrap().to_str().unwrap(),
        "{file}: launchd expects the file named after its Label"
    );
    let found = problems(&job);
    assert!(found.is_empty(), "{file}: {found:#?}");
    job
}

fn args(job: &BTreeMap<String, Typed>) -> Vec<String> {
    job["ProgramArguments"]
        .array()
        .iter()
        .map(|a| a.str().to_owned())
        .collect()
}

/// The value following `flag` in an argument list.
fn flag_value<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} missing from {args:?}"));
    args.get(i + 1)
        .unwrap_or_else(|| panic!("{flag} has no value in {args:?}"))
}

const AGENTD_PLIST: &str = "org.agentd.agentd.plist";
const CHECK_PLIST: &str = "org.agentd.keepalive-check.plist";
const AGENT_AGENTD_PLIST: &str = "LaunchAgents/org.agentd.agentd.plist";
const AGENT_CHECK_PLIST: &str = "LaunchAgents/org.agentd.keepalive-check.plist";

/// The placeholder home directory in the LaunchAgents, replaced at install
/// time (launchd expands neither `~` nor `$HOME`).
const PLACEHOLDER_HOME: &str = "/Users/YOU";

/// The umask both kinds of job set: files readable by their owner only, as
/// `UMask=0077` in the systemd unit.
const UMASK: i64 = 0o077;

#[test]
fn agentd_job_is_valid_and_complete() {
    let job = load_valid(AGENTD_PLIST);
    assert_eq!(job["Label"].str(), "org.agentd.agentd");
    assert_eq!(args(&job), ["/usr/local/bin/agentd", "serve"]);
    assert!(
        job["KeepAlive"].bool(),
        "KeepAlive restarts agentd whenever it exits"
    );
    assert!(job["RunAtLoad"].bool());
    assert!(job["ThrottleInterval"].int() > 0);

    let env = job["EnvironmentVariables"].dict();
    let state_dir = env["AGENTD_STATE_DIR"].str();
    let keepalive = env["AGENTD_KEEPALIVE_FILE"].str();
    assert!(state_dir.starts_with('/') && keepalive.starts_with('/'));
    assert!(
        Path::new(keepalive).starts_with(state_dir),
        "the keepalive file lives in the state dir agentd can write"
    );
    assert!(job["StandardErrorPath"].str().starts_with('/'));

    for limits in ["SoftResourceLimits", "HardResourceLimits"] {
        assert_eq!(
            job[limits].dict()["NumberOfFiles"].int(),
            4096,
            "{limits}.NumberOfFiles"
        );
    }
    // launchd sends SIGKILL ExitTimeOut seconds after SIGTERM; agentd's
    // default drain is 20 s.
    if let Some(exit_timeout) = job.get("ExitTimeOut") {
        assert!(exit_timeout.int() > 20);
    }
}

/// The check job `check` watches the agentd job `agentd`: same keepalive
/// file, the right label, a max age that leaves room for a restart. Returns
/// the check's arguments and its max age in seconds.
fn assert_check_watches(
    agentd: &BTreeMap<String, Typed>,
    check: &BTreeMap<String, Typed>,
) -> (Vec<String>, i64) {
    let check_args = args(check);
    assert_eq!(check_args[0], "/usr/local/bin/agentd");
    assert_eq!(check_args[1], "keepalive-check");

    let env = agentd["EnvironmentVariables"].dict();
    assert_eq!(
        flag_value(&check_args, "--file"),
        env["AGENTD_KEEPALIVE_FILE"].str(),
        "the check reads the file agentd touches"
    );
    assert_eq!(
        flag_value(&check_args, "--label"),
        agentd["Label"].str(),
        "the check restarts the agentd job"
    );
    assert_ne!(check["Label"].str(), agentd["Label"].str());

    let max_age: i64 = flag_value(&check_args, "--max-age")
        .parse()
        .expect("--max-age in whole seconds");
    let interval = check["StartInterval"].int();
    let health_interval: i64 = env["AGENTD_HEALTH_INTERVAL"].str().parse().unwrap();
    let throttle = agentd["ThrottleInterval"].int();
    assert!(
        interval > 0 && interval <= max_age,
        "check at least once per max age"
    );
    // A freshly restarted agentd waits ThrottleInterval, starts, and touches
    // after its first passing tick; one missed tick is also tolerated. Any
    // max age below that would restart a healthy agentd.
    assert!(
        max_age > throttle + 2 * health_interval,
        "max age {max_age}s too short for throttle {throttle}s + 2 ticks of {health_interval}s"
    );
    assert!(!check
        .get("KeepAlive")
        .is_some_and(|k| k.kind == "bool" && k.bool()));
    (check_args, max_age)
}

#[test]
fn keepalive_check_job_watches_the_agentd_job() {
    let agentd = load_valid(AGENTD_PLIST);
    let check = load_valid(CHECK_PLIST);
    let (check_args, _) = assert_check_watches(&agentd, &check);
    assert!(
        !check_args.contains(&"--domain".to_owned())
            || flag_value(&check_args, "--domain") == "system",
        "a LaunchDaemon lives in the system domain"
    );
    assert_eq!(agentd["Umask"].int(), UMASK);
}

#[test]
fn launch_agent_runs_as_the_user_with_path_home_umask_and_files() {
    let job = load_valid(AGENT_AGENTD_PLIST);
    assert_eq!(args(&job), ["/usr/local/bin/agentd", "serve"]);
    assert!(job["KeepAlive"].bool() && job["RunAtLoad"].bool());
    assert!(
        !job.contains_key("UserName"),
        "a LaunchAgent runs as the user who loads it"
    );
    assert!(job["ExitTimeOut"].int() > 20, "longer than the 20 s drain");
    assert_eq!(job["Umask"].int(), UMASK);

    let env = job["EnvironmentVariables"].dict();
    let path: Vec<&str> = env["PATH"].str().split(':').collect();
    for dir in ["/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin"] {
        assert!(
            path.contains(&dir),
            "PATH lacks {dir} (agent CLIs and node): {path:?}"
        );
    }
    let home = env["HOME"].str();
    assert_eq!(home, PLACEHOLDER_HOME);
    // Everything the job writes lives in the user's home, which the user owns.
    for (what, file) in [
        ("AGENTD_STATE_DIR", env["AGENTD_STATE_DIR"].str()),
        ("AGENTD_KEEPALIVE_FILE", env["AGENTD_KEEPALIVE_FILE"].str()),
        ("WorkingDirectory", job["WorkingDirectory"].str()),
        ("StandardOutPath", job["StandardOutPath"].str()),
        ("StandardErrorPath", job["StandardErrorPath"].str()),
    ] {
        assert!(
            Path::new(file).starts_with(home),
            "{what}={file} is outside HOME={home}"
        );
    }
    assert_eq!(job["WorkingDirectory"].str(), env["AGENTD_STATE_DIR"].str());
    assert!(
        Path::new(env["AGENTD_KEEPALIVE_FILE"].str()).starts_with(env["AGENTD_STATE_DIR"].str())
    );

    assert!(job["SoftResourceLimits"].dict()["NumberOfFiles"].int() >= 4096);
    assert!(
        !job.contains_key("HardResourceLimits"),
        "only root may raise a hard limit; a user's job would fail to load it"
    );
}

#[test]
fn launch_agent_check_restarts_the_users_job() {
    let agentd = load_valid(AGENT_AGENTD_PLIST);
    let check = load_valid(AGENT_CHECK_PLIST);
    let (check_args, _) = assert_check_watches(&agentd, &check);
    assert_eq!(
        flag_value(&check_args, "--domain"),
        "gui",
        "kickstart gui/<uid>/<label>, not system/<label>"
    );
    assert!(Path::new(check["StandardErrorPath"].str()).starts_with(PLACEHOLDER_HOME));
}

/// The `[default: ...]` of `flag` in `agentd keepalive-check --help`.
fn help_default(flag: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(["keepalive-check", "--help"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    let start = help
        .find(&format!("--{flag}"))
        .unwrap_or_else(|| panic!("--{flag} not in {help}"));
    let rest = &help[start..];
    let default = rest
        .find("[default: ")
        .map(|i| &rest[i + "[default: ".len()..])
        .unwrap_or_else(|| panic!("no default for --{flag} in {help}"));
    default[..default.find(']').unwrap()].to_owned()
}

#[test]
fn keepalive_check_default_max_age_is_the_plists_and_leaves_room_for_a_restart() {
    let default = help_default("max-age");
    assert_eq!(
        default,
        format!("{}s", agentd::init::keepalive::DEFAULT_MAX_AGE_SECS)
    );
    assert_eq!(help_default("domain"), "system");
    let default: i64 = default.trim_end_matches('s').parse().unwrap();
    for (agentd_plist, check_plist) in [
        (AGENTD_PLIST, CHECK_PLIST),
        (AGENT_AGENTD_PLIST, AGENT_CHECK_PLIST),
    ] {
        let agentd = load_valid(agentd_plist);
        let (_, max_age) = assert_check_watches(&agentd, &load_valid(check_plist));
        assert_eq!(
            max_age, default,
            "{check_plist} passes the built-in default"
        );
        let env = agentd["EnvironmentVariables"].dict();
        let health_interval: i64 = env["AGENTD_HEALTH_INTERVAL"].str().parse().unwrap();
        assert!(default > agentd["ThrottleInterval"].int() + 2 * health_interval);
    }
}

fn write_temp_plist(body: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.plist");
    std::fs::write(
        &path,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
             <plist version=\"1.0\">\n{body}\n</plist>\n"
        ),
    )
    .unwrap();
    (dir, path)
}

#[test]
fn validator_refuses_typos_wrong_types_and_missing_keys() {
    let (_dir, path) = write_temp_plist(
        "<dict>\
           <key>ProgramArguments</key><array><string>/bin/true</string><integer>1</integer></array>\
           <key>KeepAlives</key><true/>\
           <key>RunAtLoad</key><string>yes</string>\
           <key>KeepAlive</key><dict><key>Crashed</key><true/><key>OnCrash</key><true/></dict>\
           <key>SoftResourceLimits</key><dict><key>NumberOfFile</key><integer>4096</integer></dict>\
           <key>HardResourceLimits</key><dict><key>NumberOfFiles</key><string>4096</string></dict>\
         </dict>",
    );
    let found = problems(&parse(&path).unwrap());
    for expected in [
        "undocumented key KeepAlives",
        "RunAtLoad is a string, launchd expects bool",
        "ProgramArguments[1] is a integer, expected string",
        "undocumented key KeepAlive.OnCrash",
        "undocumented key SoftResourceLimits.NumberOfFile",
        "HardResourceLimits.NumberOfFiles is a string, expected integer",
        "missing Label",
    ] {
        assert!(
            found.iter().any(|p| p == expected),
            "{expected:?} not in {found:#?}"
        );
    }
    assert_eq!(found.len(), 7, "{found:#?}");
}

#[test]
fn validator_refuses_malformed_and_binary_plists() {
    let (_dir, path) = write_temp_plist("<dict><key>Label</key><string>x</dict>");
    let err = parse(&path).unwrap_err();
    assert!(err.contains("not a valid XML property list"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("binary.plist");
    std::fs::write(&binary, b"bplist00\xd1\x01\x02").unwrap();
    let err = parse(&binary).unwrap_err();
    assert!(err.contains("not an XML property list"), "{err}");
}
