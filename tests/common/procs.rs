//! `/proc/*/stat` scanning for tests that prove no process outlives its
//! execution: process-group members and children of a pid.
#![allow(dead_code)]

/// One process as `/proc/PID/stat` describes it.
pub struct ProcStat {
    pub pid: u32,
    /// One letter: R, S, D, Z (zombie), X (dead), ...
    pub state: String,
    pub ppid: u32,
    pub pgrp: u32,
}

impl ProcStat {
    /// Zombies and dead entries only wait to be reaped; they run nothing.
    pub fn is_live(&self) -> bool {
        self.state != "Z" && self.state != "X"
    }
}

/// Every process visible now, zombies included.
pub fn processes() -> Vec<ProcStat> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // The process may be gone between listing and reading.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `comm` is in parentheses and may contain spaces: fields resume after
        // the last ')': state, ppid, pgrp, ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() < 3 {
            continue;
        }
        out.push(ProcStat {
            pid,
            state: fields[0].to_owned(),
            ppid: fields[1].parse().unwrap_or(0),
            pgrp: fields[2].parse().unwrap_or(0),
        });
    }
    out
}

/// Live (non-zombie) members of process group `pgid`.
pub fn live_group_members(pgid: u32) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|p| p.pgrp == pgid && p.is_live())
        .map(|p| p.pid)
        .collect()
}

/// Children of `ppid`, zombies included (an unreaped child is a leak too).
pub fn children(ppid: u32) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|p| p.ppid == ppid)
        .map(|p| p.pid)
        .collect()
}

/// Zombie children of `ppid`: exited and not (yet) reaped by it.
pub fn zombie_children(ppid: u32) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|p| p.ppid == ppid && !p.is_live())
        .map(|p| p.pid)
        .collect()
}

/// Live processes whose environment holds exactly the entry `NAME=VALUE`
/// (e.g. an execution's `AGENTD_EXECUTION_ID`). Processes that vanish or
/// cannot be read are skipped.
pub fn live_with_env(entry: &str) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|p| p.is_live())
        .filter(|p| {
            std::fs::read(format!("/proc/{}/environ", p.pid))
                .map(|env| env.split(|&b| b == 0).any(|e| e == entry.as_bytes()))
                .unwrap_or(false)
        })
        .map(|p| p.pid)
        .collect()
}

/// Poll (bounded by `limit`) until `done()` holds; false if it never did.
pub fn wait_until(limit: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
