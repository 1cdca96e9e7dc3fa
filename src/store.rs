//! The SQLite store: `state.db` in the state dir, opened once, owned by one
//! dedicated thread for the life of the process.
//!
//! Everything else talks to that thread over a bounded channel (an actor), so
//! exactly one connection (and one file descriptor set) exists no matter how
//! many requests arrive: the per-request connection leak seen in other agent
//! servers is impossible by construction. Appends that arrive together are
//! folded into one transaction (group commit) and each caller is answered only
//! after `COMMIT` returned: an API call that says it stored something has
//! committed it.
//!
//! It also records which agent-CLI sessions exist and each agentd session's
//! generation (bumped when its history is deleted), so the resume-vs-new
//! decision of a chat turn survives restarts, deletes and eviction from memory
//! (rules in `agent::sessions`).
//!
//! Before and after every write it proves that `state.db` is still the
//! database it opened (`store_file`: identity, header, length); once that
//! fails, every later write is refused and the `store` check says why. It
//! owns the checkpoints (a WAL hook, at SQLite's own threshold) so it knows
//! when the file's header may change, and runs a time-bounded
//! `PRAGMA quick_check` on a schedule for damage the header cannot show.
//!
//! Not here: the in-memory history cache (`agent::history`), HTTP mapping.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::agent::history::{Message, Role};
use crate::agent::sessions::{cli_session_id, CliSession};
use crate::config::{StoreConfig, SyncMode};
use crate::store_file::{DbFile, FileProblem};
use crate::store_sync::{SyncJob, Syncer};
pub use crate::store_watch::CommitCounts;
use crate::store_watch::Watch;

/// WAL pages after which a commit checkpoints: SQLite's own default
/// (`wal_autocheckpoint`), which the store's WAL hook takes over so that it
/// knows when the database file, and so its header, is written.
const CHECKPOINT_PAGES: i32 = 1000;

/// Longest one `PRAGMA quick_check` may hold the store thread. On a database
/// too large to check in this time the check stops, is logged, and counts as
/// no finding: writes wait for the store thread meanwhile, so the bound keeps
/// the pause short (about what a few hundred fsyncs cost).
pub const QUICK_CHECK_BUDGET: Duration = Duration::from_millis(250);

/// SQLite VM steps between two looks at the quick_check deadline.
const PROGRESS_STEPS: i32 = 10_000;

/// Longest a batch waits for the previous batch's fsync before it commits
/// anyway (at `synchronous=full`). While an fsync runs, the next batch fills
/// (up to `AGENTD_STORE_MAX_BATCH`): one fsync then covers all of it. On a
/// disk whose fsync takes longer than this, batches commit without waiting
/// and the next fsync covers every batch committed meanwhile, so a slow disk
/// adds at most this much to a request's wait for its batch to start.
pub const SYNC_WAIT_CAP: Duration = Duration::from_millis(5);

/// At `synchronous=full`, the heartbeat row (no one's data: it only proves
/// that a write goes through) is fsynced only when no fsync of the WAL
/// succeeded for this long, so the `store` check still proves at least once
/// a second that the disk flushes, and a tick at a short interval does not
/// pay an fsync each time. At the default 10 s interval an idle store's
/// heartbeat is fsynced every tick, as before.
pub const HEARTBEAT_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Committed batches waiting for their fsync, at most. When that many wait,
/// the store thread stops taking requests (they queue in its bounded
/// channel, `AGENTD_STORE_QUEUE`), so memory stays bounded by the queue and
/// this many batches of `AGENTD_STORE_MAX_BATCH`.
const SYNC_QUEUE: usize = 4;

/// File name of the database inside the state dir.
pub const DB_FILE: &str = "state.db";

/// How many appended rows pass between retention sweeps. Sweeping after every
/// batch would cost a `DELETE` per commit; this keeps the table within
/// `retention_messages + RETENTION_SWEEP_EVERY` rows.
const RETENTION_SWEEP_EVERY: u64 = 1024;

/// Longest a caller waits for the store thread's answer once its request is
/// queued. A hung database turns into errors (and a failing `store` check, so
/// the watchdog restarts agentd) instead of requests that never end. A request
/// that timed out may still commit later: it was not acknowledged, so nothing
/// acknowledged is lost.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Sessions listed by `session_counts`; the totals still count all of them.
pub const MAX_SESSIONS_LISTED: usize = 1000;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many
/// ran. Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: conversation messages.
    "CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        session_id TEXT NOT NULL,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        ts REAL NOT NULL
    );
    CREATE INDEX messages_by_session ON messages (session_id, id);",
    // 2: agent-CLI sessions. `session_generations` has a row for each session
    // whose history was deleted since the last delete of everything (and `*`,
    // the floor that delete set, below which no session's generation falls):
    // a row goes only when the floor covers it, because a forgotten
    // generation would name a deleted CLI session again. `cli_sessions` has a row per CLI session a
    // successful turn ran in; a row is only a hint (a missing one is repaired
    // by the runtime's retry), so rows of sessions with no messages left are
    // swept with retention.
    "CREATE TABLE session_generations (
        session_id TEXT PRIMARY KEY,
        generation INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE cli_sessions (
        runtime TEXT NOT NULL,
        cli_session_id TEXT NOT NULL,
        session_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (runtime, cli_session_id)
    ) WITHOUT ROWID;
    CREATE INDEX cli_sessions_by_session ON cli_sessions (session_id);",
    // 3: the health check's heartbeat: one row, rewritten every tick, so the
    // `store` check proves a real commit (see `Worker::heartbeat`).
    "CREATE TABLE health_heartbeat (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        at REAL NOT NULL,
        beats INTEGER NOT NULL
    );",
    // 4: the id the CLI itself gave a session (Codex picks its own thread
    // ids), recorded with the turn that ran in it, so the next turn resumes it.
    "ALTER TABLE cli_sessions ADD COLUMN agent_session_id TEXT;",
    // 5: how many turns the agent's own session holds by agentd's account
    // (set by the runtime with each turn), so that a runtime can tell when
    // the agent remembers fewer (an ACP agent killed before it wrote its
    // last turn). NULL: not counted (rows written before this migration).
    "ALTER TABLE cli_sessions ADD COLUMN turns INTEGER;",
];

/// The `session_generations` key of the floor every session's generation is
/// raised to by `DELETE /api/chat/history` without a session. `*` cannot be a
/// session id.
const GENERATION_FLOOR_KEY: &str = "*";

/// Set the generation of `key` (a session id, or the floor), on the store
/// connection or inside one of its transactions.
fn set_generation(conn: &Connection, key: &str, generation: u64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO session_generations (session_id, generation) VALUES (?1, ?2)
         ON CONFLICT (session_id) DO UPDATE SET generation = excluded.generation",
    )?
    .execute(params![key, generation as i64])?;
    Ok(())
}

#[derive(Debug, Error, Clone)]
pub enum StoreError {
    #[error("state dir {path} is not usable: {reason}")]
    StateDir { path: PathBuf, reason: String },
    #[error("cannot open {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("database error: {0}")]
    Sqlite(String),
    #[error("the store is busy: no room in its queue within {0:?}")]
    Busy(Duration),
    #[error("the store has stopped")]
    Stopped,
    #[error("the store did not answer within {0:?}")]
    NoAnswer(Duration),
    /// SQLITE_BUSY: another process (an operator's `sqlite3` shell, a
    /// backup) holds the write lock of `state.db` beyond the busy timeout.
    /// Nothing in the write was stored; clears by itself when the lock goes.
    #[error("{0}")]
    Locked(String),
    /// SQLITE_FULL / ENOSPC: nothing in the write was stored. Clears by itself
    /// when space returns.
    #[error("disk full: {0}")]
    DiskFull(String),
    /// `state.db` was deleted or replaced under the open connection: a write
    /// now would land in a file nobody will read again, so it is refused.
    #[error("{0}; writes are refused until agentd restarts on the new file")]
    Lost(String),
    /// `state.db` itself is damaged: overwritten, truncated, another
    /// database copied over it, or `PRAGMA quick_check` found corruption.
    /// Nothing written now could be read back, so every write is refused.
    #[error("{0}; writes are refused (restore state.db or move it away, then restart agentd)")]
    Corrupt(String),
    /// The file system refuses writes (read-only, immutable file, I/O
    /// error): nothing in the write was stored.
    #[error("state.db cannot be written: {0}")]
    Unwritable(String),
}

