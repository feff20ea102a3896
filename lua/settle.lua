-- settle.lua: charge a lease's real cost, free its slot and hold, and append its usage event
-- to the shard's stream — or recognise a duplicate.
--
-- Why one script: the charge, the release of the hold and the usage record must happen
-- together or not at all. Were the charge and the XADD separate commands, a crash between them
-- would either charge without a record (usage lost from Postgres) or record without a charge;
-- and two concurrent settles of one lease could both pass a "not settled yet" check. The
-- tombstone written here makes a retried settle a no-op, so nothing is charged twice.
--
-- KEYS[1] state   HASH  key state (may be gone if the key was deleted: the event is still kept)
-- KEYS[2] live    ZSET  live leases of the key
-- KEYS[3] holds   HASH  holds of the key's live leases
-- KEYS[4] lease   STRING this lease's record (see admit.lua): 'L…' live, 'R…' released,
--                 'S' settled (the tombstone)
-- KEYS[5] stream  STREAM the shard's usage stream, drained into Postgres by the syncer
-- KEYS[6] tokens  ZSET  the key's token window (see admit.lua): a key with a token limit gets
--                 this settlement's total tokens, at this instant
-- ARGV[1] cost (nano-USD), or '?': not known yet, the caller prices it from the tokens: answer
--         the provider and model it is priced for, and write nothing
-- ARGV[2] input tokens   ARGV[3] output tokens
-- ARGV[4] total tokens (-1 = input + output; tollgate itself always sends the sum, which it
--         computes exactly in Rust)   ARGV[5] response time ms (-1 = unknown)
-- ARGV[6] status code (-1 = unknown)
-- ARGV[7] provider   ARGV[8] api format   ARGV[9] model   ('=' prefix = given, '' = use the lease's)
-- ARGV[10] tombstone TTL (ms): how long a settled lease is remembered for duplicate detection
-- ARGV[11] lease id (the event's idempotency id in Postgres)
-- ARGV[12] 'any': settle a live or released lease (the gateway's /v1/settle: usage is never
--         dropped); 'live': a released lease is a duplicate (an access-log report, which may
--         arrive after the gateway or the proxy already ended the lease)
-- ARGV[13] rate window (ms): how long settled tokens count against a token limit
-- ARGV[14..21] only for a lease granted in fail-open mode, which has no record because Redis
--         was down when it was granted: 'failopen', key id, user id, provider, api format,
--         model, admitted at (ms), expires at (ms) — the record's fields, from the granting
--         process's memory.
--
-- Returns {'unknown'} | {'duplicate', available} | {'settled', lease_expired(0|1), available}
--   | {'price', provider, model} (ARGV[1] '?')
-- Numbers are printed with '%.0f': tostring() keeps only 14 digits (see admit.lua).

local state, live, holds, lease, stream, tokens = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5],
  KEYS[6]
local nonce = string.sub(ARGV[11], string.find(ARGV[11], '.', 1, true) + 1)
local function int(n) return string.format('%.0f', n) end
-- A hold is 'nanos' or 'nanos:tokens' (admit.lua).
local function hold_of(h)
  local n, t = string.match(h, '^(%-?%d+):(%d+)$')
  if n then return tonumber(n), tonumber(t) end
  return tonumber(h), 0
end

local rec = redis.call('GET', lease)
-- Everything this script needs of the key's state, in one read; `bal` missing = not hydrated.
local s = redis.call('HMGET', state, 'id', 'bal', 'used', 'held', 'none', 'htok', 'tl', 'bud',
  'bper', 'bps')
local hydrated = s[1] ~= false
local used = tonumber(s[3]) or 0
local held = tonumber(s[4]) or 0
local htok = tonumber(s[6]) or 0
local function available()
  if s[2] == false or s[5] ~= false or tonumber(s[2]) < 0 then return '-1' end
  local a = tonumber(s[2]) - used - held
  if a < 0 then a = 0 end
  return int(a)
end

-- r: key id, user id, provider, api format, model, admitted at, expires at
local r
if rec == 'S' then return {'duplicate', available()} end
if ARGV[12] == 'live' and rec ~= false and string.sub(rec, 1, 1) == 'R' then
  return {'duplicate', available()}
end
if rec == false then
  if ARGV[14] ~= 'failopen' then return {'unknown'} end
  r = {ARGV[15], ARGV[16], ARGV[17], ARGV[18], ARGV[19], ARGV[20], ARGV[21]}
else
  r = {cmsgpack.unpack(string.sub(rec, 2))}
end

local function pick(given, from_lease)
  if string.sub(given, 1, 1) == '=' then return string.sub(given, 2) end
  return from_lease
end
if ARGV[1] == '?' then return {'price', pick(ARGV[7], r[3]), pick(ARGV[9], r[5])} end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Free the slot and hold (a released lease has given them back already). Nothing is held
-- when `held` and `htok` are 0 (admit.lua's invariant), so `holds` is only read when it can
-- matter.
if redis.call('ZREM', live, nonce) == 1 and (held ~= 0 or htok ~= 0) then
  local h = redis.call('HGET', holds, nonce)
  if h then
    redis.call('HDEL', holds, nonce)
    if hydrated then
      local hn, ht = hold_of(h)
      if hn ~= 0 then redis.call('HINCRBY', state, 'held', -hn) end
      if ht ~= 0 then redis.call('HINCRBY', state, 'htok', -ht) end
      held = held - hn
      htok = htok - ht
    end
  end
end
-- No live lease left: nothing is held (admit.lua's invariant). Repairs `held` when the lease
-- keys of an idle key expired whole, so the balance answered below is right.
if (held ~= 0 or htok ~= 0) and redis.call('EXISTS', live) == 0 then
  redis.call('HSET', state, 'held', 0, 'htok', 0)
  redis.call('DEL', holds)
  held = 0
end
local expired = '0'
if now >= tonumber(r[7]) then expired = '1' end

local cost = ARGV[1]
if hydrated then
  redis.call('HINCRBY', state, 'used', cost)
  used = used + tonumber(cost)
end

local input, output, total = ARGV[2], ARGV[3], ARGV[4]
if total == '-1' then total = int(tonumber(input) + tonumber(output)) end

-- The token window of a key with a token limit.
if hydrated and (tonumber(s[7]) or -1) > 0 and total ~= '0' then
  redis.call('ZADD', tokens, now, nonce .. ':' .. total)
  redis.call('PEXPIRE', tokens, ARGV[13])
  redis.call('HINCRBY', state, 'wtok', total)
end

-- The spend of the budget's current period, started again when the period turned (the same
-- UTC boundaries as admit.lua).
local budget_period = s[9] or ''
if hydrated and (tonumber(s[8]) or -1) >= 0 and budget_period ~= '' then
  local DAY = 86400000
  local function days_from_civil(y, m, d)
    if m <= 2 then y = y - 1 end
    local era = math.floor(y / 400)
    local yoe = y - era * 400
    local mp = m > 2 and m - 3 or m + 9
    local doy = math.floor((153 * mp + 2) / 5) + d - 1
    local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
    return era * 146097 + doe - 719468
  end
  local day = math.floor(now / DAY)
  local first = day
  if budget_period == 'week' then
    first = day - (day + 3) % 7
  elseif budget_period == 'month' then
    local z = day + 719468
    local era = math.floor(z / 146097)
    local doe = z - era * 146097
    local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
      - math.floor(doe / 146096)) / 365)
    local y = yoe + era * 400
    local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
    local mp = math.floor((5 * doy + 2) / 153)
    local m = mp < 10 and mp + 3 or mp - 9
    if m <= 2 then y = y + 1 end
    first = days_from_civil(y, m, 1)
  end
  local start = int(first * DAY)
  if s[10] == start then
    redis.call('HINCRBY', state, 'bsp', cost)
  else
    redis.call('HSET', state, 'bsp', cost, 'bps', start)
  end
end

redis.call('XADD', stream, '*',
  'e', ARGV[11], 'k', r[1], 'u', r[2], 'c', cost,
  'it', input, 'ot', output, 'tt', total, 'rt', ARGV[5], 'sc', ARGV[6],
  'p', pick(ARGV[7], r[3]), 'f', pick(ARGV[8], r[4]), 'm', pick(ARGV[9], r[5]),
  'at', r[6], 'ts', now, 'x', expired)

-- The record becomes a tombstone that only answers "duplicate".
redis.call('SET', lease, 'S', 'PX', ARGV[10])

return {'settled', expired, available()}
