//! The admission edge, shared by `/v1/admit` and the proxies' subrequests: the question an
//! admission asks (however it arrived), the decision asked of the gate, the lease terms a
//! caller may choose, and the answer's bodies and `Retry-After`.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::error::ApiError;
use super::AppState;
use crate::decision::DenyCode;
use crate::gate::Decision;
use crate::gate::{AdmitArgs, LeaseTerm};
use crate::keys;
use crate::label::Label;
use crate::money::Money;

/// What an admission asks, whoever asked it (JSON API or a proxy subrequest).
#[derive(Debug, Default)]
pub(crate) struct AdmitQuery {
    pub key: Option<String>,
    pub provider: Label,
    pub api_format: Label,
    pub model: Label,
    pub reserve: Money,
    pub reserve_tokens: u64,
    pub lease: LeaseTerm,
}

/// Runs an admission: hashes the key and asks the gate. A missing key is decided here.
pub(crate) async fn decide(state: &AppState, q: &AdmitQuery) -> Decision {
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

/// A lease lifetime in whole seconds as the contract bounds it; `what` names where it came
/// from in the error.
pub(crate) fn lease_ttl(what: &str, secs: Option<u64>) -> Result<LeaseTerm, ApiError> {
    secs.and_then(LeaseTerm::seconds).ok_or_else(|| {
        ApiError::bad_request(format!(
            "{what} must be a whole number of seconds from 1 to {}",
            LeaseTerm::MAX_SECONDS
        ))
    })
}

/// `"lease": "none"` (or `X-Tollgate-Lease: none`): an admission without a lease.
pub(crate) fn lease_mode(what: &str, value: &str) -> Result<LeaseTerm, ApiError> {
    if value.trim().eq_ignore_ascii_case("none") {
        Ok(LeaseTerm::None)
    } else {
        Err(ApiError::bad_request(format!(
            "{what} takes only \"none\" (admit without a lease)"
        )))
    }
}

/// A denial's response at `status`: the contract's body, and `Retry-After` when there is a hint.
pub(crate) fn denial(status: StatusCode, code: DenyCode, retry_after_ms: u64) -> Response {
    let mut res = (status, Json(denial_body(code, retry_after_ms))).into_response();
    if retry_after_ms > 0 {
        res.headers_mut()
            .insert("retry-after", retry_after_header(retry_after_ms));
    }
    res
}

/// `Retry-After` in whole seconds, rounded up.
fn retry_after_header(retry_after_ms: u64) -> HeaderValue {
    HeaderValue::from(retry_after_ms.div_ceil(1000).max(1))
}

/// The JSON body of a denial. Typed rather than a `json!` tree: one of these is built per
/// request, and a struct serializes without allocating a map.
#[derive(Serialize)]
struct DenialBody {
    allowed: bool,
    code: &'static str,
    message: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

fn denial_body(code: DenyCode, retry_after_ms: u64) -> DenialBody {
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
pub(crate) struct AllowedBody<'a> {
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

pub(crate) fn allowed_body(d: &crate::gate::Grant) -> AllowedBody<'_> {
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
