//! The admission service: the one door to the hot path for admissions, settlements and
//! releases — the admit script, and what happens around it.
//!
//! - A miss (key not in Redis) reads Postgres once, hydrates, and runs the script again. Unknown
//!   hashes are cached as unknown in Redis, and Postgres look-ups are throttled per process, so a
//!   flood of random keys costs Postgres at most [`LOOKUPS_PER_SECOND`] queries a second.
//! - When Redis cannot be reached, `closed` answers `unavailable`; `open` admits keys this process
//!   validated within the lease TTL, except keys with a balance, which always fail closed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::hot::admission::{HotPath, ScriptAdmit};
use crate::hot::lease_id::LeaseFacts;
use crate::hot::redis::Redis;
// What callers of the service name: the question, the answers and the failures. They import
// them from here, so that nothing outside the service reaches into `hot`.
use crate::config::FailMode;
use crate::decision::DenyCode;
pub use crate::hot::admission::{
    AdmitArgs, Grant, LeaseTerm, ReleaseOutcome, SettleArgs, SettleOutcome,
};
pub use crate::hot::redis::RedisFailure;
use crate::metrics::Metrics;
use crate::money::Money;
use crate::prices::Prices;
use crate::store;
use crate::store::keys::MAX_BALANCE_NANOS;

/// Sustained rate of Postgres look-ups for keys Redis does not know, per process.
pub const LOOKUPS_PER_SECOND: f64 = 100.0;
/// Burst allowance on top of the sustained rate.
pub const LOOKUP_BURST: f64 = 200.0;
/// Longest a look-up may take: it takes about a millisecond, and one that gets no answer for
/// this long is on a connection that will not answer (`store::keys::by_hash_within`).
pub const LOOKUP_BOUND: Duration = Duration::from_secs(2);
/// Bound of the fail-open memory; beyond it the oldest half is dropped.
const VALIDATED_MAX: usize = 100_000;

#[derive(Debug, Clone, PartialEq)]
// Not boxed, like `ScriptAdmit`: one allocation per allowed admission saved.
#[allow(clippy::large_enum_variant)]
pub enum Decision {
    Allowed {
        grant: Grant,
    },
    Denied {
        code: DenyCode,
        retry_after_ms: u64,
    },
    /// admit.lua, or its typed caller, refused the call before any write (see
    /// [`RedisFailure::Refused`]): not a denial of the key, and not worth retrying.
    Refused {
        code: &'static str,
        detail: String,
    },
}

impl Decision {
    fn deny(code: DenyCode) -> Self {
        // An outage is worth retrying shortly; other denials carry their own hint or none.
        let retry_after_ms = if code == DenyCode::Unavailable {
            1000
        } else {
            0
        };
        Decision::Denied {
            code,
            retry_after_ms,
        }
    }
}

struct Validated {
    at: Instant,
    key_id: String,
    user_id: String,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

enum SettlePrice {
    Cost(Money),
    Unknown,
    TooLarge,
}

pub struct Gate {
    hot: HotPath,
    /// The hot path over a connection of its own, for end-of-request reports from access
    /// logs: a burst of reports then queues behind itself, not in front of admissions.
    reports: HotPath,
    prices: Prices,
    db: PgPool,
    metrics: Metrics,
    fail_mode: FailMode,
    lease_ttl: Duration,
    /// Keys admitted recently, without a balance: who may pass while Redis is down.
    validated: Mutex<HashMap<String, Validated>>,
    lookups: Mutex<Bucket>,
}

impl Gate {
    pub fn new(
        hot: HotPath,
        reports_redis: Redis,
        prices: Prices,
        db: PgPool,
        metrics: Metrics,
        fail_mode: FailMode,
        lease_ttl: Duration,
    ) -> Self {
        Gate {
            reports: hot.with_redis(reports_redis),
            prices,
            hot,
            db,
            metrics,
            fail_mode,
            lease_ttl,
            validated: Mutex::new(HashMap::new()),
            lookups: Mutex::new(Bucket {
                tokens: LOOKUP_BURST,
                at: Instant::now(),
            }),
        }
    }

    /// Decides one admission. Counts it in the metrics.
    pub async fn admit(&self, args: AdmitArgs<'_>) -> Decision {
        let started = Instant::now();
        let decision = self.decide(args).await;
        self.metrics
            .admission_duration
            .record(started.elapsed().as_secs_f64());
        match &decision {
            Decision::Allowed { .. } => self.metrics.admission(None),
            Decision::Denied { code, .. } => self.metrics.admission(Some(*code)),
            // Counted as a script refusal, where it happened.
            Decision::Refused { .. } => {}
        }
        decision
    }

    /// The script's answer as a decision; `None` for a miss.
    fn answered(&self, key_hash: &str, answer: ScriptAdmit) -> Option<Decision> {
        match answer {
            ScriptAdmit::Allowed(grant) => {
                self.remember(key_hash, &grant);
                Some(Decision::Allowed { grant })
            }
            ScriptAdmit::Denied {
                code,
                retry_after_ms,
            } => Some(Decision::Denied {
                code,
                retry_after_ms,
            }),
            ScriptAdmit::Miss => None,
        }
    }

