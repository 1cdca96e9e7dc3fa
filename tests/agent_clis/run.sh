#!/usr/bin/env bash
# End-to-end suite with the real agent CLIs from npm: Claude Code, Gemini
# CLI and Codex CLI, each pointed at a fake model API (fake_model.py) on
# loopback, driven through agentd's HTTP API (driver.py), ending with a
# conformance matrix (scenario x CLI; CONFORMANCE.md). Everything runs in
# fresh network and PID namespaces (`unshare -n -p`): only loopback exists,
# so nothing can leave the machine, and every process the suite started ends
# with it.
#
#   sudo bash tests/agent_clis/run.sh                     # all three CLIs
#   sudo E2E_CLIS=codex bash tests/agent_clis/run.sh      # one CLI (or two)
#   sudo E2E_ONLY=default,uuid bash tests/agent_clis/run.sh
#   sudo bash tests/agent_clis/run.sh --demo             # a curl transcript per CLI
#
# Environment: AGENTD_CLIS_DIR (/opt/agentd-clis: the npm prefix holding the
# pinned CLIs, installed by install-clis.sh); AGENTD_BIN=path skips the build
# (e.g. AGENTD_BIN=target/debug/agentd after `cargo build`);
# E2E_KEEP=1 keeps the work directory; E2E_JOBS (6) scenarios at once;
# E2E_DEADLINE (600) seconds for the whole run, past which requests fail.
# Needs root (for the namespaces), python3, iproute2 and util-linux.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CLIS_DIR=${AGENTD_CLIS_DIR:-/opt/agentd-clis}

die() { echo "agent-clis e2e: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "run as root (it creates network namespaces): sudo bash $0"
for tool in python3 unshare ip node; do
  command -v "$tool" >/dev/null || die "$tool is missing"
done
for cli in claude gemini codex; do
  [ -x "$CLIS_DIR/node_modules/.bin/$cli" ] \
    || die "the CLIs are not installed in $CLIS_DIR ($cli is missing; bash $HERE/install-clis.sh)"
done

if [ -n "${AGENTD_BIN:-}" ]; then
  BIN=$AGENTD_BIN
else
  # The same build as tests/systemd/run.sh, so in CI it is already there.
  # fault-injection only adds /debug/fault/*, off unless AGENTD_FAULT_INJECTION is set.
  echo "# cargo build --release --features fault-injection"
  (cd "$ROOT" && cargo build --locked --quiet --release --features fault-injection)
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/agentd
fi
[ -x "$BIN" ] || die "agentd binary not found: $BIN"

W=$(mktemp -d /tmp/agentd-clis-e2e.XXXXXX)
cleanup() {
  local rc=$?
  if [ "${E2E_KEEP:-0}" = 1 ] || [ "$rc" != 0 ]; then
    echo "# work directory kept: $W"
  else
    rm -rf "$W"
  fi
  exit "$rc"
}
trap cleanup EXIT

echo "# claude $("$CLIS_DIR/node_modules/.bin/claude" --version 2>/dev/null | head -n1)," \
  "gemini $(HOME=$W "$CLIS_DIR/node_modules/.bin/gemini" --version 2>/dev/null | head -n1)," \
  "codex $(CODEX_HOME=$W/codex-version "$CLIS_DIR/node_modules/.bin/codex" --version 2>/dev/null | head -n1)"
# bash is PID 1 of the new PID namespace and reaps what is orphaned to it;
# when it exits, the kernel kills everything left in the namespace.
PYTHONDONTWRITEBYTECODE=1 AGENTD_BIN=$BIN AGENTD_CLIS_DIR=$CLIS_DIR E2E_WORK=$W \
  unshare --net --pid --fork --mount-proc \
  bash -c 'ip link set lo up && python3 "$@"' bash "$HERE/driver.py" "$@"
