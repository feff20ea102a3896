//! Request bodies: strict JSON with the contract's error codes.
//!
//! axum's `Json` answers rejections in plain text with its own statuses; this extractor reads
//! the body (bounded by the router's 1 MiB limit → 413) and maps every failure to the JSON
//! error shape: malformed or wrongly typed → 400 `bad_request`, unknown field → 400
//! `unknown_field`.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::error::ApiError;

pub(crate) const BODY_LIMIT: usize = 1024 * 1024;

pub struct StrictJson<T>(pub T);

/// Parses a JSON body, which must be an object; an empty body parses as `{}`.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let body: &[u8] = match first {
        None => b"{}",
        Some(b'{') => bytes,
        // serde would also read a struct from an array of its fields in order, so `[]` would
        // be a valid PATCH that changes nothing: only an object is a request body.
        Some(_) => {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ))
        }
    };
    serde_json::from_slice(body).map_err(|e| {
        let text = e.to_string();
        if text.starts_with("unknown field") {
            // Name the field only when it looks like a field name: a caller who pastes a key
            // as a field name must not see it echoed back.
            let field = text.split('`').nth(1).unwrap_or("");
            let message = if !field.is_empty()
                && field.len() <= 40
                && field.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            {
                format!("unknown field {field:?}")
            } else {
                "unknown field".to_string()
            };
            ApiError::new(StatusCode::BAD_REQUEST, "unknown_field", message)
        } else {
            ApiError::bad_request(format!("invalid JSON body: {}", redact_quoted(&text)))
        }
    })
}

impl<S, T> FromRequest<S> for StrictJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "request body is over 1 MiB",
                )
            } else {
                ApiError::bad_request("could not read the request body")
            }
        })?;
        parse(&bytes).map(StrictJson)
    }
}

/// serde_json quotes offending values (`invalid type: string "…"`); a value may be a key. The
/// value is printed with its own quotes escaped, so quotes cannot be paired up: everything from
/// the first quote to the last goes.
fn redact_quoted(text: &str) -> String {
    match (text.find('"'), text.rfind('"')) {
        (Some(first), Some(last)) => format!("{}\"…\"{}", &text[..first], &text[last + 1..]),
        _ => text.to_string(),
    }
}

/// For `Option<Option<T>>` fields: absent → `None`, `null` → `Some(None)`.
pub(crate) fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}
