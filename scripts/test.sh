#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (with
# the fault-injection feature the wedge tests need), then, as root, the
# end-to-end suite under a real systemd booted in systemd-nspawn.
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

echo "== systemd end-to-end (real systemd in systemd-nspawn)"
if [ "$(id -u)" = 0 ]; then
  bash tests/systemd/run.sh 2>&1 | tee "$log"
  read -r checks e2e_failed < <(grep -oE 'checks: [0-9]+, failed: [0-9]+' "$log" | tail -n1 | tr -dc '0-9 \n' | awk '{print $1, $2}')
  passed=$((passed + checks - e2e_failed))
  failed=$((failed + e2e_failed))
else
  echo "skipped: needs root (sudo bash tests/systemd/run.sh)"
fi

# Packaging: the Kubernetes manifests and the Dockerfile (static), then, as
# root, the Debian package's life cycle under a real systemd.
echo "== packaging: manifests (kubernetes-validate) and Dockerfile"
if [ "$(id -u)" = 0 ] || [ -x "${AGENTD_TEST_VENV:-/var/cache/agentd-tests/venv}/bin/kubernetes-validate" ]; then
  bash tests/packaging/manifests.sh 2>&1 | tee "$log"
  read -r checks pkg_failed < <(grep -oE 'checks: [0-9]+, failed: [0-9]+' "$log" | tail -n1 | tr -dc '0-9 \n' | awk '{print $1, $2}')
  passed=$((passed + checks - pkg_failed))
  failed=$((failed + pkg_failed))
else
  echo "skipped: no kubernetes-validate (bash .ci/run as root installs it, or set AGENTD_TEST_VENV)"
fi
echo "== packaging: Debian package under systemd (tests/packaging/deb.sh)"
if [ "$(id -u)" = 0 ]; then
  bash tests/packaging/deb.sh 2>&1 | tee "$log"
  read -r checks pkg_failed < <(grep -oE 'checks: [0-9]+, failed: [0-9]+' "$log" | tail -n1 | tr -dc '0-9 \n' | awk '{print $1, $2}')
  passed=$((passed + checks - pkg_failed))
  failed=$((failed + pkg_failed))
else
  echo "skipped: needs root (bash tests/packaging/deb.sh as root)"
fi

echo "== agent CLIs end-to-end (real Claude Code and Gemini CLI, fake model on loopback)"
if [ "$(id -u)" = 0 ]; then
  bash tests/agent_clis/run.sh 2>&1 | tee "$log"
  read -r checks clis_failed < <(grep -oE 'checks: [0-9]+, failed: [0-9]+' "$log" | tail -n1 | tr -dc '0-9 \n' | awk '{print $1, $2}')
  passed=$((passed + checks - clis_failed))
  failed=$((failed + clis_failed))
else
  echo "skipped: needs root (sudo bash tests/agent_clis/run.sh)"
fi
echo "== people: promtool, a real Prometheus scraping agentd, /status in headless Chromium"
if command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v chromium >/dev/null; then
  bash tests/people/run.sh 2>&1 | tee "$log"
  read -r checks people_failed < <(grep -oE 'checks: [0-9]+, failed: [0-9]+' "$log" | tail -n1 | tr -dc '0-9 \n' | awk '{print $1, $2}')
  passed=$((passed + checks - people_failed))
  failed=$((failed + people_failed))
else
  echo "skipped: needs promtool, prometheus and chromium (bash .ci/run installs them as root)"
fi
echo
echo "total: $passed passed, $failed failed"