impl From<FileProblem> for StoreError {
    fn from(p: FileProblem) -> Self {
        match p {
            FileProblem::Deleted | FileProblem::Replaced => StoreError::Lost(p.to_string()),
            FileProblem::Unreadable(_) => StoreError::Sqlite(p.to_string()),
            _ => StoreError::Corrupt(p.to_string()),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        match e.sqlite_error_code() {
            Some(C::DiskFull) => StoreError::DiskFull(e.to_string()),
            Some(C::DatabaseBusy) => StoreError::Locked(e.to_string()),
            Some(C::DatabaseCorrupt | C::NotADatabase) => StoreError::Corrupt(e.to_string()),
            Some(C::ReadOnly | C::PermissionDenied | C::SystemIoFailure | C::CannotOpen) => {
                StoreError::Unwritable(e.to_string())
            }
            _ => StoreError::Sqlite(e.to_string()),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A CLI session a successful chat turn ran in, recorded in the turn's
/// transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliSessionRecord {
    /// The runtime whose CLI keeps it (`claude-code`, `gemini`): each CLI has
    /// its own sessions.
    pub runtime: String,
    pub cli_session_id: String,
    /// The agentd session it belongs to.
    pub session_id: String,
    /// The id the CLI reported for the session (`metadata.agent_session_id`),
    /// kept so a CLI that names its own sessions (Codex) can be resumed.
    pub agent_session_id: Option<String>,
    /// The turns the agent's session holds after this one, as the runtime
    /// counted them (`AgentReport::session_turns`); `None`: not counted.
    pub turns: Option<u64>,
}

/// One appended turn: its messages and, for runtimes that keep sessions, the
/// CLI session it ran in.
type Turn = (Vec<Message>, Option<CliSessionRecord>);
/// Per-session message count, for `GET /api/chat/session`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionCount {
    pub session_id: String,
    pub messages: u64,
    pub last_at: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionSummary {
    pub sessions: Vec<SessionCount>,
    pub total_messages: u64,
    pub total_sessions: u64,
}

enum Request {
    Append {
        turn: Turn,
        reply: Reply<()>,
    },
    CliSession {
        session_id: String,
        runtime: String,
        reply: Reply<CliSession>,
    },
    NextGeneration {
        session_id: String,
        runtime: String,
        reply: Reply<CliSession>,
    },
    Recent {
        limit: usize,
        reply: Reply<Vec<Message>>,
    },
    Transcript {
        session_id: String,
        max_bytes: usize,
        reply: Reply<Vec<Message>>,
    },
    Clear {
        session: Option<String>,
        reply: Reply<u64>,
    },
    Sessions {
        reply: Reply<SessionSummary>,
    },
    /// The health check's write: see `Worker::heartbeat`. `fresh` makes a
    /// new proof even when the last one still stands (`?deep=1`).
    Heartbeat {
        reply: Reply<()>,
        fresh: bool,
    },
    /// Checkpoint the WAL and stop the thread.
    Close {
        reply: Reply<()>,
    },
    /// Fault injection: the thread blocks forever (tests of the `store` check).
    #[cfg(feature = "fault-injection")]
    Hang,
}

/// Handle to the store thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Request>,
    enqueue_timeout: Duration,
    path: PathBuf,
    /// Counted by the store thread, read lock-free by `/metrics`.
    commits: Arc<CommitCounts>,
    /// The answer of the one close.
    closed: Arc<tokio::sync::OnceCell<Result<(), StoreError>>>,
    /// What the store thread tells the `store` check without a round trip.
    watch: Arc<Watch>,
    /// The last checkpoint's failure (the WAL hook's), which a reused
    /// proof must not hide.
    checkpoint_error: Arc<Mutex<Option<String>>>,
    /// Cleared when the store thread ends, however it ends.
    alive: Arc<AtomicBool>,
}

/// Owns the thread; `join` after `close` at shutdown.
pub struct StoreThread(Option<JoinHandle<()>>);

impl StoreThread {
    pub fn join(mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

impl Store {
    /// Open (creating if needed) `<state_dir>/state.db`, migrate it, and start
    /// the thread that owns the connection. `on_slow_step` is called before
    /// each migration so start-up can extend its systemd timeout.
    ///
    /// The store thread opens the connection itself: it is made, migrated,
    /// checked and used on that thread alone, never on the caller's.
    pub async fn open(
        state_dir: &Path,
        config: &StoreConfig,
        on_slow_step: &dyn Fn(&str),
    ) -> Result<(Store, StoreThread), StoreError> {
        let path = state_dir.join(DB_FILE);
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        // A message per migration and the outcome: bounded by the schema.
        let (news_tx, mut news) = mpsc::channel(MIGRATIONS.len() + 1);
        let commits = Arc::new(CommitCounts::default());
        let watch = Arc::new(Watch::default());
        let checkpoint_error = Arc::new(Mutex::new(None));
        let alive = Arc::new(AtomicBool::new(true));
        let handle = {
            let (dir, config) = (state_dir.to_owned(), config.clone());
            let (commits, watch, running) = (commits.clone(), watch.clone(), alive.clone());
            let checkpoint_error = checkpoint_error.clone();
            std::thread::Builder::new()
                .name("agentd-store".into())
                .spawn(move || {
                    let _alive = ClearOnDrop(running);
                    let step = |s: &str| {
                        let _ = news_tx.blocking_send(Opening::Step(s.to_owned()));
                    };
                    let shared = Shared {
                        commits,
                        watch,
                        checkpoint_error,
                    };
                    match Worker::open(&dir, &config, shared, &step) {
                        Ok(worker) => {
                            let _ = news_tx.blocking_send(Opening::Done(Ok(())));
                            drop(news_tx);
                            worker.run(rx)
                        }
                        Err(e) => {
                            let _ = news_tx.blocking_send(Opening::Done(Err(e)));
                        }
                    }
                })
                .map_err(|e| StoreError::Open {
                    path: path.clone(),
                    reason: format!("cannot start the store thread: {e}"),
                })?
        };
        loop {
            match news.recv().await {
                Some(Opening::Step(step)) => on_slow_step(&step),
                Some(Opening::Done(Ok(()))) => break,
                Some(Opening::Done(Err(e))) => return Err(e),
                None => {
                    return Err(StoreError::Open {
                        path,
                        reason: "the store thread ended while opening the database".into(),
                    })
                }
            }
        }
        Ok((
            Store {
                tx,
                enqueue_timeout: config.enqueue_timeout,
                path,
                commits,
                closed: Arc::default(),
                watch,
                checkpoint_error,
                alive,
            },
            StoreThread(Some(handle)),
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append transactions and rows committed so far, lock-free.
    pub fn commits(&self) -> &CommitCounts {
        &self.commits
    }

    /// Requests waiting for the store thread right now.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        let permit = match tokio::time::timeout(self.enqueue_timeout, self.tx.reserve()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(StoreError::Stopped),
            Err(_) => return Err(StoreError::Busy(self.enqueue_timeout)),
        };
        permit.send(make(reply));
        wait_answer(rx).await
    }

    /// Durably append messages; returns after they are committed.
    pub async fn append(&self, messages: Vec<Message>) -> Result<(), StoreError> {
        self.append_turn(messages, None).await
    }

    /// Durably append a chat turn and record the CLI session it ran in, in one
    /// transaction; returns after it is committed.
    pub async fn append_turn(
        &self,
        messages: Vec<Message>,
        cli_session: Option<CliSessionRecord>,
    ) -> Result<(), StoreError> {
        self.call(|reply| Request::Append {
            turn: (messages, cli_session),
            reply,
        })
        .await
    }

    /// The CLI session the next chat turn of `session_id` runs in under
    /// `runtime`: its current generation's id, and whether a turn already ran
    /// there.
    pub async fn cli_session(
        &self,
        session_id: String,
        runtime: String,
    ) -> Result<CliSession, StoreError> {
        self.call(|reply| Request::CliSession {
            session_id,
            runtime,
            reply,
        })
        .await
    }

    /// Move `session_id` to its next generation without deleting its
    /// messages, and return the new CLI session its next turn runs in: for a
    /// CLI session the CLI refuses both to create and to resume.
    pub async fn next_cli_session(
        &self,
        session_id: String,
        runtime: String,
    ) -> Result<CliSession, StoreError> {
        self.call(|reply| Request::NextGeneration {
            session_id,
            runtime,
            reply,
        })
        .await
    }

    /// The newest messages of `session_id`, oldest first, whose contents
    /// together fit in `max_bytes` (at least the newest one, whatever its
    /// size): what a runtime gives back to an agent that lost context.
    pub async fn transcript(
        &self,
        session_id: String,
        max_bytes: usize,
    ) -> Result<Vec<Message>, StoreError> {
        self.call(|reply| Request::Transcript {
            session_id,
            max_bytes,
            reply,
        })
        .await
    }

    /// The newest `limit` messages of all sessions, oldest first.
    pub async fn recent(&self, limit: usize) -> Result<Vec<Message>, StoreError> {
        self.call(|reply| Request::Recent { limit, reply }).await
    }

    /// Delete all messages, or one session's, and move the session (or every
    /// session) to a new generation, so its next turn starts a new CLI session.
    /// Returns the messages deleted.
    pub async fn clear(&self, session: Option<String>) -> Result<u64, StoreError> {
        self.call(|reply| Request::Clear { session, reply }).await
    }

    pub async fn sessions(&self) -> Result<SessionSummary, StoreError> {
        self.call(|reply| Request::Sessions { reply }).await
    }

    /// The health check's write: the identity of `state.db`, a read, a real
    /// committed write (the heartbeat row), and free space in the state dir.
    /// `DiskFull` when the disk is full, `Lost` when the file was deleted or
    /// replaced, `Locked` while another process holds the write lock,
    /// `Sqlite` for an I/O error or a read-only file system.
    ///
    /// Between proofs (see `AGENTD_STORE_PROOF_INTERVAL`) the last one that
    /// passed stands, read from the watch with no round trip to the store
    /// thread, while that thread is not stuck in one request and no lock is
    /// reported; `fresh` (`?deep=1`) always makes a new one. Otherwise the
    /// heartbeat queues behind the store's other requests, which proves the
    /// thread takes them. While it waits, a lock that another process holds
    /// is reported as soon as the store thread has waited `LOCK_REPORT_AFTER`
    /// for it, and a tick that finds the thread waiting for such a lock
    /// reports it without queuing a heartbeat behind it.
    pub async fn heartbeat(&self, fresh: bool) -> Result<(), StoreError> {
        let watch = &self.watch;
        let locked = watch.locked_for();
        if !fresh && locked.is_none() && self.alive.load(Relaxed) {
            let failed =
                self.commits.sync_failed.load(Relaxed) || lock(&self.checkpoint_error).is_some();
            if failed {
                watch.clear_proof();
            } else if watch.proof_stands() && !watch.stuck() {
                return Ok(());
            }
        }
        // The store thread is waiting for the lock right now (for this
        // check's heartbeat or for a write): say so without queuing behind
        // it. Idle after a wait that ran out, it is asked again below, which
        // is how the end of the lock is found.
        if let Some(held) = locked.filter(|_| watch.heartbeat_pending() || watch.waiting()) {
            return Err(StoreError::Locked(Watch::locked_reason(held)));
        }
        let news = watch.lock_news();
        tokio::pin!(news);
        news.as_mut().enable();
        watch.heartbeat_queued(true);
        let answer = self.call(|reply| Request::Heartbeat { reply, fresh });
        tokio::select! {
            answer = answer => {
                // Answered, or never taken (a full queue, a stopped thread).
                watch.heartbeat_queued(false);
                answer
            }
            () = news => {
                let held = watch.locked_for().unwrap_or_default();
                Err(StoreError::Locked(Watch::locked_reason(held)))
            }
        }
    }

    /// Checkpoint and stop the thread. Requests already queued are served
    /// first; later ones get `Stopped`. Closing again (the stop and a
    /// second signal's forced exit may both close) waits for the first
    /// close and gets its answer.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.closed
            .get_or_init(|| self.call(|reply| Request::Close { reply }))
            .await
            .clone()
    }

    /// Fault injection: make the store thread block forever.
    #[cfg(feature = "fault-injection")]
    pub fn inject_hang(&self) -> bool {
        self.tx.try_send(Request::Hang).is_ok()
    }
}

/// A store request's answer, within `REPLY_TIMEOUT`; one already given
/// needs no timer.
async fn wait_answer<T>(mut rx: oneshot::Receiver<Result<T, StoreError>>) -> Result<T, StoreError> {
    if let Ok(answer) = rx.try_recv() {
        return answer;
    }
    match tokio::time::timeout(REPLY_TIMEOUT, rx).await {
        Ok(answer) => answer.map_err(|_| StoreError::Stopped)?,
        Err(_) => Err(StoreError::NoAnswer(REPLY_TIMEOUT)),
    }
}

/// What the store thread shares with the `Store` handles.
struct Shared {
    commits: Arc<CommitCounts>,
    watch: Arc<Watch>,
    checkpoint_error: Arc<Mutex<Option<String>>>,
}

/// What the store thread says while it opens the database.
enum Opening {
    /// A slow step begins (a migration): start-up extends its timeout.
    Step(String),
    Done(Result<(), StoreError>),
}

/// Clears the flag when dropped: on the store thread's return or unwind.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn prepare_state_dir(dir: &Path) -> Result<(), StoreError> {
    let fail = |reason: String| StoreError::StateDir {
        path: dir.to_owned(),
        reason,
    };
    crate::state_dir::ensure_private_dir(dir).map_err(|e| fail(e.to_string()))?;
    let meta = std::fs::metadata(dir).map_err(|e| fail(e.to_string()))?;
    if !meta.is_dir() {
        return Err(fail("not a directory".into()));
    }
    // Prove we can create files here now, not at the first chat message.
    let probe = dir.join(".agentd-write-test");
    std::fs::write(&probe, b"")
        .map_err(|e| fail(format!("not writable: {e}")))
        .and_then(|_| std::fs::remove_file(&probe).map_err(|e| fail(e.to_string())))
}

/// `state.db` is created 0600 before SQLite opens it (SQLite gives `-wal` and
/// `-shm` the database's mode), and files left by an older run are tightened.
fn private_db_files(path: &Path) -> Result<(), StoreError> {
    let fail = |e: std::io::Error| StoreError::Open {
        path: path.to_owned(),
        reason: match e.raw_os_error() {
            Some(libc::ENOSPC) => format!("disk full: {e}"),
            _ => e.to_string(),
        },
    };
    crate::state_dir::create_private_file(path).map_err(fail)?;
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        crate::state_dir::make_private(Path::new(&side)).map_err(fail)?;
    }
    Ok(())
}

/// Free space below which the `store` check reports the disk full even when
/// the heartbeat still commits: SQLite rewrites WAL pages in place after a
/// checkpoint, so a tiny write can succeed on a disk where the next chat
/// cannot. 64 KiB is a few WAL frames plus a diagnostics bundle.
pub const MIN_FREE_BYTES: u64 = 64 << 10;

/// Bytes available to this user on the file system holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

fn open_connection(
    path: &Path,
    sync: SyncMode,
    watch: &Arc<Watch>,
) -> Result<Connection, StoreError> {
    let fail = |e: rusqlite::Error| StoreError::Open {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let mut conn = Connection::open(path).map_err(fail)?;
    // A write lock that another process holds: wait at most BUSY_TIMEOUT,
    // and say so to the `store` check while waiting (see `store_watch`).
    conn.busy_handler(Some(Watch::busy_handler(watch.clone())))
        .map_err(fail)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(fail)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Open {
            path: path.to_owned(),
            reason: format!("cannot enable WAL (journal_mode is {mode})"),
        });
    }
    let sync = match sync {
        SyncMode::Full => "FULL",
        SyncMode::Normal => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous={sync}; PRAGMA foreign_keys=ON; PRAGMA temp_store=MEMORY;"
    ))
    .map_err(fail)?;
    Ok(conn)
}

