//! settle.lua's wire contract, written once: its KEYS and ARGV from typed values, its reply
//! read into a typed answer. The script's header says what each one means and why.

use redis::{FromRedisValue, Value};

use super::ScriptArg;
use crate::hot::lease_id::LeaseRef;
use crate::hot::redis::RedisFailure;

/// The script as Redis runs it: `lua/settle.lua` behind the shared functions it calls
/// (`lua/lib/config.lua`, `lua/lib/calendar.lua`, `lua/lib/holds.lua`), which EVALSHA gives no
/// other way to share.
pub const SOURCE: &str = concat!(
    include_str!("../../../lua/lib/config.lua"),
    include_str!("../../../lua/lib/calendar.lua"),
    include_str!("../../../lua/lib/holds.lua"),
    include_str!("../../../lua/settle.lua")
);

/// What the settlement reports, as the script takes it (bounds checked by the caller).
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage<'a> {
    /// `None`: not known yet; the script answers what to price it for and writes nothing.
    pub cost_nanos: Option<i64>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub total_tokens: i64,
    /// -1: unknown.
    pub response_time_ms: i64,
    /// -1: unknown.
    pub status_code: i64,
    /// `None`: the lease's own.
    pub provider: Option<&'a str>,
    pub api_format: Option<&'a str>,
    pub model: Option<&'a str>,
    /// A released lease is a duplicate (an access-log report), not settled.
    pub only_live: bool,
}

/// One settlement as settle.lua takes it.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    lease: &'a LeaseRef,
    tombstone: String,
    stream: String,
    usage: Usage<'a>,
    /// The given labels with their '=' mark ('' = use the lease's).
    labels: [String; 3],
    tombstone_ttl_ms: i64,
    window_ms: i64,
}

impl<'a> Call<'a> {
    pub fn new(
        lease: &'a LeaseRef,
        usage: Usage<'a>,
        tombstone_ttl_ms: i64,
        window_ms: i64,
    ) -> Self {
        let given = |v: Option<&str>| v.map(|s| format!("={s}")).unwrap_or_default();
        Call {
            lease,
            tombstone: lease.keys.lease(&lease.nonce),
            stream: lease.keys.stream(),
            labels: [
                given(usage.provider),
                given(usage.api_format),
                given(usage.model),
            ],
            usage,
            tombstone_ttl_ms,
            window_ms,
        }
    }

    /// The same call, its event appended to another stream (the load harness's scratch stream,
    /// which the syncer does not read).
    pub fn with_stream(mut self, stream: String) -> Self {
        self.stream = stream;
        self
    }

    pub fn keys(&self) -> [&str; 6] {
        let k = &self.lease.keys;
        [
            &k.state,
            &k.live,
            &k.holds,
            &self.tombstone,
            &self.stream,
            &k.tokens,
        ]
    }

    pub fn args(&self) -> Vec<ScriptArg<'_>> {
        let u = &self.usage;
        let mut args = Vec::with_capacity(23);
        args.extend([
            match u.cost_nanos {
                Some(c) => ScriptArg::Int(c),
                None => ScriptArg::Str("?"),
            },
            ScriptArg::Int(u.input_tokens),
            ScriptArg::Int(u.output_tokens),
            ScriptArg::Int(u.total_tokens),
            ScriptArg::Int(u.response_time_ms),
            ScriptArg::Int(u.status_code),
            ScriptArg::Str(&self.labels[0]),
            ScriptArg::Str(&self.labels[1]),
            ScriptArg::Str(&self.labels[2]),
            ScriptArg::Int(self.tombstone_ttl_ms),
            ScriptArg::Str(&self.lease.event_id),
            ScriptArg::Str(if u.only_live { "live" } else { "any" }),
            ScriptArg::Int(self.window_ms),
        ]);
        match &self.lease.facts {
            Some(f) => args.extend([
                ScriptArg::Str("sealed"),
                ScriptArg::Str(if f.tracked { "1" } else { "0" }),
                ScriptArg::Str(&f.key_id),
                ScriptArg::Str(&f.user_id),
                ScriptArg::Str(&f.provider),
                ScriptArg::Str(&f.api_format),
                ScriptArg::Str(&f.model),
                ScriptArg::Int(f.admitted_at_ms),
                ScriptArg::Int(f.expires_at_ms),
                ScriptArg::Int(f.deadline_ms()),
            ]),
            None => args.push(ScriptArg::Str("record")),
        }
        args
    }
}

