# shellcheck shell=bash
# Logging, checks and timing for the systemd end-to-end suite. Sourced by run.sh.
#
# A failed check is recorded and the suite goes on, so one run shows every
# problem and still prints the table; run.sh exits non-zero at the end if any
# check failed.

FAILS=()
CHECKS=0

log() { printf '[%s] %s\n' "$(date +%T)" "$*"; }
section() { printf '\n== %s\n' "$*"; }
ok() {
  CHECKS=$((CHECKS + 1))
  printf '  ok    %s\n' "$*"
}
fail() {
  CHECKS=$((CHECKS + 1))
  FAILS+=("$*")
  printf '  FAIL  %s\n' "$*"
}
# check DESCRIPTION CMD...: ok when CMD succeeds.
check() {
  local what=$1
  shift
  if "$@"; then ok "$what"; else fail "$what"; fi
}
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# Wall-clock seconds since the epoch with microseconds (bash 5).
now() { echo "$EPOCHREALTIME"; }
# since T0: seconds elapsed, 3 decimals.
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'; }
# us_to_s A_US B_US: (B - A) in seconds, 3 decimals.
us_diff_s() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b - a) / 1e6 }'; }
# le A B: A <= B for decimals.
le() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 <= b + 0) }'; }

# jget FIELD: read one JSON object on stdin, print FIELD (dotted path).
jget() {
  python3 -c '
import json, sys
v = json.load(sys.stdin)
for k in sys.argv[1].split("."):
    v = v.get(k) if isinstance(v, dict) else None
print("" if v is None else (json.dumps(v) if isinstance(v, (dict, list)) else v))
' "$1"
}

# wait_for SECONDS CMD...: poll CMD every 0.1 s until it succeeds; bounded.
wait_for() {
  local limit=$1 t0=$EPOCHREALTIME
  shift
  while ! "$@"; do
    le "$(since "$t0")" "$limit" || return 1
    sleep 0.1
  done
}