/// The sync thread for `synchronous=full`, with its own descriptor of
/// `state.db-wal`.
fn start_sync(db: &Path, commits: &Arc<CommitCounts>) -> Result<Syncer, String> {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let wal = std::fs::File::open(&wal)
        .map_err(|e| format!("cannot open state.db-wal to sync it: {e}"))?;
    Syncer::start(wal, SYNC_QUEUE, commits.clone())
        .map_err(|e| format!("cannot start the sync thread: {e}"))
}

/// `BEGIN IMMEDIATE`: take the write lock now (waiting for another process
/// through the busy handler), and tell the watch once it is taken.
fn begin_write<'c>(
    conn: &'c mut Connection,
    watch: &Watch,
) -> rusqlite::Result<rusqlite::Transaction<'c>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    watch.got_lock();
    Ok(tx)
}

fn migrate(conn: &Connection, on_slow_step: &dyn Fn(&str)) -> rusqlite::Result<()> {
    let current: usize =
        conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        on_slow_step(&format!("migrating state.db to schema {}", i + 1));
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version={}", i + 1))?;
        tx.commit()?;
    }
    Ok(())
}

struct Worker {
    conn: Connection,
    /// At `synchronous=full`: the thread that fsyncs the WAL and answers a
    /// committed batch after (see `store_sync`); `None` at `normal`.
    sync: Option<Syncer>,
    /// `CommitCounts::durable_writes` at the last heartbeat: when it moved,
    /// a real write was made durable since, and the heartbeat needs no
    /// commit of its own.
    durable_seen: u64,
    commits: Arc<CommitCounts>,
    max_batch: usize,
    retention: u64,
    since_sweep: u64,
    /// For the free-space reading of the heartbeat.
    state_dir: PathBuf,
    /// `state.db` as the connection opened it (SQLite never reopens it): its
    /// identity and the header the last checkpoint left.
    file: DbFile,
    /// Set by the WAL hook when a commit checkpointed: the file's header has
    /// moved on, and `file` must learn the new one.
    checkpointed: Arc<AtomicBool>,
    /// The last checkpoint's failure, set by the WAL hook (which may not fail
    /// the commit that triggered it: that commit is in the WAL already).
    checkpoint_error: Arc<Mutex<Option<String>>>,
    /// The first proof that failed: damage is for good (until a restart), so
    /// every later write gets the same answer without looking again.
    damaged: Option<StoreError>,
    quick_check_interval: Duration,
    last_quick_check: Option<Instant>,
    /// `AGENTD_STORE_PROOF_INTERVAL`: how old the last proof of writing may
    /// be before the heartbeat makes a new one.
    proof_interval: Duration,
    /// When the heartbeat last proved writing (file proof, read, commit or a
    /// real write, free space). Cleared by any failure, so a failing store
    /// is looked at again on every tick. Published in `watch` (see
    /// `Worker::set_proved`).
    proved: Option<Instant>,
    /// What the `store` check reads without a round trip: how long the
    /// proof stands, whether this thread is in a request, lock waits.
    watch: Arc<Watch>,
    /// Nanoseconds after `clock` at which a running query is interrupted
    /// (0: none). Set only around `PRAGMA quick_check`.
    quick_check_deadline: Arc<AtomicU64>,
    clock: Instant,
}

/// Take over SQLite's automatic checkpoints with a WAL hook that does the
/// same (checkpoint once the WAL holds `CHECKPOINT_PAGES`) and says so, so
/// the store knows when the database file was written. A failed checkpoint
/// does not fail the commit (which is in the WAL, durable); it is recorded
/// for the `store` check.
fn own_checkpoints(
    conn: &mut Connection,
    checkpointed: Arc<AtomicBool>,
    error: Arc<Mutex<Option<String>>>,
    watch: Arc<Watch>,
) -> rusqlite::Result<()> {
    conn.wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, pages: i32| {
        if pages >= CHECKPOINT_PAGES {
            let result = wal.checkpoint();
            checkpointed.store(true, Relaxed);
            if result.is_err() {
                watch.clear_proof();
            }
            *error.lock().unwrap_or_else(|e| e.into_inner()) = result.err().map(|e| e.to_string());
        }
        Ok(())
    }))
}

