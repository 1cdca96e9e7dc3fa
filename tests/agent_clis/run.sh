#!/usr/bin/env bash
# End-to-end suite with the real agent CLIs from npm: Claude Code, Gemini
# CLI and Codex CLI, each pointed at a fake model API (fake_model.py) on
# loopback, driven through agentd's HTTP API (driver.py), ending with a
# conformance matrix (scenario x CLI; CONFORMANCE.md). Everything runs in
# fresh network and PID namespaces (`unshare -n -p`): only loopback exists,
# so nothing can leave the machine, and every process the suite started ends
# with it. Run as root:
#
#   bash tests/agent_clis/run.sh                     # all three CLIs
#   E2E_CLIS=codex bash tests/agent_clis/run.sh      # one CLI (or two)
#   E2E_ONLY=default,uuid bash tests/agent_clis/run.sh
#   bash tests/agent_clis/run.sh --demo              # a curl transcript per CLI
#
# Environment: AGENTD_CLIS_DIR (/opt/agentd-clis: the npm prefix holding the
# pinned CLIs, installed by install-clis.sh); AGENTD_BIN=path skips the build
# (e.g. AGENTD_BIN=target/debug/agentd after `cargo build`);
# E2E_KEEP=1 keeps the work directory; E2E_JOBS (6) scenarios at once;
# E2E_DEADLINE (600) seconds for the whole run, past which requests fail.
# Needs root (for the namespaces), python3, iproute2 and util-linux.
set -euo pipefail
SUITE=clis-e2e
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_clis claude gemini codex

echo "# claude $("$CLIS_DIR/node_modules/.bin/claude" --version 2>/dev/null | head -n1)," \
  "gemini $(HOME=$W "$CLIS_DIR/node_modules/.bin/gemini" --version 2>/dev/null | head -n1)," \
  "codex $(CODEX_HOME=$W/codex-version "$CLIS_DIR/node_modules/.bin/codex" --version 2>/dev/null | head -n1)"
launch driver.py "$@"
