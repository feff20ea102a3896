-- admit_ring.lua: CANDIDATE, not tollgate — a plain-key admission in four calls: the key's
-- configuration folded into one state field, Redis's clock, and an exact window kept as a
-- ring of admission times whose cursor (and the oldest entries' times) live in the state.
--
-- Calling convention of the candidates: KEYS[1] the key's state HASH, KEYS[2] this
-- candidate's own ring STRING; ARGV[1] window (ms), ARGV[2] limit (unused: the state's `rl`
-- decides), ARGV[3] now (unused: TIME), ARGV[4] admission id (unused: a ring keeps times only).
-- The candidate writes its own state fields `ccfg` (folded configuration, built from the
-- plain fields on first use) and `crw` (the ring's cursor).

local state, ring = KEYS[1], KEYS[2]
local window = tonumber(ARGV[1])
local function int(n) return string.format('%.0f', n) end
local cfg, rw = unpack(redis.call('HMGET', state, 'ccfg', 'crw'))
if cfg == false then
  local s = redis.call('HMGET', state, 'id', 'act', 'exp', 'prov', 'fmt', 'mdl', 'rl', 'cl',
    'bal', 'tl', 'bud', 'bper', 'user')
  if s[1] == false then return {'miss'} end
  for i = 1, 13 do s[i] = s[i] or '' end
  cfg = table.concat(s, '\30')
  redis.call('HSET', state, 'ccfg', cfg)
end
local key_id, active, expires, providers, formats, models, rl, cl, bal, tl, bud, bper, user_id =
  string.match(cfg, '^([^\30]*)\30([^\30]*)\30([^\30]*)\30([^\30]*)\30([^\30]*)\30([^\30]*)\30'
    .. '([^\30]*)\30([^\30]*)\30([^\30]*)\30([^\30]*)\30([^\30]*)\30([^\30]*)\30(.*)$')
rl, cl, bal = tonumber(rl), tonumber(cl), tonumber(bal)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if active ~= '1' then return {'deny', 'key_disabled', '0'} end
if expires ~= '' and now >= tonumber(expires) then return {'deny', 'key_expired', '0'} end

local remaining, reset = -1, 0
if rl > 0 then
  local head, tail, cap, newest, deadline, cache = 0, 0, 16, 0, 0, ''
  if rw then
    head, tail, cap, newest, deadline = struct.unpack('>ddddd', rw)
    cache = string.sub(rw, 41)
  end
  local edge = now - window
  if newest <= edge then
    head, tail, cache = 0, 0, ''
  end
  local chunk = 8
  while tail < head do
    if #cache == 0 then
      local at = tail % cap
      local n = math.min(head - tail, chunk, cap - at)
      cache = redis.call('GETRANGE', ring, at * 8, (at + n) * 8 - 1)
      if #cache < 8 then
        tail = head
        cache = ''
        break
      end
      chunk = chunk * 4
    end
    if struct.unpack('>d', cache) > edge then break end
    tail = tail + 1
    cache = string.sub(cache, 9)
  end
  local count = head - tail
  if count >= rl then
    local retry = struct.unpack('>d', cache) + window - now
    if retry < 1 then retry = 1 end
    return {'deny', 'rate_limited', int(retry)}
  end
  if count == cap then
    -- Full ring, limit not reached: grow it, the live entries moved to the front in order.
    local at = tail % cap
    local body = redis.call('GETRANGE', ring, at * 8, cap * 8 - 1)
    if at > 0 then body = body .. redis.call('GETRANGE', ring, 0, at * 8 - 1) end
    cap = math.min(rl, cap * 4)
    redis.call('SET', ring, body)
    deadline = 0
    tail, head = 0, count
  end
  local stamp = math.max(now, newest)
  local slot = struct.pack('>d', stamp)
  redis.call('SETRANGE', ring, (head % cap) * 8, slot)
  if #cache == count * 8 and count < 8 then cache = cache .. slot end
  if #cache > 64 then cache = string.sub(cache, 1, 64) end
  head = head + 1
  if deadline < now + window then
    deadline = now + 2 * window
    redis.call('PEXPIREAT', ring, deadline)
  end
  redis.call('HSET', state, 'crw', struct.pack('>ddddd', head, tail, cap, stamp, deadline) .. cache)
  remaining = rl - count - 1
  reset = struct.unpack('>d', cache) + window - now
end
return {'ok', key_id, user_id, int(rl), int(remaining), int(reset), int(cl), '0', '-1',
  int(now), '0'}
