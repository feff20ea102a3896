//! Credentials in request headers, read one way for every route: the bearer token, and the API
//! key wherever a client may put it.

use axum::http::HeaderMap;

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive, blanks trimmed).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
}

/// The API key of a data-plane request: the bearer token, else `X-Api-Key`, else `Api-Key`
/// (the headers OpenAI-, Anthropic- and Azure-style clients send); `None` when blank.
pub(crate) fn api_key(headers: &HeaderMap) -> Option<&str> {
    bearer(headers)
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .or_else(|| headers.get("api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_trimmed() {
        assert_eq!(
            bearer(&headers(&[("authorization", "bEaReR  tok ")])),
            Some("tok")
        );
        assert_eq!(bearer(&headers(&[("authorization", "Basic abc")])), None);
        assert_eq!(bearer(&headers(&[("authorization", "Bearer")])), None);
    }

    #[test]
    fn the_api_key_comes_from_bearer_then_x_api_key_then_api_key() {
        let all = [
            ("authorization", "Bearer a"),
            ("x-api-key", "b"),
            ("api-key", "c"),
        ];
        assert_eq!(api_key(&headers(&all)), Some("a"));
        assert_eq!(api_key(&headers(&all[1..])), Some("b"));
        assert_eq!(api_key(&headers(&all[2..])), Some("c"));
        assert_eq!(api_key(&headers(&[("x-api-key", "  ")])), None);
    }
}
