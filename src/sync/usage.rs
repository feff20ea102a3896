//! Where usage goes to Postgres: the syncer that drains every shard's usage stream.
//!
//! Each replica runs one syncer, a consumer in the `tollgate-sync` group of each shard stream,
//! so replicas share the work and no event is delivered to two of them at once. For each batch:
//! read → one idempotent `INSERT … ON CONFLICT DO NOTHING` (which also updates the daily
//! roll-up and the keys' `balance_used_nanos` / `last_used_at` for the rows that were new) →
//! `XACK` + `XDEL` only after the commit. A crash anywhere re-delivers the batch, and the insert
//! ignores what it already has: every event lands exactly once. Entries of a consumer that died
//! are taken over with `XAUTOCLAIM`. While Postgres is down, nothing is acknowledged and events
//! wait in Redis; the stream shrinks only as events are synced.

use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{FromRedisValue, Value};
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

use crate::hot::redis::{Redis, RedisFailure};
use crate::hot::scripts::{ScriptArg, Scripts};
use crate::metrics::Metrics;
use crate::store::usage::{insert_batch, UsageEvent};
use crate::store::StoreError;

pub const GROUP: &str = "tollgate-sync";
const BATCH: usize = 500;
/// Entries a consumer has held this long without acknowledging are presumed orphaned.
const CLAIM_IDLE: Duration = Duration::from_secs(15);
const IDLE_POLL: Duration = Duration::from_millis(100);
const GAUGE_EVERY: Duration = Duration::from_secs(1);

pub struct Syncer {
    redis: Redis,
    db: PgPool,
    metrics: Metrics,
    streams: Vec<String>,
    consumer: String,
    /// Shards where this consumer may hold delivered-but-unacknowledged entries.
    own_pending: Vec<bool>,
    claim_idle: Duration,
    scripts: Scripts,
}

#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("redis: {0}")]
    Redis(#[from] RedisFailure),
    #[error("postgres: {0}")]
    Postgres(#[from] crate::store::StoreError),
}

fn str_field(e: &StreamId, f: &str) -> Option<String> {
    e.get::<String>(f)
}

fn int_field(e: &StreamId, f: &str) -> Option<i64> {
    str_field(e, f).and_then(|s| s.parse().ok())
}

fn ms_time(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

/// Postgres's "data exception" and "integrity constraint" classes: the row itself is at fault.
fn is_data_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
        _ => false,
    }
}

/// Reads one stream entry written by settle.lua.
pub fn parse_event(e: &StreamId) -> Option<UsageEvent> {
    let opt = |v: Option<i64>| v.filter(|n| *n >= 0);
    Some(UsageEvent {
        event_id: str_field(e, "e")?,
        key_id: str_field(e, "k").and_then(|k| Uuid::parse_str(&k).ok()),
        user_id: str_field(e, "u")?,
        provider: str_field(e, "p").unwrap_or_default(),
        api_format: str_field(e, "f").unwrap_or_default(),
        model: str_field(e, "m").unwrap_or_default(),
        input_tokens: int_field(e, "it")?,
        output_tokens: int_field(e, "ot")?,
        total_tokens: int_field(e, "tt")?,
        cost_nanos: int_field(e, "c")?,
        response_time_ms: opt(int_field(e, "rt")),
        status_code: opt(int_field(e, "sc")).and_then(|n| i32::try_from(n).ok()),
        lease_expired: str_field(e, "x").as_deref() == Some("1"),
        admitted_at: ms_time(int_field(e, "at")?)?,
        settled_at: ms_time(int_field(e, "ts")?)?,
    })
}

fn entry_ms(id: &str) -> Option<i64> {
    id.split('-').next()?.parse().ok()
}

impl Syncer {
    pub fn new(
        redis: Redis,
        db: PgPool,
        metrics: Metrics,
        streams: Vec<String>,
        consumer: String,
    ) -> Self {
        let n = streams.len();
        Syncer {
            redis,
            db,
            metrics,
            streams,
            consumer,
            own_pending: vec![true; n],
            claim_idle: CLAIM_IDLE,
            scripts: Scripts::default(),
        }
    }

