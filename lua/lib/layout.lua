-- lib/layout.lua: the names of an API key's other Redis keys, from the name of its state.
--
-- Why: an admission of a plain key touches only the key's state and rate ring, and every key
-- name an EVALSHA carries costs Redis a conversion, long as these names are. So admit.lua and
-- settle.lua declare in KEYS the keys every call touches, and name the others (live leases,
-- holds, token window) from the state when a call needs them. The rule is
-- src/hot/layout.rs's (`for_sid`): '<prefix>k:<sid>' for the state, '<prefix><kind>:<sid>'
-- for the others, the prefix holding the shard's hash tag, so each is in the state's hash slot
-- (Redis Cluster refuses a script that touches a key of another slot than the keys it
-- declared). A sid is 32 characters.

local function sibling(state, kind)
  return string.sub(state, 1, -35) .. kind .. string.sub(state, -33)
end
