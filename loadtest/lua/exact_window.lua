-- exact_window.lua: the minimal exact sliding-window rate limiter, the yardstick that the load
-- harness's script-cost phases (`loadtest --script-cost`) measure tollgate's scripts against.
--
-- Why this is the reference (issue #15): it is the least Redis work that still decides an
-- exact sliding window — every admission of the last `window` ms is remembered, so no burst at
-- a window edge can pass the limit, which is the guarantee tollgate's rate log gives. Four
-- commands on one key, nothing else: no key state, no clock call, no leases, no holds, no
-- labels. A tollgate script's Redis time per call divided by this script's, measured on the
-- same Redis in the same run, is a ratio that does not move with the host or the load, and it
-- is what issue #15's goals are stated in. It is not used by tollgate.
--
-- KEYS[1] log  ZSET  member = a unique admission id, score = its admission time (ms)
-- ARGV[1] window (ms)
-- ARGV[2] limit: admissions allowed within any `window` ms
-- ARGV[3] now (ms, the caller's clock)
-- ARGV[4] admission id (unique; the harness sends a nonce the size of tollgate's)
--
-- Returns the admissions left in the window after this one (>= 0), or -1: denied, nothing
-- written.

local log = KEYS[1]
local window = tonumber(ARGV[1])
local now = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', log, '-inf', now - window)
local count = redis.call('ZCARD', log)
if count >= tonumber(ARGV[2]) then return -1 end
redis.call('ZADD', log, now, ARGV[4])
redis.call('PEXPIRE', log, window)
return tonumber(ARGV[2]) - count - 1
