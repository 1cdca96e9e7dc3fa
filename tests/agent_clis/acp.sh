#!/usr/bin/env bash
# The `acp` runtime's end-to-end suite (acp.py): real ACP agents (Gemini CLI
# in ACP mode) pointed at the fake model API on loopback, driven through
# agentd's HTTP API, inside fresh network and PID namespaces (`unshare -n
# -p`) so nothing can leave the machine.
#
#   sudo bash tests/agent_clis/acp.sh
#   sudo E2E_ONLY=multi_turn,pool bash tests/agent_clis/acp.sh
#
# Environment: as run.sh (AGENTD_CLIS_DIR, AGENTD_BIN, E2E_KEEP, E2E_JOBS,
# E2E_DEADLINE).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CLIS_DIR=${AGENTD_CLIS_DIR:-/opt/agentd-clis}

die() { echo "acp e2e: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "run as root (it creates network namespaces): sudo bash $0"
for tool in python3 unshare ip node; do
  command -v "$tool" >/dev/null || die "$tool is missing"
done
[ -x "$CLIS_DIR/node_modules/.bin/gemini" ] \
  || die "Gemini CLI is not installed in $CLIS_DIR (bash $HERE/install-clis.sh)"

if [ -n "${AGENTD_BIN:-}" ]; then
  BIN=$AGENTD_BIN
else
  echo "# cargo build --release --features fault-injection"
  (cd "$ROOT" && cargo build --locked --quiet --release --features fault-injection)
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/agentd
fi
[ -x "$BIN" ] || die "agentd binary not found: $BIN"

W=$(mktemp -d /tmp/agentd-acp-e2e.XXXXXX)
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

echo "# gemini $(HOME=$W "$CLIS_DIR/node_modules/.bin/gemini" --version 2>/dev/null | head -n1) --acp"
PYTHONDONTWRITEBYTECODE=1 AGENTD_BIN=$BIN AGENTD_CLIS_DIR=$CLIS_DIR E2E_WORK=$W \
  unshare --net --pid --fork --mount-proc \
  bash -c 'ip link set lo up && python3 "$@"' bash "$HERE/acp.py" "$@"
