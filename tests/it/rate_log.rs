//! The rate log (admit.lua): one string of admission times for limits up to LOG_MAX, a sorted
//! set above it, and the window carried across a switch, an upgrade and a corrupt value.

use redis::AsyncCommands;
use serde_json::json;
use tollgate::hot::layout::{KeyRedisKeys, Layout};

use crate::common::hot_suite::{admit, patch_key, with_key};
use crate::common::*;

/// admit.lua's LOG_MAX: the largest limit whose log is one string.
const LOG_MAX: u64 = 1000;
/// The width of one time in the string log (and of its expiry header).
const W: usize = 13;

fn redis_keys(app: &TestApp, key: &str) -> KeyRedisKeys {
    Layout::new(&app.namespace).for_hash(&tollgate::keys::hash(key))
}

fn remaining(a: &Answer) -> u64 {
    a.json()["rate_limit"]["remaining"]
        .as_u64()
        .unwrap_or_else(|| panic!("rate_limit.remaining in {}", a.json()))
}

async fn redis_now_ms(app: &TestApp) -> i64 {
    let (s, us): (i64, i64) = redis::cmd("TIME")
        .query_async(&mut app.redis.clone())
        .await
        .expect("TIME");
    s * 1000 + us / 1000
}

/// The string log's (expiry, times), read as admit.lua writes it.
async fn string_log(app: &TestApp, k: &KeyRedisKeys) -> (i64, Vec<i64>) {
    let log: Option<String> = app.redis.clone().get(&k.rate).await.expect("GET");
    let log = log.expect("the string log exists");
    assert_eq!(log.len() % W, 0, "whole times: {log:?}");
    let times: Vec<i64> = log
        .as_bytes()
        .chunks(W)
        .map(|c| std::str::from_utf8(c).ok().and_then(|s| s.parse().ok()))
        .collect::<Option<_>>()
        .unwrap_or_else(|| panic!("13-digit times: {log:?}"));
    (times[0], times[1..].to_vec())
}

async fn exists(app: &TestApp, name: &str) -> bool {
    app.redis.clone().exists(name).await.expect("EXISTS")
}

/// A key whose limit is at most LOG_MAX keeps its window as one string: its admissions' times,
/// oldest first, behind the log's own expiry; no sorted set. Exact: the limit's worth of
/// admissions pass, the next is denied until the oldest leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_limits_window_is_one_string_of_admission_times() {
    let app = spawn_app().await;
    let (key, _) = new_key(&app, json!({"rate_limit": 3, "concurrent_limit": null})).await;
    let k = redis_keys(&app, &key);
    let body = with_key(&key, json!({}));
    let before = redis_now_ms(&app).await;
    for left in [2, 1, 0] {
        let a = admit(&app, body.clone()).await;
        a.lease("within the limit");
        assert_eq!(remaining(&a), left);
    }
    let after = redis_now_ms(&app).await;
    let denied = admit(&app, body.clone()).await;
    denied.denied(429, "rate_limited", "three in the window, limit 3");

    let (expiry, times) = string_log(&app, &k).await;
    assert_eq!(
        times.len(),
        3,
        "one time per admission, none for the denial"
    );
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "oldest first: {times:?}"
    );
    assert!(
        times.iter().all(|t| (before..=after).contains(t)),
        "{times:?}"
    );
    let window = 60_000;
    assert!(
        (after + window - 5..=after + window).contains(&expiry),
        "the header is the log's expiry, a window after the last admission: {expiry}"
    );
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&k.rate)
        .query_async(&mut app.redis.clone())
        .await
        .expect("PTTL");
    assert!(pttl > window - 2_000 && pttl <= window, "PTTL {pttl}");
    assert!(
        !exists(&app, &k.rate_set).await,
        "no sorted set for a small limit"
    );
    let retry = denied.retry_after_ms();
    assert!(
        retry <= window as u64 && retry as i64 >= times[0] + window - redis_now_ms(&app).await - 5,
        "retry_after_ms {retry}: until the oldest of {times:?} leaves"
    );
}

