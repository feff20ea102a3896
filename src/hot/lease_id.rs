//! Sealed lease ids: what settling a lease needs, carried in the id and signed with a MAC.
//!
//! Why: a lease record written by every admission was the largest part of admit.lua's Redis
//! time and of its memory (issue #15). The id now carries the facts — the key's state id, a
//! nonce, whether the lease is tracked in the live set (and in state format 2 what it holds),
//! key and user id, provider, API format, model, admission and expiry times — as `<sid>.<nonce>.<body>`, the body being
//! `base64url(payload || HMAC-SHA256(secret, context || sid || nonce || payload)[..16])`. The
//! MAC binds the id to its namespace, so an id of another namespace, an altered id or a forged
//! one does not open, and settlement never reads Redis to learn what a lease was. Duplicates
//! are still caught by the tombstone settle.lua writes, which lives as long as the id is valid
//! (its [`LeaseFacts::deadline_ms`]).
//!
//! Every replica that settles another's leases must share the secret: by default it is derived
//! from `TOLLGATE_ENCRYPTION_KEY`, which they share already; `TOLLGATE_LEASE_SECRET` sets it
//! and `TOLLGATE_LEASE_SECRET_PREVIOUS` keeps ids sealed before a rotation valid.

use std::fmt;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::admission::LATE_SETTLE_GRACE;
use super::layout::{KeyRedisKeys, Layout};

type HmacSha256 = Hmac<Sha256>;

const VERSION: u8 = 1;
const FLAG_TRACKED: u8 = 1;
/// The lease's hold is in its live-set member (state format 2), and follows the labels: a
/// releaser or settler needs it to name that member. Releases before state format 2 refuse an
/// id with it (trailing bytes), which is why format 2 waits until every replica reads it.
const FLAG_MEMBER_HOLD: u8 = 2;
const TAG_LEN: usize = 16;
/// What the MAC covers besides the id: the format and the namespace.
const CONTEXT: &[u8] = b"tollgate lease id v1\0";
/// Label of the secret derived from the encryption key.
const DERIVE_LABEL: &[u8] = b"tollgate lease-id secret v1";
/// An id longer than this is not one tollgate issued (four labels of at most 1,024 bytes).
const MAX_BODY_LEN: usize = 8192;

/// The secrets lease ids are sealed and opened with. Never printed.
#[derive(Clone)]
pub struct LeaseSecrets {
    current: Vec<u8>,
    previous: Option<Vec<u8>>,
    /// Derived from nothing shared: a random secret of this process only.
    pub(crate) ephemeral: bool,
}

impl fmt::Debug for LeaseSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseSecrets(<redacted>)")
    }
}

impl LeaseSecrets {
    /// Secrets given as settings (at least 32 bytes each).
    pub(crate) fn new(current: &[u8], previous: Option<&[u8]>) -> Self {
        LeaseSecrets {
            current: current.to_vec(),
            previous: previous.map(<[u8]>::to_vec),
            ephemeral: false,
        }
    }

    /// The secret every replica can compute from the encryption key they share.
    pub(crate) fn derived_from(encryption_key: &[u8], previous: Option<&[u8]>) -> Self {
        let mut mac = mac(encryption_key);
        mac.update(DERIVE_LABEL);
        let derived = mac.finalize().into_bytes();
        LeaseSecrets::new(&derived, previous)
    }

    /// A random secret: ids this process seals open nowhere else and not after a restart.
    pub(crate) fn random() -> Self {
        let mut s = vec![0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut s);
        LeaseSecrets {
            ephemeral: true,
            ..LeaseSecrets::new(&s, None)
        }
    }
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length.
    <HmacSha256 as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!())
}

/// What a tracked lease holds when its live-set member carries it, `<nonce>=<hold>` (state
/// format 2, `lua/admit.lua`): settle.lua and release.lua name the member from it and read no
/// `holds` hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberHold {
    pub nanos: i64,
    pub tokens: i64,
}

