-- admit.lua: decide one admission — key state, allow-lists, balance and holds, sliding-window
-- rate log, concurrency leases — and, only when every check passes, take a lease.
--
-- Why one script: the checks read and the grant writes the same counters. Done as separate
-- commands, concurrent requests (on any replica) would all pass the same check before any of
-- them wrote (check-then-act), so limits would leak under load. Inside one script Redis runs
-- nothing else, so "no interleaving can admit more than the limit" holds by construction, and
-- a denial writes nothing at all. The clock is Redis's TIME, shared by every replica.
--
-- All KEYS share the hash tag of the API key's shard, so the script runs unchanged on a cluster.
-- KEYS[1] state   HASH  key state (see hydrate.lua); missing = not hydrated; field none = unknown key
-- KEYS[2] rate    ZSET  admission log: member = lease nonce, score = admission time (ms)
-- KEYS[3] live    ZSET  live leases: member = lease nonce, score = lease expiry (ms)
-- KEYS[4] holds   HASH  lease nonce -> balance held by that lease (nano-USD)
-- KEYS[5] lease   STRING the new lease's record, read by settle.lua / release.lua:
--                 'L' .. cmsgpack(key id, user id, provider, api format, model, admitted at ms,
--                 expires at ms); release.lua turns the 'L' into 'R', settle.lua replaces the
--                 whole record with the tombstone 'S'. One string, so that writing it with its
--                 expiry is one command (SET … PX), and msgpack, so that no label can break it.
-- ARGV[1] rate window (ms)
-- ARGV[2] this lease's TTL (ms); 0 = admit without a lease: the rate log and the balance still
--         count, the concurrency limit and any hold do not, and nothing but the rate log is
--         written (for proxies that cannot report the end of a request)
-- ARGV[3] lease record TTL (ms): how long an expired lease can still be settled
-- ARGV[4] lease nonce (unique)
-- ARGV[5] provider ('' = not given)   ARGV[6] api format   ARGV[7] model
-- ARGV[8] reserve (nano-USD, >= 0)
--
-- Returns one of
--   {'miss'}                                       state not in Redis: hydrate, then retry
--   {'deny', code, retry_after_ms}
--   {'ok', key_id, user_id, rate_limit, rate_remaining, reset_ms, concurrent_limit,
--          in_flight, balance_available}              (-1 = unlimited / no balance)
-- Numbers cross as strings: Lua numbers are doubles, Redis integers are exact. They are printed
-- with '%.0f', never tostring(), which keeps only 14 digits (a balance of 100,000 USD is 1e14
-- nano-USD) and would hand the caller an unparsable '1e+14'.
--
-- Invariant: state.held is the sum of `holds`, and `holds` has an entry only for a lease in
-- `live`. `live` and `holds` are given the same expiry on every grant (the latest lease's), so
-- on a key left idle past its leases' TTL both vanish together, and a missing `live` means no
-- lease is live and nothing can be held.
--
-- Cost: every redis.call costs Redis about as much again as the command itself (arguments and
-- reply cross between Lua and Redis), so the script avoids calls whose answer it already knows:
-- an empty sorted set does not exist, so a count of 0 says a key is new; `held` = 0 says
-- `holds` is empty.

local state, rate, live, holds, lease = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local window = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local nonce = ARGV[4]
local leased = ttl > 0
local reserve = tonumber(ARGV[8])
if not leased then reserve = 0 end
local function int(n) return string.format('%.0f', n) end

local s = redis.call('HMGET', state, 'id', 'none', 'act', 'exp', 'prov', 'fmt', 'mdl',
  'rl', 'cl', 'bal', 'used', 'held', 'user')
if s[1] == false then
  if s[2] ~= false then return {'deny', 'key_invalid', '0'} end
  return {'miss'}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

if s[3] ~= '1' then return {'deny', 'key_disabled', '0'} end
if s[4] ~= '' and now >= tonumber(s[4]) then return {'deny', 'key_expired', '0'} end

-- Allow-lists are stored as '\31a\31b\31'; '' means unrestricted.
-- A value holding the separator could span several entries ('a\31b' matches '\31a\31b\31').
local function allowed(list, value)
  if list == '' then return true end
  if value == '' or string.find(value, '\31', 1, true) then return false end
  return string.find(list, '\31' .. value .. '\31', 1, true) ~= nil
end
if not allowed(s[5], ARGV[5]) then return {'deny', 'provider_not_allowed', '0'} end
if not allowed(s[6], ARGV[6]) then return {'deny', 'api_format_not_allowed', '0'} end
if not allowed(s[7], ARGV[7]) then return {'deny', 'model_not_allowed', '0'} end

-- Expired leases give back their slot and hold before anything is counted. Bounded per call;
-- leftovers are only counted conservatively (their hold stays held) until the next call.
local held = tonumber(s[12]) or 0
local expired = redis.call('ZRANGEBYSCORE', live, '-inf', now, 'LIMIT', 0, 64)
for _, m in ipairs(expired) do
  local h = redis.call('HGET', holds, m)
  if h then
    held = held - tonumber(h)
    redis.call('HDEL', holds, m)
  end
  redis.call('ZREM', live, m)
end
local repaired = #expired > 0
-- No live lease left: nothing is held. This is also where the holds of an idle key's leases
-- come back when `live` and `holds` expired as whole keys and the loop above saw nothing.
if held ~= 0 and redis.call('EXISTS', live) == 0 then
  held = 0
  redis.call('DEL', holds)
  repaired = true
end
if repaired then redis.call('HSET', state, 'held', int(held)) end

local bal = tonumber(s[10])
local available = -1
if bal >= 0 then
  available = bal - tonumber(s[11]) - held
  if available <= 0 or available < reserve then
    return {'deny', 'balance_exhausted', '0'}
  end
end

local rl = tonumber(s[8])
local remaining = -1
local reset = 0
local count = 0
if rl > 0 then
  redis.call('ZREMRANGEBYSCORE', rate, '-inf', now - window)
  count = redis.call('ZCARD', rate)
  if count >= rl then
    local oldest = redis.call('ZRANGE', rate, 0, 0, 'WITHSCORES')
    local retry = tonumber(oldest[2]) + window - now
    if retry < 1 then retry = 1 end
    return {'deny', 'rate_limited', int(retry)}
  end
  remaining = rl - count - 1
end

local cl = tonumber(s[9])
local in_flight = redis.call('ZCARD', live)
if leased and cl > 0 and in_flight >= cl then
  local soonest = redis.call('ZRANGE', live, 0, 0, 'WITHSCORES')
  local retry = tonumber(soonest[2]) - now
  if retry > 1000 then retry = 1000 end
  if retry < 1 then retry = 1 end
  return {'deny', 'concurrency_limited', int(retry)}
end

-- Every check passed: grant. Expiries only ever move later (GT), so a replica configured with
-- a shorter window or TTL cannot drop entries another replica still counts. GT leaves a key
-- without an expiry as it is, so a key this grant creates gets its expiry plainly; every key
-- created here gets one at once, so an existing key always has one.
local function expire(key, existed, ms)
  if existed then
    redis.call('PEXPIRE', key, ms, 'GT')
  else
    redis.call('PEXPIRE', key, ms)
  end
end
if rl > 0 then
  redis.call('ZADD', rate, now, nonce)
  expire(rate, count > 0, window)
  if count > 0 then
    local oldest = redis.call('ZRANGE', rate, 0, 0, 'WITHSCORES')
    reset = tonumber(oldest[2]) + window - now
  else
    reset = window
  end
end
if not leased then
  return {'ok', s[1], s[13], int(rl), int(remaining), int(reset), int(cl),
    int(in_flight), int(available)}
end
redis.call('ZADD', live, now + ttl, nonce)
expire(live, in_flight > 0, ttl)
if bal >= 0 and reserve > 0 then
  redis.call('HSET', holds, nonce, int(reserve))
  redis.call('HINCRBY', state, 'held', int(reserve))
  available = available - reserve
  -- Exactly `live`'s expiry (see the invariant above), which may be later than this TTL.
  redis.call('PEXPIRE', holds, redis.call('PTTL', live))
elseif held ~= 0 then
  -- `holds` had `live`'s expiry before this grant; GT moves both the same way.
  redis.call('PEXPIRE', holds, ttl, 'GT')
end
redis.call('SET', lease, 'L' .. cmsgpack.pack(s[1], s[13], ARGV[5], ARGV[6], ARGV[7], int(now),
  int(now + ttl)), 'PX', ARGV[3])

return {'ok', s[1], s[13], int(rl), int(remaining), int(reset), int(cl),
  int(in_flight + 1), int(available)}
