//! The durable usage pipeline: every settled event reaches Postgres exactly once — within two
//! seconds normally, and whatever crashes, restarts, outages or shutdowns happen in between.
//!
//! Crash and shutdown tests run the real binary as a child process (`common::process`) so a
//! kill -9 is a real crash; outage tests stop a private Postgres (`common::private_pg`), never
//! the shared one. "Exactly once" is checked the same way everywhere ([`verify_exactly_once`]):
//! every acknowledged settlement has its row, no row exists for a lease that was never
//! settled, each row carries the cost that was sent, and each key's `balance_used` and the
//! daily roll-up agree with the rows, so an event applied twice would show.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::private_pg::PrivatePg;
use common::process::{cleanup_state, TollgateProcess};
use common::silent_relay::SilentRelay;
use common::*;
use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use sqlx::PgPool;
use tollgate::app::SYNC_THREAD;
use tollgate::hot::layout::Layout;
use tollgate::store::keys::Expired;
use tollgate::store::usage::{insert_batch, UsageEvent};
use tollgate::store::SYNC_APPLICATION_NAME;
use tollgate::sync::usage::GROUP;

// ---------------------------------------------------------------------------------------------
// Helpers

/// Distinct, irregular costs with all nine decimals used, so any float rounding would show.
fn cost_of(i: usize) -> i64 {
    1_000_001 + (i as i64 * 7_919_113) % 90_000_007
}

fn tokens_of(i: usize) -> (i64, i64) {
    ((i % 50) as i64 + 1, (i * 2 % 70) as i64 + 3)
}

/// Event `i` of a test that calls `insert_batch` directly, as settle.lua would have recorded it.
fn usage_event(event_id: String, key: uuid::Uuid, i: usize) -> UsageEvent {
    let (input, output) = tokens_of(i);
    let at = Utc::now();
    UsageEvent {
        event_id,
        key_id: Some(key),
        user_id: "u-direct".into(),
        provider: "openai".into(),
        api_format: "openai:chat".into(),
        model: "gpt-4o".into(),
        input_tokens: input,
        output_tokens: output,
        total_tokens: input + output,
        cost_nanos: cost_of(i),
        response_time_ms: Some(100 + i as i64),
        status_code: Some(200),
        lease_expired: false,
        admitted_at: at,
        settled_at: at,
    }
}

#[derive(Debug, Clone)]
struct Attempt {
    key_id: String,
    cost: i64,
    tokens: i64,
}

/// What the test sent: every settlement attempted (lease → what it reported) and the ones the
/// server acknowledged with 200.
#[derive(Default)]
struct Ledger {
    attempted: HashMap<String, Attempt>,
    acked: HashSet<String>,
}

type Shared = Arc<Mutex<Ledger>>;

fn merged(ledgers: &[&Shared]) -> Ledger {
    let mut out = Ledger::default();
    for l in ledgers {
        let l = l.lock().unwrap();
        out.attempted
            .extend(l.attempted.iter().map(|(k, v)| (k.clone(), v.clone())));
        out.acked.extend(l.acked.iter().cloned());
    }
    out
}

fn acked(l: &Shared) -> usize {
    l.lock().unwrap().acked.len()
}

/// What [`drive`] needs of a running tollgate: its HTTP client and data-plane URL.
fn on(tollgate: &impl Api) -> (reqwest::Client, String) {
    (tollgate.http().clone(), tollgate.data_url().to_string())
}

/// (plaintext, key id)
type Key = (String, String);

/// Admission and settlement `i` of `key` against `data`, in the ledger. `Err` only when the
/// server could not be reached or hung up (it was killed or is shutting down).
async fn admit_and_settle_logged(
    http: &reqwest::Client,
    data: &str,
    key: &Key,
    i: usize,
    ledger: &Shared,
) -> Result<(), String> {
    let cost = cost_of(i);
    let (input, output) = tokens_of(i);
    let admit =
        json!({"key": key.0, "provider": "openai", "api_format": "openai:chat", "model": "gpt-4o"});
    let settle = json!({"cost_usd": amount_of(cost), "input_tokens": input, "output_tokens": output,
                        "response_time_ms": 100 + i % 900, "status_code": 200});
    let (lease, _) = admit_and_settle(http, data, admit, settle, |lease| {
        ledger.lock().unwrap().attempted.insert(
            event_id(lease),
            Attempt {
                key_id: key.1.clone(),
                cost,
                tokens: input + output,
            },
        );
    })
    .await?;
    ledger.lock().unwrap().acked.insert(event_id(&lease));
    Ok(())
}

/// Runs the rounds `range` over `keys` with `workers` concurrent workers. A worker stops at its
/// first connection failure (the server died or is stopping); returns how many failed so.
async fn drive(
    (http, data): (reqwest::Client, String),
    keys: Arc<Vec<Key>>,
    range: Range<usize>,
    workers: usize,
    ledger: Shared,
) -> usize {
    let next = Arc::new(AtomicUsize::new(range.start));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (http, data, keys, next, ledger) = (
            http.clone(),
            data.clone(),
            keys.clone(),
            next.clone(),
            ledger.clone(),
        );
        let end = range.end;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= end {
                    return 0;
                }
                let key = &keys[i % keys.len()];
                if admit_and_settle_logged(&http, &data, key, i, &ledger)
                    .await
                    .is_err()
                {
                    return 1;
                }
            }
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += t.await.expect("driver worker panicked");
    }
    failed
}

async fn create_keys(p: &TollgateProcess, n: usize) -> Vec<Key> {
    let mut keys = Vec::new();
    for _ in 0..n {
        let (key, api_key) = p
            .create_key(json!({"user_id": "u-sync", "rate_limit": null, "concurrent_limit": null}))
            .await;
        keys.push((key, api_key["id"].as_str().expect("id").to_string()));
    }
    keys
}

/// Keys whose state lives in at least `shards` different shards (so several usage streams and
/// several consumers are involved).
async fn create_keys_in_shards(p: &TollgateProcess, shards: usize) -> Vec<Key> {
    let mut keys = Vec::new();
    let mut seen = HashSet::new();
    while seen.len() < shards {
        let mut k = create_keys(p, 1).await;
        let key = k.remove(0);
        if seen.insert(tollgate::keys::hash(&key.0)[..1].to_string()) {
            keys.push(key);
        }
    }
    keys
}

/// The fields of one usage event as settle.lua appends it to a shard stream: $0.000001, 2
/// tokens, 5 ms, status 200.
fn usage_entry<'a>(
    event: &'a str,
    key_id: &'a str,
    user: &'a str,
    model: &'a str,
    now_ms: &'a str,
) -> [(&'static str, &'a str); 15] {
    [
        ("e", event),
        ("k", key_id),
        ("u", user),
        ("c", "1000"),
        ("it", "1"),
        ("ot", "1"),
        ("tt", "2"),
        ("rt", "5"),
        ("sc", "200"),
        ("p", "openai"),
        ("f", "openai:chat"),
        ("m", model),
        ("at", now_ms),
        ("ts", now_ms),
        ("x", "0"),
    ]
}

