//! Postgres through sqlx: the durable home of keys, usage, balances and statistics. Never on
//! the hot path — admission reads it only on a Redis miss.
//!
//! - [`keys`]: API keys, admin writes, the balance ledger, expiry
//! - [`usage`]: batched, idempotent insertion of usage events (used by `sync`)
//! - [`stats`]: per-key statistics from the daily roll-up plus the raw rows at range edges

pub mod keys;
pub mod stats;
pub mod usage;

use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error")]
    Query(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// A call that got no answer within `bound`: its connection is presumed dead.
    pub fn no_answer(bound: Duration) -> StoreError {
        StoreError::Unavailable(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from postgres within {bound:?}"),
        )))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_) => StoreError::Unavailable(e),
            other => StoreError::Query(other),
        }
    }
}

/// How the usage sync's connection is named in `pg_stat_activity` (unless the URL names it).
pub const SYNC_APPLICATION_NAME: &str = "tollgate-sync";

/// The pool for everything but the usage sync: key look-ups on a Redis miss, admin calls, the
/// reconciler and the sweeper. Connections are made lazily: a replica starts, and keeps
/// admitting from Redis, while Postgres is down.
pub async fn connect(url: &str) -> Result<PgPool, StoreError> {
    pool(url, 16, "tollgate")
}

/// The usage sync's own pool of one connection, so its one insert per pass always runs on the
/// same Postgres backend. Taken from the shared pool, the inserts went round every idle
/// connection (sqlx hands them out in turn), and each backend faulted in the same buffers and
/// working memory for itself: 2.7 times the page faults, and on the measured VM a 10–15 %
/// higher admission p99 (docs/PERFORMANCE.md). Apart, admin bursts and the sync also never
/// wait for each other's connections. The syncer holds the connection between its writes and
/// bounds each of them (`sync::usage::Syncer::write`).
pub fn connect_usage_sync(url: &str) -> Result<PgPool, StoreError> {
    pool(url, 1, SYNC_APPLICATION_NAME)
}

fn pool(url: &str, max: u32, name: &str) -> Result<PgPool, StoreError> {
    let mut options: PgConnectOptions = url.parse().map_err(StoreError::Query)?;
    if options.get_application_name().is_none() {
        options = options.application_name(name);
    }
    Ok(PgPoolOptions::new()
        .max_connections(max)
        .min_connections(0)
        .acquire_timeout(Duration::from_secs(2))
        .idle_timeout(Duration::from_secs(300))
        .connect_lazy_with(options))
}

/// Creates the database if needed. Several replicas may race here: losing the race is fine.
pub async fn ensure_database(url: &str) -> Result<(), StoreError> {
    if Postgres::database_exists(url).await? {
        return Ok(());
    }
    match Postgres::create_database(url).await {
        Ok(()) => Ok(()),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => Ok(()),
        // A concurrent CREATE DATABASE can also collide on the catalog's unique index.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Applies pending migrations. sqlx holds a Postgres advisory lock meanwhile, so replicas
/// starting together apply each migration once.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
