//! Money as integer nano-dollars.
//!
//! Balances are summed over millions of charges, so a float would drift; every amount inside
//! tollgate (Rust, Lua, Postgres) is an `i64` count of 1e-9 USD. JSON numbers are converted
//! from and to their exact decimal text (serde_json's `arbitrary_precision` keeps it), never
//! through `f64`.

use std::fmt;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Nano-dollars per dollar.
pub(crate) const NANOS_PER_USD: i64 = 1_000_000_000;

/// The largest whole number a Lua number (a double) holds exactly, 2^53 - 1: the bound on a
/// balance, a budget and one settlement's cost in nano-USD (about 9.0 million USD), and on a
/// token count, because the scripts compare and add them as Lua numbers.
pub const MAX_EXACT: i64 = (1 << 53) - 1;

/// An exact amount of US dollars, stored as nano-dollars. May be negative (a deduction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(i64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("not a decimal number")]
    Syntax,
    #[error("more than 9 decimal places (amounts are exact to 1e-9 USD)")]
    TooPrecise,
    #[error("amount out of range")]
    Range,
}

impl Money {
    pub const ZERO: Money = Money(0);

    pub const fn from_nanos(nanos: i64) -> Self {
        Money(nanos)
    }

    pub const fn nanos(self) -> i64 {
        self.0
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// Parses a JSON-style decimal (`12`, `-0.0123`, `1.5e-3`) exactly.
    pub fn parse(text: &str) -> Result<Money, MoneyError> {
        Self::parse_with(text, false)
    }

    /// Like [`Money::parse`], but a non-negative amount finer than a nano-dollar is rounded up
    /// to the next one instead of refused: for costs reported by other software (an upstream's
    /// cost header), which may carry more digits than tollgate keeps.
    pub(crate) fn parse_ceil(text: &str) -> Result<Money, MoneyError> {
        Self::parse_with(text, true)
    }

    fn parse_with(text: &str, round_up: bool) -> Result<Money, MoneyError> {
        let text = text.trim();
        let (negative, rest) = match text.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, text.strip_prefix('+').unwrap_or(text)),
        };
        let (mantissa, exponent) = match rest.find(['e', 'E']) {
            Some(i) => {
                let exp: i32 = rest[i + 1..].parse().map_err(|_| MoneyError::Syntax)?;
                (&rest[..i], exp)
            }
            None => (rest, 0),
        };
        let (int_part, frac_part) = match mantissa.split_once('.') {
            Some((i, f)) => (i, f),
            None => (mantissa, ""),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(MoneyError::Syntax);
        }
        if !int_part.bytes().all(|b| b.is_ascii_digit())
            || !frac_part.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(MoneyError::Syntax);
        }
        // All digits as one integer, with the decimal point `scale` places from the right.
        let digits: String = format!("{int_part}{frac_part}");
        let digits = digits.trim_start_matches('0');
        if digits.is_empty() {
            // Zero at any exponent; returning here also keeps `0e2147483647` from looping.
            return Ok(Money::ZERO);
        }
        let scale = frac_part.len() as i64 - i64::from(exponent);
        // value = digits * 10^(9 - scale) nanos
        let shift = 9 - scale;
        let mut nanos: i128 = 0;
        for b in digits.bytes() {
            nanos = nanos
                .checked_mul(10)
                .and_then(|n| n.checked_add(i128::from(b - b'0')))
                .filter(|n| *n <= i128::from(i64::MAX))
                .ok_or(MoneyError::Range)?;
        }
        if shift >= 0 {
            for _ in 0..shift {
                nanos = nanos.checked_mul(10).ok_or(MoneyError::Range)?;
                if nanos > i128::from(i64::MAX) {
                    return Err(MoneyError::Range);
                }
            }
        } else {
            let mut dropped = false;
            for _ in 0..(-shift) {
                if nanos % 10 != 0 {
                    if !round_up || negative {
                        return Err(MoneyError::TooPrecise);
                    }
                    dropped = true;
                }
                nanos /= 10;
                if nanos == 0 {
                    break;
                }
            }
            if dropped {
                nanos += 1;
            }
        }
        let nanos = i64::try_from(nanos).map_err(|_| MoneyError::Range)?;
        Ok(Money(if negative { -nanos } else { nanos }))
    }
}

