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
use crate::label::Label;
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

/// A provider, API format or model field: absent is fine, present must be a [`Label`].
fn label(field: &str, value: Option<String>) -> Result<Option<Label>, ApiError> {
    Label::optional(value).map_err(|e| ApiError::label(field, e))
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

/// The question an admission body asks. With several faults the first one checked is the
/// one answered, so the order below is part of the contract.
fn admit_query(body: AdmitBody, headers: &HeaderMap) -> Result<AdmitQuery, ApiError> {
    let reserve = body.reserve_usd.unwrap_or_default();
    check_amount("reserve_usd", reserve)?;
    let provider = label("provider", body.provider)?;
    let api_format = label("api_format", body.api_format)?;
    let model = label("model", body.model)?;
    check_count("reserve_tokens", body.reserve_tokens, MAX_TOKENS)?;
    let lease = lease_term(
        body.lease.as_deref(),
        body.lease_ttl_seconds,
        LeaseTerm::Default,
    )?;
    Ok(AdmitQuery {
        key: body
            .key
            .filter(|k| !k.trim().is_empty())
            .or_else(|| credentials::api_key(headers).map(str::to_string)),
        provider: provider.unwrap_or_default(),
        api_format: api_format.unwrap_or_default(),
        model: model.unwrap_or_default(),
        reserve,
        reserve_tokens: body.reserve_tokens.unwrap_or(0),
        lease,
    })
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
    let q = match admit_query(body, &headers) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
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
    let provider = label("provider", b.provider)?;
    let api_format = label("api_format", b.api_format)?;
    let model = label("model", b.model)?;
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
            provider: provider.as_deref(),
            api_format: api_format.as_deref(),
            model: model.as_deref(),
            only_live: false,
        })
        .await
        .inspect_err(|e| state.metrics.redis_error(e.kind()))?;
    let m = &state.metrics;
    let (duplicate, expired, available) = match outcome {
        SettleOutcome::Unknown => {
            m.settle_lease_unknown.increment(1);
            return Err(ApiError::lease_unknown());
        }
        SettleOutcome::PriceUnknown | SettleOutcome::NeedsPrice { .. } => {
            return Err(ApiError::price_unknown())
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
        ReleaseOutcome::Unknown => Err(ApiError::lease_unknown()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_label_is_answered_as_the_contract_words_it() {
        assert!(matches!(label("model", None), Ok(None)));
        assert_eq!(
            label("provider", Some("p1".into()))
                .ok()
                .flatten()
                .as_deref(),
            Some("p1")
        );
        let e = label("model", Some("a\u{0}b".into())).expect_err("a control character");
        assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, "bad_request"));
        assert_eq!(
            e.message,
            "model must be at most 256 characters without control characters"
        );
    }
}
