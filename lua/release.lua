-- release.lua: give back a lease's concurrency slot and balance hold without charging.
--
-- Why one script: the slot, the hold and the key's running `held` total must change together,
-- and only once; a release racing a settle or another release of the same lease must not give
-- the hold back twice (which would let later admissions overspend the balance).
--
-- KEYS[1] state   HASH  key state
-- KEYS[2] live    ZSET  live leases of the key
-- KEYS[3] holds   HASH  holds of the key's live leases
-- KEYS[4] lease   HASH  this lease's record
-- ARGV[1] lease nonce
--
-- Returns {'unknown'} | {'released'}. Releasing twice, or after a settle, is a no-op that
-- still answers 'released'. A released lease can still be settled (usage is never dropped).

local state, live, holds, lease = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local nonce = ARGV[1]

local r = redis.call('HMGET', lease, 's', 'id')
if r[1] == false and r[2] == false then return {'unknown'} end
if r[1] ~= false then return {'released'} end

if redis.call('ZREM', live, nonce) == 1 then
  local h = redis.call('HGET', holds, nonce)
  if h then
    redis.call('HDEL', holds, nonce)
    if redis.call('EXISTS', state) == 1 then redis.call('HINCRBY', state, 'held', -tonumber(h)) end
  end
end
-- No live lease left: nothing is held (admit.lua's invariant; repairs an idle key's `held`).
if redis.call('EXISTS', live) == 0 then
  local stale = redis.call('HGET', state, 'held')
  if stale and stale ~= '0' then
    redis.call('HSET', state, 'held', 0)
    redis.call('DEL', holds)
  end
end
redis.call('HSET', lease, 's', 'released')
return {'released'}
