//! Money in the tests: exact nano-USD read from the JSON number's decimal text, never via f64.
//!
//! tollgate writes every amount as an exact decimal (serde_json keeps its text:
//! `arbitrary_precision`), so the tests compare nano-USD or the decimal text itself.

use serde_json::Value;
use tollgate::money::Money;

/// Nano-USD in one US dollar.
pub const USD: i64 = 1_000_000_000;

/// Exact nano-USD of a JSON money amount.
#[track_caller]
pub fn nanos(v: &Value) -> i64 {
    assert!(v.is_number(), "expected a money amount, got {v}");
    Money::parse(&v.to_string())
        .unwrap_or_else(|e| panic!("{v} is not an exact amount: {e}"))
        .nanos()
}

/// The exact decimal text of a JSON number, as tollgate wrote it.
#[track_caller]
pub fn decimal(v: &Value) -> String {
    assert!(v.is_number(), "not a number: {v}");
    v.to_string()
}

/// A JSON number with exactly this decimal text (no trip through f64).
pub fn amount(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{text} is not a JSON number: {e}"))
}

/// A JSON number of exactly these nano-USD.
pub fn amount_of(nanos: i64) -> Value {
    amount(&Money::from_nanos(nanos).to_string())
}