impl MemberHold {
    /// `=<hold>` as admit.lua appends it to the nonce: nano-USD, then `:tokens` when the lease
    /// holds tokens.
    pub fn suffix(&self) -> String {
        if self.tokens > 0 {
            format!("={}:{}", self.nanos, self.tokens)
        } else {
            format!("={}", self.nanos)
        }
    }
}

/// What a lease was granted for: everything settlement records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseFacts {
    /// In the key's live set (and its holds): the key has a concurrency limit, or the lease
    /// holds balance or tokens. Settling or releasing an untracked lease touches neither.
    pub tracked: bool,
    /// The hold its live-set member carries (state format 2); `None` when the lease holds
    /// nothing or its hold is in the key's `holds` hash. `Some` only for a tracked lease.
    pub member_hold: Option<MemberHold>,
    pub key_id: String,
    pub user_id: String,
    pub provider: String,
    pub api_format: String,
    pub model: String,
    pub admitted_at_ms: i64,
    pub expires_at_ms: i64,
}

impl LeaseFacts {
    /// Until when the lease can be settled: a call that outran its lease is still charged.
    pub fn deadline_ms(&self) -> i64 {
        let grace = i64::try_from(LATE_SETTLE_GRACE.as_millis()).unwrap_or(i64::MAX);
        self.expires_at_ms.saturating_add(grace)
    }
}

/// A lease id taken apart.
#[derive(Debug, Clone)]
pub struct LeaseRef {
    pub keys: KeyRedisKeys,
    pub nonce: String,
    /// `<sid>.<nonce>`: the usage event's idempotency id, and what names the tombstone.
    pub event_id: String,
    /// `None`: an id issued before sealed ids, whose facts are in its record in Redis.
    pub facts: Option<LeaseFacts>,
}

/// Seals and opens lease ids of one namespace.
#[derive(Clone)]
pub struct LeaseSeal {
    layout: Layout,
    namespace: String,
    secrets: LeaseSecrets,
}

impl LeaseSeal {
    pub fn new(namespace: &str, secrets: LeaseSecrets) -> Self {
        LeaseSeal {
            layout: Layout::new(namespace),
            namespace: namespace.to_string(),
            secrets,
        }
    }

    /// The MAC over what a sealed id vouches for: the format, the namespace, the head and the
    /// payload.
    fn mac_of(&self, secret: &[u8], head: &str, payload: &[u8]) -> HmacSha256 {
        let mut m = mac(secret);
        m.update(CONTEXT);
        m.update(self.namespace.as_bytes());
        m.update(b"\0");
        m.update(head.as_bytes());
        m.update(b"\0");
        m.update(payload);
        m
    }

    fn tag(&self, secret: &[u8], head: &str, payload: &[u8]) -> [u8; TAG_LEN] {
        let full = self.mac_of(secret, head, payload).finalize().into_bytes();
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    /// The id of a lease of `keys` with this nonce and these facts.
    pub fn seal(&self, keys: &KeyRedisKeys, nonce: &str, facts: &LeaseFacts) -> String {
        let head = keys.lease_id(nonce);
        let mut payload = Vec::with_capacity(
            18 + 8
                + facts.key_id.len()
                + facts.user_id.len()
                + facts.provider.len()
                + facts.api_format.len()
                + facts.model.len(),
        );
        payload.push(VERSION);
        let mut flags = 0;
        if facts.tracked || facts.member_hold.is_some() {
            flags |= FLAG_TRACKED;
        }
        if facts.member_hold.is_some() {
            flags |= FLAG_MEMBER_HOLD;
        }
        payload.push(flags);
        payload.extend_from_slice(&facts.admitted_at_ms.to_be_bytes());
        payload.extend_from_slice(&facts.expires_at_ms.to_be_bytes());
        for s in [
            &facts.key_id,
            &facts.user_id,
            &facts.provider,
            &facts.api_format,
            &facts.model,
        ] {
            // Every label is bounded far below 64 KiB where it enters (the HTTP edge, the
            // admin API); a longer one is cut rather than corrupting the layout.
            let bytes = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
            payload.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            payload.extend_from_slice(bytes);
        }
        if let Some(h) = facts.member_hold {
            payload.extend_from_slice(&h.nanos.to_be_bytes());
            payload.extend_from_slice(&h.tokens.to_be_bytes());
        }
        let tag = self.tag(&self.secrets.current, &head, &payload);
        payload.extend_from_slice(&tag);
        let body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload);
        format!("{head}.{body}")
    }

