//! API keys in Postgres: create, read, admin writes, balance adjustments, expiry.
//!
//! Every admin write increments `version`; the caller then pushes the row to Redis and marks
//! it pushed. If tollgate dies in between, `sync::reconcile` finds `pushed_version < version`
//! and pushes it again, so Redis never keeps a stale configuration or balance for long.

use chrono::{DateTime, Utc};
use sqlx::{Acquire, PgExecutor, PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::StoreError;
use crate::label::AllowList;

const COLUMNS: &str = "id, user_id, name, key_hash, key_sealed, key_display, allowed_providers, \
     allowed_api_formats, allowed_models, rate_limit, concurrent_limit, expires_at, is_standalone, \
     current_balance_nanos, balance_used_nanos, auto_delete_on_expiry, is_active, version, \
     created_at, updated_at, last_used_at, token_limit, budget_nanos, budget_period, \
     CASE WHEN budget_period IS NULL THEN balance_used_nanos ELSE (SELECT \
       COALESCE(SUM(d.cost_nanos), 0)::BIGINT FROM usage_daily d WHERE d.key_id = api_keys.id \
       AND d.day >= date_trunc(budget_period, now() AT TIME ZONE 'UTC')::date) \
     END AS budget_spent_nanos";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyRow {
    pub id: Uuid,
    pub user_id: String,
    pub(crate) name: String,
    pub key_hash: String,
    pub(crate) key_sealed: Vec<u8>,
    pub(crate) key_display: String,
    pub allowed_providers: Option<Vec<String>>,
    pub allowed_api_formats: Option<Vec<String>>,
    pub allowed_models: Option<Vec<String>>,
    pub rate_limit: Option<i32>,
    pub concurrent_limit: Option<i32>,
    pub expires_at: Option<DateTime<Utc>>,
    pub is_standalone: bool,
    pub current_balance_nanos: Option<i64>,
    pub balance_used_nanos: i64,
    pub(crate) auto_delete_on_expiry: Option<bool>,
    pub is_active: bool,
    pub version: i64,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) last_used_at: Option<DateTime<Utc>>,
    pub token_limit: Option<i64>,
    pub budget_nanos: Option<i64>,
    pub budget_period: Option<String>,
    /// Spent in the current budget period, as Postgres knows it (behind Redis by the sync lag).
    pub budget_spent_nanos: i64,
}

impl KeyRow {
    /// `max(0, balance − used)` for standalone keys with a balance; `None` otherwise.
    pub(crate) fn remaining_nanos(&self) -> Option<i64> {
        if !self.is_standalone {
            return None;
        }
        self.current_balance_nanos
            .map(|b| (b.saturating_sub(self.balance_used_nanos)).max(0))
    }
}

/// A key about to be created.
#[derive(Debug, Clone)]
pub(crate) struct NewKey {
    pub(crate) id: Uuid,
    pub(crate) user_id: String,
    pub(crate) name: String,
    pub(crate) key_hash: String,
    pub(crate) key_sealed: Vec<u8>,
    pub(crate) key_display: String,
    pub(crate) allowed_providers: Option<AllowList>,
    pub(crate) allowed_api_formats: Option<AllowList>,
    pub(crate) allowed_models: Option<AllowList>,
    pub(crate) rate_limit: Option<i32>,
    pub(crate) concurrent_limit: Option<i32>,
    pub(crate) expires_at: Option<DateTime<Utc>>,
    pub(crate) is_standalone: bool,
    pub(crate) current_balance_nanos: Option<i64>,
    pub(crate) auto_delete_on_expiry: Option<bool>,
    pub(crate) token_limit: Option<i64>,
    pub(crate) budget_nanos: Option<i64>,
    pub(crate) budget_period: Option<String>,
}