    /// For tests: how long before another consumer's entries are taken over.
    pub fn with_claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    async fn ensure_group(&self, stream: &str) -> Result<(), RedisFailure> {
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM");
        match self.redis.query(&cmd).await {
            Ok(_) => Ok(()),
            Err(RedisFailure::Command(code)) if code == "BUSYGROUP" => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn read(&self, stream: &str, from: &str) -> Result<Vec<StreamId>, RedisFailure> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(BATCH)
            .arg("STREAMS")
            .arg(stream)
            .arg(from);
        let v = match self.redis.query(&cmd).await {
            Err(RedisFailure::Command(code)) if code == "NOGROUP" => {
                self.ensure_group(stream).await?;
                self.redis.query(&cmd).await?
            }
            other => other?,
        };
        if v == Value::Nil {
            return Ok(Vec::new());
        }
        let reply = StreamReadReply::from_redis_value(v)
            .map_err(|_| RedisFailure::Command("unexpected XREADGROUP reply".into()))?;
        Ok(reply.keys.into_iter().flat_map(|k| k.ids).collect())
    }

    async fn claim(&self, stream: &str) -> Result<Vec<StreamId>, RedisFailure> {
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(stream)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(self.claim_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(BATCH);
        let v = match self.redis.query(&cmd).await {
            Err(RedisFailure::Command(code)) if code == "NOGROUP" => return Ok(Vec::new()),
            other => other?,
        };
        let reply = StreamAutoClaimReply::from_redis_value(v)
            .map_err(|_| RedisFailure::Command("unexpected XAUTOCLAIM reply".into()))?;
        Ok(reply.claimed)
    }

    async fn ack(&self, stream: &str, ids: &[String]) -> Result<(), RedisFailure> {
        // XACK and XDEL together, atomically (lua/ack.lua).
        let mut args = Vec::with_capacity(ids.len() + 1);
        args.push(ScriptArg::Str(GROUP));
        args.extend(ids.iter().map(|id| ScriptArg::Str(id)));
        self.scripts.ack.run(&self.redis, &[stream], &args).await?;
        Ok(())
    }

    /// Syncs one batch of entries; returns how many were new in Postgres. `fresh`: the batch
    /// is a `>` read made while this consumer held nothing else, so after its acknowledgement
    /// the consumer holds nothing in this shard.
    async fn sync(
        &mut self,
        shard: usize,
        entries: Vec<StreamId>,
        fresh: bool,
    ) -> Result<u64, SyncError> {
        let stream = self.streams[shard].clone();
        let mut events = Vec::with_capacity(entries.len());
        let mut ids = Vec::with_capacity(entries.len());
        for e in &entries {
            match parse_event(e) {
                Some(ev) => events.push(ev),
                // Only settle.lua writes here; an unreadable entry is corruption. It is logged
                // and acknowledged, or it would block its shard forever.
                None => {
                    tracing::error!(stream = %stream, id = %e.id, "unreadable usage entry dropped")
                }
            }
            ids.push(e.id.clone());
        }
        self.own_pending[shard] = true;
        let new = match insert_batch(&self.db, &events).await {
            Ok(new) => new,
            // Postgres refused the batch for what is in it, not for being down: retrying it
            // whole would block the shard forever. Find the culprits one event at a time.
            Err(StoreError::Query(e)) if is_data_error(&e) => {
                self.insert_one_by_one(&stream, &entries, events).await?
            }
            Err(e) => return Err(e.into()),
        };
        self.ack(&stream, &ids).await?;
        // A re-read or claimed batch may not have been all this consumer holds (a claim adds
        // to what it already had): look again next pass, until a re-read comes back empty.
        if fresh {
            self.own_pending[shard] = false;
        }
        self.metrics.events_synced.increment(new);
        Ok(new)
    }

    /// Inserts events singly; one Postgres refuses for its data moves, with its original
    /// fields and the reason, to the shard's dead-letter stream (`<stream>:dead`, same slot)
    /// for an operator to inspect, instead of being retried forever.
    async fn insert_one_by_one(
        &self,
        stream: &str,
        entries: &[StreamId],
        events: Vec<UsageEvent>,
    ) -> Result<u64, SyncError> {
        let mut new = 0;
        for ev in events {
            match insert_batch(&self.db, std::slice::from_ref(&ev)).await {
                Ok(n) => new += n,
                Err(StoreError::Query(e)) if is_data_error(&e) => {
                    let mut cmd = redis::cmd("XADD");
                    cmd.arg(format!("{stream}:dead")).arg("*");
                    if let Some(entry) = entries
                        .iter()
                        .find(|en| en.get::<String>("e").as_deref() == Some(ev.event_id.as_str()))
                    {
                        for field in entry.map.keys() {
                            let value = entry.get::<String>(field).unwrap_or_default();
                            cmd.arg(field).arg(value);
                        }
                    }
                    cmd.arg("error").arg(e.to_string());
                    self.redis.query(&cmd).await?;
                    self.metrics.events_dead_lettered.increment(1);
                    tracing::error!(stream = %stream, event = %ev.event_id, error = %e,
                        "usage event refused by postgres; moved to the dead-letter stream");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(new)
    }

    /// One pass over every shard. Returns whether any entry was handled.
    async fn pass(&mut self, claim: bool) -> Result<bool, SyncError> {
        let mut busy = false;
        for shard in 0..self.streams.len() {
            let stream = self.streams[shard].clone();
            // Claims come first, not only when a shard is idle: under steady traffic a shard is
            // never idle, and a dead replica's entries would wait forever.
            if claim {
                let claimed = self.claim(&stream).await?;
                if !claimed.is_empty() {
                    busy = true;
                    self.sync(shard, claimed, false).await?;
                }
            }
            if self.own_pending[shard] {
                let entries = self.read(&stream, "0").await?;
                if entries.is_empty() {
                    self.own_pending[shard] = false;
                } else {
                    busy = true;
                    self.sync(shard, entries, false).await?;
                    continue;
                }
            }
            let entries = self.read(&stream, ">").await?;
            if !entries.is_empty() {
                busy = true;
                self.sync(shard, entries, true).await?;
            }
        }
        Ok(busy)
    }

    /// Publishes how far Postgres is behind: unsynced entries, and the age of the oldest.
    async fn gauges(&self) -> Result<(), RedisFailure> {
        let mut pending = 0i64;
        let mut oldest: Option<i64> = None;
        for stream in &self.streams {
            let mut len = redis::cmd("XLEN");
            len.arg(stream);
            pending += i64::from_redis_value(self.redis.query(&len).await?).unwrap_or(0);
            let mut first = redis::cmd("XRANGE");
            first.arg(stream).arg("-").arg("+").arg("COUNT").arg(1);
            let v = self.redis.query(&first).await?;
            if let Ok(r) = redis::streams::StreamRangeReply::from_redis_value(v) {
                if let Some(ms) = r.ids.first().and_then(|e| entry_ms(&e.id)) {
                    oldest = Some(oldest.map_or(ms, |o: i64| o.min(ms)));
                }
            }
        }
        let lag = oldest
            .map(|ms| (Utc::now().timestamp_millis() - ms).max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        self.metrics.events_pending.set(pending as f64);
        self.metrics.sync_lag.set(lag);
        Ok(())
    }

    /// Runs until `shutdown` turns true, then drains what it can within `drain` and returns.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>, drain: Duration) {
        for s in self.streams.clone() {
            if let Err(e) = self.ensure_group(&s).await {
                tracing::warn!(error = %e, "could not create usage consumer group yet");
            }
        }
        let mut backoff = Duration::from_millis(200);
        // `Instant - Duration` panics on a machine booted more recently than the duration.
        let start = Instant::now();
        let mut last_claim = start.checked_sub(self.claim_idle).unwrap_or(start);
        let mut last_gauge = start.checked_sub(GAUGE_EVERY).unwrap_or(start);
        loop {
            if *shutdown.borrow() {
                break;
            }
            let claim = last_claim.elapsed() >= self.claim_idle / 3;
            if claim {
                last_claim = Instant::now();
            }
            let wait = match self.pass(claim).await {
                Ok(true) => {
                    backoff = Duration::from_millis(200);
                    Duration::ZERO
                }
                Ok(false) => {
                    backoff = Duration::from_millis(200);
                    IDLE_POLL
                }
                Err(e) => {
                    if let SyncError::Redis(r) = &e {
                        self.metrics.redis_error(r.kind());
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "usage sync stalled; events stay in redis");
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    w
                }
            };
            if last_gauge.elapsed() >= GAUGE_EVERY {
                last_gauge = Instant::now();
                if let Err(e) = self.gauges().await {
                    tracing::debug!(error = %e, "sync gauges not updated");
                }
            }
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
        // Flush: keep syncing what is already in the streams, for at most `drain`.
        let deadline = Instant::now() + drain;
        while Instant::now() < deadline {
            match tokio::time::timeout(deadline - Instant::now(), self.pass(false)).await {
                Ok(Ok(true)) => continue,
                Ok(Ok(false)) | Err(_) => break,
                // A transient failure (a deadlock with another replica's batch, a Redis
                // hiccup) is worth another try while the bound allows; what is left stays in
                // Redis for the next process.
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "usage flush retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let _ = self.gauges().await;
        tracing::info!("usage syncer stopped");
    }
}
