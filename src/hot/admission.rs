//! Typed calls of the hot-path scripts: admit, settle, release, hydrate. Each is exactly one
//! Redis command (an `EVALSHA`); this module only shapes arguments and answers.

use std::time::Duration;

use redis::{FromRedisValue, Value};

use super::layout::{new_nonce, KeyRedisKeys, Layout};
use super::lease_id::{LeaseFacts, LeaseRef, LeaseSeal, LeaseSecrets};
use super::redis::{Redis, RedisFailure};
use super::scripts::{ScriptArg, Scripts};
use crate::decision::DenyCode;
use crate::money::{Money, MAX_EXACT};
use crate::period::BudgetPeriod;
use crate::store::keys::KeyRow;

/// How long an admission's lease lives, or that it takes none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LeaseTerm {
    /// `TOLLGATE_LEASE_TTL_SECONDS`.
    #[default]
    Default,
    /// A lifetime the caller chose (`lease_ttl_seconds`, `X-Tollgate-Lease-Ttl`, or the
    /// subrequest default), already checked against [`LeaseTerm::MAX_SECONDS`].
    Ttl(Duration),
    /// No lease: the rate limit and the balance apply, the concurrency limit and holds do not.
    None,
}

impl LeaseTerm {
    /// Longest lifetime one admission may ask for (the contract's bound).
    pub const MAX_SECONDS: u64 = 86_400;

    /// A caller's lifetime in seconds; `None` outside 1 to [`LeaseTerm::MAX_SECONDS`].
    pub fn seconds(secs: u64) -> Option<LeaseTerm> {
        (1..=Self::MAX_SECONDS)
            .contains(&secs)
            .then(|| LeaseTerm::Ttl(Duration::from_secs(secs)))
    }
}

/// What an admission asks.
#[derive(Debug, Clone, Copy)]
pub struct AdmitArgs<'a> {
    pub key_hash: &'a str,
    pub provider: &'a str,
    pub api_format: &'a str,
    pub model: &'a str,
    pub reserve: Money,
    /// Tokens the lease holds against the key's token limit until it ends.
    pub reserve_tokens: u64,
    pub lease: LeaseTerm,
}

/// A granted admission.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub key_id: String,
    pub user_id: String,
    /// `None` for an admission without a lease.
    pub lease_id: Option<String>,
    pub rate_limit: Option<u64>,
    pub rate_remaining: Option<u64>,
    pub reset_ms: u64,
    pub concurrent_limit: Option<u64>,
    pub in_flight: u64,
    pub balance_available: Option<Money>,
    pub token_limit: Option<u64>,
    pub tokens_remaining: Option<u64>,
    pub tokens_reset_ms: u64,
    pub budget: Option<Money>,
    pub budget_remaining: Option<Money>,
    /// When the budget's period turns (ms since the epoch); `None` when it never does.
    pub budget_resets_at_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
// Not boxed: a decision is built and moved once per admission, and a box would be an
// allocation on the hot path for every allowed one.
#[allow(clippy::large_enum_variant)]
pub enum ScriptAdmit {
    /// The key's state is not in Redis yet.
    Miss,
    Denied {
        code: DenyCode,
        retry_after_ms: u64,
    },
    Allowed(Grant),
}

