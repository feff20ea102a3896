//! `tollgate keys …`: an operator's client of the admin API (create, get, list, update, disable,
//! balance, stats, secret), printing tables or, with `--json`, the API's JSON unchanged.
//!
//! It talks HTTP to a running tollgate rather than to Postgres, so every rule of the admin API
//! (validation, Redis push, idempotency) applies to the CLI too. The admin token comes only
//! from `TOLLGATE_ADMIN_TOKEN`: a flag would show it in `ps` and shell history. Exit codes: 0
//! done, 1 the API (or the network) refused, 2 a usage error found before any request.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use serde_json::{Map, Number, Value};

#[derive(Debug, Args)]
#[command(
    after_help = "The admin token is read from TOLLGATE_ADMIN_TOKEN (there is no flag, so it never \
                        shows in ps or a shell history). Exit status: 0 done, 1 the API refused \
                        (error: <code>: <message>) or could not be reached, 2 a usage error."
)]
pub struct KeysArgs {
    /// Base URL of tollgate's admin listener
    #[arg(
        long,
        env = "TOLLGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:8081",
        global = true
    )]
    pub(crate) admin_url: String,
    /// Print the API's JSON answer unchanged instead of a table
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(subcommand)]
    pub(crate) command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Create a key; prints its plaintext once
    Create(CreateArgs),
    /// Show one key
    Get { id: String },
    /// List a user's keys (--user) or all standalone keys (--standalone), newest first
    List(ListArgs),
    /// Change a key: only the fields given change; --clear FIELD sets one to null
    Update(UpdateArgs),
    /// Disable a key (soft delete): it stops admitting at once
    Disable { id: String },
    /// Add to (+AMOUNT) or deduct from (-AMOUNT) a standalone key's balance, in USD
    Balance(BalanceArgs),
    /// Settled usage of a key, in total and per UTC day
    Stats(StatsArgs),
    /// Print a key's plaintext, decrypted from its stored copy
    Secret { id: String },
}

#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// The owner's user id (1-128 characters)
    #[arg(long = "user")]
    user: String,
    /// Display name [default: API Key <UTC timestamp>]
    #[arg(long)]
    name: Option<String>,
    /// Comma-separated providers the key may use [default: any]
    #[arg(long, value_delimiter = ',')]
    allowed_providers: Option<Vec<String>>,
    /// Comma-separated API formats the key may use [default: any]
    #[arg(long, value_delimiter = ',')]
    allowed_api_formats: Option<Vec<String>>,
    /// Comma-separated models the key may use [default: any]
    #[arg(long, value_delimiter = ',')]
    allowed_models: Option<Vec<String>>,
    /// Admissions per rate window, or "unlimited" [default: 100]
    #[arg(long, value_parser = parse_limit)]
    rate_limit: Option<Limit>,
    /// Leases in flight at once, or "unlimited" [default: 5]
    #[arg(long, value_parser = parse_limit)]
    concurrent_limit: Option<Limit>,
    /// The key expires this many days from now [default: never]
    #[arg(long)]
    expire_days: Option<u32>,
    /// A prepaid key with a balance
    #[arg(long)]
    standalone: bool,
    /// Starting balance in USD (only with --standalone)
    #[arg(long, value_parser = parse_amount, requires = "standalone")]
    initial_balance: Option<Number>,
    /// Delete the key (instead of disabling it) once it has expired
    #[arg(long)]
    auto_delete_on_expiry: bool,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("whose").required(true).args(["user", "standalone"])))]
pub(crate) struct ListArgs {
    /// A user's non-standalone keys
    #[arg(long)]
    user: Option<String>,
    /// All standalone keys
    #[arg(long)]
    standalone: bool,
    /// Only active (true) or only inactive (false) keys
    #[arg(long)]
    active: Option<bool>,
}

/// The PATCH fields that can be set to null.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Clearable {
    AllowedProviders,
    AllowedApiFormats,
    AllowedModels,
    RateLimit,
    ConcurrentLimit,
    ExpiresAt,
    AutoDeleteOnExpiry,
}

