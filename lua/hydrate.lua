-- hydrate.lua: write one key's configuration from Postgres into its Redis state, or remember
-- that a key hash is unknown.
--
-- Why one script: several writers race to hydrate the same key — a cache miss on one replica
-- reading a row, an admin PATCH on another, the reconciler re-pushing a version. A plain HSET
-- would let a stale reader overwrite a newer write. Here the row's version is compared and the
-- fields written in one step, so the newest configuration always wins; and the running
-- counters (used, held), which only Redis keeps current, are never clobbered. The numbers are
-- also folded into one field, `cfn` (lib/config.lua), which is what admit.lua reads.
--
-- The Rust side of this contract (arguments in this order, the reply read) is
-- src/hot/scripts/hydrate.rs. It calls lib/config.lua and lib/ring.lua, which tollgate
-- prepends.
-- KEYS[1] state   HASH
-- ARGV[1] 'key' | 'none'
-- for 'none':  ARGV[2] negative-cache TTL (ms)
-- for 'key':   ARGV[2] version   ARGV[3] key id   ARGV[4] user id   ARGV[5] active (1|0)
--              ARGV[6] expires_at ms ('' = never)
--              ARGV[7] providers   ARGV[8] api formats   ARGV[9] models  ('\31a\31b\31', '' = any)
--              ARGV[10] rate limit (-1 = unlimited)   ARGV[11] concurrent limit (-1 = unlimited)
--              ARGV[12] standalone (1|0; not stored: `bal` says it)
--              ARGV[13] balance nano-USD (-1 = none/unlimited)
--              ARGV[14] balance used nano-USD as synced to Postgres (seeds `used` only)
--              ARGV[15] token limit (-1 = unlimited)
--              ARGV[16] budget nano-USD (-1 = none)   ARGV[17] budget period ('' = never resets)
--              ARGV[18] the current period's spend as synced to Postgres, ARGV[19] that
--              period's start (ms): they seed the running `bsp`/`bps`, and replace them when
--              the period kind changes (the running spend was of another kind of period)
-- Returns 'written' | 'stale' | 'negative' | 'exists'
--
-- Never half-writes: every argument is checked before the first write; a call that fails a
-- check changes nothing and answers an error reply (see settle.lua): LIMIT_EXCEEDED for a
-- balance above 2^53 - 1 nano-USD (admit.lua compares balances as Lua numbers) or a `used`
-- seed above 2^62 nano-USD (settle.lua's lifetime bound), likewise a budget and a period
-- spend; INVALID_ARGUMENT for anything else
-- tollgate never sends (version 1 set the `none` marker, then failed on a bad TTL and left it
-- without an expiry); CORRUPT_STATE when the stored version is not a number.

local state = KEYS[1]
local MAX_BALANCE = 9007199254740991
local function refuse(code, why) return redis.error_reply(code .. ' ' .. why) end
-- A whole number, optionally signed, of at most 19 digits; its exact value if below 2^53.
local function whole(v)
  if type(v) ~= 'string' or string.find(v, '^%-?%d+$') == nil then return false end
  return #string.gsub(v, '^%-', '') <= 19
end
local function exact(v)
  if not whole(v) or #v > 17 then return nil end
  local n = tonumber(v)
  if n > MAX_BALANCE or n < -MAX_BALANCE then return nil end
  return n
end

if ARGV[1] == 'none' then
  local ttl = exact(ARGV[2])
  if ttl == nil or ttl < 1 then return refuse('INVALID_ARGUMENT', 'negative-cache ttl') end
  if redis.call('HEXISTS', state, 'id') == 1 then return 'exists' end
  redis.call('HSET', state, 'none', '1')
  redis.call('PEXPIRE', state, ttl)
  return 'negative'
end
if ARGV[1] ~= 'key' then return refuse('INVALID_ARGUMENT', 'mode') end

local version = exact(ARGV[2])
if version == nil or version < 0 then return refuse('INVALID_ARGUMENT', 'version') end
if ARGV[3] == nil or ARGV[3] == '' then return refuse('INVALID_ARGUMENT', 'key id') end
if ARGV[5] ~= '1' and ARGV[5] ~= '0' then return refuse('INVALID_ARGUMENT', 'active') end
if ARGV[12] ~= '1' and ARGV[12] ~= '0' then return refuse('INVALID_ARGUMENT', 'standalone') end
if ARGV[6] ~= '' and exact(ARGV[6]) == nil then return refuse('INVALID_ARGUMENT', 'expiry') end
for _, i in ipairs({10, 11}) do
  local n = exact(ARGV[i])
  -- 32-bit, as the columns are: lib/config.lua folds them into 4 bytes each.
  if n == nil or n < -1 or n > 2147483647 then return refuse('INVALID_ARGUMENT', 'limit ' .. i) end
end
for _, i in ipairs({7, 8, 9, 4}) do
  if type(ARGV[i]) ~= 'string' then return refuse('INVALID_ARGUMENT', 'argument ' .. i) end
end
if not whole(ARGV[13]) or (ARGV[13] ~= '-1' and string.sub(ARGV[13], 1, 1) == '-') then
  return refuse('INVALID_ARGUMENT', 'balance')
end
if exact(ARGV[13]) == nil then
  return refuse('LIMIT_EXCEEDED', 'balance above 2^53 - 1 nano-USD')
end
local used = ARGV[14]
if not whole(used) or string.sub(used, 1, 1) == '-' then
  return refuse('INVALID_ARGUMENT', 'used')
end
-- Above 2^62 (4611686018427387904; 19 digits, so a string comparison is a numeric one).
if #used > 19 or (#used == 19 and used > '4611686018427387904') then
  return refuse('LIMIT_EXCEEDED', 'used above 2^62 nano-USD')
end

local token_limit = exact(ARGV[15])
if token_limit == nil or token_limit < -1 then return refuse('INVALID_ARGUMENT', 'token limit') end
if not whole(ARGV[16]) or (ARGV[16] ~= '-1' and string.sub(ARGV[16], 1, 1) == '-') then
  return refuse('INVALID_ARGUMENT', 'budget')
end
if exact(ARGV[16]) == nil then return refuse('LIMIT_EXCEEDED', 'budget above 2^53 - 1 nano-USD') end
local period = ARGV[17]
if period ~= '' and period ~= 'day' and period ~= 'week' and period ~= 'month' then
  return refuse('INVALID_ARGUMENT', 'budget period')
end
local spent = ARGV[18]
if not whole(spent) or string.sub(spent, 1, 1) == '-' then
  return refuse('INVALID_ARGUMENT', 'period spend')
end
if #spent > 19 or (#spent == 19 and spent > '4611686018427387904') then
  return refuse('LIMIT_EXCEEDED', 'period spend above 2^62 nano-USD')
end
if ARGV[19] ~= '' and (exact(ARGV[19]) == nil or exact(ARGV[19]) < 0) then
  return refuse('INVALID_ARGUMENT', 'period start')
end

local current = redis.call('HGET', state, 'ver')
if current and tonumber(current) == nil then return refuse('CORRUPT_STATE', 'version') end
if current and tonumber(current) >= version then return 'stale' end

local old_period = redis.call('HGET', state, 'bper')
redis.call('HDEL', state, 'none')
-- Every argument is valid: from here on every call succeeds.
-- The configuration's numbers folded into one field for admit.lua (lib/config.lua), written
-- first, and on a new state followed by the cursor of an empty rate ring (`rw`,
-- lib/ring.lua: one that every tollgate reads as such, so no replica of a rolling upgrade
-- takes it for a corrupt one) and the version: a small hash is a listpack that HMGET searches
-- from its start, and these three are what every admission reads. The named fields follow.
local expires
if ARGV[6] ~= '' then expires = tonumber(ARGV[6]) end
local cfn = pack_config(version, tonumber(ARGV[5]), expires, tonumber(ARGV[10]),
  tonumber(ARGV[11]), tonumber(ARGV[13]), token_limit, tonumber(ARGV[16]), ARGV[17], ARGV[7],
  ARGV[8], ARGV[9])
if current then
  redis.call('HSET', state, 'cfn', cfn)
else
  -- The cursor of an empty ring (lib/ring.lua's format), what a missing cursor reads as.
  redis.call('HSET', state, 'cfn', cfn, 'rw', struct.pack(CURSOR, 0, 0, RING_MIN, 0, 0))
end
redis.call('HSET', state, 'ver', ARGV[2], 'id', ARGV[3], 'user', ARGV[4], 'act', ARGV[5],
  'exp', ARGV[6], 'prov', ARGV[7], 'fmt', ARGV[8], 'mdl', ARGV[9], 'rl', ARGV[10],
  'cl', ARGV[11], 'bal', ARGV[13], 'tl', ARGV[15], 'bud', ARGV[16], 'bper', ARGV[17])
redis.call('HSETNX', state, 'used', ARGV[14])
redis.call('HSETNX', state, 'held', '0')
if old_period ~= ARGV[17] then
  redis.call('HSET', state, 'bsp', ARGV[18], 'bps', ARGV[19])
else
  redis.call('HSETNX', state, 'bsp', ARGV[18])
  redis.call('HSETNX', state, 'bps', ARGV[19])
end
-- When this Redis first held the key's state: a settlement of a lease admitted before it may
-- repeat one whose charge `used` was seeded with (settle.lua flags it; see ack.lua).
local t = redis.call('TIME')
redis.call('HSETNX', state, 'born', string.format('%.0f', tonumber(t[1]) * 1000
  + math.floor(tonumber(t[2]) / 1000)))
redis.call('PERSIST', state)
return 'written'
