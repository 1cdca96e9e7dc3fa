//! The `acp` runtime: agents kept warm over the Agent Client Protocol
//! (JSON-RPC 2.0, one message per line on the agent's stdin and stdout),
//! spoken with the protocol's own SDK (`agent-client-protocol`).
//!
//! One agent process serves one agentd chat session at a time and keeps the
//! conversation in its own memory, so a turn costs one `session/prompt`
//! instead of a CLI start. Tasks get a fresh ACP session each, on processes
//! kept for tasks. The processes live in a bounded pool: at most
//! `max_agents`, idle ones closed after `idle`, the least recently used idle
//! one closed when a new one is needed and the pool is full.
//!
//! Supervision, as systemd supervises agentd: each process has a task that
//! waits for it, so an exit or crash is noticed at once (the counters and
//! the last reason go to `/health`, `/metrics` and `/status`) and the
//! session it held is continued by `session/load` in a new process. A
//! process that does not answer a cancel within the kill grace, or an idle
//! process that does not answer a cheap request, is killed and replaced.
//! Starts that keep failing back off. None of this is a reason for agentd to
//! stop its watchdog: a failing agent is only ever `degraded`.
//!
//! Imports nothing above `agent/`: the settings arrive as `AcpOptions`.
//!
//! This file is the runtime (`Acp`) and what `acp` offers the rest of the
//! crate (the settings, the report, the bounds); it holds no logic of its
//! own. The rooms below it import one way, each only rooms listed after it:
//!
//! * `pool`: the bound, acquiring and releasing processes, idle close and
//!   ping, what an exit means, a turn's retry on a new process;
//! * `turn`: one turn: opening the session, the memory check, the
//!   transcript restore, the prompt and its cancel;
//! * `agent_proc`: one process: its start, its supervising task, what it
//!   leaves behind;
//! * `client`: the connection and the SDK's handlers, routing updates to
//!   the running turn, permission requests;
//! * `backoff`: failed starts in a row; `stderr`: the tail of an agent's
//!   stderr; `replay_count`: the count of a `session/load` replay;
//! * `stats`: the counters `/health` reads; `options`: the settings.
//!
//! Invariants:
//! * A process is in the pool from its start until its supervising task saw
//!   it exit; a process whose task ended has been killed (its whole group)
//!   and reaped, or handed to the orphan reaper.
//! * At most `max_agents` processes exist, counting those being started.
//! * A turn's updates reach its execution only while the turn runs: each
//!   ACP session id routes to at most one turn, and a `session/load` replay
//!   (the agent repeating history) reaches no turn: it is only counted.
//! * The agent's memory is checked against agentd's: the user turns a
//!   `session/load` replays are compared with the turns the store recorded
//!   in that session; an agent that holds fewer lost context, and the turn
//!   says so (`session_restarted`) and gives it agentd's transcript of the
//!   session with the prompt (`session_restored`).
//! * Every wait is bounded by the turn's deadline, its cancel, or the
//!   process's exit.

mod agent_proc;
mod backoff;
mod client;
mod options;
mod pool;
mod replay_count;
mod stats;
mod stderr;
mod turn;

use std::sync::Arc;

pub use self::agent_proc::START_TIMEOUT;
pub use self::client::MAX_EVENT_BYTES;
pub use self::options::{AcpOptions, PermissionPolicy};
use self::pool::Pool;
pub use self::pool::PING_TIMEOUT;
pub use self::turn::RESTORE_TRANSCRIPT_BYTES;
pub use crate::agent::runtime::AgentsReport;
use crate::agent::runtime::{ExecutionContext, RunFuture, RunRequest, Runtime};

/// The `acp` runtime.
pub struct Acp {
    pool: Arc<Pool>,
}

impl Acp {
    pub fn new(opts: AcpOptions) -> Self {
        Acp {
            pool: Arc::new(Pool::new(opts)),
        }
    }

    /// The pool now.
    pub fn report(&self) -> AgentsReport {
        self.pool.report()
    }
}

impl Runtime for Acp {
    fn name(&self) -> &'static str {
        "acp"
    }

    fn keeps_sessions(&self) -> bool {
        true
    }

    fn agents(&self) -> Option<AgentsReport> {
        Some(self.report())
    }

    fn session_cleared(&self, session_id: Option<&str>) {
        self.pool.close_chats(session_id);
    }

    fn run<'a>(&'a self, req: RunRequest, ctx: &'a ExecutionContext) -> RunFuture<'a> {
        Box::pin(self.pool.clone().turn(req, ctx))
    }
}