/// Interrupt a query once the deadline in `deadline` (nanoseconds after
/// `clock`; 0 = none) has passed. Only `PRAGMA quick_check` sets one.
fn bound_queries(
    conn: &mut Connection,
    deadline: Arc<AtomicU64>,
    clock: Instant,
) -> rusqlite::Result<()> {
    conn.progress_handler(
        PROGRESS_STEPS,
        Some(move || {
            let d = deadline.load(Relaxed);
            d != 0 && clock.elapsed().as_nanos() as u64 > d
        }),
    )
}

impl Worker {
    /// Open the connection on the store thread: the state dir and the
    /// file's modes, migrations, the WAL hook, the sync thread, and the
    /// start-up `quick_check`.
    fn open(
        state_dir: &Path,
        config: &StoreConfig,
        shared: Shared,
        on_slow_step: &dyn Fn(&str),
    ) -> Result<Worker, StoreError> {
        let Shared {
            commits,
            watch,
            checkpoint_error,
        } = shared;
        prepare_state_dir(state_dir)?;
        let path = state_dir.join(DB_FILE);
        private_db_files(&path)?;
        // At `full`, SQLite commits at `NORMAL` (no fsync inside COMMIT) and
        // the sync thread makes each batch durable before it is answered:
        // the next batch commits while the previous fsync runs.
        // At `normal`, answers follow COMMIT, durable at the next checkpoint
        // as SQLite defines it.
        let mut conn = open_connection(&path, SyncMode::Normal, &watch)?;
        migrate(&conn, on_slow_step).map_err(|e| StoreError::Open {
            path: path.clone(),
            reason: format!("migration failed: {e}"),
        })?;
        let open_fail = |reason: String| StoreError::Open {
            path: path.clone(),
            reason,
        };
        // A clean file to compare against: everything so far checkpointed
        // into it, so its header is the one the next checkpoint moves on.
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .map_err(|e| open_fail(format!("cannot checkpoint: {e}")))?;
        let file = DbFile::open(&path).map_err(|p| open_fail(p.to_string()))?;
        let checkpointed = Arc::new(AtomicBool::new(false));
        own_checkpoints(
            &mut conn,
            checkpointed.clone(),
            checkpoint_error.clone(),
            watch.clone(),
        )
        .map_err(|e| open_fail(format!("cannot install the WAL hook: {e}")))?;
        let quick_check_deadline = Arc::new(AtomicU64::new(0));
        let clock = Instant::now();
        bound_queries(&mut conn, quick_check_deadline.clone(), clock)
            .map_err(|e| open_fail(format!("cannot install the progress handler: {e}")))?;
        let sync = match config.synchronous {
            SyncMode::Normal => None,
            SyncMode::Full => Some(start_sync(&path, &commits).map_err(open_fail)?),
        };
        let mut worker = Worker {
            sync,
            durable_seen: 0,
            commits,
            conn,
            max_batch: config.max_batch.max(1),
            retention: config.retention_messages,
            since_sweep: 0,
            state_dir: state_dir.to_owned(),
            file,
            checkpointed,
            checkpoint_error,
            damaged: None,
            quick_check_interval: config.quick_check_interval,
            last_quick_check: None,
            proof_interval: config.proof_interval,
            proved: None,
            watch,
            quick_check_deadline,
            clock,
        };
        // Damage inside the file shows at start, before anything is served.
        if let Err(e) = worker.quick_check() {
            return Err(open_fail(e.to_string()));
        }
        Ok(worker)
    }