/// -1 is the script's "no balance".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Unknown,
    /// Asked without a cost: the provider and model to price it for.
    Price {
        provider: String,
        model: String,
    },
    Duplicate {
        available: i64,
    },
    Settled {
        lease_expired: bool,
        available: i64,
    },
}

pub fn parse(v: Value) -> Result<Reply, RedisFailure> {
    let unexpected = || RedisFailure::Command("unexpected settle reply".into());
    let r = Vec::<String>::from_redis_value(v).map_err(|_| unexpected())?;
    let int = |i: usize| r.get(i).and_then(|s| s.parse().ok()).unwrap_or(-1);
    match r.first().map(String::as_str) {
        Some("unknown") => Ok(Reply::Unknown),
        Some("price") => Ok(Reply::Price {
            provider: r.get(1).cloned().unwrap_or_default(),
            model: r.get(2).cloned().unwrap_or_default(),
        }),
        Some("duplicate") => Ok(Reply::Duplicate { available: int(1) }),
        Some("settled") => Ok(Reply::Settled {
            lease_expired: r.get(1).map(String::as_str) == Some("1"),
            available: int(2),
        }),
        _ => Err(unexpected()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hot::layout::Layout;
    use crate::hot::lease_id::LeaseFacts;

    fn text(a: &ScriptArg<'_>) -> String {
        match a {
            ScriptArg::Str(s) => (*s).to_string(),
            ScriptArg::Int(n) => n.to_string(),
        }
    }

    fn lease(facts: Option<LeaseFacts>) -> LeaseRef {
        let keys = Layout::new("tg").for_hash(&"ab".repeat(32));
        LeaseRef {
            event_id: keys.lease_id("N"),
            keys,
            nonce: "N".into(),
            facts,
        }
    }

    #[test]
    fn a_sealed_settlement_sends_its_facts_where_the_script_reads_them() {
        let facts = LeaseFacts {
            tracked: true,
            key_id: "kid".into(),
            user_id: "uid".into(),
            provider: "openai".into(),
            api_format: "openai:chat".into(),
            model: "gpt-4o".into(),
            admitted_at_ms: 1_000,
            expires_at_ms: 2_000,
        };
        let deadline = facts.deadline_ms();
        let l = lease(Some(facts));
        let usage = Usage {
            cost_nanos: Some(7),
            input_tokens: 1,
            output_tokens: 2,
            total_tokens: 3,
            response_time_ms: -1,
            status_code: 200,
            model: Some("gpt-4o-mini"),
            only_live: true,
            ..Default::default()
        };
        let call = Call::new(&l, usage, 600_000, 60_000);
        let args: Vec<String> = call.args().iter().map(text).collect();
        // ARGV[n] is args[n - 1] (settle.lua's header).
        assert_eq!(args.len(), 23);
        assert_eq!(&args[..6], ["7", "1", "2", "3", "-1", "200"]);
        assert_eq!(
            &args[6..9],
            ["", "", "=gpt-4o-mini"],
            "only given labels, marked"
        );
        assert_eq!(args[10], l.event_id);
        assert_eq!(&args[11..14], ["live", "60000", "sealed"]);
        assert_eq!(
            &args[14..20],
            ["1", "kid", "uid", "openai", "openai:chat", "gpt-4o"]
        );
        assert_eq!(args[22], deadline.to_string());
        let keys = call.keys();
        assert_eq!(keys[3], l.keys.lease("N"), "the tombstone is KEYS[4]");
        assert_eq!(keys[4], l.keys.stream(), "the shard's stream is KEYS[5]");
    }

    #[test]
    fn an_unpriced_settlement_of_a_recorded_lease_asks_with_a_question_mark() {
        let l = lease(None);
        let call = Call::new(&l, Usage::default(), 600_000, 60_000);
        let args: Vec<String> = call.args().iter().map(text).collect();
        assert_eq!(args[0], "?");
        assert_eq!(args.last().map(String::as_str), Some("record"));
        assert_eq!(args.len(), 14);
    }
}