    async fn decide(&self, args: AdmitArgs<'_>) -> Decision {
        match self.hot.admit(args).await {
            Ok(answer) => match self.answered(args.key_hash, answer) {
                Some(decision) => decision,
                None => self.after_miss(args).await,
            },
            Err(RedisFailure::Refused { code, detail }) => Decision::Refused { code, detail },
            Err(e) => {
                self.metrics.redis_error(e.kind());
                tracing::warn!(error = %e, "admission could not reach redis");
                if self.fail_mode == FailMode::Open && e.is_transient() {
                    if let Some(grant) = self.fail_open(&args) {
                        self.metrics.fail_open.increment(1);
                        return Decision::Allowed { grant };
                    }
                }
                Decision::deny(DenyCode::Unavailable)
            }
        }
    }

    async fn after_miss(&self, args: AdmitArgs<'_>) -> Decision {
        if !self.take_lookup() {
            self.metrics.key_lookup_throttled.increment(1);
            return Decision::Denied {
                code: DenyCode::Unavailable,
                retry_after_ms: 1000,
            };
        }
        // In a task of its own, so that nothing dropping the request (the shutdown's bound, a
        // timeout layer) cancels it half-way and sends its connection back to the pool
        // unchecked (see `by_hash_within`).
        let (db, key_hash) = (self.db.clone(), args.key_hash.to_string());
        let lookup =
            tokio::spawn(
                async move { store::keys::by_hash_within(&db, &key_hash, LOOKUP_BOUND).await },
            );
        let row = match lookup.await {
            Ok(Ok(row)) => row,
            Err(e) => {
                tracing::warn!(error = %e, "key look-up task failed");
                return Decision::deny(DenyCode::Unavailable);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "key look-up in postgres failed");
                return Decision::deny(DenyCode::Unavailable);
            }
        };
        let hydrated = match &row {
            Some(row) => {
                self.metrics.key_lookup_found.increment(1);
                self.hot.hydrate(row).await
            }
            None => {
                self.metrics.key_lookup_unknown.increment(1);
                self.hot.hydrate_unknown(args.key_hash).await
            }
        };
        if let Err(e) = hydrated {
            self.metrics.redis_error(e.kind());
            return Decision::deny(DenyCode::Unavailable);
        }
        if row.is_none() {
            return Decision::deny(DenyCode::KeyInvalid);
        }
        match self.hot.admit(args).await {
            // A miss again: deleted between the hydration and now.
            Ok(answer) => self
                .answered(args.key_hash, answer)
                .unwrap_or_else(|| Decision::deny(DenyCode::Unavailable)),
            Err(RedisFailure::Refused { code, detail }) => Decision::Refused { code, detail },
            Err(e) => {
                self.metrics.redis_error(e.kind());
                Decision::deny(DenyCode::Unavailable)
            }
        }
    }

