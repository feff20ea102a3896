-- limitador.lua: wrk script for limitador's `POST /check_and_report` (run.sh), spreading the
-- checks uniformly at random over 1,000 keys, each its own counter (limits.yaml).
local keys = 1000

function init(args)
  -- Each wrk thread gets its own Lua state: seed it apart from the others.
  math.randomseed(os.time() + (tonumber(tostring({}):match("0x(%x+)"), 16) or 0))
end

function request()
  local body = string.format('{"namespace":"bench","values":{"key":"k%d"},"delta":1}',
    math.random(keys))
  return wrk.format("POST", "/check_and_report", { ["Content-Type"] = "application/json" }, body)
end
