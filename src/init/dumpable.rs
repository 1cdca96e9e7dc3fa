//! Keeping agentd's memory and environment from its own agents, without
//! losing the core dump a watchdog abort is for.
//!
//! Agents run as agentd's user. A process of the same user may read another's
//! `/proc/<pid>/environ` and `/proc/<pid>/mem`, or ptrace it, unless that
//! process is not dumpable: then those files belong to root and ptrace needs
//! `CAP_SYS_PTRACE`. `serve` calls `protect` first thing, so an agent cannot
//! read the API token from agentd's environment or memory.
//!
//! A non-dumpable process also writes no core file, and a core dump is what
//! systemd's watchdog SIGABRT (and the sentinel's `abort()` in launchd mode)
//! is for: to show where agentd was stuck. So `protect` also installs a
//! SIGABRT handler that makes the process dumpable again and lets the signal
//! take its default action: the abort still dumps core. By then agentd is
//! being killed anyway; the core file is written by the kernel with the
//! process's own ownership (or handed to `systemd-coredump`), not readable
//! through `/proc` by anyone who could not read it before.
//!
//! Not here: the children's side (they start dumpable: `execve` resets the
//! flag), and reading the token (`config`).

use std::io;

/// Make this process non-dumpable and install the SIGABRT handler that
/// undoes it for the core dump. Call before any thread exists, so no other
/// thread can observe the signal disposition half set.
pub fn protect() -> io::Result<()> {
    // SAFETY: prctl(2) with PR_SET_DUMPABLE and a constant argument touches
    // only this process's flags.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a zeroed sigaction is valid; the handler only makes
    // async-signal-safe calls (prctl, raise). SA_RESETHAND restores the
    // default action on entry, so the raised signal kills the process.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_abort as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGABRT, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether this process is dumpable now (`PR_GET_DUMPABLE`).
pub fn is_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE reads a flag of this process.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 1 }
}

/// SIGABRT (the watchdog's kill, `abort()`): dumpable again, then the
/// signal once more. It is blocked while this handler runs and its action
/// is the default again (SA_RESETHAND), so it is delivered on return and
/// ends the process with a core dump.
extern "C" fn on_abort(sig: libc::c_int) {
    // SAFETY: prctl and raise are async-signal-safe system calls.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
        libc::raise(sig);
    }
}
