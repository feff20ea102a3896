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
-- src/hot/scripts/admit.rs. It calls lib/config.lua, lib/ring.lua, lib/calendar.lua,
-- lib/holds.lua and lib/layout.lua, which tollgate prepends.
-- KEYS[1] state   HASH  key state (see hydrate.lua; `cfn` its configuration folded, lib/config.lua;
--                 `rw` the rate ring's cursor); missing = not hydrated; field none = unknown key
-- KEYS[2] rate    STRING the rate ring: admission times of the window (lib/ring.lua)
-- and, named from KEYS[1] (lib/layout.lua) by the calls that need them:
--         live    ZSET  tracked live leases: member = lease nonce, score = lease expiry (ms)
--         holds   HASH  lease nonce -> what that lease holds: nano-USD, or 'nanos:tokens' when
--                 it also holds tokens (reserve_tokens); in state format 2 a new lease's hold
--                 is its `live` member's, '<nonce>=<hold>', and this hash only keeps the holds
--                 of leases taken before the format changed
--         tokens  ZSET  token window: member = 'nonce:total_tokens' of a settlement, score = its
--                 time (ms); state.wtok is the sum of the members' tokens (settle.lua adds)
-- ARGV[1] rate window (ms)
-- ARGV[2] this lease's TTL (ms); 0 = admit without a lease: the rate log and the balance still
--         count, the concurrency limit and any hold do not, and nothing but the rate log is
--         written (for proxies that cannot report the end of a request)
-- ARGV[3] what the caller knows of the key, a sum: 1 = it does not know the key's ids (answer
--         them), 2 = the key's last grant needed its lease and balance counters, 4 = its
--         token and spend counters (read them with the rest). Each only spares calls: a wrong
--         guess costs a second read, never a wrong answer. Plus 8 = state format 2
--         (`TOLLGATE_STATE_FORMAT`): a lease that holds something carries its hold in its
--         `live` member, '<nonce>=<hold>', and writes nothing to `holds` (below).
-- ARGV[4] what was asked, which a plain key's admission never reads, so in one argument:
--         reserve (nano-USD, >= 0), reserve tokens (>= 0), lease nonce (unique), provider
--         ('' = not given), api format, model, joined by '\31' (none of them holds it: labels
--         are refused with control characters)
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
--   a grant: one string of big-endian 8-byte integers (`>i8` each): rate_limit,
--            rate_remaining, reset_ms, concurrent_limit, in_flight, balance_available, now_ms,
--            tracked (1|0; 2: tracked, its hold in its `live` member), and, only for a key
--            with a token limit or a budget, token_limit, tokens_remaining, tokens_reset_ms,
--            budget, budget_remaining, budget_resets_at_ms, and, only when tracked is 2, the
--            hold's nano-USD and tokens (-1 = unlimited / none / never; in_flight is 0 for a
--            key without a concurrency limit: nothing counts them). One string because every
--            element of a reply costs Redis a conversion, and eight numbers cost about twice
--            one string of them.
--   {'ok', that string, key_id, user_id}            a grant when ARGV[3] asked for the ids
--   or the error reply CORRUPT_STATE: the key's state or a hold holds what no script writes
--
-- Never half-writes (see settle.lua): the state's numbers and the holds of expired leases are
-- checked before the first write. The arguments are not: their one writer is the typed
-- builder in `hot/admission.rs`, which refuses lease TTLs outside 1 ms to a year, a reserve
-- above 2^53 - 1 nano-USD and reserved tokens above 2^53 - 1 before any call. Checks here are
-- plain `tonumber`s of values the script reads anyway, no pattern matches: this is the call
-- on every request's path.
--
-- Numbers written to Redis cross as strings: Lua numbers are doubles, Redis integers are
-- exact. They are printed with '%d', never tostring(), which keeps only 14 digits (a balance
-- of 100,000 USD is 1e14 nano-USD): Lua's '%d' prints the number as a 64-bit integer, exact
-- for every whole number below 2^63 (every number printed here is one), and costs Redis a
-- third of what '%.0f' does (docs/PERFORMANCE.md). Handing redis.call a number instead costs
-- more than either: Redis prints it itself. The reply's numbers are Lua numbers, which Redis
-- answers as integers, exact below 2^53 (every number here is).
--
-- Invariant: state.held is the sum of the nano-USD of the live leases' holds (state.htok of
-- their tokens), each either in `holds` or in its `live` member, never both; `holds` has an
-- entry only for a lease in `live`; every hold is positive, so `held` = 0 and `htok` = 0 say
-- that no lease holds anything. `live` and `holds` share one expiry (`lx`,
-- below), so on a key left idle past it both vanish together, and a missing `live` means no
-- lease is live and nothing can be held.
--
-- Cost: every redis.call costs Redis about as much again as the command itself (arguments and
-- reply cross between Lua and Redis), so the script avoids calls whose answer it already knows:
-- an empty sorted set does not exist, so a count of 0 says a key is new; `held` = 0 says
-- `holds` is empty; a plain key's admission carries two keys and four arguments, reads three
-- short state fields (one call that a known key's ids and a counted key's counters join), and
-- writes one slot of the ring and one cursor field; the answer is one string
-- (docs/PERFORMANCE.md has the figures). Expired leases are looked for once `le` passes, and
-- a missing `live` once `lx` does, not on every call (both below).

