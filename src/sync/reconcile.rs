//! Key state from Postgres to Redis: the push after each admin write, and the reconciler that
//! retries pushes that did not happen (Redis down, or tollgate killed between the Postgres
//! commit and the Redis write). Pushes are version-guarded in hydrate.lua, so repeating one,
//! or racing another, never installs an older configuration or balance. Every Postgres call is
//! bounded (`store::bounded`): a connection gone silent costs one bound, not the reconciler.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;

use crate::hot::admission::HotPath;
use crate::hot::redis::RedisFailure;
use crate::metrics::Metrics;
use crate::store::keys::{self, KeyRow};
use crate::store::{self, StoreError};

const EVERY: Duration = Duration::from_secs(2);

/// Writes a key's current row into Redis and records that Redis has this version.
/// Returns whether Redis took it; if not, the reconciler will try again.
pub async fn push(hot: &HotPath, db: &PgPool, metrics: &Metrics, row: &KeyRow) -> bool {
    match hot.hydrate(row).await {
        Ok(()) => {
            let (id, version) = (row.id, row.version);
            let marked = store::bounded(db, store::ADMIN_BOUND, move |c| {
                Box::pin(keys::mark_pushed(c, id, version))
            })
            .await;
            if let Err(e) = marked {
                tracing::warn!(key_id = %row.id, error = %e, "could not record push");
            }
            true
        }
        Err(e) => {
            metrics.redis_error(e.kind());
            tracing::warn!(key_id = %row.id, error = %e, "redis push deferred to the reconciler");
            false
        }
    }
}

/// One reconciliation pass; returns how many keys were pushed.
pub async fn reconcile_once(
    hot: &HotPath,
    db: &PgPool,
    metrics: &Metrics,
) -> Result<usize, StoreError> {
    let rows = store::bounded(db, store::BACKGROUND_BOUND, |c| {
        Box::pin(keys::unpushed(c, 500))
    })
    .await?;
    let mut pushed = 0;
    for row in &rows {
        if push(hot, db, metrics, row).await {
            pushed += 1;
        }
    }
    if pushed > 0 {
        tracing::info!(pushed, "reconciled key state into redis");
    }
    Ok(pushed)
}

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("redis: {0}")]
    Redis(#[from] RedisFailure),
    #[error("postgres: {0}")]
    Postgres(#[from] StoreError),
}

/// Keys pushed concurrently while reloading (one EVALSHA each, pipelined on the connection).
const RELOAD_BATCH: i64 = 500;

/// If the namespace lost its state (a Redis restart without persistence, a failover to an
/// empty replica, a flush), writes every key from Postgres back into Redis at once, instead of
/// leaving each to a cache miss (which is throttled, to protect Postgres from unknown-key
/// floods). The namespace's `loaded` marker says the load is done; the `loading` lock, held
/// with a TTL, keeps replicas from all reloading at once (see `Layout::loaded_marker`). Returns how many keys were written.
pub async fn reload_if_wiped(hot: &HotPath, db: &PgPool) -> Result<usize, ReloadError> {
    let (marker, lock) = (hot.layout.loaded_marker(), hot.layout.loading_lock());
    let mut exists = redis::cmd("EXISTS");
    exists.arg(&marker);
    if hot.redis.query(&exists).await? == redis::Value::Int(1) {
        return Ok(0);
    }
    let mut take = redis::cmd("SET");
    take.arg(&lock).arg("1").arg("NX").arg("PX").arg(60_000);
    if hot.redis.query(&take).await? == redis::Value::Nil {
        return Ok(0);
    }
    let loaded = match load_all(hot, db).await {
        Ok(n) => n,
        Err(e) => {
            // Free the lock at once: held for its whole TTL it would stop every reload for a
            // minute, so a Redis that came back empty while Postgres was away stayed without
            // its `loaded` marker (plain /readyz then needing Postgres again) long after
            // Postgres returned. The TTL is only for a replica that dies while loading.
            let mut release = redis::cmd("DEL");
            release.arg(&lock);
            let _ = hot.redis.query(&release).await;
            return Err(e);
        }
    };
    let mut mark = redis::cmd("SET");
    mark.arg(&marker).arg("1");
    hot.redis.query(&mark).await?;
    let mut release = redis::cmd("DEL");
    release.arg(&lock);
    hot.redis.query(&release).await?;
    tracing::info!(
        keys = loaded,
        "redis state of the namespace (re)loaded from postgres"
    );
    Ok(loaded)
}

/// Writes every key from Postgres into Redis, page by page; how many were written.
async fn load_all(hot: &HotPath, db: &PgPool) -> Result<usize, ReloadError> {
    let mut loaded = 0;
    let mut after = None;
    loop {
        let rows = store::bounded(db, store::BACKGROUND_BOUND, move |c| {
            Box::pin(keys::page(c, after, RELOAD_BATCH))
        })
        .await?;
        let Some(last) = rows.last() else { break };
        after = Some(last.id);
        let mut pushes = tokio::task::JoinSet::new();
        for row in rows {
            let hot = hot.clone();
            pushes.spawn(async move { hot.hydrate(&row).await.map(|()| (row.id, row.version)) });
        }
        let mut pushed = Vec::new();
        while let Some(done) = pushes.join_next().await {
            if let Ok(r) = done {
                pushed.push(r?);
            }
        }
        let marked = pushed.len();
        store::bounded(db, store::BACKGROUND_BOUND, move |c| {
            Box::pin(async move { keys::mark_pushed_many(c, &pushed).await })
        })
        .await?;
        loaded += marked;
    }
    Ok(loaded)
}

pub async fn run(hot: HotPath, db: PgPool, metrics: Metrics, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = reload_if_wiped(&hot, &db).await {
            if let ReloadError::Redis(r) = &e {
                metrics.redis_error(r.kind());
            }
            tracing::debug!(error = %e, "namespace reload check failed");
        }
        if let Err(e) = reconcile_once(&hot, &db, &metrics).await {
            tracing::debug!(error = %e, "reconciler could not read postgres");
        }
    }
}
