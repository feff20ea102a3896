//! settle.lua's wire contract, written once: its KEYS and ARGV from typed values, its reply
//! read into a typed answer. The script's header says what each one means and why.

use redis::{FromRedisValue, Value};

use super::ScriptArg;
use crate::hot::lease_id::LeaseRef;
use crate::hot::redis::RedisFailure;

/// The script as Redis runs it: `lua/settle.lua` behind the shared functions it calls
/// (`lua/lib/config.lua`, `lua/lib/calendar.lua`, `lua/lib/holds.lua`, `lua/lib/lease_end.lua`,
/// `lua/lib/layout.lua`), which EVALSHA gives no other way to share.
pub const SOURCE: &str = concat!(
    include_str!("../../../lua/lib/config.lua"),
    include_str!("../../../lua/lib/calendar.lua"),
    include_str!("../../../lua/lib/holds.lua"),
    include_str!("../../../lua/lib/lease_end.lua"),
    include_str!("../../../lua/lib/layout.lua"),
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
    /// A sealed lease's priced settlement: the usage event's first thirteen values, joined as
    /// settle.lua appends them. A recorded lease's: the given labels with their '=' mark
    /// ('' = use the lease's), which only its record can complete.
    event: Event,
    tombstone_ttl_ms: i64,
    window_ms: i64,
    /// The caller expects the key to have no balance (`hot/known_keys.rs`): an untracked
    /// lease's settlement then reads fewer of the key's counters (a wrong guess costs one
    /// more read, never a wrong answer).
    expect_plain: bool,
    /// `=<hold>`: the lease's live-set member carries its hold (state format 2).
    member_hold: Option<String>,
}

#[derive(Debug, Clone)]
enum Event {
    Head(String),
    Labels([String; 3]),
    /// A sealed lease's unpriced settlement: nothing of the event is sent.
    None,
}

impl<'a> Call<'a> {
    pub fn new(
        lease: &'a LeaseRef,
        usage: Usage<'a>,
        tombstone_ttl_ms: i64,
        window_ms: i64,
    ) -> Self {
        let given = |v: Option<&str>| v.map(|s| format!("={s}")).unwrap_or_default();
        let event = match (&lease.facts, usage.cost_nanos) {
            (Some(f), Some(cost)) => Event::Head(format!(
                "{id}\x1f{key}\x1f{user}\x1f{cost}\x1f{input}\x1f{output}\x1f{total}\x1f{rt}\x1f\
                 {status}\x1f{provider}\x1f{format}\x1f{model}\x1f{admitted}",
                id = lease.event_id,
                key = f.key_id,
                user = f.user_id,
                input = usage.input_tokens,
                output = usage.output_tokens,
                total = usage.total_tokens,
                rt = usage.response_time_ms,
                status = usage.status_code,
                provider = usage.provider.unwrap_or(&f.provider),
                format = usage.api_format.unwrap_or(&f.api_format),
                model = usage.model.unwrap_or(&f.model),
                admitted = f.admitted_at_ms,
            )),
            (Some(_), None) => Event::None,
            (None, _) => Event::Labels([
                given(usage.provider),
                given(usage.api_format),
                given(usage.model),
            ]),
        };
        Call {
            lease,
            tombstone: lease.keys.lease(&lease.nonce),
            stream: lease.keys.stream(),
            event,
            usage,
            tombstone_ttl_ms,
            window_ms,
            expect_plain: false,
            member_hold: lease
                .facts
                .as_ref()
                .and_then(|f| f.member_hold)
                .map(|h| h.suffix()),
        }
    }

    /// The same call, told whether the caller expects the key to have no balance.
    pub fn expecting_plain(mut self, plain: bool) -> Self {
        self.expect_plain = plain;
        self
    }

    /// The same call, its event appended to another stream (the load harness's scratch stream,
    /// which the syncer does not read).
    pub fn with_stream(mut self, stream: String) -> Self {
        self.stream = stream;
        self
    }

    pub fn keys(&self) -> [&str; 3] {
        [&self.lease.keys.state, &self.tombstone, &self.stream]
    }

