//! admit.lua's wire contract, written once: its KEYS and ARGV from typed values, its reply
//! read into a typed answer. The script's header says what each one means and why.

use redis::Value;

use super::ScriptArg;
use crate::hot::admission::AdmitArgs;
use crate::hot::layout::KeyRedisKeys;
use crate::hot::lease_id::MemberHold;
use crate::hot::redis::RedisFailure;
use crate::money::MAX_EXACT;

/// The script as Redis runs it: `lua/admit.lua` behind the shared functions it calls
/// (`lua/lib/config.lua`, `lua/lib/ring.lua`, `lua/lib/calendar.lua`, `lua/lib/holds.lua`,
/// `lua/lib/layout.lua`), which EVALSHA gives no other way to share.
pub const SOURCE: &str = concat!(
    include_str!("../../../lua/lib/config.lua"),
    include_str!("../../../lua/lib/ring.lua"),
    include_str!("../../../lua/lib/calendar.lua"),
    include_str!("../../../lua/lib/holds.lua"),
    include_str!("../../../lua/lib/layout.lua"),
    include_str!("../../../lua/admit.lua")
);

/// One admission as admit.lua takes it: the key's Redis keys, the window, the lease's TTL in ms
/// (0: no lease), what the caller already knows of the key, and what was asked (its bounds
/// checked by the caller) with the lease's nonce, joined as the script reads them.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    keys: &'a KeyRedisKeys,
    window_ms: i64,
    ttl_ms: i64,
    known: Known,
    /// State format 2: a lease that holds something carries its hold in its live-set member.
    in_members: bool,
    asked: String,
}

/// What the caller knows of the key before the call (ARGV[9], `hot/known_keys.rs`). Either
/// guess only spares Redis work: a wrong one costs the script a second read, never an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Known {
    /// The key's ids are known: the reply leaves them out.
    pub ids: bool,
    /// The key's last grant needed its lease and balance counters: read them with the
    /// configuration.
    pub counters: bool,
    /// The key's last grant needed its token and spend counters: read them too.
    pub spend: bool,
}

impl Known {
    fn arg(self) -> i64 {
        i64::from(!self.ids) + 2 * i64::from(self.counters) + 4 * i64::from(self.spend)
    }
}

impl<'a> Call<'a> {
    pub fn new(
        keys: &'a KeyRedisKeys,
        ask: &AdmitArgs<'_>,
        window_ms: i64,
        ttl_ms: i64,
        nonce: &str,
        known: Known,
    ) -> Self {
        let asked = format!(
            "{reserve}\x1f{tokens}\x1f{nonce}\x1f{provider}\x1f{format}\x1f{model}",
            provider = ask.provider,
            format = ask.api_format,
            model = ask.model,
            reserve = ask.reserve.nanos().max(0),
            tokens = i64::try_from(ask.reserve_tokens).unwrap_or(MAX_EXACT),
        );
        Call {
            keys,
            window_ms,
            ttl_ms,
            known,
            in_members: false,
            asked,
        }
    }

    /// The same call in state format 2 (`TOLLGATE_STATE_FORMAT`, admit.lua's ARGV[3]) or not.
    pub fn holds_in_members(mut self, yes: bool) -> Self {
        self.in_members = yes;
        self
    }

    pub fn keys(&self) -> [&'a str; 2] {
        [&self.keys.state, &self.keys.rate]
    }

    pub fn args(&self) -> [ScriptArg<'_>; 4] {
        [
            ScriptArg::Int(self.window_ms),
            ScriptArg::Int(self.ttl_ms),
            ScriptArg::Int(self.known.arg() + 8 * i64::from(self.in_members)),
            ScriptArg::Str(&self.asked),
        ]
    }
}

/// A grant as admit.lua reports it; -1 is its "unlimited / none / never".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    /// `None` when the call said the ids were known ([`Known::ids`]).
    pub key_id: Option<String>,
    pub user_id: Option<String>,
    pub rate_limit: i64,
    pub rate_remaining: i64,
    pub reset_ms: i64,
    pub concurrent_limit: i64,
    pub in_flight: i64,
    pub available: i64,
    pub now_ms: i64,
    pub tracked: bool,
    /// The hold the lease's live-set member carries (state format 2): sealed into its id.
    pub member_hold: Option<MemberHold>,
    pub token_limit: i64,
    pub tokens_remaining: i64,
    pub tokens_reset_ms: i64,
    pub budget: i64,
    pub budget_remaining: i64,
    pub budget_resets_at_ms: i64,
}

impl Granted {
    /// Whether admit.lua read the key's running counters: a key with a concurrency limit, a
    /// balance, a budget or a token limit (its "not plain").
    pub fn needed_counters(&self) -> bool {
        self.concurrent_limit > 0 || self.available >= 0 || self.needed_spend()
    }

