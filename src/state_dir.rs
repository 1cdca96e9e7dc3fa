//! The state directory as a private place owned by one process: created 0700,
//! its files 0600 whatever the umask, and an exclusive `flock` on
//! `<state-dir>/agentd.lock` taken before the store opens, so a second
//! `agentd serve` on the same directory exits naming the holder's pid.
//!
//! Permissions are set explicitly (mode at creation, then `chmod`) instead of
//! changing the process umask: the umask is inherited by the agent CLIs,
//! whose files in a user's project must keep the user's own umask.
//!
//! Not here: what lives in the directory (`store`, `health::bundle`).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Name of the lock file inside the state directory.
pub const LOCK_FILE: &str = "agentd.lock";

/// Mode of the state directory and of directories agentd creates in it.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file agentd creates in the state directory.
pub const FILE_MODE: u32 = 0o600;

#[derive(Debug, Error)]
pub enum StateDirError {
    #[error("state dir {path} is not usable: {reason}")]
    Unusable { path: PathBuf, reason: String },
    #[error(
        "state dir {dir} is in use by another agentd (pid {holder}, lock file {lock}); \
         stop that process or give this one another --state-dir"
    )]
    InUse {
        dir: PathBuf,
        lock: PathBuf,
        /// The pid written by the holder, or "unknown" if it could not be read.
        holder: String,
    },
}

/// Create `dir` (and parents) if needed and make it private (0700).
///
/// An existing directory is tightened to 0700 only if this user owns it and
/// it is not a shared directory (sticky bit, as on `/tmp`): `chmod` on a
/// directory someone pointed `--state-dir` at by mistake must not break it.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::other("not a directory"));
    }
    let mode = meta.mode() & 0o7777;
    // SAFETY: geteuid has no preconditions.
    let ours = meta.uid() == unsafe { libc::geteuid() };
    let sticky = mode & 0o1000 != 0;
    if ours && !sticky && mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// Make an existing file 0600 (SQLite's `-wal`/`-shm` from an older run, a
/// database created under umask 022). A missing file is not an error.
pub fn make_private(path: &Path) -> io::Result<()> {
    match fs::metadata(path) {
        Ok(meta) if meta.mode() & 0o077 != 0 => {
            fs::set_permissions(path, fs::Permissions::from_mode(FILE_MODE))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Create `path` empty with mode 0600 if it does not exist, else make it
/// 0600. SQLite creates `-wal` and `-shm` with the database file's mode, so
/// pre-creating `state.db` this way makes all three private.
pub fn create_private_file(path: &Path) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)?;
    make_private(path)
}

/// The held lock. Dropping it (process exit) releases the lock; the file
/// stays, with the last holder's pid in it.
#[derive(Debug)]
pub struct StateDirLock {
    /// The open lock file: the `flock` lives as long as this descriptor.
    _file: File,
    pub path: PathBuf,
}

impl StateDirLock {
    /// Make `dir` private, then take the exclusive lock without waiting and
    /// write our pid into the lock file.
    pub fn acquire(dir: &Path) -> Result<StateDirLock, StateDirError> {
        let unusable = |reason: String| StateDirError::Unusable {
            path: dir.to_owned(),
            reason,
        };
        ensure_private_dir(dir).map_err(|e| unusable(e.to_string()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(|e| unusable(format!("cannot open {}: {e}", path.display())))?;
        make_private(&path).map_err(|e| unusable(e.to_string()))?;
        // SAFETY: the descriptor is valid for the duration of the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = text.trim();
                return Err(StateDirError::InUse {
                    dir: dir.to_owned(),
                    lock: path,
                    holder: if holder.is_empty() {
                        "unknown".into()
                    } else {
                        holder.to_owned()
                    },
                });
            }
            return Err(unusable(format!("cannot lock {}: {err}", path.display())));
        }
        let pid = std::process::id();
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{pid}"))
            .map_err(|e| unusable(format!("cannot write {}: {e}", path.display())))?;
        Ok(StateDirLock { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_in_the_same_process_is_refused_with_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateDirLock::acquire(dir.path()).unwrap();
        // flock locks belong to the open file description, so a second open
        // in the same process conflicts too.
        let err = StateDirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        StateDirLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn existing_loose_directory_and_files_are_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        fs::create_dir(&state).unwrap();
        fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).unwrap();
        let db = state.join("state.db");
        fs::write(&db, b"").unwrap();
        fs::set_permissions(&db, fs::Permissions::from_mode(0o644)).unwrap();
        ensure_private_dir(&state).unwrap();
        create_private_file(&db).unwrap();
        assert_eq!(fs::metadata(&state).unwrap().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(&db).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn sticky_shared_directories_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
        ensure_private_dir(dir.path()).unwrap();
        assert_eq!(fs::metadata(dir.path()).unwrap().mode() & 0o7777, 0o1777);
    }
}
