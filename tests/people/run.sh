#!/usr/bin/env bash
# What people and their tools see, tested with the real programs:
#   * `promtool check metrics` on agentd's /metrics;
#   * a real Prometheus server scraping agentd on loopback, queried through
#     its HTTP API;
#   * the /status page rendered by headless Chromium: a screenshot saved in
#     the CI artifacts folder and the page's text asserted after its scripts
#     ran (healthy, then degraded by an injected fault);
#   * `agentd health` against the same servers.
# Prints `checks: N, failed: M`; exits non-zero when a check failed.
# Needs: promtool and prometheus (Debian `prometheus`), chromium, python3,
# curl. Screenshots go to $AGENTD_CI_ARTIFACTS (default target/ci-artifacts).
set -uo pipefail
cd "$(dirname "$0")/../.."

artifacts=${AGENTD_CI_ARTIFACTS:-target/ci-artifacts}
mkdir -p "$artifacts"
# Upper bound for every wait below, in seconds.
bound=60

checks=0
failed=0
ok() { checks=$((checks + 1)); echo "ok: $*"; }
bad() { checks=$((checks + 1)); failed=$((failed + 1)); echo "FAILED: $*"; }
expect() { # expect DESCRIPTION COMMAND...
  local what=$1
  shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT

for tool in promtool prometheus chromium python3 curl; do
  command -v "$tool" >/dev/null || { bad "$tool is installed (bash .ci/run installs it)"; }
done
if [ "$failed" -gt 0 ]; then
  echo "checks: $checks, failed: $failed"
  exit 1
fi

echo "== building agentd (with fault injection, for the degraded page)"
cargo build --locked --quiet --all-features --bin agentd || { bad "cargo build"; echo "checks: $checks, failed: $failed"; exit 1; }
bin=$PWD/target/debug/agentd

# start_agentd NAME [VAR=VALUE...]: start `agentd serve` on a free loopback
# port; sets $addr. Its log is $work/NAME.log.
start_agentd() {
  local name=$1
  shift
  mkdir -p "$work/$name"
  env -i PATH="$PATH" AGENTD_LISTEN=127.0.0.1:0 AGENTD_STATE_DIR="$work/$name/state" \
    AGENTD_HEALTH_INTERVAL=500ms AGENTD_TREND_INTERVAL=200ms AGENTD_TREND_WINDOW=1h "$@" "$bin" serve 2>"$work/$name.log" &
  pids+=($!)
  addr=
  for _ in $(seq $((bound * 10))); do
    addr=$(grep -o 'listening on [0-9.:]*' "$work/$name.log" | head -n1 | cut -d' ' -f3)
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { cat "$work/$name.log"; return 1; }
  # Ready once the first tick passed.
  for _ in $(seq $((bound * 10))); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://$addr/health")" = 200 ] && return 0
    sleep 0.1
  done
  return 1
}

token=people-test-token-0123456789
if start_agentd main AGENTD_API_TOKEN=$token; then ok "agentd starts"; else bad "agentd starts"; fi
main=$addr
for i in 1 2 3; do
  curl -s --max-time 5 -H "authorization: Bearer $token" -H 'content-type: application/json' \
    -d "{\"message\":\"hello $i\"}" "http://$main/api/chat" >/dev/null
done

echo "== promtool"
curl -s --max-time 5 "http://$main/metrics" >"$work/metrics.txt"
if promtool check metrics <"$work/metrics.txt" >"$work/promtool.out" 2>&1; then
  ok "promtool check metrics: no problems"
else
  bad "promtool check metrics: $(cat "$work/promtool.out")"
fi

echo "== a real Prometheus scraping agentd"
prom_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: agentd
    static_configs:
      - targets: ['$main']
EOF
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/prometheus-data" \
  --web.listen-address="127.0.0.1:$prom_port" --log.level=warn >"$work/prometheus.log" 2>&1 &
pids+=($!)

# query PROMQL: print the first result's value ('' when none yet).
query() {
  curl -s --max-time 5 -G "http://127.0.0.1:$prom_port/api/v1/query" --data-urlencode "query=$1" |
    python3 -c 'import json,sys
try: r=json.load(sys.stdin)["data"]["result"]
except Exception: r=[]
print(r[0]["value"][1] if r else "")'
}
build_info=
for _ in $(seq "$bound"); do
  build_info=$(query 'agentd_build_info{job="agentd"}')
  [ -n "$build_info" ] && break
  sleep 1
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
expect "Prometheus returns agentd_build_info = 1 (got '$build_info')" [ "$build_info" = 1 ]
expect "agentd_build_info carries version $version" \
  [ "$(query "agentd_build_info{version=\"$version\"}")" = 1 ]
expect "scrape target is up" [ "$(query 'up{job="agentd"}')" = 1 ]
expect "agentd_health_check_ok{check=\"store\"} = 1 through Prometheus" \
  [ "$(query 'agentd_health_check_ok{check="store"}')" = 1 ]
expect "agentd_health_status{status=\"healthy\"} = 1 through Prometheus" \
  [ "$(query 'agentd_health_status{status="healthy"}')" = 1 ]
expect "three chats counted: agentd_executions_total{kind=\"chat\",outcome=\"success\"} = 3" \
  [ "$(query 'agentd_executions_total{kind="chat",outcome="success"}')" = 3 ]
# Every family agentd exposes arrived in Prometheus's storage.
curl -s --max-time 5 -G "http://127.0.0.1:$prom_port/api/v1/label/__name__/values" >"$work/names.json"
missing=$(sed -n 's/^# TYPE \([a-z_]*\) .*/\1/p' "$work/metrics.txt" |
  python3 -c 'import json,sys
try: have=set(json.load(open(sys.argv[1]))["data"])
except Exception: have=set()
names=sys.stdin.read().split()
print(" ".join(n for n in names if n not in have) if names else "(no families in /metrics)")' "$work/names.json")
families=$(grep -c '^# TYPE agentd_' "$work/metrics.txt")
expect "all $families agentd families are stored by Prometheus${missing:+ (missing: $missing)}" [ -z "$missing" ]

echo "== agentd health against the same server"
"$bin" health --url "http://$main" >"$work/health.txt"
code=$?
expect "agentd health exits 0 on a healthy server" [ "$code" = 0 ]
expect "the report shows history against its limit" grep -q 'history .* / 1000' "$work/health.txt"

echo "== /status in headless Chromium"
status_headers=$(curl -s --max-time 5 -D - -o "$work/status.html" "http://$main/status")
expect "/status answers 200 without the API token" grep -q '^HTTP/1.1 200' <<<"$status_headers"
expect "/status is HTML with a Content-Security-Policy" \
  grep -qi '^content-security-policy: default-src .none.' <<<"$status_headers"
expect "/api/* still needs the token" \
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://$main/api/chat/history")" = 401 ]

# browse NAME URL: screenshot into $artifacts/NAME.png, DOM into $work/NAME.dom
# (both after the page's scripts ran: the budget lets the fetches finish).
browse() {
  local flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
    --disable-background-networking --disable-component-update --disable-sync
    --disable-dev-shm-usage --hide-scrollbars --window-size=1200,900
    --virtual-time-budget=5000)
  timeout "$bound" chromium "${flags[@]}" --user-data-dir="$work/chrome-$1-shot" \
    --screenshot="$artifacts/$1.png" "$2" >"$work/chrome-$1.log" 2>&1
  timeout "$bound" chromium "${flags[@]}" --user-data-dir="$work/chrome-$1-dom" \
    --dump-dom "$2" >"$work/$1.dom" 2>>"$work/chrome-$1.log"
}
png() { [ -s "$1" ] && [ "$(head -c 8 "$1" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ]; }

browse status "http://$main/status"
dom=$work/status.dom
expect "screenshot $artifacts/status.png is a PNG" png "$artifacts/status.png"
expect "page shows the verdict healthy" grep -q 'id="verdict" class="healthy">healthy<' "$dom"
for check in self_probe state_lock store executor runtime_lag resources; do
  expect "page lists check $check" grep -q ">$check<" "$dom"
done
fds=$(curl -s --max-time 5 "http://$main/health" | python3 -c 'import json,sys; print(json.load(sys.stdin)["diagnostics"]["fd_soft_limit"])')
expect "page shows open fds against the limit ($fds)" grep -qE "open fds.*>[0-9]+ / $fds<" "$dom"
expect "page shows history against its limit" grep -qE 'history.*>[0-9]+ / 1000<' "$dom"
expect "page shows the watchdog" grep -q 'consecutive failures' "$dom"
expect "page names the runtime" grep -q 'runtime echo' "$dom"
gauges=$(curl -s --max-time 5 "http://$main/health/trends" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["gauges"]))')
# Plots as drawn (the script's own text holds a template of one, not counted).
plots=$(grep -oE '<svg [^>]*aria-label="[a-z_]+ samples"><polyline' "$dom" | wc -l)
expect "page plots every trend gauge ($plots plots for ${gauges:-?} gauges)" [ "$plots" = "${gauges:-x}" ]
expect "page says how often samples are taken" grep -q 'samples every 0.2 s' "$dom"

echo "== a degraded server, in the browser and for agentd health"
if start_agentd degraded AGENTD_FAULT_INJECTION=1; then ok "second agentd starts"; else bad "second agentd starts"; fi
sick=$addr
curl -s --max-time 5 -X POST "http://$sick/debug/fault/deadlock-state" >/dev/null
for _ in $(seq $((bound * 10))); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://$sick/health")" = 503 ] && break
  sleep 0.1
done
"$bin" health --url "http://$sick" >"$work/health-degraded.txt"
code=$?
expect "agentd health exits 1 on a degraded server" [ "$code" = 1 ]
expect "the report names state_lock as failing" grep -q 'FAIL state_lock' "$work/health-degraded.txt"
browse status-degraded "http://$sick/status"
expect "screenshot $artifacts/status-degraded.png is a PNG" png "$artifacts/status-degraded.png"
expect "page shows the verdict degraded" grep -q 'id="verdict" class="degraded">degraded<' "$work/status-degraded.dom"
expect "page shows state_lock failing" grep -qE '>state_lock<.*class="bad">(failed|timeout)<' "$work/status-degraded.dom"

echo
echo "checks: $checks, failed: $failed"
[ "$failed" = 0 ]
