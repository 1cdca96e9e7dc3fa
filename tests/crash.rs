//! Crash safety: the real `agentd serve` is killed with SIGKILL at a random
//! moment while 8 writers post chats over HTTP; after each restart every
//! acknowledged message is in `state.db` and `PRAGMA integrity_check` is ok.
//!
//! The full 20 rounds run by default (about 10 s); `AGENTD_CRASH_ROUNDS=<n>`
//! runs more or fewer. The seed of the kill moments is printed and can be
//! replayed with `AGENTD_CRASH_SEED=<n>`.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Daemon;

const WRITERS: usize = 8;
/// Rounds unless `AGENTD_CRASH_ROUNDS` says otherwise.
const ROUNDS: usize = 20;
/// Upper bound for `AGENTD_CRASH_ROUNDS`, so a typo cannot run for hours.
const MAX_ROUNDS: usize = 1_000;
/// Each writer sends at most this many requests per round (a bound even if
/// the kill never came).
const MAX_REQUESTS_PER_WRITER: usize = 5_000;
/// The kill comes this long after the writers start, plus a random share of
/// `KILL_SPREAD_MS`.
const KILL_MIN_MS: u64 = 50;
const KILL_SPREAD_MS: u64 = 700;
/// Per-request socket timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// xorshift64*: enough randomness for kill moments, replayable from a seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// One POST /api/chat on a fresh connection; true when answered 200.
fn post_chat(addr: SocketAddr, message: &str, session: &str) -> std::io::Result<bool> {
    let body = serde_json::json!({"message": message, "session_id": session}).to_string();
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    write!(
        s,
        "POST /api/chat HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = Vec::new();
    s.take(1 << 20).read_to_end(&mut answer)?;
    Ok(answer.starts_with(b"HTTP/1.1 200 "))
}

/// Run the writers until `stop`; returns the acknowledged messages.
fn write_until_killed(addr: SocketAddr, round: usize, stop: Arc<AtomicBool>) -> Vec<String> {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (acked, stop) = (acked.clone(), stop.clone());
            std::thread::spawn(move || {
                for i in 0..MAX_REQUESTS_PER_WRITER {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let msg = format!("r{round}-w{w}-{i}");
                    match post_chat(addr, &msg, &format!("w{w}")) {
                        Ok(true) => acked.lock().unwrap().push(msg),
                        Ok(false) => {}
                        // The server is gone: this writer's round is over.
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    Arc::try_unwrap(acked).unwrap().into_inner().unwrap()
}

/// (integrity_check answer, user messages in the database).
fn read_db(state_dir: &Path) -> (String, HashSet<String>) {
    let conn = rusqlite::Connection::open(state_dir.join("state.db")).unwrap();
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    let mut stmt = conn
        .prepare("SELECT content FROM messages WHERE role = 'user'")
        .unwrap();
    let found = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .collect::<Result<HashSet<_>, _>>()
        .unwrap();
    (integrity, found)
}

#[test]
fn every_acknowledged_message_survives_kill_9() {
    let rounds = std::env::var("AGENTD_CRASH_ROUNDS")
        .ok()
        .map(|s| s.parse::<usize>().expect("AGENTD_CRASH_ROUNDS is a number"))
        .unwrap_or(ROUNDS)
        .clamp(1, MAX_ROUNDS);
    let seed = std::env::var("AGENTD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash suite: {rounds} rounds, {WRITERS} writers, seed {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut all_acked: Vec<String> = Vec::new();
    let started = Instant::now();

    let mut daemon = Daemon::start(&[], dir.path());
    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let kill_after = Duration::from_millis(KILL_MIN_MS + rng.next() % KILL_SPREAD_MS);
        let killer = {
            let (stop, pid) = (stop.clone(), daemon.pid());
            std::thread::spawn(move || {
                std::thread::sleep(kill_after);
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .unwrap();
                stop.store(true, Ordering::SeqCst);
            })
        };
        let acked = write_until_killed(daemon.addr, round, stop);
        killer.join().unwrap();
        let status = daemon.wait_status();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "round {round}: killed by SIGKILL"
        );
        all_acked.extend(acked.iter().cloned());

        // Restart on the same state dir (the dead holder's lock is gone with
        // it), then look at what the restarted server has on disk.
        daemon = Daemon::start(&[], dir.path());
        let (integrity, found) = read_db(dir.path());
        assert_eq!(integrity, "ok", "round {round}");
        let missing: Vec<_> = all_acked.iter().filter(|m| !found.contains(*m)).collect();
        eprintln!(
            "round {round:2}: killed after {:4} ms, {:5} acknowledged this round, \
             {:6} in total, {} missing, integrity {integrity}",
            kill_after.as_millis(),
            acked.len(),
            all_acked.len(),
            missing.len()
        );
        assert!(
            missing.is_empty(),
            "round {round}: acknowledged but lost: {:?}",
            &missing[..missing.len().min(5)]
        );
    }
    assert!(
        !all_acked.is_empty(),
        "no message was ever acknowledged: the suite proved nothing"
    );
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait(), Some(0));
    eprintln!(
        "crash suite: {rounds} kill -9 rounds, {} acknowledged messages, all present, \
         integrity ok, {:.1} s",
        all_acked.len(),
        started.elapsed().as_secs_f64()
    );
}
