//! Every setting: a `serve` flag and a `TOLLGATE_*` variable (the flag wins), its default,
//! and its validation. [`RawSettings`] is what clap reads; [`Config::from_raw`] is the one
//! place a raw string becomes a typed, checked value, so a bad setting stops start-up with
//! one line instead of surfacing later as a runtime error. Tests build a [`Config`] from a
//! map with [`Config::from_map`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::hot::admission::{LeaseTerm, StateFormat};
use crate::hot::lease_id::LeaseSecrets;
use crate::http::serve::ConnectionLimits;
use crate::inference::Inference;
use crate::keys::{EncryptionKey, Secret};
use crate::prices::Prices;

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Admission sidecar for API and LLM gateways"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending migrations, then serve both listeners until SIGTERM/SIGINT.
    Serve(RawSettings),
    /// Apply pending database migrations and exit.
    Migrate(RawSettings),
    /// Manage API keys through a running tollgate's admin API.
    Keys(crate::cli::KeysArgs),
}

/// Settings as text, exactly as the operator wrote them.
#[derive(Debug, Clone, Args)]
pub struct RawSettings {
    /// Data-plane listener: /v1/*, /auth*, /healthz, /readyz
    #[arg(long, env = "TOLLGATE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Admin listener: /admin/*, /metrics, /healthz, /readyz
    #[arg(long, env = "TOLLGATE_ADMIN_LISTEN", default_value = "127.0.0.1:8081")]
    pub admin_listen: String,
    /// Redis URL; several comma-separated redis:// URLs mean Redis Cluster seed nodes
    #[arg(
        long,
        env = "TOLLGATE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Postgres URL (the database is created when it does not exist)
    #[arg(
        long,
        env = "TOLLGATE_DATABASE_URL",
        default_value = "postgres://localhost/tollgate"
    )]
    pub database_url: String,
    /// Prefix of every Redis key this process creates
    #[arg(long, env = "TOLLGATE_REDIS_NAMESPACE", default_value = "tollgate")]
    pub redis_namespace: String,
    /// Bearer token for /admin/* (at least 16 characters); unset means the admin API refuses
    /// everything [default: none]
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Base64 of 32 bytes: AES-256-GCM key for the recoverable copy of each API key; keys
    /// cannot be created without it [default: none]
    #[arg(long, env = "TOLLGATE_ENCRYPTION_KEY", hide_env_values = true)]
    pub encryption_key: Option<String>,
    /// Secret (at least 32 characters) that seals lease ids; every replica must share it
    /// [default: derived from TOLLGATE_ENCRYPTION_KEY]
    #[arg(long, env = "TOLLGATE_LEASE_SECRET", hide_env_values = true)]
    pub lease_secret: Option<String>,
    /// The lease secret before a rotation: lease ids it sealed still settle while it is set
    /// [default: none]
    #[arg(long, env = "TOLLGATE_LEASE_SECRET_PREVIOUS", hide_env_values = true)]
    pub lease_secret_previous: Option<String>,
    /// Generated keys look like <prefix>- followed by 32 characters of [A-Za-z0-9]
    #[arg(long, env = "TOLLGATE_KEY_PREFIX", default_value = "sk")]
    pub key_prefix: String,
    /// Length of the sliding rate-limit window, in seconds
    #[arg(long, env = "TOLLGATE_RATE_WINDOW_SECONDS", default_value = "60")]
    pub rate_window_seconds: String,
    /// An unsettled, unreleased lease frees its slot and hold after this many seconds
    #[arg(long, env = "TOLLGATE_LEASE_TTL_SECONDS", default_value = "600")]
    pub lease_ttl_seconds: String,
    /// closed or open: what admission does when Redis cannot be reached
    #[arg(long, env = "TOLLGATE_FAIL_MODE", default_value = "closed")]
    pub fail_mode: String,
    /// How new leases keep their holds in Redis: 1 (every release reads it) or 2 (in the
    /// live set: cheaper; set it only once every replica runs a release that reads format 2)
    #[arg(long, env = "TOLLGATE_STATE_FORMAT", default_value = "1")]
    pub state_format: String,
    /// Period of the expired-key sweeper in seconds; 0 turns it off
    #[arg(long, env = "TOLLGATE_CLEANUP_INTERVAL_SECONDS", default_value = "300")]
    pub cleanup_interval_seconds: String,
    /// The sweeper's default for keys whose own auto_delete_on_expiry is null
    #[arg(long, env = "TOLLGATE_AUTO_DELETE_EXPIRED", default_value = "false")]
    pub auto_delete_expired: String,
    /// Deadline of one Redis call on the hot path, in milliseconds
    #[arg(long, env = "TOLLGATE_REDIS_TIMEOUT_MS", default_value = "250")]
    pub redis_timeout_ms: String,
    /// Seconds a client has to send a request's headers (from the accept, or from the first
    /// byte of a later request on a kept-alive connection)
    #[arg(long, env = "TOLLGATE_HEADER_TIMEOUT_SECONDS", default_value = "10")]
    pub header_timeout_seconds: String,
    /// Seconds a client has to send a request's whole body, from the end of its headers
    #[arg(long, env = "TOLLGATE_BODY_TIMEOUT_SECONDS", default_value = "30")]
    pub body_timeout_seconds: String,
    /// Seconds a kept-alive connection may stay idle; longer than the gateways' own upstream
    /// keep-alive (nginx 60 s, Go 90 s, Caddy 2 min, Envoy 1 h) so that they close first
    #[arg(long, env = "TOLLGATE_IDLE_TIMEOUT_SECONDS", default_value = "3660")]
    pub idle_timeout_seconds: String,
    /// Most open connections per listener; above it a new connection gets 503 and is closed
    #[arg(long, env = "TOLLGATE_MAX_CONNECTIONS", default_value = "10000")]
    pub max_connections: String,
    /// Log format: text or json
    #[arg(long, env = "TOLLGATE_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
    /// JSON file of extra path-inference rules: [{"path", "provider", "api_format"}]
    /// [default: none]
    #[arg(long, env = "TOLLGATE_INFERENCE_RULES")]
    pub inference_rules: Option<String>,
    /// Name of this replica's usage-stream consumer [default: <hostname>:<admin port>]
    #[arg(long, env = "TOLLGATE_SYNC_CONSUMER")]
    pub sync_consumer: Option<String>,
    /// Seconds before another replica's unacknowledged usage events are taken over
    #[arg(long, env = "TOLLGATE_SYNC_CLAIM_IDLE_SECONDS", default_value = "15")]
    pub sync_claim_idle_seconds: String,
    /// false: this process never moves usage events to Postgres, leaving that to the
    /// processes of the same namespace that have it true (at least one must)
    #[arg(long, env = "TOLLGATE_SYNC_ENABLED", default_value = "true")]
    pub sync_enabled: String,
    /// Lease lifetime of a proxy subrequest's admission (/auth*) that sends no
    /// X-Tollgate-Lease-Ttl, in seconds (1 to 86400)
    #[arg(
        long,
        env = "TOLLGATE_SUBREQUEST_LEASE_TTL_SECONDS",
        default_value = "60"
    )]
    pub subrequest_lease_ttl_seconds: String,
    /// host:port where proxies report the end of each request: UDP syslog datagrams and TCP
    /// newline-delimited JSON, each record settling or releasing a lease [default: none (off)]
    #[arg(long, env = "TOLLGATE_ACCESS_LOG_LISTEN")]
    pub access_log_listen: Option<String>,
    /// JSON file of prices replacing or extending the built-in table: {"<provider>/<model>":
    /// {"input_per_mtok_usd", "output_per_mtok_usd", "cached_input_per_mtok_usd"?}} [default:
    /// none (the built-in table)]
    #[arg(long, env = "TOLLGATE_PRICES_FILE")]
    pub prices_file: Option<String>,
}

