//! The vocabulary of an admission decision, shared by the scripts' answers, the HTTP edge and
//! the metrics. Codes are the contract's, in the contract's check order.

/// Why a request may not go upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyCode {
    KeyMissing,
    KeyInvalid,
    KeyDisabled,
    KeyExpired,
    ProviderNotAllowed,
    ApiFormatNotAllowed,
    ModelNotAllowed,
    BalanceExhausted,
    BudgetExceeded,
    RateLimited,
    TokenLimited,
    ConcurrencyLimited,
    Unavailable,
}

impl DenyCode {
    pub const ALL: [DenyCode; 13] = [
        DenyCode::KeyMissing,
        DenyCode::KeyInvalid,
        DenyCode::KeyDisabled,
        DenyCode::KeyExpired,
        DenyCode::ProviderNotAllowed,
        DenyCode::ApiFormatNotAllowed,
        DenyCode::ModelNotAllowed,
        DenyCode::BalanceExhausted,
        DenyCode::BudgetExceeded,
        DenyCode::RateLimited,
        DenyCode::TokenLimited,
        DenyCode::ConcurrencyLimited,
        DenyCode::Unavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DenyCode::KeyMissing => "key_missing",
            DenyCode::KeyInvalid => "key_invalid",
            DenyCode::KeyDisabled => "key_disabled",
            DenyCode::KeyExpired => "key_expired",
            DenyCode::ProviderNotAllowed => "provider_not_allowed",
            DenyCode::ApiFormatNotAllowed => "api_format_not_allowed",
            DenyCode::ModelNotAllowed => "model_not_allowed",
            DenyCode::BalanceExhausted => "balance_exhausted",
            DenyCode::BudgetExceeded => "budget_exceeded",
            DenyCode::RateLimited => "rate_limited",
            DenyCode::TokenLimited => "token_limited",
            DenyCode::ConcurrencyLimited => "concurrency_limited",
            DenyCode::Unavailable => "unavailable",
        }
    }

    pub fn from_code(code: &str) -> Option<DenyCode> {
        DenyCode::ALL.into_iter().find(|c| c.as_str() == code)
    }

    /// The status the contract gives this denial.
    pub fn status(self) -> u16 {
        match self {
            DenyCode::KeyMissing | DenyCode::KeyInvalid => 401,
            DenyCode::BalanceExhausted | DenyCode::BudgetExceeded => 402,
            DenyCode::RateLimited | DenyCode::TokenLimited | DenyCode::ConcurrencyLimited => 429,
            DenyCode::Unavailable => 503,
            _ => 403,
        }
    }

    pub(crate) fn message(self) -> &'static str {
        match self {
            DenyCode::KeyMissing => "no API key in the body, Authorization, x-api-key or api-key",
            DenyCode::KeyInvalid => "no such API key",
            DenyCode::KeyDisabled => "the API key is disabled",
            DenyCode::KeyExpired => "the API key has expired",
            DenyCode::ProviderNotAllowed => "the API key may not use this provider",
            DenyCode::ApiFormatNotAllowed => "the API key may not use this API format",
            DenyCode::ModelNotAllowed => "the API key may not use this model",
            DenyCode::BalanceExhausted => "the API key's balance is exhausted",
            DenyCode::BudgetExceeded => "the API key's spend budget for this period is used up",
            DenyCode::RateLimited => "rate limit reached for this API key",
            DenyCode::TokenLimited => "token limit reached for this API key",
            DenyCode::ConcurrencyLimited => "too many requests in flight for this API key",
            DenyCode::Unavailable => "admission is unavailable, try again shortly",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for c in DenyCode::ALL {
            assert_eq!(DenyCode::from_code(c.as_str()), Some(c));
        }
        assert_eq!(DenyCode::from_code("nope"), None);
    }
}