    /// The store thread: one request at a time, each marked in the watch
    /// while it is served.
    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut deferred: Option<Request> = None;
        loop {
            let req = match deferred.take() {
                Some(r) => r,
                None => match rx.blocking_recv() {
                    Some(r) => r,
                    None => break,
                },
            };
            self.watch.serving(true);
            let go_on = self.serve(req, &mut rx, &mut deferred);
            self.watch.serving(false);
            if !go_on {
                break;
            }
        }
    }

    /// One request; `false` once the store is closed.
    fn serve(
        &mut self,
        req: Request,
        rx: &mut mpsc::Receiver<Request>,
        deferred: &mut Option<Request>,
    ) -> bool {
        match req {
            Request::Append { turn, reply } => self.serve_appends((turn, reply), rx, deferred),
            Request::CliSession {
                session_id,
                runtime,
                reply,
            } => {
                let _ = reply.send(self.cli_session(&session_id, &runtime).map_err(Into::into));
            }
            Request::NextGeneration {
                session_id,
                runtime,
                reply,
            } => {
                let r = self.still_ours().and_then(|()| {
                    let cli = self.next_generation(&session_id, &runtime)?;
                    self.confirm_written().map(|()| cli)
                });
                self.answer_durable(r, reply, 1);
            }
            Request::Recent { limit, reply } => {
                let _ = reply.send(self.recent(limit).map_err(Into::into));
            }
            Request::Transcript {
                session_id,
                max_bytes,
                reply,
            } => {
                let _ = reply.send(self.transcript(&session_id, max_bytes).map_err(Into::into));
            }
            Request::Clear { session, reply } => {
                let r = self.still_ours().and_then(|()| {
                    let deleted = self.clear(session.as_deref())?;
                    self.confirm_written().map(|()| deleted)
                });
                self.answer_durable(r, reply, 1);
            }
            Request::Sessions { reply } => {
                let _ = reply.send(self.sessions().map_err(Into::into));
            }
            Request::Heartbeat { reply, fresh } => self.answer_heartbeat(reply, fresh),
            Request::Close { reply } => {
                self.close(reply, rx);
                return false;
            }
            #[cfg(feature = "fault-injection")]
            Request::Hang => {
                // As a thread stuck inside SQLite would: with the lock.
                tracing::warn!("fault injection: the store thread now blocks forever");
                loop {
                    std::thread::park();
                }
            }
        }
        true
    }

    /// Group commit: fold every append already waiting into this
    /// transaction; the first other request ends the batch and runs next,
    /// so order is kept. Pipelining: while the previous batch's fsync runs,
    /// this one keeps filling; it commits when that fsync is done (or after
    /// `SYNC_WAIT_CAP`), and one fsync covers it.
    fn serve_appends(
        &mut self,
        first: (Turn, Reply<()>),
        rx: &mut mpsc::Receiver<Request>,
        deferred: &mut Option<Request>,
    ) {
        let mut batch = vec![first];
        self.fill(rx, &mut batch, deferred);
        if deferred.is_none() && batch.len() < self.max_batch {
            if let Some(sync) = self.sync.as_ref().filter(|s| s.busy()) {
                sync.wait_idle(SYNC_WAIT_CAP);
                self.fill(rx, &mut batch, deferred);
            }
        }
        self.append_batch(batch);
    }

    /// Checkpoint, serve the appends queued before the close, answer every
    /// batch handed to the sync thread, then answer the close.
    fn close(&mut self, reply: Reply<()>, rx: &mut mpsc::Receiver<Request>) {
        let r = self
            .conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .map_err(Into::into);
        rx.close();
        while let Ok(req) = rx.try_recv() {
            if let Request::Append { turn, reply } = req {
                self.append_batch(vec![(turn, reply)]);
            }
        }
        if let Some(mut sync) = self.sync.take() {
            sync.stop();
        }
        let _ = reply.send(r);
    }

    /// Run the heartbeat and answer it: at once, or once its own row is
    /// durable when it wrote one and the disk has not flushed lately.
    fn answer_heartbeat(&mut self, reply: Reply<()>, fresh: bool) {
        let result = self.heartbeat(fresh);
        self.watch.heartbeat_queued(false);
        match result {
            Ok(true)
                if self
                    .sync
                    .as_ref()
                    .is_some_and(|s| !s.synced_within(HEARTBEAT_SYNC_INTERVAL)) =>
            {
                self.answer_durable(Ok(()), reply, 0)
            }
            Ok(_) => {
                let _ = reply.send(Ok(()));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Whether the next heartbeat runs `PRAGMA quick_check`.
    fn quick_check_due(&self) -> bool {
        !self.quick_check_interval.is_zero()
            && self
                .last_quick_check
                .is_none_or(|t| t.elapsed() >= self.quick_check_interval)
    }

    /// Move appends already waiting into `batch`, up to `max_batch`; the
    /// first other request ends the batch and runs next, so order is kept.
    fn fill(
        &self,
        rx: &mut mpsc::Receiver<Request>,
        batch: &mut Vec<(Turn, Reply<()>)>,
        deferred: &mut Option<Request>,
    ) {
        while batch.len() < self.max_batch {
            match rx.try_recv() {
                Ok(Request::Append { turn, reply }) => batch.push((turn, reply)),
                Ok(other) => {
                    *deferred = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
    }

    /// Run `answer` once what was just committed is durable: after the sync
    /// thread's fsync at `full` (with the fsync's error if it failed), at
    /// once at `normal`. `writes` API writes count towards the heartbeat's
    /// proof.
    fn when_durable(
        &mut self,
        writes: u64,
        answer: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) {
        match &self.sync {
            Some(sync) => sync.hand_over(SyncJob {
                answer: Box::new(move |r| answer(r.map_err(StoreError::Unwritable))),
                writes,
            }),
            None => {
                self.commits.durable_writes.fetch_add(writes, Relaxed);
                answer(Ok(()));
            }
        }
    }

    /// Answer a write's result: an error at once, a success once durable.
    fn answer_durable<T: Send + 'static>(
        &mut self,
        result: Result<T, StoreError>,
        reply: Reply<T>,
        writes: u64,
    ) {
        match result {
            Ok(value) => {
                self.watch.got_lock();
                self.when_durable(writes, move |r| {
                    let _ = reply.send(r.map(|()| value));
                })
            }
            Err(e) => {
                // A failed write makes the next tick prove writing again.
                self.set_proved(None);
                let _ = reply.send(Err(e));
            }
        }
    }

    fn append_batch(&mut self, batch: Vec<(Turn, Reply<()>)>) {
        let rows: u64 = batch.iter().map(|((m, _), _)| m.len() as u64).sum();
        // Two stat calls per batch (not per message): never answer "stored"
        // for a write into a deleted file.
        if let Err(err) = self.still_ours() {
            tracing::error!(error = %err, rows, "append refused");
            for (_, reply) in batch {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
        let result = self
            .insert(&batch)
            .map_err(StoreError::from)
            .and_then(|()| self.confirm_written());
        match result {
            Ok(()) => {
                self.watch.got_lock();
                self.commits.commits.fetch_add(1, Relaxed);
                self.commits.rows.fetch_add(rows, Relaxed);
                let writes = batch.len() as u64;
                let replies: Vec<Reply<()>> = batch.into_iter().map(|(_, reply)| reply).collect();
                self.when_durable(writes, move |result| {
                    for reply in replies {
                        let _ = reply.send(result.clone());
                    }
                });
                self.since_sweep += rows;
                if self.retention > 0 && self.since_sweep >= RETENTION_SWEEP_EVERY {
                    self.since_sweep = 0;
                    if let Err(e) = self.sweep() {
                        tracing::warn!(error = %e, "retention sweep failed");
                    }
                }
            }
            Err(err) => {
                self.set_proved(None);
                tracing::error!(error = %err, rows, "append failed; nothing in this batch was stored");
                for (_, reply) in batch {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }

    fn insert(&mut self, batch: &[(Turn, Reply<()>)]) -> rusqlite::Result<()> {
        let tx = begin_write(&mut self.conn, &self.watch)?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO messages (session_id, role, content, ts) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut record = tx.prepare_cached(
                "INSERT INTO cli_sessions (runtime, cli_session_id, session_id, created_at, agent_session_id, turns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (runtime, cli_session_id) DO UPDATE SET agent_session_id =
                   coalesce(excluded.agent_session_id, cli_sessions.agent_session_id),
                   turns = excluded.turns",
            )?;
            for ((messages, cli_session), _) in batch {
                for m in messages {
                    stmt.execute(params![
                        m.session_id,
                        m.role.as_str(),
                        m.content,
                        m.timestamp
                    ])?;
                }
                if let Some(c) = cli_session {
                    let at = messages.last().map(|m| m.timestamp).unwrap_or_default();
                    record.execute(params![
                        c.runtime,
                        c.cli_session_id,
                        c.session_id,
                        at,
                        c.agent_session_id,
                        c.turns.map(|n| n as i64)
                    ])?;
                }
            }
        }
        tx.commit()
    }

    /// The session's generation: its own, raised to the floor a delete of
    /// everything set.
    fn generation(&self, session_id: &str) -> rusqlite::Result<u64> {
        let g: i64 = self.conn.query_row(
            "SELECT max(
                coalesce((SELECT generation FROM session_generations WHERE session_id = ?1), 0),
                coalesce((SELECT generation FROM session_generations WHERE session_id = ?2), 0))",
            params![session_id, GENERATION_FLOOR_KEY],
            |r| r.get(0),
        )?;
        Ok(g.max(0) as u64)
    }

    fn cli_session(&self, session_id: &str, runtime: &str) -> rusqlite::Result<CliSession> {
        let id = cli_session_id(session_id, self.generation(session_id)?);
        let recorded: Option<(Option<String>, Option<i64>)> = self
            .conn
            .prepare_cached(
                "SELECT agent_session_id, turns FROM cli_sessions WHERE runtime = ?1 AND cli_session_id = ?2",
            )?
            .query_row(params![runtime, id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(CliSession {
            id,
            exists: recorded.is_some(),
            turns: recorded.as_ref().and_then(|r| r.1).map(|n| n.max(0) as u64),
            agent_id: recorded.and_then(|r| r.0),
        })
    }

    /// Raise the session's generation by one (its messages stay) and name
    /// the CLI session that generation maps to.
    fn next_generation(&mut self, session_id: &str, runtime: &str) -> rusqlite::Result<CliSession> {
        let next = self.generation(session_id)? + 1;
        set_generation(&self.conn, session_id, next)?;
        self.cli_session(session_id, runtime)
    }

    /// Keep the newest `retention` rows (ids grow monotonically).
    fn sweep(&self) -> rusqlite::Result<usize> {
        let started = Instant::now();
        let n = self.conn.execute(
            "DELETE FROM messages WHERE id <= (SELECT max(id) FROM messages) - ?1",
            params![self.retention as i64],
        )?;
        if n > 0 {
            // A CLI-session row is a hint for a session with messages; without
            // any, it may go (a later turn is repaired by the runtime's retry).
            // This keeps the table within the retention bound too.
            self.conn.execute(
                "DELETE FROM cli_sessions WHERE session_id NOT IN (SELECT session_id FROM messages)",
                [],
            )?;
        }
        if n > 0 {
            tracing::debug!(
                deleted = n,
                ms = started.elapsed().as_millis() as u64,
                "retention sweep"
            );
        }
        Ok(n)
    }

    fn recent(&self, limit: usize) -> rusqlite::Result<Vec<Message>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT session_id, role, content, ts FROM
               (SELECT id, session_id, role, content, ts FROM messages ORDER BY id DESC LIMIT ?1)
             ORDER BY id ASC",
        )?;
        let rows = stmt.query_map(params![limit as i64], |r| {
            let role: String = r.get(1)?;
            Ok(Message {
                session_id: r.get(0)?,
                role: Role::parse(&role).unwrap_or(Role::User),
                content: r.get(2)?,
                timestamp: r.get(3)?,
            })
        })?;
        rows.collect()
    }

    /// The session's newest messages within `max_bytes` of content, oldest
    /// first; rows are read newest first and no further than the bound.
    fn transcript(&self, session_id: &str, max_bytes: usize) -> rusqlite::Result<Vec<Message>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT role, content, ts FROM messages WHERE session_id = ?1 ORDER BY id DESC",
        )?;
        let mut rows = stmt.query(params![session_id])?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while let Some(r) = rows.next()? {
            let content: String = r.get(1)?;
            bytes = bytes.saturating_add(content.len());
            if bytes > max_bytes && !out.is_empty() {
                break;
            }
            let role: String = r.get(0)?;
            out.push(Message {
                session_id: session_id.to_owned(),
                role: Role::parse(&role).unwrap_or(Role::User),
                content,
                timestamp: r.get(2)?,
            });
        }
        out.reverse();
        Ok(out)
    }

    /// Delete the messages and move to the next generation, in one
    /// transaction: once the delete is acknowledged, no later turn can name
    /// the old CLI session.
    fn clear(&mut self, session: Option<&str>) -> rusqlite::Result<u64> {
        let next = match session {
            Some(s) => self.generation(s)? + 1,
            None => {
                let highest: i64 = self.conn.query_row(
                    "SELECT coalesce(max(generation), 0) FROM session_generations",
                    [],
                    |r| r.get(0),
                )?;
                highest.max(0) as u64 + 1
            }
        };
        let tx = begin_write(&mut self.conn, &self.watch)?;
        let n = match session {
            Some(s) => {
                tx.execute("DELETE FROM cli_sessions WHERE session_id = ?1", params![s])?;
                tx.execute("DELETE FROM messages WHERE session_id = ?1", params![s])?
            }
            None => {
                tx.execute("DELETE FROM cli_sessions", [])?;
                // Every session's own generation is below the new floor now,
                // so the floor alone says it: this keeps the table small.
                tx.execute(
                    "DELETE FROM session_generations WHERE session_id != ?1",
                    params![GENERATION_FLOOR_KEY],
                )?;
                tx.execute("DELETE FROM messages", [])?
            }
        };
        set_generation(&tx, session.unwrap_or(GENERATION_FLOOR_KEY), next)?;
        tx.commit()?;
        Ok(n as u64)
    }

    fn sessions(&self) -> rusqlite::Result<SessionSummary> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT session_id, count(*), max(ts) FROM messages
             GROUP BY session_id ORDER BY max(id) DESC LIMIT ?1",
        )?;
        let sessions = stmt
            .query_map(params![MAX_SESSIONS_LISTED as i64], |r| {
                Ok(SessionCount {
                    session_id: r.get(0)?,
                    messages: r.get::<_, i64>(1)? as u64,
                    last_at: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let (total_messages, total_sessions): (i64, i64) = self.conn.query_row(
            "SELECT count(*), count(DISTINCT session_id) FROM messages",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(SessionSummary {
            sessions,
            total_messages: total_messages as u64,
            total_sessions: total_sessions as u64,
        })
    }

    /// The proof before a write: `state.db` is still the database the
    /// connection opened (see `store_file`). The first failure is kept and
    /// logged once; it is every later write's answer.
    fn still_ours(&mut self) -> Result<(), StoreError> {
        self.known_damage()?;
        match self.file.verify() {
            Ok(()) => Ok(()),
            Err(p @ FileProblem::Unreadable(_)) => Err(p.into()),
            Err(p) => Err(self.damage(p.into())),
        }
    }

    /// Damage already found, or a failed fsync of the WAL: no file access.
    fn known_damage(&mut self) -> Result<(), StoreError> {
        if let Some(e) = &self.damaged {
            return Err(e.clone());
        }
        if let Some(why) = self.sync.as_ref().and_then(Syncer::failed) {
            return Err(self.damage(StoreError::Unwritable(why)));
        }
        Ok(())
    }

    /// The proof after a commit and before its answer: if the commit
    /// checkpointed, the file's header moved on (learn it, provided it is
    /// still a database); then the same proof as before the write. A commit
    /// that fails it is answered with the error: its rows are in a WAL whose
    /// database is gone, so it was not stored.
    fn confirm_written(&mut self) -> Result<(), StoreError> {
        self.learn_checkpoint()?;
        self.still_ours()
    }

    /// If a commit checkpointed, learn the file's new header (provided it is
    /// still a database whose change counter moved on).
    fn learn_checkpoint(&mut self) -> Result<(), StoreError> {
        if self.checkpointed.swap(false, Relaxed) {
            if let Err(p) = self.file.checkpointed() {
                return Err(self.damage(p.into()));
            }
        }
        Ok(())
    }

    /// Keep `err` as the store's answer to every later write and say so once
    /// in the journal.
    fn damage(&mut self, err: StoreError) -> StoreError {
        tracing::error!(error = %err, "state.db can no longer be trusted; refusing every write");
        self.damaged = Some(err.clone());
        self.watch.clear_proof();
        err
    }

    /// `PRAGMA quick_check`, bounded by `QUICK_CHECK_BUDGET`, when the
    /// schedule says it is due. The page cache is released first, so pages
    /// are read from the file (and WAL), not from memory. Corruption found is
    /// damage for good; a check that ran out of time found nothing and is
    /// logged.
    fn quick_check(&mut self) -> Result<(), StoreError> {
        if !self.quick_check_due() {
            return Ok(());
        }
        self.last_quick_check = Some(Instant::now());
        self.conn.execute_batch("PRAGMA shrink_memory;")?;
        let deadline = self.clock.elapsed() + QUICK_CHECK_BUDGET;
        self.quick_check_deadline
            .store(deadline.as_nanos() as u64, Relaxed);
        let started = Instant::now();
        let found: rusqlite::Result<Vec<String>> = self
            .conn
            .prepare("PRAGMA quick_check(5)")
            .and_then(|mut stmt| stmt.query_map([], |r| r.get::<_, String>(0))?.collect());
        self.quick_check_deadline.store(0, Relaxed);
        match found {
            Ok(rows) if rows.len() == 1 && rows[0] == "ok" => {
                tracing::debug!(ms = started.elapsed().as_millis() as u64, "quick_check: ok");
                Ok(())
            }
            Ok(rows) => Err(self.damage(StoreError::Corrupt(format!(
                "PRAGMA quick_check found damage in state.db: {}",
                rows.join("; ")
            )))),
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted) => {
                tracing::info!(
                    budget_ms = QUICK_CHECK_BUDGET.as_millis() as u64,
                    "quick_check stopped at its time budget before the end of state.db; nothing found so far"
                );
                Ok(())
            }
            Err(e) => match StoreError::from(e) {
                StoreError::Corrupt(why) => Err(self.damage(StoreError::Corrupt(format!(
                    "PRAGMA quick_check found damage in state.db: {why}"
                )))),
                err => Err(err),
            },
        }
    }

    /// The `store` check's round trip: the file is still ours, a read, a
    /// proof that writing works, and enough free space for the next write.
    /// The proof is a real write made durable since the last proof when
    /// there was one (a chat under load proves more than a heartbeat row
    /// would); otherwise one committed upsert of the heartbeat row (the table
    /// never grows). A tick within `AGENTD_STORE_PROOF_INTERVAL` of the last
    /// proof that passed reuses it, after checking for damage and checkpoint
    /// failures found meanwhile (a failure makes the next tick prove again).
    /// Returns whether it wrote the row: that answer waits for the row to be
    /// durable.
    fn heartbeat(&mut self, fresh: bool) -> Result<bool, StoreError> {
        if !fresh && self.proof_is_fresh() {
            // Between proofs, what the store learnt meanwhile still counts,
            // and a failure makes the next tick prove again.
            let known = self.known_damage().and_then(|()| self.checkpoint_ok());
            if known.is_err() {
                self.set_proved(None);
            }
            return known.map(|()| false);
        }
        let proof = self.prove_writing();
        self.set_proved(proof.as_ref().ok().map(|_| Instant::now()));
        proof
    }

    /// Record when writing was last proved (`None`: a failure since) and
    /// publish until when that proof stands: nine tenths of
    /// `proof_interval` later, or when the next `quick_check` is due if
    /// that is sooner.
    fn set_proved(&mut self, at: Option<Instant>) {
        self.proved = at;
        match at {
            Some(t) if !self.proof_interval.is_zero() => {
                let mut until = t + self.proof_interval.mul_f64(0.9);
                if !self.quick_check_interval.is_zero() {
                    if let Some(last) = self.last_quick_check {
                        until = until.min(last + self.quick_check_interval);
                    }
                }
                self.watch.proved_until(until);
            }
            _ => self.watch.clear_proof(),
        }
    }

    /// Whether the last proof of writing is recent enough to stand for this
    /// tick's: younger than nine tenths of `proof_interval`, so ticks one
    /// interval apart each make their own despite jitter, and never while a
    /// `quick_check` is due.
    fn proof_is_fresh(&self) -> bool {
        !self.quick_check_due()
            && self
                .proved
                .is_some_and(|t| t.elapsed() < self.proof_interval.mul_f64(0.9))
    }

    fn checkpoint_ok(&self) -> Result<(), StoreError> {
        match self
            .checkpoint_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(e) => Err(StoreError::Unwritable(format!("checkpoint failed: {e}"))),
            None => Ok(()),
        }
    }

    /// The heartbeat's proof: `state.db` is still ours, a read works, a
    /// write was committed (a real one since the last proof, else the
    /// heartbeat row), and the state dir has room. `Ok(true)` when the
    /// heartbeat committed its own row.
    fn prove_writing(&mut self) -> Result<bool, StoreError> {
        self.still_ours()?;
        self.quick_check()?;
        self.checkpoint_ok()?;
        let durable = self.commits.durable_writes.load(Relaxed);
        let wrote = durable == self.durable_seen;
        let read_newest = |conn: &Connection| -> rusqlite::Result<Option<i64>> {
            conn.prepare_cached("SELECT id FROM messages ORDER BY id DESC LIMIT 1")?
                .query_row([], |r| r.get(0))
                .optional()
        };
        if wrote {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            // The read and the write in one transaction: one round of the
            // WAL's locks instead of two.
            let tx = begin_write(&mut self.conn, &self.watch)?;
            read_newest(&tx)?;
            tx.prepare_cached(
                "INSERT INTO health_heartbeat (id, at, beats) VALUES (1, ?1, 1)
                 ON CONFLICT (id) DO UPDATE SET at = excluded.at, beats = beats + 1",
            )?
            .execute(params![now])?;
            tx.commit()?;
            // No one's data waits on this row, so the proof before the write
            // (just above) stands for the file; only a checkpoint the commit
            // ran has to be learnt.
            self.learn_checkpoint()?;
        } else {
            read_newest(&self.conn)?;
        }
        self.durable_seen = durable;
        match free_bytes(&self.state_dir) {
            Ok(free) if free < MIN_FREE_BYTES => Err(StoreError::DiskFull(format!(
                "{free} bytes free in {} (below {MIN_FREE_BYTES})",
                self.state_dir.display()
            ))),
            // Unknown free space is not a failure: the commit above (or the
            // write it stands for) proved writing works.
            _ => Ok(wrote),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> StoreConfig {
        StoreConfig {
            queue: 64,
            max_batch: 16,
            retention_messages: 0,
            synchronous: SyncMode::Normal,
            enqueue_timeout: Duration::from_secs(5),
            quick_check_interval: Duration::from_secs(900),
            proof_interval: Duration::ZERO,
        }
    }

    fn msg(i: usize, session: &str) -> Message {
        Message {
            role: if i.is_multiple_of(2) {
                Role::User
            } else {
                Role::Assistant
            },
            content: format!("m{i}"),
            timestamp: i as f64,
            session_id: session.into(),
        }
    }

    #[tokio::test]
    async fn appended_messages_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread) = Store::open(dir.path(), &config(), &|_| {}).await.unwrap();
        for i in 0..10 {
            store.append(vec![msg(i, "s")]).await.unwrap();
        }
        store.close().await.unwrap();
        thread.join();
        let (store, thread) = Store::open(dir.path(), &config(), &|_| {}).await.unwrap();
        let recent: Vec<_> = store
            .recent(3)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.content)
            .collect();
        assert_eq!(recent, ["m7", "m8", "m9"]);
        store.close().await.unwrap();
        thread.join();
    }

    #[tokio::test]
    async fn retention_keeps_newest_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config();
        cfg.retention_messages = 100;
        let (store, thread) = Store::open(dir.path(), &cfg, &|_| {}).await.unwrap();
        let batch: Vec<_> = (0..2000).map(|i| msg(i, "s")).collect();
        store.append(batch).await.unwrap();
        let summary = store.sessions().await.unwrap();
        assert_eq!(summary.total_messages, 100);
        let recent = store.recent(1).await.unwrap();
        assert_eq!(recent[0].content, "m1999");
        store.close().await.unwrap();
        thread.join();
    }

    #[tokio::test]
    async fn clear_one_session_and_probe() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread) = Store::open(dir.path(), &config(), &|_| {}).await.unwrap();
        store
            .append(vec![msg(0, "a"), msg(1, "a"), msg(2, "b")])
            .await
            .unwrap();
        assert_eq!(store.clear(Some("a".into())).await.unwrap(), 2);
        let s = store.sessions().await.unwrap();
        assert_eq!((s.total_messages, s.total_sessions), (1, 1));
        assert_eq!(s.sessions[0].session_id, "b");
        store.heartbeat(false).await.unwrap();
        store.close().await.unwrap();
        assert!(matches!(
            store.heartbeat(false).await,
            Err(StoreError::Stopped)
        ));
        thread.join();
    }

    fn beats(dir: &Path) -> i64 {
        Connection::open(dir.join(DB_FILE))
            .unwrap()
            .query_row("SELECT beats FROM health_heartbeat", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn heartbeat_writes_its_row_only_when_no_write_was_made_durable_since() {
        for sync in [SyncMode::Normal, SyncMode::Full] {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = config();
            cfg.synchronous = sync;
            let (store, thread) = Store::open(dir.path(), &cfg, &|_| {}).await.unwrap();
            // Nothing written yet: the heartbeat commits its own row.
            store.heartbeat(false).await.unwrap();
            // A chat turn committed since: it is the proof, no row of its own.
            store.append(vec![msg(0, "s"), msg(1, "s")]).await.unwrap();
            store.heartbeat(false).await.unwrap();
            // Nothing since: the row again.
            store.heartbeat(false).await.unwrap();
            store.close().await.unwrap();
            thread.join();
            assert_eq!(beats(dir.path()), 2, "{sync:?}");
        }
    }

    #[tokio::test]
    async fn a_passing_proof_stands_for_the_ticks_within_the_proof_interval() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config();
        cfg.proof_interval = Duration::from_secs(3600);
        let (store, thread) = Store::open(dir.path(), &cfg, &|_| {}).await.unwrap();
        for _ in 0..3 {
            store.heartbeat(false).await.unwrap();
        }
        // The moved-away file is seen by the next write, not by the reused
        // proof; once the write found it, every tick fails at once.
        let db = dir.path().join(DB_FILE);
        std::fs::rename(&db, dir.path().join("moved.db")).unwrap();
        store.heartbeat(false).await.unwrap();
        assert!(matches!(
            store.append(vec![msg(0, "s")]).await,
            Err(StoreError::Lost(_))
        ));
        assert!(matches!(
            store.heartbeat(false).await,
            Err(StoreError::Lost(_))
        ));
        store.close().await.unwrap();
        thread.join();
        let beats: i64 = Connection::open(dir.path().join("moved.db"))
            .unwrap()
            .query_row("SELECT beats FROM health_heartbeat", [], |r| r.get(0))
            .unwrap();
        assert_eq!(beats, 1, "one proof for the first three ticks");
    }

    #[tokio::test]
    async fn a_failed_proof_is_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config();
        cfg.proof_interval = Duration::from_secs(3600);
        let (store, thread) = Store::open(dir.path(), &cfg, &|_| {}).await.unwrap();
        store.heartbeat(false).await.unwrap();
        // A checkpoint failure recorded meanwhile fails the reused proof too.
        *store.checkpoint_error.lock().unwrap() = Some("disk I/O error".into());
        for _ in 0..2 {
            let e = store.heartbeat(false).await.unwrap_err();
            assert!(e.to_string().contains("checkpoint failed"), "{e}");
        }
        *store.checkpoint_error.lock().unwrap() = None;
        // Cleared: the next tick proves again, with a commit of its own.
        store.heartbeat(false).await.unwrap();
        store.close().await.unwrap();
        thread.join();
        assert_eq!(beats(dir.path()), 2, "the failed ticks proved again");
    }

    #[cfg(feature = "fault-injection")]
    #[tokio::test]
    async fn a_tick_between_proofs_needs_no_round_trip_but_a_stuck_thread_is_seen() {
        use crate::store_watch::STUCK_AFTER;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config();
        cfg.proof_interval = Duration::from_secs(3600);
        let (store, _thread) = Store::open(dir.path(), &cfg, &|_| {}).await.unwrap();
        store.heartbeat(false).await.unwrap();
        assert_eq!(beats(dir.path()), 1);
        // `fresh` (`?deep=1`) proves anew although the proof stands.
        store.heartbeat(true).await.unwrap();
        assert_eq!(beats(dir.path()), 2);
        // A thread that cannot answer: a reused proof needs no answer ...
        assert!(store.inject_hang());
        store.heartbeat(false).await.unwrap();
        // ... until the thread has been inside one request for too long.
        tokio::time::sleep(STUCK_AFTER + Duration::from_millis(50)).await;
        let late = tokio::time::timeout(Duration::from_millis(300), store.heartbeat(false)).await;
        assert!(
            late.is_err(),
            "a stuck store thread is asked, and does not answer"
        );
    }

    #[tokio::test]
    async fn a_lock_held_by_another_process_is_reported_and_writes_fail_fast() {
        use crate::store_watch::{BUSY_RETRY_WAIT, BUSY_TIMEOUT};
        let dir = tempfile::tempdir().unwrap();
        let (store, thread) = Store::open(dir.path(), &config(), &|_| {}).await.unwrap();
        store.append(vec![msg(0, "s")]).await.unwrap();
        // That write is the proof of the next heartbeat: use it up, so the
        // one below has to write.
        store.heartbeat(true).await.unwrap();
        // Another connection takes the write lock, as a `sqlite3` shell does.
        let other = Connection::open(dir.path().join(DB_FILE)).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();

        // The check hears of the lock before the store thread gives up.
        let began = Instant::now();
        let e = store.heartbeat(true).await.unwrap_err();
        assert!(matches!(e, StoreError::Locked(_)), "{e}");
        assert!(e.to_string().contains("database is locked"), "{e}");
        assert!(began.elapsed() < BUSY_TIMEOUT, "reported while waiting");
        // A write waits the busy timeout once, and nothing is stored ...
        let e = store.append(vec![msg(1, "s")]).await.unwrap_err();
        assert!(matches!(e, StoreError::Locked(_)), "{e}");
        // ... and the next only briefly, while the lock is still held.
        let again = Instant::now();
        let e = store.append(vec![msg(2, "s")]).await.unwrap_err();
        assert!(matches!(e, StoreError::Locked(_)), "{e}");
        let waited = again.elapsed();
        assert!(
            waited < BUSY_TIMEOUT,
            "{waited:?} (short wait {BUSY_RETRY_WAIT:?})"
        );
        // Reads go on meanwhile (WAL).
        assert_eq!(store.recent(10).await.unwrap().len(), 1);

        other.execute_batch("ROLLBACK").unwrap();
        store.heartbeat(true).await.unwrap();
        store.append(vec![msg(3, "s")]).await.unwrap();
        let contents: Vec<String> = store
            .recent(10)
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.content)
            .collect();
        assert_eq!(contents, ["m0", "m3"], "nothing refused was stored");
        store.close().await.unwrap();
        thread.join();
    }

    #[tokio::test]
    async fn at_full_every_answered_append_was_synced_and_batches_share_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config();
        cfg.synchronous = SyncMode::Full;
        let (store, thread) = Store::open(dir.path(), &cfg, &|_| {}).await.unwrap();
        let appends: Vec<_> = (0..64)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move { store.append(vec![msg(i, &format!("s{i}"))]).await })
            })
            .collect();
        for a in appends {
            a.await.unwrap().unwrap();
        }
        let c = store.commits();
        let (commits, syncs) = (c.commits.load(Relaxed), c.syncs.load(Relaxed));
        assert_eq!(c.durable_writes.load(Relaxed), 64);
        assert_eq!(c.rows.load(Relaxed), 64);
        // Every commit was answered after an fsync; one may cover several.
        assert!(
            syncs >= 1 && syncs <= commits,
            "{syncs} syncs, {commits} commits"
        );
        store.close().await.unwrap();
        thread.join();
        let (store, thread) = Store::open(dir.path(), &cfg, &|_| {}).await.unwrap();
        assert_eq!(store.sessions().await.unwrap().total_messages, 64);
        store.close().await.unwrap();
        thread.join();
    }

    #[tokio::test]
    async fn unwritable_state_dir_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = Store::open(&file, &config(), &|_| {})
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not-a-dir"), "{err}");
    }

    fn record(session: &str, cli: &CliSession) -> Option<CliSessionRecord> {
        Some(CliSessionRecord {
            runtime: "claude-code".into(),
            cli_session_id: cli.id.clone(),
            session_id: session.into(),
            agent_session_id: None,
            turns: None,
        })
    }

    #[tokio::test]
    async fn the_cli_own_session_id_is_kept_and_replaced_by_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread) = Store::open(dir.path(), &config(), &|_| {}).await.unwrap();
        let first = store.cli_session("c".into(), "codex".into()).await.unwrap();
        assert_eq!(first.agent_id, None);
        let turn = |agent: Option<&str>| {
            Some(CliSessionRecord {
                runtime: "codex".into(),
                cli_session_id: first.id.clone(),
                session_id: "c".into(),
                agent_session_id: agent.map(str::to_owned),
                turns: None,
            })
        };
        store
            .append_turn(vec![msg(0, "c"), msg(1, "c")], turn(Some("thread-1")))
            .await
            .unwrap();
        let got = store.cli_session("c".into(), "codex".into()).await.unwrap();
        assert!(got.exists);
        assert_eq!(got.agent_id.as_deref(), Some("thread-1"));
        // A turn that reported no id keeps the recorded one; a new id replaces it.
        store
            .append_turn(vec![msg(2, "c")], turn(None))
            .await
            .unwrap();
        let got = store.cli_session("c".into(), "codex".into()).await.unwrap();
        assert_eq!(got.agent_id.as_deref(), Some("thread-1"));
        store
            .append_turn(vec![msg(3, "c")], turn(Some("thread-2")))
            .await
            .unwrap();
        drop(store);
        thread.join();
        let (store, thread) = Store::open(dir.path(), &config(), &|_| {}).await.unwrap();
        let got = store.cli_session("c".into(), "codex".into()).await.unwrap();
        assert_eq!(got.agent_id.as_deref(), Some("thread-2"), "survives reopen");
        drop(store);
        thread.join();
    }

    #[tokio::test]
    async fn the_turns_an_agent_session_holds_are_recorded_and_start_over_with_a_delete() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread) = Store::open(dir.path(), &config(), &|_| {}).await.unwrap();
        let s = store.cli_session("t".into(), "acp".into()).await.unwrap();
        assert_eq!(s.turns, None, "nothing ran yet");
        let turn = |cli: &CliSession, turns: Option<u64>| {
            Some(CliSessionRecord {
                runtime: "acp".into(),
                cli_session_id: cli.id.clone(),
                session_id: "t".into(),
                agent_session_id: Some("acp-1".into()),
                turns,
            })
        };
        for n in 1..=3 {
            store
                .append_turn(
                    vec![msg(2 * n, "t"), msg(2 * n + 1, "t")],
                    turn(&s, Some(n as u64)),
                )
                .await
                .unwrap();
        }
        assert_eq!(
            store
                .cli_session("t".into(), "acp".into())
                .await
                .unwrap()
                .turns,
            Some(3)
        );
        // A turn the runtime could not count leaves no count behind.
        store
            .append_turn(vec![msg(9, "t")], turn(&s, None))
            .await
            .unwrap();
        assert_eq!(
            store
                .cli_session("t".into(), "acp".into())
                .await
                .unwrap()
                .turns,
            None
        );
        store
            .append_turn(vec![msg(10, "t")], turn(&s, Some(4)))
            .await
            .unwrap();
        drop(store);
        thread.join();
        let (store, thread) = Store::open(dir.path(), &config(), &|_| {}).await.unwrap();
        assert_eq!(
            store
                .cli_session("t".into(), "acp".into())
                .await
                .unwrap()
                .turns,
            Some(4),
            "survives reopen"
        );
        // A delete moves the session on: the next CLI session has no count.
        store.clear(Some("t".into())).await.unwrap();
        let next = store.cli_session("t".into(), "acp".into()).await.unwrap();
        assert_ne!(next.id, s.id);
        assert_eq!((next.exists, next.turns), (false, None));
        drop(store);
        thread.join();
    }

    #[tokio::test]
    async fn a_transcript_is_the_sessions_newest_messages_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread) = Store::open(dir.path(), &config(), &|_| {}).await.unwrap();
        let m = |session: &str, role: Role, content: &str| Message {
            session_id: session.into(),
            role,
            content: content.into(),
            timestamp: 1.0,
        };
        store
            .append(vec![
                m("a", Role::User, "aaaa"),
                m("a", Role::Assistant, "bbbb"),
                m("other", Role::User, "not this one"),
                m("a", Role::User, "cccc"),
                m("a", Role::Assistant, "dddd"),
            ])
            .await
            .unwrap();
        let all = store.transcript("a".into(), 1 << 20).await.unwrap();
        let texts: Vec<_> = all.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["aaaa", "bbbb", "cccc", "dddd"]);
        assert_eq!(all[0].role, Role::User);
        // 12 bytes hold the newest three; the oldest goes.
        let some = store.transcript("a".into(), 12).await.unwrap();
        let texts: Vec<_> = some.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["bbbb", "cccc", "dddd"]);
        // The newest message comes even when it alone is over the bound.
        let one = store.transcript("a".into(), 1).await.unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].content, "dddd");
        assert!(store
            .transcript("none".into(), 100)
            .await
            .unwrap()
            .is_empty());
        drop(store);
        thread.join();
    }

    #[tokio::test]
    async fn cli_sessions_are_recorded_with_the_turn_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread) = Store::open(dir.path(), &config(), &|_| {}).await.unwrap();
        let first = store
            .cli_session("demo".into(), "claude-code".into())
            .await
            .unwrap();
        assert_eq!(
            first,
            CliSession {
                id: cli_session_id("demo", 0),
                exists: false,
                agent_id: None,
                turns: None,
            }
        );
        store
            .append_turn(vec![msg(0, "demo"), msg(1, "demo")], record("demo", &first))
            .await
            .unwrap();
        let second = store
            .cli_session("demo".into(), "claude-code".into())
            .await
            .unwrap();
        assert_eq!(
            second,
            CliSession {
                id: first.id.clone(),
                exists: true,
                agent_id: None,
                turns: None,
            }
        );
        // Each CLI keeps its own sessions.
        let gemini = store
            .cli_session("demo".into(), "gemini".into())
            .await
            .unwrap();
        assert!(!gemini.exists);
        store.close().await.unwrap();
        thread.join();

        let (store, thread) = Store::open(dir.path(), &config(), &|_| {}).await.unwrap();
        let again = store
            .cli_session("demo".into(), "claude-code".into())
            .await
            .unwrap();
        assert_eq!(again, second);
        store.close().await.unwrap();
        thread.join();
    }

    #[tokio::test]
    async fn deleting_a_session_moves_it_to_a_new_cli_session_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let (store, thread) = Store::open(dir.path(), &config(), &|_| {}).await.unwrap();
        let g0 = store
            .cli_session("a".into(), "claude-code".into())
            .await
            .unwrap();
        store
            .append_turn(vec![msg(0, "a")], record("a", &g0))
            .await
            .unwrap();
        let other = store
            .cli_session("b".into(), "claude-code".into())
            .await
            .unwrap();
        store
            .append_turn(vec![msg(0, "b")], record("b", &other))
            .await
            .unwrap();

        assert_eq!(store.clear(Some("a".into())).await.unwrap(), 1);
        let g1 = store
            .cli_session("a".into(), "claude-code".into())
            .await
            .unwrap();
        assert_eq!(
            g1,
            CliSession {
                id: cli_session_id("a", 1),
                exists: false,
                agent_id: None,
                turns: None,
            }
        );
        // The other session is untouched.
        assert!(
            store
                .cli_session("b".into(), "claude-code".into())
                .await
                .unwrap()
                .exists
        );

        // Deleting everything moves every session past any generation it had.
        store
            .append_turn(vec![msg(1, "a")], record("a", &g1))
            .await
            .unwrap();
        store.clear(None).await.unwrap();
        let a = store
            .cli_session("a".into(), "claude-code".into())
            .await
            .unwrap();
        let b = store
            .cli_session("b".into(), "claude-code".into())
            .await
            .unwrap();
        assert_eq!(
            a,
            CliSession {
                id: cli_session_id("a", 2),
                exists: false,
                agent_id: None,
                turns: None,
            }
        );
        assert_eq!(
            b,
            CliSession {
                id: cli_session_id("b", 2),
                exists: false,
                agent_id: None,
                turns: None,
            }
        );
        // ... including sessions it never saw.
        let c = store
            .cli_session("never".into(), "gemini".into())
            .await
            .unwrap();
        assert_eq!(c.id, cli_session_id("never", 2));
        // And a later single delete still moves forward, never back.
        store.clear(Some("b".into())).await.unwrap();
        store.close().await.unwrap();
        thread.join();
        // The floor replaced the rows below it: only `*` and `b` remain.
        let rows: Vec<(String, i64)> = Connection::open(dir.path().join(DB_FILE))
            .unwrap()
            .prepare("SELECT session_id, generation FROM session_generations ORDER BY session_id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(rows, [("*".to_owned(), 2), ("b".to_owned(), 3)]);
        let (store, thread) = Store::open(dir.path(), &config(), &|_| {}).await.unwrap();
        let b = store
            .cli_session("b".into(), "claude-code".into())
            .await
            .unwrap();
        assert_eq!(b.id, cli_session_id("b", 3));
        store.close().await.unwrap();
        thread.join();
    }

    #[tokio::test]
    async fn retention_sweeps_cli_sessions_without_messages() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config();
        cfg.retention_messages = 10;
        let (store, thread) = Store::open(dir.path(), &cfg, &|_| {}).await.unwrap();
        let old = store
            .cli_session("old".into(), "claude-code".into())
            .await
            .unwrap();
        store
            .append_turn(vec![msg(0, "old")], record("old", &old))
            .await
            .unwrap();
        let new = store
            .cli_session("new".into(), "claude-code".into())
            .await
            .unwrap();
        let batch: Vec<_> = (0..RETENTION_SWEEP_EVERY as usize)
            .map(|i| msg(i, "new"))
            .collect();
        store.append_turn(batch, record("new", &new)).await.unwrap();
        assert!(
            !store
                .cli_session("old".into(), "claude-code".into())
                .await
                .unwrap()
                .exists
        );
        assert!(
            store
                .cli_session("new".into(), "claude-code".into())
                .await
                .unwrap()
                .exists
        );
        store.close().await.unwrap();
        thread.join();
    }
}
