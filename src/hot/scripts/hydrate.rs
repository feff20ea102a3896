//! hydrate.lua's wire contract, written once: a key's row from Postgres (or "no such key") as
//! its ARGV. The script's header says what each one means and why.

use super::ScriptArg;
use crate::period::BudgetPeriod;
use crate::store::keys::KeyRow;

/// The script as Redis runs it: `lua/hydrate.lua` behind `lua/lib/config.lua`, whose folding of
/// the configuration admit.lua shares, and `lua/lib/ring.lua`, whose empty cursor it writes.
pub const SOURCE: &str = concat!(
    include_str!("../../../lua/lib/config.lua"),
    include_str!("../../../lua/lib/ring.lua"),
    include_str!("../../../lua/hydrate.lua")
);

/// The row's values that are not already text or numbers as the script takes them.
#[derive(Debug, Clone)]
pub(crate) struct Call<'a> {
    row: Option<&'a KeyRow>,
    key_id: String,
    expires_at: String,
    allow_lists: [String; 3],
    period_start: String,
    negative_ttl_ms: i64,
}

/// `\x1fa\x1fb\x1f`, or empty for "any": what admit.lua matches with one `string.find`.
fn allow_list(list: &Option<Vec<String>>) -> String {
    match list {
        Some(items) if !items.is_empty() => {
            let mut s = String::from('\u{1f}');
            for i in items {
                s.push_str(i);
                s.push('\u{1f}');
            }
            s
        }
        _ => String::new(),
    }
}

impl<'a> Call<'a> {
    /// Writes the row's configuration (the newest version wins).
    pub(crate) fn key(row: &'a KeyRow) -> Self {
        // The period the seeded spend belongs to: Postgres summed it at the current time.
        let period_start = row
            .budget_period
            .as_deref()
            .and_then(BudgetPeriod::parse)
            .map(|p| {
                p.starts_at(chrono::Utc::now())
                    .timestamp_millis()
                    .to_string()
            })
            .unwrap_or_default();
        Call {
            row: Some(row),
            key_id: row.id.to_string(),
            expires_at: row
                .expires_at
                .map(|t| t.timestamp_millis().to_string())
                .unwrap_or_default(),
            allow_lists: [
                allow_list(&row.allowed_providers),
                allow_list(&row.allowed_api_formats),
                allow_list(&row.allowed_models),
            ],
            period_start,
            negative_ttl_ms: 0,
        }
    }

    /// No key has this hash: remember that for `ttl_ms`.
    pub(crate) fn unknown(ttl_ms: i64) -> Self {
        Call {
            row: None,
            key_id: String::new(),
            expires_at: String::new(),
            allow_lists: Default::default(),
            period_start: String::new(),
            negative_ttl_ms: ttl_ms,
        }
    }

    pub(crate) fn args(&self) -> Vec<ScriptArg<'_>> {
        let Some(row) = self.row else {
            return vec![ScriptArg::Str("none"), ScriptArg::Int(self.negative_ttl_ms)];
        };
        let balance = match row.is_standalone {
            true => row.current_balance_nanos.unwrap_or(-1),
            false => -1,
        };
        let [providers, formats, models] = &self.allow_lists;
        vec![
            ScriptArg::Str("key"),
            ScriptArg::Int(row.version),
            ScriptArg::Str(&self.key_id),
            ScriptArg::Str(&row.user_id),
            ScriptArg::Int(i64::from(row.is_active)),
            ScriptArg::Str(&self.expires_at),
            ScriptArg::Str(providers),
            ScriptArg::Str(formats),
            ScriptArg::Str(models),
            ScriptArg::Int(row.rate_limit.map_or(-1, i64::from)),
            ScriptArg::Int(row.concurrent_limit.map_or(-1, i64::from)),
            ScriptArg::Int(i64::from(row.is_standalone)),
            ScriptArg::Int(balance),
            ScriptArg::Int(row.balance_used_nanos),
            ScriptArg::Int(row.token_limit.unwrap_or(-1)),
            ScriptArg::Int(row.budget_nanos.unwrap_or(-1)),
            ScriptArg::Str(row.budget_period.as_deref().unwrap_or("")),
            ScriptArg::Int(row.budget_spent_nanos),
            ScriptArg::Str(&self.period_start),
        ]
    }
}
