//! `/admin/*`: key lifecycle, balances, stats, expiry clean-up. Every write goes to Postgres
//! first, then is pushed to Redis so the next admission on any replica sees it.

use crate::period::BudgetPeriod;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgConnection;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use super::credentials;
use super::error::ApiError;
use super::json::{nullable, StrictJson};
use super::AppState;
use crate::keys;
use crate::label::{has_control, AllowList};
use crate::money::Money;
use crate::store::keys::{KeyPatch, KeyRow, NewKey, MAX_BALANCE_NANOS};
use crate::store::{self, stats, StoreError};

/// Bearer-token check for every `/admin/*` call, in constant time.
pub(crate) async fn require_token(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(expected) = &state.config.admin_token else {
        return ApiError::admin_disabled().into_response();
    };
    let given = credentials::bearer(req.headers()).unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(expected.expose().as_bytes())) {
        next.run(req).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

/// Until Postgres is up and migrated (`startup::postgres`), every admin call answers 503
/// `unavailable`: the admin API lives in Postgres, admissions do not wait for it.
pub(crate) async fn require_postgres(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    if state.postgres.is_ready() {
        next.run(req).await
    } else {
        ApiError::unavailable("postgres is not reachable yet; the admin API starts once it is")
            .into_response()
    }
}

/// The contract's `ApiKey` object.
#[derive(Debug, Serialize)]
pub(crate) struct ApiKey {
    id: Uuid,
    user_id: String,
    name: String,
    display: String,
    allowed_providers: Option<Vec<String>>,
    allowed_api_formats: Option<Vec<String>>,
    allowed_models: Option<Vec<String>>,
    rate_limit: Option<i32>,
    concurrent_limit: Option<i32>,
    expires_at: Option<DateTime<Utc>>,
    is_standalone: bool,
    current_balance_usd: Option<Money>,
    balance_used_usd: Money,
    remaining_balance_usd: Option<Money>,
    auto_delete_on_expiry: Option<bool>,
    token_limit: Option<i64>,
    budget_usd: Option<Money>,
    budget_period: Option<String>,
    budget_spent_usd: Money,
    budget_resets_at: Option<DateTime<Utc>>,
    is_active: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    last_used_at: Option<DateTime<Utc>>,
}

impl From<&KeyRow> for ApiKey {
    fn from(r: &KeyRow) -> Self {
        ApiKey {
            id: r.id,
            user_id: r.user_id.clone(),
            name: r.name.clone(),
            display: r.key_display.clone(),
            allowed_providers: r.allowed_providers.clone(),
            allowed_api_formats: r.allowed_api_formats.clone(),
            allowed_models: r.allowed_models.clone(),
            rate_limit: r.rate_limit,
            concurrent_limit: r.concurrent_limit,
            expires_at: r.expires_at,
            is_standalone: r.is_standalone,
            current_balance_usd: r
                .current_balance_nanos
                .filter(|_| r.is_standalone)
                .map(Money::from_nanos),
            balance_used_usd: Money::from_nanos(r.balance_used_nanos),
            remaining_balance_usd: r.remaining_nanos().map(Money::from_nanos),
            auto_delete_on_expiry: r.auto_delete_on_expiry,
            token_limit: r.token_limit,
            budget_usd: r.budget_nanos.map(Money::from_nanos),
            budget_period: r.budget_period.clone(),
            budget_spent_usd: Money::from_nanos(r.budget_spent_nanos),
            budget_resets_at: r
                .budget_period
                .as_deref()
                .and_then(BudgetPeriod::parse)
                .map(|p| p.resets_at(Utc::now())),
            is_active: r.is_active,
            created_at: r.created_at,
            updated_at: r.updated_at,
            last_used_at: r.last_used_at,
        }
    }
}

/// An admin call's Postgres work, bounded by [`store::ADMIN_BOUND`]: a connection gone silent
/// makes the call answer 503 `unavailable` within the bound instead of hanging.
async fn db<T, F>(state: &AppState, work: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: for<'c> FnOnce(&'c mut PgConnection) -> store::ConnWork<'c, T> + Send + 'static,
{
    store::bounded(&state.db, store::ADMIN_BOUND, work).await
}

async fn get_row(state: &AppState, id: Uuid) -> Result<KeyRow, ApiError> {
    db(state, move |c| Box::pin(store::keys::get(c, id)))
        .await?
        .ok_or_else(key_not_found)
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::not_found("no such key"))
}

