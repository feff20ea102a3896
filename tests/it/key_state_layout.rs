//! The key state's layout in Redis: the folded configuration (`lua/lib/config.lua`) is what
//! admissions decide on, it is folded again from the named fields when those are newer, and a
//! plain key's state stays in Redis's compact encoding.

use crate::common;

use common::hot_suite::{admit, patch_key, settle, with_key};
use common::private_redis::PrivateRedis;
use common::*;
use serde_json::{json, Value};
use tollgate::hot::layout::{KeyRedisKeys, Layout};

fn redis_keys(app: &TestApp, key: &str) -> KeyRedisKeys {
    Layout::new(&app.namespace).for_hash(&tollgate::keys::hash(key))
}

/// A key with a rate limit of 100, admitted once: the admission body and its Redis keys.
async fn admitted_once(app: &TestApp) -> (serde_json::Value, KeyRedisKeys) {
    let (key, _) = new_key(app, json!({"rate_limit": 100, "concurrent_limit": null})).await;
    let body = with_key(&key, json!({}));
    admit(app, body.clone()).await.lease("first");
    (body, redis_keys(app, &key))
}

async fn hset(app: &TestApp, state: &str, field: &str, value: &str) {
    let _: i64 = redis::cmd("HSET")
        .arg(state)
        .arg(field)
        .arg(value)
        .query_async(&mut app.redis.clone())
        .await
        .expect("HSET");
}

async fn hget(app: &TestApp, state: &str, field: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(state)
        .arg(field)
        .query_async(&mut app.redis.clone())
        .await
        .expect("HGET")
}

