//! `/v1/admit`, `/v1/settle`, `/v1/release`: the gateway's JSON API.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::credentials;
use super::error::ApiError;
use super::json::{parse, StrictJson};
use super::AppState;
use crate::decision::DenyCode;
use crate::hot::admission::{AdmitArgs, LeaseTerm, ReleaseOutcome, SettleArgs, SettleOutcome};
use crate::hot::gate::Decision;
use crate::hot::redis::RedisFailure;
use crate::keys;
use crate::label::{is_label, MAX_LABEL_LEN};
use crate::money::Money;
use crate::store::keys::MAX_BALANCE_NANOS;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmitBody {
    key: Option<String>,
    provider: Option<String>,
    api_format: Option<String>,
    model: Option<String>,
    reserve_usd: Option<Money>,
    reserve_tokens: Option<u64>,
    lease_ttl_seconds: Option<u64>,
    lease: Option<String>,
}

/// What an admission asks, whoever asked it (JSON API or a proxy subrequest).
#[derive(Debug, Default)]
pub struct AdmitQuery {
    pub key: Option<String>,
    pub provider: String,
    pub api_format: String,
    pub model: String,
    pub reserve: Money,
    pub reserve_tokens: u64,
    pub lease: LeaseTerm,
}

/// Runs an admission: hashes the key and asks the gate. A missing key is decided here.
pub async fn decide(state: &AppState, q: &AdmitQuery) -> Decision {
    let Some(key) = q.key.as_deref() else {
        state.metrics.admission(Some(DenyCode::KeyMissing));
        return Decision::Denied {
            code: DenyCode::KeyMissing,
            retry_after_ms: 0,
        };
    };
    let key_hash = keys::hash(key);
    state
        .gate
        .admit(AdmitArgs {
            key_hash: &key_hash,
            provider: &q.provider,
            api_format: &q.api_format,
            model: &q.model,
            reserve: q.reserve,
            reserve_tokens: q.reserve_tokens,
            lease: q.lease,
        })
        .await
}

/// Bounds on what one settlement may report. Far above any real request, they keep a hostile
/// or buggy caller from overflowing the running sums (Redis `used`, the Postgres roll-ups).
const MAX_TOKENS: u64 = 1 << 40;
const MAX_RESPONSE_TIME_MS: u64 = 1 << 31;

fn check_label(field: &str, value: Option<&str>) -> Result<(), ApiError> {
    match value {
        Some(v) if !is_label(v) => Err(ApiError::bad_request(format!(
            "{field} must be at most {MAX_LABEL_LEN} characters without control characters"
        ))),
        _ => Ok(()),
    }
}

fn check_amount(field: &str, m: Money) -> Result<(), ApiError> {
    if m.is_negative() {
        return Err(ApiError::bad_request(format!(
            "{field} must not be negative"
        )));
    }
    if m.nanos() > MAX_BALANCE_NANOS {
        return Err(ApiError::bad_request(format!("{field} is too large")));
    }
    Ok(())
}

fn check_count(field: &str, v: Option<u64>, max: u64) -> Result<(), ApiError> {
    match v {
        Some(n) if n > max => Err(ApiError::bad_request(format!("{field} is too large"))),
        _ => Ok(()),
    }
}

/// A lease lifetime in whole seconds as the contract bounds it; `what` names where it came
/// from in the error.
pub fn lease_ttl(what: &str, secs: Option<u64>) -> Result<LeaseTerm, ApiError> {
    secs.and_then(LeaseTerm::seconds).ok_or_else(|| {
        ApiError::bad_request(format!(
            "{what} must be a whole number of seconds from 1 to {}",
            LeaseTerm::MAX_SECONDS
        ))
    })
}

/// `"lease": "none"` (or `X-Tollgate-Lease: none`): an admission without a lease.
pub fn lease_mode(what: &str, value: &str) -> Result<LeaseTerm, ApiError> {
    if value.trim().eq_ignore_ascii_case("none") {
        Ok(LeaseTerm::None)
    } else {
        Err(ApiError::bad_request(format!(
            "{what} takes only \"none\" (admit without a lease)"
        )))
    }
}

