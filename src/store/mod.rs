//! Postgres through sqlx: the durable home of keys, usage, balances and statistics. Never on
//! the hot path — admission reads it only on a Redis miss.
//!
//! - [`keys`]: API keys, admin writes, the balance ledger, expiry
//! - [`usage`]: batched, idempotent insertion of usage events (used by `sync`)
//! - [`stats`]: per-key statistics from the daily roll-up plus the raw rows at range edges

pub mod keys;
pub mod stats;
pub mod usage;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::watch;

pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

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
    pub(crate) fn no_answer(bound: Duration) -> StoreError {
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
/// working memory for itself: several times the page faults, and a higher admission p99
/// (docs/PERFORMANCE.md, "What was tried"). Apart, admin bursts and the sync also never
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

/// Bound of one admin call's Postgres work (every statement of the call, on one connection).
/// Admin statements take milliseconds; one that has no answer after this long is on a
/// connection that went silent (half-open after a failover, forgotten by a NAT).
pub const ADMIN_BOUND: Duration = Duration::from_secs(5);
/// Bound of one Postgres call of the reconciler, the sweeper or the start-up reload: larger
/// than [`ADMIN_BOUND`] because a sweep or a reload page may touch many rows.
pub const BACKGROUND_BOUND: Duration = Duration::from_secs(10);

/// Work on one connection, as [`bounded`] runs it.
pub(crate) type ConnWork<'c, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'c>>;

/// Runs `work` on a connection of `pool` within `bound`, the way [`keys::by_hash_within`]
/// bounds a look-up: a connection whose work overruns the bound is closed, not returned (sqlx
/// would ping it with no bound on its way back, and a silent one would keep its place in the
/// pool for good). The work runs in a task of its own, so that a caller dropped half-way (a
/// client that hangs up, the shutdown's bound) cannot send the connection back unchecked
/// either. The connection is acquired within the pool's acquire timeout.
pub async fn bounded<T, F>(pool: &PgPool, bound: Duration, work: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: for<'c> FnOnce(&'c mut PgConnection) -> ConnWork<'c, T> + Send + 'static,
{
    let pool = pool.clone();
    let task = tokio::spawn(async move {
        let mut conn = pool.acquire().await?;
        match tokio::time::timeout(bound, work(&mut conn)).await {
            Ok(done) => done,
            Err(_) => {
                conn.close_on_drop();
                Err(StoreError::no_answer(bound))
            }
        }
    });
    match task.await {
        Ok(done) => done,
        // Only a panic in the work (or a runtime shutting down) ends the task otherwise.
        Err(e) => Err(StoreError::Unavailable(sqlx::Error::Io(
            std::io::Error::other(e.to_string()),
        ))),
    }
}

/// Whether Postgres answers a trivial query within `bound`.
pub(crate) async fn ping(pool: &PgPool, bound: Duration) -> bool {
    let answered = bounded(pool, bound, |c| {
        Box::pin(async move {
            sqlx::query_scalar::<_, i32>("SELECT 1")
                .fetch_one(c)
                .await
                .map_err(StoreError::from)
        })
    });
    // The pool's acquire timeout is longer than a probe wants to wait.
    matches!(tokio::time::timeout(bound, answered).await, Ok(Ok(1)))
}

/// Whether the database exists and is migrated. It starts false and turns true once, when the
/// start-up's bring-up task has applied the migrations (`startup::postgres`); the admin API,
/// the usage sync's writes and the strict readiness probe wait for it. Clones share the state.
#[derive(Clone)]
pub struct PgReady(Arc<watch::Sender<bool>>);

impl Default for PgReady {
    fn default() -> Self {
        PgReady(Arc::new(watch::channel(false).0))
    }
}

impl PgReady {
    pub(crate) fn is_ready(&self) -> bool {
        *self.0.borrow()
    }

    pub fn set_ready(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once Postgres is ready.
    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|ready| *ready).await;
    }
}
