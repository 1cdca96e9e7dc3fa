//! Socket activation: the listening sockets systemd passes to agentd
//! (`agentd.socket`, `LISTEN_FDS`).
//!
//! The point of socket activation for agentd is that the listening socket
//! belongs to systemd and outlives a watchdog restart: while a wedged agentd is
//! killed and restarted, clients queue in the backlog instead of being refused.
//!
//! Protocol (sd_listen_fds(3)): `LISTEN_PID` names the process the fds are for,
//! `LISTEN_FDS` how many there are, starting at fd 3, and `LISTEN_FDNAMES` their
//! colon-separated names (`FileDescriptorName=`). This module checks each fd is
//! really a listening stream socket of a family agentd can serve, sets
//! `FD_CLOEXEC` (agent runtimes must not inherit the listener) and `O_NONBLOCK`
//! (tokio needs it), and hands back owned std listeners.
//!
//! Not here: binding a port when nothing was inherited, choosing among several
//! listeners (the server's business), and reading the environment anywhere but
//! `inherited_listeners`.

use std::net::TcpListener;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixListener;

use thiserror::Error;

/// The first inherited fd, fixed by the protocol (after stdin, stdout, stderr).
pub const LISTEN_FDS_START: RawFd = 3;

/// Most fds accepted from `LISTEN_FDS`. agentd needs one or two listeners; a
/// larger count means a corrupt or foreign environment, and refusing it keeps
/// a typo from making agentd take ownership of thousands of fds.
pub const MAX_INHERITED_FDS: usize = 64;

/// A listening socket inherited from the init system, with the name systemd
/// gave it (`FileDescriptorName=`, default `"unknown"`).
#[derive(Debug)]
pub enum Inherited {
    Tcp {
        name: String,
        listener: TcpListener,
    },
    Unix {
        name: String,
        listener: UnixListener,
    },
}

