# shellcheck shell=bash
# agentd inside the test container: installation, the unit's properties, the
# journal and the HTTP client. Sourced by run.sh after container.sh.

UNIT=agentd.service
# Where the dynamic user's state directory really lives (DynamicUser=yes).
# shellcheck disable=SC2034 # used by scenarios.sh
STATE_DIR=/var/lib/private/agentd
CONFIG=/etc/agentd/agentd.toml

# install_agentd: the freshly built binary and the shipped unit files, plus the
# suite's one drop-in (WatchdogSec=3, fault flag). Payload is at /run/e2e.
install_agentd() {
  C sh -euc '
    install -m 0755 /run/e2e/agentd /usr/bin/agentd
    install -m 0644 /run/e2e/systemd/agentd.service /run/e2e/systemd/agentd.socket /etc/systemd/system/
    install -d -m 0755 /etc/agentd /etc/systemd/system/agentd.service.d
    install -m 0644 /run/e2e/systemd/agentd.toml /etc/agentd/agentd.toml
    install -m 0644 /run/e2e/watchdog-test.conf /etc/systemd/system/agentd.service.d/watchdog-test.conf
    install -m 0755 /run/e2e/agent-sleep /usr/local/bin/agent-sleep
    systemctl daemon-reload
  '
}

# set_config TOML: replace the config file (reloadable settings).
set_config() { printf '%s\n' "$1" | C sh -c "cat > $CONFIG"; }

# prop NAME [UNIT]: one property of the unit.
prop() { C systemctl show -p "$1" --value "${2:-$UNIT}"; }

# cursor: the journal's current end, to read only what comes after it.
cursor() { C journalctl -n0 --show-cursor -q | sed -n 's/^-- cursor: //p'; }

# journal_since CURSOR [MATCHES...]: agentd's journal after CURSOR.
journal_since() {
  local c=$1
  shift
  C journalctl --no-pager -q -o short-monotonic --after-cursor="$c" -u "$UNIT" "$@"
}

# cli ARGS...: the HTTP client, in the container's network namespace.
cli() { N "$PY" "$E2E_LIB/client.py" "$@"; }

# start_fresh: clear the start-rate counter, start, and fail loudly when the
# start does not return active (Type=notify: only after READY=1).
start_agentd() {
  C systemctl reset-failed "$UNIT" 2>/dev/null || true
  C timeout 60 systemctl start "$UNIT"
}

stop_agentd() { C timeout 60 systemctl stop "$UNIT" agentd.socket 2>/dev/null || true; }

# restarted_since N PID: NRestarts grew past N, a new main PID exists and the
# unit is active again (the new process sent READY=1).
restarted_since() {
  local n pid state
  n=$(prop NRestarts)
  pid=$(prop MainPID)
  state=$(prop ActiveState)
  [ "${n:-0}" -gt "$1" ] && [ "$pid" != 0 ] && [ "$pid" != "$2" ] && [ "$state" = active ]
}

# agent_children: processes of the agent runtime anywhere in the container.
agent_children() { C pgrep -f -a 'agent-sleep|sleep 300' || true; }