async fn redis_conn() -> MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis reachable")
}

/// Events still in the namespace's usage streams (an entry is deleted once it is in Postgres).
async fn unsynced(redis: &mut MultiplexedConnection, ns: &str) -> i64 {
    let mut n = 0;
    for s in Layout::new(ns).streams() {
        let len: i64 = redis::cmd("XLEN")
            .arg(&s)
            .query_async(redis)
            .await
            .expect("xlen");
        n += len;
    }
    n
}

/// Entries delivered to `consumer` and not acknowledged, over every shard.
async fn pending_of(redis: &mut MultiplexedConnection, ns: &str, consumer: &str) -> usize {
    let mut n = 0;
    for s in Layout::new(ns).streams() {
        let r: redis::RedisResult<Vec<(String, String, i64, i64)>> = redis::cmd("XPENDING")
            .arg(&s)
            .arg(GROUP)
            .arg("-")
            .arg("+")
            .arg(100_000)
            .arg(consumer)
            .query_async(redis)
            .await;
        n += r.map(|v| v.len()).unwrap_or(0);
    }
    n
}

async fn poll_until<F, Fut>(within: Duration, check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    poll_every(Duration::from_millis(100), within, check).await
}

async fn rows_present(db: &PgPool, leases: &[String]) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE event_id = ANY($1)")
        .bind(leases)
        .fetch_one(db)
        .await
        .unwrap_or(-1)
}

/// The last statement of each of this database's connections with that `application_name`.
async fn connections_named(db: &PgPool, name: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT query FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = $1",
    )
    .bind(name)
    .fetch_all(db)
    .await
    .expect("pg_stat_activity readable")
}

/// Waits until every acknowledged settlement has its row and the streams are empty.
async fn wait_synced(db: &PgPool, ns: &str, ledger: &Ledger, within: Duration) {
    let mut redis = redis_conn().await;
    let acked: Vec<String> = ledger.acked.iter().cloned().collect();
    let ok = poll_until(within, || {
        let (db, acked) = (db.clone(), acked.clone());
        let mut redis = redis.clone();
        async move {
            rows_present(&db, &acked).await == acked.len() as i64
                && unsynced(&mut redis, ns).await == 0
        }
    })
    .await;
    assert!(
        ok,
        "within {within:?}: {} of {} acknowledged events in postgres, {} still in the streams",
        rows_present(db, &acked).await,
        acked.len(),
        unsynced(&mut redis, ns).await
    );
}

/// Every acknowledged settlement is in Postgres once with what was sent; nothing else is; the
/// per-key balances and the daily roll-up agree with the rows.
async fn verify_exactly_once(db: &PgPool, ledger: &Ledger) {
    let rows: Vec<(String, Option<uuid::Uuid>, i64, i64)> =
        sqlx::query_as("SELECT event_id, key_id, cost_nanos, total_tokens FROM usage_events")
            .fetch_all(db)
            .await
            .expect("usage rows");
    let mut seen = HashSet::new();
    let mut per_key: HashMap<String, i64> = HashMap::new();
    for (event_id, key_id, cost, tokens) in &rows {
        assert!(
            seen.insert(event_id.clone()),
            "event {event_id} stored twice"
        );
        let a = ledger
            .attempted
            .get(event_id)
            .unwrap_or_else(|| panic!("row {event_id} is for a lease the test never settled"));
        assert_eq!(
            key_id.map(|k| k.to_string()).as_deref(),
            Some(a.key_id.as_str()),
            "{event_id}"
        );
        assert_eq!(*cost, a.cost, "cost of {event_id}");
        assert_eq!(*tokens, a.tokens, "tokens of {event_id}");
        *per_key.entry(a.key_id.clone()).or_default() += cost;
    }
    let missing: Vec<&String> = ledger.acked.iter().filter(|l| !seen.contains(*l)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events missing: {missing:?}",
        missing.len()
    );

    let balances: Vec<(String, i64)> =
        sqlx::query_as("SELECT id::text, balance_used_nanos FROM api_keys")
            .fetch_all(db)
            .await
            .expect("keys");
    for (id, used) in balances {
        assert_eq!(
            used,
            per_key.get(&id).copied().unwrap_or(0),
            "balance_used of key {id} differs from the sum of its events"
        );
    }

    let disagreeing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
            SELECT key_id, (created_at AT TIME ZONE 'UTC')::date AS day, count(*) AS r,
                   sum(total_tokens) AS t, sum(cost_nanos) AS c,
                   COALESCE(sum(response_time_ms), 0) AS rs, count(response_time_ms) AS rc
            FROM usage_events WHERE key_id IS NOT NULL GROUP BY 1, 2) e
         FULL JOIN usage_daily d USING (key_id, day)
         WHERE e.r IS DISTINCT FROM d.requests OR e.t IS DISTINCT FROM d.tokens
            OR e.c IS DISTINCT FROM d.cost_nanos OR e.rs IS DISTINCT FROM d.response_time_sum
            OR e.rc IS DISTINCT FROM d.response_time_count",
    )
    .fetch_one(db)
    .await
    .expect("roll-up comparison");
    assert_eq!(disagreeing, 0, "usage_daily disagrees with usage_events");
}

/// Removes the shared database and namespace of a test's processes when the test ends.
struct Cleanup(HashMap<&'static str, String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        cleanup_state(&self.0);
    }
}

/// The names of a process's threads (Linux: `/proc/<pid>/task/*/comm`).
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the process's threads")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

/// A key's `balance_used_nanos` in Postgres.
async fn balance_used(db: &PgPool, key_id: &str) -> i64 {
    sqlx::query_scalar("SELECT balance_used_nanos FROM api_keys WHERE id = $1::uuid")
        .bind(key_id)
        .fetch_one(db)
        .await
        .expect("balance_used")
}

async fn connect_db(url: &str) -> PgPool {
    PgPool::connect(url).await.expect("test database reachable")
}

async fn start_private_pg() -> PrivatePg {
    tokio::task::spawn_blocking(PrivatePg::start)
        .await
        .expect("private postgres started")
}

/// Settings on a Postgres of the test's own, which it may stop and restart; and its URL.
async fn on_private_pg() -> (PrivatePg, HashMap<&'static str, String>, String) {
    let pg = start_private_pg().await;
    let mut settings = base_settings();
    let db_url = pg.url(&unique("tollgate_t_"));
    settings.insert("TOLLGATE_DATABASE_URL", db_url.clone());
    (pg, settings, db_url)
}

/// Two processes of `settings`, sync consumers `replica-a` and `replica-b`.
async fn replicas_a_and_b(
    settings: &HashMap<&'static str, String>,
) -> (TollgateProcess, TollgateProcess) {
    let named = |consumer: &str| {
        let mut s = settings.clone();
        s.insert("TOLLGATE_SYNC_CONSUMER", consumer.into());
        s
    };
    let a = TollgateProcess::start(&named("replica-a")).await;
    (a, TollgateProcess::start(&named("replica-b")).await)
}

