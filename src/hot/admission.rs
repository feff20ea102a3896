//! The hot path: admit, settle, release, hydrate, each exactly one Redis command (an `EVALSHA`).
//! Here the arguments' bounds are checked and the scripts' replies become outcomes; their wire
//! format is `scripts/<script>.rs`'s.

use std::sync::Arc;
use std::time::Duration;

use redis::FromRedisValue;

use super::known_keys::KnownKeys;
use super::layout::{new_nonce, KeyRedisKeys, Layout};
use super::lease_id::{LeaseFacts, LeaseRef, LeaseSeal, LeaseSecrets};
use super::redis::{Redis, RedisFailure};
use super::scripts::{admit, hydrate, release, scripts, settle, Scripts};
use crate::decision::DenyCode;
use crate::money::{Money, MAX_EXACT};
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
    window_ms: i64,
    lease_ttl_ms: i64,
    /// How long a settled lease is remembered, to answer retries with `duplicate`.
    tombstone_ttl_ms: i64,
    negative_ttl_ms: i64,
    /// Shared by every clone: one process, one memory of its keys.
    known: Arc<KnownKeys>,
    state_format: StateFormat,
}

/// How admissions write what a lease holds in Redis (`TOLLGATE_STATE_FORMAT`). Every release
/// since format 2 reads both; a replica of an earlier release reads only format 1, so a fleet
/// moves to 2 once every replica runs a release that reads it (docs/http-api.md, Upgrading).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateFormat {
    /// The hold in the key's `holds` hash, under the lease's nonce.
    #[default]
    One,
    /// The hold in the lease's live-set member, `<nonce>=<hold>`, and in its sealed id: one
    /// write fewer per admission that holds, and no `holds` read or delete when it ends.
    Two,
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

fn limit(n: i64) -> Option<u64> {
    u64::try_from(n).ok().filter(|n| *n > 0)
}

