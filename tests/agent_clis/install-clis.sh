#!/usr/bin/env bash
# Installs the pinned agent CLIs the end-to-end suite runs, with npm, into a
# fixed prefix outside the repository (AGENTD_CLIS_DIR, default
# /opt/agentd-clis). Idempotent: does nothing when the pinned versions are
# already there. No stdin needed.
set -euo pipefail

CLIS_DIR=${AGENTD_CLIS_DIR:-/opt/agentd-clis}
CLAUDE_PKG=@anthropic-ai/claude-code
CLAUDE_VERSION=2.1.330
GEMINI_PKG=@google/gemini-cli
GEMINI_VERSION=0.61.0
# Codex's launcher runs a native binary from its platform package, an
# optional dependency: never install with --omit=optional.
CODEX_PKG=@openai/codex
CODEX_VERSION=0.169.0

installed() { # package version
  local manifest=$CLIS_DIR/node_modules/$1/package.json
  [ -f "$manifest" ] && node -e 'process.exit(require(process.argv[1]).version === process.argv[2] ? 0 : 1)' "$manifest" "$2"
}

if installed "$CLAUDE_PKG" "$CLAUDE_VERSION" && installed "$GEMINI_PKG" "$GEMINI_VERSION" \
  && installed "$CODEX_PKG" "$CODEX_VERSION" \
  && [ -x "$CLIS_DIR/node_modules/.bin/claude" ] && [ -x "$CLIS_DIR/node_modules/.bin/gemini" ] \
  && [ -x "$CLIS_DIR/node_modules/.bin/codex" ]; then
  exit 0
fi
command -v npm >/dev/null || { echo "npm is missing (Node 20 or later is needed)" >&2; exit 2; }
echo "== installing $CLAUDE_PKG@$CLAUDE_VERSION, $GEMINI_PKG@$GEMINI_VERSION and $CODEX_PKG@$CODEX_VERSION into $CLIS_DIR"
mkdir -p "$CLIS_DIR"
# The Claude package declares node >= 22 but runs on Node 20 (its CLI is a
# native binary); npm only warns.
npm install --prefix "$CLIS_DIR" --save-exact --no-audit --no-fund --loglevel=error \
  "$CLAUDE_PKG@$CLAUDE_VERSION" "$GEMINI_PKG@$GEMINI_VERSION" "$CODEX_PKG@$CODEX_VERSION" </dev/null
"$CLIS_DIR/node_modules/.bin/claude" --version
"$CLIS_DIR/node_modules/.bin/codex" --version