    pub fn args(&self) -> Vec<ScriptArg<'_>> {
        let u = &self.usage;
        let mut args = Vec::with_capacity(14);
        args.extend([
            match u.cost_nanos {
                Some(c) => ScriptArg::Int(c),
                None => ScriptArg::Str("?"),
            },
            ScriptArg::Int(u.total_tokens),
            ScriptArg::Int(self.tombstone_ttl_ms),
            ScriptArg::Str(&self.lease.event_id),
            ScriptArg::Str(if u.only_live { "live" } else { "any" }),
            ScriptArg::Int(self.window_ms),
        ]);
        match &self.lease.facts {
            Some(f) => {
                args.extend([
                    ScriptArg::Str("sealed"),
                    ScriptArg::Str(match (&self.member_hold, f.tracked, self.expect_plain) {
                        (Some(suffix), _, _) => suffix,
                        (None, true, _) => "1",
                        (None, false, true) => "p",
                        (None, false, false) => "0",
                    }),
                    ScriptArg::Int(f.admitted_at_ms),
                    ScriptArg::Int(f.expires_at_ms),
                    ScriptArg::Int(f.deadline_ms()),
                ]);
                match &self.event {
                    Event::Head(head) => args.push(ScriptArg::Str(head)),
                    _ => args.extend([
                        ScriptArg::Str(u.provider.unwrap_or(&f.provider)),
                        ScriptArg::Str(u.model.unwrap_or(&f.model)),
                    ]),
                }
            }
            None => {
                args.extend([
                    ScriptArg::Str("record"),
                    ScriptArg::Int(u.input_tokens),
                    ScriptArg::Int(u.output_tokens),
                    ScriptArg::Int(u.response_time_ms),
                    ScriptArg::Int(u.status_code),
                ]);
                if let Event::Labels(labels) = &self.event {
                    args.extend(labels.iter().map(|l| ScriptArg::Str(l)));
                }
            }
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

    fn facts() -> LeaseFacts {
        LeaseFacts {
            tracked: true,
            member_hold: None,
            key_id: "kid".into(),
            user_id: "uid".into(),
            provider: "openai".into(),
            api_format: "openai:chat".into(),
            model: "gpt-4o".into(),
            admitted_at_ms: 1_000,
            expires_at_ms: 2_000,
        }
    }

    #[test]
    fn a_sealed_settlement_sends_its_facts_and_its_events_head_where_the_script_reads_them() {
        let deadline = facts().deadline_ms();
        let l = lease(Some(facts()));
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
        assert_eq!(args.len(), 12);
        assert_eq!(&args[..3], ["7", "3", "600000"]);
        assert_eq!(args[3], l.event_id);
        assert_eq!(&args[4..8], ["live", "60000", "sealed", "1"]);
        assert_eq!(&args[8..11], ["1000", "2000", &deadline.to_string()]);
        // The event's first thirteen values, in sync/usage.rs's order: the given model, the
        // lease's provider and api format.
        let head: Vec<&str> = args[11].split('\x1f').collect();
        assert_eq!(
            head,
            [
                l.event_id.as_str(),
                "kid",
                "uid",
                "7",
                "1",
                "2",
                "3",
                "-1",
                "200",
                "openai",
                "openai:chat",
                "gpt-4o-mini",
                "1000"
            ]
        );
        let keys = call.keys();
        assert_eq!(keys[1], l.keys.lease("N"), "the tombstone is KEYS[2]");
        assert_eq!(keys[2], l.keys.stream(), "the shard's stream is KEYS[3]");
    }

    #[test]
    fn a_lease_whose_member_carries_its_hold_names_it_in_argv_8() {
        let held = LeaseFacts {
            member_hold: Some(crate::hot::lease_id::MemberHold {
                nanos: 2_500,
                tokens: 40,
            }),
            ..facts()
        };
        let l = lease(Some(held));
        for plain in [false, true] {
            let call = Call::new(&l, Usage::default(), 600_000, 60_000).expecting_plain(plain);
            let args: Vec<String> = call.args().iter().map(text).collect();
            assert_eq!(
                &args[6..8],
                ["sealed", "=2500:40"],
                "expecting plain: {plain}"
            );
        }
    }

    #[test]
    fn an_unpriced_sealed_settlement_sends_the_provider_and_model_to_price_for() {
        let l = lease(Some(facts()));
        let usage = Usage {
            provider: Some("anthropic"),
            ..Default::default()
        };
        let call = Call::new(&l, usage, 600_000, 60_000);
        let args: Vec<String> = call.args().iter().map(text).collect();
        assert_eq!(args[0], "?");
        assert_eq!(
            &args[11..],
            ["anthropic", "gpt-4o"],
            "given, else the lease's"
        );
    }

    #[test]
    fn a_recorded_lease_sends_the_events_values_with_the_labels_marked() {
        let l = lease(None);
        let usage = Usage {
            input_tokens: 4,
            output_tokens: 5,
            response_time_ms: 6,
            status_code: 429,
            api_format: Some("openai:chat"),
            ..Default::default()
        };
        let call = Call::new(&l, usage, 600_000, 60_000);
        let args: Vec<String> = call.args().iter().map(text).collect();
        assert_eq!(args[0], "?", "unpriced");
        assert_eq!(
            &args[6..],
            ["record", "4", "5", "6", "429", "", "=openai:chat", ""]
        );
    }
}
