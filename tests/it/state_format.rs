//! `TOLLGATE_STATE_FORMAT=2`: a lease that holds something carries its hold in its live-set
//! member (`<nonce>=<hold>`) and its sealed id, not in the key's `holds` hash. Every scenario
//! of the hot-path suite holds in it, and leases of both formats on one key — a fleet that
//! switched while leases were live — each give their hold back once, however they end.

use crate::common;

use std::time::Duration;

use common::hot_suite::{self, admit, release, settle, with_key};
use common::*;
use serde_json::json;
use tollgate::hot::layout::{KeyRedisKeys, Layout};

fn format_two(s: &mut hot_suite::Settings) {
    s.insert("TOLLGATE_STATE_FORMAT", "2".into());
}

/// One test of `hot_suite::$scenario` on its own tollgate in state format 2, with the
/// scenario's own settings tweak.
macro_rules! in_format_two {
    ($scenario:ident) => {
        in_format_two!($scenario, |_: &mut hot_suite::Settings| {});
    };
    ($scenario:ident, $tweak:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $scenario() {
            let app = spawn_app_with(|s| {
                format_two(s);
                ($tweak)(s);
            })
            .await;
            hot_suite::$scenario(&app).await;
        }
    };
}

mod every_scenario {
    use super::*;
    hot_suite::every_scenario!(in_format_two);
}

fn redis_keys(app: &TestApp, key: &str) -> KeyRedisKeys {
    Layout::new(&app.namespace).for_hash(&tollgate::keys::hash(key))
}

async fn live_members(app: &TestApp, k: &KeyRedisKeys) -> Vec<String> {
    redis::cmd("ZRANGE")
        .arg(&k.live)
        .arg(0)
        .arg(-1)
        .query_async(&mut app.redis.clone())
        .await
        .expect("ZRANGE")
}

async fn holds(app: &TestApp, k: &KeyRedisKeys) -> Vec<String> {
    redis::cmd("HKEYS")
        .arg(&k.holds)
        .query_async(&mut app.redis.clone())
        .await
        .expect("HKEYS")
}

async fn held(app: &TestApp, k: &KeyRedisKeys) -> (i64, i64) {
    let (held, htok): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
        .arg(&k.state)
        .arg("held")
        .arg("htok")
        .query_async(&mut app.redis.clone())
        .await
        .expect("HMGET");
    (held.unwrap_or(0), htok.unwrap_or(0))
}

#[track_caller]
fn ok(a: &Answer) {
    assert_eq!(a.status, 200, "{}: {}", a.what, a.text);
}

