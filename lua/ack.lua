-- ack.lua: acknowledge usage events that are in Postgres, and remove them from the stream.
--
-- Why one script: XACK and XDEL as two commands can be separated by a dropped connection or a
-- crash. An entry acknowledged but not deleted is never delivered again, yet stays in the
-- stream for ever, counted by the backlog gauges (XLEN, oldest entry) as usage still waiting.
-- Together they either both happen or neither does (and the batch is simply re-delivered; the
-- insert ignores events it already has).
--
-- KEYS[1] stream  STREAM  a shard's usage stream
-- ARGV[1] consumer group
-- ARGV[2..] entry ids
-- Returns the number of entries deleted.

local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
if #ids == 0 then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
return redis.call('XDEL', KEYS[1], unpack(ids))
