//! hydrate.lua's wire contract, written once: a key's configuration (or "no such key") as its
//! ARGV. The script's header says what each one means and why.

use super::ScriptArg;

pub const SOURCE: &str = include_str!("../../../lua/hydrate.lua");

/// A key's configuration as the state hash keeps it.
#[derive(Debug, Clone, Copy)]
pub struct Config<'a> {
    pub version: i64,
    pub key_id: &'a str,
    pub user_id: &'a str,
    pub active: bool,
    /// ms since the epoch; '' = never.
    pub expires_at: &'a str,
    /// Allow-lists as `\x1fa\x1fb\x1f`; '' = any.
    pub providers: &'a str,
    pub api_formats: &'a str,
    pub models: &'a str,
    pub rate_limit: i64,
    pub concurrent_limit: i64,
    pub standalone: bool,
    pub balance_nanos: i64,
    pub used_nanos: i64,
    pub token_limit: i64,
    pub budget_nanos: i64,
    /// '' = never resets.
    pub budget_period: &'a str,
    pub period_spend_nanos: i64,
    /// ms since the epoch of the seeded spend's period; ''.
    pub period_start: &'a str,
}

#[derive(Debug, Clone, Copy)]
pub enum Call<'a> {
    Key(Config<'a>),
    /// No key has this hash: remember that for this long (ms).
    Unknown {
        ttl_ms: i64,
    },
}

impl Call<'_> {
    pub fn args(&self) -> Vec<ScriptArg<'_>> {
        match self {
            Call::Unknown { ttl_ms } => vec![ScriptArg::Str("none"), ScriptArg::Int(*ttl_ms)],
            Call::Key(c) => vec![
                ScriptArg::Str("key"),
                ScriptArg::Int(c.version),
                ScriptArg::Str(c.key_id),
                ScriptArg::Str(c.user_id),
                ScriptArg::Int(i64::from(c.active)),
                ScriptArg::Str(c.expires_at),
                ScriptArg::Str(c.providers),
                ScriptArg::Str(c.api_formats),
                ScriptArg::Str(c.models),
                ScriptArg::Int(c.rate_limit),
                ScriptArg::Int(c.concurrent_limit),
                ScriptArg::Int(i64::from(c.standalone)),
                ScriptArg::Int(c.balance_nanos),
                ScriptArg::Int(c.used_nanos),
                ScriptArg::Int(c.token_limit),
                ScriptArg::Int(c.budget_nanos),
                ScriptArg::Str(c.budget_period),
                ScriptArg::Int(c.period_spend_nanos),
                ScriptArg::Str(c.period_start),
            ],
        }
    }
}