/// The nonce of a lease id (`<sid>.<nonce>.<sealed body>`).
fn nonce(lease: &str) -> &str {
    lease.split('.').nth(1).expect("a sealed lease id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_in_format_two_is_written_in_the_live_member_alone_and_leaves_with_it() {
    let app = spawn_app_with(format_two).await;
    let (key, _) = new_key(
        &app,
        json!({"is_standalone": true, "initial_balance_usd": 5, "rate_limit": null,
            "concurrent_limit": 3, "token_limit": 100000}),
    )
    .await;
    let k = redis_keys(&app, &key);
    let a = admit(
        &app,
        with_key(
            &key,
            json!({"reserve_usd": amount("1.25"), "reserve_tokens": 700}),
        ),
    )
    .await
    .lease("a hold of money and tokens");
    let b = admit(&app, with_key(&key, json!({"reserve_usd": amount("0.5")})))
        .await
        .lease("a hold of money");
    let c = admit(&app, with_key(&key, json!({})))
        .await
        .lease("a slot without a hold");
    let mut members = live_members(&app, &k).await;
    members.sort();
    let mut want = vec![
        format!("{}=1250000000:700", nonce(&a)),
        format!("{}=500000000", nonce(&b)),
        nonce(&c).to_string(),
    ];
    want.sort();
    assert_eq!(
        members, want,
        "each hold in its member, a slot alone as its nonce"
    );
    assert!(
        holds(&app, &k).await.is_empty(),
        "nothing in the holds hash"
    );
    assert_eq!(held(&app, &k).await, (1_750_000_000, 700));

    let s = settle(&app, &a, "0.75").await;
    ok(&s);
    assert_eq!(s.balance(), Some(5 * USD - 750_000_000 - 500_000_000));
    ok(&release(&app, &b).await);
    assert_eq!(held(&app, &k).await, (0, 0), "both holds given back");
    assert_eq!(live_members(&app, &k).await, vec![nonce(&c).to_string()]);
    // Ending them again gives nothing back twice.
    settle(&app, &a, "0.75").await;
    release(&app, &b).await;
    assert_eq!(held(&app, &k).await, (0, 0));
    let again = admit(&app, with_key(&key, json!({"reserve_usd": amount("0.5")}))).await;
    assert_eq!(again.balance(), Some(5 * USD - 750_000_000 - 500_000_000));
    assert_eq!(
        again.body["concurrency"]["in_flight"],
        json!(2),
        "c and this one"
    );
}

/// A fleet moving to format 2 has leases of both on its keys, ended by replicas of either
/// setting: each lease gives back exactly its own hold and slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_both_formats_on_one_key_each_give_their_hold_back_once() {
    let one = spawn_app().await;
    let two = one.replica_with(format_two).await;
    let (key, _) = new_key(
        &one,
        json!({"is_standalone": true, "initial_balance_usd": 10, "rate_limit": null,
            "concurrent_limit": 10}),
    )
    .await;
    let k = redis_keys(&one, &key);
    let body = |usd: &str| with_key(&key, json!({"reserve_usd": amount(usd)}));
    let a = admit(&one, body("1")).await.lease("format 1");
    let b = admit(&two, body("2")).await.lease("format 2");
    let c = admit(&one, body("3")).await.lease("format 1");
    let d = admit(&two, body("0.5")).await.lease("format 2");
    assert_eq!(holds(&one, &k).await.len(), 2, "a and c in the holds hash");
    assert_eq!(held(&one, &k).await.0, 6_500_000_000);

    // Each ended by a replica of the other setting, settled or released.
    ok(&settle(&two, &a, "0.25").await);
    ok(&settle(&one, &b, "0.5").await);
    ok(&release(&two, &c).await);
    ok(&release(&one, &d).await);
    assert_eq!(held(&one, &k).await, (0, 0));
    assert!(live_members(&one, &k).await.is_empty(), "every slot free");
    assert!(holds(&one, &k).await.is_empty());
    // A duplicate from the other side changes nothing.
    settle(&one, &a, "0.25").await;
    settle(&two, &b, "0.5").await;
    assert_eq!(held(&one, &k).await, (0, 0));

    let next = admit(&one, body("1")).await;
    next.lease("after all ended");
    assert_eq!(next.balance(), Some(10 * USD - 750_000_000 - USD));
    assert_eq!(next.body["concurrency"]["in_flight"], json!(1));
}

/// Leases of both formats that nobody ends: the admission that finds them expired gives each
/// hold back, whichever format wrote it and whichever replica admits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_leases_of_both_formats_give_their_holds_back_to_the_next_admission() {
    let one = spawn_app_with(hot_suite::short_lease).await;
    let two = one.replica_with(format_two).await;
    let (key, _) = new_key(
        &one,
        json!({"is_standalone": true, "initial_balance_usd": 4, "rate_limit": null,
            "concurrent_limit": 2}),
    )
    .await;
    let k = redis_keys(&one, &key);
    let body = |usd: &str| with_key(&key, json!({"reserve_usd": amount(usd)}));
    admit(&one, body("1")).await.lease("format 1");
    admit(&two, body("2")).await.lease("format 2");
    admit(&two, body("0.5"))
        .await
        .denied(429, "concurrency_limited", "both slots taken");
    // Past the 1 s TTL (not past twice it, when the lease keys would lapse whole).
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for (app, usd) in [(&two, "0.5"), (&one, "0.25")] {
        let r = admit(app, body(usd)).await;
        r.lease("the expired leases' slots are free");
        assert!(r.balance().is_some());
    }
    // 4 USD, the two new holds (0.75) out; the expired 3 back.
    assert_eq!(held(&one, &k).await.0, 750_000_000);
    let last = admit(&one, body("0")).await;
    last.denied(
        429,
        "concurrency_limited",
        "the two new leases fill the slots",
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let after = admit(&one, body("0")).await;
    after.lease("all expired");
    assert_eq!(
        after.balance(),
        Some(4 * USD),
        "every hold back exactly once"
    );
}
