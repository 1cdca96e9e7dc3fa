#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (with
# the fault-injection feature the wedge tests need), then the end-to-end
# suites, each a script that ends with `checks: N, failed: M`:
#
#   tests/systemd/run.sh       real systemd in nspawn: wedges, flood, full disk (root)
#   tests/packaging/manifests.sh  Kubernetes manifests and the Dockerfile
#   tests/packaging/deb.sh     the .deb's life cycle under a real systemd (root)
#   tests/agent_clis/run.sh    the real Claude Code and Gemini CLI (root)
#   tests/people/run.sh        promtool, a real Prometheus, /status in Chromium
#
# Every suite runs even when an earlier one failed; the exit code is non-zero
# when anything failed. `bash .ci/run` (as root) installs what they need.
set -euo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy (default features, then all features)"
cargo clippy --locked --all-targets -- -D warnings
cargo clippy --locked --all-targets --all-features -- -D warnings
echo "== cargo test"
cargo test --locked --all-features --lib --bins --tests 2>&1 | tee "$log"
read -r passed failed < <(awk '/^test result:/ {
  for (i = 2; i <= NF; i++) { if ($i ~ /^passed;/) p += $(i-1); if ($i ~ /^failed;/) f += $(i-1) }
} END { print p + 0, f + 0 }' "$log")

# suite TITLE SKIP-REASON|"" SCRIPT [ARGS...]: run one end-to-end script and
# add its `checks: N, failed: M` to the totals. A script that exits non-zero
# without that line counts as one failure.
suite() {
  local title=$1 skip=$2
  shift 2
  echo "== $title"
  if [ -n "$skip" ]; then
    echo "skipped: $skip"
    return
  fi
  local rc=0 checks=0 bad=0
  bash "$@" 2>&1 | tee "$log" || rc=$?
  if read -r checks bad < <(grep -oE 'checks: [0-9]+, failed: [0-9]+' "$log" | tail -n1 | tr -dc '0-9 \n' | awk '{print $1, $2}') && [ -n "$checks" ]; then
    passed=$((passed + checks - bad))
    failed=$((failed + bad))
    if [ "$rc" != 0 ] && [ "$bad" = 0 ]; then failed=$((failed + 1)); fi
  else
    echo "$1 printed no result line (exit $rc)"
    failed=$((failed + 1))
  fi
}

root_only() { [ "$(id -u)" = 0 ] || echo "needs root (run bash .ci/run as root)"; }
have() {
  local t
  for t in "$@"; do command -v "$t" >/dev/null || { echo "needs $t (bash .ci/run installs it as root)"; return; }; done
}
venv=${AGENTD_TEST_VENV:-/var/cache/agentd-tests/venv}
kv_skip=""
[ -x "$venv/bin/kubernetes-validate" ] || kv_skip="needs kubernetes-validate in $venv (bash .ci/run installs it as root, or set AGENTD_TEST_VENV)"

suite "systemd end-to-end (real systemd in systemd-nspawn)" "$(root_only)" tests/systemd/run.sh
suite "packaging: manifests (kubernetes-validate) and Dockerfile" "$kv_skip" tests/packaging/manifests.sh
suite "packaging: Debian package under systemd" "$(root_only)" tests/packaging/deb.sh
suite "agent CLIs end-to-end (real Claude Code and Gemini CLI, fake model on loopback)" "$(root_only)" tests/agent_clis/run.sh
suite "people: promtool, a real Prometheus scraping agentd, /status in headless Chromium" \
  "$(have promtool prometheus chromium)" tests/people/run.sh

echo
echo "total: $passed passed, $failed failed"
[ "$failed" = 0 ]
