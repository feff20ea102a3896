-- release.lua: give back a lease's concurrency slot and balance hold without charging.
--
-- Why one script: the slot, the hold and the key's running `held` total must change together,
-- and only once; a release racing a settle or another release of the same lease must not give
-- the hold back twice (which would let later admissions overspend the balance).
--
-- The Rust side of this contract (arguments in this order, the reply read) is
-- src/hot/scripts/release.rs. It calls lib/holds.lua and lib/lease_end.lua, which tollgate
-- prepends.
-- KEYS[1] state   HASH  key state
-- KEYS[2] live    ZSET  tracked live leases of the key
-- KEYS[3] holds   HASH  holds of the key's live leases
-- KEYS[4] lease   STRING this lease's tombstone (see settle.lua), or, for a lease id issued
--                 before sealed ids, its record
-- ARGV[1] lease nonce
-- ARGV[2] 'sealed': the lease id was opened by the caller (`hot/lease_id.rs`) and
--         ARGV[3] says whether it is tracked (1|0, see admit.lua; '=<hold>': tracked, in `live`
--         as '<nonce>=<hold>', its hold in its member, admit.lua's state format 2), ARGV[4]
--         how long its tombstone must live (ms: until the sealed id's deadline);
--         'record': a lease id issued before sealed ids, whose facts are in its record
--
-- Returns {'unknown'} | {'released'} | {'ended'}, or the error reply CORRUPT_STATE (the key's
-- state or the hold holds what no script writes; nothing was changed). Releasing twice, or
-- after a settle, is a no-op answered 'ended' (the HTTP API answers it like 'released'; an
-- access-log report counts it as a duplicate). A released lease can still be settled (usage
-- is never dropped): its tombstone 'R' tells settle.lua that the slot and hold went back.

local state, live, holds, lease = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local nonce = ARGV[1]
local sealed = ARGV[2] == 'sealed'
local tracked = true
local member_hold = sealed and string.sub(ARGV[3], 1, 1) == '='
local rec = false
if sealed then
  tracked = ARGV[3] ~= '0'
  -- Settled or released already: a read, so that a refusal below can still change nothing.
  if redis.call('EXISTS', lease) == 1 then return {'ended'} end
else
  rec = redis.call('GET', lease)
  if rec == false then return {'unknown'} end
  -- Settled ('S') or released ('R…') already.
  if string.sub(rec, 1, 1) ~= 'L' then return {'ended'} end
end

local s = redis.call('HMGET', state, 'id', 'held', 'htok')
local held, htok = tonumber(s[2] or 0), tonumber(s[3] or 0)
-- What HINCRBY adds to below must be whole, checked before the first write (a call refused
-- changes nothing; see settle.lua).
local function whole(n) return n and n == math.floor(n) end
if not (whole(held) and whole(htok)) then
  return redis.error_reply('CORRUPT_STATE a counter of the key state is not a whole number')
end
-- Nothing is held when `held` and `htok` are 0 (admit.lua's invariant). The hold is in the
-- sealed id when the lease's member carries it, else in `holds`.
local hold = false
local hn, ht = 0, 0
if tracked and (held ~= 0 or htok ~= 0) then
  if member_hold then hold = string.sub(ARGV[3], 2) else hold = redis.call('HGET', holds, nonce) end
  if hold then
    hn, ht = hold_of(hold)
    if hn == nil then
      return redis.error_reply('CORRUPT_STATE a hold is not a whole number')
    end
  end
end
-- Free the slot and the hold (lib/lease_end.lua).
if tracked then
  local changed
  local member = nonce
  if member_hold then member = nonce .. ARGV[3] end
  held, htok, changed = free_lease(live, holds, member, hold, not member_hold, hn, ht, held, htok,
    true)
  if changed and s[1] ~= false then
    redis.call('HSET', state, 'held', string.format('%d', held), 'htok',
      string.format('%d', htok))
  end
end
if sealed then
  redis.call('SET', lease, 'R', 'PX', ARGV[4])
else
  -- Still settleable: the record keeps its fields and its expiry.
  redis.call('SET', lease, 'R' .. string.sub(rec, 2), 'KEEPTTL')
end
return {'released'}
