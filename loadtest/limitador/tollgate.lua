-- tollgate.lua: wrk script for tollgate's data plane (run.sh), spreading requests uniformly at
-- random over the keys whose secrets are listed, one a line, in the file given as its first
-- argument. Second argument: "admit" (default) sends only `POST /v1/admit`, whose leases are
-- never settled (they expire, as for a caller that cannot report back); "flow" settles every
-- lease granted: each reply's lease id is queued and the next request settles it, so about
-- half the requests are settlements (flows/s = settlements/s).
--
--   wrk -t1 -c32 -d10s --latency -s tollgate.lua http://127.0.0.1:8080 -- keys.txt flow
local secrets = {}
local leases = {}
local json = { ["Content-Type"] = "application/json" }

-- Queues the lease of each granted admission for the next request to settle.
local function keep_lease(status, headers, body)
  local lease = body:match('"lease_id":"([^"]+)"')
  if lease and body:find('"allowed":true', 1, true) then leases[#leases + 1] = lease end
end

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then secrets[#secrets + 1] = line end
  end
  math.randomseed(os.time() + (tonumber(tostring({}):match("0x(%x+)"), 16) or 0))
  -- Only in flow mode: wrk hands every reply body to Lua once `response` exists (it checks
  -- after `init`), which the admit-only run must not pay for.
  if args[2] == "flow" then response = keep_lease end
end

function request()
  local lease = table.remove(leases)
  if lease then
    return wrk.format("POST", "/v1/settle", json, string.format(
      '{"lease_id":"%s","cost_usd":0.001,"input_tokens":120,"output_tokens":380,'
        .. '"response_time_ms":840,"status_code":200}', lease))
  end
  return wrk.format("POST", "/v1/admit", json, string.format(
    '{"key":"%s","provider":"openai","api_format":"openai:chat","model":"gpt-4o"}',
    secrets[math.random(#secrets)]))
end