local state, rate = KEYS[1], KEYS[2]
local live, holds, tokens
local window = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local knows = tonumber(ARGV[3])
-- State format 2: holds in `live` members (ARGV[3] header). Every release since the format
-- came reads both forms; only this flag decides which one a new lease is written in.
local in_members = knows >= 8
if in_members then knows = knows - 8 end
local need_ids = knows % 2 == 1
local leased = ttl > 0
local nonce, provider, api_format, model, reserve, reserve_tokens = '', '', '', '', 0, 0
local function int(n) return string.format('%d', n) end

-- The key's configuration (lib/config.lua), its rate ring's cursor and the version the
-- configuration must match: three short fields, one read. The ids the reply carries only
-- when the caller does not know them (they never change for a key); the running counters
-- with them when the caller expects the key to need them (below).
-- Once read (`basic`), `used_s`, `held_s`, `htok_s`, `lx_s` and `le_s` hold the values of
-- `used`, `held`, `htok`, `lx` and `le`; once `spend` is, `wtok_s`, `bsp_s` and `bps_s` those
-- of `wtok`, `bsp` and `bps`. Locals, not tables, and the common reads written out whole: a
-- table costs Redis time on every call (docs/PERFORMANCE.md), a plain key's too.
local cfn, rw, version, key_id, user_id, basic, spend
local used_s, held_s, htok_s, lx_s, le_s, wtok_s, bsp_s, bps_s
if knows == 0 then
  cfn, rw, version = unpack(redis.call('HMGET', state, 'cfn', 'rw', 'ver'))
elseif knows == 1 then
  cfn, rw, version, key_id, user_id =
    unpack(redis.call('HMGET', state, 'cfn', 'rw', 'ver', 'id', 'user'))
elseif knows == 2 then
  cfn, rw, version, used_s, held_s, htok_s, lx_s, le_s = unpack(redis.call('HMGET', state,
    'cfn', 'rw', 'ver', 'used', 'held', 'htok', 'lx', 'le'))
  basic = true
else
  local f = {'cfn', 'rw', 'ver'}
  if need_ids then f[4], f[5] = 'id', 'user' end
  local b = #f
  if knows % 4 >= 2 then
    f[b + 1], f[b + 2], f[b + 3], f[b + 4], f[b + 5] = 'used', 'held', 'htok', 'lx', 'le'
  end
  local s = #f
  if knows >= 4 then f[s + 1], f[s + 2], f[s + 3] = 'wtok', 'bsp', 'bps' end
  local v = redis.call('HMGET', state, unpack(f))
  cfn, rw, version = v[1], v[2], v[3]
  if need_ids then key_id, user_id = v[4], v[5] end
  if knows % 4 >= 2 then
    used_s, held_s, htok_s, lx_s, le_s, basic = v[b + 1], v[b + 2], v[b + 3], v[b + 4],
      v[b + 5], true
  end
  if knows >= 4 then wtok_s, bsp_s, bps_s, spend = v[s + 1], v[s + 2], v[s + 3], true end