impl fmt::Display for Money {
    /// Shortest exact decimal: `0.97`, `12`, `-0.000000001`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let whole = abs / NANOS_PER_USD as u64;
        let frac = abs % NANOS_PER_USD as u64;
        if frac == 0 {
            write!(f, "{sign}{whole}")
        } else {
            let frac = format!("{frac:09}");
            write!(f, "{sign}{whole}.{}", frac.trim_end_matches('0'))
        }
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let number: serde_json::Number = self
            .to_string()
            .parse()
            .map_err(|_| serde::ser::Error::custom("money is not a JSON number"))?;
        number.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let number = serde_json::Number::deserialize(deserializer)?;
        Money::parse(&number.to_string()).map_err(|e| D::Error::custom(format!("amount: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(Money::parse("0.1").unwrap().nanos(), 100_000_000);
        assert_eq!(Money::parse("0.0123").unwrap().nanos(), 12_300_000);
        assert_eq!(Money::parse("-2.5").unwrap().nanos(), -2_500_000_000);
        assert_eq!(Money::parse("1e-9").unwrap().nanos(), 1);
        assert_eq!(Money::parse("1.5E2").unwrap().nanos(), 150_000_000_000);
        assert_eq!(Money::parse("0.000000001").unwrap().nanos(), 1);
        assert_eq!(
            Money::parse("9000000000.000000001").unwrap().nanos(),
            9_000_000_000_000_000_001
        );
        assert_eq!(Money::parse("0").unwrap(), Money::ZERO);
        assert_eq!(Money::parse("0.10000000000").unwrap().nanos(), 100_000_000);
        assert_eq!(Money::parse("0e2147483647").unwrap(), Money::ZERO);
        assert_eq!(Money::parse("-0.0e-2147483647").unwrap().nanos(), 0);
    }

    #[test]
    fn huge_exponents_are_refused() {
        assert_eq!(Money::parse("1e2147483647"), Err(MoneyError::Range));
        assert_eq!(Money::parse("1e-2147483647"), Err(MoneyError::TooPrecise));
    }

    #[test]
    fn rejects_what_is_not_exact() {
        assert_eq!(Money::parse("0.0000000001"), Err(MoneyError::TooPrecise));
        assert_eq!(Money::parse("1e20"), Err(MoneyError::Range));
        assert_eq!(Money::parse("abc"), Err(MoneyError::Syntax));
        assert_eq!(Money::parse("."), Err(MoneyError::Syntax));
        assert_eq!(Money::parse("1.2.3"), Err(MoneyError::Syntax));
    }

    #[test]
    fn reported_costs_finer_than_a_nano_round_up() {
        assert_eq!(Money::parse_ceil("0.0000000001"), Ok(Money::from_nanos(1)));
        assert_eq!(
            Money::parse_ceil("0.012345678901"),
            Ok(Money::from_nanos(12_345_679))
        );
        assert_eq!(
            Money::parse_ceil("0.0123456780"),
            Ok(Money::from_nanos(12_345_678))
        );
        assert_eq!(Money::parse_ceil("1e-2147483647"), Ok(Money::from_nanos(1)));
        assert_eq!(Money::parse_ceil("2"), Ok(Money::from_nanos(2_000_000_000)));
        assert_eq!(
            Money::parse_ceil("-0.0000000001"),
            Err(MoneyError::TooPrecise)
        );
    }

    #[test]
    fn prints_shortest_exact_form() {
        assert_eq!(Money::from_nanos(970_000_000).to_string(), "0.97");
        assert_eq!(Money::from_nanos(12 * NANOS_PER_USD).to_string(), "12");
        assert_eq!(Money::from_nanos(-1).to_string(), "-0.000000001");
    }

    #[test]
    fn json_round_trip_keeps_every_nano() {
        let m: Money = serde_json::from_str("1234.567891234").unwrap();
        assert_eq!(m.nanos(), 1_234_567_891_234);
        assert_eq!(serde_json::to_string(&m).unwrap(), "1234.567891234");
    }
}
