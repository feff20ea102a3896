-- admit_ring_no_record.lua: CANDIDATE, not tollgate — admit_no_record.lua with the rate log
-- replaced by ring_window.lua's ring, measured by `loadtest --script-cost-candidates`: the two
-- directions of issue #15 together (no lease record, O(1) exact window).
--
-- Calling convention of the candidates: KEYS[1] the key's state HASH, KEYS[2] this candidate's
-- ring STRING for that key (see ring_window.lua; its size is the state's `rl`, which the
-- harness sets to --normal-rate-limit); ARGV[1] window (ms), ARGV[2] limit (unused: `rl`),
-- ARGV[3] now (unused: Redis's TIME), ARGV[4] admission id (unused).
-- Returns {'ok', …15 fields as admit.lua…} or {'deny', code, retry_ms}.

local state, ring = KEYS[1], KEYS[2]
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
local head = redis.call('GETRANGE', ring, 0, 7)
local cursor = 0
if #head == 8 then cursor = struct.unpack('>d', head) end
local at = 8 + cursor * 8
local oldest = redis.call('GETRANGE', ring, at, at + 7)
if #oldest == 8 and struct.unpack('>d', oldest) > now - window then
  return {'deny', 'rate_limited', '1'}
end
redis.call('SETRANGE', ring, at, struct.pack('>d', now))
redis.call('SETRANGE', ring, 0, struct.pack('>d', (cursor + 1) % rl))
redis.call('PEXPIRE', ring, window)
return {'ok', s[1], s[13], int(rl), '-1', int(window), '-1', '0', '-1', '-1', '-1', '0', '-1',
  '-1', '-1'}
