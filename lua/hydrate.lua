-- hydrate.lua: write one key's configuration from Postgres into its Redis state, or remember
-- that a key hash is unknown.
--
-- Why one script: several writers race to hydrate the same key — a cache miss on one replica
-- reading a row, an admin PATCH on another, the reconciler re-pushing a version. A plain HSET
-- would let a stale reader overwrite a newer write. Here the row's version is compared and the
-- fields written in one step, so the newest configuration always wins; and the running
-- counters (used, held), which only Redis keeps current, are never clobbered.
--
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

local state = KEYS[1]
if ARGV[1] == 'none' then
  if redis.call('HEXISTS', state, 'id') == 1 then return 'exists' end
  redis.call('HSET', state, 'none', '1')
  redis.call('PEXPIRE', state, tonumber(ARGV[2]))
  return 'negative'
end

local current = redis.call('HGET', state, 'ver')
if current and tonumber(current) >= tonumber(ARGV[2]) then return 'stale' end

local old_period = redis.call('HGET', state, 'bper')
redis.call('HDEL', state, 'none')
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
redis.call('PERSIST', state)
return 'written'