/// Every setting with its default and meaning, for `tollgate --help`: the settings are flags of
/// `serve`, so the top-level help would otherwise not show them. Built from the `serve` flags
/// themselves, so it cannot drift from them.
pub fn settings_help() -> String {
    let serve = RawSettings::augment_args(clap::Command::new("serve"));
    let mut out = String::from(
        "Settings (each is a flag of `serve` and an environment variable; the flag wins):\n",
    );
    for arg in serve.get_arguments() {
        let Some(env) = arg.get_env() else { continue };
        let help = arg
            .get_long_help()
            .or_else(|| arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        // A default that is not a fixed value is written into the help text itself.
        let (help, default) = match help.split_once(" [default: ") {
            Some((text, rest)) => (text.to_string(), rest.trim_end_matches(']').to_string()),
            None => {
                let values: Vec<String> = arg
                    .get_default_values()
                    .iter()
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect();
                let default = if values.is_empty() {
                    "none".to_string()
                } else {
                    values.join(",")
                };
                (help, default)
            }
        };
        let flag = arg.get_long().map(|l| format!("--{l}")).unwrap_or_default();
        out.push_str(&format!(
            "  {} ({flag}) [default: {default}]\n      {help}\n",
            env.to_string_lossy()
        ));
    }
    out
}

/// Parses the command line, with the settings listed in `tollgate --help`.
pub fn parse_cli() -> Cli {
    let matches = Cli::command().after_help(settings_help()).get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    Closed,
    Open,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The lease secrets: `TOLLGATE_LEASE_SECRET`, else derived from the encryption key (which
/// every replica shares already), else random (with a warning at start-up: ids then open only
/// in this process, until it restarts).
fn lease_secrets(raw: &RawSettings) -> Result<LeaseSecrets, ConfigError> {
    use base64::Engine as _;
    let given = |name: &'static str, v: &Option<String>| match v.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) if s.len() < 32 => Err(bad(name, "must be at least 32 characters")),
        Some(s) => Ok(Some(s.as_bytes().to_vec())),
    };
    let previous = given("TOLLGATE_LEASE_SECRET_PREVIOUS", &raw.lease_secret_previous)?;
    if let Some(current) = given("TOLLGATE_LEASE_SECRET", &raw.lease_secret)? {
        return Ok(LeaseSecrets::new(&current, previous.as_deref()));
    }
    let encryption_key = raw
        .encryption_key
        .as_deref()
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .and_then(|k| base64::engine::general_purpose::STANDARD.decode(k).ok());
    Ok(match encryption_key {
        Some(k) => LeaseSecrets::derived_from(&k, previous.as_deref()),
        None => LeaseSecrets::random(),
    })
}

/// Checked settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// One URL, or several for cluster mode.
    pub redis_urls: Vec<String>,
    pub database_url: Secret,
    pub redis_namespace: String,
    pub admin_token: Option<Secret>,
    pub encryption_key: Option<EncryptionKey>,
    /// What lease ids are sealed with (`hot::lease_id`).
    pub lease_secrets: LeaseSecrets,
    pub key_prefix: String,
    pub rate_window: Duration,
    pub lease_ttl: Duration,
    pub fail_mode: FailMode,
    /// How admissions write a lease's hold (`hot::admission::StateFormat`).
    pub state_format: StateFormat,
    /// `None`: the sweeper is off.
    pub cleanup_interval: Option<Duration>,
    pub auto_delete_expired: bool,
    pub redis_timeout: Duration,
    /// Per listener: header, body and idle timeouts, connection cap (`http::serve`).
    pub connections: ConnectionLimits,
    pub log_format: LogFormat,
    pub inference: Inference,
    pub sync_consumer: Option<String>,
    pub sync_claim_idle: Duration,
    /// Whether this process runs the usage syncer. Off on a sidecar whose namespace is synced
    /// by other processes: it then never puts Postgres inserts on the host of the hot path,
    /// and a fleet of sidecars does not poll the usage streams once per replica.
    pub sync_enabled: bool,
    /// The lease of a subrequest that names none.
    pub subrequest_lease_ttl: LeaseTerm,
    /// Where the access-log receiver listens (UDP and TCP); `None`: off.
    pub access_log_listen: Option<SocketAddr>,
    /// What settlements without a cost are priced with.
    pub prices: Prices,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid setting {name}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

fn bad(name: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        name,
        reason: reason.into(),
    }
}

fn flag(name: &'static str, text: &str) -> Result<bool, ConfigError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        other => Err(bad(name, format!("{other:?}: expected true or false"))),
    }
}