end
local folded, cfg_version, flags, expires, rl, cl, bal, token_limit, budget = false
if cfn then
  folded, cfg_version, flags, expires, rl, cl, bal, token_limit, budget = unpack_config(cfn)
  if not folded then
    return redis.error_reply('CORRUPT_STATE the folded configuration is not one')
  end
end
if not folded or cfg_version ~= tonumber(version) then
  -- No folded configuration, or one older than the named fields: state written by a tollgate
  -- from before `cfn`, or by one during a rolling upgrade. Fold it from the named fields.
  local s = redis.call('HMGET', state, 'none', 'act', 'exp', 'prov', 'fmt', 'mdl', 'rl', 'cl',
    'bal', 'tl', 'bud', 'bper', 'id')
  if s[13] == false then
    if s[1] ~= false then return {'deny', 'key_invalid', '0'} end
    return {'miss'}
  end
  local v, e = tonumber(version or ''), nil
  if s[3] ~= '' then e = tonumber(s[3] or '') or false end
  local n = {tonumber(s[7] or ''), tonumber(s[8] or ''), tonumber(s[9] or ''),
    tonumber(s[10] or '-1'), tonumber(s[11] or '-1')}
  if not (v and e ~= false and n[1] and n[2] and n[3] and n[4] and n[5]) then
    return redis.error_reply('CORRUPT_STATE a field of the key state is not a number')
  end
  local a = 0
  if s[2] == '1' then a = 1 end
  cfn = pack_config(v, a, e, n[1], n[2], n[3], n[4], n[5], s[12] or '', s[4] or '',
    s[5] or '', s[6] or '')
  redis.call('HSET', state, 'cfn', cfn)
  folded, cfg_version, flags, expires, rl, cl, bal, token_limit, budget = unpack_config(cfn)
end
local budget_period = ''
if budget >= 0 then budget_period = config_period(flags) end
local listed = flags % 16 >= 2
local plain = cl <= 0 and bal < 0 and budget < 0 and token_limit <= 0

local counted = token_limit > 0 or budget >= 0

-- What was asked (ARGV[4]), and the keys of leases and tokens: only the parts a key's answer
-- can depend on (the labels for an allow-list, the rest for a key with counters).
if listed or not plain then
  local r, t
  if listed then
    r, t, nonce, provider, api_format, model = string.match(ARGV[4],
      '^(%d+)\31(%d+)\31([^\31]*)\31([^\31]*)\31([^\31]*)\31([^\31]*)$')
  else
    r, t, nonce = string.match(ARGV[4], '^(%d+)\31(%d+)\31([^\31]*)\31')
  end
  if nonce == nil then return redis.error_reply('INVALID_ARGUMENT what was asked') end
  if leased then reserve, reserve_tokens = tonumber(r), tonumber(t) end
  -- `holds` is named where it is touched: in state format 2 a grant does not touch it.
  if not plain then live = sibling(state, 'c') end
  if token_limit > 0 then tokens = sibling(state, 'w') end
end

