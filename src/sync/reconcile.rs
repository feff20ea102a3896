//! Key state from Postgres to Redis: the push after each admin write, and the reconciler that
//! retries pushes that did not happen (Redis down, or tollgate killed between the Postgres
//! commit and the Redis write). Pushes are version-guarded in hydrate.lua, so repeating one,
//! or racing another, never installs an older configuration or balance.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;

use crate::hot::admission::HotPath;
use crate::metrics::Metrics;
use crate::store::keys::{self, KeyRow};
use crate::store::StoreError;

const EVERY: Duration = Duration::from_secs(2);

/// Writes a key's current row into Redis and records that Redis has this version.
/// Returns whether Redis took it; if not, the reconciler will try again.
pub async fn push(hot: &HotPath, db: &PgPool, metrics: &Metrics, row: &KeyRow) -> bool {
    match hot.hydrate(row).await {
        Ok(()) => {
            if let Err(e) = keys::mark_pushed(db, row.id, row.version).await {
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
    let rows = keys::unpushed(db, 500).await?;
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

pub async fn run(hot: HotPath, db: PgPool, metrics: Metrics, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = reconcile_once(&hot, &db, &metrics).await {
            tracing::debug!(error = %e, "reconciler could not read postgres");
        }
    }
}
