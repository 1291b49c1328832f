-- wrk script for bench/run.py: POSTs one fixed JSON body (a single event or an array of events)
-- and counts the answers by status.
--
-- Environment:
--   BENCH_BODY_FILE  path of the request body (written by bench/run.py)
--   BENCH_AUTHORIZATION  optional Authorization header value (phase (e): a keyed request)
--   BENCH_ORIGIN     optional Origin header value (phase (e): a browser page on an allowed origin)
--   BENCH_USER_AGENT optional User-Agent header value (phase (e): what enrichment records)
--   BENCH_EVENTS_PER_REQUEST  events a 2xx answer counts for when it does not say (`"accepted": N`
--                    does): 1 by default; /v1/batch answers {"success":true} for a whole batch
--   BENCH_RATE       optional requests per second to pace to, all connections together (the
--                    soak): delay() hands each request the next slot of a fixed schedule, so the
--                    rate holds whatever the latency; unset, every connection sends at once
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
local optional_headers = {
  Authorization = "BENCH_AUTHORIZATION",
  Origin = "BENCH_ORIGIN",
  ["User-Agent"] = "BENCH_USER_AGENT",
}
for header, variable in pairs(optional_headers) do
  local value = os.getenv(variable)
  if value and value ~= "" then
    wrk.headers[header] = value
  end
end
local events_per_request = tonumber(os.getenv("BENCH_EVENTS_PER_REQUEST") or "1")
local rate = tonumber(os.getenv("BENCH_RATE") or "0")
local interval = rate > 0 and 1 / rate or 0

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
next_slot = 0  -- BENCH_RATE: when the next request is due (CLOCK_MONOTONIC seconds)
late = 0  -- BENCH_RATE: requests sent more than 10 ms after their slot (the server fell behind)

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
  if interval == 0 then
    return 0
  end
  -- One schedule for the thread (wrk has one Lua state per thread, not per connection): each
  -- request takes the next slot; a connection whose slot is ahead waits for it.
  if next_slot == 0 then
    next_slot = t
  end
  local slot = next_slot
  next_slot = slot + interval
  if slot <= t then
    if t - slot > 0.01 then
      late = late + 1
    end
    return 0
  end
  return (slot - t) * 1000
end

function response(status, headers, response_body)
  last_response = now()
  responses = responses + 1
  statuses[status] = (statuses[status] or 0) + 1
  if status >= 200 and status < 300 then
    ok2xx = ok2xx + 1
    -- a batch answer says how many events it accepted; a single-event answer does not
    local accepted = string.match(response_body, '"accepted"%s*:%s*(%d+)')
    accepted_events = accepted_events + (accepted and tonumber(accepted) or events_per_request)
  else
    non2xx = non2xx + 1
  end
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local totals = { sent = 0, responses = 0, ok2xx = 0, non2xx = 0, accepted_events = 0, late = 0 }
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
    string.format("late=%d", totals.late),
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
