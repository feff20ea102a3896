-- settle.lua: charge a lease's real cost, free its slot and hold, and append its usage event
-- to the shard's stream — or recognise a duplicate.
--
-- Why one script: the charge, the release of the hold and the usage record must happen
-- together or not at all. Were the charge and the XADD separate commands, a crash between them
-- would either charge without a record (usage lost from Postgres) or record without a charge;
-- and two concurrent settles of one lease could both pass a "not settled yet" check. The
-- tombstone written here makes a retried settle a no-op, so nothing is charged twice.
--
-- The Rust side of this contract (arguments in this order, the reply read) is
-- src/hot/scripts/settle.rs. It calls lib/config.lua, lib/calendar.lua, lib/holds.lua,
-- lib/lease_end.lua and lib/layout.lua, which tollgate prepends.
-- KEYS[1] state   HASH  key state (may be gone if the key was deleted: the event is still kept)
-- KEYS[2] lease   STRING this lease's tombstone: 'S' settled, 'R' released (or, for a lease id
--                 issued before sealed ids, its record: 'L…' live, 'R…' released, 'S')
-- KEYS[3] stream  STREAM the shard's usage stream, drained into Postgres by the syncer
-- and, named from KEYS[1] (lib/layout.lua) by the calls that need them:
--         live    ZSET  tracked live leases of the key
--         holds   HASH  holds of the key's live leases
--         tokens  ZSET  the key's token window (see admit.lua): a key with a token limit gets
--                 this settlement's total tokens, at this instant
-- ARGV[1] cost (nano-USD), or '?': not known yet, the caller prices it from the tokens: answer
--         the provider and model it is priced for, and write nothing
-- ARGV[2] total tokens (tollgate computes the sum exactly in Rust)
-- ARGV[3] tombstone TTL (ms): at least this long a settled lease is remembered for duplicate
--         detection (a sealed lease's tombstone also lives until its deadline, ARGV[11])
-- ARGV[4] event id '<sid>.<nonce>' (the event's idempotency id in Postgres)
-- ARGV[5] 'any': settle a live or released lease (the gateway's /v1/settle: usage is never
--         dropped); 'live': a released lease is a duplicate (an access-log report, which may
--         arrive after the gateway or the proxy already ended the lease)
-- ARGV[6] rate window (ms): how long settled tokens count against a token limit
-- ARGV[7] 'sealed': the lease's facts were opened from its sealed id by the caller, who
--         checked its MAC (`hot/lease_id.rs`), and follow: ARGV[8] tracked (1: in `live`,
--         see admit.lua; '=<hold>': in `live` as '<nonce>=<hold>', its hold in its member,
--         admit.lua's state format 2; 0: not; p: not, and the caller expects a key without a
--         balance, so its `held` and `htok` are read only if it has one), ARGV[9] admitted at (ms),
--         ARGV[10] expires at (ms), ARGV[11] deadline (ms): past it the lease is unknown;
--         ARGV[12] the usage event's first thirteen values, joined (below), which the caller
--         knows whole — or, with ARGV[1] '?', ARGV[12] the provider and ARGV[13] the model it
--         is priced for.
--         'record': a lease id issued before sealed ids; its facts are in its record, and the
--         rest of the event follows: ARGV[8] input tokens, ARGV[9] output tokens, ARGV[10]
--         response time ms (-1 = unknown), ARGV[11] status code (-1 = unknown), ARGV[12]
--         provider, ARGV[13] api format, ARGV[14] model ('=' prefix = given, '' = the lease's)
--
-- Returns {'unknown'} | {'duplicate', available} | {'settled', lease_expired(0|1), available}
--   | {'price', provider, model} (ARGV[1] '?')
-- A sealed lease's duplicate check is the tombstone's own write (`SET … GET`): one call where
-- a read and a write were two.
-- Numbers are printed with '%d' (whole numbers below 2^63, exact): tostring() keeps only 14
-- digits, and '%.0f' costs three times as much (see admit.lua).
--
-- Never half-writes: every bound is checked before the first write, and a call that fails
-- one changes nothing and answers an error reply whose first word says why:
--   LIMIT_EXCEEDED    `used` + cost would pass MAX_USED (likewise the budget period's spend
--                     and the token window's sum)
--   CORRUPT_STATE     the key's state or the lease record holds what no script writes
-- (`hot::redis` reads these as `RedisFailure::Refused`; `http::error` answers 422
-- `limit_exceeded` and 500 `internal`.) Version 1 added the cost to `used` with HINCRBY after
-- freeing the lease: past the 64-bit range HINCRBY failed, and every later settle answered 503
-- with the lease already gone from the live set.
--
-- The arguments are not checked here: their one writer is the typed builder in
-- `hot/admission.rs`, which refuses a cost above MAX_COST (LIMIT_EXCEEDED) and token counts
-- above 2^53 - 1 (INVALID_ARGUMENT) before any call, and sends every other argument in the
-- format above by construction. What only this script can see, the key's state and the running
-- totals, it checks, and only the fields this call will do arithmetic on: each check is a
-- pattern match that costs Redis time on every settlement (docs/PERFORMANCE.md).
--
-- MAX_COST = 2^53 - 1 nano-USD (9,007,199.254740991 USD; the largest integer a Lua number
-- holds exactly). MAX_USED = 2^62 nano-USD (about 4.6 billion USD): a key's lifetime spend.
-- It keeps `used`, Postgres's `balance_used_nanos` and every sum of them (a day's roll-up, a
-- batch of 500 events at MAX_COST on top) inside 64 bits. It is compared exactly, in two
-- 9-digit halves, never as a (rounded) Lua number.

local state, lease, stream = KEYS[1], KEYS[2], KEYS[3]
local live, holds
local function int(n) return string.format('%d', n) end

local MAX_USED_HI, MAX_USED_LO = 4611686018, 427387904 -- 2^62 as (hi, lo): hi * 1e9 + lo
local function refuse(code, why) return redis.error_reply(code .. ' ' .. why) end
-- A counter HINCRBY can add to: digits, optionally '-', at most 19 of them.
local function whole(v)
  return #v <= 20 and string.find(v, '^%-?%d+$') ~= nil
    and (#v <= 19 or string.byte(v) == 45)
end
-- (hi, lo) of a non-negative whole number string: both exact, lo < 1e9.
local function halves(d)
  if #d <= 9 then return 0, tonumber(d) end
  return tonumber(string.sub(d, 1, #d - 9)), tonumber(string.sub(d, -9))
end
-- Whether counter + amount (whole number strings, amount >= 0) passes 2^62, exactly. A
-- counter below 0 cannot pass it; below 10^17 plus an amount below 10^16, neither can the sum.
local function passes(counter, amount)
  if #counter <= 17 and #amount <= 16 then return false end
  if string.sub(counter, 1, 1) == '-' then return false end
  local ahi, alo = halves(counter)
  local bhi, blo = halves(amount)
  local lo, hi = alo + blo, ahi + bhi
  if lo >= 1000000000 then hi, lo = hi + 1, lo - 1000000000 end
  return hi > MAX_USED_HI or (hi == MAX_USED_HI and lo > MAX_USED_LO)
end

local cost = ARGV[1]
local event_id = ARGV[4]
local window = ARGV[6]
local sealed = ARGV[7] == 'sealed'
local only_live = ARGV[5] == 'live'

-- What this script needs of the key's state: the folded configuration (lib/config.lua) and
-- the counters a settlement of any key reads, in one read; the token window's sum and the
-- budget period's spend in a second, only for a key that has a token limit or a budget that
-- resets. No state (a deleted key) = not hydrated: the event is still recorded. The holds'
-- sums and `lx` only matter to a tracked lease or a key with a balance: for an untracked
-- lease of a key the caller expects to have none (ARGV[8] 'p'), they are not read with the
-- rest (each field read costs Redis time), and a key that has a balance after all reads them
-- in a second call.
local expect_plain = sealed and ARGV[8] == 'p'
local cfn, version, used_s, held_s, htok_s, born, lx
if expect_plain then
  cfn, version, used_s, born = unpack(redis.call('HMGET', state, 'cfn', 'ver', 'used', 'born'))
else
  cfn, version, used_s, held_s, htok_s, born, lx =
    unpack(redis.call('HMGET', state, 'cfn', 'ver', 'used', 'held', 'htok', 'born', 'lx'))
end
local hydrated, unknown, bal, token_limit, budget, budget_period = true, false, -1, -1, -1, ''
local folded, cfg_version, flags, bal_s, _ = false
if cfn then
  folded, cfg_version, flags, _, _, _, bal, token_limit, budget = unpack_config(cfn)
end
if folded and cfg_version == tonumber(version) then
  budget_period = config_period(flags)
else
  -- State from before the folded configuration, or written by an older replica (admit.lua
  -- folds it on the next admission): the named fields.
  local key_id, none, tl, bud, per
  key_id, bal_s, none, tl, bud, per =
    unpack(redis.call('HMGET', state, 'id', 'bal', 'none', 'tl', 'bud', 'bper'))
  hydrated, unknown = key_id ~= false, none ~= false
  bal, token_limit = tonumber(bal_s or '-1'), tonumber(tl or '-1') or -1
  budget, budget_period = tonumber(bud or '-1') or -1, per or ''
end
-- What this settlement will write besides `used`: the token window of a key with a token
-- limit, the period spend of a budget that resets.
local token_limited = hydrated and token_limit > 0
local budgeted = hydrated and budget >= 0 and budget_period ~= ''
if expect_plain and bal ~= nil and bal >= 0 then
  held_s, htok_s = unpack(redis.call('HMGET', state, 'held', 'htok'))
end
local period_start, period_spend, wtok_s
if token_limited or budgeted then
  period_start, period_spend, wtok_s = unpack(redis.call('HMGET', state, 'bps', 'bsp', 'wtok'))
end
-- Every counter that is read as a number or that HINCRBY adds to below must be a whole
-- number: `held` and `htok` where a lease can hold (a tracked lease, a balance to report).
local member_hold = sealed and string.sub(ARGV[8], 1, 1) == '='
local tracked = not sealed or ARGV[8] == '1' or member_hold
-- The lease's nonce names its `live` member, its `holds` entry and its token-window entry: cut
-- from the event id only where one of those is touched.
local nonce
if tracked or token_limited then
  nonce = string.sub(event_id, string.find(event_id, '.', 1, true) + 1)
end
if tracked then live, holds = sibling(state, 'c'), sibling(state, 'h') end
local function corrupt(v) return v and not whole(v) end
if corrupt(bal_s) or corrupt(used_s) or ((tracked or bal >= 0) and (corrupt(held_s)
  or corrupt(htok_s))) or (token_limited and corrupt(wtok_s))
  or (budgeted and corrupt(period_spend)) then
  return refuse('CORRUPT_STATE', 'a counter of the key state is not a whole number')
end
local used = tonumber(used_s) or 0
local held = tonumber(held_s) or 0
local htok = tonumber(htok_s) or 0
local function available()
  if not hydrated or unknown or bal == nil or bal < 0 then return '-1' end
  local a = bal - used - held
  if a < 0 then a = 0 end
  return int(a)
end

-- The lease's facts: from its sealed id (the arguments), or from its record.
local lease_key, lease_user, lease_provider, lease_format, lease_model, admitted_at, expires_at
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tomb_ttl = tonumber(ARGV[3])
if sealed then
  admitted_at, expires_at = ARGV[9], ARGV[10]
  -- The tombstone outlives the sealed id: until then, a replay is a duplicate, never a charge.
  local deadline = tonumber(ARGV[11])
  if deadline - now > tomb_ttl then tomb_ttl = deadline - now end
  if now > deadline or ARGV[1] == '?' then
    -- Reads only: past the deadline the lease is unknown unless it was settled.
    local rec = redis.call('GET', lease)
    if rec == 'S' or (only_live and rec == 'R') then return {'duplicate', available()} end
    if now > deadline then return {'unknown'} end
  end
else
  local rec = redis.call('GET', lease)
  if rec == 'S' then return {'duplicate', available()} end
  if only_live and rec ~= false and string.sub(rec, 1, 1) == 'R' then
    return {'duplicate', available()}
  end
  if rec == false then return {'unknown'} end
  lease_key, lease_user, lease_provider, lease_format, lease_model, admitted_at, expires_at =
    cmsgpack.unpack(string.sub(rec, 2))
end

-- A recorded lease's label: the given one ('=' marked), else the lease's. Made only for such a
-- lease: every function a script defines is a closure made on every call.
local pick
if not sealed then
  pick = function(given, from_lease)
    if string.sub(given, 1, 1) == '=' then return string.sub(given, 2) end
    return from_lease
  end
end
if ARGV[1] == '?' then
  if sealed then return {'price', ARGV[12], ARGV[13]} end
  return {'price', pick(ARGV[12], lease_provider), pick(ARGV[14], lease_model)}
end

if tonumber(admitted_at) == nil or tonumber(expires_at) == nil then
  return refuse('CORRUPT_STATE', 'lease record times')
end

local total = ARGV[2]
-- The lifetime bound: used + cost <= MAX_USED. The period spend (`bsp`) and the token window's
-- sum (`wtok`) are bounded the same way (they are parts of lifetime totals), so no HINCRBY
-- below can overflow. A sealed lease's duplicate is found only by the tombstone's write below,
-- so a refusal first makes sure it is not one (a replay is answered, not refused).
local refuse_settle = refuse
if sealed then
  refuse_settle = function(code, why)
    local rec = redis.call('GET', lease)
    if rec == 'S' or (only_live and rec) then return {'duplicate', available()} end
    return refuse(code, why)
  end
end
if hydrated then
  if passes(used_s or '0', cost) then
    return refuse_settle('LIMIT_EXCEEDED', "the key's lifetime spend would pass 2^62 nano-USD")
  end
  if budgeted and passes(period_spend or '0', cost) then
    return refuse_settle('LIMIT_EXCEEDED', "the budget period's spend would pass 2^62 nano-USD")
  end
  if token_limited and passes(wtok_s or '0', total) then
    return refuse_settle('LIMIT_EXCEEDED', "the token window's sum would pass 2^62")
  end
end

-- The lease's hold, if it has one: in its sealed id when its `live` member carries it, else in
-- `holds`. Nothing is held when `held` and `htok` are 0 (admit.lua's invariant), so `holds` is
-- only read when it can matter; and an entry exists only for a live lease, so a released
-- lease finds none (it gave its hold back already), as its member is gone from `live`.
local hold = false
local hn, ht = 0, 0
if tracked and (held ~= 0 or htok ~= 0) then
  if member_hold then hold = string.sub(ARGV[8], 2) else hold = redis.call('HGET', holds, nonce) end
  if hold then
    hn, ht = hold_of(hold)
    if hn == nil then
      return refuse_settle('CORRUPT_STATE', 'a hold is not a whole number')
    end
  end
end

-- Every bound holds: from here on every call succeeds. A sealed lease's tombstone is written
-- first, and its previous value says whether this is a duplicate: NX for a report, which a
-- release ended as surely as a settlement; plain for the gateway's settlement, which turns a
-- release's 'R' into 'S' (a released lease is still charged once).
if sealed then
  local before
  if only_live then
    before = redis.call('SET', lease, 'S', 'PX', tomb_ttl, 'NX', 'GET')
  else
    before = redis.call('SET', lease, 'S', 'PX', tomb_ttl, 'GET')
  end
  if before == 'S' or (only_live and before) then return {'duplicate', available()} end
  -- Released: the slot and the hold went back with the release.
  if before then tracked = false end
end
-- Free the slot and the hold (lib/lease_end.lua).
local freed = false
if tracked then
  local member = nonce
  if member_hold then member = nonce .. ARGV[8] end
  held, htok, freed = free_lease(live, holds, member, hold, not member_hold, hn, ht, held, htok,
    now >= (tonumber(lx or '0') or 0))
end
local expired = '0'
if now >= tonumber(expires_at) then expired = '1' end

-- The charge, with the hold given back in the same write when there is one: `used` is then
-- written whole, which is exact while it and the cost are below 10^15 (their sum is exact as
-- a Lua number); beyond, HINCRBY adds it.
if hydrated then
  local whole_sum = #(used_s or '0') <= 15 and #cost <= 15
  used = used + tonumber(cost)
  if freed and whole_sum then
    redis.call('HSET', state, 'used', int(used), 'held', int(held), 'htok', int(htok))
  else
    redis.call('HINCRBY', state, 'used', cost)
    if freed then redis.call('HSET', state, 'held', int(held), 'htok', int(htok)) end
  end
end

-- The token window of a key with a token limit.
if token_limited and total ~= '0' then
  local tokens = sibling(state, 'w')
  redis.call('ZADD', tokens, now, nonce .. ':' .. total)
  redis.call('PEXPIRE', tokens, window)
  redis.call('HINCRBY', state, 'wtok', total)
end

-- The spend of the budget's current period, started again when the period turned
-- (lib/calendar.lua: the same boundaries as admit.lua).
if budgeted then
  local first = period_bounds(budget_period, now)
  local start = int(first)
  if period_start == start then
    redis.call('HINCRBY', state, 'bsp', cost)
  else
    redis.call('HSET', state, 'bsp', cost, 'bps', start)
  end
end

-- A lease admitted before this Redis held the key's state (`born`, hydrate.lua) was admitted
-- in an earlier life of Redis: its settlement may repeat one that reached Postgres before that
-- life ended, whose charge `used` was then seeded with. The syncer gives such a repeat's cost
-- back when Postgres already has the event from another settlement (ack.lua).
local earlier_life = '0'
if born and tonumber(admitted_at) < (tonumber(born) or 0) then earlier_life = '1' end

-- One field, the event's values joined by '\31' in this order: event id, key id, user id,
-- cost, input, output and total tokens, response time, status code, provider, api format,
-- model, admitted at, settled at, expired, admitted in an earlier life of Redis (1|0)
-- (`sync/usage.rs` reads it). One argument where
-- named fields took thirty: every argument crosses from Lua into Redis, and the stream stores
-- one value. None of them can hold '\31': ids and numbers do not, and labels and user ids
-- are refused with control characters. A sealed lease's caller sends the first thirteen
-- joined already (ARGV[12]): only the last three are this script's to know.
local head
if sealed then
  head = ARGV[12]
else
  head = event_id .. '\31' .. lease_key .. '\31' .. lease_user .. '\31' .. cost .. '\31'
    .. ARGV[8] .. '\31' .. ARGV[9] .. '\31' .. total .. '\31' .. ARGV[10] .. '\31' .. ARGV[11]
    .. '\31' .. pick(ARGV[12], lease_provider) .. '\31' .. pick(ARGV[13], lease_format) .. '\31'
    .. pick(ARGV[14], lease_model) .. '\31' .. admitted_at
end
redis.call('XADD', stream, '*', 'v', head .. '\31' .. int(now) .. '\31' .. expired .. '\31'
  .. earlier_life)

-- A record (an id from before sealed ids) becomes a tombstone that only answers "duplicate".
if not sealed then redis.call('SET', lease, 'S', 'PX', tomb_ttl) end

return {'settled', expired, available()}
