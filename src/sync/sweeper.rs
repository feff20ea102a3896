//! The expired-key sweeper: the same clean-up as `POST /admin/keys/cleanup-expired`, run every
//! `TOLLGATE_CLEANUP_INTERVAL_SECONDS` by each replica (the SQL is safe to run concurrently: a
//! row is deleted or disabled once).

use std::time::Duration;

use tokio::sync::watch;

use crate::key_state::KeyState;

pub async fn run(
    keys: KeyState,
    every: Duration,
    default_delete: bool,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        match keys.sweep(default_delete).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(cleaned = n, "expired keys swept"),
            Err(e) => tracing::warn!(error = %e, "expired-key sweep failed"),
        }
    }
}
