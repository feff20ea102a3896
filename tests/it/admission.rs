//! The hot path against a single Redis: every scenario of `common::hot_suite`, each on its own
//! tollgate with its own database and namespace.

use crate::common;

use std::time::{Duration, Instant};

use common::hot_suite::{self, PgLookupCounter};
use common::silent_relay::SilentRelay;
use common::*;
use serde_json::json;
use tollgate::gate::LOOKUP_BOUND;

/// One test of `hot_suite::$scenario` on its own tollgate, started with the settings tweak the
/// scenario needs.
macro_rules! on_single_redis {
    ($scenario:ident) => {
        on_single_redis!($scenario, |_: &mut hot_suite::Settings| {});
    };
    ($scenario:ident, $tweak:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $scenario() {
            let app = spawn_app_with($tweak).await;
            hot_suite::$scenario(&app).await;
        }
    };
}

hot_suite::every_scenario!(on_single_redis);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_redis_state_is_rehydrated_from_postgres() {
    let app = spawn_app().await;
    hot_suite::lost_redis_state_is_rehydrated_from_postgres(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_cost_bounded_postgres_lookups() {
    let pg = PgLookupCounter::start().await;
    let app = spawn_app_with(|s| pg.route(s)).await;
    hot_suite::unknown_keys_cost_bounded_postgres_lookups(&app, &pg).await;
}

/// A key look-up whose Postgres connection goes silent mid-query (half-open after a failover)
/// answers `unavailable` within the look-up bound instead of hanging until the client gives
/// up, and its connection is closed, not returned: the next look-up runs on a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_lookup_on_a_silent_connection_is_bounded_and_the_next_one_works() {
    let relay = SilentRelay::silencing_first(b"FROM api_keys WHERE key_hash = $1").await;
    let app = spawn_app_with(|s| {
        let url = relay.route(&s["TOLLGATE_DATABASE_URL"]);
        s.insert("TOLLGATE_DATABASE_URL", url);
    })
    .await;
    let started = Instant::now();
    let first = tokio::time::timeout(
        LOOKUP_BOUND + Duration::from_secs(5),
        hot_suite::admit(&app, hot_suite::with_key(&unique("sk-"), json!({}))),
    )
    .await
    .expect("the admission answers instead of waiting for the silent connection");
    let took = started.elapsed();
    first.denied(503, "unavailable", "a look-up that got no answer");
    assert!(
        took >= LOOKUP_BOUND && took < LOOKUP_BOUND + Duration::from_secs(3),
        "answered after {took:?}, the bound is {LOOKUP_BOUND:?}"
    );
    assert!(
        relay.silent_connections() >= 1,
        "the look-up went out on the connection that went silent"
    );
    // Closed, not returned: back in the pool, sqlx would ping it without a bound and that ping
    // would hold its place for good.
    let pool = &app.state.db;
    assert!(
        app.eventually(Duration::from_secs(10), || async {
            pool.size() as usize == pool.num_idle()
        })
        .await,
        "a connection is still out of the pool: {} open, {} idle",
        pool.size(),
        pool.num_idle()
    );
    for _ in 0..3 {
        let next = hot_suite::admit(&app, hot_suite::with_key(&unique("sk-"), json!({}))).await;
        next.denied(
            401,
            "key_invalid",
            "an unknown key looked up on a fresh connection",
        );
    }
}

/// Milliseconds to live of a Redis key (-2 missing, -1 no expiry).
async fn pttl(app: &TestApp, name: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(name)
        .query_async(&mut app.redis.clone())
        .await
        .expect("PTTL")
}

async fn pexpire(app: &TestApp, name: &str, ms: i64) {
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(name)
        .arg(ms)
        .query_async(&mut app.redis.clone())
        .await
        .expect("PEXPIRE");
}

/// Every key an admission writes carries an expiry; `holds` expires with `live`; and an expiry
/// set by a replica with a longer window or lease TTL is never shortened. admit.lua relies on
/// reasoning instead of reading TTLs (a count of 0 means a key is new, `held` = 0 means
/// `holds` is empty, and the expiries it last set are in the state), and this is where that
/// reasoning is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_keys_expire_and_expiries_only_move_later() {
    let app = spawn_app().await;
    let (window, ttl) = (60_000, 600_000);
    let (key, _) = new_key(
        &app,
        serde_json::json!({"is_standalone": true, "initial_balance_usd": 1, "rate_limit": 100,
                           "concurrent_limit": 10}),
    )
    .await;
    let k =
        tollgate::hot::layout::Layout::new(&app.namespace).for_hash(&tollgate::keys::hash(&key));
    let reserving = hot_suite::with_key(&key, serde_json::json!({"reserve_usd": amount("0.01")}));
    let plain = hot_suite::with_key(&key, serde_json::json!({}));
    let near = |got: i64, want: i64, what: &str| {
        assert!(
            got <= want && got > want - 2_000,
            "{what}: PTTL {got} ms, expected just under {want}"
        );
    };

    // Where `live` and `holds` expire, as admit.lua keeps it in the state (`lx`); moved here
    // as time passing, or another replica, would have moved it.
    let move_lease_expiry = |ms: i64| {
        let (app, k) = (&app, &k);
        async move {
            let at = chrono::Utc::now().timestamp_millis() + ms;
            let _: i64 = redis::cmd("HSET")
                .arg(&k.state)
                .arg("lx")
                .arg(at)
                .query_async(&mut app.redis.clone())
                .await
                .expect("HSET lx");
            pexpire(app, &k.live, ms).await;
            pexpire(app, &k.holds, ms).await;
        }
    };

    let first = hot_suite::admit(&app, reserving.clone())
        .await
        .lease("first");
    // Each expiry is set two windows (lease TTLs) ahead, once a window (TTL): lib/ring.lua and
    // `lx` in admit.lua.
    near(pttl(&app, &k.rate).await, 2 * window, "a new rate ring");
    near(pttl(&app, &k.live).await, 2 * ttl, "a new live set");
    near(pttl(&app, &k.holds).await, 2 * ttl, "a new holds hash");
    let tombstone = k.lease(first.split('.').nth(1).expect("lease id"));
    assert_eq!(
        pttl(&app, &tombstone).await,
        -2,
        "an admission writes no lease record: its sealed id carries what settlement needs"
    );

    // Time passes (less than a TTL left, as if); a grant that reserves nothing still moves both
    // expiries, together.
    move_lease_expiry(ttl / 2).await;
    let plain_lease = hot_suite::admit(&app, plain.clone())
        .await
        .lease("not reserving, later");
    near(pttl(&app, &k.live).await, 2 * ttl, "the live set, extended");
    near(
        pttl(&app, &k.holds).await,
        2 * ttl,
        "holds, extended with live",
    );

    // Another replica, configured with a longer window and lease TTL, granted last.
    pexpire(&app, &k.rate, 10 * window).await;
    move_lease_expiry(10 * ttl).await;
    let second = hot_suite::admit(&app, reserving.clone())
        .await
        .lease("reserving");
    let third = hot_suite::admit(&app, plain.clone())
        .await
        .lease("not reserving");
    near(pttl(&app, &k.rate).await, 10 * window, "the rate ring");
    let live = pttl(&app, &k.live).await;
    near(live, 10 * ttl, "the live set");
    let holds = pttl(&app, &k.holds).await;
    assert!(
        (live - holds).abs() < 50,
        "holds ({holds} ms) expires with live ({live} ms)"
    );

    // Once every lease is settled the live set and holds are gone; the next grant creates
    // them again, and they must get an expiry although nothing had one to extend: the one in
    // force, which only ever moves later.
    for l in [&first, &plain_lease, &second, &third] {
        hot_suite::settle(&app, l, "0.001").await;
    }
    assert_eq!(pttl(&app, &k.live).await, -2, "no live lease left");
    assert_eq!(pttl(&app, &k.holds).await, -2, "nothing held");
    assert!(
        pttl(&app, &tombstone).await > ttl,
        "a settled lease's tombstone lives as long as its id could be settled (TTL and grace)"
    );
    hot_suite::admit(&app, reserving)
        .await
        .lease("after the settlements");
    near(pttl(&app, &k.live).await, 10 * ttl, "a re-created live set");
    near(
        pttl(&app, &k.holds).await,
        10 * ttl,
        "a re-created holds hash",
    );
}

/// After a total Redis loss the current period's spend is re-seeded from Postgres, so a spent
/// budget stays spent (single Redis only: the wipe goes through the harness's single-node
/// connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_survives_a_redis_loss() {
    use hot_suite::{admit, await_balance_used, settle, with_key};
    let app = spawn_app().await;
    let (key, id) = new_key(
        &app,
        json!({"budget_usd": 1, "budget_period": "day", "rate_limit": null,
            "concurrent_limit": null}),
    )
    .await;
    let lease = admit(&app, with_key(&key, json!({}))).await.lease("first");
    settle(&app, &lease, "1").await;
    await_balance_used(&app, &id, USD).await;
    app.wipe_namespace().await;
    admit(&app, with_key(&key, json!({}))).await.denied(
        402,
        "budget_exceeded",
        "re-seeded from Postgres after the loss",
    );
}