    /// Whether admit.lua read the key's token and spend counters: a key with a token limit or
    /// a budget.
    pub fn needed_spend(&self) -> bool {
        self.budget >= 0 || self.token_limit > 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The key's state is not in Redis: hydrate, then retry.
    Miss,
    Deny {
        code: String,
        retry_after_ms: i64,
    },
    Ok(Granted),
}

fn unexpected() -> RedisFailure {
    RedisFailure::Command("unexpected admit reply".into())
}

/// One element of the reply as bytes: the script answers names as strings.
fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Int(n) => Some(n.to_string()),
        other => bytes(other).and_then(|b| String::from_utf8(b.to_vec()).ok()),
    }
}

/// A denial's wait: digits.
fn number(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::Int(n)) => *n,
        Some(other) => bytes(other)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| s.parse().ok())
            .unwrap_or(-1),
        None => -1,
    }
}

/// A grant's numbers: 8 or 14 big-endian 8-byte integers (admit.lua's header), and two more
/// when the lease's member carries its hold (`tracked` 2); the six token and budget fields,
/// when missing, read as -1, which is what they would say.
fn grant(packed: &[u8], key_id: Option<String>, user_id: Option<String>) -> Option<Granted> {
    let (numbers, hold) = match packed.len() {
        64 | 112 => (packed, None),
        80 | 128 => {
            let (numbers, hold) = packed.split_at(packed.len() - 16);
            let (nanos, tokens) = hold.split_at(8);
            let at = |b: &[u8]| b.try_into().ok().map(i64::from_be_bytes);
            (
                numbers,
                Some(MemberHold {
                    nanos: at(nanos)?,
                    tokens: at(tokens)?,
                }),
            )
        }
        _ => return None,
    };
    let mut n = [-1i64; 14];
    for (slot, chunk) in n.iter_mut().zip(numbers.chunks_exact(8)) {
        *slot = i64::from_be_bytes(chunk.try_into().ok()?);
    }
    let [rate_limit, rate_remaining, reset_ms, concurrent_limit, in_flight, available, now_ms, tracked, token_limit, tokens_remaining, tokens_reset_ms, budget, budget_remaining, budget_resets_at_ms] =
        n;
    // The hold comes exactly with `tracked` 2.
    if hold.is_some() != (tracked == 2) {
        return None;
    }
    Some(Granted {
        key_id,
        user_id,
        rate_limit,
        rate_remaining,
        reset_ms,
        concurrent_limit,
        in_flight,
        available,
        now_ms,
        tracked: tracked == 1 || tracked == 2,
        member_hold: hold,
        token_limit,
        tokens_remaining,
        tokens_reset_ms,
        budget,
        budget_remaining,
        budget_resets_at_ms,
    })
}

