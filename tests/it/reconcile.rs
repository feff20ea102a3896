//! Admin writes reach Redis even when tollgate dies between the Postgres commit and the Redis
//! push, and re-pushing a write never applies it twice.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tollgate::key_state::KeyState;
use tollgate::store::keys;

/// A balance adjustment committed to Postgres whose Redis push never happened (the process died
/// in between) is pushed by the reconciler; the next admission sees the new balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_missed_redis_is_reconciled() {
    let app = spawn_app().await;
    let (key, api_key) = app
        .create_key(json!({"user_id": "u-1", "is_standalone": true, "initial_balance_usd": 0}))
        .await;
    let id = uuid::Uuid::parse_str(api_key["id"].as_str().unwrap()).unwrap();
    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (402, Some("balance_exhausted"))
    );

    // Exactly what the admin call does in Postgres, without the push that follows it.
    let row = keys::adjust_balance(&app.db, id, 2_000_000_000, None, None)
        .await
        .unwrap();
    assert_eq!(row.current_balance_nanos, Some(2_000_000_000));
    let (status, _) = app.admit(&key, json!({})).await;
    assert_eq!(status, 402, "redis has not seen the write yet");

    let admitted = app
        .eventually(Duration::from_secs(10), || async {
            app.admit(&key, json!({})).await.0 == 200
        })
        .await;
    assert!(admitted, "the reconciler pushed the new balance within 10s");
    // The reconciler records a push in Postgres after Redis has it, so the record may trail
    // the admission that already sees the new balance by a moment.
    let recorded = app
        .eventually(Duration::from_secs(5), || async {
            let pushed: i64 =
                sqlx::query_scalar("SELECT pushed_version FROM api_keys WHERE id = $1")
                    .bind(id)
                    .fetch_one(&app.db)
                    .await
                    .unwrap();
            pushed == row.version
        })
        .await;
    assert!(recorded, "the push of version {} is recorded", row.version);
}

/// Pushing the same row again, or an older row after a newer one, changes nothing: Redis keeps
/// the newest version, and the running `used` counter is never reset by a push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_are_idempotent_and_never_go_back_in_time() {
    let app = spawn_app().await;
    let (key, api_key) = app
        .create_key(json!({"user_id": "u-1", "is_standalone": true, "initial_balance_usd": 1}))
        .await;
    let id = uuid::Uuid::parse_str(api_key["id"].as_str().unwrap()).unwrap();
    let (_, body) = app.admit(&key, json!({})).await;
    let (status, _) = app.settle(body["lease_id"].as_str().unwrap(), "0.25").await;
    assert_eq!(status, 200);

    let old = keys::get(&app.db, id).await.unwrap().unwrap();
    let res = app
        .admin_post(
            &format!("/admin/keys/{id}/balance"),
            json!({"amount_usd": 1}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let new = keys::get(&app.db, id).await.unwrap().unwrap();
    assert!(new.version > old.version);

    let hot = app.hot_path();
    hot.hydrate(&new).await.unwrap();
    hot.hydrate(&new).await.unwrap();
    hot.hydrate(&old).await.unwrap();

    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{body}");
    // 1 + 1 credited, 0.25 charged: a double-applied top-up would show 2.75, a stale push 0.75.
    assert_eq!(body["balance_remaining_usd"].to_string(), "1.75");
}

/// After the namespace's Redis state is lost, every key is written back from Postgres by the
/// reconciler — without waiting for each key's first admission (whose Postgres look-ups are
/// throttled) — with its synced `balance_used`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_namespace_is_reloaded_from_postgres_in_bulk() {
    let app = spawn_app().await;
    let mut keys = Vec::new();
    for i in 0..40 {
        let (key, _) = app
            .create_key(json!({"user_id": format!("u-{i}"), "is_standalone": true, "initial_balance_usd": 1}))
            .await;
        keys.push(key);
    }
    let (_, body) = app.admit(&keys[0], json!({})).await;
    let (status, _) = app.settle(body["lease_id"].as_str().unwrap(), "0.25").await;
    assert_eq!(status, 200);
    let synced = app
        .eventually(Duration::from_secs(10), || async {
            let used: i64 =
                sqlx::query_scalar("SELECT sum(balance_used_nanos)::int8 FROM api_keys")
                    .fetch_one(&app.db)
                    .await
                    .unwrap();
            used == 250_000_000
        })
        .await;
    assert!(synced, "usage synced before the wipe");

    app.wipe_namespace().await;
    let layout = tollgate::hot::layout::Layout::new(&app.namespace);
    let states: Vec<String> = keys
        .iter()
        .map(|k| layout.for_hash(&tollgate::keys::hash(k)).state)
        .collect();
    let reloaded = app
        .eventually(Duration::from_secs(15), || async {
            let present = app.namespace_keys().await;
            states.iter().all(|s| present.contains(s))
        })
        .await;
    assert!(
        reloaded,
        "every key's state is back in Redis without any admission"
    );
    let (status, body) = app.admit(&keys[0], json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["balance_remaining_usd"].to_string(),
        "0.75",
        "synced usage kept"
    );
}

/// A reload that fails because Postgres is away frees the `loading` lock at once, so the next
/// pass, with Postgres back, reloads the namespace. Before, the failed reload held the lock for
/// its whole minute: a Redis that came back empty during a Postgres outage stayed without its
/// `loaded` marker, and plain `/readyz` answered 503 in the next outage (the fault-injection
/// run, `loadtest faults`, found it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_frees_its_lock() {
    let mut app = spawn_app().await;
    app.create_key(json!({"user_id": "u-lock"})).await;
    let (hot, metrics) = (app.hot_path(), app.state.metrics.clone());
    // No background reload may race the calls below.
    app.stop().await;
    app.wipe_namespace().await;
    let away = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy("postgres://postgres@127.0.0.1:1/nowhere")
        .unwrap();
    let failed = KeyState::new(hot.clone(), away, metrics.clone())
        .reload_if_wiped()
        .await;
    assert!(failed.is_err(), "Postgres away: {failed:?}");
    let loaded = KeyState::new(hot, app.db.clone(), metrics)
        .reload_if_wiped()
        .await
        .expect("reload with Postgres back");
    assert_eq!(loaded, 1, "reloaded at once, not after the lock's TTL");
}
