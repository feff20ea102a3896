//! Scripts that never half-write: admit.lua, settle.lua, release.lua, hydrate.lua and ack.lua check every bound before their first write (or their typed caller does, before any call), and a refused call leaves every key it touches byte-for-byte unchanged (DUMP before and after).

use crate::common;

use std::time::Duration;

use common::*;
use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use tollgate::hot::admission::{AdmitArgs, LeaseTerm, ScriptAdmit, SettleArgs};
use tollgate::hot::layout::Layout;
use tollgate::hot::lease_id::LeaseRef;
use tollgate::hot::redis::{Redis, RedisFailure};
use tollgate::hot::scripts::{settle, ScriptArg, Scripts};
use tollgate::money::Money;

/// 2^62 nano-USD: a key's lifetime spend (lua/settle.lua).
const MAX_USED: i64 = 1 << 62;
/// 2^53 - 1 nano-USD: the largest settlement.
const MAX_COST: i64 = (1 << 53) - 1;
const MAX_COST_USD: &str = "9007199.254740991";

async fn dump(redis: &MultiplexedConnection, keys: &[String]) -> Vec<Option<Vec<u8>>> {
    let mut c = redis.clone();
    let mut out = Vec::new();
    for k in keys {
        let v: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(k)
            .query_async(&mut c)
            .await
            .expect("dump");
        out.push(v);
    }
    out
}

async fn hset(redis: &MultiplexedConnection, key: &str, field: &str, value: &str) {
    let mut c = redis.clone();
    let _: i64 = redis::cmd("HSET")
        .arg(key)
        .arg(field)
        .arg(value)
        .query_async(&mut c)
        .await
        .expect("hset");
}

async fn hget(redis: &MultiplexedConnection, key: &str, field: &str) -> Option<String> {
    let mut c = redis.clone();
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async(&mut c)
        .await
        .expect("hget")
}

/// One field set to raw bytes, or removed (`None`).
type FieldWrite<'a> = (&'a str, Option<&'a [u8]>);

async fn hget_bytes(redis: &MultiplexedConnection, key: &str, field: &str) -> Option<Vec<u8>> {
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async(&mut redis.clone())
        .await
        .expect("hget")
}

/// Sets a field to raw bytes, or removes it (`None`).
async fn hset_bytes(redis: &MultiplexedConnection, key: &str, field: &str, value: Option<&[u8]>) {
    let cmd = match value {
        Some(v) => {
            let mut c = redis::cmd("HSET");
            c.arg(key).arg(field).arg(v);
            c
        }
        None => {
            let mut c = redis::cmd("HDEL");
            c.arg(key).arg(field);
            c
        }
    };
    let _: i64 = cmd.query_async(&mut redis.clone()).await.expect("hset");
}

/// Every key settle.lua touches for this lease: state, live, holds, lease record, stream,
/// token window.
fn settle_keys(lease: &LeaseRef) -> Vec<String> {
    vec![
        lease.keys.state.clone(),
        lease.keys.live.clone(),
        lease.keys.holds.clone(),
        lease.keys.lease(&lease.nonce),
        lease.keys.stream(),
        lease.keys.tokens.clone(),
    ]
}

fn hot_redis() -> Redis {
    Redis::new(vec![redis_url()], Duration::from_secs(2))
}

#[track_caller]
fn assert_refused(result: Result<redis::Value, RedisFailure>, want: &str) {
    match result {
        Err(RedisFailure::Refused { code, .. }) => assert_eq!(code, want),
        other => panic!("expected a {want} refusal, got {other:?}"),
    }
}

async fn settle_raw(app: &TestApp, lease: &str, cost: &str) -> (u16, Value) {
    let res = app
        .post_data(
            "/v1/settle",
            json!({"lease_id": lease, "cost_usd": amount(cost)}),
        )
        .await;
    let status = res.status().as_u16();
    (status, res.json().await.expect("settle answers JSON"))
}

/// An app whose syncer is off: a syncer polling the usage streams would change their DUMP
/// (its consumer's last-seen time) between the before and the after of a check.
async fn release_raw(app: &TestApp, lease: &str) -> (u16, Value) {
    let res = app
        .post_data("/v1/release", json!({"lease_id": lease}))
        .await;
    let status = res.status().as_u16();
    (status, res.json().await.expect("release answers JSON"))
}

