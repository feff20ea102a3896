//! Postgres bring-up: what `serve` does with Postgres, in the background, so that serving never waits for it.
//!
//! Admissions, settlements and releases need only Redis (contract v1.1, section 3), so the
//! listeners serve from the start. This task creates the database if needed and applies the
//! migrations, retrying for as long as Postgres cannot be reached; then it flips
//! [`PgReady`](crate::store::PgReady) (the admin API and the usage sync's writes wait for it),
//! loads the keys into an empty namespace, and starts the reconciler and the sweeper.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::http::AppState;
use crate::store;
use crate::sync;

/// How long start-up spends loading keys into an empty namespace before going on anyway.
const RELOAD_AT_START: Duration = Duration::from_secs(30);
/// Bound of creating the database: a handful of round trips, unless Postgres is silent.
const ENSURE_BOUND: Duration = Duration::from_secs(10);
/// Bound of applying the migrations: generous, since a migration may rewrite a big table and
/// replicas wait for each other's on the advisory lock; what it catches is a silent Postgres.
const MIGRATE_BOUND: Duration = Duration::from_secs(300);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(5);

async fn attempt(state: &AppState) -> Result<(), String> {
    let url = state.config.database_url.expose();
    match tokio::time::timeout(ENSURE_BOUND, store::ensure_database(url)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(detail(&e)),
        Err(_) => return Err(format!("no answer within {ENSURE_BOUND:?}")),
    }
    match tokio::time::timeout(MIGRATE_BOUND, store::migrate(&state.db)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(detail(&e)),
        Err(_) => Err(format!("migrations got no answer within {MIGRATE_BOUND:?}")),
    }
}

fn detail(e: &store::StoreError) -> String {
    std::error::Error::source(e)
        .map(|s| format!("{e}: {s}"))
        .unwrap_or_else(|| e.to_string())
}

/// Brings Postgres up, then starts what needs it; returns those tasks' handles (none if
/// `stop` came first), for the shutdown to wait on.
pub async fn postgres(
    state: Arc<AppState>,
    mut stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut wait = FIRST_RETRY;
    loop {
        match attempt(&state).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?wait, "postgres not ready; serving from redis meanwhile")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return Vec::new(),
        }
        wait = (wait * 2).min(LAST_RETRY);
    }
    state.postgres.set_ready();
    tracing::info!(
        "postgres ready: migrations applied; admin API, usage sync, reconciler and sweeper on"
    );
    // A namespace with no state yet (first start, or Redis lost everything) gets every key
    // before relying on throttled cache misses. Bounded, so a Redis outage does not hold it
    // up; the reconciler retries.
    match tokio::time::timeout(RELOAD_AT_START, state.key_state.reload_if_wiped()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not load keys into redis at start"),
        Err(_) => tracing::warn!("loading keys into redis at start timed out; continuing"),
    }
    let mut tasks = vec![tokio::spawn(sync::reconcile::run(
        state.key_state.clone(),
        state.metrics.clone(),
        stop.clone(),
    ))];
    if let Some(every) = state.config.cleanup_interval {
        tasks.push(tokio::spawn(sync::sweeper::run(
            state.key_state.clone(),
            every,
            state.config.auto_delete_expired,
            stop,
        )));
    }
    tasks
}
