//! What this process remembers of the keys it admitted, so that admit.lua need not read and
//! answer a key's ids on every admission, and reads its counters with its configuration; and
//! settle.lua, settling an untracked lease of a key with nothing that counts, skips the holds.
//!
//! A key's ids never change (the key is generated here, so its hash names one row for good),
//! so an id learnt once is right for as long as the key lives. Whether a key needs its
//! counters can change (a PATCH adds a balance), so it is only a guess, refreshed by every
//! grant: a wrong guess costs admit.lua one more read, never a wrong answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use super::scripts::admit::{Granted, Known};

/// Keys remembered at most, about 300 bytes each (the state key's name, the two ids, the
/// map's own share): a few MB, which a sidecar can spare. When it is full, the keys not looked
/// up since the last time it was full are forgotten (and, if that frees less than a quarter,
/// others too): a forgotten key costs one read of its ids, nothing more, and the keys in use
/// stay known however many others pass through.
const CAPACITY: usize = 16_384;

#[derive(Debug)]
pub struct KnownKey {
    key_id: String,
    user_id: String,
    counters: AtomicBool,
    spend: AtomicBool,
    /// Looked up since the map was last full.
    recent: AtomicBool,
}

/// Keyed by the key's state key (`KeyRedisKeys::state`), which names it in Redis.
#[derive(Debug)]
pub struct KnownKeys {
    map: RwLock<HashMap<String, Arc<KnownKey>>>,
    capacity: usize,
}

impl Default for KnownKeys {
    fn default() -> Self {
        KnownKeys::with_capacity(CAPACITY)
    }
}

impl KnownKeys {
    fn with_capacity(capacity: usize) -> Self {
        KnownKeys {
            map: RwLock::default(),
            capacity: capacity.max(1),
        }
    }

    /// Makes room in a full map: keeps the keys looked up since it was last full (and marks
    /// them not looked up), then, if fewer than a quarter went, forgets any others down to
    /// three quarters. One pass per quarter of the capacity inserted: O(1) a key.
    fn make_room(map: &mut HashMap<String, Arc<KnownKey>>, capacity: usize) {
        map.retain(|_, e| e.recent.swap(false, Ordering::Relaxed));
        let keep = capacity - capacity / 4;
        if map.len() > keep {
            let mut extra = map.len() - keep;
            map.retain(|_, _| {
                if extra == 0 {
                    return true;
                }
                extra -= 1;
                false
            });
        }
    }

    /// What admit.lua is told of the key whose state is `state`, and the entry that says it.
    pub fn lookup(&self, state: &str) -> (Known, Option<Arc<KnownKey>>) {
        let entry = self
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(state)
            .cloned();
        if let Some(e) = &entry {
            e.recent.store(true, Ordering::Relaxed);
        }
        let guess = |f: fn(&KnownKey) -> &AtomicBool| {
            entry.as_ref().is_some_and(|e| f(e).load(Ordering::Relaxed))
        };
        let known = Known {
            ids: entry.is_some(),
            counters: guess(|e| &e.counters),
            spend: guess(|e| &e.spend),
        };
        (known, entry)
    }

    /// Whether the key whose state is `state` is expected to have no balance, nor anything
    /// else that counts (its last grant here needed no counters): settle.lua then reads fewer
    /// of its fields. A key this process has not admitted is not expected to be plain.
    pub fn expects_plain(&self, state: &str) -> bool {
        let (known, _) = self.lookup(state);
        known.ids && !known.counters
    }

