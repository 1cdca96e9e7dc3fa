//! An execution's output as numbered chunks in a bounded replay buffer, so a
//! stream subscriber sees the output from its start (or from where it left
//! off, by sequence number) and then live.
//!
//! The writer is the reader of a child's stdout (or the echo runtime): a push
//! takes a short lock, appends, evicts the oldest chunks past the bounds and
//! publishes the newest sequence number. It never waits for a subscriber.
//! Subscribers pull from the buffer at their own pace; one that falls behind
//! the oldest retained chunk is told how many it missed and continues from
//! there. Formatting for SSE is not here (that is `server::executions`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::watch;

/// Bound of one execution's replay buffer when its owner names none: the
/// default of the `stream_replay_bytes` setting (its entry in the settings
/// says why 1 MiB), which a test holds equal to this.
pub const DEFAULT_REPLAY_BYTES: usize = 1 << 20;

/// Bytes a chunk costs beyond its text (the deque slot, the `Arc` header),
/// counted against the byte bound so a stream of tiny chunks cannot hold far
/// more memory than the bound says.
pub const CHUNK_OVERHEAD_BYTES: usize = 64;

/// Most chunks one `next_batch` hands out, so a subscriber that is far behind
/// holds the lock briefly and formats a bounded amount at a time.
pub const MAX_BATCH: usize = 64;

/// One piece of output, numbered from 1 in the order it was produced.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub seq: u64,
    pub text: Arc<str>,
    /// `None` for output text; for a typed event (an ACP agent's tool call,
    /// plan, thought or permission request) its SSE event name, the text then
    /// being one line of JSON.
    pub event: Option<&'static str>,
}

/// What a subscriber gets next: how many chunks it should have seen but were
/// evicted first, then the chunks that follow in order.
#[derive(Debug, Default)]
pub struct Batch {
    pub missed: u64,
    pub chunks: Vec<Chunk>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.missed == 0 && self.chunks.is_empty()
    }
}

#[derive(Debug, Default)]
struct Retained {
    chunks: VecDeque<Chunk>,
    /// Text bytes plus `CHUNK_OVERHEAD_BYTES` per chunk.
    bytes: usize,
    /// Sequence number of the newest chunk ever pushed (0 = none yet).
    last_seq: u64,
}

/// The bound on every execution's replay buffer together, and the bytes
/// they hold now. Finished executions' buffers are given back first, oldest
/// first; a running one past the total then drops its own oldest chunks (the
/// newest always stays).
#[derive(Debug)]
pub struct ReplayBudget {
    limit: usize,
    /// Accounted bytes (text + `CHUNK_OVERHEAD_BYTES` per chunk) of every
    /// log sharing this budget. Read by `/health`.
    held: AtomicUsize,
    /// Logs of finished executions, oldest first: the first to give back.
    /// Bounded by the executor's finished ring (a dead entry is skipped).
    finished: Mutex<VecDeque<Weak<OutputLog>>>,
}