/// The lease an admission asks for: none, a lifetime of its own, or `default`.
fn lease_term(
    mode: Option<&str>,
    ttl: Option<u64>,
    default: LeaseTerm,
) -> Result<LeaseTerm, ApiError> {
    let ttl = ttl
        .map(|v| lease_ttl("lease_ttl_seconds", Some(v)))
        .transpose()?;
    match mode {
        Some(m) => lease_mode("lease", m),
        None => Ok(ttl.unwrap_or(default)),
    }
}

/// `Retry-After` in whole seconds, rounded up.
pub fn retry_after_header(retry_after_ms: u64) -> HeaderValue {
    HeaderValue::from(retry_after_ms.div_ceil(1000).max(1))
}

/// The JSON body of a denial. Typed rather than a `json!` tree: one of these is built per
/// request, and a struct serializes without allocating a map.
#[derive(Serialize)]
pub struct DenialBody {
    allowed: bool,
    code: &'static str,
    message: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

pub fn denial_body(code: DenyCode, retry_after_ms: u64) -> DenialBody {
    DenialBody {
        allowed: false,
        code: code.as_str(),
        message: code.message(),
        retry_after_ms: (retry_after_ms > 0).then_some(retry_after_ms),
    }
}

#[derive(Serialize)]
struct RateLimitBody {
    limit: Option<u64>,
    remaining: Option<u64>,
    reset_ms: u64,
}

#[derive(Serialize)]
struct ConcurrencyBody {
    limit: Option<u64>,
    in_flight: u64,
}

#[derive(Serialize)]
struct TokensBody {
    limit: Option<u64>,
    remaining: Option<u64>,
    reset_ms: u64,
}

#[derive(Serialize)]
struct BudgetBody {
    limit_usd: Money,
    remaining_usd: Money,
    resets_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The JSON body of an allowed admission.
#[derive(Serialize)]
pub struct AllowedBody<'a> {
    allowed: bool,
    key_id: &'a str,
    user_id: &'a str,
    lease_id: Option<&'a str>,
    rate_limit: RateLimitBody,
    concurrency: ConcurrencyBody,
    balance_remaining_usd: Option<Money>,
    tokens: TokensBody,
    budget: Option<BudgetBody>,
}

pub fn allowed_body(d: &crate::hot::admission::Grant) -> AllowedBody<'_> {
    AllowedBody {
        allowed: true,
        key_id: &d.key_id,
        user_id: &d.user_id,
        lease_id: d.lease_id.as_deref(),
        rate_limit: RateLimitBody {
            limit: d.rate_limit,
            remaining: d.rate_remaining,
            reset_ms: d.reset_ms,
        },
        concurrency: ConcurrencyBody {
            limit: d.concurrent_limit,
            in_flight: d.in_flight,
        },
        balance_remaining_usd: d.balance_available,
        tokens: TokensBody {
            limit: d.token_limit,
            remaining: d.tokens_remaining,
            reset_ms: d.tokens_reset_ms,
        },
        budget: d.budget.map(|limit_usd| BudgetBody {
            limit_usd,
            remaining_usd: d.budget_remaining.unwrap_or_default(),
            resets_at: d
                .budget_resets_at_ms
                .and_then(chrono::DateTime::from_timestamp_millis),
        }),
    }
}

