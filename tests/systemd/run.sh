#!/usr/bin/env bash
# End-to-end suite against a real systemd: boots systemd as PID 1 of a
# systemd-nspawn container, installs the freshly built agentd and the shipped
# unit files (systemd/), and checks what systemd itself sees: READY=1 gating
# `systemctl start`, watchdog restarts of every injected wedge with no
# acknowledged message lost, no false positives under load, reload, stop,
# socket activation, the sandbox's exposure score and the cold-start time.
#
#   sudo bash tests/systemd/run.sh                 # everything (about 100 s)
#   sudo bash tests/systemd/run.sh faults socket   # some scenarios
#   E2E_FAULTS="hang-store" sudo -E bash tests/systemd/run.sh faults
#
# Scenarios: security faults idle flood reload stop badconfig socket coldstart
# diskfull lockheld.
# Environment: AGENTD_BIN=path skips the build (must be built with
# --features fault-injection); E2E_KEEP=1 keeps the work directory;
# E2E_MESSAGES (50), E2E_IDLE_SECONDS (12), E2E_LOCK_SECONDS (60), E2E_LOAD_SECONDS (18), E2E_DB_MB (100),
# E2E_FLOOD_CONNS (1300), E2E_FLOOD_SECONDS (4 x WatchdogSec).
#
# Needs root and systemd-nspawn (package systemd-container; installed here
# when missing and apt-get exists). The container has a private network: all
# traffic stays on its loopback. Teardown (power-off, cgroup removal) runs on
# every exit path.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
E2E_LIB=$HERE/lib
PY=$(command -v /usr/bin/python3 || command -v python3)
ALL_SCENARIOS=(security faults idle flood reload stop badconfig socket coldstart diskfull lockheld)

# shellcheck source=lib/common.sh
. "$E2E_LIB/common.sh"
# shellcheck source=lib/container.sh
. "$E2E_LIB/container.sh"
# shellcheck source=lib/agentd.sh
. "$E2E_LIB/agentd.sh"
# shellcheck source=lib/scenarios.sh
. "$E2E_LIB/scenarios.sh"
# shellcheck source=lib/scenario_flood.sh
. "$E2E_LIB/scenario_flood.sh"
# shellcheck source=lib/scenario_diskfull.sh
. "$E2E_LIB/scenario_diskfull.sh"
# shellcheck source=lib/scenario_lockheld.sh
. "$E2E_LIB/scenario_lockheld.sh"

scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || scenarios=("${ALL_SCENARIOS[@]}")
for s in "${scenarios[@]}"; do
  [[ " ${ALL_SCENARIOS[*]} " == *" $s "* ]] || die "unknown scenario '$s' (known: ${ALL_SCENARIOS[*]})"
done

# ---- preflight
[ "$(id -u)" = 0 ] || die "run as root (it boots a container): sudo bash $0"
[ -n "$PY" ] || die "python3 is needed for the HTTP client"
if ! command -v systemd-nspawn >/dev/null; then
  command -v apt-get >/dev/null || die "systemd-nspawn missing (package systemd-container)"
  log "installing systemd-container"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd-container >/dev/null
fi
for tool in nsenter pgrep awk; do command -v $tool >/dev/null || die "$tool is missing"; done
[ -e /usr/bin/agentd ] && die "/usr/bin/agentd exists on the host; the container's overlay would hide the build under test"

T_SUITE=$EPOCHREALTIME
W=$(mktemp -d /tmp/agentd-e2e.XXXXXX)
teardown() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  # Our own background clients first (only the jobs this shell started).
  local j
  for j in $(jobs -p); do kill "$j" 2>/dev/null; done
  if [ -n "$CT_NSPAWN_PID" ]; then
    log "tearing down the container"
    ct_teardown
  fi
  if [ "${E2E_KEEP:-0}" = 1 ]; then log "work directory kept: $W"; else rm -rf "$W"; fi
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# ---- build
if [ -n "${AGENTD_BIN:-}" ]; then
  BIN=$AGENTD_BIN
else
  section "build: cargo build --release --features fault-injection"
  (cd "$ROOT" && cargo build --locked --release --features fault-injection)
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/agentd
fi
[ -x "$BIN" ] || die "no agentd binary at $BIN"

# ---- payload: everything the container needs, read-only at /run/e2e
mkdir -p "$W/payload/systemd"
cp "$BIN" "$W/payload/agentd"
cp "$ROOT"/systemd/agentd.service "$ROOT"/systemd/agentd.socket \
  "$ROOT"/systemd/socket-activation.conf "$ROOT"/systemd/claude-code.conf \
  "$ROOT"/systemd/agentd.toml "$W/payload/systemd/"
cp "$HERE/units/watchdog-test.conf" "$HERE/units/agent-sleep" "$W/payload/"

# ---- boot
section "boot: systemd in systemd-nspawn"
t0=$EPOCHREALTIME
ct_boot "$W/payload" "$W/nspawn.log" || die "the container did not boot (log above)"
log "booted in $(since "$t0") s: $(C systemctl --version | head -n1), state $(C systemctl is-system-running || true)"
install_agentd
log "installed /usr/bin/agentd ($("$BIN" version)) and the unit files; drop-in: $(grep -v '^#' "$HERE/units/watchdog-test.conf" | tr '\n' ' ')"

for s in "${scenarios[@]}"; do
  # A scenario records its own failed checks; an unexpected error ends only it.
  "scenario_$s" || fail "scenario $s stopped early (status $?)"
done

# ---- report
section "results"
if [[ " ${scenarios[*]} " == *" faults "* ]]; then
  printf '\n%-16s %-9s %-24s %-12s %s\n' "fault kind" detected "failed check (journal)" "restart (s)" "messages acked / found after restart"
  printf '%-16s %-9s %-24s %-12s %s\n' ---------- -------- ---------------------- ----------- ------------------------------------
  for k in ${E2E_FAULTS:-${FAULT_KINDS[*]}}; do
    printf '%-16s %-9s %-24s %-12s %s\n' "$k" "${ROW_DETECTED[$k]:-no}" "${ROW_CHECK[$k]:--}" \
      "${ROW_RESTART[$k]:--}" "${ROW_MESSAGES[$k]:--}"
  done
  echo "(restart = fault injected -> new process sent READY=1; WatchdogSec=$WATCHDOG_SEC, bar <= $RESTART_BAR s)"
fi
echo
for line in "${SUMMARY[@]}"; do echo "* $line"; done
echo
log "suite time: $(since "$T_SUITE") s; checks: $CHECKS, failed: ${#FAILS[@]}"
if [ ${#FAILS[@]} -gt 0 ]; then
  printf '  failed: %s\n' "${FAILS[@]}"
  exit 1
fi
