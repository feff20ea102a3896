//! Sealed lease ids (issue #15): an admission writes no lease record, the id carries what settlement needs under a MAC, and these tests pin what that must keep safe — forged, altered and foreign ids are unknown, expired ones still settle, a rotated secret keeps old ids valid while it is kept, duplicates are caught, and a plain key's admission writes nothing but its rate log.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use tollgate::hot::layout::Layout;

const SECRET_1: &str = "lease-secret-one-0123456789abcdef0123456789";
const SECRET_2: &str = "lease-secret-two-0123456789abcdef0123456789";

async fn lease(app: &TestApp, key: &str, extra: Value) -> String {
    let (status, body) = app.admit(key, extra).await;
    assert_eq!(status, 200, "{body}");
    body["lease_id"].as_str().expect("lease id").to_string()
}

/// A 200 whose boolean `field` is `want`.
#[track_caller]
fn assert_answer(status: u16, body: &Value, field: &str, want: bool) {
    assert_eq!(
        (status, body[field].as_bool()),
        (200, Some(want)),
        "{field}: {body}"
    );
}

#[track_caller]
fn assert_unknown(status: u16, body: &Value, what: &str) {
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("lease_unknown")),
        "{what}: {body}"
    );
}

/// The id with one byte of its sealed payload changed and re-encoded: a well-formed id whose
/// MAC no longer matches.
fn with_payload_byte_changed(id: &str, at: usize) -> String {
    let (head, body) = id.rsplit_once('.').expect("sealed id");
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut raw = b64.decode(body).expect("base64url body");
    raw[at] ^= 0x01;
    format!("{head}.{}", b64.encode(raw))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_altered_lease_ids_are_unknown_and_change_nothing() {
    let app = spawn_app().await;
    let (key, _) = app
        .create_key(json!({"user_id": "u-forge", "is_standalone": true, "initial_balance_usd": 1}))
        .await;
    let id = lease(&app, &key, json!({"reserve_usd": 0.5})).await;

    let (head, body) = id.rsplit_once('.').expect("sealed id");
    let mut forgeries = vec![
        // The tracked flag, the admission time, the expiry (payload bytes 1, 9, 17).
        with_payload_byte_changed(&id, 1),
        with_payload_byte_changed(&id, 9),
        with_payload_byte_changed(&id, 17),
        // The MAC's last byte.
        with_payload_byte_changed(
            &id,
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(body)
                .expect("body")
                .len()
                - 1,
        ),
        // Another lease's head on this body, and this head without a body.
        format!(
            "{}.{}",
            Layout::new(&app.namespace)
                .for_hash(&"0".repeat(64))
                .lease_id("AAAAAAAAAAAAAAAAAAAAAA"),
            body
        ),
        format!("{head}.{}", "A".repeat(body.len())),
    ];
    // The same facts sealed with a secret tollgate does not hold.
    let other = {
        let mut s = app.settings.clone();
        s.insert("TOLLGATE_LEASE_SECRET", SECRET_2.into());
        let c = tollgate::config::Config::from_map(&s).expect("settings");
        tollgate::hot::lease_id::LeaseSeal::new(&app.namespace, c.lease_secrets)
    };
    let opened = app
        .hot_path()
        .open_lease(&id)
        .expect("the genuine id opens");
    forgeries.push(other.seal(
        &opened.keys,
        &opened.nonce,
        opened.facts.as_ref().expect("sealed facts"),
    ));
    for forged in &forgeries {
        assert_ne!(forged, &id);
        let (status, body) = app.settle(forged, "0.25").await;
        assert_unknown(status, &body, &format!("settle {forged}"));
        let (status, body) = app.release(forged).await;
        assert_unknown(status, &body, &format!("release {forged}"));
    }

    // None of them touched the real lease: it still holds its reserve and settles once.
    let (status, body) = app.settle(&id, "0.25").await;
    assert_eq!(
        (
            status,
            body["settled"].as_bool(),
            body["duplicate"].as_bool()
        ),
        (200, Some(true), Some(false)),
        "{body}"
    );
    assert_eq!(body["balance_remaining_usd"].to_string(), "0.75", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_id_still_settles_with_lease_expired() {
    let app = spawn_app().await;
    let (key, _) = app.create_key(json!({"user_id": "u-late"})).await;
    let id = lease(&app, &key, json!({"lease_ttl_seconds": 1})).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let (status, body) = app.settle(&id, "0.01").await;
    assert_eq!(
        (
            status,
            body["settled"].as_bool(),
            body["lease_expired"].as_bool()
        ),
        (200, Some(true), Some(true)),
        "{body}"
    );
    let (status, body) = app.settle(&id, "0.01").await;
    assert_answer(status, &body, "duplicate", true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_id_from_another_namespace_is_unknown() {
    // Same encryption key, so the same derived secret: only the namespace differs.
    let a = spawn_app().await;
    let b = spawn_app().await;
    let (key, _) = a.create_key(json!({"user_id": "u-ns"})).await;
    let id = lease(&a, &key, json!({})).await;
    let (status, body) = b.settle(&id, "0.01").await;
    assert_unknown(status, &body, "settled in another namespace");
    let (status, body) = b.release(&id).await;
    assert_unknown(status, &body, "released in another namespace");
    let (status, body) = a.settle(&id, "0.01").await;
    assert_answer(status, &body, "settled", true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_sealed_before_a_secret_rotation_settles_while_the_previous_secret_is_kept() {
    let before = spawn_app_with(|s| {
        s.insert("TOLLGATE_LEASE_SECRET", SECRET_1.into());
    })
    .await;
    let (key, _) = before.create_key(json!({"user_id": "u-rotate"})).await;
    let kept = lease(&before, &key, json!({})).await;
    let dropped = lease(&before, &key, json!({})).await;

    let rotating = before
        .replica_with(|s| {
            s.insert("TOLLGATE_LEASE_SECRET", SECRET_2.into());
            s.insert("TOLLGATE_LEASE_SECRET_PREVIOUS", SECRET_1.into());
        })
        .await;
    let (status, body) = rotating.settle(&kept, "0.01").await;
    assert_eq!(
        (
            status,
            body["settled"].as_bool(),
            body["duplicate"].as_bool()
        ),
        (200, Some(true), Some(false)),
        "sealed with the previous secret, settled by a replica that keeps it: {body}"
    );
    // What the new secret seals, the old replica cannot open (it holds only the old one).
    let fresh = lease(&rotating, &key, json!({})).await;
    let (status, body) = before.settle(&fresh, "0.01").await;
    assert_unknown(status, &body, "a new-secret id at a replica without it");

    let done = before
        .replica_with(|s| {
            s.insert("TOLLGATE_LEASE_SECRET", SECRET_2.into());
        })
        .await;
    let (status, body) = done.settle(&dropped, "0.01").await;
    assert_unknown(status, &body, "the previous secret dropped");
    let (status, body) = done.settle(&fresh, "0.01").await;
    assert_answer(status, &body, "settled", true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_lease_is_charged_once_whichever_replica_sees_it_again() {
    let app = spawn_app().await;
    let replica = app.replica().await;
    let (key, _) = app
        .create_key(json!({"user_id": "u-dup", "is_standalone": true, "initial_balance_usd": 1}))
        .await;
    let id = lease(&app, &key, json!({})).await;
    let (status, body) = app.settle(&id, "0.25").await;
    assert_answer(status, &body, "duplicate", false);
    for (who, r) in [("the replica", &replica), ("the same process", &app)] {
        let (status, body) = r.settle(&id, "0.25").await;
        assert_eq!(
            (status, body["duplicate"].as_bool()),
            (200, Some(true)),
            "{who}: {body}"
        );
        assert_eq!(body["balance_remaining_usd"].to_string(), "0.75", "{body}");
    }
    let (status, body) = replica.release(&id).await;
    assert_answer(status, &body, "released", true);
    let (status, body) = app.settle(&id, "0.25").await;
    assert_answer(status, &body, "duplicate", true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_keys_admission_writes_nothing_but_its_rate_log() {
    let app = spawn_app().await;
    let (key, _) = app
        .create_key(json!({"user_id": "u-plain", "rate_limit": 100, "concurrent_limit": null}))
        .await;
    let k = Layout::new(&app.namespace).for_hash(&tollgate::keys::hash(&key));
    let before: BTreeSet<String> = app.namespace_keys().await.into_iter().collect();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, body) = app.admit(&key, json!({})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["concurrency"]["in_flight"], 0,
            "nothing counts them: {body}"
        );
        ids.push(body["lease_id"].as_str().expect("lease").to_string());
    }
    let after: BTreeSet<String> = app.namespace_keys().await.into_iter().collect();
    // The syncer creates the shards' usage streams (`…:u`) on its own schedule.
    let written: BTreeSet<String> = after
        .difference(&before)
        .filter(|k| !k.ends_with(":u"))
        .cloned()
        .collect();
    let expected: BTreeSet<String> = [k.rate.clone()]
        .into_iter()
        .chain((!before.contains(&k.state)).then(|| k.state.clone()))
        .collect();
    assert_eq!(
        written, expected,
        "only the rate log (and the state, hydrated)"
    );

    // Settling writes the tombstone that catches a replay, for as long as the id is valid.
    let (status, body) = app.settle(&ids[0], "0.01").await;
    assert_answer(status, &body, "settled", true);
    let tombstone = k.lease(ids[0].split('.').nth(1).expect("nonce"));
    let mut c = app.redis.clone();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&tombstone)
        .query_async(&mut c)
        .await
        .expect("pttl");
    let valid_for = 600_000 + 3_600_000;
    assert!(
        ttl > valid_for - 10_000 && ttl <= valid_for,
        "the tombstone lives until the id's deadline: {ttl} ms"
    );
    // Releasing an untracked lease writes its tombstone and nothing else.
    let (status, body) = app.release(&ids[1]).await;
    assert_answer(status, &body, "released", true);
    let exists: i64 = redis::cmd("EXISTS")
        .arg(k.live.as_str())
        .query_async(&mut c)
        .await
        .expect("exists");
    assert_eq!(exists, 0, "a plain key never has a live set");
}

/// A lease id of the form issued before sealed ids (`<sid>.<nonce>`, its facts in a record in
/// Redis) still settles once and is still released: the upgrade path of `settle.lua` and
/// `release.lua`. The records are written as the previous `admit.lua` wrote them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_id_from_before_sealed_ids_still_settles_and_releases() {
    let app = spawn_app().await;
    let (key, api_key) = app
        .create_key(
            json!({"user_id": "u-legacy", "is_standalone": true, "initial_balance_usd": 1,
                           "concurrent_limit": null}),
        )
        .await;
    let key_id = api_key["id"].as_str().expect("id").to_string();
    // Hydrates the key's state, as the old admission had.
    lease(&app, &key, json!({})).await;
    let k = Layout::new(&app.namespace).for_hash(&tollgate::keys::hash(&key));
    let now = chrono::Utc::now().timestamp_millis();
    let mut c = app.redis.clone();
    let legacy = || {
        let nonce = tollgate::hot::layout::new_nonce();
        (k.lease(&nonce), k.lease_id(&nonce))
    };
    let (settled_record, settled_id) = legacy();
    let (released_record, released_id) = legacy();
    for record in [&settled_record, &released_record] {
        let _: () = redis::Script::new(
            "redis.call('SET', KEYS[1], 'L' .. cmsgpack.pack(ARGV[1], ARGV[2], ARGV[3], \
             ARGV[4], ARGV[5], ARGV[6], ARGV[7]), 'PX', 600000)",
        )
        .key(record)
        .arg(&key_id)
        .arg("u-legacy")
        .arg("openai")
        .arg("openai:chat")
        .arg("gpt-4o")
        .arg(now)
        .arg(now + 60_000)
        .invoke_async(&mut c)
        .await
        .expect("write a legacy record");
    }

    let (status, body) = app.settle(&settled_id, "0.25").await;
    assert_answer(status, &body, "duplicate", false);
    assert_eq!(body["balance_remaining_usd"].to_string(), "0.75", "{body}");
    let (status, body) = app.settle(&settled_id, "0.25").await;
    assert_answer(status, &body, "duplicate", true);

    let (status, body) = app.release(&released_id).await;
    assert_answer(status, &body, "released", true);
    let (status, body) = app.settle(&released_id, "0.25").await;
    assert_answer(status, &body, "duplicate", false);

    let recorded = app
        .eventually(Duration::from_secs(10), || async {
            let model: Option<String> =
                sqlx::query_scalar("SELECT model FROM usage_events WHERE event_id = $1")
                    .bind(&settled_id)
                    .fetch_optional(&app.db)
                    .await
                    .expect("query usage");
            model.as_deref() == Some("gpt-4o")
        })
        .await;
    assert!(
        recorded,
        "the legacy lease's usage reached Postgres with its record's model"
    );
}

/// `settle.lua` finds a sealed lease's duplicate only when it writes the tombstone, after its
/// bounds; so a bound that would refuse the settlement must first rule out a replay. A retried
/// settlement of a lease already settled answers `duplicate` and charges nothing, even when the
/// key's `used` has since come so close to 2^62 that a first settlement of the same cost is
/// refused (`422` `limit_exceeded`, as a fresh lease in that state shows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_lease_settled_again_is_a_duplicate_even_where_a_first_settlement_is_refused() {
    let app = spawn_app().await;
    let (key, api_key) = app.create_key(json!({"user_id": "u-near-max"})).await;
    let key_id = api_key["id"].as_str().expect("id").to_string();
    let settled = lease(&app, &key, json!({})).await;
    let fresh = lease(&app, &key, json!({})).await;
    let (status, body) = app.settle(&settled, "0.25").await;
    assert_answer(status, &body, "duplicate", false);

    // 2^62 nano-USD, the lifetime bound: any cost above 0 now passes it.
    const MAX_USED: &str = "4611686018427387904";
    let state = Layout::new(&app.namespace)
        .for_hash(&tollgate::keys::hash(&key))
        .state;
    let mut c = app.redis.clone();
    let _: () = redis::cmd("HSET")
        .arg(&state)
        .arg("used")
        .arg(MAX_USED)
        .query_async(&mut c)
        .await
        .expect("hset used");

    let (status, body) = app.settle(&settled, "0.25").await;
    assert_answer(status, &body, "duplicate", true);
    assert_eq!(body["settled"].as_bool(), Some(true), "{body}");
    let (status, body) = app.settle(&fresh, "0.25").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (422, Some("limit_exceeded")),
        "a first settlement in that state: {body}"
    );

    let used: String = redis::cmd("HGET")
        .arg(&state)
        .arg("used")
        .query_async(&mut c)
        .await
        .expect("hget used");
    assert_eq!(used, MAX_USED, "neither the replay nor the refusal charged");
    let first = event_id(&settled);
    let recorded = app
        .eventually(Duration::from_secs(10), || async {
            app.usage_events_with_id(&first).await == 1
        })
        .await;
    assert!(recorded, "the first settlement reached Postgres");
    assert_eq!(
        app.usage_events_of_key(&key_id).await,
        1,
        "one usage event: the replay and the refusal recorded nothing"
    );
}

/// A sealed lease settled before Redis lost its data and settled again after it (its tombstone
/// went with the data) is charged twice in Redis: the key's `used`, seeded again from
/// Postgres, already holds the first charge. Postgres keeps one event; the syncer sees that
/// the event it has is another settlement's, and gives the second charge back in Redis with
/// the acknowledgement, so the balance answered afterwards is charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_repeated_after_a_redis_loss_is_charged_once_in_redis_too() {
    use crate::common::hot_suite::{admit, await_balance_used, settle, with_key};
    let app = spawn_app().await;
    let (key, id) = new_key(
        &app,
        json!({"is_standalone": true, "initial_balance_usd": 1, "concurrent_limit": null}),
    )
    .await;
    let first = admit(&app, with_key(&key, json!({})))
        .await
        .lease("before the loss");
    settle(&app, &first, "0.25").await.assert_clean();
    await_balance_used(&app, &id, nanos(&amount("0.25"))).await;

    assert!(
        !app.wipe_namespace().await.is_empty(),
        "Redis lost the namespace"
    );
    // The next admission loads the key again, `used` seeded with the first charge.
    admit(&app, with_key(&key, json!({})))
        .await
        .lease("after the loss");
    let again = settle(&app, &first, "0.25").await;
    assert_eq!(
        again.json()["duplicate"],
        false,
        "the tombstone went with Redis: {}",
        again.json()
    );
    assert_eq!(
        nanos(&again.json()["balance_remaining_usd"]),
        nanos(&amount("0.5")),
        "charged again in Redis until the syncer finds the repeat"
    );

    let hot = app.hot_path();
    let hash = tollgate::keys::hash(&key);
    let once = tollgate::money::Money::from_nanos(nanos(&amount("0.25")));
    let mut used = None;
    for _ in 0..200 {
        used = hot.used(&hash).await.expect("Redis");
        if used == Some(once) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(used, Some(once), "the repeat's charge given back in Redis");
    await_balance_used(&app, &id, nanos(&amount("0.25"))).await;
    let fresh = admit(&app, with_key(&key, json!({}))).await;
    assert_eq!(
        nanos(&fresh.json()["balance_remaining_usd"]),
        nanos(&amount("0.75")),
        "the balance answered is charged once: {}",
        fresh.json()
    );
    // Given back once: later passes of the syncer leave it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(hot.used(&hash).await.expect("Redis"), Some(once));
}
