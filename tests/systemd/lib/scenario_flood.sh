# shellcheck shell=bash
# Scenario `flood`: busy is not wedged. A connection flood above the
# connection cap for 4 x WatchdogSec, each connection reopened when agentd
# closes it (turned away at the cap, or at the 10 s header timeout), must not
# make systemd restart agentd: NRestarts stays, no 'Watchdog timeout',
# /health reports `accept_loop.saturated` while the ticks keep passing, and
# STATUS= says "busy:". The shipped config and cap are used. Sourced by
# run.sh; leaves agentd stopped.

scenario_flood() {
  local seconds=${E2E_FLOOD_SECONDS:-$((4 * WATCHDOG_SEC))}
  # The shipped cap (AGENTD_MAX_CONNECTIONS default) plus some to turn away.
  local cap=1024 conns=${E2E_FLOOD_CONNS:-1300}
  section "flood: $conns connections (cap $cap) with reconnects for $seconds s, WatchdogSec=$WATCHDOG_SEC"
  stop_agentd
  start_agentd || {
    fail "flood: systemctl start agentd"
    return
  }
  local n0 pid0 cur
  n0=$(prop NRestarts)
  pid0=$(prop MainPID)
  cur=$(cursor)

  N "$PY" "$E2E_LIB/flood.py" --conns "$conns" --seconds "$seconds" >"$W/flood.json" &
  local flood_pid=$! busy='' st t0=$EPOCHREALTIME
  # Watch STATUS= while the flood runs (bounded by the flood's own time).
  while kill -0 "$flood_pid" 2>/dev/null && le "$(since "$t0")" $((seconds + 10)); do
    st=$(prop StatusText)
    [[ -z "$busy" && "$st" == *busy:* ]] && busy=$st
    sleep 0.2
  done
  wait "$flood_pid" || true
  local out
  out=$(cat "$W/flood.json")
  log "flood: $out"
  [ -n "$busy" ] && log "STATUS= during the flood: $busy"

  check "flood: NRestarts stayed $n0 (now $(prop NRestarts))" [ "$(prop NRestarts)" = "$n0" ]
  check "flood: MainPID unchanged ($pid0)" [ "$(prop MainPID)" = "$pid0" ]
  check "flood: no 'Watchdog timeout' in the journal" \
    bash -c "! grep -q 'Watchdog timeout' <<<\"\$1\"" _ "$(journal_since "$cur")"
  check "flood: the flood held more connections than the cap ($(jget peak_open <<<"$out") > $cap)" \
    [ "$(jget peak_open <<<"$out")" -gt "$cap" ]
  check "flood: /health reported saturated while healthy ($(jget saturated_healthy <<<"$out") answers)" \
    [ "$(jget saturated_healthy <<<"$out")" -gt 0 ]
  check "flood: STATUS= said busy (${busy:-never})" [ -n "$busy" ]
  local after
  after=$(cli get /health --want 200 --wait 10 --field status)
  check "flood: /health 200 afterwards ($after)" [ "$(jget status <<<"$after")" = 200 ]
  SUMMARY+=("flood: $conns connections above the cap of $cap for $seconds s: NRestarts $n0 -> $(prop NRestarts), \
peak $(jget peak_open <<<"$out") open, $(jget opened <<<"$out") opened, max $(jget max_rejected_per_second <<<"$out") rejected/s, \
/health saturated+healthy in $(jget saturated_healthy <<<"$out") of $(jget health_polls <<<"$out") polls")
  stop_agentd
}