fn key_not_found() -> ApiError {
    ApiError::not_found("no such key")
}

async fn push(state: &AppState, row: &KeyRow) {
    state.key_state.push(row).await;
}

/// `[]` means unrestricted, stored as null.
fn allow_list(field: &str, v: Option<Vec<String>>) -> Result<Option<AllowList>, ApiError> {
    v.map(AllowList::new)
        .transpose()
        .map(Option::flatten)
        .map_err(|e| ApiError::allow_list(field, e))
}

/// Most tokens a `token_limit` may name: window sums stay exact in the scripts' doubles.
const MAX_TOKEN_LIMIT: i64 = 1 << 50;

fn token_limit(v: Option<i64>) -> Result<Option<i64>, ApiError> {
    match v {
        Some(n) if !(1..=MAX_TOKEN_LIMIT).contains(&n) => Err(ApiError::bad_request(format!(
            "token_limit must be 1 to {MAX_TOKEN_LIMIT}, or null for unlimited"
        ))),
        other => Ok(other),
    }
}

fn budget_usd(v: Option<Money>) -> Result<Option<i64>, ApiError> {
    match v {
        Some(m) if m.is_negative() || m.nanos() > MAX_BALANCE_NANOS => Err(ApiError::bad_request(
            "budget_usd must be from 0 to 9007199.254740991, or null",
        )),
        other => Ok(other.map(Money::nanos)),
    }
}

fn budget_period(v: Option<String>) -> Result<Option<String>, ApiError> {
    match v.as_deref() {
        None => Ok(None),
        Some(p) => BudgetPeriod::parse(p)
            .map(|p| Some(p.as_str().to_string()))
            .ok_or_else(|| {
                ApiError::bad_request("budget_period must be \"day\", \"week\", \"month\" or null")
            }),
    }
}

fn limit(field: &str, v: Option<i64>) -> Result<Option<i32>, ApiError> {
    match v {
        None => Ok(None),
        Some(n) if n >= 1 => i32::try_from(n)
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("{field}: too large"))),
        Some(_) => Err(ApiError::bad_request(format!(
            "{field} must be at least 1, or null for unlimited"
        ))),
    }
}

/// Postgres text cannot hold NUL (the insert would fail as an internal error), and control
/// characters in ids and names only garble logs and UIs: such strings are refused up front.
/// For allow-list entries this also keeps out admit.lua's separator, `\x1f`.
fn name(v: &str) -> Result<String, ApiError> {
    let v = v.trim();
    if v.is_empty() || v.chars().count() > 255 || has_control(v) {
        return Err(ApiError::bad_request(
            "name must be 1-255 characters, without control characters",
        ));
    }
    Ok(v.to_string())
}

fn user_id(v: &str) -> Result<&str, ApiError> {
    let v = v.trim();
    if v.is_empty() || v.chars().count() > 128 || has_control(v) {
        return Err(ApiError::bad_request(
            "user_id must be 1-128 characters, without control characters",
        ));
    }
    Ok(v)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    user_id: String,
    name: Option<String>,
    allowed_providers: Option<Vec<String>>,
    allowed_api_formats: Option<Vec<String>>,
    allowed_models: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    rate_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "nullable")]
    concurrent_limit: Option<Option<i64>>,
    expire_days: Option<i64>,
    initial_balance_usd: Option<Money>,
    #[serde(default)]
    is_standalone: bool,
    #[serde(default, deserialize_with = "nullable")]
    auto_delete_on_expiry: Option<Option<bool>>,
    token_limit: Option<i64>,
    budget_usd: Option<Money>,
    budget_period: Option<String>,
}

pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    StrictJson(b): StrictJson<CreateBody>,
) -> Result<Response, ApiError> {
    let Some(enc) = &state.config.encryption_key else {
        return Err(ApiError::encryption_unavailable(
            "TOLLGATE_ENCRYPTION_KEY is not set: keys cannot be stored recoverably",
        ));
    };
    let user_id = user_id(&b.user_id)?;
    let now = Utc::now();
    let name = match b.name {
        Some(n) => name(&n)?,
        None => format!("API Key {}", now.format("%Y%m%d%H%M%S")),
    };
    let expires_at = match b.expire_days {
        None => None,
        Some(d) if (1..=36_500).contains(&d) => Some(now + Duration::days(d)),
        Some(_) => {
            return Err(ApiError::bad_request(
                "expire_days must be 1-36500, or null",
            ))
        }
    };
    if b.initial_balance_usd.is_some() && !b.is_standalone {
        return Err(ApiError::bad_request(
            "initial_balance_usd is only for standalone keys (is_standalone: true)",
        ));
    }
    let balance = match b.initial_balance_usd {
        Some(m) if m.is_negative() => {
            return Err(ApiError::bad_request(
                "initial_balance_usd must not be negative",
            ))
        }
        Some(m) if m.nanos() > MAX_BALANCE_NANOS => {
            return Err(ApiError::bad_request("initial_balance_usd is too large"))
        }
        Some(m) => Some(m.nanos()),
        None => None,
    };
    let id = Uuid::new_v4();
    let key = keys::generate(&state.config.key_prefix);
    let new = NewKey {
        id,
        user_id: user_id.to_string(),
        name,
        key_hash: keys::hash(key.expose()),
        key_sealed: enc.seal(id, &key),
        key_display: keys::display(key.expose()),
        allowed_providers: allow_list("allowed_providers", b.allowed_providers)?,
        allowed_api_formats: allow_list("allowed_api_formats", b.allowed_api_formats)?,
        allowed_models: allow_list("allowed_models", b.allowed_models)?,
        rate_limit: limit("rate_limit", b.rate_limit.unwrap_or(Some(100)))?,
        concurrent_limit: limit("concurrent_limit", b.concurrent_limit.unwrap_or(Some(5)))?,
        expires_at,
        is_standalone: b.is_standalone,
        current_balance_nanos: balance,
        auto_delete_on_expiry: b.auto_delete_on_expiry.unwrap_or(Some(false)),
        token_limit: token_limit(b.token_limit)?,
        budget_nanos: budget_usd(b.budget_usd)?,
        budget_period: budget_period(b.budget_period)?,
    };
    let row = db(&state, move |c| {
        Box::pin(async move { store::keys::insert(c, &new).await })
    })
    .await?;
    push(&state, &row).await;
    tracing::info!(key_id = %row.id, user_id = %row.user_id, standalone = row.is_standalone, "key created");
    Ok((
        StatusCode::CREATED,
        Json(json!({"key": key.expose(), "api_key": ApiKey::from(&row)})),
    )
        .into_response())
}

pub(crate) async fn get(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ApiKey>, ApiError> {
    let row = get_row(&state, parse_id(&id)?).await?;
    Ok(Json(ApiKey::from(&row)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LookupBody {
    key: String,
}

pub(crate) async fn lookup(
    State(state): State<Arc<AppState>>,
    StrictJson(b): StrictJson<LookupBody>,
) -> Result<Json<ApiKey>, ApiError> {
    let hash = keys::hash(b.key.trim());
    let row = db(&state, move |c| {
        Box::pin(async move { store::keys::by_hash(c, &hash).await })
    })
    .await?
    .ok_or_else(key_not_found)?;
    Ok(Json(ApiKey::from(&row)))
}

pub(crate) async fn secret(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let row = get_row(&state, parse_id(&id)?).await?;
    let Some(enc) = &state.config.encryption_key else {
        return Err(ApiError::encryption_unavailable(
            "TOLLGATE_ENCRYPTION_KEY is not set",
        ));
    };
    let key = enc.open(row.id, &row.key_sealed).map_err(|e| {
        tracing::error!(key_id = %row.id, error = %e, "sealed key does not open");
        ApiError::secret_unrecoverable()
    })?;
    tracing::info!(key_id = %row.id, "key secret revealed to an admin");
    Ok(Json(json!({"key": key.expose()})).into_response())
}

#[derive(Debug, Deserialize)]
pub(crate) struct ActiveFilter {
    is_active: Option<String>,
}

fn active_filter(q: &ActiveFilter) -> Result<Option<bool>, ApiError> {
    match q.is_active.as_deref() {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(_) => Err(ApiError::bad_request("is_active must be true or false")),
    }
}

pub(crate) async fn list_user(
    State(state): State<Arc<AppState>>,
    Path(user): Path<String>,
    Query(q): Query<ActiveFilter>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (user, active) = (user_id(&user)?.to_string(), active_filter(&q)?);
    let rows = db(&state, move |c| {
        Box::pin(async move { store::keys::list_user(c, &user, active).await })
    })
    .await?;
    let keys: Vec<ApiKey> = rows.iter().map(ApiKey::from).collect();
    Ok(Json(json!({ "keys": keys })))
}

pub(crate) async fn list_standalone(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ActiveFilter>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let active = active_filter(&q)?;
    let rows = db(&state, move |c| {
        Box::pin(store::keys::list_standalone(c, active))
    })
    .await?;
    let keys: Vec<ApiKey> = rows.iter().map(ApiKey::from).collect();
    Ok(Json(json!({ "keys": keys })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PatchBody {
    #[serde(default, deserialize_with = "nullable")]
    name: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    allowed_providers: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "nullable")]
    allowed_api_formats: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "nullable")]
    allowed_models: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "nullable")]
    rate_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "nullable")]
    concurrent_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "nullable")]
    is_active: Option<Option<bool>>,
    #[serde(default, deserialize_with = "nullable")]
    expires_at: Option<Option<DateTime<Utc>>>,
    #[serde(default, deserialize_with = "nullable")]
    auto_delete_on_expiry: Option<Option<bool>>,
    #[serde(default, deserialize_with = "nullable")]
    token_limit: Option<Option<i64>>,
    #[serde(default, deserialize_with = "nullable")]
    budget_usd: Option<Option<Money>>,
    #[serde(default, deserialize_with = "nullable")]
    budget_period: Option<Option<String>>,
}

