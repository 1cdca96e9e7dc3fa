# shellcheck shell=bash
# A real systemd as PID 1 of a systemd-nspawn container, for a host whose own
# PID 1 is not systemd (CI VMs). Sourced by run.sh.
#
# Safety rules this file keeps:
#  * nspawn (and so the whole container) runs in a cgroup of its own, created
#    here and removed on teardown; nothing outside it is touched, and no bare
#    systemd ever runs on the host.
#  * Commands reach the container only through `C`, which nsenters the PID
#    found as the container's PID 1: a child of our nspawn, named systemd, in
#    another PID namespace. Without that PID, `C` refuses to run.
#
# The container is volatile: / is a tmpfs, /usr is the host's /usr with a
# throw-away writable overlay (so `install` into /usr/bin works and vanishes
# with the container), the network is private (loopback only).

CT_NAME=${CT_NAME:-agentd-e2e-$$}
CT_CGROUP=$CT_NAME
CT_PAYLOAD= # host dir, read-only at /run/e2e inside the container
# Optional root file system with its own /usr and dpkg database (the package
# test installs a .deb there). Booted with --volatile=overlay: every change
# goes to a tmpfs and the directory itself stays untouched. Empty: the host's
# / with a tmpfs root and a throw-away overlay on /usr.
CT_ROOTFS=${CT_ROOTFS:-}
CT_NSPAWN_PID=
CT_LEADER=
CT_LEADER_PIDNS= # the PID namespace CT_LEADER was found in, re-checked by C and N
CT_CGDIRS=()

ct_cgroup_dirs() {
  CT_CGDIRS=()
  if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
    CT_CGDIRS=("/sys/fs/cgroup/$CT_CGROUP")
  else
    local h
    for h in systemd unified; do
      [ -d "/sys/fs/cgroup/$h" ] && CT_CGDIRS+=("/sys/fs/cgroup/$h/$CT_CGROUP")
    done
  fi
}

# ct_boot PAYLOAD_DIR LOG: boot the container; sets CT_LEADER.
ct_boot() {
  CT_PAYLOAD=$1
  local log=$2 d c st
  local root_args=(-D / --volatile=yes --overlay=/usr::/usr)
  [ -n "$CT_ROOTFS" ] && root_args=(-D "$CT_ROOTFS" --volatile=overlay)
  ct_cgroup_dirs
  for d in "${CT_CGDIRS[@]}"; do mkdir -p "$d"; done
  # The sh moves itself into the dedicated cgroup(s), then execs nspawn (same PID).
  sh -c 'for d in "$@"; do [ "$d" = -- ] && break; echo $$ > "$d/cgroup.procs"; done
         while [ "$1" != -- ]; do shift; done; shift; exec "$@"' sh "${CT_CGDIRS[@]}" -- \
    systemd-nspawn "${root_args[@]}" --private-network --boot \
      --register=no --keep-unit -M "$CT_NAME" --console=passive \
      --bind-ro="$CT_PAYLOAD":/run/e2e \
      -- systemd.firstboot=off >"$log" 2>&1 </dev/null &
  CT_NSPAWN_PID=$!
  for _ in $(seq 200); do
    for c in $(pgrep -P "$CT_NSPAWN_PID" || true); do
      if [ "$(cat "/proc/$c/comm" 2>/dev/null)" = systemd ] &&
        [ "$(readlink "/proc/$c/ns/pid")" != "$(readlink /proc/self/ns/pid)" ]; then
        CT_LEADER=$c
        CT_LEADER_PIDNS=$(readlink "/proc/$c/ns/pid")
      fi
    done
    [ -n "$CT_LEADER" ] && break
    kill -0 "$CT_NSPAWN_PID" 2>/dev/null || break
    sleep 0.05
  done
  if [ -z "$CT_LEADER" ]; then
    cat "$log" >&2
    return 1
  fi
  for _ in $(seq 300); do
    st=$(C systemctl is-system-running 2>/dev/null || true)
    case "$st" in running | degraded) break ;; esac
    sleep 0.1
  done
  case "$st" in running | degraded) ;; *)
    echo "container did not finish booting (state: ${st:-none})" >&2
    return 1
    ;;
  esac
}

# ct_alive: nspawn still runs and CT_LEADER is still the container's PID 1
# (same PID namespace as when it was found), so nsenter cannot hit another
# process that reused the PID.
ct_alive() {
  [ -n "$CT_LEADER" ] && kill -0 "$CT_NSPAWN_PID" 2>/dev/null &&
    [ "$(readlink "/proc/$CT_LEADER/ns/pid" 2>/dev/null)" = "$CT_LEADER_PIDNS" ]
}

# C CMD...: run a command inside the container (all its namespaces).
C() {
  ct_alive || {
    echo "C: no container" >&2
    return 97
  }
  nsenter -t "$CT_LEADER" -a "$@"
}

# N CMD...: run a host command in the container's network namespace only
# (clients reach the container's loopback; files stay the host's).
N() {
  ct_alive || {
    echo "N: no container" >&2
    return 97
  }
  nsenter -t "$CT_LEADER" -n "$@"
}

# ct_teardown: power off, wait for nspawn, remove the cgroups. Idempotent and
# safe to call when the boot failed half way.
ct_teardown() {
  local d
  if [ -n "$CT_NSPAWN_PID" ] && kill -0 "$CT_NSPAWN_PID" 2>/dev/null; then
    if ct_alive; then
      nsenter -t "$CT_LEADER" -a systemctl poweroff --no-block >/dev/null 2>&1 || true
    fi
    for _ in $(seq 150); do
      kill -0 "$CT_NSPAWN_PID" 2>/dev/null || break
      sleep 0.1
    done
    # nspawn turns SIGTERM into an orderly shutdown of the container.
    kill -0 "$CT_NSPAWN_PID" 2>/dev/null && kill -TERM "$CT_NSPAWN_PID" 2>/dev/null
    for _ in $(seq 50); do
      kill -0 "$CT_NSPAWN_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$CT_NSPAWN_PID" 2>/dev/null && kill -KILL "$CT_NSPAWN_PID" 2>/dev/null
    wait "$CT_NSPAWN_PID" 2>/dev/null || true
  fi
  # Last resort: whatever is left in our own cgroup (and only there).
  local pid
  for d in "${CT_CGDIRS[@]}"; do
    [ -d "$d" ] || continue
    find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | while read -r pid; do
      kill -KILL "$pid" 2>/dev/null
    done
  done
  sleep 0.2
  CT_LEADER=
  CT_NSPAWN_PID=
  for d in "${CT_CGDIRS[@]}"; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
    [ -d "$d" ] && echo "warning: cgroup $d still exists" >&2
  done
  rm -rf "/run/systemd/nspawn/propagate/$CT_NAME"
  return 0
}
