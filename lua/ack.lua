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
-- ARGV[1] consumer group
-- ARGV[2..] entry ids
-- Returns the number of entries deleted.
--
-- Never half-writes: the ids are checked before XACK (an id XACK took but XDEL refused would
-- leave an acknowledged entry in the stream for ever); a call that fails a check changes
-- nothing and answers an error reply (see settle.lua): LIMIT_EXCEEDED above MAX_IDS ids (the
-- syncer sends at most 500; unpack() has a C-stack limit of its own), INVALID_ARGUMENT for an
-- id that is not `<ms>-<seq>` or an empty group name.

local MAX_IDS = 1000
local function refuse(code, why) return redis.error_reply(code .. ' ' .. why) end
if ARGV[1] == nil or ARGV[1] == '' then return refuse('INVALID_ARGUMENT', 'group') end
if #ARGV - 1 > MAX_IDS then return refuse('LIMIT_EXCEEDED', 'more than 1000 ids') end
local ids = {}
for i = 2, #ARGV do
  local ms, seq = string.match(ARGV[i], '^(%d+)%-(%d+)$')
  if ms == nil or #ms > 20 or #seq > 20 then return refuse('INVALID_ARGUMENT', 'entry id') end
  ids[#ids + 1] = ARGV[i]
end
if #ids == 0 then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
return redis.call('XDEL', KEYS[1], unpack(ids))
