#!/usr/bin/env bash
# The Debian package, end to end, under a real systemd: builds the .deb with
# cargo-deb (packaging/deb/build.sh), checks it with lintian (no errors),
# then boots a minimal Debian bookworm in systemd-nspawn and walks the
# package's life cycle the way an operator does:
#
#   dpkg -i        -> agentd.service enabled and active, /health 200, chat works
#   dpkg -i newer  -> the modified conffile and the chat history are kept,
#                     the service was restarted (new MainPID) and reads the conffile
#   dpkg -r        -> stopped, binary gone, conffile and state kept
#   dpkg --purge   -> conffile and state gone
#
#   bash tests/packaging/deb.sh          # as root
#
# The bookworm root file system is debootstrapped once (about a minute, about
# 250 MB) into AGENTD_DEB_ROOTFS (default /var/cache/agentd-tests/bookworm-minbase)
# and reused; it is booted with --volatile=overlay, so every run starts from
# the same clean system and the cache is never written. Needs root,
# systemd-nspawn, debootstrap, cargo-deb and lintian (.ci/run installs them).
# The container has a private network: all traffic stays on its loopback.
# Environment: PKG_KEEP=1 keeps the work directory.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
E2E_LIB=$ROOT/tests/systemd/lib
ROOTFS=${AGENTD_DEB_ROOTFS:-/var/cache/agentd-tests/bookworm-minbase}

# shellcheck source=../systemd/lib/common.sh
. "$E2E_LIB/common.sh"
# shellcheck source=../systemd/lib/container.sh
CT_NAME=agentd-deb-$$
. "$E2E_LIB/container.sh"

# not CMD...: succeeds when CMD fails (its output discarded).
not() { ! "$@" >/dev/null 2>&1; }

# ---- preflight
[ "$(id -u)" = 0 ] || die "run as root (it boots a container and debootstraps): bash $0"
for tool in systemd-nspawn debootstrap lintian nsenter pgrep dpkg-deb; do
  command -v "$tool" >/dev/null || die "$tool is missing (bash .ci/run installs it)"
done
cargo deb --version >/dev/null 2>&1 || die "cargo-deb is missing (bash .ci/run installs it)"

T_SUITE=$EPOCHREALTIME
W=$(mktemp -d /tmp/agentd-deb.XXXXXX)
teardown() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ -n "$CT_NSPAWN_PID" ]; then
    log "tearing down the container"
    ct_teardown
  fi
  if [ "${PKG_KEEP:-0}" = 1 ]; then log "work directory kept: $W"; else rm -rf "$W"; fi
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# ---- the root file system, debootstrapped once and reused
section "bookworm root file system ($ROOTFS)"
if [ -f "$ROOTFS/.agentd-rootfs-complete" ]; then
  log "cached"
else
  t0=$EPOCHREALTIME
  rm -rf "$ROOTFS.tmp"
  mkdir -p "$(dirname "$ROOTFS")"
  debootstrap --variant=minbase --include=systemd,dbus,curl,ca-certificates \
    bookworm "$ROOTFS.tmp" >"$W/debootstrap.log" 2>&1 ||
    { tail -n 30 "$W/debootstrap.log" >&2; die "debootstrap failed"; }
  touch "$ROOTFS.tmp/.agentd-rootfs-complete"
  rm -rf "$ROOTFS"
  mv "$ROOTFS.tmp" "$ROOTFS"
  log "debootstrapped in $(since "$t0") s"
fi
CT_ROOTFS=$ROOTFS

# ---- two builds of the package: the release one and a newer version of it
section "build: packaging/deb/build.sh"
t0=$EPOCHREALTIME
mkdir -p "$W/payload"
bash "$ROOT/packaging/deb/build.sh" --output "$W/payload/agentd_1.deb" >"$W/build.log" 2>&1 ||
  { tail -n 40 "$W/build.log" >&2; die "the package build failed"; }
VERSION1=$(dpkg-deb -f "$W/payload/agentd_1.deb" Version)
VERSION2=${VERSION1%-*}+test2
cargo deb --no-build --locked --deb-version "$VERSION2" --output "$W/payload/agentd_2.deb" \
  >>"$W/build.log" 2>&1 || { tail -n 40 "$W/build.log" >&2; die "the second package build failed"; }