/// Settles `range` through `p` and waits until it is all in Postgres, so that every key is
/// hydrated before the test takes Postgres away; closes `db` for that.
async fn settle_while_postgres_is_up(
    p: &TollgateProcess,
    keys: &Arc<Vec<Key>>,
    range: Range<usize>,
    workers: usize,
    db: PgPool,
    ns: &str,
) -> Shared {
    let ledger = Shared::default();
    assert_eq!(
        drive(on(p), keys.clone(), range, workers, ledger.clone()).await,
        0
    );
    wait_synced(&db, ns, &merged(&[&ledger]), Duration::from_secs(20)).await;
    db.close().await;
    ledger
}

/// Waits until `consumer` holds a delivered, unacknowledged entry (Postgres is away).
async fn await_delivery(
    redis: &MultiplexedConnection,
    ns: &str,
    consumer: &str,
    p: &TollgateProcess,
) {
    let held = poll_until(Duration::from_secs(30), || {
        let mut redis = redis.clone();
        async move { pending_of(&mut redis, ns, consumer).await > 0 }
    })
    .await;
    assert!(
        held,
        "{consumer} never took delivery of an event\n{}",
        p.logs()
    );
}

// ---------------------------------------------------------------------------------------------
// Normal operation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_usage_reaches_stats_balance_and_last_used_within_two_seconds() {
    let app = spawn_app().await;
    let (key, id) = new_key(
        &app,
        json!({"user_id": "u-sync", "is_standalone": true, "initial_balance_usd": 5}),
    )
    .await;
    let before = Utc::now();
    for (cost, input, output, rt) in [(0.012345678, 120, 380, 840), (0.5, 10, 20, 160)] {
        let (status, admitted) = app
            .admit(&key, json!({"provider": "openai", "model": "gpt-4o"}))
            .await;
        assert_eq!(status, 200, "{admitted}");
        let res = app
            .post_data(
                "/v1/settle",
                json!({"lease_id": admitted["lease_id"], "cost_usd": cost, "input_tokens": input,
                       "output_tokens": output, "response_time_ms": rt}),
            )
            .await;
        assert_eq!(res.status(), 200);
    }
    let settled = Instant::now();

    let arrived = app
        .eventually(Duration::from_secs(2), || async {
            let k: Value = app.admin_get_json(&format!("/admin/keys/{id}")).await;
            let s: Value = app.admin_get_json(&format!("/admin/keys/{id}/stats")).await;
            nanos(&k["balance_used_usd"]) == 512_345_678
                && !k["last_used_at"].is_null()
                && s["total_requests"] == 2
        })
        .await;
    assert!(arrived, "usage not visible within 2 s of settling");
    eprintln!(
        "usage visible {:?} after the last settlement",
        settled.elapsed()
    );

    let after = Utc::now();
    let k: Value = app.admin_get_json(&format!("/admin/keys/{id}")).await;
    assert_eq!(
        nanos(&k["remaining_balance_usd"]),
        5_000_000_000 - 512_345_678,
        "{k}"
    );
    let last: DateTime<Utc> = k["last_used_at"].as_str().unwrap().parse().unwrap();
    assert!(
        last >= before - chrono::Duration::seconds(2)
            && last <= after + chrono::Duration::seconds(2),
        "last_used_at {last} outside [{before}, {after}]"
    );

    let check_stats = |s: &Value| {
        assert_eq!(s["key_id"], id.as_str(), "{s}");
        assert_eq!(s["total_requests"], 2, "{s}");
        assert_eq!(s["total_tokens"], 530, "{s}");
        assert_eq!(nanos(&s["total_cost_usd"]), 512_345_678, "{s}");
        assert_eq!(s["avg_response_time_ms"].as_f64(), Some(500.0), "{s}");
        let daily = s["daily_stats"].as_array().expect("daily_stats");
        assert!(!daily.is_empty(), "{s}");
        let (mut r, mut t, mut c) = (0, 0, 0);
        for d in daily {
            let date = d["date"].as_str().unwrap();
            assert!(
                date >= before.format("%Y-%m-%d").to_string().as_str()
                    && date <= after.format("%Y-%m-%d").to_string().as_str(),
                "{s}"
            );
            r += d["requests"].as_i64().unwrap();
            t += d["tokens"].as_i64().unwrap();
            c += nanos(&d["cost_usd"]);
        }
        assert_eq!((r, t, c), (2, 530, 512_345_678), "{s}");
    };
    let all: Value = app.admin_get_json(&format!("/admin/keys/{id}/stats")).await;
    check_stats(&all);
    // A range that cuts the day on both sides reads the raw rows at the edges: same totals.
    let range = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let cut: Value = app
        .admin_get(&format!(
            "/admin/keys/{id}/stats?start={}&end={}",
            range(before - chrono::Duration::seconds(5)),
            range(after + chrono::Duration::seconds(5))
        ))
        .await
        .json()
        .await
        .unwrap();
    check_stats(&cut);
    let later: Value = app
        .admin_get(&format!(
            "/admin/keys/{id}/stats?start={}",
            range(after + chrono::Duration::seconds(5))
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(later["total_requests"], 0, "{later}");
    assert_eq!(later["daily_stats"], json!([]), "{later}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_ranges_count_rows_at_day_boundaries_exactly_once() {
    let app = spawn_app().await;
    let (_, id) = new_key(&app, json!({"user_id": "u-stats"})).await;
    let key = uuid::Uuid::parse_str(&id).unwrap();
    // Rows on both sides of two midnights, and exactly on them; the roll-up built from them
    // as the syncer keeps it.
    let times = [
        "2025-01-09T12:00:00Z",
        "2025-01-10T00:00:00Z",
        "2025-01-10T12:00:00Z",
        "2025-01-11T00:00:00Z",
    ];
    for (i, t) in times.iter().enumerate() {
        let at: DateTime<Utc> = t.parse().unwrap();
        sqlx::query(
            "INSERT INTO usage_events (event_id, key_id, user_id, provider, api_format, model,
                 input_tokens, output_tokens, total_tokens, cost_nanos, response_time_ms,
                 status_code, lease_expired, admitted_at, created_at)
             VALUES ($1, $2, 'u-stats', 'openai', 'openai:chat', 'gpt-4o', 1, 1, 2, $3, 100, 200,
                 false, $4, $4)",
        )
        .bind(format!("boundary-{i}"))
        .bind(key)
        .bind(10_i64.pow(i as u32))
        .bind(at)
        .execute(&app.db)
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO usage_daily SELECT key_id, (created_at AT TIME ZONE 'UTC')::date, count(*),
             sum(total_tokens), sum(cost_nanos), sum(response_time_ms), count(response_time_ms)
         FROM usage_events GROUP BY 1, 2",
    )
    .execute(&app.db)
    .await
    .unwrap();

    // (start, end, rows counted: bit i = the row at times[i])
    let cases: [(Option<&str>, Option<&str>, &[usize]); 6] = [
        (None, None, &[0, 1, 2, 3]),
        (
            Some("2025-01-09T06:00:00Z"),
            Some("2025-01-11T18:00:00Z"),
            &[0, 1, 2, 3],
        ),
        (
            Some("2025-01-09T06:00:00Z"),
            Some("2025-01-11T00:00:00Z"),
            &[0, 1, 2, 3],
        ),
        (Some("2025-01-10T00:00:00Z"), None, &[1, 2, 3]),
        (
            Some("2025-01-09T13:00:00Z"),
            Some("2025-01-10T23:59:59.999999Z"),
            &[1, 2],
        ),
        (
            Some("2025-01-10T00:00:00.000001Z"),
            Some("2025-01-10T23:59:59Z"),
            &[2],
        ),
    ];
    for (start, end, rows) in cases {
        let mut q = Vec::new();
        if let Some(s) = start {
            q.push(format!("start={s}"));
        }
        if let Some(e) = end {
            q.push(format!("end={e}"));
        }
        let s: Value = app
            .admin_get_json(&format!("/admin/keys/{id}/stats?{}", q.join("&")))
            .await;
        let cost: i64 = rows.iter().map(|i| 10_i64.pow(*i as u32)).sum();
        assert_eq!(s["total_requests"], rows.len(), "{start:?}..{end:?}: {s}");
        assert_eq!(nanos(&s["total_cost_usd"]), cost, "{start:?}..{end:?}: {s}");
        let daily_requests: i64 = s["daily_stats"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["requests"].as_i64().unwrap())
            .sum();
        assert_eq!(daily_requests, rows.len() as i64, "{start:?}..{end:?}: {s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_batch_changes_nothing_and_a_partly_new_one_counts_only_the_new_events() {
    // What a crash between the Postgres commit and XACK produces: the batch comes again,
    // alone or mixed with entries that are new.
    let app = spawn_app().await;
    let (_, id) = new_key(&app, json!({"user_id": "u-redeliver"})).await;
    let key = uuid::Uuid::parse_str(&id).unwrap();
    let event = |i: usize| usage_event(format!("redelivered-{i}"), key, i);
    let first: Vec<UsageEvent> = (0..10).map(event).collect();
    assert_eq!(insert_batch(&app.db, &first).await.unwrap(), 10);
    assert_eq!(insert_batch(&app.db, &first).await.unwrap(), 0);
    let mixed: Vec<UsageEvent> = (5..20).map(event).collect();
    assert_eq!(insert_batch(&app.db, &mixed).await.unwrap(), 10);

    let mut ledger = Ledger::default();
    for e in first.iter().chain(&mixed) {
        ledger.attempted.insert(
            e.event_id.clone(),
            Attempt {
                key_id: id.clone(),
                cost: e.cost_nanos,
                tokens: e.total_tokens,
            },
        );
        ledger.acked.insert(e.event_id.clone());
    }
    assert_eq!(ledger.acked.len(), 20);
    verify_exactly_once(&app.db, &ledger).await;
    let k: Value = app.admin_get_json(&format!("/admin/keys/{id}")).await;
    assert_eq!(
        nanos(&k["balance_used_usd"]),
        (0..20).map(cost_of).sum::<i64>(),
        "{k}"
    );
}

// ---------------------------------------------------------------------------------------------
// Crashes

/// Settles 300 events, kills the process with SIGKILL at once, starts a new one on the same
/// database and namespace, and checks every event arrives exactly once.
async fn crash_and_restart(same_consumer: bool) {
    let mut settings = base_settings();
    if same_consumer {
        // Only the restarted consumer's re-read of its own pending entries can recover what the
        // dead one held: a claim would wait a minute.
        settings.insert("TOLLGATE_SYNC_CONSUMER", "crash-replica".into());
        settings.insert("TOLLGATE_SYNC_CLAIM_IDLE_SECONDS", "60".into());
    } else {
        // The new process is a new consumer (its name carries its port): it must claim.
        settings.insert("TOLLGATE_SYNC_CLAIM_IDLE_SECONDS", "1".into());
    }
    let _cleanup = Cleanup(settings.clone());
    let ns = settings["TOLLGATE_REDIS_NAMESPACE"].clone();
    let mut first = TollgateProcess::start(&settings).await;
    let keys = Arc::new(create_keys_in_shards(&first, 4).await);
    let ledger = Shared::default();
    let failed = drive(on(&first), keys, 0..300, 16, ledger.clone()).await;
    assert_eq!(failed, 0, "the server was up throughout");
    first.kill9();

    let db = connect_db(&settings["TOLLGATE_DATABASE_URL"]).await;
    let mut redis = redis_conn().await;
    let at_kill: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events")
        .fetch_one(&db)
        .await
        .unwrap();
    eprintln!(
        "at the kill: {at_kill} of 300 in postgres, {} in the streams",
        unsynced(&mut redis, &ns).await
    );

    let second = TollgateProcess::start(&settings).await;
    let ledger = merged(&[&ledger]);
    assert_eq!(ledger.acked.len(), 300);
    wait_synced(&db, &ns, &ledger, Duration::from_secs(40)).await;
    verify_exactly_once(&db, &ledger).await;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(total, 300);
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_9_a_new_replica_syncs_every_event_exactly_once() {
    crash_and_restart(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_9_a_restart_under_the_same_consumer_name_syncs_every_event_exactly_once() {
    crash_and_restart(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_under_its_consumer_name_resumes_its_own_unacknowledged_deliveries() {
    // With Postgres down the consumer certainly holds delivered, unacknowledged entries when
    // it is killed; a claim would take a minute, so only its own re-read can recover them.
    let (mut pg, mut settings, db_url) = on_private_pg().await;
    settings.insert("TOLLGATE_SYNC_CONSUMER", "solo".into());
    settings.insert("TOLLGATE_SYNC_CLAIM_IDLE_SECONDS", "60".into());
    let _cleanup = Cleanup(settings.clone());
    let ns = settings["TOLLGATE_REDIS_NAMESPACE"].clone();
    let mut first = TollgateProcess::start(&settings).await;
    let keys = Arc::new(create_keys_in_shards(&first, 3).await);
    let db = connect_db(&db_url).await;
    let warm = settle_while_postgres_is_up(&first, &keys, 0..6, 3, db, &ns).await;

    tokio::task::block_in_place(|| pg.stop());
    let during = Shared::default();
    assert_eq!(
        drive(on(&first), keys.clone(), 6..66, 4, during.clone()).await,
        0
    );
    let mut redis = redis_conn().await;
    await_delivery(&redis, &ns, "solo", &first).await;
    first.kill9();
    let orphaned = pending_of(&mut redis, &ns, "solo").await;
    eprintln!("killed holding {orphaned} entries");

    tokio::task::block_in_place(|| pg.restart());
    let started = Instant::now();
    let second = TollgateProcess::start(&settings).await;
    let db = connect_db(&db_url).await;
    let ledger = merged(&[&warm, &during]);
    wait_synced(&db, &ns, &ledger, Duration::from_secs(40)).await;
    assert!(
        started.elapsed() < Duration::from_secs(55),
        "recovered by a claim, not by the re-read"
    );
    verify_exactly_once(&db, &ledger).await;
    assert_eq!(pending_of(&mut redis, &ns, "solo").await, 0);
    db.close().await;
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_one_of_two_replicas_is_killed_mid_burst_every_event_arrives_exactly_once() {
    let mut settings = base_settings();
    settings.insert("TOLLGATE_SYNC_CLAIM_IDLE_SECONDS", "1".into());
    let _cleanup = Cleanup(settings.clone());
    let ns = settings["TOLLGATE_REDIS_NAMESPACE"].clone();
    let (mut a, b) = replicas_a_and_b(&settings).await;
    let keys = Arc::new(create_keys_in_shards(&a, 4).await);

    let (la, lb) = (Shared::default(), Shared::default());
    let drive_a = tokio::spawn(drive(on(&a), keys.clone(), 0..400, 8, la.clone()));
    let drive_b = tokio::spawn(drive(on(&b), keys.clone(), 400..700, 8, lb.clone()));
    let midway = poll_until(Duration::from_secs(60), || {
        let la = la.clone();
        async move { acked(&la) >= 120 }
    })
    .await;
    assert!(midway, "replica a settled only {} in 60 s", acked(&la));
    a.kill9();
    let mut redis = redis_conn().await;
    eprintln!(
        "killed replica a after {} settlements; it held {} unacknowledged entries",
        acked(&la),
        pending_of(&mut redis, &ns, "replica-a").await
    );
    let failed_a = drive_a.await.unwrap();
    assert!(failed_a > 0, "replica a's driver saw the kill");
    let failed_b = drive_b.await.unwrap();
    assert_eq!(failed_b, 0, "replica b stayed up");
    assert_eq!(acked(&lb), 300);

    let db = connect_db(&settings["TOLLGATE_DATABASE_URL"]).await;
    let ledger = merged(&[&la, &lb]);
    wait_synced(&db, &ns, &ledger, Duration::from_secs(60)).await;
    verify_exactly_once(&db, &ledger).await;
    assert_eq!(
        pending_of(&mut redis, &ns, "replica-a").await,
        0,
        "the dead replica's entries were claimed"
    );
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_delivered_but_unsynced_events_are_claimed_by_the_survivor() {
    // Postgres down makes both consumers hold delivered, unacknowledged entries for certain;
    // then one of them dies.
    let (mut pg, mut settings, db_url) = on_private_pg().await;
    // Longer than a live consumer's retry cycle (its re-reads keep its entries fresh), so the
    // survivor claims only from the dead.
    settings.insert("TOLLGATE_SYNC_CLAIM_IDLE_SECONDS", "10".into());
    let _cleanup = Cleanup(settings.clone());
    let ns = settings["TOLLGATE_REDIS_NAMESPACE"].clone();
    let (mut a, b) = replicas_a_and_b(&settings).await;
    let keys = Arc::new(create_keys_in_shards(&a, 4).await);
    let db = connect_db(&db_url).await;

    // Hydrate every key while Postgres is up.
    let warm = settle_while_postgres_is_up(&a, &keys, 0..8, 4, db, &ns).await;

    tokio::task::block_in_place(|| pg.stop());
    let (la, lb) = (Shared::default(), Shared::default());
    let (fa, fb) = tokio::join!(
        drive(on(&a), keys.clone(), 8..68, 4, la.clone()),
        drive(on(&b), keys.clone(), 68..128, 4, lb.clone()),
    );
    assert_eq!((fa, fb), (0, 0), "settlements go on while postgres is down");
    let mut redis = redis_conn().await;
    await_delivery(&redis, &ns, "replica-a", &a).await;
    a.kill9();
    let orphaned = pending_of(&mut redis, &ns, "replica-a").await;
    assert!(orphaned > 0);
    eprintln!("replica a died holding {orphaned} entries");

    tokio::task::block_in_place(|| pg.restart());
    let db = connect_db(&db_url).await;
    let ledger = merged(&[&warm, &la, &lb]);
    assert_eq!(ledger.acked.len(), 128);
    wait_synced(&db, &ns, &ledger, Duration::from_secs(90)).await;
    verify_exactly_once(&db, &ledger).await;
    assert_eq!(pending_of(&mut redis, &ns, "replica-a").await, 0);
    db.close().await;
    drop(b);
}

// ---------------------------------------------------------------------------------------------
// Outages

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_down_admission_and_settlement_go_on_and_usage_waits_in_redis() {
    let (mut pg, settings, db_url) = on_private_pg().await;
    let _cleanup = Cleanup(settings.clone());
    let ns = settings["TOLLGATE_REDIS_NAMESPACE"].clone();
    let p = TollgateProcess::start(&settings).await;
    let keys = Arc::new(create_keys_in_shards(&p, 3).await);
    let db = connect_db(&db_url).await;

    let before = settle_while_postgres_is_up(&p, &keys, 0..30, 4, db, &ns).await;

    tokio::task::block_in_place(|| pg.stop());
    let during = Shared::default();
    let failed = drive(on(&p), keys.clone(), 30..130, 4, during.clone()).await;
    assert_eq!(failed, 0);
    assert_eq!(
        acked(&during),
        100,
        "every admission and settlement answered 200"
    );
    // Nothing can sync, so the gauge must come to exactly what was settled meanwhile.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut pending = p.metric("tollgate_usage_events_pending").await;
    while pending != Some(100.0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        pending = p.metric("tollgate_usage_events_pending").await;
    }
    assert_eq!(
        pending,
        Some(100.0),
        "tollgate_usage_events_pending while postgres is down"
    );
    let lag = p
        .metric("tollgate_usage_sync_lag_seconds")
        .await
        .expect("lag gauge");
    assert!(lag > 0.0, "sync lag {lag} while postgres is down");

    tokio::task::block_in_place(|| pg.restart());
    let db = connect_db(&db_url).await;
    let ledger = merged(&[&before, &during]);
    wait_synced(&db, &ns, &ledger, Duration::from_secs(60)).await;
    verify_exactly_once(&db, &ledger).await;
    let drained = poll_until(Duration::from_secs(20), || async {
        p.metric("tollgate_usage_events_pending").await == Some(0.0)
    })
    .await;
    assert!(drained, "pending gauge did not return to 0");
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_redis_rehydrates_keys_with_the_synced_balance_and_charges_nothing_twice() {
    let app = spawn_app().await;
    let (key, api_key) = app
        .create_key(
            json!({"user_id": "u-sync", "is_standalone": true, "initial_balance_usd": 10,
                           "rate_limit": null, "concurrent_limit": null}),
        )
        .await;
    let id = api_key["id"].as_str().unwrap().to_string();
    let keys = Arc::new(vec![(key.clone(), id.clone())]);
    let ledger = Shared::default();
    assert_eq!(
        drive(on(&app), keys.clone(), 0..15, 3, ledger.clone()).await,
        0
    );
    let first: i64 = (0..15).map(cost_of).sum();
    wait_synced(
        &app.db,
        &app.namespace,
        &merged(&[&ledger]),
        Duration::from_secs(20),
    )
    .await;

    // tollgate may re-create some of it at once (its streams, and the key itself when it
    // notices the loss); what matters is that the key's state was lost.
    let state = tollgate::hot::layout::Layout::new(&app.namespace)
        .for_hash(&tollgate::keys::hash(&key))
        .state;
    let deleted = app.wipe_namespace().await;
    assert!(deleted.contains(&state), "{deleted:?}");

    // The next admission rehydrates from Postgres: the balance already used is what was synced.
    let (status, admitted) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{admitted}");
    assert_eq!(
        nanos(&admitted["balance_remaining_usd"]),
        10_000_000_000 - first,
        "{admitted}"
    );
    let (status, _) = app.release(admitted["lease_id"].as_str().unwrap()).await;
    assert_eq!(status, 200);

    assert_eq!(
        drive(on(&app), keys.clone(), 15..30, 3, ledger.clone()).await,
        0
    );
    let all: i64 = (0..30).map(cost_of).sum();
    let ledger = merged(&[&ledger]);
    wait_synced(&app.db, &app.namespace, &ledger, Duration::from_secs(20)).await;
    verify_exactly_once(&app.db, &ledger).await;

    let k: Value = app.admin_get_json(&format!("/admin/keys/{id}")).await;
    assert_eq!(nanos(&k["balance_used_usd"]), all, "{k}");
    let (status, admitted) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{admitted}");
    assert_eq!(
        nanos(&admitted["balance_remaining_usd"]),
        10_000_000_000 - all,
        "{admitted}"
    );
    let stats: Value = app.admin_get_json(&format!("/admin/keys/{id}/stats")).await;
    assert_eq!(stats["total_requests"], 30, "{stats}");
    assert_eq!(nanos(&stats["total_cost_usd"]), all, "{stats}");
}

// ---------------------------------------------------------------------------------------------
// Shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_burst_exits_0_with_everything_settled_in_postgres() {
    let settings = base_settings();
    let _cleanup = Cleanup(settings.clone());
    let ns = settings["TOLLGATE_REDIS_NAMESPACE"].clone();
    let mut p = TollgateProcess::start(&settings).await;
    let keys = Arc::new(create_keys_in_shards(&p, 4).await);
    let ledger = Shared::default();
    let burst = tokio::spawn(drive(on(&p), keys, 0..1_000_000, 12, ledger.clone()));
    let busy = poll_until(Duration::from_secs(60), || {
        let l = ledger.clone();
        async move { acked(&l) >= 200 }
    })
    .await;
    assert!(busy, "only {} settlements in 60 s", acked(&ledger));
    let before_signal: Vec<String> = ledger.lock().unwrap().acked.iter().cloned().collect();
    let signalled = Instant::now();
    p.signal_term();
    let status = p.wait_exit(Duration::from_secs(25)).await;
    let Some(status) = status else {
        panic!("no exit within 25 s of SIGTERM\n{}", p.logs());
    };
    eprintln!("exited {:?} after SIGTERM: {status}", signalled.elapsed());
    assert!(status.success(), "exit status {status}\n{}", p.logs());
    assert!(
        burst.await.unwrap() > 0,
        "the burst was still running at the signal"
    );

    // The process is gone: what is in Postgres now is what its shutdown flushed.
    let db = connect_db(&settings["TOLLGATE_DATABASE_URL"]).await;
    assert_eq!(
        rows_present(&db, &before_signal).await,
        before_signal.len() as i64,
        "settlements acknowledged before the signal are in postgres"
    );
    let mut redis = redis_conn().await;
    assert_eq!(
        unsynced(&mut redis, &ns).await,
        0,
        "the shutdown left events behind in redis\n{}",
        p.logs()
    );
    verify_exactly_once(&db, &merged(&[&ledger])).await;
    db.close().await;
}

/// An event Postgres refuses for its data (here a NUL byte, which Postgres text cannot hold)
/// does not block its shard: the batch is retried event by event, the bad one moves to the
/// shard's dead-letter stream with the reason, and the good ones of the same batch, and later
/// ones, still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_postgres_refuses_is_dead_lettered_and_the_shard_keeps_flowing() {
    let app = spawn_app().await;
    let (key, api_key) = app.create_key(serde_json::json!({"user_id": "u-dl"})).await;
    let key_id = api_key["id"].as_str().expect("id").to_string();
    let layout = tollgate::hot::layout::Layout::new(&app.namespace);
    let stream = layout.for_hash(&tollgate::keys::hash(&key)).stream();
    let mut c = app.redis.clone();
    let now = chrono::Utc::now().timestamp_millis().to_string();
    for (event, model) in [("poison-1", "bad\u{0}model"), ("good-1", "gpt-4o")] {
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(&usage_entry(event, &key_id, "u-dl", model, &now))
            .query_async(&mut c)
            .await
            .expect("xadd");
    }
    let arrived = app
        .eventually(std::time::Duration::from_secs(10), || async {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE event_id = 'good-1'")
                    .fetch_one(&app.db)
                    .await
                    .expect("count");
            n == 1
        })
        .await;
    assert!(
        arrived,
        "the good event of the poisoned batch reached Postgres"
    );
    let dead: Vec<redis::streams::StreamId> = {
        let r: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(format!("{stream}:dead"))
            .arg("-")
            .arg("+")
            .query_async(&mut c)
            .await
            .expect("xrange");
        r.ids
    };
    assert_eq!(dead.len(), 1, "one dead-lettered event");
    assert_eq!(dead[0].get::<String>("e").as_deref(), Some("poison-1"));
    assert!(dead[0]
        .get::<String>("error")
        .is_some_and(|e| !e.is_empty()));

    // The shard still flows: a real settlement after the poison arrives too.
    let (_, body) = app.admit(&key, serde_json::json!({})).await;
    let lease = body["lease_id"].as_str().expect("lease").to_string();
    let (status, _) = app.settle(&lease, "0.5").await;
    assert_eq!(status, 200);
    let arrived = app
        .eventually(std::time::Duration::from_secs(10), || async {
            app.usage_events_with_id(&event_id(&lease)).await == 1
        })
        .await;
    assert!(arrived, "later events of the shard still arrive");
}

/// A backlog several passes long, spread over every shard (a Postgres outage, a burst): each
/// pass takes at most one batch, in turns from the shards, and everything arrives exactly
/// once, with every shard's stream emptied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_several_passes_in_every_shard_drains_exactly_once() {
    let app = spawn_app().await;
    let (_, api_key) = app.create_key(json!({"user_id": "u-backlog"})).await;
    let key_id = api_key["id"].as_str().expect("id").to_string();
    let streams = Layout::new(&app.namespace).streams();
    let per_shard = 100;
    let mut c = app.redis.clone();
    let now = Utc::now().timestamp_millis().to_string();
    let mut pipe = redis::pipe();
    for (shard, stream) in streams.iter().enumerate() {
        for i in 0..per_shard {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg(&usage_entry(
                    &format!("backlog-{shard}-{i}"),
                    &key_id,
                    "u-backlog",
                    "gpt-4o",
                    &now,
                ))
                .ignore();
        }
    }
    let () = pipe.query_async(&mut c).await.expect("xadd");
    let total = (streams.len() * per_shard) as i64;
    assert!(total > 500 * 3, "the backlog must take several passes");

    let drained = app
        .eventually(Duration::from_secs(30), || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM usage_events WHERE event_id LIKE 'backlog-%'",
            )
            .fetch_one(&app.db)
            .await
            .expect("count");
            n == total
        })
        .await;
    assert!(drained, "all {total} events reached Postgres");
    let used = balance_used(&app.db, &key_id).await;
    assert_eq!(used, total * 1000, "each event charged once");
    let emptied = app
        .eventually(Duration::from_secs(10), || async {
            let mut c = app.redis.clone();
            let mut left = 0;
            for s in &streams {
                let n: i64 = redis::cmd("XLEN")
                    .arg(s)
                    .query_async(&mut c)
                    .await
                    .expect("xlen");
                left += n;
            }
            left == 0
        })
        .await;
    assert!(emptied, "every shard's stream was acknowledged and emptied");
}

/// `TOLLGATE_SYNC_ENABLED=false` (a sidecar whose namespace is synced elsewhere): its
/// settlements wait in Redis untouched — no consumer group, nothing delivered, no row — and a
/// process of the same namespace with the sync on moves every one of them to Postgres exactly
/// once. The sidecar still shuts down cleanly on SIGTERM, with nothing to flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_with_sync_off_leaves_its_usage_to_one_with_it_on() {
    let settings = base_settings();
    let _cleanup = Cleanup(settings.clone());
    let ns = settings["TOLLGATE_REDIS_NAMESPACE"].clone();
    let mut sidecar_settings = settings.clone();
    sidecar_settings.insert("TOLLGATE_SYNC_ENABLED", "false".into());
    sidecar_settings.insert("TOLLGATE_SYNC_CONSUMER", "sidecar".into());
    let mut sidecar = TollgateProcess::start(&sidecar_settings).await;
    let keys = Arc::new(create_keys_in_shards(&sidecar, 4).await);
    let ledger = Shared::default();
    let failed = drive(on(&sidecar), keys, 0..120, 6, ledger.clone()).await;
    assert_eq!(failed, 0);
    assert_eq!(acked(&ledger), 120);

    // Many of a syncer's poll intervals (100 ms when idle): long enough for one to have acted.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let db = connect_db(&settings["TOLLGATE_DATABASE_URL"]).await;
    let ledger = merged(&[&ledger]);
    let acked_leases: Vec<String> = ledger.acked.iter().cloned().collect();
    assert_eq!(rows_present(&db, &acked_leases).await, 0, "nothing synced");
    let mut redis = redis_conn().await;
    assert_eq!(
        unsynced(&mut redis, &ns).await,
        120,
        "every event waits in redis"
    );
    for s in Layout::new(&ns).streams() {
        let groups: Vec<redis::Value> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&s)
            .query_async(&mut redis)
            .await
            .unwrap_or_default();
        assert!(groups.is_empty(), "{s} has a consumer group: {groups:?}");
    }
    assert!(
        sidecar.logs().contains("usage sync is off here"),
        "{}",
        sidecar.logs()
    );

    assert_eq!(
        connections_named(&db, SYNC_APPLICATION_NAME).await,
        Vec::<String>::new(),
        "a process with the sync off opens no sync connection"
    );
    assert!(
        !thread_names(sidecar.pid).iter().any(|t| t == SYNC_THREAD),
        "no sync thread in the sidecar"
    );
    // Its zeros would read as "Postgres is up to date" while nothing syncs.
    for gauge in [
        "tollgate_usage_events_pending",
        "tollgate_usage_sync_lag_seconds",
    ] {
        assert_eq!(
            sidecar.metric(gauge).await,
            None,
            "the sidecar exports {gauge}"
        );
    }

    let mut central_settings = settings.clone();
    central_settings.insert("TOLLGATE_SYNC_CONSUMER", "central".into());
    let central = TollgateProcess::start(&central_settings).await;
    wait_synced(&db, &ns, &ledger, Duration::from_secs(30)).await;
    verify_exactly_once(&db, &ledger).await;
    assert!(
        poll_until(Duration::from_secs(5), || async {
            central.metric("tollgate_usage_events_pending").await == Some(0.0)
        })
        .await,
        "the syncing process reports the backlog"
    );
    assert_eq!(sidecar.metric("tollgate_usage_events_pending").await, None);
    // The sync runs on a thread of its own, off the serving runtime's workers.
    let threads = thread_names(central.pid);
    assert!(threads.iter().any(|t| t == SYNC_THREAD), "{threads:?}");

    let status = sidecar.terminate(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "sidecar exit {status:?}\n{}",
        sidecar.logs()
    );
    drop(central);
    db.close().await;
}

/// The syncer writes through one Postgres connection of its own, named `tollgate-sync`, pass
/// after pass; requests and admin calls use the other pool, named `tollgate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_sync_writes_through_one_connection_of_its_own() {
    let settings = base_settings();
    let _cleanup = Cleanup(settings.clone());
    let ns = settings["TOLLGATE_REDIS_NAMESPACE"].clone();
    let p = TollgateProcess::start(&settings).await;
    let keys = Arc::new(create_keys_in_shards(&p, 4).await);
    let db = connect_db(&settings["TOLLGATE_DATABASE_URL"]).await;
    let ledger = Shared::default();
    // Three bursts with pauses longer than a pass: several separate inserts.
    for round in 0..3 {
        let from = round * 40;
        let failed = drive(on(&p), keys.clone(), from..from + 40, 4, ledger.clone()).await;
        assert_eq!(failed, 0);
        let so_far = merged(&[&ledger]);
        wait_synced(&db, &ns, &so_far, Duration::from_secs(30)).await;
    }
    let ledger = merged(&[&ledger]);
    verify_exactly_once(&db, &ledger).await;

    let sync = connections_named(&db, SYNC_APPLICATION_NAME).await;
    assert_eq!(sync.len(), 1, "one sync connection: {sync:?}");
    assert!(
        sync[0] == "COMMIT" || sync[0].contains("usage_events"),
        "its last statement is the usage insert's: {sync:?}"
    );
    let others = connections_named(&db, "tollgate").await;
    assert!(!others.is_empty(), "admin calls used the request pool");
    assert!(
        others.iter().all(|q| !q.contains("usage_events")),
        "no request-pool connection wrote usage: {others:?}"
    );
    db.close().await;
}

/// A Postgres connection that stops answering without closing (half-open after a failover, or
/// dropped by a NAT) costs the syncer one bounded write, not the kernel's quarter of an hour:
/// the connection is closed, the next write connects afresh, and every event arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_connection_that_goes_silent_is_dropped_and_the_sync_goes_on() {
    let app = spawn_app_with(|s| {
        s.insert("TOLLGATE_SYNC_ENABLED", "false".into());
    })
    .await;
    let (_, api_key) = app.create_key(json!({"user_id": "u-silent"})).await;
    let key_id = api_key["id"].as_str().expect("id").to_string();
    let relay = SilentRelay::start().await;
    let sync_db = tollgate::store::connect_usage_sync(&relay.route(&app.db_url)).expect("pool");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let syncer = tollgate::sync::usage::Syncer::new(
        tollgate::hot::redis::Redis::new(
            vec![app.settings["TOLLGATE_REDIS_URL"].clone()],
            Duration::from_secs(2),
        ),
        sync_db,
        tollgate::metrics::Metrics::new(),
        Layout::new(&app.namespace).streams(),
        "silent-test".into(),
    )
    .with_write_bound(Duration::from_secs(1));
    let task = tokio::spawn(syncer.run(stopped, Duration::from_secs(2)));

    let stream = Layout::new(&app.namespace).streams()[0].clone();
    let now = Utc::now().timestamp_millis().to_string();
    let add = |event: String| {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&stream)
            .arg("*")
            .arg(&usage_entry(&event, &key_id, "u-silent", "gpt-4o", &now));
        let mut redis = app.redis.clone();
        async move {
            let _: String = cmd.query_async(&mut redis).await.expect("xadd");
        }
    };
    let rows = |prefix: &'static str| {
        let db = app.db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM usage_events WHERE event_id LIKE $1 || '%'",
            )
            .bind(prefix)
            .fetch_one(&db)
            .await
            .expect("count")
        }
    };
    add("silent-before".into()).await;
    assert!(
        poll_until(Duration::from_secs(10), || async {
            rows("silent-before").await == 1
        })
        .await,
        "the syncer writes through the relay"
    );

    relay.freeze();
    for i in 0..20 {
        add(format!("silent-after-{i}")).await;
    }
    // One bound (1 s), the retry's back-off, a new connection: seconds, not minutes.
    assert!(
        poll_until(Duration::from_secs(15), || async {
            rows("silent-after-").await == 20
        })
        .await,
        "events written after the connection went silent: {} of 20",
        rows("silent-after-").await
    );
    assert!(
        relay.silent_connections() >= 1,
        "the write was cut off on a silent connection"
    );
    let used = balance_used(&app.db, &key_id).await;
    assert_eq!(used, 21 * 1000, "each event charged once");
    let _ = stop.send(true);
    let _ = task.await;
}

