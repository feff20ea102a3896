-- lib/config.lua: the numbers of a key's configuration folded into one small binary state
-- field, `cfn`.
--
-- Why: admit.lua reads the configuration on every admission, and every field a script reads
-- costs a conversion into Lua, then a `tonumber`. Folded, a plain admission reads three short
-- fields (`cfn`, the rate ring's cursor `rw`, `ver`) where it read twenty, and
-- the numbers come out of `struct.unpack` as numbers. The allow-lists stay named fields, read
-- only when a flag here says the key has one. The field is 44 bytes: Redis keeps a hash whose
-- values are all at most 64 bytes as a listpack, about a third of the memory of the hashtable
-- it converts to otherwise.
-- hydrate.lua writes it with the named fields (which settle.lua and release.lua still read);
-- admit.lua folds it itself when it is missing or older than `ver` (state written by a
-- tollgate from before this field, or by one during a rolling upgrade).
--
-- Layout (big-endian, signed): version (7 bytes), flags (1 byte: 1 active, 2 providers
-- restricted, 4 api formats restricted, 8 models restricted, 16 x the budget period: 0 never
-- resets, 1 day, 2 week, 3 month; 64 expires), expires_at ms (7; any value, before 1970
-- too, when flag 64 is set; 0 otherwise), rate limit (4), concurrent
-- limit (4), balance nano-USD (7), token limit (7), budget nano-USD (7); -1 = unlimited / none
-- for each. Every number is a whole number within its width (hydrate.lua's checks: below 2^53,
-- limits from 32-bit columns).

local CONFIG_FORMAT = '>i7Bi7i4i4i7i7i7'

-- `expires` is nil for a key that never expires.
local function pack_config(ver, active, expires, rl, cl, bal, tl, bud, period, prov, fmt, mdl)
  local flags = active
  if expires then
    flags = flags + 64
  else
    expires = 0
  end
  if prov ~= '' then flags = flags + 2 end
  if fmt ~= '' then flags = flags + 4 end
  if mdl ~= '' then flags = flags + 8 end
  if period == 'day' then
    flags = flags + 16
  elseif period == 'week' then
    flags = flags + 32
  elseif period == 'month' then
    flags = flags + 48
  end
  return struct.pack(CONFIG_FORMAT, ver, flags, expires, rl, cl, bal, tl, bud)
end

-- true, then version, flags, expires, rl, cl, bal, tl, bud; or false for a field that is not
-- one (any 44 bytes unpack: the length is the check struct needs). Of the flags, callers
-- test `flags % 2 == 1` (active), `flags % 16 >= 2` (an allow-list) and `flags >= 64` (an
-- expiry) themselves: this runs on every admission, where each function call counts.
local function unpack_config(cfn)
  if #cfn ~= 44 then return false end
  return true, struct.unpack(CONFIG_FORMAT, cfn)
end

-- The budget period's name from the flags.
local function config_period(flags)
  local p = math.floor(flags / 16) % 4
  if p == 1 then return 'day' elseif p == 2 then return 'week' elseif p == 3 then return 'month' end
  return ''
end
