//! Latency of per-key statistics (`store::stats::key_stats`, what `GET /admin/keys/{id}/stats`
//! runs) for a key with 1,000,000 usage rows, against the real Postgres.
//!
//! The rows are bulk-inserted with `generate_series` (10,000 a day over 100 UTC days) and the
//! `usage_daily` roll-up is built from them with one `GROUP BY`, so both tables agree exactly as
//! the syncer keeps them. Cases:
//!
//! - `key_stats/all_time`: no range — roll-up rows only.
//! - `key_stats/range_cutting_days`: 06:00 on day 10 to 18:00 on day 80 — 69 whole days from
//!   the roll-up plus the raw rows of the two partial days (about 15,000).
//! - `key_stats/within_one_day`: 01:00 to 23:00 of one day — raw rows only (about 9,200).
//! - `raw_group_by/*`: the same answers computed from the raw rows alone (what a service without
//!   a roll-up does), for comparison.
//!
//! Needs Postgres (`TEST_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432`); uses a
//! fresh database and drops it at the end. `cargo bench --bench stats`; with `-- --test` it runs
//! each case once over 10,000 rows.

use std::time::Instant;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use criterion::Criterion;
use sqlx::PgPool;
use tokio::runtime::Runtime;
use tollgate::store;
use tollgate::store::stats::key_stats;
use uuid::Uuid;

const DAYS: i64 = 100;

/// One end of a stats range; `None` = open.
type Bound = Option<DateTime<Utc>>;

fn pg_server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

struct Env {
    db: PgPool,
    db_name: String,
    key: Uuid,
    /// Midnight UTC of the first day with usage.
    first_day: DateTime<Utc>,
    rows: i64,
}

impl Env {
    async fn setup(rows: i64) -> Env {
        let db_name = format!("tollgate_bench_{}", Uuid::new_v4().simple());
        let url = format!("{}/{db_name}", pg_server_url());
        store::ensure_database(&url)
            .await
            .expect("create bench database");
        let db = store::connect(&url).await.expect("connect");
        store::migrate(&db).await.expect("migrate");
        let key = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO api_keys (id, user_id, name, key_hash, key_sealed, key_display)
             VALUES ($1, 'bench', 'bench', md5($1::text), '\\x00'::bytea, 'sk-…')",
        )
        .bind(key)
        .execute(&db)
        .await
        .expect("insert key");
        let today = Utc::now().date_naive();
        let first_day = (today - Duration::days(DAYS))
            .and_hms_opt(0, 0, 0)
            .expect("midnight")
            .and_utc();
        let step_us = DAYS * 86_400_000_000 / rows;
        let started = Instant::now();
        sqlx::query(
            "INSERT INTO usage_events (event_id, key_id, user_id, provider, api_format, model,
                 input_tokens, output_tokens, total_tokens, cost_nanos, response_time_ms,
                 status_code, lease_expired, admitted_at, created_at)
             SELECT 'bench-' || g, $1, 'bench', 'openai', 'openai:chat', 'gpt-4o',
                 100 + g % 50, 300 + g % 100, 400 + g % 50 + g % 100, 1000000 + g % 7919,
                 200 + g % 1000, 200, false,
                 $2 + make_interval(secs => (g * $3 - 500000) / 1e6),
                 $2 + make_interval(secs => g * $3 / 1e6)
             FROM generate_series(0::int8, $4 - 1) AS g",
        )
        .bind(key)
        .bind(first_day)
        .bind(step_us)
        .bind(rows)
        .execute(&db)
        .await
        .expect("bulk insert usage_events");
        sqlx::query(
            "INSERT INTO usage_daily (key_id, day, requests, tokens, cost_nanos,
                 response_time_sum, response_time_count)
             SELECT key_id, (created_at AT TIME ZONE 'UTC')::date, count(*), sum(total_tokens),
                 sum(cost_nanos), COALESCE(sum(response_time_ms), 0), count(response_time_ms)
             FROM usage_events WHERE key_id = $1 GROUP BY 1, 2",
        )
        .bind(key)
        .execute(&db)
        .await
        .expect("build usage_daily");
        sqlx::query("UPDATE api_keys SET balance_used_nanos = (SELECT sum(cost_nanos) FROM usage_events) WHERE id = $1")
            .bind(key)
            .execute(&db)
            .await
            .expect("balance");
        sqlx::query("VACUUM ANALYZE")
            .execute(&db)
            .await
            .expect("vacuum");
        eprintln!("loaded {rows} usage rows in {:?}", started.elapsed());
        Env {
            db,
            db_name,
            key,
            first_day,
            rows,
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
    }

    fn at(&self, day: i64, hour: i64) -> DateTime<Utc> {
        self.first_day + Duration::days(day) + Duration::hours(hour)
    }

    /// The same totals computed from raw rows only (conditions written out, so the planner
    /// can use the `(key_id, created_at)` index for a range).
    async fn raw_group_by(&self, start: Bound, end: Bound) -> Vec<(NaiveDate, i64, i64, i64)> {
        let mut sql = String::from(
            "SELECT (created_at AT TIME ZONE 'UTC')::date, count(*)::int8, \
                 sum(total_tokens)::int8, sum(cost_nanos)::int8 \
             FROM usage_events WHERE key_id = $1",
        );
        let mut binds = Vec::new();
        if let Some(s) = start {
            binds.push(s);
            sql.push_str(&format!(" AND created_at >= ${}", binds.len() + 1));
        }
        if let Some(e) = end {
            binds.push(e);
            sql.push_str(&format!(" AND created_at <= ${}", binds.len() + 1));
        }
        sql.push_str(" GROUP BY 1 ORDER BY 1");
        let mut q = sqlx::query_as(&sql).bind(self.key);
        for b in binds {
            q = q.bind(b);
        }
        q.fetch_all(&self.db).await.expect("raw group by")
    }
}

