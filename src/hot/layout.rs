//! Redis key names: which hash slot an API key's state lives in.
//!
//! Every key of one API key — its state, rate log, live leases, holds, lease records — and the
//! usage stream of its shard carry the same hash tag `{<ns>.<shard>}`, so each script touches a
//! single slot and runs unchanged on Redis Cluster. The shard (16 of them) is the first hex
//! digit of the key's SHA-256; the per-key name is the first 128 bits of that hash (the
//! "state id"), which also prefixes every lease id so that a settlement finds the key's slot
//! from the lease id alone.

use base64::Engine as _;
use rand::RngCore;

/// Usage-stream shards. Fixed: changing it would strand events in streams nobody reads.
pub const SHARDS: u8 = 16;
const SID_LEN: usize = 32;
const NONCE_BYTES: usize = 16;
const NONCE_LEN: usize = 22;

#[derive(Debug, Clone)]
pub struct Layout {
    ns: String,
}

/// The Redis keys of one API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRedisKeys {
    pub state: String,
    /// The rate ring (`lua/lib/ring.lua`).
    pub rate: String,
    pub live: String,
    pub holds: String,
    /// The token window (settled tokens within the rate window).
    pub tokens: String,
    prefix: String,
    sid: String,
}

impl KeyRedisKeys {
    pub fn lease(&self, nonce: &str) -> String {
        format!("{}l:{nonce}", self.prefix)
    }
    pub fn stream(&self) -> String {
        format!("{}u", self.prefix)
    }
    pub fn lease_id(&self, nonce: &str) -> String {
        format!("{}.{nonce}", self.sid)
    }
}

/// The key state of the API key whose usage event `event_id` (`<sid>.<nonce>`) is in the shard
/// stream `stream`: the stream and the state share the shard's prefix. `None` for an id that
/// is not one.
pub(crate) fn state_of_event(stream: &str, event_id: &str) -> Option<String> {
    let prefix = stream.strip_suffix('u')?;
    let (sid, _) = event_id.split_once('.')?;
    let sid_ok = sid.len() == SID_LEN
        && sid
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    sid_ok.then(|| format!("{prefix}k:{sid}"))
}

impl Layout {
    pub fn new(ns: &str) -> Self {
        Layout { ns: ns.to_string() }
    }

    fn shard_prefix(&self, shard: u8) -> String {
        format!("{ns}:{{{ns}.{shard:x}}}:", ns = self.ns)
    }

    /// Keys of the API key whose SHA-256 hex is `key_hash`.
    pub fn for_hash(&self, key_hash: &str) -> KeyRedisKeys {
        self.for_sid(&key_hash[..SID_LEN.min(key_hash.len())])
    }

    fn for_sid(&self, sid: &str) -> KeyRedisKeys {
        let shard = sid.chars().next().and_then(|c| c.to_digit(16)).unwrap_or(0) as u8;
        let prefix = self.shard_prefix(shard);
        KeyRedisKeys {
            state: format!("{prefix}k:{sid}"),
            // `q:`, not the `r:` of the sorted-set log before the rate ring: a ring written
            // over an old log would be the wrong type, and the old logs expire by themselves.
            rate: format!("{prefix}q:{sid}"),
            live: format!("{prefix}c:{sid}"),
            holds: format!("{prefix}h:{sid}"),
            tokens: format!("{prefix}w:{sid}"),
            sid: sid.to_string(),
            prefix,
        }
    }

    /// Set once every key of the namespace has been loaded into Redis; its absence means the
    /// namespace lost its state. Tagged like shard 0, so every key of a namespace has a tag.
    pub(crate) fn loaded_marker(&self) -> String {
        format!("{}loaded", self.shard_prefix(0))
    }

    /// Held, with a TTL, by the replica that is loading the namespace.
    pub(crate) fn loading_lock(&self) -> String {
        format!("{}loading", self.shard_prefix(0))
    }

    /// The usage stream of each shard.
    pub fn streams(&self) -> Vec<String> {
        (0..SHARDS)
            .map(|s| format!("{}u", self.shard_prefix(s)))
            .collect()
    }

    /// The keys and nonce named by a lease id's head `<sid>.<nonce>`; `None` for anything
    /// tollgate could not have issued (the sealed rest is `hot::lease_id`'s).
    pub(super) fn lease(&self, head: &str) -> Option<(KeyRedisKeys, String)> {
        let (sid, nonce) = head.split_once('.')?;
        let sid_ok = sid.len() == SID_LEN
            && sid
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let nonce_ok = nonce.len() == NONCE_LEN
            && nonce
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !(sid_ok && nonce_ok) {
            return None;
        }
        Some((self.for_sid(sid), nonce.to_string()))
    }
}

/// A fresh lease nonce: 128 random bits, URL-safe.
pub fn new_nonce() -> String {
    let mut bytes = [0u8; NONCE_BYTES];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_keys_of_a_key_share_one_hash_tag() {
        let layout = Layout::new("tg");
        let hash = "a3".repeat(32);
        let k = layout.for_hash(&hash);
        let tag = |s: &str| {
            let open = s.find('{').unwrap();
            let close = s[open..].find('}').unwrap() + open;
            s[open + 1..close].to_string()
        };
        let nonce = new_nonce();
        for name in [
            &k.state,
            &k.rate,
            &k.live,
            &k.holds,
            &k.lease(&nonce),
            &k.stream(),
        ] {
            assert!(name.starts_with("tg:"), "{name}");
            assert_eq!(tag(name), "tg.a");
        }
    }

    #[test]
    fn an_events_state_is_named_from_its_stream_and_id() {
        let k = Layout::new("tg").for_hash(&"c4".repeat(32));
        let id = k.lease_id(&new_nonce());
        assert_eq!(state_of_event(&k.stream(), &id), Some(k.state.clone()));
        assert_eq!(state_of_event(&k.stream(), "nodot"), None);
        assert_eq!(state_of_event("not-a-stream", &id), None);
    }

    #[test]
    fn lease_id_heads_round_trip_and_garbage_is_refused() {
        let layout = Layout::new("tg");
        let k = layout.for_hash(&"0f".repeat(32));
        let nonce = new_nonce();
        let id = k.lease_id(&nonce);
        let (keys, parsed) = layout.lease(&id).unwrap();
        assert_eq!(keys, k);
        assert_eq!(parsed, nonce);
        for bad in [
            "",
            "x.y",
            "not-a-lease",
            &format!("{}.short", "0".repeat(32)),
            &id.to_uppercase(),
        ] {
            assert!(layout.lease(bad).is_none(), "{bad}");
        }
    }
}