/// `null` clears a field; a name or an active flag cannot be cleared, and silently ignoring
/// the `null` would tell the caller nothing.
fn not_null<T>(field: &str, v: Option<Option<T>>) -> Result<Option<T>, ApiError> {
    match v {
        Some(None) => Err(ApiError::bad_request(format!("{field} cannot be null"))),
        Some(Some(x)) => Ok(Some(x)),
        None => Ok(None),
    }
}

/// RFC 3339 has four-digit years; chrono also reads `+200000-01-01`, which Postgres may store
/// or refuse. Expiries stay within years 1-9999.
fn expiry(v: Option<DateTime<Utc>>) -> Result<Option<DateTime<Utc>>, ApiError> {
    use chrono::Datelike;
    match v {
        Some(t) if !(1..=9999).contains(&t.year()) => Err(ApiError::bad_request(
            "expires_at must be an RFC 3339 timestamp in the years 1-9999",
        )),
        other => Ok(other),
    }
}

pub(crate) async fn update(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    StrictJson(b): StrictJson<PatchBody>,
) -> Result<Json<ApiKey>, ApiError> {
    let id = parse_id(&id)?;
    let list = |field: &str, v: Option<Option<Vec<String>>>| {
        v.map(|inner| allow_list(field, inner)).transpose()
    };
    let patch = KeyPatch {
        name: not_null("name", b.name)?.as_deref().map(name).transpose()?,
        allowed_providers: list("allowed_providers", b.allowed_providers)?,
        allowed_api_formats: list("allowed_api_formats", b.allowed_api_formats)?,
        allowed_models: list("allowed_models", b.allowed_models)?,
        rate_limit: b.rate_limit.map(|v| limit("rate_limit", v)).transpose()?,
        concurrent_limit: b
            .concurrent_limit
            .map(|v| limit("concurrent_limit", v))
            .transpose()?,
        is_active: not_null("is_active", b.is_active)?,
        expires_at: b.expires_at.map(expiry).transpose()?,
        auto_delete_on_expiry: b.auto_delete_on_expiry,
        token_limit: b.token_limit.map(token_limit).transpose()?,
        budget_nanos: b.budget_usd.map(budget_usd).transpose()?,
        budget_period: b.budget_period.map(budget_period).transpose()?,
    };
    let row = db(&state, move |c| Box::pin(store::keys::update(c, id, patch)))
        .await?
        .ok_or_else(key_not_found)?;
    push(&state, &row).await;
    Ok(Json(ApiKey::from(&row)))
}

pub(crate) async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ApiKey>, ApiError> {
    let patch = KeyPatch {
        is_active: Some(false),
        ..KeyPatch::default()
    };
    let id = parse_id(&id)?;
    let row = db(&state, move |c| Box::pin(store::keys::update(c, id, patch)))
        .await?
        .ok_or_else(key_not_found)?;
    push(&state, &row).await;
    tracing::info!(key_id = %row.id, "key disabled (soft delete)");
    Ok(Json(ApiKey::from(&row)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BalanceBody {
    amount_usd: Money,
}

/// The optional `Idempotency-Key` header: 1-128 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= 128 && k.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(k.to_string()))
        }
        _ => Err(ApiError::bad_request(
            "Idempotency-Key must be 1-128 visible ASCII characters",
        )),
    }
}