/// What a settlement reports.
#[derive(Debug, Clone, Default)]
pub struct SettleArgs<'a> {
    pub lease_id: &'a str,
    /// `None`: priced from the tokens (see `Gate::settle`).
    pub cost: Option<Money>,
    pub input_tokens: u64,
    /// Of `input_tokens`, those read from a prompt cache (priced at the cached rate).
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: Option<u64>,
    pub response_time_ms: Option<u64>,
    pub status_code: Option<u16>,
    pub provider: Option<&'a str>,
    pub api_format: Option<&'a str>,
    pub model: Option<&'a str>,
    /// A released lease counts as ended (a duplicate) instead of being settled: for reports
    /// from access logs, which may arrive after the lease was released some other way.
    pub only_live: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SettleOutcome {
    Unknown,
    /// Asked with no cost: the provider and model the settlement is priced for (the
    /// settlement's own, else the admission's). Nothing was written.
    NeedsPrice {
        provider: String,
        model: String,
    },
    /// No price is known for the settlement's provider and model; nothing was written.
    PriceUnknown,
    /// The cost priced from the tokens is beyond what one settlement may cost.
    CostTooLarge,
    Duplicate {
        available: Option<Money>,
    },
    Settled {
        lease_expired: bool,
        available: Option<Money>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    Unknown,
    Released,
    /// Settled or released before: nothing changed.
    Ended,
}

/// The hot path's view of Redis.
#[derive(Clone)]
pub struct HotPath {
    pub redis: Redis,
    pub layout: Layout,
    seal: LeaseSeal,
    scripts: std::sync::Arc<Scripts>,
    window_ms: i64,
    lease_ttl_ms: i64,
    /// How long a settled lease is remembered, to answer retries with `duplicate`.
    tombstone_ttl_ms: i64,
    negative_ttl_ms: i64,
}

/// A lease can still be settled this long after it expired: an upstream call that outran the
/// lease TTL is still charged (a sealed id is valid until then, and so is its tombstone).
pub const LATE_SETTLE_GRACE: Duration = Duration::from_secs(3600);
/// A settled or released lease is remembered at least this long, so a retried settlement
/// answers `duplicate` (later it answers `lease_unknown`; either way nothing is charged twice).
/// A sealed id's tombstone lives longer, until the id's deadline, since until then the id alone
/// could be settled again (docs/PERFORMANCE.md: what the tombstones cost in memory).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);
/// An unknown key hash is remembered as unknown for this long.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(30);

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn parse_failure(_: redis::ParsingError) -> RedisFailure {
    RedisFailure::Command("unexpected script reply".into())
}

fn strings(v: Value) -> Result<Vec<String>, RedisFailure> {
    Vec::<String>::from_redis_value(v).map_err(parse_failure)
}

fn int(s: Option<&String>) -> i64 {
    s.and_then(|s| s.parse().ok()).unwrap_or(-1)
}

fn limit(n: i64) -> Option<u64> {
    u64::try_from(n).ok().filter(|n| *n > 0)
}

fn balance(n: i64) -> Option<Money> {
    (n >= 0).then_some(Money::from_nanos(n))
}

/// `\x1fa\x1fb\x1f`, or empty for "any": what admit.lua matches with one `string.find`.
fn allow_list(list: &Option<Vec<String>>) -> String {
    match list {
        Some(items) if !items.is_empty() => {
            let mut s = String::from('\u{1f}');
            for i in items {
                s.push_str(i);
                s.push('\u{1f}');
            }
            s
        }
        _ => String::new(),
    }
}

impl HotPath {
    pub fn new(
        redis: Redis,
        namespace: &str,
        window: Duration,
        lease_ttl: Duration,
        secrets: LeaseSecrets,
    ) -> Self {
        HotPath {
            redis,
            layout: Layout::new(namespace),
            seal: LeaseSeal::new(namespace, secrets),
            scripts: std::sync::Arc::new(Scripts::default()),
            window_ms: ms(window),
            lease_ttl_ms: ms(lease_ttl),
            tombstone_ttl_ms: ms(DUPLICATE_WINDOW),
            negative_ttl_ms: ms(NEGATIVE_TTL),
        }
    }

    pub fn scripts(&self) -> &Scripts {
        &self.scripts
    }

    /// The same hot path over another connection: for callers whose traffic must not queue
    /// in front of admissions on the shared one (access-log reports).
    pub fn with_redis(&self, redis: Redis) -> HotPath {
        HotPath {
            redis,
            ..self.clone()
        }
    }

    /// The lifetime of a lease taken with `term`, in ms; 0 for none.
    pub fn lease_ttl_ms(&self, term: LeaseTerm) -> i64 {
        match term {
            LeaseTerm::Default => self.lease_ttl_ms,
            LeaseTerm::Ttl(d) => ms(d),
            LeaseTerm::None => 0,
        }
    }

    pub fn keys_for(&self, key_hash: &str) -> KeyRedisKeys {
        self.layout.for_hash(key_hash)
    }

    pub async fn admit(&self, a: AdmitArgs<'_>) -> Result<ScriptAdmit, RedisFailure> {
        let k = self.layout.for_hash(a.key_hash);
        let nonce = new_nonce();
        let ttl_ms = self.lease_ttl_ms(a.lease);
        // The bounds admit.lua leaves to its one caller (see its header).
        let script = &self.scripts.admit;
        // A year: the longest `TOLLGATE_LEASE_TTL_SECONDS` (a caller's own TTL is at most a day).
        let max_ttl_ms = 366 * 24 * 3600 * 1000;
        if !(0..=max_ttl_ms).contains(&ttl_ms) || (ttl_ms == 0 && a.lease != LeaseTerm::None) {
            return Err(script.refuse("INVALID_ARGUMENT", "lease ttl outside 1 ms to a year"));
        }
        if a.reserve.nanos() > MAX_EXACT {
            return Err(script.refuse("LIMIT_EXCEEDED", "reserve above 2^53 - 1 nano-USD"));
        }
        if a.reserve_tokens > MAX_EXACT.unsigned_abs() {
            return Err(script.refuse("INVALID_ARGUMENT", "reserved tokens above 2^53 - 1"));
        }
        let v = script
            .run(
                &self.redis,
                &[&k.state, &k.rate, &k.live, &k.holds, &k.tokens, &k.rate_set],
                &[
                    ScriptArg::Int(self.window_ms),
                    ScriptArg::Int(ttl_ms),
                    ScriptArg::Str(&nonce),
                    ScriptArg::Str(a.provider),
                    ScriptArg::Str(a.api_format),
                    ScriptArg::Str(a.model),
                    ScriptArg::Int(a.reserve.nanos().max(0)),
                    ScriptArg::Int(i64::try_from(a.reserve_tokens).unwrap_or(MAX_EXACT)),
                ],
            )
            .await?;
        let r = strings(v)?;
        match r.first().map(String::as_str) {
            Some("miss") => Ok(ScriptAdmit::Miss),
            Some("deny") => {
                let code = r
                    .get(1)
                    .and_then(|c| DenyCode::from_code(c))
                    .ok_or_else(|| RedisFailure::Command("unknown denial".into()))?;
                Ok(ScriptAdmit::Denied {
                    code,
                    retry_after_ms: u64::try_from(int(r.get(2))).unwrap_or(0),
                })
            }
            // Eleven fields for a key without a token limit or a budget (see admit.lua): the
            // missing ones read as -1, which is what they would say.
            Some("ok") if r.len() >= 11 => {
                let rl = limit(int(r.get(3)));
                let tl = limit(int(r.get(11)));
                let now_ms = int(r.get(9));
                let lease_id = (ttl_ms > 0).then(|| {
                    self.seal.seal(
                        &k,
                        &nonce,
                        &LeaseFacts {
                            tracked: r[10] == "1",
                            key_id: r[1].clone(),
                            user_id: r[2].clone(),
                            provider: a.provider.to_string(),
                            api_format: a.api_format.to_string(),
                            model: a.model.to_string(),
                            admitted_at_ms: now_ms,
                            expires_at_ms: now_ms.saturating_add(ttl_ms),
                        },
                    )
                });
                Ok(ScriptAdmit::Allowed(Grant {
                    key_id: r[1].clone(),
                    user_id: r[2].clone(),
                    lease_id,
                    rate_limit: rl,
                    rate_remaining: rl.map(|_| u64::try_from(int(r.get(4))).unwrap_or(0)),
                    reset_ms: u64::try_from(int(r.get(5))).unwrap_or(0),
                    concurrent_limit: limit(int(r.get(6))),
                    in_flight: u64::try_from(int(r.get(7))).unwrap_or(0),
                    balance_available: balance(int(r.get(8))),
                    token_limit: tl,
                    tokens_remaining: tl.map(|_| u64::try_from(int(r.get(12))).unwrap_or(0)),
                    tokens_reset_ms: u64::try_from(int(r.get(13))).unwrap_or(0),
                    budget: balance(int(r.get(14))),
                    budget_remaining: balance(int(r.get(14)))
                        .map(|_| Money::from_nanos(int(r.get(15)).max(0))),
                    budget_resets_at_ms: Some(int(r.get(16))).filter(|t| *t >= 0),
                }))
            }
            _ => Err(RedisFailure::Command("unexpected admit reply".into())),
        }
    }

    /// The id of a lease granted while Redis could not be reached: sealed like any other, and
    /// untracked (nothing of it is in Redis), so its settlement is recorded like any other.
    pub fn fail_open_lease(&self, key_hash: &str, facts: &LeaseFacts) -> String {
        let k = self.layout.for_hash(key_hash);
        self.seal.seal(&k, &new_nonce(), facts)
    }

    /// A lease id taken apart and verified; `None` for one this hot path did not issue.
    pub fn open_lease(&self, lease_id: &str) -> Option<LeaseRef> {
        self.seal.open(lease_id)
    }

    pub async fn settle(&self, a: &SettleArgs<'_>) -> Result<SettleOutcome, RedisFailure> {
        let Some(l) = self.seal.open(a.lease_id) else {
            return Ok(SettleOutcome::Unknown);
        };
        // The bounds settle.lua leaves to its one caller (see its header).
        let script = &self.scripts.settle;
        match a.cost {
            Some(c) if c.is_negative() => {
                return Err(script.refuse("INVALID_ARGUMENT", "a negative cost"))
            }
            Some(c) if c.nanos() > MAX_EXACT => {
                return Err(script.refuse("LIMIT_EXCEEDED", "cost above 2^53 - 1 nano-USD"))
            }
            _ => {}
        }
        // Summed here, not in Lua: Lua's doubles lose digits past 2^53 and print them as
        // `1e+15`, which the syncer could not read back.
        let total = a
            .total_tokens
            .unwrap_or_else(|| a.input_tokens.saturating_add(a.output_tokens));
        if [a.input_tokens, a.output_tokens, total]
            .iter()
            .any(|t| *t > MAX_EXACT.unsigned_abs())
        {
            return Err(script.refuse("INVALID_ARGUMENT", "tokens above 2^53 - 1"));
        }
        let given = |v: Option<&str>| v.map(|s| format!("={s}")).unwrap_or_default();
        let (p, f, m) = (given(a.provider), given(a.api_format), given(a.model));
        let n = |v: Option<u64>| v.map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX));
        let mut args = vec![
            match a.cost {
                Some(c) => ScriptArg::Int(c.nanos()),
                None => ScriptArg::Str("?"),
            },
            ScriptArg::Int(n(Some(a.input_tokens))),
            ScriptArg::Int(n(Some(a.output_tokens))),
            ScriptArg::Int(n(Some(total))),
            ScriptArg::Int(n(a.response_time_ms)),
            ScriptArg::Int(n(a.status_code.map(u64::from))),
            ScriptArg::Str(&p),
            ScriptArg::Str(&f),
            ScriptArg::Str(&m),
            ScriptArg::Int(self.tombstone_ttl_ms),
            ScriptArg::Str(&l.event_id),
            ScriptArg::Str(if a.only_live { "live" } else { "any" }),
            ScriptArg::Int(self.window_ms),
        ];
        match &l.facts {
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
        let lease = l.keys.lease(&l.nonce);
        let stream = l.keys.stream();
        let v = script
            .run(
                &self.redis,
                &[
                    &l.keys.state,
                    &l.keys.live,
                    &l.keys.holds,
                    &lease,
                    &stream,
                    &l.keys.tokens,
                ],
                &args,
            )
            .await?;
        let r = strings(v)?;
        match r.first().map(String::as_str) {
            Some("unknown") => Ok(SettleOutcome::Unknown),
            Some("price") => Ok(SettleOutcome::NeedsPrice {
                provider: r.get(1).cloned().unwrap_or_default(),
                model: r.get(2).cloned().unwrap_or_default(),
            }),
            Some("duplicate") => Ok(SettleOutcome::Duplicate {
                available: balance(int(r.get(1))),
            }),
            Some("settled") => Ok(SettleOutcome::Settled {
                lease_expired: r.get(1).map(String::as_str) == Some("1"),
                available: balance(int(r.get(2))),
            }),
            _ => Err(RedisFailure::Command("unexpected settle reply".into())),
        }
    }

    pub async fn release(&self, lease_id: &str) -> Result<ReleaseOutcome, RedisFailure> {
        let Some(l) = self.seal.open(lease_id) else {
            return Ok(ReleaseOutcome::Unknown);
        };
        let mut args = vec![ScriptArg::Str(&l.nonce)];
        match &l.facts {
            Some(f) => {
                let left = f
                    .deadline_ms()
                    .saturating_sub(chrono::Utc::now().timestamp_millis());
                if left <= 0 {
                    return Ok(ReleaseOutcome::Unknown);
                }
                // The 'R' must outlive the id, so a later report of it is a duplicate.
                args.extend([
                    ScriptArg::Str("sealed"),
                    ScriptArg::Str(if f.tracked { "1" } else { "0" }),
                    ScriptArg::Int(left.max(self.tombstone_ttl_ms)),
                ]);
            }
            None => args.push(ScriptArg::Str("record")),
        }
        let v = self
            .scripts
            .release
            .run(
                &self.redis,
                &[
                    &l.keys.state,
                    &l.keys.live,
                    &l.keys.holds,
                    &l.keys.lease(&l.nonce),
                ],
                &args,
            )
            .await?;
        match strings(v)?.first().map(String::as_str) {
            Some("released") => Ok(ReleaseOutcome::Released),
            Some("ended") => Ok(ReleaseOutcome::Ended),
            Some("unknown") => Ok(ReleaseOutcome::Unknown),
            _ => Err(RedisFailure::Command("unexpected release reply".into())),
        }
    }

    /// Writes a key's configuration into Redis (newest version wins).
    pub async fn hydrate(&self, row: &KeyRow) -> Result<(), RedisFailure> {
        let k = self.layout.for_hash(&row.key_hash);
        let exp = row
            .expires_at
            .map(|t| t.timestamp_millis().to_string())
            .unwrap_or_default();
        let (prov, fmt, mdl) = (
            allow_list(&row.allowed_providers),
            allow_list(&row.allowed_api_formats),
            allow_list(&row.allowed_models),
        );
        let key_id = row.id.to_string();
        // The period the seeded spend belongs to: Postgres summed it at the current time.
        let period_start = row
            .budget_period
            .as_deref()
            .and_then(BudgetPeriod::parse)
            .map(|p| {
                p.starts_at(chrono::Utc::now())
                    .timestamp_millis()
                    .to_string()
            })
            .unwrap_or_default();
        let bal = if row.is_standalone {
            row.current_balance_nanos.unwrap_or(-1)
        } else {
            -1
        };
        self.scripts
            .hydrate
            .run(
                &self.redis,
                &[&k.state],
                &[
                    ScriptArg::Str("key"),
                    ScriptArg::Int(row.version),
                    ScriptArg::Str(&key_id),
                    ScriptArg::Str(&row.user_id),
                    ScriptArg::Int(i64::from(row.is_active)),
                    ScriptArg::Str(&exp),
                    ScriptArg::Str(&prov),
                    ScriptArg::Str(&fmt),
                    ScriptArg::Str(&mdl),
                    ScriptArg::Int(row.rate_limit.map_or(-1, i64::from)),
                    ScriptArg::Int(row.concurrent_limit.map_or(-1, i64::from)),
                    ScriptArg::Int(i64::from(row.is_standalone)),
                    ScriptArg::Int(bal),
                    ScriptArg::Int(row.balance_used_nanos),
                    ScriptArg::Int(row.token_limit.unwrap_or(-1)),
                    ScriptArg::Int(row.budget_nanos.unwrap_or(-1)),
                    ScriptArg::Str(row.budget_period.as_deref().unwrap_or("")),
                    ScriptArg::Int(row.budget_spent_nanos),
                    ScriptArg::Str(&period_start),
                ],
            )
            .await?;
        Ok(())
    }

    /// Remembers, briefly, that no key has this hash.
    pub async fn hydrate_unknown(&self, key_hash: &str) -> Result<(), RedisFailure> {
        let k = self.layout.for_hash(key_hash);
        self.scripts
            .hydrate
            .run(
                &self.redis,
                &[&k.state],
                &[ScriptArg::Str("none"), ScriptArg::Int(self.negative_ttl_ms)],
            )
            .await?;
        Ok(())
    }

    /// Removes a physically deleted key's state.
    pub async fn forget(&self, key_hash: &str) -> Result<(), RedisFailure> {
        let k = self.layout.for_hash(key_hash);
        let mut cmd = redis::cmd("DEL");
        cmd.arg(&k.state)
            .arg(&k.rate)
            .arg(&k.rate_set)
            .arg(&k.live)
            .arg(&k.holds)
            .arg(&k.tokens);
        self.redis.query(&cmd).await?;
        Ok(())
    }

    /// `used` as Redis knows it now (synced or not); `None` when the key is not hydrated.
    pub async fn used(&self, key_hash: &str) -> Result<Option<Money>, RedisFailure> {
        let k = self.layout.for_hash(key_hash);
        let mut cmd = redis::cmd("HGET");
        cmd.arg(&k.state).arg("used");
        let v = self.redis.query(&cmd).await?;
        let s = Option::<String>::from_redis_value(v).map_err(parse_failure)?;
        Ok(s.and_then(|s| s.parse().ok()).map(Money::from_nanos))
    }

    /// The readiness probe: runs the real settle script against a lease that cannot exist.
    /// Proves Redis answers, the script loads and runs, and touches nothing.
    pub async fn probe(&self) -> Result<(), RedisFailure> {
        let probe = format!("{}.{}", "0".repeat(32), "A".repeat(22));
        match self
            .settle(&SettleArgs {
                lease_id: &probe,
                ..Default::default()
            })
            .await?
        {
            SettleOutcome::Unknown => Ok(()),
            _ => Err(RedisFailure::Command("probe lease exists".into())),
        }
    }
}
