//! How fast usage moves from Redis into Postgres, against the real services.
//!
//! - `insert_batch/new_500`: one `store::usage::insert_batch` of 500 new events (the syncer's
//!   batch): the UNNEST insert plus the `usage_daily` and `api_keys` roll-ups.
//! - `insert_batch/redelivered_500`: the same 500 again, as after a crash before XACK: every
//!   row conflicts and nothing else changes.
//! - `syncer/drain_N`: the whole path. N events are written into the 16 shard streams in
//!   settle.lua's entry format (not timed), then one `Syncer` runs until the streams are empty
//!   (timed): XREADGROUP → insert → XACK + XDEL. Throughput is reported in events/s.
//! - `syncer/one_event_latency`: one event written into the stream of an idle, running syncer,
//!   timed until it is synced (deleted from the stream after the commit): the normal sync lag.
//!
//! Needs Redis and Postgres (`TEST_REDIS_URL`, `TEST_DATABASE_URL`, defaults as for the tests).
//! Uses a fresh database and Redis namespace and removes both at the end. Run with
//! `cargo bench --bench sync_throughput`; `cargo bench --bench sync_throughput -- --test` runs
//! each case once with a small N.

use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::{BenchmarkId, Criterion, Throughput};
use sqlx::PgPool;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tollgate::hot::layout::{Layout, SHARDS};
use tollgate::hot::redis::Redis;
use tollgate::metrics::Metrics;
use tollgate::store;
use tollgate::store::usage::{insert_batch, UsageEvent};
use tollgate::sync::usage::Syncer;
use uuid::Uuid;

const KEYS: usize = 200;

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn pg_server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

struct Env {
    db: PgPool,
    db_name: String,
    redis: redis::aio::MultiplexedConnection,
    namespace: String,
    keys: Vec<Uuid>,
}

impl Env {
    async fn setup() -> Env {
        let db_name = format!("tollgate_bench_{}", Uuid::new_v4().simple());
        let url = format!("{}/{db_name}", pg_server_url());
        store::ensure_database(&url)
            .await
            .expect("create bench database");
        let db = store::connect(&url).await.expect("connect");
        store::migrate(&db).await.expect("migrate");
        let keys: Vec<Uuid> = (0..KEYS).map(|_| Uuid::new_v4()).collect();
        sqlx::query(
            "INSERT INTO api_keys (id, user_id, name, key_hash, key_sealed, key_display)
             SELECT id, 'bench', 'bench', md5(id::text), '\\x00'::bytea, 'sk-…'
             FROM UNNEST($1::uuid[]) AS id",
        )
        .bind(&keys)
        .execute(&db)
        .await
        .expect("insert keys");
        let redis = redis::Client::open(redis_url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis reachable");
        Env {
            db,
            db_name,
            redis,
            namespace: format!("bench-{}", Uuid::new_v4().simple()),
            keys,
        }
    }

    async fn teardown(self) {
        self.db.close().await;
        let admin = PgPool::connect(&format!("{}/postgres", pg_server_url()))
            .await
            .expect("connect postgres");
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.db_name
        ))
        .execute(&admin)
        .await
        .expect("drop bench database");
        let mut c = self.redis.clone();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.namespace))
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(&keys).query_async(&mut c).await;
        }
    }

    fn event(&self, n: u64) -> UsageEvent {
        let now = Utc::now();
        UsageEvent {
            event_id: format!("{:032x}.{}", n, Uuid::new_v4().simple()),
            key_id: Some(self.keys[n as usize % KEYS]),
            user_id: "bench".into(),
            provider: "openai".into(),
            api_format: "openai:chat".into(),
            model: "gpt-4o".into(),
            input_tokens: 120,
            output_tokens: 380,
            total_tokens: 500,
            cost_nanos: 12_345_678,
            response_time_ms: Some(840),
            status_code: Some(200),
            lease_expired: false,
            admitted_at: now,
            settled_at: now,
        }
    }

    /// Writes `n` events into the shard streams exactly as settle.lua does (one key always
    /// lands in the same shard).
    async fn prefill(&self, n: u64, first: u64) {
        let streams = Layout::new(&self.namespace).streams();
        let mut c = self.redis.clone();
        let now_ms = Utc::now().timestamp_millis().to_string();
        let mut pipe = redis::pipe();
        for i in first..first + n {
            let key = i as usize % KEYS;
            let stream = &streams[key % SHARDS as usize];
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg(&[
                    ("e", format!("{:032x}.{}", i, Uuid::new_v4().simple())),
                    ("k", self.keys[key].to_string()),
                    ("u", "bench".to_string()),
                    ("c", "12345678".to_string()),
                    ("it", "120".to_string()),
                    ("ot", "380".to_string()),
                    ("tt", "500".to_string()),
                    ("rt", "840".to_string()),
                    ("sc", "200".to_string()),
                    ("p", "openai".to_string()),
                    ("f", "openai:chat".to_string()),
                    ("m", "gpt-4o".to_string()),
                    ("at", now_ms.clone()),
                    ("ts", now_ms.clone()),
                    ("x", "0".to_string()),
                ])
                .ignore();
            if pipe.len() >= 1000 {
                let _: () = pipe.query_async(&mut c).await.expect("xadd");
                pipe = redis::pipe();
            }
        }
        if !pipe.is_empty() {
            let _: () = pipe.query_async(&mut c).await.expect("xadd");
        }
    }

    async fn unsynced(&self) -> i64 {
        let mut c = self.redis.clone();
        let mut n = 0;
        for s in Layout::new(&self.namespace).streams() {
            let len: i64 = redis::cmd("XLEN")
                .arg(&s)
                .query_async(&mut c)
                .await
                .expect("xlen");
            n += len;
        }
        n
    }

    /// Runs a syncer until the streams are empty; returns how long that took.
    async fn drain(&self) -> Duration {
        let syncer = Syncer::new(
            Redis::new(vec![redis_url()], Duration::from_secs(5)),
            self.db.clone(),
            Metrics::new(),
            Layout::new(&self.namespace).streams(),
            "bench".into(),
        );
        let (stop, stopped) = watch::channel(false);
        let started = Instant::now();
        let task = tokio::spawn(syncer.run(stopped, Duration::from_secs(5)));
        while self.unsynced().await > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = started.elapsed();
        let _ = stop.send(true);
        let _ = task.await;
        took
    }
}