async fn no_sync_app() -> TestApp {
    spawn_app_with(|s| {
        s.insert("TOLLGATE_SYNC_ENABLED", "false".into());
    })
    .await
}

/// A standalone key with a balance of 5 USD, so that its leases can hold money.
async fn standalone_key(app: &TestApp, user: &str) -> String {
    let (key, _) = app
        .create_key(json!({"user_id": user, "is_standalone": true, "initial_balance_usd": 5}))
        .await;
    key
}

async fn lease_of(app: &TestApp, key: &str, extra: Value) -> (String, LeaseRef) {
    let (status, body) = app.admit(key, extra).await;
    assert_eq!(status, 200, "{body}");
    let id = body["lease_id"].as_str().expect("lease").to_string();
    let lease = app.hot_path().open_lease(&id).expect("lease ref");
    (id, lease)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_that_would_pass_the_lifetime_limit_is_refused_422_and_changes_nothing() {
    let app = no_sync_app().await;
    let (key, _) = app
        .create_key(json!({"user_id": "u-limit", "rate_limit": null, "concurrent_limit": null}))
        .await;
    let (id, lease) = lease_of(&app, &key, json!({})).await;
    let keys = settle_keys(&lease);
    // One nano-dollar too many: used + cost = 2^62 + 1.
    let used = (MAX_USED - MAX_COST + 1).to_string();
    hset(&app.redis, &lease.keys.state, "used", &used).await;

    let before = dump(&app.redis, &keys).await;
    let (status, body) = settle_raw(&app, &id, MAX_COST_USD).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["code"], "limit_exceeded", "{body}");
    assert!(body["message"].is_string(), "{body}");
    assert_eq!(
        dump(&app.redis, &keys).await,
        before,
        "a refused settlement changes none of its keys"
    );

    // Exactly at the limit is allowed: the bound is compared exactly, not as a rounded number.
    let used = (MAX_USED - MAX_COST).to_string();
    hset(&app.redis, &lease.keys.state, "used", &used).await;
    let (status, body) = settle_raw(&app, &id, MAX_COST_USD).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["settled"], true, "{body}");
    assert_eq!(
        hget(&app.redis, &lease.keys.state, "used").await,
        Some(MAX_USED.to_string())
    );
    // Not one nano-dollar more.
    let (id, lease) = lease_of(&app, &key, json!({})).await;
    let keys = settle_keys(&lease);
    let before = dump(&app.redis, &keys).await;
    let (status, body) = settle_raw(&app, &id, "0.000000001").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(dump(&app.redis, &keys).await, before);
    // A settlement of nothing still goes through, and a duplicate still answers duplicate.
    let (status, body) = settle_raw(&app, &id, "0").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = settle_raw(&app, &id, "0").await;
    assert_eq!((status, &body["duplicate"]), (200, &json!(true)), "{body}");
    let refusals = app
        .metric_sum(
            "tollgate_script_refusals_total",
            Some("code=\"LIMIT_EXCEEDED\""),
        )
        .await;
    assert!(refusals >= 2.0, "refusals counted: {refusals}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_512_settlements_of_the_largest_cost_the_next_is_refused_and_its_lease_stays_live() {
    let app = no_sync_app().await;
    let (key, _) = app
        .create_key(json!({"user_id": "u-whale", "rate_limit": null, "concurrent_limit": 2}))
        .await;
    for i in 0..512 {
        let (id, _) = lease_of(&app, &key, json!({})).await;
        let (status, body) = settle_raw(&app, &id, MAX_COST_USD).await;
        assert_eq!(status, 200, "settlement {i}: {body}");
    }
    let (id, lease) = lease_of(&app, &key, json!({})).await;
    let keys = settle_keys(&lease);
    let before = dump(&app.redis, &keys).await;
    let (status, body) = settle_raw(&app, &id, MAX_COST_USD).await;
    assert_eq!(status, 422, "version 1 answered 503 here: {body}");
    assert_eq!(body["code"], "limit_exceeded", "{body}");
    assert_eq!(dump(&app.redis, &keys).await, before);
    // The lease is still live (version 1 had removed it): it holds its slot until released.
    let mut c = app.redis.clone();
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(&lease.keys.live)
        .arg(&lease.nonce)
        .query_async(&mut c)
        .await
        .expect("zscore");
    assert!(
        score.is_some(),
        "the refused settlement's lease is still live"
    );
    let (status, body) = app.release(&id).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "admission goes on: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_calls_with_bad_arguments_or_corrupt_state_are_refused_before_any_write() {
    let app = no_sync_app().await;
    let key = standalone_key(&app, "u-bad").await;
    // A lease with a hold, so that settling it would touch every key.
    let (id, lease) = lease_of(&app, &key, json!({"reserve_usd": 1})).await;
    let keys = settle_keys(&lease);
    let redis = hot_redis();
    let scripts = Scripts::default();
    // What settle.lua declares (its header: state, tombstone, stream); it names the others.
    let key_refs = [keys[0].as_str(), &keys[3], &keys[4]];
    // Arguments out of the script's range are refused by its typed caller, before any call.
    let hot = app.hot_path();
    let before = dump(&app.redis, &keys).await;
    let big = (MAX_COST as u64) + 1;
    for (args, want) in [
        (
            SettleArgs {
                cost: Some(Money::from_nanos(MAX_COST + 1)),
                ..SettleArgs::default()
            },
            "LIMIT_EXCEEDED",
        ),
        (
            SettleArgs {
                cost: Some(Money::from_nanos(-1)),
                ..SettleArgs::default()
            },
            "INVALID_ARGUMENT",
        ),
        (
            SettleArgs {
                cost: Some(Money::ZERO),
                input_tokens: big,
                ..SettleArgs::default()
            },
            "INVALID_ARGUMENT",
        ),
        (
            SettleArgs {
                cost: Some(Money::ZERO),
                total_tokens: Some(big),
                ..SettleArgs::default()
            },
            "INVALID_ARGUMENT",
        ),
    ] {
        let args = SettleArgs {
            lease_id: &id,
            ..args
        };
        match hot.settle(&args).await {
            Err(RedisFailure::Refused { code, .. }) => assert_eq!(code, want, "{args:?}"),
            other => panic!("expected a {want} refusal of {args:?}, got {other:?}"),
        }
        assert_eq!(dump(&app.redis, &keys).await, before, "{args:?}");
    }
    // A settlement of a lease id from before sealed ids (its facts in a record), in
    // settle.lua's order: cost, total tokens, tombstone TTL, event id, 'any', window,
    // 'record', input and output tokens, response time, status code, the labels.
    let a = |cost: &'static str| {
        vec![
            ScriptArg::Str(cost),
            ScriptArg::Str("3"),
            ScriptArg::Str("600000"),
            ScriptArg::Str(&id),
            ScriptArg::Str("any"),
            ScriptArg::Str("60000"),
            ScriptArg::Str("record"),
            ScriptArg::Str("1"),
            ScriptArg::Str("2"),
            ScriptArg::Str("-1"),
            ScriptArg::Str("-1"),
            ScriptArg::Str(""),
            ScriptArg::Str(""),
            ScriptArg::Str(""),
        ]
    };
    // State no script writes: `used` that is not a number.
    hset(&app.redis, &lease.keys.state, "used", "lots").await;
    let before = dump(&app.redis, &keys).await;
    assert_refused(
        scripts.settle.run(&redis, &key_refs, &a("1000")).await,
        "CORRUPT_STATE",
    );
    assert_eq!(dump(&app.redis, &keys).await, before);
    let (status, body) = settle_raw(&app, &id, "0.01").await;
    assert_eq!(
        status, 500,
        "corrupt state is an internal error, not 503: {body}"
    );
    assert_eq!(body["code"], "internal", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hydrate_calls_out_of_bounds_are_refused_before_any_write() {
    require_services().await;
    let ns = unique("t");
    let layout = Layout::new(&ns);
    let redis = hot_redis();
    let scripts = Scripts::default();
    let mut c = redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let state = layout
        .for_hash(&tollgate::keys::hash("sk-hydrate-test"))
        .state;
    let key_args = |version: &'static str, bal: &'static str, used: &'static str| {
        vec![
            ScriptArg::Str("key"),
            ScriptArg::Str(version),
            ScriptArg::Str("7c9e6679-7425-40de-944b-e07fc1f90ae7"),
            ScriptArg::Str("u-1"),
            ScriptArg::Str("1"),
            ScriptArg::Str(""),
            ScriptArg::Str(""),
            ScriptArg::Str(""),
            ScriptArg::Str(""),
            ScriptArg::Str("-1"),
            ScriptArg::Str("-1"),
            ScriptArg::Str("1"),
            ScriptArg::Str(bal),
            ScriptArg::Str(used),
            ScriptArg::Str("-1"),
            ScriptArg::Str("-1"),
            ScriptArg::Str(""),
            ScriptArg::Str("0"),
            ScriptArg::Str(""),
        ]
    };
    let cases: Vec<(Vec<ScriptArg<'static>>, &str)> = vec![
        // Version 1 wrote these: a balance admit.lua cannot compare exactly, a `used` past
        // the lifetime bound.
        (key_args("2", "9007199254740992", "0"), "LIMIT_EXCEEDED"),
        (key_args("2", "5", "4611686018427387905"), "LIMIT_EXCEEDED"),
        (key_args("two", "5", "0"), "INVALID_ARGUMENT"),
        (key_args("2", "5", "-3"), "INVALID_ARGUMENT"),
        // A rate limit past the 32 bits the folded configuration keeps (lib/config.lua).
        (
            {
                let mut a = key_args("2", "5", "0");
                a[9] = ScriptArg::Str("2147483648");
                a
            },
            "INVALID_ARGUMENT",
        ),
        // Version 1 set the `none` marker, then failed on the TTL: a marker for ever.
        (
            vec![ScriptArg::Str("none"), ScriptArg::Str("soon")],
            "INVALID_ARGUMENT",
        ),
        (
            vec![ScriptArg::Str("none"), ScriptArg::Str("0")],
            "INVALID_ARGUMENT",
        ),
    ];
    // Once on a key that does not exist, once on one that does.
    for existing in [false, true] {
        if existing {
            let written = scripts
                .hydrate
                .run(&redis, &[&state], &key_args("1", "5", "7"))
                .await
                .expect("a valid hydrate");
            assert!(format!("{written:?}").contains("written"), "{written:?}");
        }
        for (args, want) in &cases {
            let before = dump(&c, std::slice::from_ref(&state)).await;
            assert_refused(scripts.hydrate.run(&redis, &[&state], args).await, want);
            assert_eq!(
                dump(&c, std::slice::from_ref(&state)).await,
                before,
                "existing: {existing}, {args:?}"
            );
        }
    }
    let _: i64 = redis::cmd("DEL")
        .arg(&state)
        .query_async(&mut c)
        .await
        .expect("del");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_calls_with_bad_ids_are_refused_before_any_write_and_a_charge_is_given_back_once() {
    require_services().await;
    let ns = unique("t");
    let stream = Layout::new(&ns).streams()[0].clone();
    let redis = hot_redis();
    let scripts = Scripts::default();
    let mut c = redis::Client::open(redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let _: String = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut c)
        .await
        .expect("group");
    let mut ids = Vec::new();
    for i in 0..3 {
        let id: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg("e")
            .arg(i)
            .query_async(&mut c)
            .await
            .expect("xadd");
        ids.push(id);
    }
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("c")
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut c)
        .await
        .expect("read");
    let before = dump(&c, std::slice::from_ref(&stream)).await;
    let bad: Vec<String> = vec![ids[0].clone(), "not-an-id".into(), ids[1].clone()];
    let too_many: Vec<String> = (0..1001).map(|_| ids[0].clone()).collect();
    // A give-back (`<id>=<nano-USD>`) needs its state key, and a whole amount.
    let unkeyed: Vec<String> = vec![format!("{}=5", ids[0])];
    let empty_amount: Vec<String> = vec![format!("{}=", ids[0])];
    let huge_amount: Vec<String> = vec![format!("{}=12345678901234567", ids[0])];
    for (group, list, want) in [
        ("g", &bad, "INVALID_ARGUMENT"),
        ("", &ids, "INVALID_ARGUMENT"),
        ("g", &too_many, "LIMIT_EXCEEDED"),
        ("g", &unkeyed, "INVALID_ARGUMENT"),
        ("g", &empty_amount, "INVALID_ARGUMENT"),
        ("g", &huge_amount, "INVALID_ARGUMENT"),
    ] {
        let mut args = vec![ScriptArg::Str(group)];
        args.extend(list.iter().map(|i| ScriptArg::Str(i)));
        assert_refused(scripts.ack.run(&redis, &[&stream], &args).await, want);
        assert_eq!(
            dump(&c, std::slice::from_ref(&stream)).await,
            before,
            "{want}: the stream and its group are unchanged"
        );
    }
    // Well-formed, it acknowledges and deletes, and gives a charge back with the entry it
    // belongs to: once, as only one call can acknowledge the entry.
    let state = format!("{stream}:state");
    hset(&c, &state, "used", "1000").await;
    let back = format!("{}=300", ids[1]);
    let mut args = vec![
        ScriptArg::Str("g"),
        ScriptArg::Str(&ids[0]),
        ScriptArg::Str(&back),
    ];
    args.extend(ids[2..].iter().map(|i| ScriptArg::Str(i)));
    let deleted = scripts
        .ack
        .run(&redis, &[&stream, &state], &args)
        .await
        .expect("ack");
    assert_eq!(deleted, redis::Value::Int(3));
    assert_eq!(hget(&c, &state, "used").await.as_deref(), Some("700"));
    let again = scripts
        .ack
        .run(&redis, &[&stream, &state], &args)
        .await
        .expect("ack again");
    assert_eq!(again, redis::Value::Int(0));
    assert_eq!(
        hget(&c, &state, "used").await.as_deref(),
        Some("700"),
        "a batch acknowledged twice gives nothing back twice"
    );
    let _: i64 = redis::cmd("DEL")
        .arg(&state)
        .arg(&stream)
        .query_async(&mut c)
        .await
        .expect("del");
}

