-- admit.lua: decide one admission — key state, allow-lists, balance and holds, spend budget,
-- sliding-window rate log, token window, concurrency leases — and, only when every check
-- passes, take a lease.
--
-- Why one script: the checks read and the grant writes the same counters. Done as separate
-- commands, concurrent requests (on any replica) would all pass the same check before any of
-- them wrote (check-then-act), so limits would leak under load. Inside one script Redis runs
-- nothing else, so "no interleaving can admit more than the limit" holds by construction, and
-- a denial writes nothing at all. The clock is Redis's TIME, shared by every replica.
--
-- All KEYS share the hash tag of the API key's shard, so the script runs unchanged on a cluster.
-- The Rust side of this contract (arguments in this order, the reply read) is
-- src/hot/scripts/admit.rs. It calls lib/calendar.lua and lib/holds.lua, which
-- tollgate prepends.
-- KEYS[1] state   HASH  key state (see hydrate.lua); missing = not hydrated; field none = unknown key
-- KEYS[2] rate    ZSET  admission log: member = lease nonce, score = admission time (ms)
-- KEYS[3] live    ZSET  tracked live leases: member = lease nonce, score = lease expiry (ms)
-- KEYS[4] holds   HASH  lease nonce -> what that lease holds: nano-USD, or 'nanos:tokens' when
--                 it also holds tokens (reserve_tokens)
-- KEYS[5] tokens  ZSET  token window: member = 'nonce:total_tokens' of a settlement, score = its
--                 time (ms); state.wtok is the sum of the members' tokens (settle.lua adds)
-- ARGV[1] rate window (ms)
-- ARGV[2] this lease's TTL (ms); 0 = admit without a lease: the rate log and the balance still
--         count, the concurrency limit and any hold do not, and nothing but the rate log is
--         written (for proxies that cannot report the end of a request)
-- ARGV[3] lease nonce (unique)
-- ARGV[4] provider ('' = not given)   ARGV[5] api format   ARGV[6] model
-- ARGV[7] reserve (nano-USD, >= 0)
-- ARGV[8] reserve tokens (>= 0)
--
-- No lease record is written: the caller seals what settlement needs (key, labels, times,
-- whether the lease is tracked) into the lease id (`hot/lease_id.rs`), and settle.lua and
-- release.lua get those facts from it. A lease is *tracked* — in `live`, and in `holds` when it
-- holds something — only when the key has a concurrency limit or the lease holds balance or
-- tokens: a key with neither has nothing a live lease could change, so its admission touches
-- neither set.
--
-- Returns one of
--   {'miss'}                                       state not in Redis: hydrate, then retry
--   {'deny', code, retry_after_ms}
--   {'ok', key_id, user_id, rate_limit, rate_remaining, reset_ms, concurrent_limit,
--          in_flight, balance_available, now_ms, tracked (1|0), token_limit,
--          tokens_remaining, tokens_reset_ms, budget, budget_remaining, budget_resets_at_ms}
--                                                   (-1 = unlimited / none / never; the last
--                                                   six only for a key with a token limit or
--                                                   a budget; in_flight is 0 for a key without
--                                                   a concurrency limit: nothing counts them)
--   or the error reply CORRUPT_STATE: the key's state or a hold holds what no script writes
--
-- Never half-writes (see settle.lua): the state's numbers and the holds of expired leases are
-- checked before the first write. The arguments are not: their one writer is the typed
-- builder in `hot/admission.rs`, which refuses lease TTLs outside 1 ms to a year, a reserve
-- above 2^53 - 1 nano-USD and reserved tokens above 2^53 - 1 before any call. Checks here are
-- plain `tonumber`s of values the script reads anyway, no pattern matches: this is the call
-- on every request's path.
--
-- Numbers cross as strings: Lua numbers are doubles, Redis integers are exact. They are printed
-- with '%.0f', never tostring(), which keeps only 14 digits (a balance of 100,000 USD is 1e14
-- nano-USD) and would hand the caller an unparsable '1e+14'.
--
-- Invariant: state.held is the sum of the nano-USD of `holds` (state.htok of their tokens),
-- and `holds` has an entry only for a lease in `live`; every hold is positive, so `held` = 0
-- and `htok` = 0 say that no lease holds anything. `live` and `holds` are given the same
-- expiry on every grant (the latest lease's), so on a key left idle past its leases' TTL both
-- vanish together, and a missing `live` means no lease is live and nothing can be held.
--
-- Cost: every redis.call costs Redis about as much again as the command itself (arguments and
-- reply cross between Lua and Redis), so the script avoids calls whose answer it already knows:
-- an empty sorted set does not exist, so a count of 0 says a key is new; `held` = 0 says
-- `holds` is empty.

local state, rate, live, holds, tokens = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local window = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local nonce = ARGV[3]
local provider, api_format, model = ARGV[4], ARGV[5], ARGV[6]
local leased = ttl > 0
local reserve = tonumber(ARGV[7])
local reserve_tokens = tonumber(ARGV[8])
if not leased then
  reserve = 0
  reserve_tokens = 0
end
local function int(n) return string.format('%.0f', n) end

-- The key's state, one read, each field in a named local (hydrate.lua names them).
local key_id, unknown, active, expires, providers, formats, models, rl, cl, bal, used, held,
  user_id, token_limit, wtok, htok, budget, budget_period, period_spend, period_start =
  unpack(redis.call('HMGET', state, 'id', 'none', 'act', 'exp', 'prov', 'fmt', 'mdl', 'rl',
    'cl', 'bal', 'used', 'held', 'user', 'tl', 'wtok', 'htok', 'bud', 'bper', 'bsp', 'bps'))
if key_id == false then
  if unknown ~= false then return {'deny', 'key_invalid', '0'} end
  return {'miss'}
end
-- Every number of the state, read once; a field that is not one is state no script writes,
-- refused before the first write (below, the expired-lease repair). `held`, `htok` and `wtok`
-- must also be whole: HINCRBY adds to them.
rl, cl, bal, used = tonumber(rl), tonumber(cl), tonumber(bal), tonumber(used)
held, htok, wtok = tonumber(held or 0), tonumber(htok or 0), tonumber(wtok or 0)
token_limit, budget = tonumber(token_limit or -1), tonumber(budget or -1)
budget_period = budget_period or ''
if not (rl and cl and bal and used and held and htok and wtok and token_limit and budget)
  or held % 1 ~= 0 or htok % 1 ~= 0 or wtok % 1 ~= 0
  or (expires ~= '' and not tonumber(expires)) then
  return redis.error_reply('CORRUPT_STATE a field of the key state is not a number')
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

if active ~= '1' then return {'deny', 'key_disabled', '0'} end
if expires ~= '' and now >= tonumber(expires) then return {'deny', 'key_expired', '0'} end

-- Allow-lists are stored as '\31a\31b\31'; '' means unrestricted.
-- A value holding the separator could span several entries ('a\31b' matches '\31a\31b\31').
local function allowed(list, value)
  if list == '' then return true end
  if value == '' or string.find(value, '\31', 1, true) then return false end
  return string.find(list, '\31' .. value .. '\31', 1, true) ~= nil
end
if not allowed(providers, provider) then return {'deny', 'provider_not_allowed', '0'} end
if not allowed(formats, api_format) then return {'deny', 'api_format_not_allowed', '0'} end
if not allowed(models, model) then return {'deny', 'model_not_allowed', '0'} end

-- Expired leases give back their slot and hold before anything is counted. Bounded per call;
-- leftovers are only counted conservatively (their hold stays held) until the next call.
-- Their holds are read and checked first, so that a corrupt one refuses the call before the
-- first write. Only where they can matter: with no concurrency limit and nothing held, an
-- expired entry of `live` changes no answer (it leaves with `live`'s expiry, or with the
-- next call that scans).
local expired = {}
if cl > 0 or held ~= 0 or htok ~= 0 then
  expired = redis.call('ZRANGEBYSCORE', live, '-inf', now, 'LIMIT', 0, 64)
end
local expired_holds = #expired > 0 and {}
for i, m in ipairs(expired) do
  local h = false
  if held ~= 0 or htok ~= 0 then h = redis.call('HGET', holds, m) end
  if h then
    local hn, ht = hold_of(h)
    if hn == nil then
      return redis.error_reply('CORRUPT_STATE a hold is not a whole number')
    end
    held = held - hn
    htok = htok - ht
    expired_holds[i] = true
  end
end
for i, m in ipairs(expired) do
  if expired_holds[i] then redis.call('HDEL', holds, m) end
end
if #expired > 0 then redis.call('ZREM', live, unpack(expired)) end
local repaired = #expired > 0
-- No live lease left: nothing is held. This is also where the holds of an idle key's leases
-- come back when `live` and `holds` expired as whole keys and the loop above saw nothing.
if (held ~= 0 or htok ~= 0) and redis.call('EXISTS', live) == 0 then
  held = 0
  htok = 0
  redis.call('DEL', holds)
  repaired = true
end
if repaired then redis.call('HSET', state, 'held', int(held), 'htok', int(htok)) end

local available = -1
if bal >= 0 then
  available = bal - used - held
  if available <= 0 or available < reserve then
    return {'deny', 'balance_exhausted', '0'}
  end
end

-- Spend budget: the period's settled spend (0 once the period turned: settle.lua starts it
-- again) plus holds, against the budget; a budget that never resets counts all spend (`used`).
local budget_remaining, budget_resets = -1, -1
if budget >= 0 then
  local spent = used
  if budget_period ~= '' then
    -- The period `now` falls in (lib/calendar.lua).
    local first, after = period_bounds(budget_period, now)
    spent = 0
    if tonumber(period_start or '') == first then spent = tonumber(period_spend) or 0 end
    budget_resets = after
  end
  if spent + held >= budget or spent + held + reserve > budget then
    local retry = 0
    if budget_resets >= 0 then retry = budget_resets - now end
    return {'deny', 'budget_exceeded', int(retry)}
  end
  budget_remaining = budget - spent - held - reserve
