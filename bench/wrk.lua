-- wrk script shared by every load in bench/run.sh.
--
-- Environment (all optional):
--   BENCH_BODY        when set, requests are POSTs with this JSON body
--   BENCH_SESSIONS    with BENCH_BODY: spread requests over this many session
--                     ids by replacing the text SESSION in the body with
--                     bench-<n> (chats of one session run one at a time)
-- At the end one machine-readable line is printed, starting with "BENCH ".

local body = os.getenv("BENCH_BODY")
if body and body ~= "" then
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  local sessions = tonumber(os.getenv("BENCH_SESSIONS") or "")
  if sessions and sessions > 1 then
    local bodies = {}
    -- Formatted in init(), after wrk.init has added the Host header:
    -- requests formatted at load time would have none (agentd answers an
    -- HTTP/1.1 request without Host with 400).
    function init(args)
      for i = 1, sessions do
        bodies[i] = wrk.format(nil, nil, nil, (body:gsub("SESSION", "bench-" .. i)))
      end
    end
    local n = 0
    function request()
      n = n % sessions + 1
      return bodies[n]
    end
  else
    wrk.body = body:gsub("SESSION", "bench")
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d rps=%.1f ok_rps=%.1f status_errors=%d socket_errors=%d " ..
    "p50_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration,
    summary.requests / (summary.duration / 1e6),
    (summary.requests - e.status) / (summary.duration / 1e6),
    e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
