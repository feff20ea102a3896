-- admit_no_record.lua: CANDIDATE, not tollgate — a plain-key admission that writes no lease
-- record and does not touch the live-lease set, measured by `loadtest --script-cost-candidates`.
--
-- Why: issue #15's "leases that need no record" (the lease id carries, sealed, what settlement
-- needs) and "a key with no concurrency limit and no hold need not touch the live set". What
-- is left is what such an admission must still do: read the key's state (the same HMGET as
-- admit.lua), take Redis's clock, and run the exact window on the rate log. The reply has
-- admit.lua's shape and size; the checks on a plain key's state (active, expiry) are kept.
--
-- Calling convention of the candidates: KEYS[1] the key's state HASH, KEYS[2] this candidate's
-- own rate log (ZSET) for that key; ARGV[1] window (ms), ARGV[2] limit (unused: the state's
-- `rl` decides, as in admit.lua), ARGV[3] now (unused: Redis's TIME, as in admit.lua),
-- ARGV[4] admission id (the rate log's member).
-- Returns {'ok', …15 fields as admit.lua…} or {'deny', code, retry_ms}.

local state, rate = KEYS[1], KEYS[2]
local window = tonumber(ARGV[1])
local function int(n) return string.format('%.0f', n) end
local s = redis.call('HMGET', state, 'id', 'none', 'act', 'exp', 'prov', 'fmt', 'mdl',
  'rl', 'cl', 'bal', 'used', 'held', 'user', 'tl', 'wtok', 'htok', 'bud', 'bper', 'bsp', 'bps')
if s[1] == false then return {'miss'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if s[3] ~= '1' then return {'deny', 'key_disabled', '0'} end
if s[4] ~= '' and now >= tonumber(s[4]) then return {'deny', 'key_expired', '0'} end
local rl = tonumber(s[8])
redis.call('ZREMRANGEBYSCORE', rate, '-inf', now - window)
local count = redis.call('ZCARD', rate)
if count >= rl then return {'deny', 'rate_limited', '1'} end
redis.call('ZADD', rate, now, ARGV[4])
redis.call('PEXPIRE', rate, window)
return {'ok', s[1], s[13], int(rl), int(rl - count - 1), int(window), '-1', '0', '-1', '-1',
  '-1', '0', '-1', '-1', '-1'}
