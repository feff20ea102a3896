//! The one place an error becomes an HTTP response: `{"code", "message"}` with the contract's
//! status. Internal details (SQL, Redis replies, key material) are logged, never returned.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::gate::RedisFailure;
use crate::label::{InvalidAllowList, InvalidLabel, MAX_ALLOW_LIST_LEN, MAX_LABEL_LEN};
use crate::store::keys::BalanceError;
use crate::store::StoreError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// A provider, API format or model name refused in the request's `field`.
    /// The admin API without `TOLLGATE_ADMIN_TOKEN`.
    pub(crate) fn admin_disabled() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "admin_disabled",
            "the admin API is disabled: TOLLGATE_ADMIN_TOKEN is not set",
        )
    }

    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong admin bearer token",
        )
    }

    /// Keys cannot be sealed or opened without `TOLLGATE_ENCRYPTION_KEY`.
    pub(crate) fn encryption_unavailable(message: &'static str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "encryption_unavailable",
            message,
        )
    }

    pub(crate) fn secret_unrecoverable() -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "secret_unrecoverable",
            "the stored copy of this key cannot be opened with the configured encryption key",
        )
    }

    pub(crate) fn lease_unknown() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "lease_unknown",
            "no such lease was issued",
        )
    }

    pub(crate) fn price_unknown() -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "price_unknown",
            "no price is known for this provider and model: send cost_usd",
        )
    }

    pub(crate) fn label(field: &str, _: InvalidLabel) -> Self {
        Self::bad_request(format!(
            "{field} must be at most {MAX_LABEL_LEN} characters without control characters"
        ))
    }

    /// An allow-list refused in the request's `field`.
    pub(crate) fn allow_list(field: &str, e: InvalidAllowList) -> Self {
        Self::bad_request(match e {
            InvalidAllowList::TooManyEntries => {
                format!("{field}: at most {MAX_ALLOW_LIST_LEN} entries")
            }
            InvalidAllowList::BadEntry => format!(
                "{field}: entries must be 1-{MAX_LABEL_LEN} characters, without control characters"
            ),
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (
            self.status,
            Json(json!({"code": self.code, "message": self.message})),
        )
            .into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            res.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
        }
        res
    }
}

/// A whole HTTP/1.1 answer with the JSON error shape, for the connection layer
/// (`http::serve`), which must answer where no handler runs: a connection over the cap, a
/// request head that timed out or that hyper could not parse. The connection closes after it.
pub(crate) fn raw_response(status: StatusCode, code: &str, message: &str) -> Vec<u8> {
    let body = json!({"code": code, "message": message}).to_string();
    let retry = if status == StatusCode::SERVICE_UNAVAILABLE {
        "retry-after: 1\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry}connection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error"),
        body.len()
    )
    .into_bytes()
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, source = ?std::error::Error::source(&e), "database call failed");
        match e {
            StoreError::Unavailable(_) => ApiError::unavailable("the database is unavailable"),
            _ => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            ),
        }
    }
}

/// The largest settlement and a key's lifetime spend, as lua/settle.lua bounds them.
const LIMITS: &str = "one settlement may cost at most 9007199.254740991 USD, and one key may \
     spend at most 4611686018.427387904 USD in its lifetime";

impl From<BalanceError> for ApiError {
    fn from(e: BalanceError) -> Self {
        match e {
            BalanceError::NotFound => ApiError::not_found("no such key"),
            BalanceError::NotStandalone => ApiError::new(
                StatusCode::CONFLICT,
                "not_standalone",
                "only standalone keys have a balance",
            ),
            BalanceError::Insufficient => ApiError::new(
                StatusCode::CONFLICT,
                "insufficient_balance",
                "the deduction exceeds the remaining balance",
            ),
            BalanceError::TooLarge => {
                ApiError::bad_request("the balance would exceed the supported maximum")
            }
            BalanceError::IdempotencyConflict => ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_conflict",
                "this Idempotency-Key was used for a different amount",
            ),
            BalanceError::Store(e) => e.into(),
        }
    }
}

impl From<RedisFailure> for ApiError {
    fn from(e: RedisFailure) -> Self {
        match e {
            // A script refused the call and wrote nothing: the call's fault, not Redis's.
            RedisFailure::Refused { code, detail } => {
                tracing::warn!(code, detail = %detail, "script refused a call");
                match code {
                    "LIMIT_EXCEEDED" => ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "limit_exceeded",
                        format!("refused, nothing was changed: {LIMITS}"),
                    ),
                    "INVALID_ARGUMENT" => {
                        ApiError::bad_request("refused: an argument is out of range")
                    }
                    _ => ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "internal error",
                    ),
                }
            }
            e => {
                tracing::warn!(error = %e, "redis call failed");
                ApiError::unavailable("redis is unavailable")
            }
        }
    }
}

/// Answers for paths and methods no route has.
pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("no such path")
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this path",
    )
}
