//! Usage events into Postgres: one transaction per batch (key rows locked in id order, then one
//! statement), idempotent by event id.

use chrono::{DateTime, Utc};
use sqlx::{Acquire, Postgres};
use uuid::Uuid;

use super::keys::lock_in_id_order;
use super::StoreError;

/// One settled request, as the settle script recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageEvent {
    /// The lease id: unique per settlement, the idempotency key of the insert.
    pub event_id: String,
    pub key_id: Option<Uuid>,
    pub user_id: String,
    pub provider: String,
    pub api_format: String,
    pub model: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub total_tokens: i64,
    pub cost_nanos: i64,
    pub response_time_ms: Option<i64>,
    pub status_code: Option<i32>,
    pub lease_expired: bool,
    pub admitted_at: DateTime<Utc>,
    pub settled_at: DateTime<Utc>,
}

/// When Postgres recorded each of these events (`created_at`: its settlement's time), for those
/// it has.
pub async fn settled_at(
    conn: &mut sqlx::PgConnection,
    event_ids: Vec<String>,
) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT event_id, created_at FROM usage_events WHERE event_id = ANY($1::text[])",
    )
    .bind(event_ids)
    .fetch_all(conn)
    .await?)
}

/// Inserts a batch and, for the events that were new, adds them to the daily roll-up and to
/// each key's `balance_used_nanos` / `last_used_at` — all in one statement, so a batch that is
/// delivered twice (a crash before XACK) changes nothing the second time. Returns how many
/// events were new.
///
/// The statement is preceded, in the same transaction, by locking the batch's key rows in id
/// order ([`lock_in_id_order`]). Two syncers writing batches for overlapping keys (two
/// replicas, or a claim racing a re-read) would otherwise take the `api_keys` and
/// `usage_daily` row locks in whatever order their plans visit them, deadlock, and have one
/// batch aborted and retried. With the key rows locked first and in one order, batches that
/// share a key simply run one after the other; batches that share none touch disjoint rows
/// (a key's `usage_daily` rows are only written with its `api_keys` row locked).
///
/// `db` is a pool or one connection (the syncer bounds its writes on a connection it holds).
pub async fn insert_batch<'a, A>(db: A, events: &[UsageEvent]) -> Result<u64, StoreError>
where
    A: Acquire<'a, Database = Postgres>,
{
    if events.is_empty() {
        return Ok(0);
    }
    let keys: Vec<Uuid> = events.iter().filter_map(|e| e.key_id).collect();
    let mut event_id = Vec::with_capacity(events.len());
    let mut key_id = Vec::with_capacity(events.len());
    let mut user_id = Vec::with_capacity(events.len());
    let mut provider = Vec::with_capacity(events.len());
    let mut api_format = Vec::with_capacity(events.len());
    let mut model = Vec::with_capacity(events.len());
    let mut input = Vec::with_capacity(events.len());
    let mut output = Vec::with_capacity(events.len());
    let mut total = Vec::with_capacity(events.len());
    let mut cost = Vec::with_capacity(events.len());
    let mut rt = Vec::with_capacity(events.len());
    let mut status = Vec::with_capacity(events.len());
    let mut expired = Vec::with_capacity(events.len());
    let mut admitted = Vec::with_capacity(events.len());
    let mut settled = Vec::with_capacity(events.len());
    for e in events {
        event_id.push(e.event_id.clone());
        key_id.push(e.key_id);
        user_id.push(e.user_id.clone());
        provider.push(e.provider.clone());
        api_format.push(e.api_format.clone());
        model.push(e.model.clone());
        input.push(e.input_tokens);
        output.push(e.output_tokens);
        total.push(e.total_tokens);
        cost.push(e.cost_nanos);
        rt.push(e.response_time_ms);
        status.push(e.status_code);
        expired.push(e.lease_expired);
        admitted.push(e.admitted_at);
        settled.push(e.settled_at);
    }
    let mut tx = db.begin().await?;
    lock_in_id_order(&mut tx, &keys).await?;
    let (new,): (i64,) = sqlx::query_as(
        r#"
        WITH ins AS (
            INSERT INTO usage_events (event_id, key_id, user_id, provider, api_format, model,
                input_tokens, output_tokens, total_tokens, cost_nanos, response_time_ms,
                status_code, lease_expired, admitted_at, created_at)
            SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                $6::text[], $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[],
                $12::int4[], $13::bool[], $14::timestamptz[], $15::timestamptz[])
            ON CONFLICT (event_id) DO NOTHING
            RETURNING key_id, total_tokens, cost_nanos, response_time_ms, created_at
        ),
        daily AS (
            INSERT INTO usage_daily AS d (key_id, day, requests, tokens, cost_nanos,
                response_time_sum, response_time_count)
            SELECT key_id, (created_at AT TIME ZONE 'UTC')::date, count(*), sum(total_tokens),
                sum(cost_nanos), COALESCE(sum(response_time_ms), 0), count(response_time_ms)
            FROM ins WHERE key_id IS NOT NULL GROUP BY 1, 2
            ON CONFLICT (key_id, day) DO UPDATE SET
                requests = d.requests + EXCLUDED.requests,
                tokens = d.tokens + EXCLUDED.tokens,
                cost_nanos = d.cost_nanos + EXCLUDED.cost_nanos,
                response_time_sum = d.response_time_sum + EXCLUDED.response_time_sum,
                response_time_count = d.response_time_count + EXCLUDED.response_time_count
        ),
        keys AS (
            UPDATE api_keys k SET
                balance_used_nanos = k.balance_used_nanos + s.cost,
                last_used_at = GREATEST(k.last_used_at, s.last)
            FROM (SELECT key_id, sum(cost_nanos) AS cost, max(created_at) AS last
                  FROM ins WHERE key_id IS NOT NULL GROUP BY key_id) s
            WHERE k.id = s.key_id
        )
        SELECT count(*) FROM ins
        "#,
    )
    .bind(&event_id)
    .bind(&key_id)
    .bind(&user_id)
    .bind(&provider)
    .bind(&api_format)
    .bind(&model)
    .bind(&input)
    .bind(&output)
    .bind(&total)
    .bind(&cost)
    .bind(&rt)
    .bind(&status)
    .bind(&expired)
    .bind(&admitted)
    .bind(&settled)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(u64::try_from(new).unwrap_or(0))
}
