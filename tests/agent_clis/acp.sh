#!/usr/bin/env bash
# The `acp` runtime's end-to-end suite (acp.py): real ACP agents (Gemini CLI
# in ACP mode, the Claude and Codex adapters, Qwen Code) pointed at the fake
# model API on loopback, driven through agentd's HTTP API, inside fresh
# network and PID namespaces (`unshare -n -p`) so nothing can leave the
# machine. Run as root:
#
#   bash tests/agent_clis/acp.sh
#   E2E_ACP_AGENTS=claude E2E_ONLY=multi_turn,restart_load bash tests/agent_clis/acp.sh
#
# Environment: as run.sh (AGENTD_CLIS_DIR, AGENTD_BIN, E2E_KEEP, E2E_JOBS,
# E2E_DEADLINE), and E2E_ACP_AGENTS (gemini,claude,codex,qwen). The Codex
# adapter runs its tools in Codex's sandbox, which needs bwrap (Debian:
# bubblewrap) on PATH.
set -euo pipefail
SUITE=acp-e2e
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

agents=${E2E_ACP_AGENTS:-gemini,claude,codex,qwen}
for agent in ${agents//,/ }; do
  case $agent in
    gemini) need_clis gemini ;;
    claude) need_clis claude-agent-acp ;;
    codex) need_clis codex-acp; command -v bwrap >/dev/null || die "bwrap is missing (Debian: bubblewrap)" ;;
    qwen) need_clis qwen ;;
  esac
done
v() { node -p "require('$CLIS_DIR/node_modules/$1/package.json').version"; }
echo "# gemini $(v @google/gemini-cli), claude-agent-acp $(v @zed-industries/claude-agent-acp)," \
  "codex-acp $(v @zed-industries/codex-acp), qwen $(v @qwen-code/qwen-code); running: $agents"
E2E_ACP_AGENTS=$agents launch acp.py "$@"
