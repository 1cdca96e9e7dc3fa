# shellcheck shell=bash
# Scenario `diskfull`: the state directory on a 2 MB tmpfs, filled to the brim
# while agentd runs under the real unit.
#
# Expected (the rule in ARCHITECTURE.md, "Wedge or load", `store`): a full
# disk is degraded, not wedged. The chat that cannot be stored gets 507
# disk_full; /health is 503 with checks.store "degraded"; STATUS= names the
# store; reads are still served; WATCHDOG=1 keeps coming, so NRestarts stays
# the same for 2 x WatchdogSec and more; once the filler is removed agentd
# is healthy again by itself and the next chat is stored.
# Sourced by run.sh after scenarios.sh.

DISKFULL_TMPFS_SIZE=2m

# eq2 A B C D: A = B and C = D (one command, so `check` sees both).
eq2() { [ "$1" = "$2" ] && [ "$3" = "$4" ]; }

# big_chat SESSION KB: POST one chat of KB kilobytes; prints "STATUS CODE".
big_chat() {
  N "$PY" - "$1" "$2" <<'PYEOF'
import http.client, json, sys
session, kb = sys.argv[1], int(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", 8420, timeout=10)
body = json.dumps({"message": "x" * (kb << 10), "session_id": session})
conn.request("POST", "/api/chat", body=body,
             headers={"Content-Type": "application/json", "Connection": "close"})
r = conn.getresponse()
raw = r.read()
try:
    code = json.loads(raw).get("error", {}).get("code", "-")
except ValueError:
    code = "-"
print(r.status, code)
PYEOF
}

scenario_diskfull() {
  section "full disk: a $DISKFULL_TMPFS_SIZE tmpfs state dir filled to the brim"
  stop_agentd
  # DynamicUser=yes: the state lives in /var/lib/private/agentd; systemd
  # hands the mount to the dynamic user at start.
  if ! C sh -euc "mkdir -p $STATE_DIR && mount -t tmpfs -o size=$DISKFULL_TMPFS_SIZE,mode=0700 tmpfs $STATE_DIR"; then
    fail "diskfull: mount a tmpfs on $STATE_DIR"
    return
  fi
  if ! start_agentd; then
    fail "diskfull: systemctl start agentd on the tmpfs"
    C systemctl status --no-pager "$UNIT" | sed 's/^/    /'
    C umount "$STATE_DIR"
    return
  fi
  local n0 pid0 out st
  n0=$(prop NRestarts)
  pid0=$(prop MainPID)
  out=$(big_chat diskfull 1)
  check "diskfull: a chat before the disk is full is stored ($out)" [ "${out%% *}" = 200 ]

  local filled
  filled=$(C sh -c "dd if=/dev/zero of=$STATE_DIR/filler bs=4k 2>/dev/null; sync; stat -c %s $STATE_DIR/filler")
  log "filler: ${filled:-?} bytes; $(C df -k --output=avail "$STATE_DIR" | tail -n1 | tr -d ' ') KiB left"
  out=$(big_chat diskfull 256)
  check "diskfull: a 256 KiB chat on the full disk gets 507 disk_full ($out)" [ "$out" = "507 disk_full" ]

  degraded_store() {
    st=$(prop StatusText)
    [[ "$st" == "degraded: store: disk full"* ]]
  }
  if wait_for 10 degraded_store; then
    ok "diskfull: STATUS= names the store: $st"
  else
    fail "diskfull: STATUS= names the store (last: $(prop StatusText))"
  fi
  out=$(cli get /health --field checks.store)
  log "/health checks.store: $(jget value <<<"$out")"
  check "diskfull: /health is 503 with checks.store degraded" \
    eq2 "$(jget status <<<"$out")" 503 "$(jget value.status <<<"$out")" degraded
  out=$(cli get '/api/chat/history?session_id=diskfull')
  check "diskfull: reads are still served (history $(jget status <<<"$out"))" [ "$(jget status <<<"$out")" = 200 ]

  # Degraded is not a wedge: stay full for more than 2 x WatchdogSec.
  local hold=$((WATCHDOG_SEC * 2 + 2)) t0=$EPOCHREALTIME pings0 pings1
  pings0=$(cli get /health --field watchdog.pings_sent | jget value)
  while le "$(since "$t0")" "$hold"; do sleep 0.5; done
  pings1=$(cli get /health --field watchdog.pings_sent | jget value)
  check "diskfull: ${hold} s on a full disk: NRestarts $n0 -> $(prop NRestarts), MainPID $pid0 -> $(prop MainPID)" \
    eq2 "$(prop NRestarts)" "$n0" "$(prop MainPID)" "$pid0"
  check "diskfull: WATCHDOG=1 kept coming while full (pings_sent $pings0 -> $pings1)" \
    [ "${pings1:-0}" -gt "${pings0:-0}" ]

  C rm -f "$STATE_DIR/filler"
  t0=$EPOCHREALTIME
  out=$(cli get /health --want 200 --wait 10 --field status)
  check "diskfull: healthy again $(since "$t0") s after the filler was removed ($(jget value <<<"$out"))" \
    [ "$(jget status <<<"$out")" = 200 ]
  log "STATUS= after recovery: $(prop StatusText)"
  out=$(big_chat diskfull 256)
  check "diskfull: the 256 KiB chat is stored after recovery ($out)" [ "${out%% *}" = 200 ]
  check "diskfull: no restart at all (NRestarts $(prop NRestarts), MainPID unchanged)" \
    eq2 "$(prop NRestarts)" "$n0" "$(prop MainPID)" "$pid0"
  SUMMARY+=("full disk ($DISKFULL_TMPFS_SIZE tmpfs): 507 disk_full, STATUS=degraded: store, recovered by itself, NRestarts $n0 -> $(prop NRestarts)")

  stop_agentd
  C umount "$STATE_DIR" || fail "diskfull: umount $STATE_DIR"
}
