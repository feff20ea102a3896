//! The reconciler: every few seconds, reloads the namespace if Redis lost it and retries the
//! key pushes that did not happen (`KeyState`).

use std::time::Duration;

use tokio::sync::watch;

use crate::key_state::{KeyState, ReloadError};
use crate::metrics::Metrics;

const EVERY: Duration = Duration::from_secs(2);

pub async fn run(keys: KeyState, metrics: Metrics, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(EVERY) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = keys.reload_if_wiped().await {
            if let ReloadError::Redis(r) = &e {
                metrics.redis_error(r.kind());
            }
            tracing::debug!(error = %e, "namespace reload check failed");
        }
        if let Err(e) = keys.reconcile_once().await {
            tracing::debug!(error = %e, "reconciler could not read postgres");
        }
    }
}