/// Every write that changes several `api_keys` rows at once, at the same moment, over
/// overlapping keys: two syncers' usage batches (two replicas, or one and a claimer), the
/// reconciler marking a page of keys pushed, the sweeper disabling expired keys. Each takes
/// row locks on many keys (a batch also on their daily roll-ups): in different orders they
/// would deadlock, and Postgres would abort one of them to be retried. For rounds on end,
/// every write must commit, the sweep must catch every expired key, and the usage totals
/// must still be exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_multi_key_writes_never_deadlock() {
    use rand::seq::SliceRandom;

    let app = spawn_app().await;
    let mut keys = Vec::new();
    for i in 0..400 {
        let (_, k) = app
            .create_key(json!({"user_id": format!("u-lock-{i}")}))
            .await;
        let id = k["id"].as_str().unwrap().to_string();
        keys.push((uuid::Uuid::parse_str(&id).unwrap(), id));
    }
    let mut ledger = Ledger::default();
    let mut failures = Vec::new();
    let mut rng = rand::thread_rng();
    for round in 0..100 {
        let mut batches = Vec::new();
        for side in 0..2 {
            let mut order: Vec<&(uuid::Uuid, String)> = keys.iter().collect();
            order.shuffle(&mut rng);
            // Several events per key, spread through the batch, as a real pass gathers them.
            // Key sets of different sizes: a plan's hash tables then differ, and so would the
            // order in which it visits the shared keys.
            let n = rand::Rng::gen_range(&mut rng, 20..=keys.len());
            let picked: Vec<_> = order
                .iter()
                .take(n)
                .chain(order.iter().take(n / 2))
                .collect();
            let batch: Vec<UsageEvent> = picked
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    let id = format!("lock-{round}-{side}-{i}");
                    usage_event(id, k.0, round * 1000 + side * 600 + i)
                })
                .collect();
            for (e, k) in batch.iter().zip(&picked) {
                ledger.attempted.insert(
                    e.event_id.clone(),
                    Attempt {
                        key_id: k.1.clone(),
                        cost: e.cost_nanos,
                        tokens: e.total_tokens,
                    },
                );
            }
            batches.push(batch);
        }
        // And the reconciler, marking a page of keys as pushed to Redis after a reload, and
        // the sweeper, disabling the keys that have just expired.
        let mut marks: Vec<(uuid::Uuid, i64)> = keys.iter().map(|k| (k.0, 0)).collect();
        marks.shuffle(&mut rng);
        marks.truncate(rand::Rng::gen_range(&mut rng, 20..=keys.len()));
        let expiring: Vec<uuid::Uuid> = marks.iter().take(100).map(|m| m.0).collect();
        sqlx::query(
            "UPDATE api_keys SET is_active = TRUE, expires_at = now() - interval '1 second' \
             WHERE id = ANY($1)",
        )
        .bind(&expiring)
        .execute(&app.db)
        .await
        .unwrap();
        let (a, b, c, d) = tokio::join!(
            insert_batch(&app.db, &batches[0]),
            insert_batch(&app.db, &batches[1]),
            tollgate::store::keys::mark_pushed_many(&app.db, &marks),
            tollgate::store::keys::cleanup_expired(&app.db, false)
        );
        if let Err(e) = c {
            failures.push(format!("round {round}, marking pushed: {e:?}"));
        }
        match d {
            Ok(cleaned) => {
                let disabled: HashSet<uuid::Uuid> = cleaned
                    .iter()
                    .map(|c| match c {
                        Expired::Disabled(k) | Expired::Deleted(k) => k.id,
                    })
                    .collect();
                assert!(
                    expiring.iter().all(|id| disabled.contains(id)),
                    "round {round}: the sweep missed expired keys"
                );
            }
            Err(e) => failures.push(format!("round {round}, expiry sweep: {e:?}")),
        }
        for (batch, result) in batches.iter().zip([a, b]) {
            match result {
                Ok(n) => {
                    assert_eq!(n, batch.len() as u64);
                    ledger
                        .acked
                        .extend(batch.iter().map(|e| e.event_id.clone()));
                }
                Err(e) => failures.push(format!("round {round}: {e:?}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 400 writes failed, e.g. {}",
        failures.len(),
        failures[0]
    );
    // Only committed batches were acknowledged; an aborted one left nothing behind.
    ledger.attempted.retain(|id, _| ledger.acked.contains(id));
    verify_exactly_once(&app.db, &ledger).await;
}
