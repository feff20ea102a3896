//! Per-key statistics over settled usage.
//!
//! Whole UTC days inside the range come from `usage_daily` (one row per key and day); only the
//! partial days at the range's edges read raw `usage_events` rows, through the
//! `(key_id, created_at)` index. So a key with millions of events answers in milliseconds.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::StoreError;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DayTotals {
    pub requests: i64,
    pub tokens: i64,
    pub cost_nanos: i64,
    pub(crate) response_time_sum: i64,
    pub(crate) response_time_count: i64,
}

impl DayTotals {
    fn add(&mut self, o: &DayTotals) {
        self.requests += o.requests;
        self.tokens += o.tokens;
        self.cost_nanos += o.cost_nanos;
        self.response_time_sum += o.response_time_sum;
        self.response_time_count += o.response_time_count;
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyStats {
    pub total: DayTotals,
    /// Oldest day first.
    pub daily: Vec<(NaiveDate, DayTotals)>,
}

type Row = (NaiveDate, i64, i64, i64, i64, i64);

fn midnight_ceil(t: DateTime<Utc>) -> DateTime<Utc> {
    let floor = midnight_floor(t);
    if floor == t {
        t
    } else {
        floor + Duration::days(1)
    }
}

fn midnight_floor(t: DateTime<Utc>) -> DateTime<Utc> {
    t.date_naive()
        .and_hms_opt(0, 0, 0)
        .map(|n| n.and_utc())
        .unwrap_or(t)
}

/// Statistics of one key over `[start, end]` (either bound optional).
pub async fn key_stats(
    pool: &PgPool,
    key_id: Uuid,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
) -> Result<KeyStats, StoreError> {
    key_stats_on(&mut *pool.acquire().await?, key_id, start, end).await
}

/// [`key_stats`] on one connection (what `store::bounded` hands out).
pub(crate) async fn key_stats_on(
    conn: &mut PgConnection,
    key_id: Uuid,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
) -> Result<KeyStats, StoreError> {
    // Whole days: [full_from, full_to). Edges: [start, full_from) and [full_to, end].
    let full_from = start.map(midnight_ceil);
    let full_to = end.map(midnight_floor);
    let mut days: BTreeMap<NaiveDate, DayTotals> = BTreeMap::new();

    let rollup: Vec<Row> = sqlx::query_as(
        "SELECT day, requests, tokens, cost_nanos, response_time_sum, response_time_count \
         FROM usage_daily WHERE key_id = $1 \
         AND ($2::date IS NULL OR day >= $2) AND ($3::date IS NULL OR day < $3)",
    )
    .bind(key_id)
    .bind(full_from.map(|t| t.date_naive()))
    .bind(full_to.map(|t| t.date_naive()))
    .fetch_all(&mut *conn)
    .await?;

    let empty_full_range = matches!((full_from, full_to), (Some(a), Some(b)) if a >= b);
    let mut rows = if empty_full_range { Vec::new() } else { rollup };

    let edge_sql = "SELECT (created_at AT TIME ZONE 'UTC')::date, count(*)::int8, \
         COALESCE(sum(total_tokens), 0)::int8, COALESCE(sum(cost_nanos), 0)::int8, \
         COALESCE(sum(response_time_ms), 0)::int8, count(response_time_ms)::int8 \
         FROM usage_events WHERE key_id = $1 AND created_at >= $2 AND created_at < $3 \
         GROUP BY 1";
    // Half-open [from, to). `end` is inclusive, so its edge runs to `end` + 1µs (timestamps
    // have microsecond precision); the start edge stops exactly where the whole days begin,
    // or a row at that midnight would be counted by both the edge and the roll-up.
    let after_end = |e: DateTime<Utc>| e + Duration::microseconds(1);
    let mut edges: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    if empty_full_range {
        if let (Some(s), Some(e)) = (start, end) {
            edges.push((s, after_end(e)));
        }
    } else {
        if let (Some(s), Some(f)) = (start, full_from) {
            if s < f {
                edges.push((s, f));
            }
        }
        if let (Some(t), Some(e)) = (full_to, end) {
            edges.push((t, after_end(e)));
        }
    }
    for (from, to) in edges {
        let part: Vec<Row> = sqlx::query_as(edge_sql)
            .bind(key_id)
            .bind(from)
            .bind(to)
            .fetch_all(&mut *conn)
            .await?;
        rows.extend(part);
    }

    for (day, requests, tokens, cost, rt_sum, rt_count) in rows {
        let t = DayTotals {
            requests,
            tokens,
            cost_nanos: cost,
            response_time_sum: rt_sum,
            response_time_count: rt_count,
        };
        days.entry(day).or_default().add(&t);
    }
    let mut total = DayTotals::default();
    for t in days.values() {
        total.add(t);
    }
    Ok(KeyStats {
        total,
        daily: days.into_iter().collect(),
    })
}