impl Inherited {
    /// The socket's name from `LISTEN_FDNAMES`.
    pub fn name(&self) -> &str {
        match self {
            Inherited::Tcp { name, .. } | Inherited::Unix { name, .. } => name,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ActivationError {
    #[error(
        "LISTEN_FDS is set but LISTEN_PID is not; refusing fds that may belong to another process"
    )]
    MissingPid,
    #[error("LISTEN_PID={listen_pid} is not this process ({my_pid}); the listening sockets were passed to another process (was agentd started through a wrapper that did not exec it?)")]
    WrongPid { listen_pid: String, my_pid: u32 },
    #[error("invalid {variable}={value:?}: {reason}")]
    Invalid {
        variable: &'static str,
        value: String,
        reason: String,
    },
    #[error("LISTEN_FDNAMES has {names} names but LISTEN_FDS={fds}")]
    NameCountMismatch { names: usize, fds: usize },
    #[error("inherited fd {fd} ({name}): {reason}")]
    BadFd {
        fd: RawFd,
        name: String,
        reason: String,
    },
}

/// The listening sockets systemd passed to this process, in fd order. Empty
/// when the process was not socket-activated (`LISTEN_FDS` unset or empty).
pub fn inherited_listeners() -> Result<Vec<Inherited>, ActivationError> {
    let var = |name: &str| std::env::var(name).ok();
    from_parts(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
        std::process::id(),
    )
}

/// `inherited_listeners` with explicit values, fds starting at 3.
pub fn from_parts(
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    fdnames: Option<&str>,
    my_pid: u32,
) -> Result<Vec<Inherited>, ActivationError> {
    from_parts_at(LISTEN_FDS_START, listen_pid, listen_fds, fdnames, my_pid)
}

/// `from_parts` with the first fd given, so tests can place sockets on fds
/// they own instead of 3.
///
/// Every fd is validated before any is taken over: on error no fd has been
/// wrapped (or closed) by this function.
pub fn from_parts_at(
    base_fd: RawFd,
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    fdnames: Option<&str>,
    my_pid: u32,
) -> Result<Vec<Inherited>, ActivationError> {
    let Some(listen_fds) = listen_fds.filter(|v| !v.is_empty()) else {
        return Ok(Vec::new());
    };
    let listen_pid = listen_pid
        .filter(|v| !v.is_empty())
        .ok_or(ActivationError::MissingPid)?;
    match listen_pid.trim().parse::<u32>() {
        Ok(pid) if pid == my_pid => {}
        _ => {
            return Err(ActivationError::WrongPid {
                listen_pid: listen_pid.to_owned(),
                my_pid,
            })
        }
    }
    let count: usize = match listen_fds.trim().parse() {
        Ok(n) if n <= MAX_INHERITED_FDS => n,
        Ok(_) => {
            return Err(ActivationError::Invalid {
                variable: "LISTEN_FDS",
                value: listen_fds.to_owned(),
                reason: format!("more than {MAX_INHERITED_FDS} fds"),
            })
        }
        Err(_) => {
            return Err(ActivationError::Invalid {
                variable: "LISTEN_FDS",
                value: listen_fds.to_owned(),
                reason: "expected a non-negative integer".into(),
            })
        }
    };
    let names: Vec<String> = match fdnames {
        Some(names) if count > 0 => {
            let names: Vec<String> = names.split(':').map(str::to_owned).collect();
            if names.len() != count {
                return Err(ActivationError::NameCountMismatch {
                    names: names.len(),
                    fds: count,
                });
            }
            names
        }
        _ => vec!["unknown".to_owned(); count],
    };

    let mut checked = Vec::with_capacity(count);
    for (offset, name) in names.into_iter().enumerate() {
        let fd = base_fd + offset as RawFd;
        let family = check_listening_socket(fd).map_err(|reason| ActivationError::BadFd {
            fd,
            name: name.clone(),
            reason,
        })?;
        checked.push((fd, name, family));
    }

    let mut listeners = Vec::with_capacity(count);
    for (fd, name, family) in checked {
        // SAFETY: `fd` was verified above to be an open listening socket, and
        // the activation protocol hands its ownership to this process; nothing
        // else in agentd refers to inherited fds by number.
        listeners.push(match family {
            Family::Inet => Inherited::Tcp {
                name,
                listener: unsafe { TcpListener::from_raw_fd(fd) },
            },
            Family::Unix => Inherited::Unix {
                name,
                listener: unsafe { UnixListener::from_raw_fd(fd) },
            },
        });
    }
    Ok(listeners)
}

enum Family {
    Inet,
    Unix,
}

/// Verify `fd` is an open, listening stream socket of a family agentd serves,
/// and set `FD_CLOEXEC` and `O_NONBLOCK` on it. The error says what it is
/// instead.
fn check_listening_socket(fd: RawFd) -> Result<Family, String> {
    // SAFETY: fcntl and getsockopt only read flags/options of `fd` and report
    // EBADF or ENOTSOCK for fds that are not open sockets; they write only into
    // the locals passed by pointer.
    unsafe {
        let fd_flags = libc::fcntl(fd, libc::F_GETFD);
        if fd_flags < 0 {
            return Err(format!("not open: {}", std::io::Error::last_os_error()));
        }
        let sock_type = sockopt(fd, libc::SO_TYPE).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTSOCK) => "not a socket".to_owned(),
            _ => format!("cannot read SO_TYPE: {e}"),
        })?;
        if sock_type != libc::SOCK_STREAM {
            return Err(format!(
                "not a stream socket (SO_TYPE={sock_type}); agentd serves HTTP over stream sockets only"
            ));
        }
        let family = socket_family(fd)?;
        let family = match family {
            libc::AF_INET | libc::AF_INET6 => Family::Inet,
            libc::AF_UNIX => Family::Unix,
            other => return Err(format!("unsupported address family {other}")),
        };
        let listening = sockopt(fd, libc::SO_ACCEPTCONN)
            .map_err(|e| format!("cannot read SO_ACCEPTCONN: {e}"))?;
        if listening == 0 {
            return Err(
                "socket is not listening (use ListenStream=, not Accept=yes on a connected socket)"
                    .into(),
            );
        }
        if libc::fcntl(fd, libc::F_SETFD, fd_flags | libc::FD_CLOEXEC) < 0 {
            return Err(format!(
                "cannot set FD_CLOEXEC: {}",
                std::io::Error::last_os_error()
            ));
        }
        let status_flags = libc::fcntl(fd, libc::F_GETFL);
        if status_flags < 0 || libc::fcntl(fd, libc::F_SETFL, status_flags | libc::O_NONBLOCK) < 0 {
            return Err(format!(
                "cannot set O_NONBLOCK: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(family)
    }
}

/// An integer socket option at `SOL_SOCKET` level.
unsafe fn sockopt(fd: RawFd, option: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let rc = libc::getsockopt(
        fd,
        libc::SOL_SOCKET,
        option,
        (&mut value as *mut libc::c_int).cast(),
        &mut len,
    );
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

/// The socket's address family, from `getsockname` (portable, unlike
/// `SO_DOMAIN`, which macOS lacks).
unsafe fn socket_family(fd: RawFd) -> Result<libc::c_int, String> {
    let mut addr: libc::sockaddr_storage = std::mem::zeroed();
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    if libc::getsockname(
        fd,
        (&mut addr as *mut libc::sockaddr_storage).cast(),
        &mut len,
    ) < 0
    {
        return Err(format!(
            "cannot read its address: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(libc::c_int::from(addr.ss_family))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_inherited_without_listen_fds() {
        assert!(from_parts(None, None, None, 7).unwrap().is_empty());
        assert!(from_parts(Some("7"), Some(""), None, 7).unwrap().is_empty());
        assert!(from_parts(Some("7"), Some("0"), None, 7)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn wrong_or_missing_pid_is_refused() {
        let err = from_parts(Some("8"), Some("1"), None, 7).unwrap_err();
        assert_eq!(
            err,
            ActivationError::WrongPid {
                listen_pid: "8".into(),
                my_pid: 7
            }
        );
        assert!(err.to_string().contains("LISTEN_PID=8"), "{err}");
        assert_eq!(
            from_parts(None, Some("1"), None, 7).unwrap_err(),
            ActivationError::MissingPid
        );
        assert!(matches!(
            from_parts(Some("x"), Some("1"), None, 7).unwrap_err(),
            ActivationError::WrongPid { .. }
        ));
    }

    #[test]
    fn malformed_counts_and_names_are_refused() {
        let err = from_parts(Some("7"), Some("two"), None, 7).unwrap_err();
        assert!(err.to_string().contains("LISTEN_FDS=\"two\""), "{err}");
        let err = from_parts(Some("7"), Some("100000"), None, 7).unwrap_err();
        assert!(err.to_string().contains("more than"), "{err}");
        let err = from_parts(Some("7"), Some("2"), Some("http"), 7).unwrap_err();
        assert_eq!(err, ActivationError::NameCountMismatch { names: 1, fds: 2 });
    }
}