log "built $VERSION1 and $VERSION2 in $(since "$t0") s"
check "$VERSION2 is newer than $VERSION1 for dpkg (an upgrade, not a downgrade)" \
  dpkg --compare-versions "$VERSION2" gt "$VERSION1"

section "package contents"
dpkg-deb -c "$W/payload/agentd_1.deb" | awk '{print $1, $6}' >"$W/contents"
sed 's/^/    /' "$W/contents"
has_entry() { awk -v p="$2" -v m="$1" '$2 == p && index($1, m) == 1 { found = 1 } END { exit !found }' "$W/contents"; }
check "/usr/bin/agentd, executable" has_entry -rwxr-xr-x ./usr/bin/agentd
check "agentd.service in the systemd unit directory" \
  grep -qE ' \./(usr/)?lib/systemd/system/agentd\.service$' "$W/contents"
check "/etc/agentd/agentd.toml" has_entry -rw-r--r-- ./etc/agentd/agentd.toml
dpkg-deb -e "$W/payload/agentd_1.deb" "$W/control"
check "agentd.toml is a conffile" grep -qx /etc/agentd/agentd.toml "$W/control/conffiles"
for f in copyright changelog.Debian.gz changelog.gz agentd-help.txt LICENSE-MIT LICENSE-APACHE operators.md \
  examples/agentd.socket; do
  check "/usr/share/doc/agentd/$f" has_entry -rw-r--r-- "./usr/share/doc/agentd/$f"
done
dpkg-deb --fsys-tarfile "$W/payload/agentd_1.deb" | tar -xO ./usr/share/doc/agentd/agentd-help.txt >"$W/help.txt"
check "the man page agentd(1)" has_entry -rw-r--r-- ./usr/share/man/man1/agentd.1.gz
check "the help text covers serve, health and keepalive-check" \
  grep -q -e '^\$ agentd serve --help' -e '^\$ agentd health --help' -e '^\$ agentd keepalive-check --help' "$W/help.txt"
check "postrm removes the state on purge" grep -q 'rm -rf /var/lib/agentd /var/lib/private/agentd' "$W/control/postrm"
check "postinst enables and starts agentd.service" \
  sh -c 'grep -q "deb-systemd-helper enable agentd.service" "$1" && grep -q "deb-systemd-invoke \$_dh_action agentd.service" "$1"' \
  sh "$W/control/postinst"

section "lintian"
lintian --tag-display-limit 0 "$W/payload/agentd_1.deb" >"$W/lintian.log" 2>&1 || true
sed 's/^/    /' "$W/lintian.log"
errors=$(grep -c '^E: ' "$W/lintian.log" || true)
check "lintian: no errors (found $errors; warnings: $(grep -c '^W: ' "$W/lintian.log" || true))" test "$errors" = 0

# ---- boot and walk the life cycle
section "boot: bookworm in systemd-nspawn (--volatile=overlay)"
t0=$EPOCHREALTIME
ct_boot "$W/payload" "$W/nspawn.log" || die "the container did not boot (log above)"
log "booted in $(since "$t0") s: $(C systemctl --version | head -n1)"
check "agentd is not installed before the test" not C dpkg -s agentd

