-- wrk script shared by every row of compare.sh.
--
-- Environment (read in every wrk Lua state):
--   BENCH_MODE   etcd-put | etcd-range | etcd-range-serializable |
--                raftwasm-set | raftwasm-get-linearizable | raftwasm-get-stale
--   BENCH_KEYS   size of the key space (keys key-000000000000 .. key-(N-1));
--                reads assume compare.sh preloaded all of them
--   BENCH_LABEL  label echoed in the result line
--
-- Keys are 16 bytes ("key-" + 12 digits), values 100 bytes; every request
-- picks a key uniformly at random. done() prints one machine-readable line:
--   BENCHRESULT label=.. requests=.. seconds=.. rps=.. ok_rps=.. p50_ms=..
--               p99_ms=.. max_ms=.. status_errors=.. socket_errors=..

local mode  = os.getenv("BENCH_MODE") or "raftwasm-set"
local nkeys = tonumber(os.getenv("BENCH_KEYS") or "10000")
local label = os.getenv("BENCH_LABEL") or mode

local VALUE = string.sub(string.rep("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", 2), 1, 100)

local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function base64(s)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = string.byte(s, i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local c1 = math.floor(n / 262144) % 64
    local c2 = math.floor(n / 4096) % 64
    local c3 = math.floor(n / 64) % 64
    local c4 = n % 64
    out[#out + 1] = string.sub(b64chars, c1 + 1, c1 + 1)
    out[#out + 1] = string.sub(b64chars, c2 + 1, c2 + 1)
    out[#out + 1] = b and string.sub(b64chars, c3 + 1, c3 + 1) or "="
    out[#out + 1] = c and string.sub(b64chars, c4 + 1, c4 + 1) or "="
  end
  return table.concat(out)
end

local function key_of(i)
  return string.format("key-%012d", i)
end

-- setup() runs in the main state once per thread: give each thread an id so
-- the threads draw different random sequences.
local thread_count = 0
function setup(thread)
  thread_count = thread_count + 1
  thread:set("tid", thread_count)
end

local reqs = {}          -- one prebuilt request per key
local headers_json = { ["Content-Type"] = "application/json" }

function init(args)
  math.randomseed(os.time() * 1000 + (tonumber(tid) or 0) * 7919)
  for _ = 1, 10 do math.random() end
  local vb64 = base64(VALUE)
  for i = 0, nkeys - 1 do
    local k = key_of(i)
    local r
    if mode == "etcd-put" then
      r = wrk.format("POST", "/v3/kv/put", headers_json,
        '{"key":"' .. base64(k) .. '","value":"' .. vb64 .. '"}')
    elseif mode == "etcd-range" then
      r = wrk.format("POST", "/v3/kv/range", headers_json,
        '{"key":"' .. base64(k) .. '"}')
    elseif mode == "etcd-range-serializable" then
      r = wrk.format("POST", "/v3/kv/range", headers_json,
        '{"key":"' .. base64(k) .. '","serializable":true}')
    elseif mode == "raftwasm-set" then
      r = wrk.format("GET", "/set?key=" .. k .. "&value=" .. VALUE)
    elseif mode == "raftwasm-get-linearizable" then
      r = wrk.format("GET", "/get?key=" .. k .. "&consistency=linearizable")
    elseif mode == "raftwasm-get-stale" then
      r = wrk.format("GET", "/get?key=" .. k .. "&consistency=stale")
    else
      error("unknown BENCH_MODE " .. tostring(mode))
    end
    reqs[i + 1] = r
  end
end

function request()
  return reqs[math.random(nkeys)]
end

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  local socket_errors = e.connect + e.read + e.write + e.timeout
  io.write(string.format(
    "BENCHRESULT label=%s requests=%d seconds=%.3f rps=%.1f ok_rps=%.1f p50_ms=%.3f p99_ms=%.3f max_ms=%.3f status_errors=%d socket_errors=%d\n",
    label, summary.requests, secs, summary.requests / secs,
    (summary.requests - e.status) / secs,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, e.status, socket_errors))
end
