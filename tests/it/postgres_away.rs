//! Availability without Postgres (contract v1.1, section 3): `serve` starts and decides from Redis while Postgres is away, and catches up when it returns.
//!
//! The real binary runs as a child process against a private Postgres that the tests stop and
//! start (`common::private_pg`); the shared Postgres is never touched.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::private_pg::PrivatePg;
use common::process::{cleanup_state, TollgateProcess};
use common::*;
use serde_json::{json, Value};

/// Removes the namespace (and any database of that name) when the test ends.
struct Cleanup(HashMap<&'static str, String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        cleanup_state(&self.0);
    }
}

async fn start_private_pg() -> PrivatePg {
    tokio::task::spawn_blocking(PrivatePg::start)
        .await
        .expect("private postgres started")
}

/// `GET /readyz` (plus `query`) on the admin listener: status, `Retry-After`, JSON body.
async fn readyz(p: &TollgateProcess, query: &str) -> (u16, Option<String>, Value) {
    let res = p
        .http
        .get(format!("{}/readyz{query}", p.admin))
        .send()
        .await
        .expect("readyz request");
    let status = res.status().as_u16();
    let retry = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (
        status,
        retry,
        res.json().await.expect("readyz answers JSON"),
    )
}

async fn poll_until<F, Fut>(within: Duration, check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    poll_every(Duration::from_millis(200), within, check).await
}

fn settings_on(pg: &PrivatePg) -> HashMap<&'static str, String> {
    let mut settings = base_settings();
    settings.insert("TOLLGATE_DATABASE_URL", pg.url(&unique("tollgate_t_")));
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_decides_from_redis_while_postgres_is_away_at_start_and_catches_up_when_it_returns() {
    require_services().await;
    let mut pg = start_private_pg().await;
    let settings = settings_on(&pg);
    let _cleanup = Cleanup(settings.clone());

    // A first process with Postgres up puts the namespace's keys into Redis.
    let mut first = TollgateProcess::start(&settings).await;
    let (key, api_key) = first
        .create_key(json!({"user_id": "u-away", "is_standalone": true, "initial_balance_usd": 10}))
        .await;
    let id = api_key["id"].as_str().expect("id").to_string();
    let loaded = poll_until(Duration::from_secs(20), || async {
        readyz(&first, "").await.2["keys"] == "loaded"
    })
    .await;
    assert!(loaded, "the first process loads the namespace into redis");
    assert!(first.terminate(Duration::from_secs(30)).await.is_some());

    tokio::task::block_in_place(|| pg.stop());
    // Version 1 waited 30 s for Postgres and exited 1, never serving.
    let p = TollgateProcess::start_serving(&settings).await;

    let (status, body) = p.admit(&key, json!({"reserve_usd": 0.5})).await;
    assert_eq!(
        status, 200,
        "admission from redis with postgres away: {body}"
    );
    let (status, body) = p
        .settle(body["lease_id"].as_str().expect("lease"), "1.25")
        .await;
    assert_eq!(status, 200, "settlement with postgres away: {body}");
    assert_eq!(body["settled"], true, "{body}");
    let (status, body) = p.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = p.release(body["lease_id"].as_str().expect("lease")).await;
    assert_eq!(status, 200, "release with postgres away: {body}");

    let (status, _, body) = readyz(&p, "").await;
    assert_eq!(status, 200, "ready: admissions can be decided: {body}");
    assert_eq!(
        body,
        json!({"ready": true, "redis": "ok", "postgres": "unavailable", "keys": "loaded"})
    );
    let (status, retry, body) = readyz(&p, "?strict=true").await;
    assert_eq!(status, 503, "strict readiness needs postgres: {body}");
    assert_eq!(retry.as_deref(), Some("1"), "a 503 carries Retry-After");
    assert_eq!(body["ready"], false, "{body}");
    assert_eq!(body["redis"], "ok", "{body}");
    assert_eq!(body["postgres"], "unavailable", "{body}");
    assert_eq!(body["code"], "not_ready", "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("postgres")),
        "{body}"
    );

    let res = p.admin_get(&format!("/admin/keys/{id}")).await;
    assert_eq!(res.status(), 503, "admin API waits for postgres");
    assert_eq!(
        res.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: Value = res.json().await.expect("JSON error");
    assert_eq!(body["code"], "unavailable", "{body}");
    assert!(body["message"].is_string(), "{body}");
    let res = p.admin_get("/admin/prices").await;
    assert_eq!(res.status(), 200, "the price table needs no postgres");
    let res = p
        .http
        .get(format!("{}/admin/keys/{id}", p.admin))
        .bearer_auth("wrong-token-wrong-token")
        .send()
        .await
        .expect("admin request");
    assert_eq!(res.status(), 401, "a wrong token is refused first");

    tokio::task::block_in_place(|| pg.restart());
    let back = poll_until(Duration::from_secs(30), || async {
        p.admin_get(&format!("/admin/keys/{id}")).await.status() == 200
    })
    .await;
    assert!(
        back,
        "the admin API answers once postgres is back:\n{}",
        p.logs()
    );
    // The settlement made while Postgres was away reaches it.
    let synced = poll_until(Duration::from_secs(30), || async {
        let k: Value = p
            .admin_get(&format!("/admin/keys/{id}"))
            .await
            .json()
            .await
            .expect("json");
        k["balance_used_usd"].is_number() && nanos(&k["balance_used_usd"]) == 1_250_000_000
    })
    .await;
    assert!(synced, "usage settled while postgres was away arrives");
    let (status, _, body) = readyz(&p, "?strict=true").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"ready": true, "redis": "ok", "postgres": "ok", "keys": "loaded"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_keys_in_redis_or_postgres_serve_answers_503_keeps_retrying_and_recovers() {
    require_services().await;
    let mut pg = start_private_pg().await;
    tokio::task::block_in_place(|| pg.stop());
    let settings = settings_on(&pg);
    let _cleanup = Cleanup(settings.clone());

    let mut p = TollgateProcess::start_serving(&settings).await;
    let res = p
        .post_data(
            "/v1/admit",
            json!({"key": "sk-notinredis000000000000000000000"}),
        )
        .await;
    assert_eq!(
        res.status(),
        503,
        "a key redis does not hold cannot be decided"
    );
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["code"], "unavailable", "{body}");

    let (status, retry, body) = readyz(&p, "").await;
    assert_eq!(status, 503, "not ready: nothing can be decided: {body}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(body["redis"], "ok", "{body}");
    assert_eq!(body["postgres"], "unavailable", "{body}");
    assert_eq!(body["keys"], "not_loaded", "{body}");
    assert_eq!(body["code"], "not_ready", "{body}");

    // Version 1 gave up after 30 s; this one keeps retrying for as long as it takes.
    tokio::time::sleep(Duration::from_secs(35)).await;
    assert!(p.is_running(), "still running:\n{}", p.logs());

    tokio::task::block_in_place(|| pg.restart());
    let ready = poll_until(Duration::from_secs(30), || async {
        readyz(&p, "?strict=true").await.0 == 200
    })
    .await;
    assert!(ready, "ready once postgres is up:\n{}", p.logs());
    let (key, _) = p.create_key(json!({"user_id": "u-later"})).await;
    let (status, body) = p.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = readyz(&p, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["keys"], "loaded",
        "the namespace is loaded once postgres is up"
    );
}
