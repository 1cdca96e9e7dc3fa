# Shared by run.sh, acp.sh and bench/acp.sh (sourced): the checks, the agentd build, the
# work directory and the launch of a Python driver inside fresh network and
# PID namespaces. The caller sets SUITE (its name in messages) and calls
# need_clis, then launch.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CLIS_DIR=${AGENTD_CLIS_DIR:-/opt/agentd-clis}

die() { echo "$SUITE: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "run as root (it creates network namespaces): bash $0"
for tool in python3 unshare ip node; do
  command -v "$tool" >/dev/null || die "$tool is missing"
done

need_clis() { # binary...
  local cli
  for cli in "$@"; do
    [ -x "$CLIS_DIR/node_modules/.bin/$cli" ] \
      || die "the CLIs are not installed in $CLIS_DIR ($cli is missing; bash $HERE/install-clis.sh)"
  done
}

if [ -n "${AGENTD_BIN:-}" ]; then
  BIN=$AGENTD_BIN
else
  # The same build as tests/systemd/run.sh, so in CI it is already there.
  # fault-injection only adds /debug/fault/*, off unless AGENTD_FAULT_INJECTION is set.
  echo "# cargo build --release --features fault-injection"
  (cd "$ROOT" && cargo build --locked --quiet --release --features fault-injection)
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/agentd
fi
[ -x "$BIN" ] || die "agentd binary not found: $BIN"

W=$(mktemp -d "/tmp/agentd-$SUITE.XXXXXX")
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

launch() { # script (in this directory, or a path) args...
  local script=$1
  shift
  case $script in /*) ;; *) script=$HERE/$script ;; esac
  # bash is PID 1 of the new PID namespace and reaps what is orphaned to it;
  # when it exits, the kernel kills everything left in the namespace.
  PYTHONDONTWRITEBYTECODE=1 AGENTD_BIN=$BIN AGENTD_CLIS_DIR=$CLIS_DIR E2E_WORK=$W \
    unshare --net --pid --fork --mount-proc \
    bash -c 'ip link set lo up && python3 "$@"' bash "$script" "$@"
}
