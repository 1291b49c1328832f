-- wrk script for bench/run.py: POSTs one fixed JSON body (a single event or an array of events)
-- and counts the answers by status.
--
-- Environment:
--   BENCH_BODY_FILE  path of the request body (written by bench/run.py)
--   BENCH_AUTHORIZATION  optional Authorization header value (bench/edge_overhead.py: a keyed request)
--   BENCH_SECONDS    how long to send; afterwards no new request is sent, so that every request
--                    already sent gets its answer before wrk's own -d ends (run.py adds a drain
--                    tail to -d). Without this, wrk would cut requests the server has already
--                    accepted, and the rows-vs-acknowledged check could not be exact.
--
-- done() prints one parsable line:
--   BENCH_RESULT sent=N responses=N ok2xx=N non2xx=N accepted_events=N first_send=T last_send=T
--                last_response=T p50_us=N p90_us=N p99_us=N max_us=N errors_connect=N ...
--                status_202=N status_503=N ...
-- Times are CLOCK_MONOTONIC seconds, the clock Python's time.monotonic() reads.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local timespec = ffi.new("bench_timespec")

local function now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) * 1e-9
end

local body_file = os.getenv("BENCH_BODY_FILE")
if not body_file then
  error("BENCH_BODY_FILE is not set")
end
local handle = assert(io.open(body_file, "rb"))
local body = handle:read("*a")
handle:close()

local window = tonumber(os.getenv("BENCH_SECONDS") or "10")

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
local authorization = os.getenv("BENCH_AUTHORIZATION")
if authorization and authorization ~= "" then
  wrk.headers["Authorization"] = authorization
end

-- Per-thread state (each wrk thread has its own Lua state; done() reads it through thread:get).
sent = 0
responses = 0
ok2xx = 0
non2xx = 0
accepted_events = 0
first_send = 0
last_send = 0
last_response = 0
statuses = {}
stopped = false

local NEVER_MS = 1e9

function delay()
  if stopped then
    return NEVER_MS
  end
  local t = now()
  if first_send == 0 then
    first_send = t
  elseif t - first_send >= window then
    stopped = true
    return NEVER_MS
  end
  sent = sent + 1
  last_send = t
  return 0
end

function response(status, headers, response_body)
  last_response = now()
  responses = responses + 1
  statuses[status] = (statuses[status] or 0) + 1
  if status >= 200 and status < 300 then
    ok2xx = ok2xx + 1
    -- a batch answer says how many events it accepted; a single-event answer does not
    local accepted = string.match(response_body, '"accepted"%s*:%s*(%d+)')
    accepted_events = accepted_events + (accepted and tonumber(accepted) or 1)
  else
    non2xx = non2xx + 1
  end
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local totals = { sent = 0, responses = 0, ok2xx = 0, non2xx = 0, accepted_events = 0 }
  local first, last_sent, last_resp = nil, 0, 0
  local by_status = {}
  for _, thread in ipairs(threads) do
    for key, _ in pairs(totals) do
      totals[key] = totals[key] + thread:get(key)
    end
    local f = thread:get("first_send")
    if f > 0 and (first == nil or f < first) then
      first = f
    end
    last_sent = math.max(last_sent, thread:get("last_send"))
    last_resp = math.max(last_resp, thread:get("last_response"))
    for status, count in pairs(thread:get("statuses")) do
      by_status[status] = (by_status[status] or 0) + count
    end
  end
  local parts = {
    "BENCH_RESULT",
    string.format("sent=%d", totals.sent),
    string.format("responses=%d", totals.responses),
    string.format("ok2xx=%d", totals.ok2xx),
    string.format("non2xx=%d", totals.non2xx),
    string.format("accepted_events=%d", totals.accepted_events),
    string.format("first_send=%.6f", first or 0),
    string.format("last_send=%.6f", last_sent),
    string.format("last_response=%.6f", last_resp),
    string.format("p50_us=%d", latency:percentile(50)),
    string.format("p90_us=%d", latency:percentile(90)),
    string.format("p99_us=%d", latency:percentile(99)),
    string.format("max_us=%d", latency.max),
    string.format("wrk_requests=%d", summary.requests),
    string.format("errors_connect=%d", summary.errors.connect),
    string.format("errors_read=%d", summary.errors.read),
    string.format("errors_write=%d", summary.errors.write),
    string.format("errors_status=%d", summary.errors.status),
    string.format("errors_timeout=%d", summary.errors.timeout),
  }
  for status, count in pairs(by_status) do
    table.insert(parts, string.format("status_%d=%d", status, count))
  end
  io.write(table.concat(parts, " ") .. "\n")
end
