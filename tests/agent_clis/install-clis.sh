#!/usr/bin/env bash
# Installs the pinned agent CLIs the end-to-end suites run, with npm, into a
# fixed prefix outside the repository (AGENTD_CLIS_DIR, default
# /opt/agentd-clis). Idempotent: does nothing when the pinned versions are
# already there. No stdin needed.
#
# The per-turn runtimes' CLIs (run.sh) and the ACP agents and adapters
# (acp.sh). Codex's launcher and codex-acp run a native binary from a
# platform package, an optional dependency: never install with
# --omit=optional. The Claude package, claude-agent-acp and Qwen Code declare
# node >= 22 but run on Node 20; npm only warns.
set -euo pipefail

CLIS_DIR=${AGENTD_CLIS_DIR:-/opt/agentd-clis}
# package@version binary
PINNED=(
  "@anthropic-ai/claude-code@2.1.330 claude"
  "@google/gemini-cli@0.61.0 gemini"
  "@openai/codex@0.169.0 codex"
  "@zed-industries/claude-agent-acp@0.23.1 claude-agent-acp"
  "@zed-industries/codex-acp@0.16.0 codex-acp"
  "@qwen-code/qwen-code@0.24.4 qwen"
)

installed() { # package@version binary
  local spec=${1% *} bin=${1#* }
  local pkg=${spec%@*} version=${spec##*@}
  local manifest=$CLIS_DIR/node_modules/$pkg/package.json
  [ -f "$manifest" ] && [ -x "$CLIS_DIR/node_modules/.bin/$bin" ] \
    && node -e 'process.exit(require(process.argv[1]).version === process.argv[2] ? 0 : 1)' "$manifest" "$version"
}

missing=()
for entry in "${PINNED[@]}"; do
  installed "$entry" || missing+=("${entry% *}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

command -v npm >/dev/null || { echo "npm is missing (Node 20 or later is needed)" >&2; exit 2; }
echo "== installing ${missing[*]} into $CLIS_DIR"
mkdir -p "$CLIS_DIR"
npm install --prefix "$CLIS_DIR" --save-exact --no-audit --no-fund --loglevel=error "${missing[@]}" </dev/null
for entry in "${PINNED[@]}"; do
  installed "$entry" || { echo "install-clis: ${entry% *} did not install" >&2; exit 1; }
done
