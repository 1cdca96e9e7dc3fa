//! The `acp` runtime's settings, as `config` hands them over: the agent's
//! command and work directory, the pool's bound and idle time, the
//! permission policy and its timeout, the kill grace, the line bound and the
//! agents' extra environment.
//!
//! Plain data, at the bottom of `acp/`: it imports only config's plain
//! values (`PermissionPolicy` is config's), reads no environment variable
//! (that is `config`) and decides nothing.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

pub use crate::config::PermissionPolicy;

/// The `acp` runtime's settings (from `AGENTD_ACP_*`).
#[derive(Debug, Clone)]
pub struct AcpOptions {
    /// The agent's argv (`AGENTD_ACP_CMD`), program first.
    pub argv: Vec<String>,
    /// `cwd` of every ACP session and of the agent processes.
    pub workdir: PathBuf,
    pub max_agents: usize,
    /// Idle processes are closed after this long.
    pub idle: Duration,
    pub permissions: PermissionPolicy,
    /// An `ask` request nobody answered is refused after this long.
    pub permission_timeout: Duration,
    /// How long a cancelled turn's agent has to answer before its group is
    /// stopped, and the time between the signals that stop it.
    pub kill_grace: Duration,
    /// Longest line accepted from an agent (and bound of a turn's text).
    pub max_line: usize,
    /// Variables set for the agents on top of agentd's scrubbed environment.
    pub env: Vec<(&'static str, OsString)>,
}
