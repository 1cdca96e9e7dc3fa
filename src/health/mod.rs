//! Health: gauges read from the kernel, deep checks with deadlines, the watchdog
//! loop that alone pets systemd, and the sentinel thread that watches the loop.
