//! `/healthz` (the process runs) and `/readyz` (admissions can be decided).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::AppState;
use crate::store;

/// How long the probe waits for Postgres: a kubelet probe times out after a couple of seconds.
const POSTGRES_PROBE_BOUND: Duration = Duration::from_secs(1);

pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ReadyQuery {
    strict: Option<String>,
}

/// Ready when admissions can be decided: Redis runs the real settle script, and either Redis
/// holds the namespace's keys (`loaded` marker) or Postgres can supply them. Postgres is not
/// otherwise needed (contract v1.1, section 3). `?strict=true` is version 1's meaning: Redis
/// and Postgres must both answer. The body names each dependency; a not-ready answer is 503
/// with `Retry-After`, `code` and `message`, like every other 503.
pub(crate) async fn readyz(
    State(state): State<Arc<AppState>>,
    Query(q): Query<ReadyQuery>,
) -> Response {
    let strict = match q.strict.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return ApiError::bad_request("strict must be true or false").into_response(),
    };
    let redis = state.gate.probe();
    let postgres =
        async { state.postgres.is_ready() && store::ping(&state.db, POSTGRES_PROBE_BOUND).await };
    let (redis, postgres, loaded) = tokio::join!(redis, postgres, state.key_state.loaded());
    let redis_ok = redis.is_ok();
    let ready = redis_ok && (postgres || (!strict && loaded == Some(true)));
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let mut body = json!({
        "ready": ready,
        "redis": word(redis_ok),
        "postgres": word(postgres),
        "keys": match loaded {
            Some(true) => "loaded",
            Some(false) => "not_loaded",
            None => "unknown",
        },
    });
    if ready {
        return Json(body).into_response();
    }
    let mut failing = Vec::new();
    if let Err(e) = &redis {
        failing.push(format!("redis: {e}"));
    }
    if !postgres {
        failing.push(if strict || !redis_ok {
            "postgres: unavailable".to_string()
        } else {
            "postgres: unavailable, and redis does not hold the keys".to_string()
        });
    }
    body["code"] = json!("not_ready");
    body["message"] = json!(failing.join("; "));
    let mut res = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    res.headers_mut()
        .insert("retry-after", HeaderValue::from_static("1"));
    res
}