fn positive_seconds(name: &'static str, text: &str, allow_zero: bool) -> Result<u64, ConfigError> {
    let n: u64 = text
        .trim()
        .parse()
        .map_err(|_| bad(name, format!("{text:?} is not a whole number of seconds")))?;
    if n == 0 && !allow_zero {
        return Err(bad(name, "must be at least 1"));
    }
    if n > 366 * 24 * 3600 {
        return Err(bad(name, "must be at most a year"));
    }
    Ok(n)
}

/// The serve loop's settings. A header or body timeout is meant to be short (an honest
/// client sends a request at once), so they are capped at an hour.
fn connection_limits(raw: &RawSettings) -> Result<ConnectionLimits, ConfigError> {
    let short = |name: &'static str, text: &str| {
        let n = positive_seconds(name, text, false)?;
        if n > 3600 {
            return Err(bad(name, "must be at most 3600 seconds"));
        }
        Ok(Duration::from_secs(n))
    };
    let max_connections = raw
        .max_connections
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=1_000_000).contains(n))
        .ok_or_else(|| bad("TOLLGATE_MAX_CONNECTIONS", "1 to 1000000"))?;
    Ok(ConnectionLimits {
        header_timeout: short(
            "TOLLGATE_HEADER_TIMEOUT_SECONDS",
            &raw.header_timeout_seconds,
        )?,
        body_timeout: short("TOLLGATE_BODY_TIMEOUT_SECONDS", &raw.body_timeout_seconds)?,
        idle_timeout: Duration::from_secs(positive_seconds(
            "TOLLGATE_IDLE_TIMEOUT_SECONDS",
            &raw.idle_timeout_seconds,
            false,
        )?),
        max_connections,
    })
}

