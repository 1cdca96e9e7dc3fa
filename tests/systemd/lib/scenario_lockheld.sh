# shellcheck shell=bash
# Scenario `lockheld`: another process takes the write lock of state.db (as
# a `sqlite3` shell inside a transaction, or a backup tool, does) and holds
# it for 60 s while agentd runs under the real unit.
#
# Expected (ARCHITECTURE.md, "Wedge or load", `store`): a lock another
# process holds is degraded, not wedged. /health keeps answering, with 503
# and checks.store "degraded: database is locked"; STATUS= names the store;
# a chat gets 503 unavailable and is not stored; reads are served;
# WATCHDOG=1 keeps coming, so NRestarts and MainPID stay the same for the
# whole hold (20 x WatchdogSec); once the lock goes agentd is healthy again
# by itself and the next chat is stored.
# Sourced by run.sh after scenarios.sh.

LOCK_HOLD_SECONDS=${E2E_LOCK_SECONDS:-60}

# chat_status SESSION TEXT: POST one chat; prints "STATUS CODE".
chat_status() {
  N "$PY" - "$1" "$2" <<'PYEOF'
import http.client, json, sys
session, text = sys.argv[1], sys.argv[2]
conn = http.client.HTTPConnection("127.0.0.1", 8420, timeout=10)
conn.request("POST", "/api/chat", body=json.dumps({"message": text, "session_id": session}),
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

scenario_lockheld() {
  section "a write lock on state.db held by another process for $LOCK_HOLD_SECONDS s"
  stop_agentd
  if ! start_agentd; then
    fail "lockheld: systemctl start agentd"
    return
  fi
  local n0 pid0 out st holder t0 pings0 pings1
  n0=$(prop NRestarts)
  pid0=$(prop MainPID)
  out=$(chat_status lockheld before)
  check "lockheld: a chat before the lock is stored ($out)" [ "${out%% *}" = 200 ]

  # The holder: Python's sqlite3 inside the container, as root, on the
  # dynamic user's database; it prints "locked" once BEGIN IMMEDIATE holds.
  C timeout $((LOCK_HOLD_SECONDS + 30)) python3 -c '
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
print("released", flush=True)
' "$STATE_DIR/state.db" "$LOCK_HOLD_SECONDS" >"$W/lockheld.out" 2>&1 &
  holder=$!
  locked() { grep -q locked "$W/lockheld.out"; }
  if ! wait_for 10 locked; then
    fail "lockheld: the holder took the lock ($(cat "$W/lockheld.out"))"
    kill "$holder" 2>/dev/null
    return
  fi
  t0=$EPOCHREALTIME
  pings0=$(cli get /health --field watchdog.pings_sent | jget value)

  degraded_store() {
    st=$(prop StatusText)
    [[ "$st" == "degraded: store: database is locked"* ]]
  }
  if wait_for 10 degraded_store; then
    ok "lockheld: STATUS= names the lock after $(since "$t0") s: $st"
  else
    fail "lockheld: STATUS= names the lock (last: $(prop StatusText))"
  fi
  out=$(cli get /health --field checks.store)
  log "/health checks.store: $(jget value <<<"$out")"
  check "lockheld: /health is 503 with checks.store degraded" \
    eq2 "$(jget status <<<"$out")" 503 "$(jget value.status <<<"$out")" degraded
  out=$(cli get '/health?deep=1' --field checks.store.status)
  check "lockheld: /health?deep=1 is 503 with checks.store degraded ($(jget value <<<"$out"))" \
    eq2 "$(jget status <<<"$out")" 503 "$(jget value <<<"$out")" degraded
  out=$(chat_status lockheld refused)
  check "lockheld: a chat while locked gets 503 unavailable ($out)" [ "$out" = "503 unavailable" ]
  out=$(cli get '/api/chat/history?session_id=lockheld')
  check "lockheld: reads are still served (history $(jget status <<<"$out"))" [ "$(jget status <<<"$out")" = 200 ]

  # Degraded is not a wedge: /health answers throughout, the pings go on.
  # Each /health must come within 2 s (the busy timeout): a worker blocked
  # in SQLite's wait would hold it for that long, or for ever.
  out=$(N "$PY" "$E2E_LIB/client.py" probe --seconds "$((LOCK_HOLD_SECONDS - 15))" --path /health \
    --timeout 2 --pause 0.1 --max-requests 1000 2>&1 || true)
  log "probe while locked: $out"
  local answered
  answered=$(($(jget ok <<<"$out") + $(jget http_error <<<"$out")))
  check "lockheld: every /health while locked was answered within 2 s ($answered answers, slowest $(jget slowest_s <<<"$out") s)" \
    eq2 "$(jget refused <<<"$out")$(jget reset <<<"$out")$(jget timeout <<<"$out")$(jget other <<<"$out")" 0000 "$([ "$answered" -ge 10 ] && echo y)" y
  wait "$holder" 2>/dev/null
  pings1=$(cli get /health --field watchdog.pings_sent | jget value)
  check "lockheld: $(since "$t0") s locked: NRestarts $n0 -> $(prop NRestarts), MainPID $pid0 -> $(prop MainPID)" \
    eq2 "$(prop NRestarts)" "$n0" "$(prop MainPID)" "$pid0"
  check "lockheld: WATCHDOG=1 kept coming while locked (pings_sent $pings0 -> $pings1)" \
    [ "${pings1:-0}" -gt "$((${pings0:-0} + LOCK_HOLD_SECONDS / 2))" ]
  check "lockheld: the holder released the lock ($(tr '\n' ' ' <"$W/lockheld.out"))" grep -q released "$W/lockheld.out"

  t0=$EPOCHREALTIME
  out=$(cli get /health --want 200 --wait 10 --field status)
  check "lockheld: healthy again $(since "$t0") s after the release ($(jget value <<<"$out"))" \
    [ "$(jget status <<<"$out")" = 200 ]
  out=$(chat_status lockheld after)
  check "lockheld: a chat after the release is stored ($out)" [ "${out%% *}" = 200 ]
  out=$(cli get '/api/chat/history?session_id=lockheld' --field messages)
  local users
  users=$(jget value <<<"$out" | "$PY" -c 'import json,sys; print(",".join(m["content"] for m in json.load(sys.stdin) if m["role"] == "user"))')
  check "lockheld: stored are the chats before and after, not the refused one ($users)" [ "$users" = "before,after" ]
  SUMMARY+=("write lock held elsewhere for $LOCK_HOLD_SECONDS s: STATUS=degraded: store: database is locked, chats 503, recovered by itself, NRestarts $n0 -> $(prop NRestarts)")
  stop_agentd
}