fn main() {
    let test_mode = std::env::args().any(|a| a == "--test");
    let rt = Runtime::new().expect("tokio runtime");
    let env = rt.block_on(Env::setup(if test_mode { 10_000 } else { 1_000_000 }));
    let mut c = Criterion::default().configure_from_args();

    let ranges: [(&str, Bound, Bound); 3] = [
        ("all_time", None, None),
        (
            "range_cutting_days",
            Some(env.at(10, 6)),
            Some(env.at(80, 18)),
        ),
        ("within_one_day", Some(env.at(50, 1)), Some(env.at(50, 23))),
    ];

    // The roll-up path must give the raw answer, or the timings compare different things.
    for (name, start, end) in ranges {
        let s = rt
            .block_on(key_stats(&env.db, env.key, start, end))
            .expect("stats");
        let raw = rt.block_on(env.raw_group_by(start, end));
        let raw_total: (i64, i64, i64) = raw
            .iter()
            .fold((0, 0, 0), |a, r| (a.0 + r.1, a.1 + r.2, a.2 + r.3));
        assert_eq!(
            (s.total.requests, s.total.tokens, s.total.cost_nanos),
            raw_total,
            "{name}: roll-up and raw rows disagree"
        );
        assert_eq!(s.daily.len(), raw.len(), "{name}: days");
        if name == "all_time" {
            assert_eq!(s.total.requests, env.rows);
        }
    }

    let mut g = c.benchmark_group("key_stats");
    for (name, start, end) in ranges {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                key_stats(&env.db, env.key, start, end)
                    .await
                    .expect("stats")
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("raw_group_by");
    g.sample_size(10);
    for (name, start, end) in ranges {
        g.bench_function(name, |b| {
            b.to_async(&rt).iter(|| env.raw_group_by(start, end))
        });
    }
    g.finish();

    c.final_summary();
    rt.block_on(env.teardown());
}