    /// The ids of a grant — the reply's (then remembered), else those of `prior`, the entry
    /// the call was made with — and whether the next admission should read the counters.
    /// `None` when neither has them (a reply that broke the contract).
    pub fn ids(
        &self,
        state: &str,
        prior: Option<&KnownKey>,
        g: &Granted,
    ) -> Option<(String, String)> {
        let (counters, spend) = (g.needed_counters(), g.needed_spend());
        match (&g.key_id, &g.user_id, prior) {
            (Some(key_id), Some(user_id), _) => {
                let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
                if map.len() >= self.capacity && !map.contains_key(state) {
                    Self::make_room(&mut map, self.capacity);
                }
                map.insert(
                    state.to_string(),
                    Arc::new(KnownKey {
                        key_id: key_id.clone(),
                        user_id: user_id.clone(),
                        counters: AtomicBool::new(counters),
                        spend: AtomicBool::new(spend),
                        recent: AtomicBool::new(true),
                    }),
                );
                Some((key_id.clone(), user_id.clone()))
            }
            (None, None, Some(e)) => {
                e.counters.store(counters, Ordering::Relaxed);
                e.spend.store(spend, Ordering::Relaxed);
                Some((e.key_id.clone(), e.user_id.clone()))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(ids: Option<(&str, &str)>, concurrent_limit: i64) -> Granted {
        Granted {
            key_id: ids.map(|i| i.0.to_string()),
            user_id: ids.map(|i| i.1.to_string()),
            rate_limit: 60,
            rate_remaining: 59,
            reset_ms: 60_000,
            concurrent_limit,
            in_flight: 0,
            available: -1,
            now_ms: 1,
            tracked: false,
            member_hold: None,
            token_limit: -1,
            tokens_remaining: -1,
            tokens_reset_ms: 0,
            budget: -1,
            budget_remaining: -1,
            budget_resets_at_ms: -1,
        }
    }

    #[test]
    fn a_key_is_asked_for_its_ids_until_a_reply_gave_them() {
        let known = KnownKeys::default();
        let (k, prior) = known.lookup("s");
        assert_eq!(k, Known::default(), "nothing known");
        assert!(prior.is_none());
        let ids = known.ids("s", None, &grant(Some(("k", "u")), -1));
        assert_eq!(ids, Some(("k".into(), "u".into())));
        let (k, prior) = known.lookup("s");
        assert_eq!(
            k,
            Known {
                ids: true,
                counters: false,
                spend: false
            }
        );
        let ids = known.ids("s", prior.as_deref(), &grant(None, 5));
        assert_eq!(ids, Some(("k".into(), "u".into())), "from the entry");
        let k = known.lookup("s").0;
        assert!(
            k.counters && !k.spend,
            "the last grant needed the first, not the second"
        );
        let mut budgeted = grant(None, -1);
        budgeted.budget = 0;
        known.ids("s", prior.as_deref(), &budgeted);
        let k = known.lookup("s").0;
        assert!(k.counters && k.spend, "a budget needs both");
        assert!(!known.lookup("other").0.ids);
    }

    #[test]
    fn only_a_key_whose_last_grant_here_needed_no_counters_is_expected_plain() {
        let known = KnownKeys::default();
        assert!(!known.expects_plain("s"), "a key not admitted here");
        known.ids("s", None, &grant(Some(("k", "u")), -1));
        assert!(known.expects_plain("s"), "a plain grant");
        let prior = known.lookup("s").1;
        known.ids("s", prior.as_deref(), &grant(None, 5));
        assert!(
            !known.expects_plain("s"),
            "a grant with a concurrency limit"
        );
        let mut with_balance = grant(None, -1);
        with_balance.available = 0;
        known.ids("s", prior.as_deref(), &grant(None, -1));
        assert!(known.expects_plain("s"), "plain again");
        known.ids("s", prior.as_deref(), &with_balance);
        assert!(!known.expects_plain("s"), "a grant with a balance");
    }

    #[test]
    fn a_full_map_forgets_the_keys_not_looked_up_since_it_was_last_full() {
        let known = KnownKeys::with_capacity(8);
        let remember = |s: &str| known.ids(s, None, &grant(Some(("k", "u")), -1));
        for i in 0..8 {
            remember(&format!("s{i}"));
        }
        // A full map's first sweep finds every key new: it clears their marks, and forgets
        // any two (a quarter) to make room.
        remember("s8");
        assert_eq!(known.map.read().expect("lock").len(), 7);
        let survivors: Vec<String> = (0..8)
            .map(|i| format!("s{i}"))
            .filter(|s| known.map.read().expect("lock").contains_key(s))
            .collect();
        assert_eq!(survivors.len(), 6);
        // Two of them are in use; the map fills up again with others.
        for s in &survivors[..2] {
            assert!(known.lookup(s).0.ids);
        }
        remember("s9");
        assert_eq!(known.map.read().expect("lock").len(), 8);
        remember("s10");
        let map = known.map.read().expect("lock");
        for s in &survivors[..2] {
            assert!(map.contains_key(s), "{s} was looked up: kept");
        }
        for s in &survivors[2..] {
            assert!(!map.contains_key(s), "{s} was not: forgotten");
        }
        assert!(map.contains_key("s10"));
        assert!(map.len() <= 8);
    }

    #[test]
    fn a_reply_without_ids_for_a_key_not_remembered_is_refused() {
        let known = KnownKeys::default();
        assert_eq!(known.ids("s", None, &grant(None, -1)), None);
    }
}
