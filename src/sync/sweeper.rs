//! The expired-key sweeper: the same clean-up as `POST /admin/keys/cleanup-expired`, run every
//! `TOLLGATE_CLEANUP_INTERVAL_SECONDS` by each replica (the SQL is safe to run concurrently: a
//! row is deleted or disabled once).

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;

use super::reconcile::push;
use crate::hot::admission::HotPath;
use crate::metrics::Metrics;
use crate::store::keys::{cleanup_expired, Expired};
use crate::store::{self, StoreError};

/// Deletes or disables expired keys and brings Redis in line; returns how many were cleaned.
pub async fn sweep(
    hot: &HotPath,
    db: &PgPool,
    metrics: &Metrics,
    default_delete: bool,
) -> Result<usize, StoreError> {
    // Bounded: a sweep stuck on a silent connection would stop every later sweep.
    let cleaned = store::bounded(db, store::BACKGROUND_BOUND, move |c| {
        Box::pin(cleanup_expired(c, default_delete))
    })
    .await?;
    for c in &cleaned {
        match c {
            Expired::Deleted(row) => {
                if let Err(e) = hot.forget(&row.key_hash).await {
                    // Its Redis state still says "expired", so it admits nothing meanwhile.
                    tracing::warn!(key_id = %row.id, error = %e, "could not drop redis state of a deleted key");
                }
                tracing::info!(key_id = %row.id, "expired key deleted");
            }
            Expired::Disabled(row) => {
                push(hot, db, metrics, row).await;
                tracing::info!(key_id = %row.id, "expired key disabled");
            }
        }
    }
    Ok(cleaned.len())
}

pub async fn run(
    hot: HotPath,
    db: PgPool,
    metrics: Metrics,
    every: Duration,
    default_delete: bool,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        match sweep(&hot, &db, &metrics, default_delete).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(cleaned = n, "expired keys swept"),
            Err(e) => tracing::warn!(error = %e, "expired-key sweep failed"),
        }
    }
}
