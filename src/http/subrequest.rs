//! Reverse-proxy auth subrequests: `/auth` (Traefik, Caddy, generic), `/auth/nginx`
//! (`auth_request`), `/auth/envoy/<path>` (Envoy `ext_authz`).
//!
//! The key comes from `Authorization: Bearer`, `x-api-key` or `api-key`. Provider, API format
//! and model come from `X-Tollgate-*` headers, else from the original path through the
//! [`Inference`] table, and the model also from a forwarded JSON body.

use std::fmt;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};

use super::credentials;
use super::edge::{allowed_body, decide, denial, lease_mode, lease_ttl, AdmitQuery};
use super::error::ApiError;
use super::AppState;
use crate::decision::DenyCode;
use crate::gate::Decision;
use crate::gate::RedisFailure;
use crate::gate::{Grant, LeaseTerm};
use crate::inference::Inferred;
use crate::label::Label;
use crate::money::{Money, MAX_EXACT};

/// How a proxy wants denials shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    /// Real status, JSON body, `Retry-After`.
    Plain,
    /// nginx passes only 2xx/401/403 from a subrequest: 401 for key problems, 403 otherwise,
    /// the real status in `X-Tollgate-Status`.
    Nginx,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Finds the top-level `"model"` of a JSON object and stops reading there.
struct ModelFinder<'a>(&'a mut Option<String>);

impl<'de> Visitor<'de> for ModelFinder<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == "model" {
                if let serde_json::Value::String(s) = map.next_value()? {
                    *self.0 = Some(s);
                }
                // What follows need not be read, nor even be complete.
                return Err(de::Error::custom("model found"));
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

/// The model named by a forwarded JSON body. The body is read only up to its top-level
/// `model` field, so a body the proxy cut short (Envoy's `allow_partial_message`) still
/// names its model when the field comes before the cut.
fn model_from_body(headers: &HeaderMap, body: &[u8]) -> Option<String> {
    if body.is_empty() {
        return None;
    }
    // Envoy forwards no Content-Type unless told to; a body without one is tried as JSON.
    let is_json = header(headers, "content-type")
        .map(|c| c.to_ascii_lowercase().contains("json"))
        .unwrap_or(true);
    if !is_json {
        return None;
    }
    let mut found = None;
    let mut de = serde_json::Deserializer::from_slice(body);
    // The finder ends the parse with an error once it has the model; only `found` counts.
    let _ = serde::Deserializer::deserialize_map(&mut de, ModelFinder(&mut found));
    found.filter(|m| !m.is_empty())
}

/// The lease a subrequest asks for: `X-Tollgate-Lease: none`, else `X-Tollgate-Lease-Ttl`,
/// else `TOLLGATE_SUBREQUEST_LEASE_TTL_SECONDS`. Short by default, because a proxy that
/// reports nothing at the end of a request leaves its leases to expire.
fn lease(state: &AppState, headers: &HeaderMap) -> Result<LeaseTerm, ApiError> {
    // Both headers are checked, so a bad lifetime is a 400 with or without a lease, as
    // `/v1/admit` answers it.
    let ttl = match headers.get("x-tollgate-lease-ttl") {
        Some(v) => lease_ttl(
            "X-Tollgate-Lease-Ttl",
            v.to_str().ok().and_then(|t| t.trim().parse().ok()),
        )?,
        None => state.config.subrequest_lease_ttl,
    };
    match headers.get("x-tollgate-lease") {
        Some(mode) => lease_mode("X-Tollgate-Lease", mode.to_str().unwrap_or_default()),
        None => Ok(ttl),
    }
}

fn query(
    state: &AppState,
    headers: &HeaderMap,
    path: Option<&str>,
    body: &[u8],
) -> Result<AdmitQuery, ApiError> {
    let lease = lease(state, headers)?;
    let original = header(headers, "x-original-uri")
        .or_else(|| header(headers, "x-forwarded-uri"))
        .or(path);
    let inferred = original
        .map(|p| state.inference.infer(p))
        .unwrap_or_default();
    let Inferred {
        provider,
        api_format,
        model,
    } = inferred;
    // A value unfit to store (control characters, over-long) counts as not given: the key's
    // allow-lists then decide, and nothing unstorable reaches the usage record.
    let pick = |h: &str, v: Option<String>| {
        header(headers, h)
            .map(str::to_string)
            .or(v)
            .and_then(|v| Label::new(v).ok())
            .unwrap_or_default()
    };
    Ok(AdmitQuery {
        key: credentials::api_key(headers).map(str::to_string),
        provider: pick("x-tollgate-provider", provider),
        api_format: pick("x-tollgate-api-format", api_format),
        model: pick(
            "x-tollgate-model",
            model.or_else(|| model_from_body(headers, body)),
        ),
        reserve: header(headers, "x-tollgate-reserve-usd")
            .and_then(|v| Money::parse(v).ok())
            .filter(|m| !m.is_negative() && m.nanos() <= MAX_EXACT)
            .unwrap_or_default(),
        reserve_tokens: 0,
        lease,
    })
}

/// `RateLimit-Policy` / `RateLimit` (draft-ietf-httpapi-ratelimit-headers, structured fields):
/// the request limit as `"default"`, the token limit as `"tokens"`, each only when set.
fn rate_headers(g: &Grant, window_secs: u64) -> Option<(HeaderValue, HeaderValue)> {
    let mut policy = Vec::new();
    let mut now = Vec::new();
    if let Some(limit) = g.rate_limit {
        policy.push(format!("\"default\";q={limit};w={window_secs}"));
        now.push(format!(
            "\"default\";r={};t={}",
            g.rate_remaining.unwrap_or(0),
            g.reset_ms.div_ceil(1000)
        ));
    }
    if let Some(limit) = g.token_limit {
        policy.push(format!("\"tokens\";q={limit};w={window_secs}"));
        now.push(format!(
            "\"tokens\";r={};t={}",
            g.tokens_remaining.unwrap_or(0),
            g.tokens_reset_ms.div_ceil(1000)
        ));
    }
    if policy.is_empty() {
        return None;
    }
    Some((
        HeaderValue::from_str(&policy.join(", ")).ok()?,
        HeaderValue::from_str(&now.join(", ")).ok()?,
    ))
}

fn set(res: &mut Response, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        res.headers_mut().insert(HeaderName::from_static(name), v);
    }
}

