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
//! Not here: the in-memory history cache (`agent::history`), HTTP mapping.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::agent::history::{Message, Role};
use crate::config::{StoreConfig, SyncMode};

/// File name of the database inside the state dir.
pub const DB_FILE: &str = "state.db";

/// How many appended rows pass between retention sweeps. Sweeping after every
/// batch would cost a `DELETE` per commit; this keeps the table within
/// `retention_messages + RETENTION_SWEEP_EVERY` rows.
const RETENTION_SWEEP_EVERY: u64 = 1024;

/// SQLite's own wait for a lock held by another process (an operator's
/// `sqlite3` shell); our own thread never contends with itself.
const BUSY_TIMEOUT: Duration = Duration::from_secs(2);

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
];

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
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e.to_string())
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

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
        messages: Vec<Message>,
        reply: Reply<()>,
    },
    Recent {
        limit: usize,
        reply: Reply<Vec<Message>>,
    },
    Clear {
        session: Option<String>,
        reply: Reply<u64>,
    },
    Sessions {
        reply: Reply<SessionSummary>,
    },
    Probe {
        reply: Reply<()>,
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
    pub fn open(
        state_dir: &Path,
        config: &StoreConfig,
        on_slow_step: &dyn Fn(&str),
    ) -> Result<(Store, StoreThread), StoreError> {
        prepare_state_dir(state_dir)?;
        let path = state_dir.join(DB_FILE);
        let conn = open_connection(&path, config.synchronous)?;
        migrate(&conn, on_slow_step).map_err(|e| StoreError::Open {
            path: path.clone(),
            reason: format!("migration failed: {e}"),
        })?;
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let worker = Worker {
            conn,
            max_batch: config.max_batch.max(1),
            retention: config.retention_messages,
            since_sweep: 0,
        };
        let handle = std::thread::Builder::new()
            .name("agentd-store".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| StoreError::Open {
                path: path.clone(),
                reason: format!("cannot start the store thread: {e}"),
            })?;
        Ok((
            Store {
                tx,
                enqueue_timeout: config.enqueue_timeout,
                path,
            },
            StoreThread(Some(handle)),
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
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
        match tokio::time::timeout(REPLY_TIMEOUT, rx).await {
            Ok(answer) => answer.map_err(|_| StoreError::Stopped)?,
            Err(_) => Err(StoreError::NoAnswer(REPLY_TIMEOUT)),
        }
    }

    /// Durably append messages; returns after they are committed.
    pub async fn append(&self, messages: Vec<Message>) -> Result<(), StoreError> {
        self.call(|reply| Request::Append { messages, reply }).await
    }

    /// The newest `limit` messages of all sessions, oldest first.
    pub async fn recent(&self, limit: usize) -> Result<Vec<Message>, StoreError> {
        self.call(|reply| Request::Recent { limit, reply }).await
    }

    /// Delete all messages, or one session's. Returns the rows deleted.
    pub async fn clear(&self, session: Option<String>) -> Result<u64, StoreError> {
        self.call(|reply| Request::Clear { session, reply }).await
    }

    pub async fn sessions(&self) -> Result<SessionSummary, StoreError> {
        self.call(|reply| Request::Sessions { reply }).await
    }

    /// The health check's round trip: a read, then take and release the write
    /// lock (`BEGIN IMMEDIATE; ROLLBACK`).
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.call(|reply| Request::Probe { reply }).await
    }

    /// Checkpoint and stop the thread. Requests already queued are served
    /// first; later ones get `Stopped`.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.call(|reply| Request::Close { reply }).await
    }

    /// Fault injection: make the store thread block forever.
    #[cfg(feature = "fault-injection")]
    pub fn inject_hang(&self) -> bool {
        self.tx.try_send(Request::Hang).is_ok()
    }
}

