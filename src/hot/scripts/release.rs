//! release.lua's wire contract, written once: its KEYS and ARGV from typed values, its reply
//! read into a typed answer. The script's header says what each one means and why.

use redis::{FromRedisValue, Value};

use super::ScriptArg;
use crate::hot::lease_id::LeaseRef;
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
    /// From its sealed id: whether it is tracked, and how long its 'R' must live (ms).
    Sealed { tracked: bool, tombstone_ms: i64 },
    /// From its record (an id issued before sealed ids).
    Record,
}

#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub lease: &'a LeaseRef,
    /// The lease's tombstone key (`KeyRedisKeys::lease`).
    pub tombstone: &'a str,
    pub facts: Facts,
}

impl<'a> Call<'a> {
    pub fn keys(&self) -> [&'a str; 4] {
        let k = &self.lease.keys;
        [&k.state, &k.live, &k.holds, self.tombstone]
    }

    pub fn args(&self) -> Vec<ScriptArg<'a>> {
        let mut args = vec![ScriptArg::Str(&self.lease.nonce)];
        match self.facts {
            Facts::Sealed {
                tracked,
                tombstone_ms,
            } => args.extend([
                ScriptArg::Str("sealed"),
                ScriptArg::Str(if tracked { "1" } else { "0" }),
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
