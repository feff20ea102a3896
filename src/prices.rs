//! The price table: USD per million tokens for each `provider/model`, built in
//! (`src/prices.json`, with the date its figures were taken) and replaced or extended by
//! `TOLLGATE_PRICES_FILE`; and the exact cost of a settlement from its token counts.
//!
//! Prices are nano-dollars per million tokens and costs are computed in 128-bit integers, then
//! rounded up to the next nano-dollar: never through f64, so a price of 0.123456789 $/Mtok
//! times any token count is exact.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::money::Money;

const BUILTIN: &str = include_str!("prices.json");
/// Tokens in the unit prices are quoted for.
const PER: u128 = 1_000_000;
/// Dearest price accepted, per million tokens: far above any model's, it keeps every cost
/// computable and every price printable.
const MAX_PRICE_NANOS: i64 = 1_000_000 * 1_000_000_000;

/// One model's prices, per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Price {
    pub(crate) input_per_mtok_usd: Money,
    pub(crate) output_per_mtok_usd: Money,
    pub(crate) cached_input_per_mtok_usd: Money,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceEntry {
    input_per_mtok_usd: Money,
    output_per_mtok_usd: Money,
    cached_input_per_mtok_usd: Option<Money>,
}

#[derive(Deserialize)]
struct Builtin {
    prices: BTreeMap<String, PriceEntry>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PricesError(String);

/// The table in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Prices {
    prices: BTreeMap<String, Price>,
}

impl Price {
    /// `((input − cached) × input + cached × cached_input + output × output) / 1e6`, rounded
    /// up; `None` when `cached` exceeds `input` or the cost would pass `max`.
    pub fn cost(&self, input: u64, cached: u64, output: u64, max: Money) -> Option<Money> {
        let uncached = input.checked_sub(cached)?;
        let n = |m: Money| u128::try_from(m.nanos()).unwrap_or(0);
        let total = u128::from(uncached) * n(self.input_per_mtok_usd)
            + u128::from(cached) * n(self.cached_input_per_mtok_usd)
            + u128::from(output) * n(self.output_per_mtok_usd);
        i64::try_from(total.div_ceil(PER))
            .ok()
            .filter(|c| *c <= max.nanos())
            .map(Money::from_nanos)
    }
}

fn checked(name: &str, e: PriceEntry) -> Result<Price, PricesError> {
    let price = Price {
        input_per_mtok_usd: e.input_per_mtok_usd,
        output_per_mtok_usd: e.output_per_mtok_usd,
        cached_input_per_mtok_usd: e.cached_input_per_mtok_usd.unwrap_or(e.input_per_mtok_usd),
    };
    for m in [
        price.input_per_mtok_usd,
        price.output_per_mtok_usd,
        price.cached_input_per_mtok_usd,
    ] {
        if m.is_negative() || m.nanos() > MAX_PRICE_NANOS {
            return Err(PricesError(format!(
                "{name}: prices must be from 0 to 1,000,000 USD per million tokens"
            )));
        }
    }
    match name.split_once('/') {
        Some((p, m)) if !p.is_empty() && !m.is_empty() => Ok(price),
        _ => Err(PricesError(format!(
            "{name:?}: entries are named \"<provider>/<model>\""
        ))),
    }
}

fn parse_entries(
    entries: BTreeMap<String, PriceEntry>,
) -> Result<BTreeMap<String, Price>, PricesError> {
    entries
        .into_iter()
        .map(|(name, e)| checked(&name, e).map(|p| (name, p)))
        .collect()
}

impl Prices {
    /// The built-in table.
    pub fn builtin() -> Prices {
        let table: Builtin = match serde_json::from_str(BUILTIN) {
            Ok(t) => t,
            // The file is part of the binary and a unit test parses it.
            Err(_) => return Prices::default(),
        };
        Prices {
            prices: parse_entries(table.prices).unwrap_or_default(),
        }
    }