-- The allow-lists, only for a key that has one; the running counters, only for a key whose
-- answer they can change: a plain key (no concurrency limit, balance, budget or token limit)
-- reads none of them. They come with the first read when the caller expected the key to need
-- them (ARGV[3]), else in a second. Each counter must be a number, and `held`, `htok` and
-- `wtok` whole (HINCRBY adds to them); anything else is state no script writes, refused
-- before the first write.
local providers, formats, models = '', '', ''
local used, held, wtok, htok, period_spend, period_start = 0, 0, 0, 0, nil, nil
-- `lx`: when `live` and `holds` expire (below); `le`: no live lease expires before it (a
-- lower bound: leases that end early leave it where it is).
local live_deadline, live_earliest = 0, 0
local more_basic, more_spend = not (plain or basic), counted and not spend
if listed or more_basic or more_spend then
  local f = {}
  if listed then f = {'prov', 'fmt', 'mdl'} end
  local b = #f
  if more_basic then
    f[b + 1], f[b + 2], f[b + 3], f[b + 4], f[b + 5] = 'used', 'held', 'htok', 'lx', 'le'
  end
  local s = #f
  if more_spend then f[s + 1], f[s + 2], f[s + 3] = 'wtok', 'bsp', 'bps' end
  local v = redis.call('HMGET', state, unpack(f))
  if listed then providers, formats, models = v[1] or '', v[2] or '', v[3] or '' end
  if more_basic then
    used_s, held_s, htok_s, lx_s, le_s = v[b + 1], v[b + 2], v[b + 3], v[b + 4], v[b + 5]
  end
  if more_spend then wtok_s, bsp_s, bps_s = v[s + 1], v[s + 2], v[s + 3] end
end
if not plain then
  used, held, htok = tonumber(used_s), tonumber(held_s or 0), tonumber(htok_s or 0)
  live_deadline = tonumber(lx_s or '0') or 0
  live_earliest = tonumber(le_s or '0') or 0
  if counted then
    wtok, period_spend, period_start = tonumber(wtok_s or 0), bsp_s, bps_s
  end
  if not (used and held and htok and wtok) or held % 1 ~= 0 or htok % 1 ~= 0
    or wtok % 1 ~= 0 then
    return redis.error_reply('CORRUPT_STATE a field of the key state is not a number')
  end
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

if flags % 2 ~= 1 then return {'deny', 'key_disabled', '0'} end
if flags >= 64 and now >= expires then return {'deny', 'key_expired', '0'} end

-- Allow-lists are stored as '\31a\31b\31'; '' means unrestricted.
-- A value holding the separator could span several entries ('a\31b' matches '\31a\31b\31').
if listed then
  local function allowed(list, value)
    if list == '' then return true end
    if value == '' or string.find(value, '\31', 1, true) then return false end
    return string.find(list, '\31' .. value .. '\31', 1, true) ~= nil
  end
  if not allowed(providers, provider) then return {'deny', 'provider_not_allowed', '0'} end
  if not allowed(formats, api_format) then return {'deny', 'api_format_not_allowed', '0'} end
  if not allowed(models, model) then return {'deny', 'model_not_allowed', '0'} end
end

-- The rate window (lib/ring.lua): the entries that left it are dropped from the cursor read
-- with the configuration; the ring itself is read only when the cursor's cached times run
-- out. Read (and the cursor checked) here, before the first write below.
local r_head, r_tail, r_cap, r_deadline, r_cache, r_clock
if rl > 0 then
  r_head, r_tail, r_cap, r_deadline, r_cache, r_clock = ring_read(rate, rw, now, window)
  if r_head == nil then
    return redis.error_reply('CORRUPT_STATE the rate cursor is not one')
  end
end

