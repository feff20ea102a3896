//! NOSCRIPT recovery: after `SCRIPT FLUSH` (or a Redis that restarted, or a failover to a node
//! that never saw the scripts) the next call still succeeds — `EVALSHA` answers NOSCRIPT, the
//! same call goes once as `EVAL`, which caches the script again — and the call after that is a
//! plain `EVALSHA`. Runs on a private `redis-server`, so its command statistics are this test's.

use crate::common;

use common::private_redis::PrivateRedis;
use common::*;
use serde_json::json;

fn script_cached(redis: &PrivateRedis, sha: &str) -> bool {
    redis.cli(&["SCRIPT", "EXISTS", sha]).trim() == "1"
}

fn flush_scripts(redis: &PrivateRedis, shas: &[&str]) {
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).trim(), "OK");
    for sha in shas {
        assert!(
            !script_cached(redis, sha),
            "{sha} still cached after SCRIPT FLUSH"
        );
    }
    assert_eq!(redis.cli(&["CONFIG", "RESETSTAT"]).trim(), "OK");
}

async fn reloads(app: &TestApp, script: &str) -> f64 {
    let label = format!("script=\"{script}\"");
    app.metric_sum("tollgate_script_reloads_total", Some(&label))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_survives_script_flush_and_returns_to_evalsha() {
    let redis = PrivateRedis::start();
    let app = spawn_app_on(redis.url()).await;
    let scripts = tollgate::hot::scripts::Scripts::default();
    let admit_sha = scripts.admit.sha().to_string();
    let (key, _) = app
        .create_key(json!({"user_id": "u-noscript", "rate_limit": null}))
        .await;
    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        script_cached(&redis, &admit_sha),
        "preloaded or cached by the first admission"
    );

    let reloads_before = reloads(&app, "admit").await;
    flush_scripts(&redis, &[&admit_sha]);

    // First admission after the flush: EVALSHA (NOSCRIPT), then EVAL, and the answer is a
    // normal grant.
    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "first admission after SCRIPT FLUSH: {body}");
    assert_eq!(body["allowed"], true, "{body}");
    assert_eq!(
        redis.calls("evalsha"),
        1,
        "one EVALSHA, refused with NOSCRIPT"
    );
    assert_eq!(redis.calls("eval"), 1, "one EVAL fallback");
    assert!(
        script_cached(&redis, &admit_sha),
        "EVAL cached the script again"
    );
    assert!(
        reloads(&app, "admit").await - reloads_before >= 1.0,
        "tollgate_script_reloads_total{{script=\"admit\"}} counts the reload"
    );

    // The next one is back to a single EVALSHA.
    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "second admission after SCRIPT FLUSH: {body}");
    assert_eq!(
        redis.calls("evalsha"),
        2,
        "the next admission is an EVALSHA"
    );
    assert_eq!(redis.calls("eval"), 1, "and needs no EVAL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_release_and_readiness_survive_script_flush() {
    let redis = PrivateRedis::start();
    let app = spawn_app_on(redis.url()).await;
    let scripts = tollgate::hot::scripts::Scripts::default();
    let (settle_sha, release_sha) = (
        scripts.settle.sha().to_string(),
        scripts.release.sha().to_string(),
    );
    let (key, api_key) = app
        .create_key(
            json!({"user_id": "u-noscript", "is_standalone": true, "initial_balance_usd": 1}),
        )
        .await;
    let (status, first) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{second}");

    flush_scripts(&redis, &[&settle_sha, &release_sha]);
    let (status, body) = app
        .settle(first["lease_id"].as_str().expect("lease"), "0.25")
        .await;
    assert_eq!(status, 200, "settle after SCRIPT FLUSH: {body}");
    assert_eq!(body["settled"], true, "{body}");
    assert_eq!(
        body["duplicate"], false,
        "charged once, not retried into a duplicate: {body}"
    );
    assert_eq!(nanos(&body["balance_remaining_usd"]), 750_000_000, "{body}");
    let (status, body) = app
        .release(second["lease_id"].as_str().expect("lease"))
        .await;
    assert_eq!(status, 200, "release after SCRIPT FLUSH: {body}");
    assert_eq!(body["released"], true, "{body}");
    assert_eq!(redis.calls("eval"), 2, "one EVAL per flushed script");

    flush_scripts(&redis, &[&settle_sha]);
    let res = app
        .http
        .get(format!("{}/readyz", app.data))
        .send()
        .await
        .expect("readyz");
    assert_eq!(
        res.status(),
        200,
        "the readiness probe recovers from NOSCRIPT as well"
    );

    // The usage of the settlement made through EVAL reached Postgres exactly once.
    let id = api_key["id"].as_str().expect("id").to_string();
    let synced = app
        .eventually(std::time::Duration::from_secs(15), || async {
            let v: serde_json::Value = app
                .admin_get(&format!("/admin/keys/{id}/stats"))
                .await
                .json()
                .await
                .expect("stats");
            v["total_requests"].as_i64() == Some(1)
        })
        .await;
    assert!(synced, "the settled event reached Postgres");
    let v: serde_json::Value = app
        .admin_get(&format!("/admin/keys/{id}"))
        .await
        .json()
        .await
        .expect("key");
    assert_eq!(nanos(&v["balance_used_usd"]), 250_000_000, "{v}");
}