async fn has_field(app: &TestApp, state: &str, field: &str) -> bool {
    redis::cmd("HEXISTS")
        .arg(state)
        .arg(field)
        .query_async(&mut app.redis.clone())
        .await
        .expect("HEXISTS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_keys_state_stays_a_listpack_through_admissions() {
    let app = spawn_app().await;
    let (key, _) = new_key(&app, json!({"concurrent_limit": null})).await;
    for _ in 0..20 {
        admit(&app, with_key(&key, json!({}))).await.lease("plain");
    }
    let k = redis_keys(&app, &key);
    let encoding: String = redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg(&k.state)
        .query_async(&mut app.redis.clone())
        .await
        .expect("OBJECT ENCODING");
    assert_eq!(
        encoding, "listpack",
        "every state value at most 64 bytes (the folded configuration and the rate cursor \
         included), so Redis keeps the compact encoding"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_without_a_folded_configuration_is_folded_from_its_named_fields() {
    let app = spawn_app().await;
    let (body, k) = admitted_once(&app).await;
    // As a tollgate from before `cfn` would have left it, with a limit the window has reached.
    let _: i64 = redis::cmd("HDEL")
        .arg(&k.state)
        .arg("cfn")
        .query_async(&mut app.redis.clone())
        .await
        .expect("HDEL");
    hset(&app, &k.state, "rl", "1").await;
    admit(&app, body)
        .await
        .denied(429, "rate_limited", "the named rate limit of 1, folded");
    assert!(has_field(&app, &k.state, "cfn").await, "folded again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_a_replica_of_an_older_version_wrote_is_folded_again() {
    let app = spawn_app().await;
    let (body, k) = admitted_once(&app).await;
    // An older hydrate.lua writes the named fields and a newer version, not `cfn`.
    let ver: i64 = hget(&app, &k.state, "ver")
        .await
        .and_then(|v| v.parse().ok())
        .expect("a version");
    hset(&app, &k.state, "ver", &(ver + 1).to_string()).await;
    hset(&app, &k.state, "act", "0").await;
    admit(&app, body.clone())
        .await
        .denied(403, "key_disabled", "the newer named fields decide");
    hset(&app, &k.state, "ver", &(ver + 2).to_string()).await;
    hset(&app, &k.state, "act", "1").await;
    admit(&app, body)
        .await
        .lease("active again at the next version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_before_1970_is_still_an_expiry() {
    // The folded configuration flags an expiry rather than reserving a value for "never", so
    // no expiry time, however early, reads as "never expires".
    let app = spawn_app().await;
    let (key, id) = new_key(&app, json!({"concurrent_limit": null})).await;
    let body = with_key(&key, json!({}));
    admit(&app, body.clone()).await.lease("before the PATCH");
    for at in ["1969-12-31T23:59:59.999Z", "1960-01-01T00:00:00Z"] {
        patch_key(&app, &id, json!({"expires_at": at})).await;
        admit(&app, body.clone())
            .await
            .denied(403, "key_expired", at);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scripts_name_a_keys_lease_hold_and_token_keys_as_the_layout_does() {
    // admit.lua and settle.lua declare only the keys every call touches and name the others
    // from the state (lua/lib/layout.lua): those names must be src/hot/layout.rs's, or leases
    // would be counted in a set nobody else reads.
    let app = spawn_app().await;
    let source = format!(
        "{}return {{sibling(KEYS[1], 'c'), sibling(KEYS[1], 'h'), sibling(KEYS[1], 'w')}}",
        include_str!("../../lua/lib/layout.lua")
    );
    for hash in [
        "0".repeat(64),
        "f".repeat(64),
        tollgate::keys::hash("sk-any"),
    ] {
        let k = Layout::new(&app.namespace).for_hash(&hash);
        let named: Vec<String> = redis::Script::new(&source)
            .key(&k.state)
            .invoke_async(&mut app.redis.clone())
            .await
            .expect("EVAL");
        assert_eq!(named, [k.live.as_str(), &k.holds, &k.tokens], "{hash}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_keys_state_starts_with_what_admissions_read_and_an_empty_rings_cursor() {
    // HMGET searches a listpack from its start: hydrate.lua writes `cfn`, `rw`, `ver` first.
    // The cursor it writes must read as an empty ring to this tollgate and to the one before
    // it (whose ring_read refused a cursor shorter than 32 bytes as corrupt), or a rolling
    // upgrade would answer 500 for every new key on the old replicas.
    let app = spawn_app().await;
    let (key, _) = new_key(&app, json!({"rate_limit": 100, "concurrent_limit": null})).await;
    let k = redis_keys(&app, &key);
    let fields: Vec<Vec<u8>> = redis::cmd("HGETALL")
        .arg(&k.state)
        .query_async(&mut app.redis.clone())
        .await
        .expect("HGETALL");
    let names: Vec<&[u8]> = fields.iter().step_by(2).map(Vec::as_slice).collect();
    assert_eq!(&names[..3], [&b"cfn"[..], b"rw", b"ver"], "{names:?}");
    let mut empty = Vec::new();
    for part in [0f64.to_be_bytes(), 0f64.to_be_bytes()] {
        empty.extend(part);
    }
    empty.extend(16i32.to_be_bytes());
    empty.extend([0u8; 12]);
    assert_eq!(
        fields[3], empty,
        "head 0, tail 0, 16 slots, nothing written, no expiry"
    );
    let body = with_key(&key, json!({}));
    let a = admit(&app, body).await;
    a.lease("the first admission on that cursor");
    assert_eq!(a.body["rate_limit"]["remaining"], json!(99), "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_added_to_a_key_already_admitted_counts_from_the_next_admission() {
    // tollgate remembers whether a key's last grant needed its spend counters
    // (hot/known_keys.rs) and asks admit.lua to read them with the configuration. Each PATCH
    // below makes that guess wrong for the next admission; the answers must not depend on it.
    let app = spawn_app().await;
    let (key, id) = new_key(&app, json!({"rate_limit": null, "concurrent_limit": null})).await;
    let body = with_key(&key, json!({}));
    let lease = admit(&app, body.clone()).await.lease("plain");
    let s = settle(&app, &lease, "1").await;
    assert_eq!(s.status, 200, "one dollar settled: {}", s.body);
    admit(&app, body.clone()).await.lease("plain again");
    patch_key(&app, &id, json!({"budget_usd": 1.5})).await;
    let a = admit(&app, body.clone()).await;
    a.lease("a budget of 1.5 with 1 spent, guessed plain");
    assert_eq!(
        a.body["budget"]["remaining_usd"].to_string(),
        "0.5",
        "{}",
        a.body
    );
    patch_key(&app, &id, json!({"budget_usd": 1})).await;
    admit(&app, body.clone())
        .await
        .denied(402, "budget_exceeded", "a budget of 1 with 1 spent");
    patch_key(&app, &id, json!({"budget_usd": null})).await;
    let a = admit(&app, body).await;
    a.lease("no budget, guessed counted");
    assert_eq!(a.body["budget"], Value::Null, "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_leases_are_looked_for_once_the_earliest_expiry_passes_not_on_every_admission() {
    // `le` (admit.lua): a key with a concurrency limit looks through its live leases for
    // expired ones once the earliest expiry it knows of has passed, and a key admitted without
    // leases at most once a second — not on every admission, as before `le`.
    let redis = PrivateRedis::start();
    let app = spawn_app_on(redis.url()).await;
    let (key, _) = new_key(&app, json!({"rate_limit": null, "concurrent_limit": 5})).await;
    let before = redis.calls("zrangebyscore");
    for _ in 0..20 {
        let a = admit(&app, with_key(&key, json!({"lease": "none"}))).await;
        assert_eq!(a.status, 200, "without a lease: {}", a.body);
    }
    for i in 0..20 {
        let lease = admit(&app, with_key(&key, json!({}))).await.lease("leased");
        let s = settle(&app, &lease, "0").await;
        assert_eq!(s.status, 200, "settlement {i}: {}", s.body);
    }
    let looks = redis.calls("zrangebyscore") - before;
    assert!(
        (1..=3).contains(&looks),
        "40 admissions looked for expired leases {looks} times"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_on_a_spend_past_2_53_nano_usd_stays_exact_when_a_hold_comes_back() {
    // settle.lua writes `used` whole, with the hold it gives back, only while the sum is exact
    // as a Lua number; past 2^53 it must add with HINCRBY, or the last nano-dollar is lost.
    let app = spawn_app().await;
    let (key, _) = new_key(
        &app,
        json!({"rate_limit": null, "concurrent_limit": null, "token_limit": 1_000_000}),
    )
    .await;
    let k = redis_keys(&app, &key);
    let most = "9007199.254740991"; // 2^53 - 1 nano-USD, the most one settlement may cost
    for _ in 0..2 {
        let lease = admit(&app, with_key(&key, json!({})))
            .await
            .lease("no hold");
        let s = settle(&app, &lease, most).await;
        assert_eq!(s.status, 200, "{}", s.body);
    }
    let lease = admit(&app, with_key(&key, json!({"reserve_tokens": 10})))
        .await
        .lease("holding 10 tokens");
    let s = settle(&app, &lease, "0.000000001").await;
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(
        hget(&app, &k.state, "used").await.as_deref(),
        Some("18014398509481983"),
        "2 × (2^53 - 1) + 1, to the nano-dollar"
    );
}
