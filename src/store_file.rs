//! The file under the store's connection: proof, before each write is
//! acknowledged, that `state.db` is still the SQLite database agentd opened.
//!
//! SQLite trusts the file it has open. Deleted, replaced by a rename,
//! overwritten in place, truncated or swapped for another database by `cp`,
//! it keeps committing into its write-ahead log and answers "done" for writes
//! that nobody will read back. This room notices, cheaply enough to run
//! before and after every batch:
//!
//! * **identity**: the path still names the inode the connection opened
//!   (one `stat`); otherwise the file was deleted or replaced;
//! * **header**: the first 100 bytes of the file (one `pread` on a
//!   descriptor of its own) are exactly what they were after the store's
//!   last checkpoint. In WAL mode SQLite writes the database file only when
//!   it checkpoints, so between two checkpoints its header (magic string,
//!   file change counter, page count, schema cookie) cannot change unless
//!   someone else wrote the file;
//! * **length**: the file holds at least the pages its header counts (the
//!   same `stat`: the path names the open inode); a shorter file was
//!   truncated.
//!
//! Deeper damage (a page in the middle overwritten) leaves the header alone;
//! the store's scheduled `PRAGMA quick_check` finds it.
//!
//! This room reads; it never writes the file and never opens a second
//! SQLite connection.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Bytes of the SQLite database header.
pub const HEADER_LEN: usize = 100;

/// The first 16 bytes of every SQLite 3 database file.
pub const MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Why `state.db` can no longer be trusted with a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileProblem {
    /// The path names no file any more.
    Deleted,
    /// The path names another file (renamed over, or recreated).
    Replaced,
    /// The file no longer starts with SQLite's magic string.
    NotADatabase,
    /// The file is shorter than the database it held.
    Truncated { len: u64, expected: u64 },
    /// A valid header, but not the one the store's last checkpoint left:
    /// another database (or an old copy) was written over the file.
    Overwritten {
        change_counter: u32,
        expected_counter: u32,
    },
    /// The file could not be read or stat'ed.
    Unreadable(String),
}

impl std::fmt::Display for FileProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileProblem::Deleted => write!(f, "state.db was deleted"),
            FileProblem::Replaced => write!(f, "state.db was replaced"),
            FileProblem::NotADatabase => write!(
                f,
                "state.db was overwritten in place: it is no longer a SQLite database (bad header)"
            ),
            FileProblem::Truncated { len, expected } => write!(
                f,
                "state.db was truncated to {len} bytes (the database has {expected})"
            ),
            FileProblem::Overwritten {
                change_counter,
                expected_counter,
            } if change_counter == expected_counter => write!(
                f,
                "state.db was overwritten in place by another database \
                 (its header is not the one agentd last wrote, at file change counter \
                 {change_counter})"
            ),
            FileProblem::Overwritten {
                change_counter,
                expected_counter,
            } => write!(
                f,
                "state.db was overwritten in place by another database \
                 (file change counter {change_counter}, expected {expected_counter})"
            ),
            FileProblem::Unreadable(e) => write!(f, "cannot check state.db: {e}"),
        }
    }
}

impl FileProblem {
    /// Deleted or replaced: the path moved on, the open file is intact.
    /// Everything else is damage to the open file itself.
    pub fn is_lost(&self) -> bool {
        matches!(self, FileProblem::Deleted | FileProblem::Replaced)
    }
}

/// Device and inode of a file: which file a path names right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
}

/// The database file the store's connection has open, and what it must look
/// like.
#[derive(Debug)]
pub struct DbFile {
    path: PathBuf,
    /// A read-only descriptor of the same inode, for `pread`.
    file: File,
    identity: FileIdentity,
    /// The header as the last checkpoint left it.
    header: [u8; HEADER_LEN],
}