/// Raising a limit above LOG_MAX moves the window's entries into the sorted set, and lowering
/// it again moves them back: the admissions already in the window keep counting both ways.
/// Runs on the cluster too (`cluster.rs`).
pub async fn the_window_survives_a_limit_that_crosses_the_string_logs_bound(app: &TestApp) {
    let (key, id) = new_key(app, json!({"rate_limit": 5, "concurrent_limit": null})).await;
    let body = with_key(&key, json!({}));
    for _ in 0..3 {
        admit(app, body.clone())
            .await
            .lease("under the small limit");
    }
    patch_key(app, &id, json!({"rate_limit": LOG_MAX + 1000})).await;
    let a = admit(app, body.clone()).await;
    a.lease("under the large limit");
    assert_eq!(
        remaining(&a),
        LOG_MAX + 1000 - 4,
        "the three earlier admissions count under the large limit"
    );
    patch_key(app, &id, json!({"rate_limit": 5})).await;
    let a = admit(app, body.clone()).await;
    a.lease("the fifth");
    assert_eq!(remaining(&a), 0, "all four earlier admissions count again");
    admit(app, body.clone())
        .await
        .denied(429, "rate_limited", "five in the window, limit 5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_survives_a_limit_that_crosses_the_string_logs_bound_on_single_redis() {
    let app = spawn_app().await;
    the_window_survives_a_limit_that_crosses_the_string_logs_bound(&app).await;
}

/// Where the entries live after each switch: the sorted set alone above LOG_MAX, the string
/// alone at or below it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_leaves_the_entries_in_one_place() {
    let app = spawn_app().await;
    let (key, id) = new_key(&app, json!({"rate_limit": 5, "concurrent_limit": null})).await;
    let k = redis_keys(&app, &key);
    let body = with_key(&key, json!({}));
    admit(&app, body.clone()).await.lease("small");
    patch_key(&app, &id, json!({"rate_limit": LOG_MAX + 1})).await;
    admit(&app, body.clone()).await.lease("large");
    assert!(
        !exists(&app, &k.rate).await,
        "the string moved into the set"
    );
    let card: u64 = app.redis.clone().zcard(&k.rate_set).await.expect("ZCARD");
    assert_eq!(card, 2);
    patch_key(&app, &id, json!({"rate_limit": LOG_MAX})).await;
    admit(&app, body.clone()).await.lease("small again");
    assert!(
        !exists(&app, &k.rate_set).await,
        "the set moved into the string"
    );
    assert_eq!(string_log(&app, &k).await.1.len(), 3);
}

/// A build from before the string log kept every window in the sorted set: after an upgrade,
/// its entries still in the window count (once), and the ones that left do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_an_earlier_build_left_in_the_sorted_set_still_count() {
    let app = spawn_app().await;
    let (key, _) = new_key(&app, json!({"rate_limit": 5, "concurrent_limit": null})).await;
    let k = redis_keys(&app, &key);
    let body = with_key(&key, json!({}));
    admit(&app, body.clone()).await.lease("hydrates the key");
    // As the earlier build left things: entries in the set, no marker saying they moved.
    let now = redis_now_ms(&app).await;
    let mut r = app.redis.clone();
    let _: () = r.hdel(&k.state, "rlk").await.expect("HDEL");
    let _: () = r
        .zadd_multiple(
            &k.rate_set,
            &[
                (now - 1_000, "a"),
                (now - 500, "b"),
                (now - 120_000, "gone"),
            ],
        )
        .await
        .expect("ZADD");
    let a = admit(&app, body.clone()).await;
    a.lease("after the upgrade");
    assert_eq!(
        remaining(&a),
        5 - 4,
        "the string's one, the set's two in the window, and this one"
    );
    assert!(!exists(&app, &k.rate_set).await, "the set's entries moved");
    assert_eq!(string_log(&app, &k).await.1.len(), 4);
    let a = admit(&app, body.clone()).await;
    assert_eq!(remaining(&a), 0, "moved once, counted once");
}

/// A rate log that is not a list of times is state no script writes: the admission is refused
/// (500 `internal`) and the value is left for an operator to look at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_rate_log_is_refused_500_and_left_as_it_is() {
    let app = spawn_app().await;
    let (key, _) = new_key(&app, json!({"rate_limit": 5, "concurrent_limit": null})).await;
    let k = redis_keys(&app, &key);
    let body = with_key(&key, json!({}));
    admit(&app, body.clone()).await.lease("hydrates the key");
    let now = redis_now_ms(&app).await;
    for bad in [
        "not a time".to_string(),
        format!("{:013}{:013}xx", now + 60_000, now),
        format!("{:013}{:013}", now + 60_000, "abcdefghijklm"),
    ] {
        let _: () = app.redis.clone().set(&k.rate, &bad).await.expect("SET");
        let (status, answer) = app.admit(&key, json!({})).await;
        assert_eq!(
            (status, &answer["code"]),
            (500, &json!("internal")),
            "{bad:?}: {answer}"
        );
        let kept: String = app.redis.clone().get(&k.rate).await.expect("GET");
        assert_eq!(kept, bad, "nothing written");
    }
}