    fn take_lookup(&self) -> bool {
        let Ok(mut b) = self.lookups.lock() else {
            return false;
        };
        let now = Instant::now();
        let refill = now.duration_since(b.at).as_secs_f64() * LOOKUPS_PER_SECOND;
        b.tokens = (b.tokens + refill).min(LOOKUP_BURST);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn remember(&self, key_hash: &str, grant: &Grant) {
        if self.fail_mode != FailMode::Open {
            return;
        }
        let Ok(mut v) = self.validated.lock() else {
            return;
        };
        if grant.balance_available.is_some() || grant.budget.is_some() {
            // A key with a balance or a spend budget never fails open; forget any earlier
            // entry.
            v.remove(key_hash);
            return;
        }
        if v.len() >= VALIDATED_MAX && !v.contains_key(key_hash) {
            let ttl = self.lease_ttl;
            v.retain(|_, e| e.at.elapsed() < ttl);
            if v.len() >= VALIDATED_MAX {
                v.clear();
            }
        }
        v.insert(
            key_hash.to_string(),
            Validated {
                at: Instant::now(),
                key_id: grant.key_id.clone(),
                user_id: grant.user_id.clone(),
            },
        );
    }

    fn fail_open(&self, args: &AdmitArgs<'_>) -> Option<Grant> {
        let (key_id, user_id) = {
            let v = self.validated.lock().ok()?;
            let e = v
                .get(args.key_hash)
                .filter(|e| e.at.elapsed() < self.lease_ttl)?;
            (e.key_id.clone(), e.user_id.clone())
        };
        let ttl_ms = self.hot.lease_ttl_ms(args.lease);
        let grant = |lease_id| Grant {
            key_id: key_id.clone(),
            user_id: user_id.clone(),
            lease_id,
            rate_limit: None,
            rate_remaining: None,
            reset_ms: 0,
            concurrent_limit: None,
            in_flight: 0,
            balance_available: None,
            token_limit: None,
            tokens_remaining: None,
            tokens_reset_ms: 0,
            budget: None,
            budget_remaining: None,
            budget_resets_at_ms: None,
        };
        if args.lease == LeaseTerm::None {
            return Some(grant(None));
        }
        // Sealed like every lease id, so any replica settles it and its usage is recorded;
        // untracked, because Redis holds nothing of it.
        let now_ms = chrono::Utc::now().timestamp_millis();
        let lease_id = self.hot.fail_open_lease(
            args.key_hash,
            &LeaseFacts {
                tracked: false,
                member_hold: None,
                key_id: key_id.clone(),
                user_id: user_id.clone(),
                provider: args.provider.to_string(),
                api_format: args.api_format.to_string(),
                model: args.model.to_string(),
                admitted_at_ms: now_ms,
                expires_at_ms: now_ms.saturating_add(ttl_ms),
            },
        );
        Some(grant(Some(lease_id)))
    }

    /// Settles a lease.
    pub async fn settle(&self, args: &SettleArgs<'_>) -> Result<SettleOutcome, RedisFailure> {
        self.settle_via(&self.hot, args).await
    }

    /// [`Gate::settle`] for an access-log report: on the reports' own connection.
    pub async fn settle_reported(
        &self,
        args: &SettleArgs<'_>,
    ) -> Result<SettleOutcome, RedisFailure> {
        self.settle_via(&self.reports, args).await
    }

    /// Whether Redis runs the scripts (readiness).
    pub async fn probe(&self) -> Result<(), RedisFailure> {
        self.hot.probe().await
    }

    /// What Redis has charged a key so far (`None`: no balance, or not in Redis).
    pub async fn used(&self, key_hash: &str) -> Result<Option<Money>, RedisFailure> {
        self.hot.used(key_hash).await
    }

    /// The price table in force.
    pub fn prices(&self) -> &Prices {
        &self.prices
    }

    /// The cost of a settlement's tokens at the price of `provider/model`.
    fn price(&self, provider: &str, model: &str, a: &SettleArgs<'_>) -> SettlePrice {
        match self.prices.get(provider, model) {
            None => SettlePrice::Unknown,
            Some(p) => p
                .cost(
                    a.input_tokens,
                    a.cached_input_tokens,
                    a.output_tokens,
                    Money::from_nanos(MAX_BALANCE_NANOS),
                )
                .map_or(SettlePrice::TooLarge, SettlePrice::Cost),
        }
    }

    /// A settlement without a cost is priced from its tokens: in Rust, from the settlement's
    /// own provider and model when it names both (one script call), else from the admission's,
    /// which only the lease record knows: the script is asked for them first, writing
    /// nothing, and called again with the cost (two calls, only for such settlements).
    async fn settle_via(
        &self,
        hot: &HotPath,
        args: &SettleArgs<'_>,
    ) -> Result<SettleOutcome, RedisFailure> {
        let mut args = args.clone();
        if args.cost.is_none() && args.input_tokens == 0 && args.output_tokens == 0 {
            args.cost = Some(Money::ZERO);
        }
        if let (None, Some(provider), Some(model)) = (args.cost, args.provider, args.model) {
            match self.price(provider, model, &args) {
                SettlePrice::Cost(c) => args.cost = Some(c),
                SettlePrice::Unknown => return Ok(SettleOutcome::PriceUnknown),
                SettlePrice::TooLarge => return Ok(SettleOutcome::CostTooLarge),
            }
        }
        let mut outcome = hot.settle(&args).await?;
        if let SettleOutcome::NeedsPrice { provider, model } = &outcome {
            match self.price(provider, model, &args) {
                SettlePrice::Cost(c) => args.cost = Some(c),
                SettlePrice::Unknown => return Ok(SettleOutcome::PriceUnknown),
                SettlePrice::TooLarge => return Ok(SettleOutcome::CostTooLarge),
            }
            outcome = hot.settle(&args).await?;
        }
        if let SettleOutcome::Settled { .. } = outcome {
            let total = args
                .total_tokens
                .unwrap_or_else(|| args.input_tokens.saturating_add(args.output_tokens));
            self.metrics.tokens_settled.increment(total);
        }
        Ok(outcome)
    }

    /// Releases a lease.
    pub async fn release(&self, lease_id: &str) -> Result<ReleaseOutcome, RedisFailure> {
        self.release_via(&self.hot, lease_id).await
    }

    /// [`Gate::release`] for an access-log report: on the reports' own connection.
    pub async fn release_reported(&self, lease_id: &str) -> Result<ReleaseOutcome, RedisFailure> {
        self.release_via(&self.reports, lease_id).await
    }

    async fn release_via(
        &self,
        hot: &HotPath,
        lease_id: &str,
    ) -> Result<ReleaseOutcome, RedisFailure> {
        hot.release(lease_id).await
    }
}