impl Clearable {
    fn field(self) -> &'static str {
        match self {
            Clearable::AllowedProviders => "allowed_providers",
            Clearable::AllowedApiFormats => "allowed_api_formats",
            Clearable::AllowedModels => "allowed_models",
            Clearable::RateLimit => "rate_limit",
            Clearable::ConcurrentLimit => "concurrent_limit",
            Clearable::ExpiresAt => "expires_at",
            Clearable::AutoDeleteOnExpiry => "auto_delete_on_expiry",
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct UpdateArgs {
    id: String,
    #[arg(long)]
    name: Option<String>,
    /// Comma-separated list; "" means unrestricted
    #[arg(long)]
    allowed_providers: Option<String>,
    /// Comma-separated list; "" means unrestricted
    #[arg(long)]
    allowed_api_formats: Option<String>,
    /// Comma-separated list; "" means unrestricted
    #[arg(long)]
    allowed_models: Option<String>,
    /// Admissions per rate window, or "unlimited"
    #[arg(long, value_parser = parse_limit)]
    rate_limit: Option<Limit>,
    /// Leases in flight at once, or "unlimited"
    #[arg(long, value_parser = parse_limit)]
    concurrent_limit: Option<Limit>,
    /// true or false
    #[arg(long)]
    active: Option<bool>,
    /// RFC 3339 instant, e.g. 2027-01-01T00:00:00Z
    #[arg(long)]
    expires_at: Option<String>,
    /// true or false
    #[arg(long)]
    auto_delete_on_expiry: Option<bool>,
    /// Set FIELD to null: unrestricted, unlimited, never expires, or the global default
    #[arg(long = "clear", value_name = "FIELD")]
    clear: Vec<Clearable>,
}

#[derive(Debug, Args)]
#[command(allow_negative_numbers = true)]
pub(crate) struct BalanceArgs {
    id: String,
    /// USD to add (e.g. 10 or +2.5) or deduct (e.g. -0.75), exact to 1e-9
    #[arg(value_parser = parse_amount, allow_hyphen_values = true)]
    amount: Number,
    /// Applies a retried call once (1-128 visible ASCII characters)
    #[arg(long)]
    idempotency_key: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    id: String,
    /// From this RFC 3339 instant, or from the start of this UTC day (YYYY-MM-DD)
    #[arg(long)]
    from: Option<String>,
    /// Up to this RFC 3339 instant, or to the end of this UTC day (YYYY-MM-DD)
    #[arg(long)]
    to: Option<String>,
}

/// A limit as the API takes it: a count, or null for unlimited.
#[derive(Debug, Clone, Copy)]
struct Limit(Option<u32>);

fn parse_limit(s: &str) -> Result<Limit, String> {
    match s.trim() {
        "unlimited" | "none" => Ok(Limit(None)),
        n => n
            .parse::<u32>()
            .ok()
            .filter(|n| *n >= 1)
            .map(|n| Limit(Some(n)))
            .ok_or_else(|| format!("{s:?} is neither a whole number ≥ 1 nor \"unlimited\"")),
    }
}

/// An amount of USD as an exact JSON number: its decimal text goes to the API unchanged, so
/// nothing is lost to a float on the way.
fn parse_amount(s: &str) -> Result<Number, String> {
    let t = s.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    match serde_json::from_str::<Value>(t) {
        Ok(Value::Number(n)) => Ok(n),
        _ => Err(format!(
            "{s:?} is not an amount of USD like 10, +2.5 or -0.75"
        )),
    }
}

impl Limit {
    fn json(self) -> Value {
        self.0.map_or(Value::Null, Value::from)
    }
}

/// Why the command failed; each kind has its exit code.
enum Failure {
    /// Wrong arguments or environment, found before any request: exit 2.
    Usage(String),
    /// The API refused, or could not be reached: exit 1, `code: message` on one line.
    Api { code: String, message: String },
}

fn usage(message: impl Into<String>) -> Failure {
    Failure::Usage(message.into())
}

/// One request to the admin API.
struct Call {
    method: reqwest::Method,
    path: String,
    query: Vec<(&'static str, String)>,
    body: Option<Value>,
    idempotency_key: Option<String>,
}

impl Call {
    fn new(method: reqwest::Method, path: String) -> Call {
        Call {
            method,
            path,
            query: Vec::new(),
            body: None,
            idempotency_key: None,
        }
    }
}

/// How a successful answer is shown as text.
#[derive(Clone, Copy)]
enum View {
    Created,
    Key,
    List,
    Stats,
    Secret,
}

/// A path segment, percent-encoded: user ids may hold `/`, `?` or spaces.
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `YYYY-MM-DD` as the start (`from`) or the last instant (`to`) of that UTC day; anything
/// else is passed on for the API to judge as RFC 3339.
fn instant(v: &str, end_of_day: bool) -> String {
    let v = v.trim();
    if chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d").is_ok() {
        if end_of_day {
            format!("{v}T23:59:59.999999999Z")
        } else {
            format!("{v}T00:00:00Z")
        }
    } else {
        v.to_string()
    }
}

fn plan(cmd: KeysCommand) -> Result<(Call, View), Failure> {
    use reqwest::Method;
    Ok(match cmd {
        KeysCommand::Create(a) => {
            let mut b = Map::new();
            b.insert("user_id".into(), a.user.into());
            if let Some(n) = a.name {
                b.insert("name".into(), n.into());
            }
            for (field, list) in [
                ("allowed_providers", a.allowed_providers),
                ("allowed_api_formats", a.allowed_api_formats),
                ("allowed_models", a.allowed_models),
            ] {
                if let Some(list) = list {
                    b.insert(field.into(), list_json(&list));
                }
            }
            if let Some(l) = a.rate_limit {
                b.insert("rate_limit".into(), l.json());
            }
            if let Some(l) = a.concurrent_limit {
                b.insert("concurrent_limit".into(), l.json());
            }
            if let Some(d) = a.expire_days {
                b.insert("expire_days".into(), d.into());
            }
            if a.standalone {
                b.insert("is_standalone".into(), true.into());
            }
            if let Some(m) = a.initial_balance {
                b.insert("initial_balance_usd".into(), Value::Number(m));
            }
            if a.auto_delete_on_expiry {
                b.insert("auto_delete_on_expiry".into(), true.into());
            }
            let mut call = Call::new(Method::POST, "/admin/keys".into());
            call.body = Some(Value::Object(b));
            (call, View::Created)
        }
        KeysCommand::Get { id } => (
            Call::new(Method::GET, format!("/admin/keys/{}", segment(&id))),
            View::Key,
        ),
        KeysCommand::List(a) => {
            let path = match &a.user {
                Some(u) => format!("/admin/users/{}/keys", segment(u)),
                None => "/admin/standalone-keys".to_string(),
            };
            let mut call = Call::new(Method::GET, path);
            if let Some(active) = a.active {
                call.query.push(("is_active", active.to_string()));
            }
            (call, View::List)
        }
        KeysCommand::Update(a) => {
            let mut b = Map::new();
            if let Some(n) = a.name {
                b.insert("name".into(), n.into());
            }
            for (field, list) in [
                ("allowed_providers", &a.allowed_providers),
                ("allowed_api_formats", &a.allowed_api_formats),
                ("allowed_models", &a.allowed_models),
            ] {
                if let Some(list) = list {
                    let items: Vec<String> = list
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect();
                    b.insert(field.into(), list_json(&items));
                }
            }
            if let Some(l) = a.rate_limit {
                b.insert("rate_limit".into(), l.json());
            }
            if let Some(l) = a.concurrent_limit {
                b.insert("concurrent_limit".into(), l.json());
            }
            if let Some(v) = a.active {
                b.insert("is_active".into(), v.into());
            }
            if let Some(v) = a.expires_at {
                b.insert("expires_at".into(), v.into());
            }
            if let Some(v) = a.auto_delete_on_expiry {
                b.insert("auto_delete_on_expiry".into(), v.into());
            }
            for c in &a.clear {
                if b.insert(c.field().into(), Value::Null).is_some() {
                    return Err(usage(format!(
                        "{} is both set and cleared",
                        c.field().replace('_', "-")
                    )));
                }
            }
            if b.is_empty() {
                return Err(usage(
                    "nothing to update: give at least one field or --clear",
                ));
            }
            let mut call = Call::new(Method::PATCH, format!("/admin/keys/{}", segment(&a.id)));
            call.body = Some(Value::Object(b));
            (call, View::Key)
        }
        KeysCommand::Disable { id } => (
            Call::new(Method::DELETE, format!("/admin/keys/{}", segment(&id))),
            View::Key,
        ),
        KeysCommand::Balance(a) => {
            let mut call = Call::new(
                Method::POST,
                format!("/admin/keys/{}/balance", segment(&a.id)),
            );
            let mut b = Map::new();
            b.insert("amount_usd".into(), Value::Number(a.amount));
            call.body = Some(Value::Object(b));
            call.idempotency_key = a.idempotency_key;
            (call, View::Key)
        }
        KeysCommand::Stats(a) => {
            let mut call = Call::new(Method::GET, format!("/admin/keys/{}/stats", segment(&a.id)));
            if let Some(f) = a.from {
                call.query.push(("start", instant(&f, false)));
            }
            if let Some(t) = a.to {
                call.query.push(("end", instant(&t, true)));
            }
            (call, View::Stats)
        }
        KeysCommand::Secret { id } => (
            Call::new(Method::GET, format!("/admin/keys/{}/secret", segment(&id))),
            View::Secret,
        ),
    })
}

fn list_json(items: &[String]) -> Value {
    Value::Array(items.iter().cloned().map(Value::from).collect())
}

/// Sends the call; the answer's text when it is 2xx.
async fn send(base: &str, token: &str, call: Call) -> Result<String, Failure> {
    let base = base.trim().trim_end_matches('/');
    // Built without TLS: the admin listener itself speaks plain HTTP (reach a remote one through
    // an SSH tunnel or a TLS-terminating proxy on loopback).
    if !base.starts_with("http://") {
        return Err(usage(format!(
            "--admin-url {base:?} is not an http:// URL (the admin listener speaks plain HTTP)"
        )));
    }
    let unreachable = |e: reqwest::Error| Failure::Api {
        code: "unreachable".into(),
        message: format!(
            "no answer from the admin API at {base}: {}",
            error_chain(&e)
        ),
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(unreachable)?;
    let mut req = client
        .request(call.method, format!("{base}{}", call.path))
        .bearer_auth(token);
    if !call.query.is_empty() {
        req = req.query(&call.query);
    }
    if let Some(k) = call.idempotency_key {
        req = req.header("idempotency-key", k);
    }
    if let Some(b) = call.body {
        req = req.json(&b);
    }
    let res = req.send().await.map_err(unreachable)?;
    let status = res.status();
    let text = res.text().await.map_err(unreachable)?;
    if status.is_success() {
        return Ok(text);
    }
    let parsed: Option<(String, String)> =
        serde_json::from_str::<Value>(&text).ok().and_then(|v| {
            Some((
                v.get("code")?.as_str()?.to_string(),
                v.get("message")?.as_str()?.to_string(),
            ))
        });
    Err(match parsed {
        Some((code, message)) => Failure::Api { code, message },
        None => Failure::Api {
            code: format!("http_{}", status.as_u16()),
            message: text
                .chars()
                .take(200)
                .collect::<String>()
                .trim()
                .to_string(),
        },
    })
}

/// reqwest's top-level error says only "error sending request"; the cause says why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

/// Runs `tollgate keys …`.
pub async fn run(args: KeysArgs) -> ExitCode {
    let json = args.json;
    let outcome = async {
        let token = std::env::var("TOLLGATE_ADMIN_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| usage("TOLLGATE_ADMIN_TOKEN is not set: export the admin token"))?;
        let (call, view) = plan(args.command)?;
        let text = send(&args.admin_url, &token, call).await?;
        Ok::<_, Failure>((text, view))
    }
    .await;
    match outcome {
        Ok((text, view)) => {
            if json {
                println!("{}", text.trim_end());
            } else {
                match serde_json::from_str::<Value>(&text) {
                    Ok(v) => print!("{}", render(view, &v)),
                    Err(_) => println!("{}", text.trim_end()),
                }
            }
            ExitCode::SUCCESS
        }
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Api { code, message }) => {
            eprintln!("error: {code}: {}", one_line(&message));
            ExitCode::FAILURE
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A value as a table cell: null is `-`, lists are comma-separated, text has no controls.
fn cell(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.chars().filter(|c| !c.is_control()).collect(),
        Some(Value::Array(items)) if items.is_empty() => "-".into(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| cell(Some(i)))
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for r in std::iter::once(&header).chain(rows) {
        let line: Vec<String> = r
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}", w = *w))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The ApiKey fields, in the contract's order, as a two-column table.
const KEY_FIELDS: [&str; 19] = [
    "id",
    "user_id",
    "name",
    "display",
    "is_active",
    "is_standalone",
    "allowed_providers",
    "allowed_api_formats",
    "allowed_models",
    "rate_limit",
    "concurrent_limit",
    "expires_at",
    "current_balance_usd",
    "balance_used_usd",
    "remaining_balance_usd",
    "auto_delete_on_expiry",
    "created_at",
    "updated_at",
    "last_used_at",
];

fn key_table(k: &Value) -> String {
    let rows: Vec<Vec<String>> = KEY_FIELDS
        .iter()
        .map(|f| vec![f.to_string(), cell(k.get(*f))])
        .collect();
    table(&["FIELD", "VALUE"], &rows)
}

fn render(view: View, v: &Value) -> String {
    match view {
        View::Created => {
            let mut out = format!(
                "key: {}\n(store it now: `tollgate keys secret` can show it again)\n\n",
                cell(v.get("key"))
            );
            out.push_str(&key_table(v.get("api_key").unwrap_or(&Value::Null)));
            out
        }
        View::Key => key_table(v),
        View::Secret => format!("{}\n", cell(v.get("key"))),
        View::List => {
            let keys = v.get("keys").and_then(Value::as_array);
            let Some(keys) = keys.filter(|k| !k.is_empty()) else {
                return "no keys\n".into();
            };
            let cols = [
                ("ID", "id"),
                ("USER", "user_id"),
                ("NAME", "name"),
                ("DISPLAY", "display"),
                ("ACTIVE", "is_active"),
                ("STANDALONE", "is_standalone"),
                ("RATE", "rate_limit"),
                ("CONCURRENT", "concurrent_limit"),
                ("REMAINING_USD", "remaining_balance_usd"),
                ("EXPIRES_AT", "expires_at"),
            ];
            let rows: Vec<Vec<String>> = keys
                .iter()
                .map(|k| cols.iter().map(|(_, f)| cell(k.get(*f))).collect())
                .collect();
            let header: Vec<&str> = cols.iter().map(|(h, _)| *h).collect();
            table(&header, &rows)
        }
        View::Stats => {
            let summary: Vec<Vec<String>> = [
                "key_id",
                "key_name",
                "total_requests",
                "total_tokens",
                "total_cost_usd",
                "avg_response_time_ms",
            ]
            .iter()
            .map(|f| vec![f.to_string(), cell(v.get(*f))])
            .collect();
            let mut out = table(&["FIELD", "VALUE"], &summary);
            let days = v
                .get("daily_stats")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            out.push('\n');
            if days.is_empty() {
                out.push_str("no usage in this period\n");
            } else {
                let rows: Vec<Vec<String>> = days
                    .iter()
                    .map(|d| {
                        ["date", "requests", "tokens", "cost_usd"]
                            .iter()
                            .map(|f| cell(d.get(*f)))
                            .collect()
                    })
                    .collect();
                out.push_str(&table(&["DATE", "REQUESTS", "TOKENS", "COST_USD"], &rows));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_keep_their_exact_decimal_text() {
        assert_eq!(parse_amount("+2.5").unwrap().to_string(), "2.5");
        assert_eq!(
            parse_amount("-0.000000001").unwrap().to_string(),
            "-0.000000001"
        );
        assert!(parse_amount("ten").is_err());
        assert!(parse_amount("1,5").is_err());
    }

    #[test]
    fn limits_are_counts_or_unlimited() {
        assert_eq!(parse_limit("7").unwrap().0, Some(7));
        assert_eq!(parse_limit("unlimited").unwrap().0, None);
        assert!(parse_limit("0").is_err());
        assert!(parse_limit("-3").is_err());
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(segment("u/1 x?"), "u%2F1%20x%3F");
        assert_eq!(segment("ü"), "%C3%BC");
    }

    #[test]
    fn a_day_means_its_whole_utc_extent() {
        assert_eq!(instant("2026-11-27", false), "2026-11-27T00:00:00Z");
        assert_eq!(
            instant("2026-11-27", true),
            "2026-11-27T23:59:59.999999999Z"
        );
        assert_eq!(
            instant("2026-11-27T10:00:00Z", true),
            "2026-11-27T10:00:00Z"
        );
    }

    #[test]
    fn tables_pad_columns_and_show_null_as_a_dash() {
        let t = table(
            &["A", "BB"],
            &[vec!["xyz".into(), cell(Some(&Value::Null))]],
        );
        assert_eq!(t, "A    BB\nxyz  -\n");
    }
}
