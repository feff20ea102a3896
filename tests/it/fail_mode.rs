//! What admission does when Redis cannot be reached, against a private `redis-server` that the
//! tests kill, freeze and restart (never the shared one): `closed` answers 503 `unavailable`
//! within the Redis deadline, `open` admits only keys this process validated recently and
//! without a balance, and service resumes by itself once Redis is back, even empty.

use crate::common;

use std::time::{Duration, Instant};

use common::private_redis::PrivateRedis;
use common::*;
use serde_json::{json, Value};

/// The hot-path deadline these tests run with.
const REDIS_TIMEOUT_MS: u64 = 200;
/// "Fast": one deadline plus generous slack for a loaded 2-core machine, far below a hang.
const FAST: Duration = Duration::from_millis(1000);
/// How long service may take to resume after Redis is back.
const RESUME_WITHIN: Duration = Duration::from_secs(20);

async fn app_on(redis: &PrivateRedis, fail_mode: &str, lease_ttl_seconds: Option<u64>) -> TestApp {
    let url = redis.url();
    let mode = fail_mode.to_string();
    spawn_app_with(move |s| {
        s.insert("TOLLGATE_REDIS_URL", url);
        s.insert("TOLLGATE_FAIL_MODE", mode);
        s.insert("TOLLGATE_REDIS_TIMEOUT_MS", REDIS_TIMEOUT_MS.to_string());
        if let Some(ttl) = lease_ttl_seconds {
            s.insert("TOLLGATE_LEASE_TTL_SECONDS", ttl.to_string());
        }
    })
    .await
}

/// An admission and how long it took.
async fn timed_admit(app: &TestApp, key: &str) -> (u16, Value, Duration) {
    let started = Instant::now();
    let (status, body) = app.admit(key, json!({})).await;
    (status, body, started.elapsed())
}