pub async fn admit(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: AdmitBody = match parse(&body) {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let reserve = body.reserve_usd.unwrap_or_default();
    let checked = check_amount("reserve_usd", reserve)
        .and_then(|()| check_label("provider", body.provider.as_deref()))
        .and_then(|()| check_label("api_format", body.api_format.as_deref()))
        .and_then(|()| check_label("model", body.model.as_deref()))
        .and_then(|()| check_count("reserve_tokens", body.reserve_tokens, MAX_TOKENS))
        .and_then(|()| {
            lease_term(
                body.lease.as_deref(),
                body.lease_ttl_seconds,
                LeaseTerm::Default,
            )
        });
    let lease = match checked {
        Ok(lease) => lease,
        Err(e) => return e.into_response(),
    };
    let q = AdmitQuery {
        key: body
            .key
            .filter(|k| !k.trim().is_empty())
            .or_else(|| credentials::api_key(&headers).map(str::to_string)),
        provider: body.provider.unwrap_or_default(),
        api_format: body.api_format.unwrap_or_default(),
        model: body.model.unwrap_or_default(),
        reserve,
        reserve_tokens: body.reserve_tokens.unwrap_or(0),
        lease,
    };
    match decide(&state, &q).await {
        Decision::Allowed { grant } => (StatusCode::OK, Json(allowed_body(&grant))).into_response(),
        Decision::Denied {
            code,
            retry_after_ms,
        } => {
            let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::FORBIDDEN);
            let mut res = (status, Json(denial_body(code, retry_after_ms))).into_response();
            if retry_after_ms > 0 {
                res.headers_mut()
                    .insert("retry-after", retry_after_header(retry_after_ms));
            }
            res
        }
        Decision::Refused { code, detail } => {
            ApiError::from(RedisFailure::Refused { code, detail }).into_response()
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleBody {
    lease_id: String,
    cost_usd: Option<Money>,
    input_tokens: Option<u64>,
    cached_input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    response_time_ms: Option<u64>,
    status_code: Option<u16>,
    provider: Option<String>,
    api_format: Option<String>,
    model: Option<String>,
}

fn lease_unknown() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "lease_unknown",
        "no such lease was issued",
    )
}

pub async fn settle(
    State(state): State<Arc<AppState>>,
    StrictJson(b): StrictJson<SettleBody>,
) -> Result<Response, ApiError> {
    if let Some(cost) = b.cost_usd {
        check_amount("cost_usd", cost)?;
    }
    check_count("cached_input_tokens", b.cached_input_tokens, MAX_TOKENS)?;
    if b.cached_input_tokens.unwrap_or(0) > b.input_tokens.unwrap_or(0) {
        return Err(ApiError::bad_request(
            "cached_input_tokens must not exceed input_tokens",
        ));
    }
    check_label("provider", b.provider.as_deref())?;
    check_label("api_format", b.api_format.as_deref())?;
    check_label("model", b.model.as_deref())?;
    check_count("input_tokens", b.input_tokens, MAX_TOKENS)?;
    check_count("output_tokens", b.output_tokens, MAX_TOKENS)?;
    check_count("total_tokens", b.total_tokens, MAX_TOKENS)?;
    check_count("response_time_ms", b.response_time_ms, MAX_RESPONSE_TIME_MS)?;
    let outcome = state
        .gate
        .settle(&SettleArgs {
            lease_id: &b.lease_id,
            cost: b.cost_usd,
            input_tokens: b.input_tokens.unwrap_or(0),
            cached_input_tokens: b.cached_input_tokens.unwrap_or(0),
            output_tokens: b.output_tokens.unwrap_or(0),
            total_tokens: b.total_tokens,
            response_time_ms: b.response_time_ms,
            status_code: b.status_code,
            provider: b.provider.as_deref(),
            api_format: b.api_format.as_deref(),
            model: b.model.as_deref(),
            only_live: false,
        })
        .await
        .inspect_err(|e| state.metrics.redis_error(e.kind()))?;
    let m = &state.metrics;
    let (duplicate, expired, available) = match outcome {
        SettleOutcome::Unknown => {
            m.settle_lease_unknown.increment(1);
            return Err(lease_unknown());
        }
        SettleOutcome::PriceUnknown | SettleOutcome::NeedsPrice { .. } => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "price_unknown",
                "no price is known for this provider and model: send cost_usd",
            ))
        }
        SettleOutcome::CostTooLarge => {
            return Err(ApiError::bad_request(
                "the cost of these tokens is too large",
            ))
        }
        SettleOutcome::Duplicate { available } => {
            m.settle_duplicate.increment(1);
            (true, false, available)
        }
        SettleOutcome::Settled {
            lease_expired,
            available,
        } => {
            if lease_expired {
                m.settle_lease_expired.increment(1);
            } else {
                m.settled.increment(1);
            }
            (false, lease_expired, available)
        }
    };
    Ok(Json(json!({
        "settled": true,
        "duplicate": duplicate,
        "lease_expired": expired,
        "balance_remaining_usd": available,
    }))
    .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseBody {
    lease_id: String,
}

pub async fn release(
    State(state): State<Arc<AppState>>,
    StrictJson(b): StrictJson<ReleaseBody>,
) -> Result<Response, ApiError> {
    match state
        .gate
        .release(&b.lease_id)
        .await
        .inspect_err(|e| state.metrics.redis_error(e.kind()))?
    {
        ReleaseOutcome::Released | ReleaseOutcome::Ended => {
            Ok(Json(json!({"released": true})).into_response())
        }
        ReleaseOutcome::Unknown => Err(lease_unknown()),
    }
}