pub(crate) async fn adjust_balance(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    StrictJson(b): StrictJson<BalanceBody>,
) -> Result<Json<ApiKey>, ApiError> {
    let id = parse_id(&id)?;
    let idempotency = idempotency_key(&headers)?;
    if b.amount_usd == Money::ZERO {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "zero_amount",
            "amount_usd must not be zero",
        ));
    }
    // What Redis has charged so far runs ahead of Postgres; a deduction is checked against it.
    let used_now = if b.amount_usd.is_negative() {
        let row = get_row(&state, id).await?;
        state
            .gate
            .used(&row.key_hash)
            .await
            .map_err(ApiError::from)?
            .map(Money::nanos)
    } else {
        None
    };
    let amount = b.amount_usd.nanos();
    let adjusted = db(&state, move |c| {
        Box::pin(async move {
            Ok(store::keys::adjust_balance(c, id, amount, used_now, idempotency.as_deref()).await)
        })
    })
    .await?;
    let row = adjusted?;
    push(&state, &row).await;
    tracing::info!(key_id = %row.id, amount = %b.amount_usd, "balance adjusted");
    Ok(Json(ApiKey::from(&row)))
}

#[derive(Debug, Deserialize)]
pub(crate) struct StatsQuery {
    start: Option<String>,
    end: Option<String>,
}

fn instant(field: &str, v: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    v.map(|s| {
        DateTime::parse_from_rfc3339(s)
            .or_else(|e| {
                // An unencoded `+01:00` in a query string arrives as ` 01:00`: a caller who
                // forgot to percent-encode the `+` means the positive offset.
                match s.rsplit_once(' ') {
                    Some((head, offset)) if offset.len() == 5 && offset.as_bytes()[2] == b':' => {
                        DateTime::parse_from_rfc3339(&format!("{head}+{offset}"))
                    }
                    _ => Err(e),
                }
            })
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| ApiError::bad_request(format!("{field} must be an RFC 3339 timestamp")))
    })
    .transpose()
}

pub(crate) async fn key_stats(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<StatsQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = parse_id(&id)?;
    let start = instant("start", q.start.as_deref())?;
    let end = instant("end", q.end.as_deref())?;
    if let (Some(s), Some(e)) = (start, end) {
        if s > e {
            return Err(ApiError::bad_request("start is after end"));
        }
    }
    let row = get_row(&state, id).await?;
    let s = db(&state, move |c| {
        Box::pin(stats::key_stats_on(c, id, start, end))
    })
    .await?;
    let avg = if s.total.response_time_count > 0 {
        s.total.response_time_sum as f64 / s.total.response_time_count as f64
    } else {
        0.0
    };
    let daily: Vec<serde_json::Value> = s
        .daily
        .iter()
        .map(|(day, t)| {
            json!({
                "date": day.format("%Y-%m-%d").to_string(),
                "requests": t.requests,
                "tokens": t.tokens,
                "cost_usd": Money::from_nanos(t.cost_nanos),
            })
        })
        .collect();
    Ok(Json(json!({
        "key_id": row.id,
        "key_name": row.name,
        "total_requests": s.total.requests,
        "total_tokens": s.total.tokens,
        "total_cost_usd": Money::from_nanos(s.total.cost_nanos),
        "avg_response_time_ms": avg,
        "daily_stats": daily,
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CleanupBody {
    auto_delete: Option<bool>,
}

/// The OpenAPI 3.1 document of both listeners, compiled in, so the document served is the one
/// this binary was tested against. `docs/openapi.json` is generated from `docs/openapi.yaml`.
pub(crate) async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        include_str!("../../docs/openapi.json"),
    )
        .into_response()
}

pub(crate) async fn cleanup_expired(
    State(state): State<Arc<AppState>>,
    StrictJson(b): StrictJson<CleanupBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let default_delete = b.auto_delete.unwrap_or(state.config.auto_delete_expired);
    let cleaned = state.key_state.sweep(default_delete).await?;
    Ok(Json(json!({ "cleaned": cleaned })))
}

/// `GET /admin/prices`: the price table in force (built in, with `TOLLGATE_PRICES_FILE`).
pub(crate) async fn prices(State(state): State<Arc<AppState>>) -> Json<crate::prices::Prices> {
    Json(state.gate.prices().clone())
}
