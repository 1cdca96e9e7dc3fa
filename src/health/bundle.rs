//! Diagnostics bundle files: one JSON document per incident, written
//! atomically into a directory that never holds more than `keep` of them.
//!
//! File names are the UTC time of writing, `YYYYMMDDTHHMMSS.mmmZ.json`, so
//! `ls` lists them oldest first. Two bundles within one millisecond get a
//! sequence suffix, `...mmmZ_001.json`, which still sorts after the plain name.
//!
//! Not for: deciding what goes into a bundle (the sentinel does), or any other
//! file in the directory: retention only ever deletes names of this pattern.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Most bundles written within one millisecond. The sentinel writes at most
/// one per incident; this only bounds the search for a free name.
const MAX_SEQUENCE: u32 = 999;

/// Temporary files older than this are leftovers of a writer that died
/// mid-write and are removed; younger ones may belong to a writer at work.
const STALE_TEMP_AGE: Duration = Duration::from_secs(60);

/// Prefix of temporary files; a dot file, so it never matches the bundle
/// pattern and a half-written bundle is never counted or read as one.
const TEMP_PREFIX: &str = ".bundle-";

/// Writes `value` as pretty JSON to `<dir>/<UTC time>.json` (creating `dir`),
/// then deletes the oldest bundles so at most `keep` remain (at least the one
/// just written is always kept). Returns the new file's path.
///
/// The file appears complete or not at all: it is written to a temporary
/// name, synced, then hard-linked to its final name, which fails instead of
/// overwriting if that name is taken.
pub fn write_bundle(dir: &Path, value: &serde_json::Value, keep: usize) -> io::Result<PathBuf> {
    // Bundles list fds, threads and gauges: private like the rest of the
    // state directory (0700 / 0600), whatever the umask.
    crate::state_dir::ensure_private_dir(dir)?;
    let now = SystemTime::now();
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let temp = dir.join(format!(
        "{TEMP_PREFIX}{}-{}.tmp",
        std::process::id(),
        since_epoch.as_nanos()
    ));
    let result = write_temp(&temp, value).and_then(|()| link_free_name(&temp, dir, now));
    let _ = fs::remove_file(&temp);
    let path = result?;
    prune(dir, keep.max(1), &path)?;
    Ok(path)
}

fn write_temp(temp: &Path, value: &serde_json::Value) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(crate::state_dir::FILE_MODE)
        .open(temp)?;
    serde_json::to_writer_pretty(&mut file, value)?;
    file.write_all(b"\n")?;
    file.sync_all()
}

fn link_free_name(temp: &Path, dir: &Path, now: SystemTime) -> io::Result<PathBuf> {
    let stamp = utc_stamp(now);
    for seq in 0..=MAX_SEQUENCE {
        let name = if seq == 0 {
            format!("{stamp}.json")
        } else {
            format!("{stamp}_{seq:03}.json")
        };
        let path = dir.join(name);
        match fs::hard_link(temp, &path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("more than {MAX_SEQUENCE} bundles named {stamp}"),
    ))
}

/// Deletes the oldest bundles beyond `keep`, and stale temporary files.
/// `just_written` is never deleted, whatever the clock says about it.
fn prune(dir: &Path, keep: usize, just_written: &Path) -> io::Result<()> {
    let mut bundles = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_bundle_name(name) {
            bundles.push(entry.path());
        } else if name.starts_with(TEMP_PREFIX) && name.ends_with(".tmp") {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_TEMP_AGE);
            if stale {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    // Names sort by time; see the module doc.
    bundles.sort();
    let excess = bundles.len().saturating_sub(keep);
    for path in bundles.iter().filter(|p| *p != just_written).take(excess) {
        match fs::remove_file(path) {
            Ok(()) => {}
            // Someone else removed it: the bound holds either way.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `YYYYMMDDTHHMMSS.mmmZ.json` or `YYYYMMDDTHHMMSS.mmmZ_NNN.json`.
pub fn is_bundle_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".json") else {
        return false;
    };
    let (stamp, seq) = match stem.split_once('_') {
        Some((stamp, seq)) => (stamp, Some(seq)),
        None => (stem, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let b = stamp.as_bytes();
    stamp.len() == 20
        && digits(&stamp[0..8])
        && b[8] == b'T'
        && digits(&stamp[9..15])
        && b[15] == b'.'
        && digits(&stamp[16..19])
        && b[19] == b'Z'
        && seq.is_none_or(|s| s.len() == 3 && digits(s))
}

/// `YYYYMMDDTHHMMSS.mmmZ` for `at`, in UTC.
pub fn utc_stamp(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
/// Howard Hinnant's `civil_from_days`; exact for every day count we can meet.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_and_their_directory_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("diagnostics");
        let path = write_bundle(&dir, &serde_json::json!({"x": 1}), 5).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn stamps_are_utc_and_millisecond_precise() {
        let at = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789); // leap day 2024
        assert_eq!(utc_stamp(at), "20240229T123456.789Z");
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000.000Z");
        let at = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(utc_stamp(at), "20000229T000000.000Z");
    }

    #[test]
    fn bundle_names_are_recognised_exactly() {
        assert!(is_bundle_name("20240229T123456.789Z.json"));
        assert!(is_bundle_name("20240229T123456.789Z_001.json"));
        assert!(!is_bundle_name("20240229T123456.789Z_1.json"));
        assert!(!is_bundle_name("20240229T123456.789Z.json.tmp"));
        assert!(!is_bundle_name("notes.json"));
        assert!(!is_bundle_name("state.db"));
        assert!(!is_bundle_name(".bundle-1-2.tmp"));
    }

    #[test]
    fn names_within_one_millisecond_are_unique_and_sort_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let temp = dir.path().join(".bundle-test.tmp");
        fs::write(&temp, "{}").unwrap();
        let first = link_free_name(&temp, dir.path(), now).unwrap();
        let second = link_free_name(&temp, dir.path(), now).unwrap();
        let third = link_free_name(&temp, dir.path(), now).unwrap();
        assert_ne!(first, second);
        let mut sorted = vec![third.clone(), first.clone(), second.clone()];
        sorted.sort();
        assert_eq!(sorted, vec![first, second, third]);
    }
}
