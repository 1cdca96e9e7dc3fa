//! The init-system boundary: sd_notify, socket activation, the launchd keepalive
//! file, RLIMIT_NOFILE and log-target detection.
