//! Every Postgres call is bounded: an admin call, the sweeper and the reconciler get past a connection that goes silent mid-query, and the sync gauges keep moving while a sync write hangs.
//!
//! Postgres is reached through `common::silent_relay`, which silences the first connection
//! that sends a given statement, as a half-open connection after a failover would: the
//! client waits for an answer that never comes, with no error to wake it.

use crate::common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::process::{cleanup_state, TollgateProcess};
use common::silent_relay::SilentRelay;
use common::*;
use serde_json::{json, Value};

/// `TOLLGATE_DATABASE_URL` of `s` routed through `relay`.
fn through(relay: &SilentRelay, s: &mut HashMap<&'static str, String>) {
    let url = s["TOLLGATE_DATABASE_URL"].clone();
    s.insert("TOLLGATE_DATABASE_URL", relay.route(&url));
}

async fn poll_until<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_call_whose_connection_goes_silent_mid_query_answers_503_within_its_bound() {
    let relay = SilentRelay::silencing_first(b"FROM usage_daily WHERE key_id").await;
    let app = spawn_app_with(|s| through(&relay, s)).await;
    let (_, api_key) = app.create_key(json!({"user_id": "u-silent"})).await;
    let id = api_key["id"].as_str().expect("id").to_string();

    let started = Instant::now();
    let res = tokio::time::timeout(
        Duration::from_secs(20),
        app.admin_get(&format!("/admin/keys/{id}/stats")),
    )
    .await
    .expect("the stats call answers; version 1 waited for ever");
    let took = started.elapsed();
    assert_eq!(res.status(), 503);
    assert_eq!(
        res.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["code"], "unavailable", "{body}");
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(9),
        "answered after {took:?}, expected the 5 s bound"
    );
    assert!(relay.silent_connections() >= 1, "the query was cut off");

    // The silent connection was closed, not returned: the next call gets a good one.
    let res = app.admin_get(&format!("/admin/keys/{id}/stats")).await;
    assert_eq!(res.status(), 200);
    let res = app.admin_get(&format!("/admin/keys/{id}")).await;
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_gets_past_a_connection_that_goes_silent_mid_sweep() {
    let relay = SilentRelay::silencing_first(b"expires_at <= now() ORDER BY id FOR UPDATE").await;
    let app = spawn_app_with(|s| {
        through(&relay, s);
        s.insert("TOLLGATE_CLEANUP_INTERVAL_SECONDS", "1".into());
    })
    .await;
    let (key, api_key) = app.create_key(json!({"user_id": "u-sweep"})).await;
    let id = api_key["id"].as_str().expect("id").to_string();
    let res = app
        .admin_patch(
            &format!("/admin/keys/{id}"),
            json!({"expires_at": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    // The first sweep went silent; a bounded one gives up after 10 s and the next one runs.
    let swept = poll_until(Duration::from_secs(25), || async {
        let k: Value = app
            .admin_get(&format!("/admin/keys/{id}"))
            .await
            .json()
            .await
            .expect("json");
        k["is_active"] == false
    })
    .await;
    assert!(
        relay.silent_connections() >= 1,
        "the first sweep was cut off"
    );
    assert!(swept, "the expired key was never swept: the sweeper hangs");
    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_gets_past_a_connection_that_goes_silent_mid_pass() {
    let relay = SilentRelay::silencing_first(b"interval '2 seconds'").await;
    let app = spawn_app_with(|s| through(&relay, s)).await;
    let (key, api_key) = app.create_key(json!({"user_id": "u-reconcile"})).await;
    let id = api_key["id"].as_str().expect("id").to_string();
    // A write Redis never heard of (as if tollgate died between the commit and the push).
    sqlx::query(
        "UPDATE api_keys SET is_active = FALSE, version = version + 1, \
         updated_at = now() - interval '1 minute' WHERE id = $1::uuid",
    )
    .bind(&id)
    .execute(&app.db)
    .await
    .expect("update");
    let pushed = poll_until(Duration::from_secs(25), || async {
        app.admit(&key, json!({})).await.0 == 403
    })
    .await;
    assert!(
        relay.silent_connections() >= 1,
        "a reconciler pass was cut off"
    );
    assert!(
        pushed,
        "the unpushed write never reached redis: the reconciler hangs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_gauges_keep_moving_while_a_sync_write_hangs() {
    require_services().await;
    let relay = SilentRelay::silencing_first(b"INSERT INTO usage_events").await;
    let mut settings = base_settings();
    let plain = settings.clone();
    through(&relay, &mut settings);
    struct Cleanup(HashMap<&'static str, String>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            cleanup_state(&self.0);
        }
    }
    let _cleanup = Cleanup(plain);
    let p = TollgateProcess::start(&settings).await;
    let (key, _) = p
        .create_key(json!({"user_id": "u-gauge", "rate_limit": null, "concurrent_limit": null}))
        .await;
    let settle_one = || async {
        let (status, body) = p.admit(&key, json!({})).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = p
            .settle(body["lease_id"].as_str().expect("lease"), "0.01")
            .await;
        assert_eq!(status, 200, "{body}");
    };
    // The syncer's first write goes silent (and stays so for its 30 s bound).
    settle_one().await;
    assert!(
        poll_until(Duration::from_secs(10), || async {
            relay.silent_connections() >= 1
        })
        .await,
        "the sync write went silent"
    );
    for _ in 0..5 {
        settle_one().await;
    }
    let started = Instant::now();
    let moved = poll_until(Duration::from_secs(5), || async {
        p.metric("tollgate_usage_events_pending").await == Some(6.0)
    })
    .await;
    assert!(
        moved,
        "pending gauge {:?} after {:?}: frozen while the write hangs",
        p.metric("tollgate_usage_events_pending").await,
        started.elapsed()
    );
    let lag = p
        .metric("tollgate_usage_sync_lag_seconds")
        .await
        .expect("lag gauge");
    assert!(lag > 0.0, "lag {lag}");
}