fn balance(n: i64) -> Option<Money> {
    (n >= 0).then_some(Money::from_nanos(n))
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
            window_ms: ms(window),
            lease_ttl_ms: ms(lease_ttl),
            tombstone_ttl_ms: ms(DUPLICATE_WINDOW),
            negative_ttl_ms: ms(NEGATIVE_TTL),
            known: Arc::default(),
            state_format: StateFormat::One,
        }
    }

    /// The same hot path writing new leases in `format`.
    pub fn with_state_format(mut self, format: StateFormat) -> Self {
        self.state_format = format;
        self
    }

    pub fn scripts(&self) -> &'static Scripts {
        scripts()
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
        let script = &scripts().admit;
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
        let (known, prior) = self.known.lookup(&k.state);
        let call = admit::Call::new(&k, &a, self.window_ms, ttl_ms, &nonce, known)
            .holds_in_members(self.state_format == StateFormat::Two);
        let v = script.run(&self.redis, &call.keys(), &call.args()).await?;
        let g = match admit::parse(v)? {
            admit::Reply::Miss => return Ok(ScriptAdmit::Miss),
            admit::Reply::Deny {
                code,
                retry_after_ms,
            } => {
                let code = DenyCode::from_code(&code)
                    .ok_or_else(|| RedisFailure::Command("unknown denial".into()))?;
                return Ok(ScriptAdmit::Denied {
                    code,
                    retry_after_ms: u64::try_from(retry_after_ms).unwrap_or(0),
                });
            }
            admit::Reply::Ok(g) => g,
        };
        let (key_id, user_id) = self
            .known
            .ids(&k.state, prior.as_deref(), &g)
            .ok_or_else(|| RedisFailure::Command("admit reply without the key's ids".into()))?;
        let lease_id = (ttl_ms > 0).then(|| {
            self.seal.seal(
                &k,
                &nonce,
                &LeaseFacts {
                    tracked: g.tracked,
                    member_hold: g.member_hold,
                    key_id: key_id.clone(),
                    user_id: user_id.clone(),
                    provider: a.provider.to_string(),
                    api_format: a.api_format.to_string(),
                    model: a.model.to_string(),
                    admitted_at_ms: g.now_ms,
                    expires_at_ms: g.now_ms.saturating_add(ttl_ms),
                },
            )
        });
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        let rl = limit(g.rate_limit);
        let tl = limit(g.token_limit);
        Ok(ScriptAdmit::Allowed(Grant {
            rate_limit: rl,
            rate_remaining: rl.map(|_| count(g.rate_remaining)),
            reset_ms: count(g.reset_ms),
            concurrent_limit: limit(g.concurrent_limit),
            in_flight: count(g.in_flight),
            balance_available: balance(g.available),
            token_limit: tl,
            tokens_remaining: tl.map(|_| count(g.tokens_remaining)),
            tokens_reset_ms: count(g.tokens_reset_ms),
            budget: balance(g.budget),
            budget_remaining: balance(g.budget)
                .map(|_| Money::from_nanos(g.budget_remaining.max(0))),
            budget_resets_at_ms: Some(g.budget_resets_at_ms).filter(|t| *t >= 0),
            key_id,
            user_id,
            lease_id,
        }))
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
        let script = &scripts().settle;
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
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let call = settle::Call::new(
            &l,
            settle::Usage {
                cost_nanos: a.cost.map(|c| c.nanos()),
                input_tokens: n(a.input_tokens),
                output_tokens: n(a.output_tokens),
                total_tokens: n(total),
                response_time_ms: a.response_time_ms.map_or(-1, n),
                status_code: a.status_code.map_or(-1, i64::from),
                provider: a.provider,
                api_format: a.api_format,
                model: a.model,
                only_live: a.only_live,
            },
            self.tombstone_ttl_ms,
            self.window_ms,
        )
        .expecting_plain(self.known.expects_plain(&l.keys.state));
        let v = script.run(&self.redis, &call.keys(), &call.args()).await?;
        Ok(match settle::parse(v)? {
            settle::Reply::Unknown => SettleOutcome::Unknown,
            settle::Reply::Price { provider, model } => {
                SettleOutcome::NeedsPrice { provider, model }
            }
            settle::Reply::Duplicate { available } => SettleOutcome::Duplicate {
                available: balance(available),
            },
            settle::Reply::Settled {
                lease_expired,
                available,
            } => SettleOutcome::Settled {
                lease_expired,
                available: balance(available),
            },
        })
    }

    pub async fn release(&self, lease_id: &str) -> Result<ReleaseOutcome, RedisFailure> {
        let Some(l) = self.seal.open(lease_id) else {
            return Ok(ReleaseOutcome::Unknown);
        };
        let facts = match &l.facts {
            Some(f) => {
                let left = f
                    .deadline_ms()
                    .saturating_sub(chrono::Utc::now().timestamp_millis());
                if left <= 0 {
                    return Ok(ReleaseOutcome::Unknown);
                }
                // The 'R' must outlive the id, so a later report of it is a duplicate.
                release::Facts::Sealed {
                    tracked: f.tracked,
                    member_hold: f.member_hold,
                    tombstone_ms: left.max(self.tombstone_ttl_ms),
                }
            }
            None => release::Facts::Record,
        };
        let tombstone = l.keys.lease(&l.nonce);
        let call = release::Call::new(&l, &tombstone, facts);
        let v = scripts()
            .release
            .run(&self.redis, &call.keys(), &call.args())
            .await?;
        Ok(match release::parse(v)? {
            release::Reply::Released => ReleaseOutcome::Released,
            release::Reply::Ended => ReleaseOutcome::Ended,
            release::Reply::Unknown => ReleaseOutcome::Unknown,
        })
    }

    /// Writes a key's configuration into Redis (newest version wins).
    pub async fn hydrate(&self, row: &KeyRow) -> Result<(), RedisFailure> {
        let k = self.layout.for_hash(&row.key_hash);
        let call = hydrate::Call::key(row);
        scripts()
            .hydrate
            .run(&self.redis, &[&k.state], &call.args())
            .await?;
        Ok(())
    }

    /// Remembers, briefly, that no key has this hash.
    pub async fn hydrate_unknown(&self, key_hash: &str) -> Result<(), RedisFailure> {
        let k = self.layout.for_hash(key_hash);
        let call = hydrate::Call::unknown(self.negative_ttl_ms);
        scripts()
            .hydrate
            .run(&self.redis, &[&k.state], &call.args())
            .await?;
        Ok(())
    }

    /// Removes a physically deleted key's state.
    pub async fn forget(&self, key_hash: &str) -> Result<(), RedisFailure> {
        let k = self.layout.for_hash(key_hash);
        let mut cmd = redis::cmd("DEL");
        cmd.arg(&k.state)
            .arg(&k.rate)
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