-- Expired leases give back their slot and hold before anything is counted. Bounded per call;
-- leftovers are only counted conservatively (their hold stays held) until the next call.
-- Their holds are read and checked first, so that a corrupt one refuses the call before the
-- first write. Only where they can matter: with no concurrency limit and nothing held, an
-- expired entry of `live` changes no answer (it leaves with `live`'s expiry, or with the
-- next call that scans). And only once `le` has passed: before it no lease has expired. A
-- scan moves `le` to the earliest expiry left (one more read), so a key scans about once a
-- lease TTL, not on every admission.
-- (Tables and loops only where a scan runs: each costs Redis time on every call otherwise.)
local scanned = (cl > 0 or held ~= 0 or htok ~= 0) and now >= live_earliest
local expired, repaired = 0, false
if scanned then
  local gone = redis.call('ZRANGEBYSCORE', live, '-inf', now, 'LIMIT', 0, 64)
  expired = #gone
  if expired > 0 then
    local in_hash = {}
    for i, m in ipairs(gone) do
      -- A hold in the member ('<nonce>=<hold>', state format 2), else in `holds`.
      local h, eq = false, string.find(m, '=', 1, true)
      if held ~= 0 or htok ~= 0 then
        if eq then
          h = string.sub(m, eq + 1)
        else
          holds = holds or sibling(state, 'h')
          h = redis.call('HGET', holds, m)
        end
      end
      if h then
        local hn, ht = hold_of(h)
        if hn == nil then
          return redis.error_reply('CORRUPT_STATE a hold is not a whole number')
        end
        held = held - hn
        htok = htok - ht
        in_hash[i] = not eq
      end
    end
    for i, m in ipairs(gone) do
      if in_hash[i] then redis.call('HDEL', holds, m) end
    end
    redis.call('ZREM', live, unpack(gone))
    repaired = true
  end
end
-- No live lease left: nothing is held. This is also where the holds of an idle key's leases
-- come back when `live` and `holds` expired as whole keys (at `lx`) and the loop above saw
-- nothing. Before `lx` a missing `live` cannot hide a hold: the last lease to leave it took
-- its hold along.
if (held ~= 0 or htok ~= 0) and now >= live_deadline and redis.call('EXISTS', live) == 0 then
  held = 0
  htok = 0
  holds = holds or sibling(state, 'h')
  redis.call('DEL', holds)
  repaired = true
end
if scanned then
  -- `le` after the look: 0 (look again) while more expired leases may be left; else the
  -- earliest expiry left; and for an empty `live`, a second from now, so that a key admitted
  -- without leases looks at most once a second (a lease that a replica of an earlier release
  -- adds, which does not move `le`, is found then), while a grant below sets its own expiry.
  local written = 0
  live_earliest = 0
  if expired < 64 then
    local first = redis.call('ZRANGE', live, 0, 0, 'WITHSCORES')
    if first[2] then
      live_earliest = tonumber(first[2]) or 0
      written = live_earliest
    else
      written = now + 1000
    end
  end
  if repaired then
    redis.call('HSET', state, 'held', int(held), 'htok', int(htok), 'le', int(written))
  else
    redis.call('HSET', state, 'le', int(written))
  end
elseif repaired then
  redis.call('HSET', state, 'held', int(held), 'htok', int(htok))
end

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
if rl > 0 then
  local count = r_head - r_tail
  if count >= rl or count >= RING_MAX then
    -- Room comes when the entry that brings the count under the limit leaves: the oldest,
    -- unless a lowered limit (a PATCH) left more than one too many in the window.
    local k = 0
    if count > rl then k = count - rl end
    local leaving = ring_time(rate, r_tail, r_cap, r_cache, k)
    local retry = 1
    if leaving then retry = leaving + window - r_clock end
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

-- Every check passed: grant. What it writes to the state goes in one HSET at the end: the
-- rate cursor, the expiry of `live` and `holds` when it moves, and the sums of the holds when
-- this lease holds something (absolute values: the script read them, and nothing else runs in
-- between). A plain key's grant writes the cursor alone.
local cursor, new_lx, new_le, new_held, new_htok
if rl > 0 then
  local oldest
  cursor, oldest = ring_add(rate, r_head, r_tail, r_cap, r_deadline, r_cache, rl, r_clock,
    window)
  reset = oldest + window - r_clock
