-- lib/lease_end.lua: freeing a tracked lease's slot and hold when it ends.
--
-- Why a file of its own: settle.lua and release.lua both end leases, and must keep one
-- invariant the same way (admit.lua's header: `held`/`htok` are the sums of `holds`, and
-- nothing is held once `live` is gone). Scripts called by EVALSHA cannot share code, so
-- tollgate prepends this file to both (`src/hot/scripts/`), after lib/holds.lua.

-- Frees a tracked lease: its slot in `live` (`member`: its nonce, or '<nonce>=<hold>' when
-- its hold is in the member, admit.lua's state format 2) and, if it still has one, its hold
-- (`hn` nano-USD, `ht` tokens; `hold` is its raw value or false), from `holds` when `in_hash`
-- says it is there. Then, with no live lease left, nothing is held: this also repairs
-- `held`/`htok` when an idle key's lease keys expired whole, which only `maybe_gone` callers
-- look for: before the state's `lx` (admit.lua) `live` can only be missing once its last
-- lease left, taking its hold along. Returns `held` and `htok` as they are after, and whether
-- they changed: the caller writes them to the state (where the key is hydrated), so that a
-- settlement writes them with its charge in one call.
local function free_lease(live, holds, member, hold, in_hash, hn, ht, held, htok, maybe_gone)
  local changed = false
  if redis.call('ZREM', live, member) == 1 and hold then
    if in_hash then redis.call('HDEL', holds, member) end
    held, htok = held - hn, htok - ht
    changed = hn ~= 0 or ht ~= 0
  end
  if (held ~= 0 or htok ~= 0) and maybe_gone and redis.call('EXISTS', live) == 0 then
    redis.call('DEL', holds)
    held, htok, changed = 0, 0, true
  end
  return held, htok, changed
end
