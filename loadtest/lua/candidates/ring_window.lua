-- ring_window.lua: CANDIDATE, not tollgate — an exact sliding window kept as a ring of the last
-- `limit` admission times in one string, measured by `loadtest --script-cost-candidates`.
--
-- Why a ring decides exactly: the slot about to be overwritten holds the oldest of the last
-- `limit` admissions; if it is still inside the window, `limit` admissions are, and this one
-- must be denied. Two GETRANGEs and two SETRANGEs of fixed 8-byte slots, whatever the limit:
-- O(1) Redis work against the sorted set's O(log n) and its per-entry allocations. The cost is
-- memory: 8 bytes per unit of limit (a limit of 1,000,000 is an 8 MB string), so a real design
-- needs a fallback (the sorted set) above some limit.
--
-- Calling convention of the candidates (the harness gives every candidate the same):
-- KEYS[1] a plain tollgate key's state HASH (unused here)
-- KEYS[2] this candidate's own key for that API key: here the ring STRING, an 8-byte cursor
--         (the next slot to overwrite) then `limit` slots; all doubles, big-endian
-- ARGV[1] window (ms)   ARGV[2] limit   ARGV[3] now (ms, the caller's clock)
-- ARGV[4] admission id (unused here)
-- Returns >= 0 (allowed) or -1 (denied, nothing written).

local ring = KEYS[2]
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local head = redis.call('GETRANGE', ring, 0, 7)
local cursor = 0
if #head == 8 then cursor = struct.unpack('>d', head) end
local at = 8 + cursor * 8
local oldest = redis.call('GETRANGE', ring, at, at + 7)
if #oldest == 8 and struct.unpack('>d', oldest) > now - window then return -1 end
redis.call('SETRANGE', ring, at, struct.pack('>d', now))
redis.call('SETRANGE', ring, 0, struct.pack('>d', (cursor + 1) % limit))
redis.call('PEXPIRE', ring, window)
return 0
