//! release.lua's wire contract, written once: its KEYS and ARGV from typed values, its reply
//! read into a typed answer. The script's header says what each one means and why.

use std::borrow::Cow;

use redis::{FromRedisValue, Value};

use super::ScriptArg;
use crate::hot::lease_id::{LeaseRef, MemberHold};
use crate::hot::redis::RedisFailure;

/// The script as Redis runs it: `lua/release.lua` behind the shared functions it calls
/// (`lua/lib/holds.lua`, `lua/lib/lease_end.lua`), which EVALSHA gives no other way to share.
pub const SOURCE: &str = concat!(
    include_str!("../../../lua/lib/holds.lua"),
    include_str!("../../../lua/lib/lease_end.lua"),
    include_str!("../../../lua/release.lua")
);

/// How the lease's facts reach the script.
#[derive(Debug, Clone, Copy)]
pub enum Facts {
    /// From its sealed id: whether it is tracked, the hold its live-set member carries (state
    /// format 2), and how long its 'R' must live (ms).
    Sealed {
        tracked: bool,
        member_hold: Option<MemberHold>,
        tombstone_ms: i64,
    },
    /// From its record (an id issued before sealed ids).
    Record,
}

#[derive(Debug, Clone)]
pub struct Call<'a> {
    lease: &'a LeaseRef,
    /// The lease's tombstone key (`KeyRedisKeys::lease`).
    tombstone: &'a str,
    facts: Facts,
    /// ARGV[3] of a sealed lease: '1' | '0' | '=<hold>' (only the last one made per call).
    tracked: Cow<'static, str>,
}

impl<'a> Call<'a> {
    pub fn new(lease: &'a LeaseRef, tombstone: &'a str, facts: Facts) -> Self {
        let tracked = match facts {
            Facts::Sealed {
                member_hold: Some(h),
                ..
            } => Cow::Owned(h.suffix()),
            Facts::Sealed { tracked: true, .. } => Cow::Borrowed("1"),
            _ => Cow::Borrowed("0"),
        };
        Call {
            lease,
            tombstone,
            facts,
            tracked,
        }
    }

    pub fn keys(&self) -> [&'a str; 4] {
        let k = &self.lease.keys;
        [&k.state, &k.live, &k.holds, self.tombstone]
    }

    pub fn args(&self) -> Vec<ScriptArg<'_>> {
        let mut args = vec![ScriptArg::Str(&self.lease.nonce)];
        match self.facts {
            Facts::Sealed { tombstone_ms, .. } => args.extend([
                ScriptArg::Str("sealed"),
                ScriptArg::Str(&self.tracked),
                ScriptArg::Int(tombstone_ms),
            ]),
            Facts::Record => args.push(ScriptArg::Str("record")),
        }
        args
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Unknown,
    Released,
    /// Settled or released before: nothing changed.
    Ended,
}

pub fn parse(v: Value) -> Result<Reply, RedisFailure> {
    let r = Vec::<String>::from_redis_value(v)
        .map_err(|_| RedisFailure::Command("unexpected release reply".into()))?;
    match r.first().map(String::as_str) {
        Some("released") => Ok(Reply::Released),
        Some("ended") => Ok(Reply::Ended),
        Some("unknown") => Ok(Reply::Unknown),
        _ => Err(RedisFailure::Command("unexpected release reply".into())),
    }
}
