//! Key state from Postgres into Redis, as one service: the push after each admin write, the
//! drop of a deleted key, the reload of a namespace Redis lost, the reconciliation of pushes
//! that did not happen (Redis down, or tollgate killed between the Postgres commit and the
//! Redis write), the expired-key sweep, and whether the namespace is loaded. The admin API and
//! the background loops in `sync/` call it; neither reaches into the hot path. Pushes are
//! version-guarded in hydrate.lua, so repeating one, or racing another, never installs an
//! older configuration or balance. Every Postgres call is bounded (`store::bounded`): a
//! connection gone silent costs one bound, not the caller.

use sqlx::PgPool;

use crate::hot::admission::HotPath;
use crate::hot::redis::RedisFailure;
use crate::metrics::Metrics;
use crate::store::keys::{self, cleanup_expired, Expired, KeyRow};
use crate::store::{self, StoreError};

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

#[derive(Clone)]
pub struct KeyState {
    hot: HotPath,
    db: PgPool,
    metrics: Metrics,
}

impl KeyState {
    pub fn new(hot: HotPath, db: PgPool, metrics: Metrics) -> Self {
        KeyState { hot, db, metrics }
    }

    /// Whether the namespace's `loaded` marker is present (Redis holds every key); `None`
    /// when Redis does not answer.
    pub async fn loaded(&self) -> Option<bool> {
        let mut exists = redis::cmd("EXISTS");
        exists.arg(self.hot.layout.loaded_marker());
        match self.hot.redis.query(&exists).await {
            Ok(redis::Value::Int(n)) => Some(n == 1),
            _ => None,
        }
    }

    /// Writes a key's current row into Redis and records that Redis has this version.
    /// Returns whether Redis took it; if not, the reconciler will try again.
    pub async fn push(&self, row: &KeyRow) -> bool {
        match self.hot.hydrate(row).await {
            Ok(()) => {
                let (id, version) = (row.id, row.version);
                let marked = store::bounded(&self.db, store::ADMIN_BOUND, move |c| {
                    Box::pin(keys::mark_pushed(c, id, version))
                })
                .await;
                if let Err(e) = marked {
                    tracing::warn!(key_id = %row.id, error = %e, "could not record push");
                }
                true
            }
            Err(e) => {
                self.metrics.redis_error(e.kind());
                tracing::warn!(key_id = %row.id, error = %e, "redis push deferred to the reconciler");
                false
            }
        }
    }

    /// One reconciliation pass; returns how many keys were pushed.
    pub async fn reconcile_once(&self) -> Result<usize, StoreError> {
        let rows = store::bounded(&self.db, store::BACKGROUND_BOUND, |c| {
            Box::pin(keys::unpushed(c, 500))
        })
        .await?;
        let mut pushed = 0;
        for row in &rows {
            if self.push(row).await {
                pushed += 1;
            }
        }
        if pushed > 0 {
            tracing::info!(pushed, "reconciled key state into redis");
        }
        Ok(pushed)
    }

    /// If the namespace lost its state (a Redis restart without persistence, a failover to an
    /// empty replica, a flush), writes every key from Postgres back into Redis at once, instead of
    /// leaving each to a cache miss (which is throttled, to protect Postgres from unknown-key
    /// floods). The namespace's `loaded` marker says the load is done; the `loading` lock, held
    /// with a TTL, keeps replicas from all reloading at once (see `Layout::loaded_marker`).
    /// Returns how many keys were written.
    pub async fn reload_if_wiped(&self) -> Result<usize, ReloadError> {
        let hot = &self.hot;
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
        let loaded = match self.load_all().await {
            Ok(n) => n,
            Err(e) => {
                // Free the lock at once: held for its whole TTL it would stop every reload for
                // a minute, so a Redis that came back empty while Postgres was away stayed
                // without its `loaded` marker (plain /readyz then needing Postgres again) long
                // after Postgres returned. The TTL is only for a replica that dies while
                // loading. (Found by `loadtest faults`.)
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
    async fn load_all(&self) -> Result<usize, ReloadError> {
        let (hot, db) = (&self.hot, &self.db);
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
                pushes
                    .spawn(async move { hot.hydrate(&row).await.map(|()| (row.id, row.version)) });
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

    /// Deletes or disables expired keys and brings Redis in line; returns how many were cleaned.
    pub async fn sweep(&self, default_delete: bool) -> Result<usize, StoreError> {
        // Bounded: a sweep stuck on a silent connection would stop every later sweep.
        let cleaned = store::bounded(&self.db, store::BACKGROUND_BOUND, move |c| {
            Box::pin(cleanup_expired(c, default_delete))
        })
        .await?;
        for c in &cleaned {
            match c {
                Expired::Deleted(row) => {
                    if let Err(e) = self.hot.forget(&row.key_hash).await {
                        // Its Redis state still says "expired", so it admits nothing meanwhile.
                        tracing::warn!(key_id = %row.id, error = %e, "could not drop redis state of a deleted key");
                    }
                    tracing::info!(key_id = %row.id, "expired key deleted");
                }
                Expired::Disabled(row) => {
                    self.push(row).await;
                    tracing::info!(key_id = %row.id, "expired key disabled");
                }
            }
        }
        Ok(cleaned.len())
    }
}
