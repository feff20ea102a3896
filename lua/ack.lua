-- ack.lua: acknowledge usage events that are in Postgres, and remove them from the stream.
--
-- Why one script: XACK and XDEL as two commands can be separated by a dropped connection or a
-- crash. An entry acknowledged but not deleted is never delivered again, yet stays in the
-- stream for ever, counted by the backlog gauges (XLEN, oldest entry) as usage still waiting.
-- Together they either both happen or neither does (and the batch is simply re-delivered; the
-- insert ignores events it already has).
--
-- The Rust side of this contract (arguments in this order, the reply read) is
-- src/hot/scripts/ack.rs.
-- KEYS[1] stream  STREAM  a shard's usage stream
-- KEYS[2..] state HASH    the key state of each entry given back a charge, in ARGV's order
-- ARGV[1] consumer group
-- ARGV[2..] entry ids; `<id>=<nano-USD>` gives that much back to the `used` of the next state
--         in KEYS, if and only if this call acknowledges the entry: a settlement admitted in
--         an earlier life of Redis that Postgres already had from another settlement was
--         charged twice in Redis (settle.lua), and the syncer found out (sync/usage.rs).
--         Inside this script, the give-back happens exactly once: a redelivered batch finds
--         the entry acknowledged and deleted, or the first call never happened.
-- Returns the number of entries deleted.
--
-- Never half-writes: the ids are checked before XACK (an id XACK took but XDEL refused would
-- leave an acknowledged entry in the stream for ever); a call that fails a check changes
-- nothing and answers an error reply (see settle.lua): LIMIT_EXCEEDED above MAX_IDS ids (the
-- syncer sends at most 500; unpack() has a C-stack limit of its own), INVALID_ARGUMENT for an
-- id that is not `<ms>-<seq>` (optionally `=<at most 16 digits>`), an empty group name, or a
-- count of give-backs other than the count of state keys.

local MAX_IDS = 1000
local function refuse(code, why) return redis.error_reply(code .. ' ' .. why) end
if ARGV[1] == nil or ARGV[1] == '' then return refuse('INVALID_ARGUMENT', 'group') end
if #ARGV - 1 > MAX_IDS then return refuse('LIMIT_EXCEEDED', 'more than 1000 ids') end
local ids, back = {}, {}
for i = 2, #ARGV do
  local ms, seq, nanos = string.match(ARGV[i], '^(%d+)%-(%d+)=?(%d*)$')
  if ms == nil or #ms > 20 or #seq > 20 or #nanos > 16
    or (nanos == '' and string.find(ARGV[i], '=', 1, true)) then
    return refuse('INVALID_ARGUMENT', 'entry id')
  end
  local id = ms .. '-' .. seq
  ids[#ids + 1] = id
  if nanos ~= '' then back[#back + 1] = {id, nanos} end
end
if #back ~= #KEYS - 1 then return refuse('INVALID_ARGUMENT', 'give-backs and state keys') end
for i = 2, #KEYS do
  local used = redis.call('HGET', KEYS[i], 'used')
  if used and not string.find(used, '^%-?%d+$') then
    return redis.error_reply('CORRUPT_STATE a counter of the key state is not a whole number')
  end
end
if #ids == 0 then return 0 end
for i, b in ipairs(back) do
  local state = KEYS[i + 1]
  if redis.call('XACK', KEYS[1], ARGV[1], b[1]) == 1 and redis.call('EXISTS', state) == 1 then
    redis.call('HINCRBY', state, 'used', '-' .. b[2])
  end
end
redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
return redis.call('XDEL', KEYS[1], unpack(ids))