impl Config {
    pub fn from_raw(raw: &RawSettings) -> Result<Config, ConfigError> {
        let listen = raw.listen.parse().map_err(|_| {
            bad(
                "TOLLGATE_LISTEN",
                format!("{:?} is not host:port", raw.listen),
            )
        })?;
        let admin_listen = raw.admin_listen.parse().map_err(|_| {
            bad(
                "TOLLGATE_ADMIN_LISTEN",
                format!("{:?} is not host:port", raw.admin_listen),
            )
        })?;
        let redis_urls: Vec<String> = raw
            .redis_url
            .split(',')
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if redis_urls.is_empty() {
            return Err(bad("TOLLGATE_REDIS_URL", "no URL given"));
        }
        for url in &redis_urls {
            redis::parse_redis_url(url)
                .filter(|u| matches!(u.scheme(), "redis" | "rediss"))
                .ok_or_else(|| bad("TOLLGATE_REDIS_URL", "not a redis:// URL"))?;
        }
        // sqlx reads any scheme as Postgres: `mysql://host/x` would create and migrate `x`.
        let scheme = raw.database_url.trim().split_once("://").map(|(s, _)| s);
        if !matches!(scheme, Some("postgres" | "postgresql")) {
            return Err(bad("TOLLGATE_DATABASE_URL", "not a postgres:// URL"));
        }
        let db: sqlx::postgres::PgConnectOptions = raw
            .database_url
            .trim()
            .parse()
            .map_err(|_| bad("TOLLGATE_DATABASE_URL", "not a postgres:// URL"))?;
        drop(db);
        let ns = raw.redis_namespace.trim();
        if ns.is_empty()
            || ns.len() > 64
            || !ns
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return Err(bad(
                "TOLLGATE_REDIS_NAMESPACE",
                "1-64 characters of [A-Za-z0-9-_.:]",
            ));
        }
        let admin_token = match raw.admin_token.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(t) if t.len() < 16 => {
                return Err(bad(
                    "TOLLGATE_ADMIN_TOKEN",
                    "must be at least 16 characters",
                ))
            }
            Some(t) => Some(Secret::new(t)),
        };
        let encryption_key = match raw.encryption_key.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(k) => Some(
                EncryptionKey::from_base64(k)
                    .map_err(|e| bad("TOLLGATE_ENCRYPTION_KEY", e.to_string()))?,
            ),
        };
        let lease_secrets = lease_secrets(raw)?;
        let prefix = raw.key_prefix.trim();
        if prefix.is_empty()
            || prefix.len() > 16
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(bad(
                "TOLLGATE_KEY_PREFIX",
                "1-16 characters of [A-Za-z0-9_]",
            ));
        }
        let fail_mode = match raw.fail_mode.trim().to_ascii_lowercase().as_str() {
            "closed" => FailMode::Closed,
            "open" => FailMode::Open,
            other => {
                return Err(bad(
                    "TOLLGATE_FAIL_MODE",
                    format!("{other:?}: expected closed or open"),
                ))
            }
        };
        let state_format = match raw.state_format.trim() {
            "1" => StateFormat::One,
            "2" => StateFormat::Two,
            other => {
                return Err(bad(
                    "TOLLGATE_STATE_FORMAT",
                    format!("{other:?}: expected 1 or 2"),
                ))
            }
        };
        let auto_delete_expired = flag("TOLLGATE_AUTO_DELETE_EXPIRED", &raw.auto_delete_expired)?;
        let sync_enabled = flag("TOLLGATE_SYNC_ENABLED", &raw.sync_enabled)?;
        let log_format = match raw.log_format.trim().to_ascii_lowercase().as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(bad(
                    "TOLLGATE_LOG_FORMAT",
                    format!("{other:?}: expected text or json"),
                ))
            }
        };
        let cleanup = positive_seconds(
            "TOLLGATE_CLEANUP_INTERVAL_SECONDS",
            &raw.cleanup_interval_seconds,
            true,
        )?;
        let timeout_ms: u64 = raw
            .redis_timeout_ms
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=60_000).contains(n))
            .ok_or_else(|| bad("TOLLGATE_REDIS_TIMEOUT_MS", "1 to 60000 milliseconds"))?;
        let connections = connection_limits(raw)?;
        let inference = match raw.inference_rules.as_deref().map(str::trim) {
            None | Some("") => Inference::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    bad(
                        "TOLLGATE_INFERENCE_RULES",
                        format!("cannot read {path}: {e}"),
                    )
                })?;
                Inference::with_extra_json(&text)
                    .map_err(|e| bad("TOLLGATE_INFERENCE_RULES", e.to_string()))?
            }
        };
        let sync_consumer = raw
            .sync_consumer
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let claim_idle = positive_seconds(
            "TOLLGATE_SYNC_CLAIM_IDLE_SECONDS",
            &raw.sync_claim_idle_seconds,
            false,
        )?;
        let subrequest_lease_ttl = raw
            .subrequest_lease_ttl_seconds
            .trim()
            .parse()
            .ok()
            .and_then(LeaseTerm::seconds)
            .ok_or_else(|| {
                bad(
                    "TOLLGATE_SUBREQUEST_LEASE_TTL_SECONDS",
                    format!("1 to {} seconds", LeaseTerm::MAX_SECONDS),
                )
            })?;
        let access_log_listen = match raw.access_log_listen.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(addr) => Some(addr.parse().map_err(|_| {
                bad(
                    "TOLLGATE_ACCESS_LOG_LISTEN",
                    format!("{addr:?} is not host:port"),
                )
            })?),
        };
        let prices = match raw.prices_file.as_deref().map(str::trim) {
            None | Some("") => Prices::builtin(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| bad("TOLLGATE_PRICES_FILE", format!("cannot read {path}: {e}")))?;
                Prices::with_file(&text)
                    .map_err(|e| bad("TOLLGATE_PRICES_FILE", format!("{path}: {e}")))?
            }
        };
        Ok(Config {
            prices,
            subrequest_lease_ttl,
            access_log_listen,
            inference,
            sync_consumer,
            sync_claim_idle: Duration::from_secs(claim_idle),
            sync_enabled,
            listen,
            admin_listen,
            redis_urls,
            database_url: Secret::new(raw.database_url.trim()),
            redis_namespace: ns.to_string(),
            admin_token,
            encryption_key,
            lease_secrets,
            key_prefix: prefix.to_string(),
            rate_window: Duration::from_secs(positive_seconds(
                "TOLLGATE_RATE_WINDOW_SECONDS",
                &raw.rate_window_seconds,
                false,
            )?),
            lease_ttl: Duration::from_secs(positive_seconds(
                "TOLLGATE_LEASE_TTL_SECONDS",
                &raw.lease_ttl_seconds,
                false,
            )?),
            fail_mode,
            state_format,
            cleanup_interval: (cleanup > 0).then(|| Duration::from_secs(cleanup)),
            auto_delete_expired,
            redis_timeout: Duration::from_millis(timeout_ms),
            connections,
            log_format,
        })
    }

    /// Builds a config from `TOLLGATE_*` names, as if they were flags; defaults fill the rest.
    /// Only the map is read, never the process environment, so tests cannot leak into
    /// each other.
    pub fn from_map(map: &HashMap<&str, String>) -> Result<Config, ConfigError> {
        let get = |name: &str, default: &str| {
            map.get(name)
                .cloned()
                .unwrap_or_else(|| default.to_string())
        };
        let raw = RawSettings {
            listen: get("TOLLGATE_LISTEN", "127.0.0.1:8080"),
            admin_listen: get("TOLLGATE_ADMIN_LISTEN", "127.0.0.1:8081"),
            redis_url: get("TOLLGATE_REDIS_URL", "redis://127.0.0.1:6379"),
            database_url: get("TOLLGATE_DATABASE_URL", "postgres://localhost/tollgate"),
            redis_namespace: get("TOLLGATE_REDIS_NAMESPACE", "tollgate"),
            admin_token: map.get("TOLLGATE_ADMIN_TOKEN").cloned(),
            encryption_key: map.get("TOLLGATE_ENCRYPTION_KEY").cloned(),
            lease_secret: map.get("TOLLGATE_LEASE_SECRET").cloned(),
            lease_secret_previous: map.get("TOLLGATE_LEASE_SECRET_PREVIOUS").cloned(),
            key_prefix: get("TOLLGATE_KEY_PREFIX", "sk"),
            rate_window_seconds: get("TOLLGATE_RATE_WINDOW_SECONDS", "60"),
            lease_ttl_seconds: get("TOLLGATE_LEASE_TTL_SECONDS", "600"),
            fail_mode: get("TOLLGATE_FAIL_MODE", "closed"),
            state_format: get("TOLLGATE_STATE_FORMAT", "1"),
            cleanup_interval_seconds: get("TOLLGATE_CLEANUP_INTERVAL_SECONDS", "300"),
            auto_delete_expired: get("TOLLGATE_AUTO_DELETE_EXPIRED", "false"),
            redis_timeout_ms: get("TOLLGATE_REDIS_TIMEOUT_MS", "250"),
            header_timeout_seconds: get("TOLLGATE_HEADER_TIMEOUT_SECONDS", "10"),
            body_timeout_seconds: get("TOLLGATE_BODY_TIMEOUT_SECONDS", "30"),
            idle_timeout_seconds: get("TOLLGATE_IDLE_TIMEOUT_SECONDS", "3660"),
            max_connections: get("TOLLGATE_MAX_CONNECTIONS", "10000"),
            log_format: get("TOLLGATE_LOG_FORMAT", "text"),
            inference_rules: map.get("TOLLGATE_INFERENCE_RULES").cloned(),
            sync_consumer: map.get("TOLLGATE_SYNC_CONSUMER").cloned(),
            sync_claim_idle_seconds: get("TOLLGATE_SYNC_CLAIM_IDLE_SECONDS", "15"),
            sync_enabled: get("TOLLGATE_SYNC_ENABLED", "true"),
            subrequest_lease_ttl_seconds: get("TOLLGATE_SUBREQUEST_LEASE_TTL_SECONDS", "60"),
            access_log_listen: map.get("TOLLGATE_ACCESS_LOG_LISTEN").cloned(),
            prices_file: map.get("TOLLGATE_PRICES_FILE").cloned(),
        };
        Config::from_raw(&raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_contracts() {
        let c = Config::from_map(&HashMap::new()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:8081");
        assert_eq!(c.redis_urls, vec!["redis://127.0.0.1:6379"]);
        assert_eq!(c.rate_window, Duration::from_secs(60));
        assert_eq!(c.lease_ttl, Duration::from_secs(600));
        assert_eq!(c.fail_mode, FailMode::Closed);
        assert_eq!(c.state_format, StateFormat::One);
        assert_eq!(c.cleanup_interval, Some(Duration::from_secs(300)));
        assert!(!c.auto_delete_expired);
        assert!(c.sync_enabled);
        assert!(c.admin_token.is_none() && c.encryption_key.is_none());
        assert_eq!(c.connections.header_timeout, Duration::from_secs(10));
        assert_eq!(c.connections.body_timeout, Duration::from_secs(30));
        assert_eq!(c.connections.idle_timeout, Duration::from_secs(3660));
        assert_eq!(c.connections.max_connections, 10_000);
        assert_eq!(
            c.subrequest_lease_ttl,
            LeaseTerm::Ttl(Duration::from_secs(60))
        );
        assert_eq!(c.access_log_listen, None);
    }

    #[test]
    fn bad_settings_name_the_variable() {
        for (name, value) in [
            ("TOLLGATE_LISTEN", "nope"),
            ("TOLLGATE_REDIS_URL", "http://x"),
            ("TOLLGATE_DATABASE_URL", "mysql://x"),
            ("TOLLGATE_ENCRYPTION_KEY", "c2hvcnQ="),
            ("TOLLGATE_FAIL_MODE", "ajar"),
            ("TOLLGATE_STATE_FORMAT", "3"),
            ("TOLLGATE_STATE_FORMAT", "two"),
            ("TOLLGATE_RATE_WINDOW_SECONDS", "0"),
            ("TOLLGATE_AUTO_DELETE_EXPIRED", "maybe"),
            ("TOLLGATE_SYNC_ENABLED", "off-ish"),
            ("TOLLGATE_HEADER_TIMEOUT_SECONDS", "0"),
            ("TOLLGATE_BODY_TIMEOUT_SECONDS", "3601"),
            ("TOLLGATE_IDLE_TIMEOUT_SECONDS", "soon"),
            ("TOLLGATE_MAX_CONNECTIONS", "0"),
            ("TOLLGATE_SUBREQUEST_LEASE_TTL_SECONDS", "0"),
            ("TOLLGATE_SUBREQUEST_LEASE_TTL_SECONDS", "86401"),
            ("TOLLGATE_ACCESS_LOG_LISTEN", "5140"),
            ("TOLLGATE_PRICES_FILE", "/nonexistent/prices.json"),
        ] {
            let err = Config::from_map(&HashMap::from([(name, value.to_string())])).unwrap_err();
            assert_eq!(err.name, name, "{value}");
        }
    }

    #[test]
    fn several_urls_mean_cluster_and_zero_disables_sweeper() {
        let c = Config::from_map(&HashMap::from([
            ("TOLLGATE_REDIS_URL", "redis://a:1, redis://b:2".to_string()),
            ("TOLLGATE_CLEANUP_INTERVAL_SECONDS", "0".to_string()),
        ]))
        .unwrap();
        assert_eq!(c.redis_urls.len(), 2);
        assert_eq!(c.cleanup_interval, None);
    }

    #[test]
    fn state_format_two_is_asked_for_by_number() {
        let c = Config::from_map(&HashMap::from([(
            "TOLLGATE_STATE_FORMAT",
            " 2 ".to_string(),
        )]))
        .unwrap();
        assert_eq!(c.state_format, StateFormat::Two);
    }

    #[test]
    fn sync_can_be_left_to_other_processes() {
        for (text, on) in [
            ("false", false),
            (" No ", false),
            ("0", false),
            ("TRUE", true),
        ] {
            let c = Config::from_map(&HashMap::from([(
                "TOLLGATE_SYNC_ENABLED",
                text.to_string(),
            )]))
            .unwrap();
            assert_eq!(c.sync_enabled, on, "{text:?}");
        }
    }

    #[test]
    fn secrets_never_print() {
        let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [1u8; 32]);
        let c = Config::from_map(&HashMap::from([
            (
                "TOLLGATE_ADMIN_TOKEN",
                "super-secret-admin-token".to_string(),
            ),
            ("TOLLGATE_ENCRYPTION_KEY", key.clone()),
        ]))
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("super-secret-admin-token"));
        assert!(!shown.contains(&key));
    }
}
