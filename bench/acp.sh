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

BENCH=$(cd "$(dirname "$0")" && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$(dirname "$BENCH")/target}
if [ -z "${AGENTD_BIN:-}" ]; then
  # The plain release build the other benchmarks measure.
  if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
    echo "# cargo build --release --bin agentd" >&2
    (cd "$BENCH/.." && cargo build --locked --quiet --release --bin agentd)
  fi
  export AGENTD_BIN=$CARGO_TARGET_DIR/release/agentd
fi
SUITE=bench-acp
source "$BENCH/../tests/agent_clis/common.sh"
need_clis gemini
E2E_KEEP=0 launch "$BENCH/acp.py"
