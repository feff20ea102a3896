//! `/healthz` (the process runs) and `/readyz` (the admission path works end to end).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::AppState;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready only when Redis runs the real settle script and Postgres answers a query; otherwise
/// 503 naming each failing part.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let redis = state.gate.hot.probe();
    let postgres = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.db);
    let (redis, postgres) = tokio::join!(redis, postgres);
    let mut failing = Vec::new();
    if let Err(e) = &redis {
        failing.push(format!("redis: {e}"));
    }
    if postgres.is_err() {
        failing.push("postgres: unavailable".to_string());
    }
    if failing.is_empty() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"code": "not_ready", "message": failing.join("; ")})),
        )
            .into_response()
    }
}