fn main() {
    let test_mode = std::env::args().any(|a| a == "--test");
    let rt = Runtime::new().expect("tokio runtime");
    let env = rt.block_on(Env::setup());
    let mut c = Criterion::default().configure_from_args();
    let mut counter: u64 = 0;

    let mut g = c.benchmark_group("insert_batch");
    g.throughput(Throughput::Elements(500));
    g.sample_size(20);
    g.bench_function("new_500", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let env = &env;
            let batches: Vec<Vec<UsageEvent>> = (0..iters)
                .map(|_| {
                    (0..500)
                        .map(|_| {
                            counter += 1;
                            env.event(counter)
                        })
                        .collect()
                })
                .collect();
            async move {
                let started = Instant::now();
                for batch in &batches {
                    let new = insert_batch(&env.db, batch).await.expect("insert");
                    assert_eq!(new, 500);
                }
                started.elapsed()
            }
        })
    });
    let again: Vec<UsageEvent> = (0..500)
        .map(|_| {
            counter += 1;
            env.event(counter)
        })
        .collect();
    rt.block_on(insert_batch(&env.db, &again)).expect("insert");
    g.bench_function("redelivered_500", |b| {
        b.to_async(&rt).iter(|| async {
            let new = insert_batch(&env.db, &again).await.expect("insert");
            assert_eq!(new, 0);
        })
    });
    g.finish();

    let n: u64 = if test_mode { 2_000 } else { 50_000 };
    let mut g = c.benchmark_group("syncer");
    g.throughput(Throughput::Elements(n));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(30));
    g.bench_with_input(BenchmarkId::new("drain", n), &n, |b, &n| {
        b.to_async(&rt).iter_custom(|iters| {
            let env = &env;
            let first = counter;
            counter += iters * n;
            async move {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    env.prefill(n, first + i * n).await;
                    total += env.drain().await;
                }
                total
            }
        })
    });
    g.finish();

    // The idle path: one event at a time into a running syncer, timed until it is deleted
    // from its stream (so committed in Postgres). This is the normal sync lag.
    let mut g = c.benchmark_group("syncer");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("one_event_latency", |b| {
        let (stop, stopped) = watch::channel(false);
        let task = rt.spawn(
            Syncer::new(
                Redis::new(vec![redis_url()], Duration::from_secs(5)),
                env.db.clone(),
                Metrics::new(),
                Layout::new(&env.namespace).streams(),
                "bench-latency".into(),
            )
            .run(stopped, Duration::from_secs(5)),
        );
        b.to_async(&rt).iter_custom(|iters| {
            let env = &env;
            let first = counter;
            counter += iters;
            async move {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    let n = first + i;
                    let stream = &Layout::new(&env.namespace).streams()
                        [(n as usize % KEYS) % SHARDS as usize];
                    let started = Instant::now();
                    env.prefill(1, n).await;
                    let mut c = env.redis.clone();
                    loop {
                        let len: i64 = redis::cmd("XLEN")
                            .arg(stream)
                            .query_async(&mut c)
                            .await
                            .expect("xlen");
                        if len == 0 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    total += started.elapsed();
                }
                total
            }
        });
        let _ = stop.send(true);
        let _ = rt.block_on(task);
    });
    g.finish();

    c.final_summary();
    rt.block_on(env.teardown());
}
