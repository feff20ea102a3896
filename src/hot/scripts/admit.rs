//! admit.lua's wire contract, written once: its KEYS and ARGV from typed values, its reply
//! read into a typed answer. The script's header says what each one means and why.

use redis::Value;

use super::ScriptArg;
use crate::hot::admission::AdmitArgs;
use crate::hot::layout::KeyRedisKeys;
use crate::hot::redis::RedisFailure;
use crate::money::MAX_EXACT;

/// The script as Redis runs it: `lua/admit.lua` behind the shared functions it calls
/// (`lua/lib/config.lua`, `lua/lib/ring.lua`, `lua/lib/calendar.lua`, `lua/lib/holds.lua`),
/// which EVALSHA gives no other way to share.
pub const SOURCE: &str = concat!(
    include_str!("../../../lua/lib/config.lua"),
    include_str!("../../../lua/lib/ring.lua"),
    include_str!("../../../lua/lib/calendar.lua"),
    include_str!("../../../lua/lib/holds.lua"),
    include_str!("../../../lua/admit.lua")
);

/// One admission as admit.lua takes it: what was asked (its bounds checked by the caller), the
/// key's Redis keys, the window, the lease's TTL in ms (0: no lease) and its nonce.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub keys: &'a KeyRedisKeys,
    pub ask: &'a AdmitArgs<'a>,
    pub window_ms: i64,
    pub ttl_ms: i64,
    pub nonce: &'a str,
}

impl<'a> Call<'a> {
    pub fn keys(&self) -> [&'a str; 5] {
        let k = self.keys;
        [&k.state, &k.rate, &k.live, &k.holds, &k.tokens]
    }

    pub fn args(&self) -> [ScriptArg<'a>; 8] {
        let a = self.ask;
        [
            ScriptArg::Int(self.window_ms),
            ScriptArg::Int(self.ttl_ms),
            ScriptArg::Str(self.nonce),
            ScriptArg::Str(a.provider),
            ScriptArg::Str(a.api_format),
            ScriptArg::Str(a.model),
            ScriptArg::Int(a.reserve.nanos().max(0)),
            ScriptArg::Int(i64::try_from(a.reserve_tokens).unwrap_or(MAX_EXACT)),
        ]
    }
}

/// A grant as admit.lua reports it; -1 is its "unlimited / none / never".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub key_id: String,
    pub user_id: String,
    pub rate_limit: i64,
    pub rate_remaining: i64,
    pub reset_ms: i64,
    pub concurrent_limit: i64,
    pub in_flight: i64,
    pub available: i64,
    pub now_ms: i64,
    pub tracked: bool,
    pub token_limit: i64,
    pub tokens_remaining: i64,
    pub tokens_reset_ms: i64,
    pub budget: i64,
    pub budget_remaining: i64,
    pub budget_resets_at_ms: i64,
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

/// A number of the reply: an integer (grants), or digits (a denial's wait).
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

pub fn parse(v: Value) -> Result<Reply, RedisFailure> {
    let Value::Array(r) = v else {
        return Err(unexpected());
    };
    let int = |i: usize| number(r.get(i));
    let str_at = |i: usize| r.get(i).and_then(text).ok_or_else(unexpected);
    match r.first().and_then(bytes).ok_or_else(unexpected)? {
        b"miss" => Ok(Reply::Miss),
        b"deny" => Ok(Reply::Deny {
            code: str_at(1)?,
            retry_after_ms: int(2).max(0),
        }),
        // Eleven fields for a key without a token limit or a budget: the missing six read as
        // -1, which is what they would say.
        b"ok" if r.len() >= 11 => Ok(Reply::Ok(Granted {
            key_id: str_at(1)?,
            user_id: str_at(2)?,
            rate_limit: int(3),
            rate_remaining: int(4),
            reset_ms: int(5),
            concurrent_limit: int(6),
            in_flight: int(7),
            available: int(8),
            now_ms: int(9),
            tracked: int(10) == 1,
            token_limit: int(11),
            tokens_remaining: int(12),
            tokens_reset_ms: int(13),
            budget: int(14),
            budget_remaining: int(15),
            budget_resets_at_ms: int(16),
        })),
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

    #[test]
    fn a_plain_keys_eleven_fields_read_with_the_rest_unlimited() {
        let r = parse(reply(&[
            "ok",
            "k",
            "u",
            "60",
            "59",
            "60000",
            "-1",
            "0",
            "-1",
            "1700000000000",
            "0",
        ]))
        .expect("ok");
        let Reply::Ok(g) = r else { panic!("{r:?}") };
        assert_eq!((g.rate_limit, g.rate_remaining, g.in_flight), (60, 59, 0));
        assert_eq!((g.now_ms, g.tracked), (1_700_000_000_000, false));
        assert_eq!(
            (g.token_limit, g.budget, g.budget_resets_at_ms),
            (-1, -1, -1)
        );
    }

    #[test]
    fn a_grant_read_with_its_numbers_as_integers() {
        let mut items: Vec<Value> = ["ok", "k", "u"]
            .iter()
            .map(|s| Value::BulkString(s.as_bytes().to_vec()))
            .collect();
        items.extend(
            [
                60,
                59,
                60000,
                -1,
                0,
                9_007_199_254_740_991,
                1_700_000_000_000,
                1,
            ]
            .map(Value::Int),
        );
        let Reply::Ok(g) = parse(Value::Array(items)).expect("ok") else {
            panic!("not a grant")
        };
        assert_eq!((g.key_id.as_str(), g.user_id.as_str()), ("k", "u"));
        assert_eq!(
            (g.rate_limit, g.rate_remaining, g.reset_ms),
            (60, 59, 60000)
        );
        assert_eq!(g.available, 9_007_199_254_740_991, "exact below 2^53");
        assert_eq!((g.now_ms, g.tracked), (1_700_000_000_000, true));
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
            reply(&["deny"]),
            reply(&[]),
            Value::Int(1),
        ] {
            assert!(parse(bad).is_err());
        }
    }
}