/// A PATCH: outer `None` = leave unchanged, `Some(None)` = clear.
#[derive(Debug, Clone, Default)]
pub(crate) struct KeyPatch {
    pub(crate) name: Option<String>,
    pub(crate) allowed_providers: Option<Option<AllowList>>,
    pub(crate) allowed_api_formats: Option<Option<AllowList>>,
    pub(crate) allowed_models: Option<Option<AllowList>>,
    pub(crate) rate_limit: Option<Option<i32>>,
    pub(crate) concurrent_limit: Option<Option<i32>>,
    pub(crate) is_active: Option<bool>,
    pub(crate) expires_at: Option<Option<DateTime<Utc>>>,
    pub(crate) auto_delete_on_expiry: Option<Option<bool>>,
    pub(crate) token_limit: Option<Option<i64>>,
    pub(crate) budget_nanos: Option<Option<i64>>,
    pub(crate) budget_period: Option<Option<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    #[error("no such key")]
    NotFound,
    #[error("key is not standalone")]
    NotStandalone,
    #[error("deduction exceeds the remaining balance")]
    Insufficient,
    #[error("balance would exceed the supported maximum")]
    TooLarge,
    #[error("the idempotency key was used for a different amount")]
    IdempotencyConflict,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The largest balance a key may hold, in nano-USD: admit.lua compares balances as Lua
/// numbers (doubles), which are exact integers up to 2^53.
pub const MAX_BALANCE_NANOS: i64 = crate::money::MAX_EXACT;

pub(crate) async fn insert<'e, E: PgExecutor<'e>>(db: E, k: &NewKey) -> Result<KeyRow, StoreError> {
    let sql = format!(
        "INSERT INTO api_keys (id, user_id, name, key_hash, key_sealed, key_display, \
         allowed_providers, allowed_api_formats, allowed_models, rate_limit, concurrent_limit, \
         expires_at, is_standalone, current_balance_nanos, auto_delete_on_expiry, token_limit, \
         budget_nanos, budget_period) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18) RETURNING {COLUMNS}"
    );
    Ok(sqlx::query_as::<_, KeyRow>(&sql)
        .bind(k.id)
        .bind(&k.user_id)
        .bind(&k.name)
        .bind(&k.key_hash)
        .bind(&k.key_sealed)
        .bind(&k.key_display)
        .bind(k.allowed_providers.as_ref().map(AllowList::as_slice))
        .bind(k.allowed_api_formats.as_ref().map(AllowList::as_slice))
        .bind(k.allowed_models.as_ref().map(AllowList::as_slice))
        .bind(k.rate_limit)
        .bind(k.concurrent_limit)
        .bind(k.expires_at)
        .bind(k.is_standalone)
        .bind(k.current_balance_nanos)
        .bind(k.auto_delete_on_expiry)
        .bind(k.token_limit)
        .bind(k.budget_nanos)
        .bind(&k.budget_period)
        .fetch_one(db)
        .await?)
}

pub async fn get<'e, E: PgExecutor<'e>>(db: E, id: Uuid) -> Result<Option<KeyRow>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1");
    Ok(sqlx::query_as(&sql).bind(id).fetch_optional(db).await?)
}

pub(crate) async fn by_hash<'e, E>(db: E, key_hash: &str) -> Result<Option<KeyRow>, StoreError>
where
    E: sqlx::PgExecutor<'e>,
{
    let sql = format!("SELECT {COLUMNS} FROM api_keys WHERE key_hash = $1");
    Ok(sqlx::query_as(&sql)
        .bind(key_hash)
        .fetch_optional(db)
        .await?)
}

/// [`by_hash`] within `bound`, for the admission path. A connection that overruns it is
/// closed rather than returned: it may have gone silent (half-open after a failover), and sqlx
/// pings a returned connection with no bound, so that ping would keep its place in the pool
/// for good. The caller must not be cancelled meanwhile (the gate runs this in a task of its
/// own), or the connection would go back to the pool unchecked in the same way.
pub async fn by_hash_within(
    pool: &PgPool,
    key_hash: &str,
    bound: std::time::Duration,
) -> Result<Option<KeyRow>, StoreError> {
    let mut conn = pool.acquire().await?;
    match tokio::time::timeout(bound, by_hash(&mut *conn, key_hash)).await {
        Ok(row) => row,
        Err(_) => {
            conn.close_on_drop();
            Err(StoreError::no_answer(bound))
        }
    }
}

/// A user's keys, standalone keys excluded, newest first.
pub(crate) async fn list_user<'e, E: PgExecutor<'e>>(
    db: E,
    user_id: &str,
    active: Option<bool>,
) -> Result<Vec<KeyRow>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM api_keys WHERE user_id = $1 AND NOT is_standalone \
         AND ($2::boolean IS NULL OR is_active = $2) ORDER BY created_at DESC, id"
    );
    Ok(sqlx::query_as(&sql)
        .bind(user_id)
        .bind(active)
        .fetch_all(db)
        .await?)
}

/// All standalone keys, newest first.
pub(crate) async fn list_standalone<'e, E: PgExecutor<'e>>(
    db: E,
    active: Option<bool>,
) -> Result<Vec<KeyRow>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM api_keys WHERE is_standalone \
         AND ($1::boolean IS NULL OR is_active = $1) ORDER BY created_at DESC, id"
    );
    Ok(sqlx::query_as(&sql).bind(active).fetch_all(db).await?)
}

async fn lock(tx: &mut Transaction<'_, Postgres>, id: Uuid) -> Result<Option<KeyRow>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1 FOR UPDATE");
    Ok(sqlx::query_as(&sql)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?)
}

