//! Where HTTP ends: the two routers (data plane and admin), their shared state, and the
//! guarantee that every non-2xx answer has the contract's JSON error shape.
//!
//! - [`data_plane`]: `/v1/admit`, `/v1/settle`, `/v1/release`
//! - [`subrequest`]: `/auth`, `/auth/nginx`, `/auth/envoy/*` for reverse proxies
//! - `edge`: what both admission doors share (the question, the decision, the answer);
//!   `credentials`: the bearer token and the API key, read one way
//! - [`admin`]: the `/admin/*` routes
//! - [`health`]: `/healthz`, `/readyz`
//! - [`error`]: the one place errors become responses; [`json`]: strict request bodies
//! - [`serve`]: the serve loop — connection timeouts, the connection cap, the stack's own errors

pub(crate) mod admin;
mod credentials;
pub(crate) mod data_plane;
mod edge;
pub(crate) mod error;
pub(crate) mod health;
pub(crate) mod json;
pub mod serve;
pub(crate) mod subrequest;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use crate::config::Config;
use crate::gate::Gate;
use crate::inference::Inference;
use crate::key_state::KeyState;
use crate::metrics::Metrics;
use error::ApiError;

/// What every handler can reach.
pub struct AppState {
    pub config: Arc<Config>,
    pub gate: Gate,
    /// Key configuration from Postgres into Redis, after admin writes.
    pub key_state: KeyState,
    pub db: PgPool,
    /// Whether Postgres is migrated and the admin API may use it.
    pub postgres: crate::store::PgReady,
    pub metrics: Metrics,
    pub prometheus: PrometheusHandle,
    pub inference: Inference,
}

/// Rewrites any error that left a handler without the JSON shape (axum's own rejections:
/// a bad path encoding, a body over the limit) into `{"code", "message"}`.
async fn json_errors(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    let is_json = res
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return res;
    }
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "bad_request",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    let message = status.canonical_reason().unwrap_or("error");
    let mut out = ApiError::new(status, code, message).into_response();
    for (name, value) in res.headers() {
        if name != CONTENT_TYPE && name != "content-length" {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

fn finish(router: Router<Arc<AppState>>, state: Arc<AppState>) -> Router {
    router
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(json::BODY_LIMIT))
        .layer(middleware::from_fn(json_errors))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                tracing::error!("handler panicked");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
                .into_response()
            },
        ))
        .with_state(state)
}

/// The data-plane listener's routes.
pub fn data_router(state: Arc<AppState>) -> Router {
    let r = Router::new()
        .route("/v1/admit", post(data_plane::admit))
        .route("/v1/settle", post(data_plane::settle))
        .route("/v1/release", post(data_plane::release))
        .route("/auth", get(subrequest::auth).post(subrequest::auth))
        .route("/auth/nginx", get(subrequest::auth_nginx))
        .route("/auth/envoy", any(subrequest::auth_envoy))
        // Envoy forwards a request for the gateway's root as `/auth/envoy/`, which the
        // wildcard below does not match.
        .route("/auth/envoy/", any(subrequest::auth_envoy))
        .route("/auth/envoy/{*path}", any(subrequest::auth_envoy));
    finish(r, state)
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.prometheus.render(),
    )
        .into_response()
}

/// The admin listener's routes.
pub fn admin_router(state: Arc<AppState>) -> Router {
    let admin = Router::new()
        .route("/admin/keys", post(admin::create))
        .route("/admin/keys/lookup", post(admin::lookup))
        .route("/admin/keys/cleanup-expired", post(admin::cleanup_expired))
        .route(
            "/admin/keys/{id}",
            get(admin::get).patch(admin::update).delete(admin::delete),
        )
        .route("/admin/keys/{id}/secret", get(admin::secret))
        .route("/admin/keys/{id}/balance", post(admin::adjust_balance))
        .route("/admin/keys/{id}/stats", get(admin::key_stats))
        .route("/admin/users/{user_id}/keys", get(admin::list_user))
        .route("/admin/standalone-keys", get(admin::list_standalone))
        // Inner layer: runs after the token check, so a wrong token is 401 whatever Postgres does.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            admin::require_postgres,
        ))
        // Added after that layer: the price table is in memory and answers without Postgres.
        .route("/admin/prices", get(admin::prices))
        .route("/admin/openapi.json", get(admin::openapi))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            admin::require_token,
        ));
    let r = Router::new().merge(admin).route("/metrics", get(metrics));
    finish(r, state)
}