# http METHOD PATH [BODY]: status code, then the body, from inside the container.
http() {
  local method=$1 path=$2 body=${3:-}
  local args=(-sS -m 10 -w '\n%{http_code}' -X "$method")
  [ -z "$body" ] || args+=(-H 'Content-Type: application/json' -d "$body")
  C curl "${args[@]}" "http://127.0.0.1:8420$path" || true
}
# D CMD...: a package command inside the container, with a clean environment
# (nothing of the host's leaks into the maintainer scripts) and no stdin.
D() { C env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@" </dev/null; }
status_of() { http GET "$1" | tail -n1; }
main_pid() { C systemctl show -p MainPID --value agentd; }
history_size() { http GET "/api/chat/history?session_id=pkg" | head -n -1 | jget size; }
history_limit() { http GET "/api/chat/history?session_id=pkg" | head -n -1 | jget limit; }

section "dpkg -i $VERSION1"
D dpkg -i /run/e2e/agentd_1.deb >"$W/dpkg1.log" 2>&1 ||
  { cat "$W/dpkg1.log"; fail "dpkg -i $VERSION1"; }
check "dpkg -i: the package is installed" \
  test "$(C dpkg-query -W -f '${Status} ${Version}' agentd)" = "install ok installed $VERSION1"
check "systemctl is-enabled agentd: enabled" test "$(C systemctl is-enabled agentd)" = enabled
check "systemctl is-active agentd: active" test "$(C systemctl is-active agentd)" = active
check "/health answers 200" test "$(status_of /health)" = 200
for i in 1 2 3; do
  reply=$(http POST /api/chat "{\"message\": \"package test $i\", \"session_id\": \"pkg\"}")
  check "chat message $i answered 200" test "$(tail -n1 <<<"$reply")" = 200
done
check "history holds the 3 exchanges (6 messages)" test "$(history_size)" = 6
check "the state is in /var/lib/private/agentd (DynamicUser=yes)" C test -s /var/lib/private/agentd/state.db
pid1=$(main_pid)

# An operator's edit of the conffile, which an upgrade must keep (and the
# restarted agentd must read).
C sh -c 'printf "\n# set by the package test\nhistory_limit = 777\n" >> /etc/agentd/agentd.toml'

section "dpkg -i $VERSION2 (upgrade)"
D dpkg -i /run/e2e/agentd_2.deb >"$W/dpkg2.log" 2>&1 ||
  { cat "$W/dpkg2.log"; fail "dpkg -i $VERSION2"; }
check "upgraded to $VERSION2" test "$(C dpkg-query -W -f '${Version}' agentd)" = "$VERSION2"
check "the modified conffile was kept" C grep -qx 'history_limit = 777' /etc/agentd/agentd.toml
check "no .dpkg-dist/.dpkg-new beside it" not C sh -c 'ls /etc/agentd/agentd.toml.dpkg-* >/dev/null 2>&1'
check "systemctl is-active agentd: active" test "$(C systemctl is-active agentd)" = active
pid2=$(main_pid)
check "the service was restarted (MainPID $pid1 -> $pid2)" test "$pid1" != "$pid2" -a "$pid2" != 0
check "/health answers 200 after the upgrade" test "$(status_of /health)" = 200
check "the restarted agentd reads the kept conffile (history limit 777)" test "$(history_limit)" = 777
check "the chat history survived the upgrade (6 messages)" test "$(history_size)" = 6

section "dpkg -r"
D dpkg -r agentd >"$W/dpkg-r.log" 2>&1 ||
  { cat "$W/dpkg-r.log"; fail "dpkg -r"; }
check "systemctl is-active agentd: not active" test "$(C systemctl is-active agentd || true)" != active
check "nothing answers on 127.0.0.1:8420" not C curl -s -m 2 -o /dev/null http://127.0.0.1:8420/health
check "/usr/bin/agentd is gone" not C test -e /usr/bin/agentd
check "dpkg state: config-files" test "$(C dpkg-query -W -f '${Status}' agentd)" = "deinstall ok config-files"
check "the conffile is kept until purge" C test -f /etc/agentd/agentd.toml
check "the state is kept until purge" C test -s /var/lib/private/agentd/state.db

section "dpkg --purge"
D dpkg --purge agentd >"$W/dpkg-purge.log" 2>&1 ||
  { cat "$W/dpkg-purge.log"; fail "dpkg --purge"; }
check "the package is gone from dpkg's database" not C dpkg -s agentd
check "/etc/agentd is gone" not C test -e /etc/agentd
check "/var/lib/agentd is gone" not C test -e /var/lib/agentd
check "/var/lib/private/agentd is gone" not C test -e /var/lib/private/agentd
check "no agentd unit left enabled" not C test -e /etc/systemd/system/multi-user.target.wants/agentd.service

section "results"
log "suite time: $(since "$T_SUITE") s; checks: $CHECKS, failed: ${#FAILS[@]}"
if [ ${#FAILS[@]} -gt 0 ]; then
  printf '  failed: %s\n' "${FAILS[@]}"
  exit 1
fi