async fn write_back(tx: &mut Transaction<'_, Postgres>, r: &KeyRow) -> Result<KeyRow, StoreError> {
    let sql = format!(
        "UPDATE api_keys SET name = $2, allowed_providers = $3, allowed_api_formats = $4, \
         allowed_models = $5, rate_limit = $6, concurrent_limit = $7, is_active = $8, \
         expires_at = $9, auto_delete_on_expiry = $10, current_balance_nanos = $11, \
         token_limit = $12, budget_nanos = $13, budget_period = $14, \
         version = version + 1, updated_at = now() WHERE id = $1 RETURNING {COLUMNS}"
    );
    Ok(sqlx::query_as(&sql)
        .bind(r.id)
        .bind(&r.name)
        .bind(&r.allowed_providers)
        .bind(&r.allowed_api_formats)
        .bind(&r.allowed_models)
        .bind(r.rate_limit)
        .bind(r.concurrent_limit)
        .bind(r.is_active)
        .bind(r.expires_at)
        .bind(r.auto_delete_on_expiry)
        .bind(r.current_balance_nanos)
        .bind(r.token_limit)
        .bind(r.budget_nanos)
        .bind(&r.budget_period)
        .fetch_one(&mut **tx)
        .await?)
}

/// Applies a PATCH under a row lock; `None` when the key does not exist.
pub(crate) async fn update<'a, A: Acquire<'a, Database = Postgres>>(
    db: A,
    id: Uuid,
    p: KeyPatch,
) -> Result<Option<KeyRow>, StoreError> {
    let mut tx = db.begin().await?;
    let Some(mut r) = lock(&mut tx, id).await? else {
        return Ok(None);
    };
    // Absent fields stay; present ones (including `null`, already `Some(None)`) replace.
    macro_rules! apply {
        ($($field:ident),*) => { $( if let Some(v) = p.$field { r.$field = v; } )* };
        (lists: $($field:ident),*) => {
            $( if let Some(v) = p.$field { r.$field = v.map(AllowList::into_vec); } )*
        };
    }
    apply!(lists: allowed_providers, allowed_api_formats, allowed_models);
    apply!(
        name,
        rate_limit,
        concurrent_limit,
        is_active,
        expires_at,
        auto_delete_on_expiry,
        token_limit,
        budget_nanos,
        budget_period
    );
    let row = write_back(&mut tx, &r).await?;
    tx.commit().await?;
    Ok(Some(row))
}

/// Adjusts a standalone key's balance and writes the ledger row, atomically. With an
/// `idempotency_key` already recorded for this key, nothing is applied again: the key's current
/// row is returned (or a conflict, when the earlier call named another amount).
///
/// `used_now` is what Redis says the key has spent (it runs ahead of Postgres by the sync lag);
/// a deduction is checked against the larger of the two, so it cannot take the balance below
/// what has really been spent.
pub async fn adjust_balance<'a, A: Acquire<'a, Database = Postgres>>(
    db: A,
    id: Uuid,
    amount_nanos: i64,
    used_now: Option<i64>,
    idempotency_key: Option<&str>,
) -> Result<KeyRow, BalanceError> {
    let mut tx = db.begin().await.map_err(StoreError::from)?;
    let Some(mut r) = lock(&mut tx, id).await? else {
        return Err(BalanceError::NotFound);
    };
    if !r.is_standalone {
        return Err(BalanceError::NotStandalone);
    }
    if let Some(k) = idempotency_key {
        // Under the row lock, so a concurrent retry waits for the first one and sees it.
        let earlier: Option<i64> = sqlx::query_scalar(
            "SELECT amount_nanos FROM balance_ledger WHERE key_id = $1 AND idempotency_key = $2",
        )
        .bind(id)
        .bind(k)
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        match earlier {
            Some(amount) if amount == amount_nanos => return Ok(r),
            Some(_) => return Err(BalanceError::IdempotencyConflict),
            None => {}
        }
    }
    let current = r.current_balance_nanos;
    let new_balance = if amount_nanos > 0 {
        current
            .unwrap_or(0)
            .checked_add(amount_nanos)
            .filter(|b| *b <= MAX_BALANCE_NANOS)
            .ok_or(BalanceError::TooLarge)?
    } else {
        let used = r.balance_used_nanos.max(used_now.unwrap_or(0));
        let remaining = current.unwrap_or(0).saturating_sub(used).max(0);
        if amount_nanos.unsigned_abs() > remaining.unsigned_abs() {
            return Err(BalanceError::Insufficient);
        }
        (current.unwrap_or(0) + amount_nanos).max(0)
    };
    r.current_balance_nanos = Some(new_balance);
    let row = write_back(&mut tx, &r).await?;
    sqlx::query(
        "INSERT INTO balance_ledger (key_id, amount_nanos, balance_after_nanos, idempotency_key) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(id)
    .bind(amount_nanos)
    .bind(new_balance)
    .bind(idempotency_key)
    .execute(&mut *tx)
    .await
    .map_err(StoreError::from)?;
    tx.commit().await.map_err(StoreError::from)?;
    Ok(row)
}

/// Keys in id order after `after`, at most `limit`: a full scan in pages.
pub async fn page<'e, E: PgExecutor<'e>>(
    db: E,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<KeyRow>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM api_keys WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2"
    );
    Ok(sqlx::query_as(&sql)
        .bind(after)
        .bind(limit)
        .fetch_all(db)
        .await?)
}

