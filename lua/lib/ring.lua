-- lib/ring.lua: the exact sliding window of admissions, kept as a ring of admission times in
-- one string, with its cursor in the key's state.
--
-- Why a ring and not a sorted set: a sorted set decides the window in five calls
-- (ZREMRANGEBYSCORE, ZCARD, ZADD, PEXPIRE, ZRANGE for the reset time); the ring in one write
-- (SETRANGE of the new time) plus the cursor's write (an HSET the admission shares with
-- nothing else), because what the decision needs is in the cursor the admission already read
-- with the configuration: how many admissions the window holds, and the times of the oldest
-- ones. Every slot is the same size, so Redis never copies the ring into Lua whole (a string
-- log that Lua reads and writes whole was measured slower than the sorted set: see
-- docs/PERFORMANCE.md).
--
-- The ring (KEYS[2] of admit.lua, a STRING): slot i (of `cap`) holds, as a 6-byte big-endian
-- integer, the time in ms of the admission whose absolute index is congruent to i mod `cap`.
-- The cursor (state field `rw`, at most 62 bytes, so that the state stays a listpack; see
-- lib/config.lua): `head` (absolute index of the next admission) and `tail` (of the oldest
-- admission still counted) as doubles, `cap` (4 bytes), `newest` (the latest time written)
-- and `deadline` (when the ring expires, as last set; 6 bytes each), then the times of up to
-- 5 of the oldest counted admissions (tail, tail + 1, ...), so that entries leave the window
-- without a read of the ring until those are used up.
--
-- Exactness: the window holds admissions tail .. head - 1, in time order: the window's clock
-- is Redis's, held at `newest` while Redis's steps back behind it (a step back counts as no
-- time passing, so entries leave later, never sooner, and one that left stays gone). An
-- admission is refused when head - tail reaches the limit, so no interval of `window` ms ever
-- holds more than `limit` admissions; the load harness checks it against every admission it
-- saw. The ring grows (by four, moving its entries in order) when it is full below the limit,
-- so it holds at most four times the window's peak, never the limit's worth; it stops at
-- RING_MAX slots (96 MB), which is then the limit in force: a rate limit above 16,777,216
-- admissions per window is enforced as 16,777,216.
--
-- The ring expires after its deadline, set to twice the window ahead whenever fewer than one
-- window is left: one PEXPIREAT per window instead of one per admission. The deadline only
-- moves later, so a replica with a shorter window never cuts one with a longer window short.
-- A ring that is gone (expired after an idle window, or evicted) counts nothing: its cursor's
-- `newest` is then outside the window, or its read comes back short.

local RING_MAX = 16777216
local RING_MIN = 16
local SLOT = 6
local CACHED = 5
local CURSOR = '>ddi4i6i6'
local CURSOR_LEN = 32


-- The window at `now`: head, tail, cap, deadline, the cache of the oldest times, and the
-- window's clock, after every entry at or before clock - window has left; or nil when the
-- cursor is not one. The clock is `now`, or `newest` if Redis's clock stepped back behind it:
-- a window never runs backwards, so an entry that left it stays gone.
local function ring_read(ring, rw, now, window)
  local head, tail, cap, newest, deadline, cache = 0, 0, RING_MIN, 0, 0, ''
  if rw then
    if #rw < CURSOR_LEN or (#rw - CURSOR_LEN) % SLOT ~= 0 then return nil end
    head, tail, cap, newest, deadline = struct.unpack(CURSOR, rw)
    if not (tail >= 0 and head >= tail and cap >= 1 and head - tail <= cap and head % 1 == 0
      and tail % 1 == 0 and cap % 1 == 0) then
      return nil
    end
    cache = string.sub(rw, CURSOR_LEN + 1)
  end
  local clock = now
  if newest > clock then clock = newest end
  local edge = clock - window
  -- Idle for a whole window: nothing counts, and the ring starts again at slot 0.
  if newest <= edge then return 0, 0, cap, deadline, '', clock end
  -- Leaving entries, from the cache, then from the ring in growing reads: each entry is read
  -- at most once, so this is amortized O(1) however long the window.
  local chunk = 8
  while tail < head do
    if cache == '' then
      local at = tail % cap
      local n = math.min(head - tail, chunk, cap - at)
      cache = redis.call('GETRANGE', ring, at * SLOT, (at + n) * SLOT - 1)
      if #cache ~= n * SLOT then return head, head, cap, deadline, '', clock end
      chunk = math.min(chunk * 4, 4096)
    end
    if struct.unpack('>i6', cache) > edge then break end
    tail = tail + 1
    cache = string.sub(cache, SLOT + 1)
  end
  return head, tail, cap, deadline, cache, clock
end

-- The time of the admission `k` places after the tail (0 = the oldest counted), or nil when
-- the ring no longer holds it.
local function ring_time(ring, tail, cap, cache, k)
  if #cache >= (k + 1) * SLOT then return (struct.unpack('>i6', cache, k * SLOT + 1)) end
  local at = (tail + k) % cap
  local slot = redis.call('GETRANGE', ring, at * SLOT, at * SLOT + SLOT - 1)
  if #slot ~= SLOT then return nil end
  return (struct.unpack('>i6', slot))
end

-- Writes one admission at the window's clock (ring_read's) and answers the new cursor and the
-- time of the oldest counted admission. `limit` is the key's rate limit; the caller has
-- checked head - tail is below it (and below RING_MAX).
local function ring_add(ring, head, tail, cap, deadline, cache, limit, clock, window)
  local count = head - tail
  if count == cap then
    -- Full below the limit: grow, the counted entries moved to the front in order. SET drops
    -- the expiry; the deadline below sets it again.
    local at = tail % cap
    local body = redis.call('GETRANGE', ring, at * SLOT, cap * SLOT - 1)
    if at > 0 then body = body .. redis.call('GETRANGE', ring, 0, at * SLOT - 1) end
    cap = math.min(math.max(limit, RING_MIN), cap * 4, RING_MAX)
    deadline = 0
    if #body == count * SLOT then
      redis.call('SET', ring, body)
      head, tail = count, 0
    else
      -- The ring is gone (evicted): nothing of it counts.
      redis.call('DEL', ring)
      head, tail, count, cache = 0, 0, 0, ''
    end
  end
  local slot = struct.pack('>i6', clock)
  redis.call('SETRANGE', ring, (head % cap) * SLOT, slot)
  if #cache == count * SLOT and count < CACHED then cache = cache .. slot end
  if #cache > CACHED * SLOT then cache = string.sub(cache, 1, CACHED * SLOT) end
  if deadline < clock + window then
    deadline = clock + 2 * window
    redis.call('PEXPIREAT', ring, deadline)
  end
  return struct.pack(CURSOR, head + 1, tail, cap, clock, deadline) .. cache,
    (struct.unpack('>i6', cache))
end