pub fn parse(v: Value) -> Result<Reply, RedisFailure> {
    let r = match v {
        // A grant without the ids: the packed numbers alone.
        Value::BulkString(packed) => {
            return grant(&packed, None, None)
                .map(Reply::Ok)
                .ok_or_else(unexpected)
        }
        Value::Array(r) => r,
        _ => return Err(unexpected()),
    };
    let str_at = |i: usize| r.get(i).and_then(text).ok_or_else(unexpected);
    match r.first().and_then(bytes).ok_or_else(unexpected)? {
        b"miss" => Ok(Reply::Miss),
        b"deny" => Ok(Reply::Deny {
            code: str_at(1)?,
            retry_after_ms: number(r.get(2)).max(0),
        }),
        b"ok" if r.len() == 4 => {
            let packed = r.get(1).and_then(bytes).ok_or_else(unexpected)?;
            grant(packed, Some(str_at(2)?), Some(str_at(3)?))
                .map(Reply::Ok)
                .ok_or_else(unexpected)
        }
        _ => Err(unexpected()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(items: &[&str]) -> Value {
        Value::Array(
            items
                .iter()
                .map(|s| Value::BulkString(s.as_bytes().to_vec()))
                .collect(),
        )
    }

    fn packed(numbers: &[i64]) -> Vec<u8> {
        numbers.iter().flat_map(|n| n.to_be_bytes()).collect()
    }

    #[test]
    fn a_plain_keys_eight_numbers_read_with_the_rest_unlimited() {
        let r = parse(Value::BulkString(packed(&[
            60,
            59,
            60000,
            -1,
            0,
            -1,
            1_700_000_000_000,
            0,
        ])))
        .expect("ok");
        let Reply::Ok(g) = r else { panic!("{r:?}") };
        assert_eq!((&g.key_id, &g.user_id), (&None, &None), "not asked for");
        assert_eq!((g.rate_limit, g.rate_remaining, g.in_flight), (60, 59, 0));
        assert_eq!((g.now_ms, g.tracked), (1_700_000_000_000, false));
        assert_eq!(
            (g.token_limit, g.budget, g.budget_resets_at_ms),
            (-1, -1, -1)
        );
        assert!(!g.needed_counters());
    }

    #[test]
    fn a_grant_with_its_ids_and_fourteen_numbers_reads_every_one() {
        let numbers = [
            60,
            59,
            60000,
            5,
            1,
            9_007_199_254_740_991,
            1_700_000_000_000,
            1,
            1000,
            900,
            30000,
            2_000_000_000,
            1_500_000_000,
            1_700_086_400_000,
        ];
        let v = Value::Array(vec![
            Value::BulkString(b"ok".to_vec()),
            Value::BulkString(packed(&numbers)),
            Value::BulkString(b"k".to_vec()),
            Value::BulkString(b"u".to_vec()),
        ]);
        let Reply::Ok(g) = parse(v).expect("ok") else {
            panic!("not a grant")
        };
        assert_eq!(
            (g.key_id.as_deref(), g.user_id.as_deref()),
            (Some("k"), Some("u"))
        );
        assert_eq!(
            (g.rate_limit, g.rate_remaining, g.reset_ms),
            (60, 59, 60000)
        );
        assert_eq!((g.concurrent_limit, g.in_flight), (5, 1));
        assert_eq!(g.available, 9_007_199_254_740_991, "exact below 2^53");
        assert_eq!((g.now_ms, g.tracked), (1_700_000_000_000, true));
        assert_eq!(
            (g.token_limit, g.tokens_remaining, g.tokens_reset_ms),
            (1000, 900, 30000)
        );
        assert_eq!(
            (g.budget, g.budget_remaining, g.budget_resets_at_ms),
            (2_000_000_000, 1_500_000_000, 1_700_086_400_000)
        );
        assert!(g.needed_counters());
    }

    #[test]
    fn a_hold_carried_by_the_live_member_follows_the_numbers_with_tracked_two() {
        let base = [60, 59, 60000, 5, 1, 1_000, 1_700_000_000_000, 2];
        let with_hold = |numbers: &[i64]| {
            let mut all = numbers.to_vec();
            all.extend([2_500, 300]);
            Value::BulkString(packed(&all))
        };
        let Ok(Reply::Ok(g)) = parse(with_hold(&base)) else {
            panic!("not a grant")
        };
        assert!(g.tracked);
        assert_eq!(
            g.member_hold,
            Some(MemberHold {
                nanos: 2_500,
                tokens: 300
            })
        );
        let mut fourteen = base.to_vec();
        fourteen.extend([1000, 900, 30000, -1, -1, -1]);
        let Ok(Reply::Ok(g)) = parse(with_hold(&fourteen)) else {
            panic!("not a grant")
        };
        assert_eq!(
            (g.token_limit, g.member_hold.map(|h| h.tokens)),
            (1000, Some(300))
        );
        // A hold without tracked 2, or tracked 2 without a hold, is no reply admit.lua gives.
        let mut one = base;
        one[7] = 1;
        assert!(parse(with_hold(&one)).is_err());
        assert!(parse(Value::BulkString(packed(&base))).is_err());
    }

    #[test]
    fn each_kind_of_limit_makes_a_grant_need_the_counters() {
        let mut n = [60, 59, 60000, -1, 0, -1, 1, 0, -1, -1, 0, -1, -1, -1];
        for (at, value) in [(3, 5), (5, 0), (8, 100), (11, 0)] {
            let mut m = n;
            m[at] = value;
            let Ok(Reply::Ok(g)) = parse(Value::BulkString(packed(&m))) else {
                panic!("not a grant")
            };
            assert!(g.needed_counters(), "field {at} = {value}");
        }
        n[3] = 0;
        let Ok(Reply::Ok(g)) = parse(Value::BulkString(packed(&n))) else {
            panic!("not a grant")
        };
        assert!(!g.needed_counters(), "a concurrency limit of 0 is none");
    }

    #[test]
    fn the_known_argument_is_one_for_unknown_ids_plus_two_and_four_for_counters() {
        let arg = |ids, counters, spend| {
            Known {
                ids,
                counters,
                spend,
            }
            .arg()
        };
        assert_eq!(
            [
                arg(true, false, false),
                arg(false, false, false),
                arg(true, true, false),
                arg(false, true, false),
                arg(true, true, true),
                arg(false, true, true),
            ],
            [0, 1, 2, 3, 6, 7]
        );
    }

    #[test]
    fn misses_denials_and_garbage_read_as_what_they_are() {
        assert_eq!(parse(reply(&["miss"])).expect("miss"), Reply::Miss);
        assert_eq!(
            parse(reply(&["deny", "rate_limited", "1500"])).expect("deny"),
            Reply::Deny {
                code: "rate_limited".into(),
                retry_after_ms: 1500
            }
        );
        for bad in [
            reply(&["ok", "k"]),
            reply(&["ok", "k", "u", "60"]),
            reply(&["deny"]),
            reply(&[]),
            Value::Int(1),
            Value::BulkString(packed(&[1, 2, 3])),
        ] {
            assert!(parse(bad).is_err());
        }
    }
}