fn prepare_state_dir(dir: &Path) -> Result<(), StoreError> {
    let fail = |reason: String| StoreError::StateDir {
        path: dir.to_owned(),
        reason,
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
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

fn open_connection(path: &Path, sync: SyncMode) -> Result<Connection, StoreError> {
    let fail = |e: rusqlite::Error| StoreError::Open {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let conn = Connection::open(path).map_err(fail)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(fail)?;
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
    max_batch: usize,
    retention: u64,
    since_sweep: u64,
}

impl Worker {
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
            match req {
                Request::Append { messages, reply } => {
                    // Group commit: fold every append already waiting into this
                    // transaction; the first other request ends the batch and
                    // runs next, so order is kept.
                    let mut batch = vec![(messages, reply)];
                    while batch.len() < self.max_batch {
                        match rx.try_recv() {
                            Ok(Request::Append { messages, reply }) => {
                                batch.push((messages, reply))
                            }
                            Ok(other) => {
                                deferred = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.append_batch(batch);
                }
                Request::Recent { limit, reply } => {
                    let _ = reply.send(self.recent(limit).map_err(Into::into));
                }
                Request::Clear { session, reply } => {
                    let _ = reply.send(self.clear(session.as_deref()).map_err(Into::into));
                }
                Request::Sessions { reply } => {
                    let _ = reply.send(self.sessions().map_err(Into::into));
                }
                Request::Probe { reply } => {
                    let _ = reply.send(self.probe().map_err(Into::into));
                }
                Request::Close { reply } => {
                    let r = self
                        .conn
                        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                        .map_err(Into::into);
                    rx.close();
                    // Serve what was queued before the close, then stop.
                    while let Ok(req) = rx.try_recv() {
                        if let Request::Append { messages, reply } = req {
                            self.append_batch(vec![(messages, reply)]);
                        }
                    }
                    let _ = reply.send(r);
                    break;
                }
                #[cfg(feature = "fault-injection")]
                Request::Hang => {
                    tracing::warn!("fault injection: the store thread now blocks forever");
                    loop {
                        std::thread::park();
                    }
                }
            }
        }
    }

    fn append_batch(&mut self, batch: Vec<(Vec<Message>, Reply<()>)>) {
        let rows: u64 = batch.iter().map(|(m, _)| m.len() as u64).sum();
        let result = self.insert(&batch);
        match result {
            Ok(()) => {
                for (_, reply) in batch {
                    let _ = reply.send(Ok(()));
                }
                self.since_sweep += rows;
                if self.retention > 0 && self.since_sweep >= RETENTION_SWEEP_EVERY {
                    self.since_sweep = 0;
                    if let Err(e) = self.sweep() {
                        tracing::warn!(error = %e, "retention sweep failed");
                    }
                }
            }
            Err(e) => {
                let err = StoreError::from(e);
                tracing::error!(error = %err, rows, "append failed; nothing in this batch was stored");
                for (_, reply) in batch {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }

    fn insert(&mut self, batch: &[(Vec<Message>, Reply<()>)]) -> rusqlite::Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO messages (session_id, role, content, ts) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (messages, _) in batch {
                for m in messages {
                    stmt.execute(params![
                        m.session_id,
                        m.role.as_str(),
                        m.content,
                        m.timestamp
                    ])?;
                }
            }
        }
        tx.commit()
    }

    /// Keep the newest `retention` rows (ids grow monotonically).
    fn sweep(&self) -> rusqlite::Result<usize> {
        let started = Instant::now();
        let n = self.conn.execute(
            "DELETE FROM messages WHERE id <= (SELECT max(id) FROM messages) - ?1",
            params![self.retention as i64],
        )?;
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

    fn clear(&self, session: Option<&str>) -> rusqlite::Result<u64> {
        let n = match session {
            Some(s) => self
                .conn
                .execute("DELETE FROM messages WHERE session_id = ?1", params![s])?,
            None => self.conn.execute("DELETE FROM messages", [])?,
        };
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

    fn probe(&self) -> rusqlite::Result<()> {
        let _: Option<i64> = self
            .conn
            .query_row(
                "SELECT id FROM messages ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        self.conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")
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
        let (store, thread) = Store::open(dir.path(), &config(), &|_| {}).unwrap();
        for i in 0..10 {
            store.append(vec![msg(i, "s")]).await.unwrap();
        }
        store.close().await.unwrap();
        thread.join();
        let (store, thread) = Store::open(dir.path(), &config(), &|_| {}).unwrap();
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
        let (store, thread) = Store::open(dir.path(), &cfg, &|_| {}).unwrap();
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
        let (store, thread) = Store::open(dir.path(), &config(), &|_| {}).unwrap();
        store
            .append(vec![msg(0, "a"), msg(1, "a"), msg(2, "b")])
            .await
            .unwrap();
        assert_eq!(store.clear(Some("a".into())).await.unwrap(), 2);
        let s = store.sessions().await.unwrap();
        assert_eq!((s.total_messages, s.total_sessions), (1, 1));
        assert_eq!(s.sessions[0].session_id, "b");
        store.probe().await.unwrap();
        store.close().await.unwrap();
        assert!(matches!(store.probe().await, Err(StoreError::Stopped)));
        thread.join();
    }

    #[test]
    fn unwritable_state_dir_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = Store::open(&file, &config(), &|_| {})
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not-a-dir"), "{err}");
    }
}