/// Every key admit.lua touches for the key of `lease`, and the namespace's key count (a
/// refused admission must not leave a new lease record).
async fn admit_snapshot(app: &TestApp, lease: &LeaseRef) -> (Vec<Option<Vec<u8>>>, usize) {
    let k = &lease.keys;
    let keys = [&k.state, &k.rate, &k.live, &k.holds, &k.tokens].map(|s| s.to_string());
    let mut c = app.redis.clone();
    let all: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", app.namespace))
        .query_async(&mut c)
        .await
        .expect("keys");
    (dump(&app.redis, &keys).await, all.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admissions_on_corrupt_state_are_refused_500_before_the_expired_lease_repair() {
    let app = no_sync_app().await;
    let key = standalone_key(&app, "u-adm").await;
    // An expired lease with a hold: the next admission would give it back first (its first
    // write), so a refusal must come before that.
    let (_, lease) = lease_of(
        &app,
        &key,
        json!({"reserve_usd": 1, "lease_ttl_seconds": 1}),
    )
    .await;
    // A longer lease keeps the live set (and the holds) from expiring whole with the first.
    lease_of(&app, &key, json!({})).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Each case: fields set (None: removed), as no script writes them. The folded
    // configuration (`cfn`) is read before the named fields, which are folded again only when
    // it is missing; the rate cursor (`rw`) is five doubles and cached times.
    let cases: [&[FieldWrite]; 6] = [
        &[("used", Some(b"lots"))],
        &[("held", Some(b"1.5"))],
        &[("cfn", None), ("rl", Some(b""))],
        &[("cfn", Some(b"not a configuration"))],
        &[("rw", Some(b"short"))],
        &[("rw", Some(&[0x40; 40]))],
    ];
    let state = &lease.keys.state;
    for case in cases {
        let mut good = Vec::new();
        for (field, value) in case {
            good.push((*field, hget_bytes(&app.redis, state, field).await));
            hset_bytes(&app.redis, state, field, *value).await;
        }
        let before = admit_snapshot(&app, &lease).await;
        let (status, body) = app.admit(&key, json!({})).await;
        assert_eq!(status, 500, "{case:?}: {body}");
        assert_eq!(body["code"], "internal", "{body}");
        assert_eq!(admit_snapshot(&app, &lease).await, before, "{case:?}");
        for (field, value) in good {
            hset_bytes(&app.redis, state, field, value.as_deref()).await;
        }
    }
    // A hold that is not a number.
    hset(&app.redis, &lease.keys.holds, &lease.nonce, "much").await;
    let before = admit_snapshot(&app, &lease).await;
    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!((status, &body["code"]), (500, &json!("internal")), "{body}");
    assert_eq!(admit_snapshot(&app, &lease).await, before);
    // Healed, the same admission goes through and gives the expired hold back.
    hset(&app.redis, &lease.keys.holds, &lease.nonce, "1000000000").await;
    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        hget(&app.redis, &lease.keys.state, "held").await.as_deref(),
        Some("0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admissions_with_arguments_out_of_range_are_refused_by_their_caller_before_any_call() {
    let app = no_sync_app().await;
    let key = standalone_key(&app, "u-adm-args").await;
    let (_, lease) = lease_of(&app, &key, json!({})).await;
    let hot = app.hot_path();
    let key_hash = tollgate::keys::hash(&key);
    let base = AdmitArgs {
        key_hash: &key_hash,
        provider: "",
        api_format: "",
        model: "",
        reserve: Money::ZERO,
        reserve_tokens: 0,
        lease: LeaseTerm::Default,
    };
    let before = admit_snapshot(&app, &lease).await;
    for (args, want) in [
        (
            AdmitArgs {
                reserve: Money::from_nanos(MAX_COST + 1),
                ..base
            },
            "LIMIT_EXCEEDED",
        ),
        (
            AdmitArgs {
                reserve_tokens: (MAX_COST as u64) + 1,
                ..base
            },
            "INVALID_ARGUMENT",
        ),
        (
            AdmitArgs {
                lease: LeaseTerm::Ttl(Duration::ZERO),
                ..base
            },
            "INVALID_ARGUMENT",
        ),
        (
            AdmitArgs {
                lease: LeaseTerm::Ttl(Duration::from_secs(400 * 86_400)),
                ..base
            },
            "INVALID_ARGUMENT",
        ),
    ] {
        match hot.admit(args).await {
            Err(RedisFailure::Refused { code, .. }) => assert_eq!(code, want, "{args:?}"),
            other => panic!("expected a {want} refusal of {args:?}, got {other:?}"),
        }
        assert_eq!(admit_snapshot(&app, &lease).await, before, "{args:?}");
    }
    // In range, the same call is granted.
    assert!(matches!(hot.admit(base).await, Ok(ScriptAdmit::Allowed(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releases_on_corrupt_state_are_refused_500_and_change_nothing() {
    let app = no_sync_app().await;
    let key = standalone_key(&app, "u-rel").await;
    let (id, lease) = lease_of(&app, &key, json!({"reserve_usd": 1})).await;
    let keys = settle_keys(&lease);
    for (key_name, field, value) in [
        (&lease.keys.state, "held", "lots"),
        (&lease.keys.state, "held", "2.5"),
        (&lease.keys.holds, lease.nonce.as_str(), "much"),
    ] {
        let good = hget(&app.redis, key_name, field).await.expect(field);
        hset(&app.redis, key_name, field, value).await;
        let before = dump(&app.redis, &keys).await;
        let (status, body) = release_raw(&app, &id).await;
        assert_eq!(
            (status, &body["code"]),
            (500, &json!("internal")),
            "{field}={value}: {body}"
        );
        assert_eq!(dump(&app.redis, &keys).await, before, "{field}={value}");
        hset(&app.redis, key_name, field, &good).await;
    }
    let (status, body) = release_raw(&app, &id).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        hget(&app.redis, &lease.keys.state, "held").await.as_deref(),
        Some("0")
    );
}

/// settle.lua told to expect a key without a balance (ARGV[8] 'p': the guess of
/// `hot/known_keys.rs`, which reads fewer fields) still answers a balance key's balance with
/// its holds counted: the guess costs a second read when wrong, never a wrong answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_that_expected_a_plain_key_still_counts_a_balance_keys_holds() {
    let app = no_sync_app().await;
    let (key, _) = app
        .create_key(json!({"user_id": "u-guess", "is_standalone": true,
            "initial_balance_usd": 5, "rate_limit": null, "concurrent_limit": null}))
        .await;
    // 1 USD held by a live lease; the lease settled below holds nothing and is untracked.
    let (_, holding) = lease_of(&app, &key, json!({"reserve_usd": 1})).await;
    assert!(
        holding.facts.as_ref().is_some_and(|f| f.tracked),
        "a hold is tracked"
    );
    let (_, lease) = lease_of(&app, &key, json!({})).await;
    assert!(
        lease.facts.as_ref().is_some_and(|f| !f.tracked),
        "no hold, no limit: untracked"
    );
    let call = settle::Call::new(
        &lease,
        settle::Usage {
            cost_nanos: Some(250_000_000),
            ..settle::Usage::default()
        },
        600_000,
        60_000,
    )
    .expecting_plain(true);
    let v = Scripts::default()
        .settle
        .run(&hot_redis(), &call.keys(), &call.args())
        .await
        .expect("settles");
    assert_eq!(
        settle::parse(v).expect("a settle reply"),
        settle::Reply::Settled {
            lease_expired: false,
            // 5 USD less the 0.25 charged and the 1 held.
            available: 3_750_000_000,
        }
    );
}
