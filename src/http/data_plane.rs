//! `/v1/admit`, `/v1/settle`, `/v1/release`: the gateway's JSON API.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::credentials;
use super::edge::{allowed_body, decide, denial, lease_mode, lease_ttl, AdmitQuery};
use super::error::ApiError;
use super::json::{parse, StrictJson};
use super::AppState;
use crate::gate::Decision;
use crate::gate::RedisFailure;
use crate::gate::{LeaseTerm, ReleaseOutcome, SettleArgs, SettleOutcome};
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
            denial(status, code, retry_after_ms)
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