/// Records that Redis holds `version` of this key (never moves backwards).
pub async fn mark_pushed<'e, E: PgExecutor<'e>>(
    db: E,
    id: Uuid,
    version: i64,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE api_keys SET pushed_version = GREATEST(pushed_version, $2) WHERE id = $1")
        .bind(id)
        .bind(version)
        .execute(db)
        .await?;
    Ok(())
}

/// Locks the rows of `ids` in id order, inside `tx`. Every transaction that writes several
/// `api_keys` rows takes its row locks through this first: in the order its plan visits the
/// rows instead (a hash table's), two such transactions — two replicas' usage batches, a
/// batch and the reconciler — could each hold a row the other waits for, and Postgres would
/// abort one as a deadlock.
pub(crate) async fn lock_in_id_order(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[Uuid],
) -> Result<(), StoreError> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    sqlx::query("SELECT 1 FROM api_keys WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .bind(&ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// [`mark_pushed`] for many keys in one statement, its rows locked in id order first.
pub async fn mark_pushed_many<'a, A: Acquire<'a, Database = Postgres>>(
    db: A,
    pushed: &[(Uuid, i64)],
) -> Result<(), StoreError> {
    let (ids, versions): (Vec<Uuid>, Vec<i64>) = pushed.iter().copied().unzip();
    let mut tx = db.begin().await?;
    lock_in_id_order(&mut tx, &ids).await?;
    sqlx::query(
        "UPDATE api_keys k SET pushed_version = GREATEST(k.pushed_version, p.version) \
         FROM UNNEST($1::uuid[], $2::int8[]) AS p(id, version) WHERE k.id = p.id",
    )
    .bind(ids)
    .bind(versions)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Keys whose latest write Redis has not acknowledged.
pub async fn unpushed<'e, E: PgExecutor<'e>>(db: E, limit: i64) -> Result<Vec<KeyRow>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM api_keys WHERE pushed_version < version \
         AND updated_at < now() - interval '2 seconds' LIMIT $1"
    );
    Ok(sqlx::query_as(&sql).bind(limit).fetch_all(db).await?)
}

/// What happened to one expired key.
#[derive(Debug, Clone)]
pub enum Expired {
    Deleted(KeyRow),
    Disabled(KeyRow),
}

/// Active keys with `expires_at <= now`: physically deleted when their own
/// `auto_delete_on_expiry` (else `default_delete`) says so, else disabled. Usage rows stay.
pub async fn cleanup_expired<'a, A: Acquire<'a, Database = Postgres>>(
    db: A,
    default_delete: bool,
) -> Result<Vec<Expired>, StoreError> {
    let mut tx = db.begin().await?;
    // The rows both statements will change, locked in id order like every multi-row write
    // (see [`lock_in_id_order`]).
    sqlx::query(
        "SELECT 1 FROM api_keys WHERE is_active AND expires_at <= now() ORDER BY id FOR UPDATE",
    )
    .execute(&mut *tx)
    .await?;
    let deleted: Vec<KeyRow> = sqlx::query_as(&format!(
        "DELETE FROM api_keys WHERE is_active AND expires_at <= now() \
         AND COALESCE(auto_delete_on_expiry, $1) RETURNING {COLUMNS}"
    ))
    .bind(default_delete)
    .fetch_all(&mut *tx)
    .await?;
    let disabled: Vec<KeyRow> = sqlx::query_as(&format!(
        "UPDATE api_keys SET is_active = FALSE, version = version + 1, updated_at = now() \
         WHERE is_active AND expires_at <= now() AND NOT COALESCE(auto_delete_on_expiry, $1) \
         RETURNING {COLUMNS}"
    ))
    .bind(default_delete)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(deleted
        .into_iter()
        .map(Expired::Deleted)
        .chain(disabled.into_iter().map(Expired::Disabled))
        .collect())
}