    /// The built-in table with the entries of a `TOLLGATE_PRICES_FILE` replacing or adding to
    /// it: `{"<provider>/<model>": {"input_per_mtok_usd", "output_per_mtok_usd",
    /// "cached_input_per_mtok_usd"?}}`.
    pub fn with_file(text: &str) -> Result<Prices, PricesError> {
        let entries: BTreeMap<String, PriceEntry> = serde_json::from_str(text).map_err(|e| {
            PricesError(format!(
                "not a JSON object of \"<provider>/<model>\": {{input_per_mtok_usd, output_per_mtok_usd, cached_input_per_mtok_usd?}}: {e}"
            ))
        })?;
        let mut prices = Prices::builtin();
        prices.prices.extend(parse_entries(entries)?);
        Ok(prices)
    }

    pub fn get(&self, provider: &str, model: &str) -> Option<&Price> {
        self.prices.get(&format!("{provider}/{model}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Money = Money::from_nanos((1 << 53) - 1);

    #[test]
    fn the_builtin_table_parses_and_names_the_three_providers() {
        let table: Builtin = serde_json::from_str(BUILTIN).unwrap();
        let n = table.prices.len();
        let p = Prices::builtin();
        assert_eq!(p.prices.len(), n, "every built-in entry is valid");
        for name in [
            "openai/gpt-4o",
            "anthropic/claude-sonnet-4-5",
            "gemini/gemini-2.5-pro",
        ] {
            let (provider, model) = name.split_once('/').unwrap();
            assert!(p.get(provider, model).is_some(), "{name}");
        }
        let embeddings = p.get("openai", "text-embedding-3-small").unwrap();
        assert_eq!(
            embeddings.cached_input_per_mtok_usd,
            embeddings.input_per_mtok_usd
        );
    }

    #[test]
    fn costs_are_exact_and_rounded_up() {
        let awkward = Price {
            input_per_mtok_usd: Money::parse("0.123456789").unwrap(),
            output_per_mtok_usd: Money::parse("0.987654321").unwrap(),
            cached_input_per_mtok_usd: Money::parse("0.000000001").unwrap(),
        };
        // 1e6 input tokens at 0.123456789 $/Mtok = 0.123456789 exactly.
        assert_eq!(
            awkward.cost(1_000_000, 0, 0, MAX),
            Some(Money::from_nanos(123_456_789))
        );
        // One token: 123.456789 nano-dollars → 124; one cached token at a nano-dollar per
        // million: a millionth of a nano-dollar → 1.
        assert_eq!(awkward.cost(1, 0, 0, MAX), Some(Money::from_nanos(124)));
        assert_eq!(awkward.cost(1, 1, 0, MAX), Some(Money::from_nanos(1)));
        // 10^12 tokens each way, no f64 on the way.
        let big = 1_000_000_000_000u64;
        assert_eq!(
            awkward.cost(big, big / 2, big, MAX),
            Some(Money::from_nanos(
                123_456_789 * 500_000 + 500_000 + 987_654_321 * 1_000_000
            ))
        );
        assert_eq!(awkward.cost(1, 2, 0, MAX), None, "cached > input");
        assert_eq!(awkward.cost(u64::MAX, 0, u64::MAX, MAX), None, "too large");
        assert_eq!(awkward.cost(0, 0, 0, MAX), Some(Money::ZERO));
    }

    #[test]
    fn a_prices_file_replaces_and_extends_and_bad_ones_say_why() {
        let p = Prices::with_file(
            r#"{"openai/gpt-4o": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 2},
                "acme/m1": {"input_per_mtok_usd": 0.5, "output_per_mtok_usd": 0.5, "cached_input_per_mtok_usd": 0.1}}"#,
        )
        .unwrap();
        let gpt = p.get("openai", "gpt-4o").unwrap();
        assert_eq!(gpt.input_per_mtok_usd, Money::parse("1").unwrap());
        assert_eq!(gpt.cached_input_per_mtok_usd, Money::parse("1").unwrap());
        assert!(p.get("acme", "m1").is_some());
        assert!(p.get("anthropic", "claude-sonnet-4-5").is_some(), "kept");
        for bad in [
            "[]",
            "{",
            r#"{"gpt-4o": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 2}}"#,
            r#"{"a/b": {"input_per_mtok_usd": -1, "output_per_mtok_usd": 2}}"#,
            r#"{"a/b": {"input_per_mtok_usd": 1}}"#,
            r#"{"a/b": {"input_per_mtok_usd": 1, "output_per_mtok_usd": 2, "typo": 3}}"#,
        ] {
            assert!(Prices::with_file(bad).is_err(), "{bad}");
        }
    }
}