fn assert_unavailable(status: u16, body: &Value, what: &str) {
    assert_eq!(status, 503, "{what}: {body}");
    assert_eq!(body["code"], "unavailable", "{what}: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
}

async fn readyz(app: &TestApp) -> (u16, Value) {
    let res = app
        .http
        .get(format!("{}/readyz", app.data))
        .send()
        .await
        .expect("readyz request");
    let status = res.status().as_u16();
    (status, res.json().await.expect("readyz answers JSON"))
}

async fn resumes(app: &TestApp, key: &str) -> Value {
    let deadline = Instant::now() + RESUME_WITHIN;
    loop {
        let (status, body) = app.admit(key, json!({})).await;
        if status == 200 {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "admission did not resume within {RESUME_WITHIN:?}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_mode_answers_unavailable_fast_while_redis_is_down_and_resumes_by_itself() {
    let mut redis = PrivateRedis::start();
    let app = app_on(&redis, "closed", None).await;
    let (key, api_key) = app.create_key(json!({"user_id": "u-closed"})).await;
    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{body}");
    let lease = body["lease_id"].as_str().expect("lease").to_string();
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "ready before the outage: {body}");

    let errors_before = app.metric_sum("tollgate_redis_errors_total", None).await;
    let connection_errors_before = app
        .metric_sum("tollgate_redis_errors_total", Some("kind=\"connection\""))
        .await;
    let denied_before = app
        .metric_sum(
            "tollgate_admissions_total",
            Some("decision=\"unavailable\""),
        )
        .await;
    redis.stop();

    const TRIES: usize = 5;
    for i in 0..TRIES {
        let (status, body, took) = timed_admit(&app, &key).await;
        assert_unavailable(status, &body, &format!("admission {i} with redis down"));
        assert!(
            took < FAST,
            "admission {i} took {took:?} with redis down: not bounded"
        );
    }
    let res = app
        .post_data(
            "/v1/admit",
            json!({"key": "sk-neverissued0000000000000000000000"}),
        )
        .await;
    assert_eq!(
        res.status(),
        503,
        "an unknown key is unavailable too, not invalid"
    );

    let started = Instant::now();
    let (status, body) = app.settle(&lease, "0.01").await;
    assert_unavailable(status, &body, "settle with redis down");
    assert!(
        started.elapsed() < FAST,
        "settle took {:?}",
        started.elapsed()
    );
    let (status, body) = app.release(&lease).await;
    assert_unavailable(status, &body, "release with redis down");

    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "not ready while redis is down: {body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("redis")),
        "{body}"
    );
    assert!(
        !body["message"].as_str().unwrap_or("").contains("postgres"),
        "{body}"
    );
    let res = app
        .http
        .get(format!("{}/healthz", app.data))
        .send()
        .await
        .expect("healthz");
    assert_eq!(res.status(), 200, "alive while redis is down");

    let errors = app.metric_sum("tollgate_redis_errors_total", None).await - errors_before;
    assert!(
        errors >= TRIES as f64,
        "redis errors grew by {errors}, expected ≥ {TRIES}"
    );
    let connection_errors = app
        .metric_sum("tollgate_redis_errors_total", Some("kind=\"connection\""))
        .await
        - connection_errors_before;
    assert!(
        connection_errors >= 1.0,
        "a refused connection counts as kind=connection"
    );
    let denied = app
        .metric_sum(
            "tollgate_admissions_total",
            Some("decision=\"unavailable\""),
        )
        .await
        - denied_before;
    assert!(
        denied >= TRIES as f64,
        "unavailable admissions grew by {denied}"
    );

    // Back, but empty: the key must come from Postgres again, with no restart of tollgate.
    redis.restart();
    let body = resumes(&app, &key).await;
    assert_eq!(body["key_id"], api_key["id"], "{body}");
    let lease = body["lease_id"].as_str().expect("lease").to_string();
    let (status, body) = app.settle(&lease, "0.25").await;
    assert_eq!(status, 200, "settle after recovery: {body}");
    assert_eq!(body["settled"], true, "{body}");
    let ok = app
        .eventually(Duration::from_secs(10), || async {
            readyz(&app).await.0 == 200
        })
        .await;
    assert!(ok, "readyz back to 200 after redis returned");
    // The settled usage reaches Postgres: the syncer recovered too (its group is recreated).
    let id = api_key["id"].as_str().expect("id").to_string();
    let synced = app
        .eventually(Duration::from_secs(15), || async {
            let v: Value = app
                .admin_get(&format!("/admin/keys/{id}/stats"))
                .await
                .json()
                .await
                .expect("stats");
            v["total_requests"].as_i64() == Some(1)
        })
        .await;
    assert!(synced, "usage settled after the restart reached Postgres");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_is_bounded_by_the_deadline_and_counted_as_timeouts() {
    let redis = PrivateRedis::start();
    let app = app_on(&redis, "closed", None).await;
    let (key, _) = app.create_key(json!({"user_id": "u-hung"})).await;
    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{body}");

    let timeouts_before = app
        .metric_sum("tollgate_redis_errors_total", Some("kind=\"timeout\""))
        .await;
    // Frozen, not dead: connections stay open and nothing answers.
    redis.freeze();
    for i in 0..3 {
        let (status, body, took) = timed_admit(&app, &key).await;
        assert_unavailable(status, &body, &format!("admission {i} with redis frozen"));
        assert!(
            took >= Duration::from_millis(REDIS_TIMEOUT_MS / 2) && took < FAST,
            "admission {i} took {took:?}: should wait for about the {REDIS_TIMEOUT_MS}ms deadline"
        );
    }
    let timeouts = app
        .metric_sum("tollgate_redis_errors_total", Some("kind=\"timeout\""))
        .await
        - timeouts_before;
    assert!(timeouts >= 3.0, "timeouts grew by {timeouts}");
    redis.thaw();
    resumes(&app, &key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_admits_only_recently_validated_keys_without_a_balance() {
    let mut redis = PrivateRedis::start();
    let app = app_on(&redis, "open", None).await;
    let (seen, seen_key) = app
        .create_key(json!({"user_id": "u-seen", "concurrent_limit": 1, "rate_limit": 1}))
        .await;
    let (never, _) = app.create_key(json!({"user_id": "u-never"})).await;
    let (funded, _) = app
        .create_key(json!({"user_id": "u-funded", "is_standalone": true, "initial_balance_usd": 5}))
        .await;
    let (status, body) = app.admit(&seen, json!({})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app.admit(&funded, json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !body["balance_remaining_usd"].is_null(),
        "funded key has a balance: {body}"
    );
    // Its limits are used up: were Redis up, the next admission would be refused.
    let (status, body) = app.admit(&seen, json!({})).await;
    assert_eq!(status, 429, "{body}");

    let fail_open_before = app
        .metric_sum("tollgate_fail_open_admissions_total", None)
        .await;
    redis.stop();

    // A validated key passes unlimited: its rate and concurrency limits are not enforced.
    const OPEN: usize = 4;
    for i in 0..OPEN {
        let (status, body, took) = timed_admit(&app, &seen).await;
        assert_eq!(status, 200, "fail-open admission {i}: {body}");
        assert_eq!(body["allowed"], true, "{body}");
        assert_eq!(body["key_id"], seen_key["id"], "{body}");
        assert_eq!(body["user_id"], "u-seen", "{body}");
        assert!(
            body["lease_id"].as_str().is_some_and(|l| !l.is_empty()),
            "{body}"
        );
        assert!(body["balance_remaining_usd"].is_null(), "{body}");
        assert!(took < FAST, "fail-open admission {i} took {took:?}");
    }
    let (status, body) = app.admit(&never, json!({})).await;
    assert_unavailable(status, &body, "a valid key this process never validated");
    let (status, body) = app.admit(&funded, json!({})).await;
    assert_unavailable(
        status,
        &body,
        "a standalone key with a balance, even though seen",
    );
    let (status, body) = app
        .admit("sk-neverissued0000000000000000000000", json!({}))
        .await;
    assert_unavailable(status, &body, "an unknown key");
    let res = app
        .http
        .post(format!("{}/v1/admit", app.data))
        .bearer_auth(&seen)
        .json(&json!({}))
        .send()
        .await
        .expect("admit");
    assert_eq!(res.status(), 200, "the key may come in a header as well");

    let fail_open = app
        .metric_sum("tollgate_fail_open_admissions_total", None)
        .await
        - fail_open_before;
    assert!(
        fail_open >= (OPEN + 1) as f64,
        "fail-open admissions grew by {fail_open}, expected ≥ {}",
        OPEN + 1
    );

    // Back (empty): real decisions again, limits enforced from the re-hydrated keys. A key
    // never validated is admitted only by a real decision, so it tells when Redis is used again.
    redis.restart();
    resumes(&app, &never).await;
    let (status, body) = app.admit(&seen, json!({})).await;
    assert_eq!(status, 200, "{body}");
    let lease = body["lease_id"].as_str().expect("lease").to_string();
    let (status, body) = app.admit(&seen, json!({})).await;
    assert_eq!(status, 429, "limits apply again once redis is back: {body}");
    let (status, body) = app.settle(&lease, "0.0").await;
    assert_eq!(status, 200, "a real lease again: {body}");
    let (status, body) = app.admit(&funded, json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body["balance_remaining_usd"].is_null(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mode_forgets_a_validation_older_than_the_lease_ttl() {
    // Long enough that "validated just now" is certain on a loaded machine, short enough to
    // wait out twice.
    const TTL: Duration = Duration::from_secs(4);
    let mut redis = PrivateRedis::start();
    let app = app_on(&redis, "open", Some(TTL.as_secs())).await;
    let (old, _) = app.create_key(json!({"user_id": "u-old"})).await;
    let (fresh, _) = app.create_key(json!({"user_id": "u-fresh"})).await;
    let (status, body) = app.admit(&old, json!({})).await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    let validated_at = Instant::now();
    let (status, body) = app.admit(&fresh, json!({})).await;
    assert_eq!(status, 200, "{body}");
    redis.stop();

    let (status, body) = app.admit(&old, json!({})).await;
    assert_unavailable(status, &body, "validated longer ago than the lease TTL");
    let (status, body) = app.admit(&fresh, json!({})).await;
    assert!(
        validated_at.elapsed() < TTL,
        "the machine is too slow for this test's TTL"
    );
    assert_eq!(status, 200, "validated within the lease TTL: {body}");

    tokio::time::sleep(TTL.saturating_sub(validated_at.elapsed()) + Duration::from_millis(500))
        .await;
    let (status, body) = app.admit(&fresh, json!({})).await;
    assert_unavailable(
        status,
        &body,
        "the fresh validation has aged past the TTL too",
    );
    // Back up before the app stops: its shutdown flush waits for a missing Redis.
    redis.restart();
}

/// Cluster seeds that accept connections and never answer (a black-holed network): tollgate
/// cannot even learn the slot map. Concurrent admissions must each still end within the
/// deadline instead of queueing behind one another's connection attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_cluster_seeds_do_not_queue_admissions() {
    // The first seed answers (the harness connects to it directly); it is not a cluster node,
    // so tollgate must go on to the silent ones.
    let first = PrivateRedis::start();
    let silent: Vec<std::net::TcpListener> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let mut urls = vec![first.url()];
    for l in &silent {
        urls.push(format!("redis://{}", l.local_addr().expect("addr")));
    }
    let url = urls.join(",");
    let app = spawn_app_with(move |s| {
        s.insert("TOLLGATE_REDIS_URL", url);
        s.insert("TOLLGATE_REDIS_TIMEOUT_MS", REDIS_TIMEOUT_MS.to_string());
    })
    .await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (http, base) = (app.http.clone(), app.data.clone());
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let res = http
                .post(format!("{base}/v1/admit"))
                .json(&json!({"key": "sk-anykey00000000000000000000000000000"}))
                .send()
                .await
                .expect("admit");
            (res.status().as_u16(), started.elapsed())
        }));
    }
    for t in tasks {
        let (status, took) = t.await.expect("task");
        assert_eq!(status, 503);
        assert!(
            took < FAST,
            "an admission took {took:?}: it waited for others' attempts"
        );
    }
}

/// Usage of a request let through in fail-open mode is not lost: once Redis is back (empty, it
/// keeps nothing), settling the fail-open lease records the event, which reaches Postgres; a
/// second settlement is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_open_lease_is_settled_and_recorded_once_redis_returns() {
    let mut redis = PrivateRedis::start();
    let (app, key_id, lease) =
        fail_open_lease(&mut redis, json!({"provider": "openai", "model": "gpt-4o"})).await;
    let (status, body) = app.settle(&lease, "0.25").await;
    assert_unavailable(status, &body, "settle while redis is down");

    redis.restart();
    let settled = app
        .eventually(RESUME_WITHIN, || async {
            let (status, body) = app.settle(&lease, "0.25").await;
            status == 200 && body["duplicate"] == false
        })
        .await;
    assert!(settled, "the fail-open lease settles once redis is back");
    let (status, body) = app.settle(&lease, "0.25").await;
    assert_eq!(
        (status, body["duplicate"].as_bool()),
        (200, Some(true)),
        "{body}"
    );

    let recorded = app
        .eventually(Duration::from_secs(10), || async {
            let row: Option<(String, i64)> = sqlx::query_as(
                "SELECT model, cost_nanos FROM usage_events WHERE key_id = $1::uuid",
            )
            .bind(&key_id)
            .fetch_optional(&app.db)
            .await
            .expect("query usage");
            row == Some(("gpt-4o".to_string(), 250_000_000))
        })
        .await;
    assert!(
        recorded,
        "the fail-open usage reached Postgres with the admission's model"
    );
    assert_eq!(
        app.usage_events_of_key(&key_id).await,
        1,
        "recorded exactly once"
    );
}

/// A key validated by one admission, then Redis stopped and a fail-open lease granted with
/// `extra` in the admission body: the app, the key id and the lease.
async fn fail_open_lease(redis: &mut PrivateRedis, extra: Value) -> (TestApp, String, String) {
    let app = app_on(redis, "open", None).await;
    let (key, api_key) = app.create_key(json!({"user_id": unique("u-open-")})).await;
    let key_id = api_key["id"].as_str().expect("id").to_string();
    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{body}");
    redis.stop();
    let (status, body) = app.admit(&key, extra).await;
    assert_eq!(status, 200, "fail-open admission: {body}");
    let lease = body["lease_id"].as_str().expect("lease id").to_string();
    (app, key_id, lease)
}

/// A lease granted in fail-open mode is sealed like any other (issue #12: it used to be known
/// only to the granting process's memory, and a release answered `lease_unknown`). It holds
/// nothing in Redis, and it is released like any other lease: `unavailable` while Redis is
/// down (the release writes the tombstone that ends it), `released` once Redis is back, and,
/// like any released lease, still charged once if the gateway settles it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fail_open_lease_can_be_released() {
    let mut redis = PrivateRedis::start();
    let (app, key_id, lease) = fail_open_lease(&mut redis, json!({})).await;
    let (status, body) = app.release(&lease).await;
    assert_unavailable(
        status,
        &body,
        "release of a fail-open lease while redis is down",
    );

    redis.restart();
    let released = app
        .eventually(RESUME_WITHIN, || async {
            let (status, body) = app.release(&lease).await;
            status == 200 && body["released"] == true
        })
        .await;
    assert!(
        released,
        "the fail-open lease is released once redis is back"
    );
    let (status, body) = app.release(&lease).await;
    assert_eq!(
        (status, body["released"].as_bool()),
        (200, Some(true)),
        "releasing again is a no-op: {body}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.usage_events_of_key(&key_id).await,
        0,
        "nothing recorded for a release"
    );
    let (status, body) = app.settle(&lease, "0.25").await;
    assert_eq!(
        (
            status,
            body["settled"].as_bool(),
            body["duplicate"].as_bool()
        ),
        (200, Some(true), Some(false)),
        "a released lease is still settled: {body}"
    );
    let recorded = app
        .eventually(Duration::from_secs(10), || async {
            app.usage_events_of_key(&key_id).await == 1
        })
        .await;
    assert!(
        recorded,
        "the settlement of the released lease is recorded once"
    );
}
