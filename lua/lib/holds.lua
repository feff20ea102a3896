-- lib/holds.lua: reading a lease's hold.
--
-- Why a file of its own: admit.lua (the holds of expired leases), settle.lua and release.lua
-- all read a hold as admit.lua wrote it, and scripts called by EVALSHA cannot share code, so
-- tollgate prepends this file to each (`src/hot/scripts/`). Giving a lease's slot and hold
-- back is lib/lease_end.lua's, which admit.lua does not carry: every function a script defines
-- is a closure it makes on every call, about 70 ns of Redis time (docs/PERFORMANCE.md).

-- A hold is 'nanos' or 'nanos:tokens' (admit.lua writes it); nil when it is not whole numbers.
local function hold_of(h)
  local n, t = string.match(h, '^(%-?%d+):(%d+)$')
  if n then n, t = tonumber(n), tonumber(t) else n, t = tonumber(h), 0 end
  if n == nil or n ~= math.floor(n) then return nil end
  return n, t
end