end
-- The numbers go back packed in one string (the header's layout): exact, since every one is
-- below 2^53. The token and budget fields only for a key that has either.
local function answer(flight, tracked, hn, ht)
  if cursor and new_held and not (new_lx or new_le or new_htok) then
    redis.call('HSET', state, 'rw', cursor, 'held', new_held)
  elseif new_lx or new_le or new_held or new_htok then
    local w = {}
    if cursor then w[#w + 1] = 'rw'; w[#w + 1] = cursor end
    if new_lx then w[#w + 1] = 'lx'; w[#w + 1] = new_lx end
    if new_le then w[#w + 1] = 'le'; w[#w + 1] = new_le end
    if new_held then w[#w + 1] = 'held'; w[#w + 1] = new_held end
    if new_htok then w[#w + 1] = 'htok'; w[#w + 1] = new_htok end
    redis.call('HSET', state, unpack(w))
  elseif cursor then
    redis.call('HSET', state, 'rw', cursor)
  end
  local packed
  if token_limit < 0 and budget < 0 then
    packed = struct.pack('>i8i8i8i8i8i8i8i8', rl, remaining, reset, cl, flight, available, now,
      tracked)
  else
    packed = struct.pack('>i8i8i8i8i8i8i8i8i8i8i8i8i8i8', rl, remaining, reset, cl, flight,
      available, now, tracked, token_limit, tokens_remaining, tokens_reset, budget,
      budget_remaining, budget_resets)
  end
  -- The hold a member carries, which the caller seals into the lease id: settling or
  -- releasing the lease names the member from it, and reads no `holds`.
  if tracked == 2 then packed = packed .. struct.pack('>i8i8', hn, ht) end
  if need_ids then return {'ok', packed, key_id, user_id} end
  return packed
end
if not leased then return answer(in_flight, 0) end
-- Money is held only where a balance or a budget counts it; tokens where a limit does.
local hold = 0
if (bal >= 0 or budget >= 0) and reserve > 0 then hold = reserve end
local hold_tokens = 0
if token_limit > 0 then hold_tokens = reserve_tokens end
if cl <= 0 and hold == 0 and hold_tokens == 0 then return answer(0, 0) end
-- A tracked lease: its slot, and its hold if it has one. `live` exists iff it has entries, so
-- a count of 0 (or no count: no concurrency limit) asks whether it does.
--
-- Expiries: `live` and `holds` expire together at `lx` (a state field), set twice the lease TTL
-- ahead whenever less than one TTL is left: one PEXPIREAT each per TTL, not an expiry call (and
-- a PTTL) per grant. `lx` only moves later, so a replica configured with a shorter TTL cannot
-- drop leases another replica still counts. A `live` or `holds` this grant creates gets `lx` at
-- once, so an existing one always has it.
local live_existed = in_flight > 0
if cl <= 0 then live_existed = redis.call('EXISTS', live) == 1 end
local holding = hold > 0 or hold_tokens > 0
local value
if holding then
  value = int(hold)
  if hold_tokens > 0 then value = value .. ':' .. int(hold_tokens) end
end
local member_held = holding and in_members
if member_held then
  redis.call('ZADD', live, now + ttl, nonce .. '=' .. value)
else
  redis.call('ZADD', live, now + ttl, nonce)
end
if cl > 0 then in_flight = in_flight + 1 end
local holds_existed = held ~= 0 or htok ~= 0
local refresh = live_deadline < now + ttl
if live_earliest == 0 or now + ttl < live_earliest then new_le = int(now + ttl) end
if refresh then
  live_deadline = now + 2 * ttl
  new_lx = int(live_deadline)
end
if refresh or not live_existed then redis.call('PEXPIREAT', live, live_deadline) end
if holding then
  if hold_tokens > 0 then new_htok = int(htok + hold_tokens) end
  if not member_held then
    holds = holds or sibling(state, 'h')
    redis.call('HSET', holds, nonce, value)
  end
  if hold > 0 then new_held = int(held + hold) end
  if bal >= 0 then available = available - hold end
end
-- `holds` keeps the expiry of `live` while it may have entries: any lease's of the earlier
-- form, or this one's.
if (holds_existed and refresh)
  or (holding and not member_held and (refresh or not holds_existed)) then
  holds = holds or sibling(state, 'h')
  redis.call('PEXPIREAT', holds, live_deadline)
end
if member_held then return answer(in_flight, 2, hold, hold_tokens) end
return answer(in_flight, 1)