end

local remaining = -1
local reset = 0
local count = 0
if rl > 0 then
  redis.call('ZREMRANGEBYSCORE', rate, '-inf', now - window)
  count = redis.call('ZCARD', rate)
  if count >= rl then
    -- Room comes when the entry that brings the count under the limit leaves: the oldest,
    -- unless a lowered limit (a PATCH) left more than one too many in the window.
    local leaving = redis.call('ZRANGE', rate, count - rl, count - rl, 'WITHSCORES')
    local retry = tonumber(leaving[2]) + window - now
    if retry < 1 then retry = 1 end
    return {'deny', 'rate_limited', int(retry)}
  end
  remaining = rl - count - 1
end

-- Token window: settled tokens leave it `window` after their settlement; each entry is read
-- and removed once, so an admission costs amortized O(log n) however many settlements the
-- window holds. Live leases' reserved tokens count too.
local tokens_remaining, tokens_reset = -1, 0
if token_limit > 0 then
  local gone = redis.call('ZRANGEBYSCORE', tokens, '-inf', now - window, 'LIMIT', 0, 256)
  local cleaned = #gone > 0
  for _, m in ipairs(gone) do
    wtok = wtok - (tonumber(string.match(m, ':(%d+)$')) or 0)
  end
  if cleaned then redis.call('ZREMRANGEBYRANK', tokens, 0, #gone - 1) end
  -- The window expired whole (idle key): nothing is in it.
  if wtok ~= 0 and redis.call('EXISTS', tokens) == 0 then
    wtok = 0
    cleaned = true
  end
  if cleaned then redis.call('HSET', state, 'wtok', int(wtok)) end
  if wtok + htok >= token_limit or wtok + htok + reserve_tokens > token_limit then
    -- Until enough settled tokens leave the window (holds leave when their leases end).
    local excess = wtok + htok + math.max(reserve_tokens, 1) - token_limit
    local retry = window
    if excess <= wtok then
      local oldest = redis.call('ZRANGE', tokens, 0, 255, 'WITHSCORES')
      local freed = 0
      for i = 1, #oldest, 2 do
        freed = freed + (tonumber(string.match(oldest[i], ':(%d+)$')) or 0)
        if freed >= excess then
          retry = tonumber(oldest[i + 1]) + window - now
          break
        end
      end
    else
      retry = 1000
    end
    if retry < 1 then retry = 1 end
    return {'deny', 'token_limited', int(retry)}
  end
  tokens_remaining = token_limit - wtok - htok - reserve_tokens
  local oldest = redis.call('ZRANGE', tokens, 0, 0, 'WITHSCORES')
  if oldest[2] then tokens_reset = tonumber(oldest[2]) + window - now end
end

local in_flight = 0
if cl > 0 then in_flight = redis.call('ZCARD', live) end
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
-- The token and budget fields only for a key that has either: a plain key's reply is the
-- eleven fields it needs (every reply element costs Redis a conversion).
local function answer(flight, tracked)
  if token_limit < 0 and budget < 0 then
    return {'ok', key_id, user_id, int(rl), int(remaining), int(reset), int(cl), int(flight),
      int(available), int(now), tracked}
  end
  return {'ok', key_id, user_id, int(rl), int(remaining), int(reset), int(cl), int(flight),
    int(available), int(now), tracked, int(token_limit), int(tokens_remaining),
    int(tokens_reset), int(budget), int(budget_remaining), int(budget_resets)}
end
if not leased then return answer(in_flight, '0') end
-- Money is held only where a balance or a budget counts it; tokens where a limit does.
local hold = 0
if (bal >= 0 or budget >= 0) and reserve > 0 then hold = reserve end
local hold_tokens = 0
if token_limit > 0 then hold_tokens = reserve_tokens end
if cl <= 0 and hold == 0 and hold_tokens == 0 then return answer(0, '0') end
-- A tracked lease: its slot, and its hold if it has one. `live` exists iff it has entries, so
-- a count of 0 (or no count: no concurrency limit) asks whether it does.
local live_existed = in_flight > 0
if cl <= 0 then live_existed = redis.call('EXISTS', live) == 1 end
redis.call('ZADD', live, now + ttl, nonce)
expire(live, live_existed, ttl)
if cl > 0 then in_flight = in_flight + 1 end
if hold > 0 or hold_tokens > 0 then
  local value = int(hold)
  if hold_tokens > 0 then
    value = value .. ':' .. int(hold_tokens)
    redis.call('HINCRBY', state, 'htok', int(hold_tokens))
  end
  redis.call('HSET', holds, nonce, value)
  if hold > 0 then redis.call('HINCRBY', state, 'held', int(hold)) end
  if bal >= 0 then available = available - hold end
  -- Exactly `live`'s expiry (see the invariant above), which may be later than this TTL.
  redis.call('PEXPIRE', holds, redis.call('PTTL', live))
elseif held ~= 0 or htok ~= 0 then
  -- `holds` had `live`'s expiry before this grant; GT moves both the same way.
  redis.call('PEXPIRE', holds, ttl, 'GT')
end
return answer(in_flight, '1')