fn answer(state: &AppState, decision: Decision, flavor: Flavor) -> Response {
    match decision {
        Decision::Allowed { grant } => {
            let mut res = (StatusCode::OK, Json(allowed_body(&grant))).into_response();
            set(&mut res, "x-tollgate-key-id", &grant.key_id);
            set(&mut res, "x-tollgate-user-id", &grant.user_id);
            if let Some(lease) = &grant.lease_id {
                set(&mut res, "x-tollgate-lease-id", lease);
            }
            if let Some((policy, now)) = rate_headers(&grant, state.config.rate_window.as_secs()) {
                res.headers_mut().insert("ratelimit-policy", policy);
                res.headers_mut().insert("ratelimit", now);
            }
            res
        }
        Decision::Denied {
            code,
            retry_after_ms,
        } => {
            let real = code.status();
            let status = match flavor {
                Flavor::Plain => real,
                Flavor::Nginx if real == 401 => 401,
                Flavor::Nginx => 403,
            };
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
            let mut res = denial(status, code, retry_after_ms);
            if retry_after_ms > 0 {
                let item = match code {
                    DenyCode::RateLimited => Some("default"),
                    DenyCode::TokenLimited => Some("tokens"),
                    _ => None,
                };
                if let Some(item) = item {
                    set(
                        &mut res,
                        "ratelimit",
                        &format!("\"{item}\";r=0;t={}", retry_after_ms.div_ceil(1000)),
                    );
                }
            }
            if flavor == Flavor::Nginx {
                set(&mut res, "x-tollgate-status", &real.to_string());
                set(&mut res, "x-tollgate-code", code.as_str());
            }
            res
        }
        Decision::Refused { code, detail } => refused(
            ApiError::from(RedisFailure::Refused { code, detail }),
            flavor,
        ),
    }
}

/// A subrequest that could not be understood (a bad `X-Tollgate-Lease*` header). nginx turns
/// any status but 401/403 into a 500, so it gets 403 with the real status beside it.
fn refused(e: ApiError, flavor: Flavor) -> Response {
    let (real, code) = (e.status, e.code);
    let mut res = e.into_response();
    if flavor == Flavor::Nginx {
        *res.status_mut() = StatusCode::FORBIDDEN;
        set(&mut res, "x-tollgate-status", real.as_str());
        set(&mut res, "x-tollgate-code", code);
    }
    res
}

async fn subrequest(
    state: &AppState,
    headers: &HeaderMap,
    path: Option<&str>,
    body: &[u8],
    flavor: Flavor,
) -> Response {
    match query(state, headers, path, body) {
        Ok(q) => answer(state, decide(state, &q).await, flavor),
        Err(e) => refused(e, flavor),
    }
}

pub(crate) async fn auth(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    subrequest(&state, &headers, None, &body, Flavor::Plain).await
}

pub(crate) async fn auth_nginx(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    subrequest(&state, &headers, None, &body, Flavor::Nginx).await
}

pub(crate) async fn auth_envoy(
    State(state): State<Arc<AppState>>,
    path: Option<Path<String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let original = path.map(|Path(p)| format!("/{p}"));
    subrequest(&state, &headers, original.as_deref(), &body, Flavor::Plain).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(body: &str, content_type: Option<&str>) -> Option<String> {
        let mut h = HeaderMap::new();
        if let Some(ct) = content_type {
            h.insert("content-type", HeaderValue::from_str(ct).unwrap());
        }
        model_from_body(&h, body.as_bytes())
    }

    #[test]
    fn the_top_level_model_of_a_json_body() {
        let j = Some("application/json");
        assert_eq!(model(r#"{"model":"gpt-4o"}"#, j).as_deref(), Some("gpt-4o"));
        let nested =
            r#"{"messages":[{"model":"x","content":"{\"model\":1}"}],"stream":true,"model":"m1"}"#;
        assert_eq!(model(nested, j).as_deref(), Some("m1"));
        assert_eq!(model(r#"{"model":"m2"}"#, None).as_deref(), Some("m2"));
        assert_eq!(
            model(r#"{"model":"m3"}"#, Some("application/vnd.api+json")).as_deref(),
            Some("m3")
        );
        // Cut short after the model: still found; before it: nothing.
        assert_eq!(
            model(r#"{"model":"m4","messages":[{"role":"us"#, j).as_deref(),
            Some("m4")
        );
        assert_eq!(model(r#"{"messages":[{"role":"user"}],"mod"#, j), None);
        assert_eq!(model(r#"{"model":"unterminat"#, j), None);
        // Not a model.
        assert_eq!(model(r#"{"model":42}"#, j), None);
        assert_eq!(model(r#"{"model":""}"#, j), None);
        assert_eq!(model(r#"{"engine":"gpt-4o"}"#, j), None);
        assert_eq!(model(r#"["model","gpt-4o"]"#, j), None);
        assert_eq!(model(r#"{"model":"gpt-4o"}"#, Some("text/plain")), None);
        assert_eq!(model("", j), None);
    }
}
