#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (with
# the fault-injection feature the wedge tests need), then the end-to-end
# suites, each a script that ends with `checks: N, failed: M`:
#
#   tests/systemd/run.sh       real systemd in nspawn: wedges, flood, full disk, a held lock (root)
#   tests/packaging/manifests.sh  Kubernetes manifests and the Dockerfile
#   tests/packaging/deb.sh     the .deb's life cycle under a real systemd (root)
#   tests/agent_clis/run.sh    the real Claude Code, Gemini CLI and Codex (root)
#   tests/agent_clis/acp.sh    the acp runtime with real ACP agents: Gemini CLI, the Claude and Codex adapters, Qwen Code (root)
#   tests/people/run.sh        promtool, a real Prometheus, /status in Chromium
#
# Every step runs even when an earlier one failed (a failed fmt, clippy or
# `cargo test` counts as a failure, and the suites after it still run; every
# test binary runs even when another failed, and one that did not reach its
# result line counts as a failure); the
# last line is `total: N passed, M failed` and the exit code is non-zero when
# anything failed. The runtime tests run a second time with SIGINT ignored. `bash .ci/run` (as root) installs what they need.
set -euo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT

passed=0
failed=0

# step TITLE COMMAND...: a step with no count of its own (fmt, clippy); a
# failure counts as one and the run goes on.
step() {
  local title=$1
  shift
  echo "== $title"
  "$@" || { echo "$title failed"; failed=$((failed + 1)); }
}

# tests_ran TITLE EXIT-CODE: add the `test result:` lines in $log to the
# totals. A non-zero exit with no failed test among them (a build error, a
# crashed binary) counts as one failure.
tests_ran() {
  local p f
  read -r p f < <(awk '/^test result:/ {
    for (i = 2; i <= NF; i++) { if ($i ~ /^passed;/) p += $(i-1); if ($i ~ /^failed;/) f += $(i-1) }
  } END { print p + 0, f + 0 }' "$log")
  passed=$((passed + p))
  failed=$((failed + f))
  if [ "$2" != 0 ] && [ "$f" = 0 ]; then
    echo "$1 exited $2 without a failed test (build error or crash)"
    failed=$((failed + 1))
  fi
}

step "cargo fmt --check" cargo fmt --all -- --check
# Imports go down: no cycle among the crate's modules (ARCHITECTURE.md,
# "Floors"); the script names any loop it finds.
step "import cycles and floors (scripts/module-cycles.py)" python3 scripts/module-cycles.py --check-doc ARCHITECTURE.md
step "cargo clippy (default features)" cargo clippy --locked --all-targets -- -D warnings
step "cargo clippy (all features)" cargo clippy --locked --all-targets --all-features -- -D warnings

# every_binary_ran: each test binary (the library's and the binary's unit
# tests, and every tests/*.rs) must have started ("Running ...") and ended
# with its own `test result:` line in $log. One that never started (a build
# error) or crashed before its result counts as one failure, named, so the
# total never hides the tests it held.
every_binary_ran() {
  local name missing=0
  local done_list
  done_list=$(awk '
    /^ *Running / { cur = ($2 == "unittests") ? $3 : $2; next }
    /^test result:/ { if (cur != "") print cur; cur = "" }
  ' "$log")
  for name in src/lib.rs src/main.rs tests/*.rs; do
    if ! grep -qxF "$name" <<<"$done_list"; then
      echo "$name: its tests did not run to their result line (build error or crash)"
      missing=$((missing + 1))
    fi
  done
  failed=$((failed + missing))
  [ "$missing" = 0 ]
}

echo "== cargo test"
rc=0
# --no-fail-fast: every test binary runs even when an earlier one failed.
cargo test --locked --all-features --no-fail-fast --lib --bins --tests 2>&1 | tee "$log" || rc=$?
tests_ran "cargo test" "$rc"
every_binary_ran || rc=1

# One runtime test binary again, started with SIGINT ignored and no stdin, as
# `nohup`, `&` in a script and some CI runners start a job: agents must still
# get SIGINT's default action, or SIGINT-first termination silently waits out
# the grace period. The binary runs directly, so nothing between this shell
# and the tests installs a SIGINT handler of its own.
echo "== tests/runtimes.rs, started with SIGINT ignored"
rc=0
runtimes_bin=$(cargo test --locked --all-features --test runtimes --no-run 2>&1 \
  | sed -n 's/^ *Executable tests\/runtimes\.rs (\(.*\))$/\1/p' | tail -n1) || true
if [ -n "$runtimes_bin" ] && [ -x "$runtimes_bin" ]; then
  (trap '' INT; exec "$runtimes_bin" --test-threads=2) </dev/null 2>&1 | tee "$log" || rc=$?
  tests_ran "tests/runtimes.rs with SIGINT ignored" "$rc"
else
  echo "cannot find the runtimes test binary"
  failed=$((failed + 1))
fi

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
suite "agent CLIs end-to-end (real Claude Code, Gemini CLI and Codex, fake model on loopback)" "$(root_only)" tests/agent_clis/run.sh
suite "acp runtime end-to-end (real Gemini CLI, Claude and Codex adapters, Qwen Code; fake model on loopback)" "$(root_only)" tests/agent_clis/acp.sh
suite "people: promtool, a real Prometheus scraping agentd, /status in headless Chromium" \
  "$(have promtool prometheus chromium)" tests/people/run.sh

echo
echo "total: $passed passed, $failed failed"
[ "$failed" = 0 ]