impl DbFile {
    /// Open `path` for reading and take its current header as the expected
    /// one. Call after the connection opened, migrated and checkpointed it.
    pub fn open(path: &Path) -> Result<DbFile, FileProblem> {
        let file = File::open(path).map_err(|e| FileProblem::Unreadable(e.to_string()))?;
        let meta = file
            .metadata()
            .map_err(|e| FileProblem::Unreadable(e.to_string()))?;
        let mut db = DbFile {
            path: path.to_owned(),
            file,
            identity: FileIdentity {
                dev: meta.dev(),
                ino: meta.ino(),
            },
            header: [0; HEADER_LEN],
        };
        db.header = db.read_header()?;
        db.check_header_shape(&db.header)?;
        Ok(db)
    }

    /// After a checkpoint wrote the file: take its header as the expected one,
    /// provided it still is a database and its change counter did not go
    /// backwards.
    pub fn checkpointed(&mut self) -> Result<(), FileProblem> {
        let len = self.check_identity()?;
        let now = self.read_header()?;
        self.check_header_shape(&now)?;
        let (before, after) = (change_counter(&self.header), change_counter(&now));
        if after < before {
            return Err(FileProblem::Overwritten {
                change_counter: after,
                expected_counter: before,
            });
        }
        self.header = now;
        self.check_length(len)
    }

    /// The whole proof: identity, header, length. Two system calls.
    pub fn verify(&self) -> Result<(), FileProblem> {
        let len = self.check_identity()?;
        let now = self.read_header()?;
        if now != self.header {
            self.check_header_shape(&now)?;
            return Err(FileProblem::Overwritten {
                change_counter: change_counter(&now),
                expected_counter: change_counter(&self.header),
            });
        }
        self.check_length(len)
    }

    /// The expected header's file change counter (for reports and tests).
    pub fn change_counter(&self) -> u32 {
        change_counter(&self.header)
    }

    /// The path still names the file opened; its length (one `stat` of the
    /// path tells both: the same inode is the open file).
    fn check_identity(&self) -> Result<u64, FileProblem> {
        match std::fs::metadata(&self.path) {
            Ok(m) if m.dev() == self.identity.dev && m.ino() == self.identity.ino => Ok(m.len()),
            Ok(_) => Err(FileProblem::Replaced),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(FileProblem::Deleted),
            Err(e) => Err(FileProblem::Unreadable(format!(
                "cannot stat state.db: {e}"
            ))),
        }
    }

    /// The first `HEADER_LEN` bytes; a shorter file is truncated.
    fn read_header(&self) -> Result<[u8; HEADER_LEN], FileProblem> {
        let mut buf = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match self.file.read_at(&mut buf[got..], got as u64) {
                Ok(0) => {
                    return Err(FileProblem::Truncated {
                        len: got as u64,
                        expected: expected_len(&self.header),
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(FileProblem::Unreadable(e.to_string())),
            }
        }
        Ok(buf)
    }

    fn check_header_shape(&self, header: &[u8; HEADER_LEN]) -> Result<(), FileProblem> {
        if &header[..MAGIC.len()] != MAGIC || page_size(header) == 0 {
            return Err(FileProblem::NotADatabase);
        }
        Ok(())
    }

    fn check_length(&self, len: u64) -> Result<(), FileProblem> {
        let expected = expected_len(&self.header);
        if len < expected {
            return Err(FileProblem::Truncated { len, expected });
        }
        Ok(())
    }
}

/// Page size in bytes (offset 16, big-endian; 1 means 65,536). 0 when the
/// value is not a power of two from 512 to 65,536.
fn page_size(h: &[u8; HEADER_LEN]) -> u64 {
    let raw = u16::from_be_bytes([h[16], h[17]]) as u64;
    let size = if raw == 1 { 65_536 } else { raw };
    if (512..=65_536).contains(&size) && size.is_power_of_two() {
        size
    } else {
        0
    }
}

/// File change counter (offset 24).
fn change_counter(h: &[u8; HEADER_LEN]) -> u32 {
    u32::from_be_bytes([h[24], h[25], h[26], h[27]])
}

/// Bytes the database occupies by its header: page count (offset 28) times
/// page size, when the count is valid (offset 92, "version-valid-for", equals
/// the change counter); else 0, which any length satisfies.
fn expected_len(h: &[u8; HEADER_LEN]) -> u64 {
    let pages = u32::from_be_bytes([h[28], h[29], h[30], h[31]]) as u64;
    let valid_for = u32::from_be_bytes([h[92], h[93], h[94], h[95]]);
    if valid_for == change_counter(h) {
        pages * page_size(h)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn database(dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE t (x); INSERT INTO t VALUES (1);
             PRAGMA wal_checkpoint(TRUNCATE);",
        )
        .unwrap();
        path
    }

    #[test]
    fn an_untouched_database_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = database(dir.path(), "a.db");
        let db = DbFile::open(&path).unwrap();
        assert_eq!(db.verify(), Ok(()));
        assert!(db.change_counter() > 0);
    }

    #[test]
    fn garbage_in_place_is_not_a_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = database(dir.path(), "a.db");
        let db = DbFile::open(&path).unwrap();
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(&[0x5a; 512]).unwrap();
        assert_eq!(db.verify(), Err(FileProblem::NotADatabase));
    }

