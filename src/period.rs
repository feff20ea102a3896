//! Budget periods: a UTC day (from 00:00), an ISO week (from Monday 00:00) or a calendar month
//! (from the 1st, 00:00). `admit.lua` and `settle.lua` compute the same boundaries from Redis's
//! clock; this is the Rust side, for `budget_resets_at` and the answers' `resets_at`.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetPeriod {
    Day,
    Week,
    Month,
}

impl BudgetPeriod {
    pub fn parse(text: &str) -> Option<BudgetPeriod> {
        match text {
            "day" => Some(BudgetPeriod::Day),
            "week" => Some(BudgetPeriod::Week),
            "month" => Some(BudgetPeriod::Month),
            _ => None,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Week => "week",
            BudgetPeriod::Month => "month",
        }
    }

    /// The first day of the period that `day` falls in.
    fn first_day(self, day: NaiveDate) -> NaiveDate {
        match self {
            BudgetPeriod::Day => day,
            BudgetPeriod::Week => {
                day - Duration::days(i64::from(day.weekday().num_days_from_monday()))
            }
            BudgetPeriod::Month => day.with_day(1).unwrap_or(day),
        }
    }

    /// When the period that `now` falls in started.
    pub fn starts_at(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let first = self.first_day(now.date_naive());
        Utc.from_utc_datetime(&first.and_hms_opt(0, 0, 0).unwrap_or_default())
    }

    /// When the period that `now` falls in ends (and the next one starts).
    pub(crate) fn resets_at(self, now: DateTime<Utc>) -> DateTime<Utc> {
        let first = self.first_day(now.date_naive());
        let next = match self {
            BudgetPeriod::Day => first + Duration::days(1),
            BudgetPeriod::Week => first + Duration::days(7),
            BudgetPeriod::Month => first
                .checked_add_months(chrono::Months::new(1))
                .unwrap_or(first + Duration::days(31)),
        };
        Utc.from_utc_datetime(&next.and_hms_opt(0, 0, 0).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    #[rustfmt::skip]
    fn periods_turn_at_utc_midnight_monday_and_the_first() {
        use BudgetPeriod::{Day, Month, Week};
        // (period, instant, its period's start, when it resets); 2026-11-27 is a Friday.
        let cases = [
            (Day, "2026-11-27T23:59:59.999Z", "2026-11-27T00:00:00Z", "2026-11-28T00:00:00Z"),
            (Week, "2026-11-27T23:59:59.999Z", "2026-11-23T00:00:00Z", "2026-11-30T00:00:00Z"),
            (Month, "2026-11-27T23:59:59.999Z", "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"),
            (Week, "2026-11-30T00:00:00Z", "2026-11-30T00:00:00Z", "2026-12-07T00:00:00Z"),
            (Month, "2026-12-31T12:00:00Z", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),
            (Month, "2028-02-29T01:00:00Z", "2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z"),
        ];
        for (period, now, start, reset) in cases {
            assert_eq!(period.starts_at(at(now)), at(start), "{period:?} at {now}");
            assert_eq!(period.resets_at(at(now)), at(reset), "{period:?} at {now}");
        }
        assert_eq!(BudgetPeriod::parse("fortnight"), None);
    }
}
