//! The `agentd` command line. No logic lives here: each subcommand hands its
//! typed arguments to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agentd::init::keepalive::LaunchdDomain;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "agentd", version, about = "An agent server native to systemd")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    ///
    /// Every setting is an environment variable and a key of the optional
    /// TOML file; the three below are flags too. The list follows.
    #[command(
        after_help = "Every setting, with its variable, TOML key and default: agentd serve --help",
        after_long_help = agentd::config::settings_help()
    )]
    Serve {
        #[arg(long, help = agentd::config::flag_help("listen"))]
        listen: Option<String>,
        #[arg(long, help = agentd::config::flag_help("state_dir"))]
        state_dir: Option<PathBuf>,
        #[arg(long, help = agentd::config::flag_help("config"))]
        config: Option<PathBuf>,
    },
    /// Ask a running server for its health and print a report for people.
    ///
    /// Exit status: 0 healthy, 1 the server answered but is not healthy
    /// (degraded, starting, stopping), 2 no usable answer (not reachable,
    /// timeout, not agentd). Fit for a Docker HEALTHCHECK or cron.
    Health {
        /// Server URL: http://HOST:PORT, HOST:PORT or unix:/PATH (a socket-activated Unix socket). Default: the `listen` setting, loaded as `serve` loads it.
        #[arg(long)]
        url: Option<String>,
        /// Listen address as for `serve --listen`, when --url is not given [env: AGENTD_LISTEN].
        #[arg(long)]
        listen: Option<String>,
        /// The TOML config file `serve` reads, for its `listen` address [env: AGENTD_CONFIG].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Run the deep checks now (`/health?deep=1`).
        #[arg(long)]
        deep: bool,
        /// Print the raw `/health` JSON body instead of the report.
        #[arg(long)]
        json: bool,
        /// Give up after this long, e.g. 5s or 500ms.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// launchd companion: exit 0 when the keepalive file is fresh; otherwise
    /// exit non-zero and, with --label, restart the job (`launchctl kickstart -k`).
    KeepaliveCheck {
        /// The file agentd touches after every passing health tick.
        #[arg(long, env = "AGENTD_KEEPALIVE_FILE")]
        file: PathBuf,
        /// Oldest acceptable age, e.g. 60s or 2m. Must exceed the agentd job's
        /// ThrottleInterval + 2 health intervals (launchd/README.md).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        max_age: Duration,
        /// launchd label of the agentd job to kickstart when stale.
        #[arg(long)]
        label: Option<String>,
        /// launchd domain of that job: `system` (a LaunchDaemon; run the check
        /// as root) or `gui` (a LaunchAgent of the user running the check).
        #[arg(long, default_value = "system", value_parser = parse_domain)]
        domain: LaunchdDomain,
    },
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            listen,
            state_dir,
            config,
        } => agentd::daemon::serve(agentd::config::Overrides {
            listen,
            state_dir,
            config_file: config,
            address_only: false,
        }),
        Command::Health {
            url,
            listen,
            config,
            deep,
            json,
            timeout,
        } => {
            let outcome = agentd::report::run(&agentd::report::HealthRequest {
                url,
                listen,
                config_file: config,
                deep,
                json,
                timeout,
            });
            print!("{}", outcome.stdout);
            eprint!("{}", outcome.stderr);
            ExitCode::from(outcome.code)
        }
        Command::KeepaliveCheck {
            file,
            max_age,
            label,
            domain,
        } => {
            let target = label.map(|label| domain.service_target(&label));
            let code =
                agentd::init::keepalive::keepalive_check_main(&file, max_age, target.as_deref());
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        Command::Version => {
            println!("agentd {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}

fn parse_domain(s: &str) -> Result<LaunchdDomain, String> {
    LaunchdDomain::parse(s).ok_or_else(|| format!("invalid domain {s:?} (system or gui)"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    agentd::config::parse_duration(s)
        .ok_or_else(|| format!("invalid duration {s:?} (e.g. 30s, 500ms, 2m)"))
}