impl ReplayBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(ReplayBudget {
            limit,
            held: AtomicUsize::new(0),
            finished: Mutex::new(VecDeque::new()),
        })
    }

    /// Bytes held by all logs now.
    pub fn held(&self) -> usize {
        self.held.load(Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    fn over(&self) -> bool {
        self.held() > self.limit
    }

    /// `log`'s execution finished: its buffer is now the first to give back
    /// (after those that finished before it). Gives back at once while the
    /// total is over the limit.
    pub fn finished(&self, log: &Arc<OutputLog>) {
        let mut finished = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        finished.retain(|w| w.strong_count() > 0);
        finished.push_back(Arc::downgrade(log));
        drop(finished);
        self.reclaim();
    }

    /// Release finished executions' buffers, oldest first, until the total
    /// is within the limit or none is left.
    fn reclaim(&self) {
        while self.over() {
            let next = self
                .finished
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            match next {
                Some(weak) => {
                    if let Some(log) = weak.upgrade() {
                        log.release();
                    }
                }
                None => return,
            }
        }
    }
}

/// The bounded, numbered output of one execution.
#[derive(Debug)]
pub struct OutputLog {
    retained: Mutex<Retained>,
    /// The newest sequence number; subscribers wait on it for new output.
    latest: watch::Sender<u64>,
    /// At most this many chunks are kept (the newest always is).
    max_chunks: usize,
    /// At most this many accounted bytes are kept (the newest chunk always
    /// is, whatever its size).
    max_bytes: usize,
    /// The total bound this log counts against, if any.
    budget: Option<Arc<ReplayBudget>>,
}

impl OutputLog {
    pub fn new(max_chunks: usize, max_bytes: usize) -> Self {
        OutputLog {
            retained: Mutex::new(Retained::default()),
            latest: watch::channel(0).0,
            max_chunks: max_chunks.max(1),
            max_bytes,
            budget: None,
        }
    }

    /// A log whose bytes also count against `budget`.
    pub fn with_budget(max_chunks: usize, max_bytes: usize, budget: Arc<ReplayBudget>) -> Self {
        let mut log = Self::new(max_chunks, max_bytes);
        log.budget = Some(budget);
        log
    }

    /// Accounted bytes held now.
    pub fn bytes(&self) -> usize {
        self.retained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bytes
    }

    /// Drop every chunk (the total bound needs the memory back). Readers
    /// are told what they missed, as after any eviction.
    pub fn release(&self) {
        let freed = {
            let mut r = self.retained.lock().unwrap_or_else(|e| e.into_inner());
            r.chunks = VecDeque::new();
            std::mem::take(&mut r.bytes)
        };
        if let Some(b) = &self.budget {
            b.held.fetch_sub(freed, Relaxed);
        }
    }

    /// Append a chunk and evict the oldest past the bounds. Never waits for a
    /// subscriber; empty text is ignored (it would be an empty event).
    pub fn push(&self, text: impl Into<Arc<str>>) {
        self.push_chunk(text.into(), None);
    }

    /// Append a typed event: `json` (one line) sent as SSE `event: <event>`,
    /// numbered, bounded and replayed like output text.
    pub fn push_event(&self, event: &'static str, json: String) {
        self.push_chunk(json.into(), Some(event));
    }

    fn push_chunk(&self, text: Arc<str>, event: Option<&'static str>) {
        if text.is_empty() {
            return;
        }
        let seq = {
            let mut r = self.retained.lock().unwrap_or_else(|e| e.into_inner());
            r.last_seq += 1;
            let seq = r.last_seq;
            let cost = text.len() + CHUNK_OVERHEAD_BYTES;
            r.bytes += cost;
            if let Some(b) = &self.budget {
                b.held.fetch_add(cost, Relaxed);
            }
            r.chunks.push_back(Chunk { seq, text, event });
            self.evict(&mut r, |r| {
                r.bytes > self.max_bytes || r.chunks.len() > self.max_chunks
            });
            seq
        };
        if let Some(budget) = self.budget.as_ref().filter(|b| b.over()) {
            // Finished executions give back first; then this one's oldest go.
            budget.reclaim();
            if budget.over() {
                let mut r = self.retained.lock().unwrap_or_else(|e| e.into_inner());
                self.evict(&mut r, |_| budget.over());
            }
        }
        self.latest.send_replace(seq);
    }

    /// Drop the oldest chunks while `too_much` holds, always keeping the
    /// newest.
    fn evict(&self, r: &mut Retained, too_much: impl Fn(&Retained) -> bool) {
        while r.chunks.len() > 1 && too_much(r) {
            if let Some(old) = r.chunks.pop_front() {
                r.bytes -= old.text.len() + CHUNK_OVERHEAD_BYTES;
                if let Some(b) = &self.budget {
                    // Counted at once, so `too_much` sees the new total.
                    b.held
                        .fetch_sub(old.text.len() + CHUNK_OVERHEAD_BYTES, Relaxed);
                }
            }
        }
    }

    /// Sequence number of the newest chunk (0 = no output yet).
    pub fn last_seq(&self) -> u64 {
        *self.latest.borrow()
    }

    /// Chunks after `seq` (at most `MAX_BATCH`), preceded by the count of
    /// those evicted before anyone read them.
    pub fn after(&self, seq: u64) -> Batch {
        let r = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = r.chunks.front().map_or(r.last_seq + 1, |c| c.seq);
        let missed = oldest.saturating_sub(seq + 1);
        let skip = (seq + 1).saturating_sub(oldest) as usize;
        let chunks = r
            .chunks
            .iter()
            .skip(skip)
            .take(MAX_BATCH)
            .cloned()
            .collect();
        Batch { missed, chunks }
    }

    /// A reader from the very start of the output.
    pub fn subscribe(self: &Arc<Self>) -> OutputReader {
        self.subscribe_after(0)
    }

    /// A reader of the chunks after `seq` (a reconnect's `Last-Event-ID`).
    pub fn subscribe_after(self: &Arc<Self>, seq: u64) -> OutputReader {
        OutputReader {
            log: self.clone(),
            latest: self.latest.subscribe(),
            cursor: seq,
            pending: VecDeque::new(),
        }
    }
}

impl Drop for OutputLog {
    /// A log that goes (its execution left the finished ring) gives its
    /// bytes back to the total.
    fn drop(&mut self) {
        if let Some(b) = &self.budget {
            let r = self.retained.get_mut().unwrap_or_else(|e| e.into_inner());
            b.held.fetch_sub(r.bytes, Relaxed);
        }
    }
}

/// Chunks were evicted before this reader got them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} output chunks were evicted before they were read")]
pub struct Missed(pub u64);

/// Nothing new yet (from `try_recv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TryRecvError {
    #[error("no new output yet")]
    Empty,
    #[error(transparent)]
    Missed(#[from] Missed),
}

/// One subscriber's position in an `OutputLog`.
#[derive(Debug)]
pub struct OutputReader {
    log: Arc<OutputLog>,
    latest: watch::Receiver<u64>,
    /// Sequence number of the last chunk handed out (or skipped as missed).
    cursor: u64,
    /// Chunks fetched but not yet handed out by `recv`.
    pending: VecDeque<Chunk>,
}

impl OutputReader {
    /// The next batch after the cursor, without waiting (empty when there is
    /// nothing new).
    pub fn try_batch(&mut self) -> Batch {
        let batch = self.log.after(self.cursor);
        self.cursor += batch.missed;
        if let Some(last) = batch.chunks.last() {
            self.cursor = last.seq;
        }
        batch
    }

    /// Wait until there is output after the cursor, then take it. Cancel
    /// safe: dropped while waiting, the cursor has not moved.
    pub async fn next_batch(&mut self) -> Batch {
        let cursor = self.cursor;
        // The sender lives in the log this reader keeps alive: never closed.
        let _ = self.latest.wait_for(|&seq| seq > cursor).await;
        self.try_batch()
    }

    /// Next chunk's text, waiting for it; `Missed` first when chunks were
    /// evicted before this reader got them (reading continues after it).
    pub async fn recv(&mut self) -> Result<String, Missed> {
        loop {
            if let Some(c) = self.pending.pop_front() {
                return Ok(c.text.to_string());
            }
            let batch = self.next_batch().await;
            self.pending.extend(batch.chunks);
            if batch.missed > 0 {
                return Err(Missed(batch.missed));
            }
        }
    }

    /// Like `recv` without waiting.
    pub fn try_recv(&mut self) -> Result<String, TryRecvError> {
        if self.pending.is_empty() {
            let batch = self.try_batch();
            self.pending.extend(batch.chunks);
            if batch.missed > 0 {
                return Err(Missed(batch.missed).into());
            }
        }
        match self.pending.pop_front() {
            Some(c) => Ok(c.text.to_string()),
            None => Err(TryRecvError::Empty),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_replay_bound_is_the_settings_default() {
        let c = crate::config::Config::load(Default::default(), |_| None).unwrap();
        assert_eq!(c.executor.stream_replay_bytes, DEFAULT_REPLAY_BYTES);
    }

    #[test]
    fn finished_logs_give_back_first_and_the_total_holds() {
        // Each chunk costs 100 + 64 bytes; the total holds about six.
        let budget = ReplayBudget::new(1000);
        let text = "x".repeat(100);
        let old = Arc::new(OutputLog::with_budget(100, 1 << 20, budget.clone()));
        for _ in 0..4 {
            old.push(text.as_str());
        }
        budget.finished(&old);
        assert_eq!(budget.held(), 4 * 164);
        let running = Arc::new(OutputLog::with_budget(100, 1 << 20, budget.clone()));
        for _ in 0..4 {
            running.push(text.as_str());
        }
        // Over the total: the finished log gave everything back, the running
        // one kept all of its output.
        assert_eq!(old.bytes(), 0);
        assert_eq!(running.bytes(), 4 * 164);
        assert_eq!(budget.held(), 4 * 164);
        // A reader of the released log is told what it missed.
        assert_eq!(old.after(0).missed, 4);
        // With nothing finished left, the running log drops its own oldest.
        for _ in 0..10 {
            running.push(text.as_str());
        }
        assert!(budget.held() <= budget.limit(), "{}", budget.held());
        assert_eq!(running.bytes(), budget.held());
        assert!(running.after(0).missed > 0);
        drop(running);
        drop(old);
        assert_eq!(budget.held(), 0);
    }

    fn texts(b: &Batch) -> Vec<(u64, &str)> {
        b.chunks.iter().map(|c| (c.seq, &*c.text)).collect()
    }

    #[test]
    fn numbers_chunks_and_replays_from_any_point() {
        let log = Arc::new(OutputLog::new(100, 1 << 20));
        for t in ["a", "b", "", "c"] {
            log.push(t);
        }
        assert_eq!(log.last_seq(), 3);
        let mut r = log.subscribe();
        let b = r.try_batch();
        assert_eq!(
            (b.missed, texts(&b)),
            (0, vec![(1, "a"), (2, "b"), (3, "c")])
        );
        assert!(r.try_batch().is_empty());
        let b = log.subscribe_after(2).try_batch();
        assert_eq!(texts(&b), vec![(3, "c")]);
        assert!(log.subscribe_after(3).try_batch().is_empty());
    }

    #[test]
    fn evicts_oldest_past_the_byte_bound_and_counts_the_missed() {
        let per = 10 + CHUNK_OVERHEAD_BYTES;
        let log = Arc::new(OutputLog::new(100, 3 * per));
        for i in 0..10 {
            log.push(format!("chunk-{i:04}"));
        }
        let b = log.subscribe().try_batch();
        assert_eq!(b.missed, 7);
        assert_eq!(b.chunks.first().unwrap().seq, 8);
        assert_eq!(b.chunks.len(), 3);
        // A reader already past the evicted ones misses nothing.
        let b = log.subscribe_after(8).try_batch();
        assert_eq!((b.missed, b.chunks.len()), (0, 2));
    }

    #[test]
    fn keeps_the_newest_chunk_even_past_the_bounds() {
        let log = Arc::new(OutputLog::new(1, 1));
        log.push("first");
        log.push("second, larger than the whole bound");
        let b = log.subscribe().try_batch();
        assert_eq!(b.missed, 1);
        assert_eq!(texts(&b), vec![(2, "second, larger than the whole bound")]);
    }

    #[tokio::test]
    async fn a_waiting_reader_wakes_on_push_and_reports_a_gap() {
        let log = Arc::new(OutputLog::new(2, 1 << 20));
        let mut r = log.subscribe();
        let waiter = {
            let log = log.clone();
            tokio::spawn(async move {
                let mut r = log.subscribe();
                r.recv().await
            })
        };
        log.push("one");
        assert_eq!(waiter.await.unwrap(), Ok("one".to_owned()));
        log.push("two");
        log.push("three");
        // "one" was evicted (2 chunks kept) before `r` read anything.
        assert_eq!(r.recv().await, Err(Missed(1)));
        assert_eq!(r.recv().await, Ok("two".to_owned()));
        assert_eq!(r.try_recv(), Ok("three".to_owned()));
        assert_eq!(r.try_recv(), Err(TryRecvError::Empty));
    }
}
