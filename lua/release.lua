-- release.lua: give back a lease's concurrency slot and balance hold without charging.
--
-- Why one script: the slot, the hold and the key's running `held` total must change together,
-- and only once; a release racing a settle or another release of the same lease must not give
-- the hold back twice (which would let later admissions overspend the balance).
--
-- KEYS[1] state   HASH  key state
-- KEYS[2] live    ZSET  live leases of the key
-- KEYS[3] holds   HASH  holds of the key's live leases
-- KEYS[4] lease   STRING this lease's record (see admit.lua)
-- ARGV[1] lease nonce
--
-- Returns {'unknown'} | {'released'} | {'ended'}. Releasing twice, or after a settle, is a
-- no-op answered 'ended' (the HTTP API answers it like 'released'; an access-log report counts
-- it as a duplicate). A released lease can still be settled (usage is never dropped).

local state, live, holds, lease = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local nonce = ARGV[1]

local rec = redis.call('GET', lease)
if rec == false then return {'unknown'} end
-- Settled ('S') or released ('R…') already.
if string.sub(rec, 1, 1) ~= 'L' then return {'ended'} end

local s = redis.call('HMGET', state, 'id', 'held', 'htok')
local held = tonumber(s[2]) or 0
local htok = tonumber(s[3]) or 0
-- Nothing is held when `held` and `htok` are 0 (admit.lua's invariant). A hold is 'nanos' or
-- 'nanos:tokens'.
if redis.call('ZREM', live, nonce) == 1 and (held ~= 0 or htok ~= 0) then
  local h = redis.call('HGET', holds, nonce)
  if h then
    redis.call('HDEL', holds, nonce)
    if s[1] ~= false then
      local hn, ht = string.match(h, '^(%-?%d+):(%d+)$')
      if hn then hn, ht = tonumber(hn), tonumber(ht) else hn, ht = tonumber(h), 0 end
      if hn ~= 0 then redis.call('HINCRBY', state, 'held', -hn) end
      if ht ~= 0 then redis.call('HINCRBY', state, 'htok', -ht) end
      held = held - hn
      htok = htok - ht
    end
  end
end
if (held ~= 0 or htok ~= 0) and redis.call('EXISTS', live) == 0 then
  redis.call('HSET', state, 'held', 0, 'htok', 0)
  redis.call('DEL', holds)
end
-- Still settleable: the record keeps its fields and its expiry.
redis.call('SET', lease, 'R' .. string.sub(rec, 2), 'KEEPTTL')
return {'released'}