    #[test]
    fn truncation_is_noticed_whether_or_not_the_header_survives() {
        let dir = tempfile::tempdir().unwrap();
        let path = database(dir.path(), "a.db");
        let db = DbFile::open(&path).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(HEADER_LEN as u64 + 10).unwrap();
        assert!(
            matches!(db.verify(), Err(FileProblem::Truncated { len: 110, .. })),
            "{:?}",
            db.verify()
        );
        f.set_len(0).unwrap();
        assert!(matches!(
            db.verify(),
            Err(FileProblem::Truncated { len: 0, .. })
        ));
    }

    #[test]
    fn another_database_copied_over_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = database(dir.path(), "a.db");
        let other = database(dir.path(), "b.db");
        {
            let conn = rusqlite::Connection::open(&other).unwrap();
            conn.execute_batch(
                "CREATE TABLE u (y); INSERT INTO u VALUES (2); PRAGMA wal_checkpoint(TRUNCATE);",
            )
            .unwrap();
        }
        let db = DbFile::open(&path).unwrap();
        std::fs::copy(&other, &path).unwrap();
        let err = db.verify().unwrap_err();
        assert!(
            matches!(err, FileProblem::Overwritten { .. }),
            "{err:?}: {err}"
        );
        assert!(!err.is_lost());
    }

    #[test]
    fn deleted_and_replaced_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = database(dir.path(), "a.db");
        let db = DbFile::open(&path).unwrap();
        let other = database(dir.path(), "b.db");
        std::fs::rename(&other, &path).unwrap();
        assert_eq!(db.verify(), Err(FileProblem::Replaced));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(db.verify(), Err(FileProblem::Deleted));
    }

    #[test]
    fn a_checkpoint_moves_the_expected_header_forward() {
        let dir = tempfile::tempdir().unwrap();
        let path = database(dir.path(), "a.db");
        let mut db = DbFile::open(&path).unwrap();
        let before = db.change_counter();
        let conn = rusqlite::Connection::open(&path).unwrap();
        // Growing the database rewrites page 1 (its page count) at the
        // checkpoint; a commit that only touches other pages leaves the
        // header as it was.
        conn.execute_batch(
            "INSERT INTO t VALUES (randomblob(100000)); PRAGMA wal_checkpoint(TRUNCATE);",
        )
        .unwrap();
        // The file changed under the expected header, as a checkpoint does...
        assert!(matches!(db.verify(), Err(FileProblem::Overwritten { .. })));
        // ...and once told, the new header is the expected one.
        db.checkpointed().unwrap();
        assert!(db.change_counter() > before);
        assert_eq!(db.verify(), Ok(()));
    }
}
