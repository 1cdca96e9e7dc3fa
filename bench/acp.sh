#!/usr/bin/env bash
# The acp runtime's benchmark (bench/acp.py): agentd's cost per warm ACP
# turn over a bare ACP client, warm ACP turns against fresh-process turns of
# the same CLI (Gemini), and agentd's footprint at AGENTD_ACP_MAX_AGENTS warm
# agents. The agents are the pinned CLIs (tests/agent_clis/install-clis.sh)
# pointed at the fake model API, all inside fresh network and PID namespaces
# (`unshare -n -p`): traffic stays on loopback. Run as root:
#
#   bash bench/acp.sh              # about 1 minute
#
# Knobs: BENCH_ACP_ECHO_TURNS (400), BENCH_ACP_GEMINI_TURNS (30),
# BENCH_ACP_FRESH_TURNS (5), BENCH_ACP_AGENTS (4), BENCH_ACP_SETTLE_MS (200),
# BENCH_SKIP_BUILD=1 (use the release binary already built), AGENTD_BIN (this
# binary, no build), BENCH_RESULTS (file for the table), AGENTD_CLIS_DIR
# (/opt/agentd-clis).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
CLIS_DIR=${AGENTD_CLIS_DIR:-/opt/agentd-clis}

die() { echo "bench/acp.sh: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "run as root (it creates network namespaces)"
for tool in python3 unshare ip node; do
  command -v "$tool" >/dev/null || die "$tool is missing"
done
[ -x "$CLIS_DIR/node_modules/.bin/gemini" ] \
  || die "Gemini CLI is not installed in $CLIS_DIR (bash tests/agent_clis/install-clis.sh)"
if [ -z "${AGENTD_BIN:-}" ] && [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
  echo "# cargo build --release --bin agentd" >&2
  (cd "$ROOT" && cargo build --locked --quiet --release --bin agentd)
fi
BIN=${AGENTD_BIN:-$CARGO_TARGET_DIR/release/agentd}
[ -x "$BIN" ] || die "agentd binary not found: $BIN"

W=$(mktemp -d /tmp/agentd-bench-acp.XXXXXX)
trap 'rm -rf "$W"' EXIT
PYTHONDONTWRITEBYTECODE=1 AGENTD_BIN=$BIN AGENTD_CLIS_DIR=$CLIS_DIR E2E_WORK=$W \
  unshare --net --pid --fork --mount-proc \
  bash -c 'ip link set lo up && python3 "$@"' bash "$HERE/acp.py"