    /// Parses and verifies a lease id; `None` for anything tollgate did not issue in this
    /// namespace with a secret it still holds.
    pub(crate) fn open(&self, lease_id: &str) -> Option<LeaseRef> {
        let (head, body) = match lease_id.rsplit_once('.') {
            Some((h, b)) if h.contains('.') => (h, Some(b)),
            _ => (lease_id, None),
        };
        let (keys, nonce) = self.layout.lease(head)?;
        let event_id = head.to_string();
        let Some(body) = body else {
            return Some(LeaseRef {
                keys,
                nonce,
                event_id,
                facts: None,
            });
        };
        if body.len() > MAX_BODY_LEN {
            return None;
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .ok()?;
        if raw.len() < TAG_LEN {
            return None;
        }
        let (payload, tag) = raw.split_at(raw.len() - TAG_LEN);
        // Constant-time: a forger learns nothing from how long a refusal takes.
        let verifies = |secret: &[u8]| {
            self.mac_of(secret, head, payload)
                .verify_truncated_left(tag)
                .is_ok()
        };
        if !verifies(&self.secrets.current)
            && !self.secrets.previous.as_deref().is_some_and(verifies)
        {
            return None;
        }
        Some(LeaseRef {
            keys,
            nonce,
            event_id,
            facts: Some(decode(payload)?),
        })
    }
}

/// The payload's fields; `None` if it is not the layout [`LeaseSeal::seal`] writes.
fn decode(payload: &[u8]) -> Option<LeaseFacts> {
    let mut r = Reader(payload);
    if r.take(1)? != [VERSION] {
        return None;
    }
    let flags = r.take(1)?[0];
    let admitted_at_ms = i64::from_be_bytes(r.take(8)?.try_into().ok()?);
    let expires_at_ms = i64::from_be_bytes(r.take(8)?.try_into().ok()?);
    let mut facts = LeaseFacts {
        tracked: flags & FLAG_TRACKED != 0,
        member_hold: None,
        key_id: r.string()?,
        user_id: r.string()?,
        provider: r.string()?,
        api_format: r.string()?,
        model: r.string()?,
        admitted_at_ms,
        expires_at_ms,
    };
    if flags & FLAG_MEMBER_HOLD != 0 {
        let mut number = || r.take(8)?.try_into().ok().map(i64::from_be_bytes);
        let (nanos, tokens) = (number()?, number()?);
        facts.member_hold = Some(MemberHold { nanos, tokens });
    }
    // A hold in a member is a tracked lease's: the seal never writes one without the other.
    let consistent = facts.tracked || facts.member_hold.is_none();
    (consistent && r.0.is_empty()).then_some(facts)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn string(&mut self) -> Option<String> {
        let len = u16::from_be_bytes(self.take(2)?.try_into().ok()?);
        String::from_utf8(self.take(usize::from(len))?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hot::layout::new_nonce;

    fn facts() -> LeaseFacts {
        LeaseFacts {
            tracked: true,
            member_hold: None,
            key_id: "6f1c2c1e-8d0a-4b7e-9f43-2a3b4c5d6e7f".into(),
            user_id: "u-1".into(),
            provider: "openai".into(),
            api_format: "openai:chat".into(),
            model: "gpt-4o".into(),
            admitted_at_ms: 1_700_000_000_000,
            expires_at_ms: 1_700_000_600_000,
        }
    }

    fn sealed(seal: &LeaseSeal) -> String {
        let keys = Layout::new("ns").for_hash(&"ab".repeat(32));
        seal.seal(&keys, &new_nonce(), &facts())
    }

    #[test]
    fn a_sealed_id_opens_to_its_facts() {
        let seal = LeaseSeal::new("ns", LeaseSecrets::new(&[7; 32], None));
        let id = sealed(&seal);
        let opened = seal.open(&id).expect("opens");
        assert_eq!(opened.facts, Some(facts()));
        assert!(id.starts_with(&opened.event_id));
    }

    #[test]
    fn a_hold_in_the_live_member_is_sealed_with_the_rest_and_names_the_member() {
        let seal = LeaseSeal::new("ns", LeaseSecrets::new(&[7; 32], None));
        let keys = Layout::new("ns").for_hash(&"ab".repeat(32));
        for (hold, suffix) in [
            (
                MemberHold {
                    nanos: 1_500_000_000,
                    tokens: 0,
                },
                "=1500000000",
            ),
            (
                MemberHold {
                    nanos: 0,
                    tokens: 4096,
                },
                "=0:4096",
            ),
            (
                MemberHold {
                    nanos: 9_007_199_254_740_991,
                    tokens: 7,
                },
                "=9007199254740991:7",
            ),
        ] {
            let facts = LeaseFacts {
                member_hold: Some(hold),
                ..facts()
            };
            let id = seal.seal(&keys, &new_nonce(), &facts);
            let opened = seal.open(&id).and_then(|l| l.facts).expect("opens");
            assert_eq!(opened, facts);
            assert_eq!(hold.suffix(), suffix);
        }
        // An id without it opens without it: leases taken before the format changed.
        let plain = seal
            .open(&sealed(&seal))
            .and_then(|l| l.facts)
            .expect("opens");
        assert_eq!(plain.member_hold, None);
    }

    #[test]
    fn an_altered_byte_anywhere_makes_the_id_unknown() {
        let seal = LeaseSeal::new("ns", LeaseSecrets::new(&[7; 32], None));
        let id = sealed(&seal);
        for i in 0..id.len() {
            let mut bytes = id.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let altered = String::from_utf8(bytes).expect("ascii");
            if altered != id {
                assert!(seal.open(&altered).is_none(), "byte {i}: {altered}");
            }
        }
    }

    #[test]
    fn another_namespace_or_secret_does_not_open_it() {
        let seal = LeaseSeal::new("ns", LeaseSecrets::new(&[7; 32], None));
        let id = sealed(&seal);
        let other_ns = LeaseSeal::new("other", LeaseSecrets::new(&[7; 32], None));
        assert!(other_ns.open(&id).is_none());
        let other_secret = LeaseSeal::new("ns", LeaseSecrets::new(&[8; 32], None));
        assert!(other_secret.open(&id).is_none());
    }

    #[test]
    fn the_previous_secret_still_opens_ids_sealed_before_a_rotation() {
        let before = LeaseSeal::new("ns", LeaseSecrets::new(&[7; 32], None));
        let id = sealed(&before);
        let after = LeaseSeal::new("ns", LeaseSecrets::new(&[9; 32], Some(&[7; 32])));
        assert_eq!(after.open(&id).and_then(|l| l.facts), Some(facts()));
        let later = LeaseSeal::new("ns", LeaseSecrets::new(&[9; 32], None));
        assert!(later.open(&id).is_none());
    }

    #[test]
    fn a_derived_secret_is_the_same_for_the_same_encryption_key() {
        let a = LeaseSeal::new("ns", LeaseSecrets::derived_from(&[1; 32], None));
        let b = LeaseSeal::new("ns", LeaseSecrets::derived_from(&[1; 32], None));
        let c = LeaseSeal::new("ns", LeaseSecrets::derived_from(&[2; 32], None));
        let id = sealed(&a);
        assert!(b.open(&id).is_some());
        assert!(c.open(&id).is_none());
    }

    #[test]
    fn garbage_and_truncated_ids_are_unknown() {
        let seal = LeaseSeal::new("ns", LeaseSecrets::new(&[7; 32], None));
        let id = sealed(&seal);
        for bad in [
            "",
            ".",
            "..",
            "not-a-lease",
            &id[..id.len() - 1],
            &id[..id.rfind('.').expect("dot") + 3],
            &format!("{id}.x"),
        ] {
            assert!(seal.open(bad).is_none(), "{bad}");
        }
    }
}
