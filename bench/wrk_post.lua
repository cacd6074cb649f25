-- wrk script for the overhead harness (bench/overhead.py): POST a small non-streamed chat
-- completion with a JSON body and, when BENCH_API_KEY is set, an Authorization header; at the
-- end print one line "WRK_JSON {...}" with the counts and latency percentiles (microseconds).
--
--   BENCH_API_KEY=sk-... wrk -t1 -c64 -d10s -s bench/wrk_post.lua http://127.0.0.1:8000/v1/chat/completions

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
  or '{"model":"fake","messages":[{"role":"user","content":"Say hello"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_API_KEY")
if key ~= nil and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.2f,"p50":%d,"p90":%d,"p99":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
