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
use metrics::Gauge;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::{FromRedisValue, Value};
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio::sync::watch;
use uuid::Uuid;

use crate::hot::layout::state_of_event;
use crate::hot::redis::{Redis, RedisFailure};
use crate::hot::scripts::ack::GiveBack;
use crate::hot::scripts::{ack, scripts};
use crate::metrics::Metrics;
use crate::store::usage::{insert_batch, settled_at, UsageEvent};
use crate::store::{PgReady, StoreError};

pub const GROUP: &str = "tollgate-sync";
/// Most entries one pass gathers, across all shards: what one insert statement writes. It
/// also bounds the syncer's memory (a parsed entry takes about 2 KB until its batch is done).
const BATCH: usize = 500;
/// Entries a consumer has held this long without acknowledging are presumed orphaned.
const CLAIM_IDLE: Duration = Duration::from_secs(15);
const IDLE_POLL: Duration = Duration::from_millis(100);
/// Pause after a pass that found events but filled no batch. Without it, steady traffic
/// would be synced as a stream of tiny transactions as fast as they can commit; with it, a
/// pass gathers what 50 ms of settlements left in every shard, and the sync lag stays far
/// under a second.
const BUSY_POLL: Duration = Duration::from_millis(50);
const GAUGE_EVERY: Duration = Duration::from_secs(1);
/// Longest one write to Postgres may take before the syncer gives up on its connection. A
/// batch takes milliseconds; what takes this long is a connection that will never answer —
/// half-open after a failover, or forgotten by a NAT while idle — and without a bound the
/// syncer would wait until the kernel gives up on it, a quarter of an hour by default.
const WRITE_BOUND: Duration = Duration::from_secs(30);
/// How long the syncer keeps its Postgres connection unused (the pool's idle timeout).
const KEEP_IDLE: Duration = Duration::from_secs(300);

pub struct Syncer {
    redis: Redis,
    db: PgPool,
    metrics: Metrics,
    /// The backlog gauges, published by a loop of their own ([`Syncer::run`]).
    backlog: Backlog,
    /// When set, nothing is written before it says Postgres is migrated (`startup`).
    pg_ready: Option<PgReady>,
    streams: Vec<String>,
    consumer: String,
    /// Shards where this consumer may hold delivered-but-unacknowledged entries.
    own_pending: Vec<bool>,
    /// Where the next pass starts: passes take turns, so that when one pass cannot take every
    /// shard's entries (see [`BATCH`]) no shard waits behind the others.
    next_shard: usize,
    claim_idle: Duration,
    write_bound: Duration,
    /// The connection it writes through, held between writes ([`Syncer::write`]).
    conn: Option<PoolConnection<Postgres>>,
    conn_used: Instant,
}

/// Entries read from one shard in a pass.
struct Gathered {
    shard: usize,
    entries: Vec<StreamId>,
    /// A `>` read made while this consumer held nothing else in the shard: once these are
    /// acknowledged it holds nothing there.
    fresh: bool,
}

/// What a pass found.
enum Pass {
    Idle,
    /// Events, but fewer than a batch: the streams are drained.
    Partial,
    /// The pass filled its batch: more is probably waiting.
    Full,
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

/// Reads one stream entry written by settle.lua: its one field `v`, or the named fields of
/// the builds before it (their events may still be in the stream after an upgrade).
pub(crate) fn parse_event(e: &StreamId) -> Option<UsageEvent> {
    match str_field(e, "v") {
        Some(v) => parse_packed(&v),
        None => parse_named(e),
    }
}

/// `v`: the values joined by `\x1f`, in settle.lua's order.
fn parse_packed(v: &str) -> Option<UsageEvent> {
    let f: Vec<&str> = v.split('\u{1f}').collect();
    // The sixteenth value (admitted in an earlier life of Redis) is read by [`earlier_life`].
    let fields = match f.len() {
        15 | 16 => &f[..15],
        _ => return None,
    };
    let [event_id, key_id, user_id, cost, input, output, total, rt, sc, provider, api_format, model, admitted, settled, expired] =
        fields
    else {
        return None;
    };
    let int = |s: &str| s.parse::<i64>().ok();
    let opt = |s: &str| int(s).filter(|n| *n >= 0);
    Some(UsageEvent {
        event_id: (*event_id).to_string(),
        key_id: Uuid::parse_str(key_id).ok(),
        user_id: (*user_id).to_string(),
        provider: (*provider).to_string(),
        api_format: (*api_format).to_string(),
        model: (*model).to_string(),
        input_tokens: int(input)?,
        output_tokens: int(output)?,
        total_tokens: int(total)?,
        cost_nanos: int(cost)?,
        response_time_ms: opt(rt),
        status_code: opt(sc).and_then(|n| i32::try_from(n).ok()),
        lease_expired: *expired == "1",
        admitted_at: ms_time(int(admitted)?)?,
        settled_at: ms_time(int(settled)?)?,
    })
}

/// Whether settle.lua flagged the event's lease as admitted before this Redis held the key's
/// state: its charge may repeat one Postgres already has (see [`Syncer::repeats`]).
fn earlier_life(e: &StreamId) -> bool {
    str_field(e, "v").is_some_and(|v| v.split('\u{1f}').nth(15) == Some("1"))
}

fn parse_named(e: &StreamId) -> Option<UsageEvent> {
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

/// `tollgate_usage_sync_lag_seconds` and `tollgate_usage_events_pending`. Registered by the
/// syncer, not with the other metrics, so that a process with the sync off does not export
/// them: its zeros would read as "Postgres is up to date" while nobody syncs; absent, they
/// leave the sync processes' values as the only ones, and an alert can tell that none runs.
///
/// Published by a loop of their own, beside the sync loop rather than between its passes:
/// while a write hangs (a silent connection, up to [`WRITE_BOUND`]) the backlog they report
/// is exactly what an operator needs to see growing.
#[derive(Clone)]
struct Backlog {
    redis: Redis,
    streams: Vec<String>,
    lag: Gauge,
    pending: Gauge,
}

impl Backlog {
    /// Publishes how far Postgres is behind: unsynced entries, and the age of the oldest.
    async fn publish(&self) -> Result<(), RedisFailure> {
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
        self.pending.set(pending as f64);
        self.lag.set(lag);
        Ok(())
    }

    /// Publishes every [`GAUGE_EVERY`] until `done` turns true, then once more.
    async fn run(self, mut done: watch::Receiver<bool>) {
        loop {
            if let Err(e) = self.publish().await {
                tracing::debug!(error = %e, "sync gauges not updated");
            }
            tokio::select! {
                _ = tokio::time::sleep(GAUGE_EVERY) => {}
                _ = done.wait_for(|d| *d) => break,
            }
        }
        let _ = self.publish().await;
    }
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
            redis: redis.clone(),
            db,
            metrics,
            backlog: Backlog {
                redis,
                streams: streams.clone(),
                lag: metrics::gauge!(crate::metrics::SYNC_LAG),
                pending: metrics::gauge!(crate::metrics::EVENTS_PENDING),
            },
            pg_ready: None,
            streams,
            consumer,
            own_pending: vec![true; n],
            next_shard: 0,
            claim_idle: CLAIM_IDLE,
            write_bound: WRITE_BOUND,
            conn: None,
            conn_used: Instant::now(),
        }
    }

    /// For tests: how long before another consumer's entries are taken over.
    pub fn with_claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// Writes nothing until `ready` says the database is migrated: a write against an older
    /// schema could fail for its data and dead-letter good events. The gauges run meanwhile.
    pub fn writing_once(mut self, ready: PgReady) -> Self {
        self.pg_ready = Some(ready);
        self
    }

    /// For tests: how long one Postgres write may take ([`WRITE_BOUND`]).
    pub fn with_write_bound(mut self, bound: Duration) -> Self {
        self.write_bound = bound;
        self
    }

    /// [`insert_batch`] on the syncer's connection, bounded by `write_bound`.
    ///
    /// The connection is kept between writes rather than returned to the pool: sqlx pings a
    /// returned connection with no bound, and on one that went silent (see [`WRITE_BOUND`])
    /// that ping would hold the pool's only place for good. A write that fails for the
    /// connection's sake or overruns the bound closes it (sqlx bounds the close), and the next
    /// one connects afresh; one kept idle longer than [`KEEP_IDLE`] is closed too, before a
    /// NAT forgets it. If an abandoned batch did commit, its redelivery inserts nothing.
    async fn write(&mut self, events: &[UsageEvent]) -> Result<u64, StoreError> {
        let bound = self.write_bound;
        let conn = self.connection().await?;
        let result = match tokio::time::timeout(bound, insert_batch(&mut **conn, events)).await {
            Ok(written) => written,
            Err(_) => Err(StoreError::no_answer(bound)),
        };
        if matches!(result, Err(StoreError::Unavailable(_))) {
            self.close_conn();
        }
        result
    }

    /// The connection writes go through, opened again when it was closed or kept idle past
    /// [`KEEP_IDLE`].
    async fn connection(&mut self) -> Result<&mut PoolConnection<Postgres>, StoreError> {
        if self.conn_used.elapsed() > KEEP_IDLE {
            self.close_conn();
        }
        self.conn_used = Instant::now();
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.db.acquire().await?,
        };
        Ok(self.conn.insert(conn))
    }

    fn close_conn(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            conn.close_on_drop();
        }
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

    async fn read(
        &self,
        stream: &str,
        from: &str,
        count: usize,
    ) -> Result<Vec<StreamId>, RedisFailure> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
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

    async fn claim(&self, stream: &str, count: usize) -> Result<Vec<StreamId>, RedisFailure> {
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(stream)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(self.claim_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(count);
        let v = match self.redis.query(&cmd).await {
            Err(RedisFailure::Command(code)) if code == "NOGROUP" => return Ok(Vec::new()),
            other => other?,
        };
        let reply = StreamAutoClaimReply::from_redis_value(v)
            .map_err(|_| RedisFailure::Command("unexpected XAUTOCLAIM reply".into()))?;
        Ok(reply.claimed)
    }

    async fn ack(
        &self,
        stream: &str,
        ids: &[&str],
        give_backs: &[GiveBack<'_>],
    ) -> Result<(), RedisFailure> {
        // XACK and XDEL together, atomically, and any charge given back with them (ack.lua).
        let call = ack::Call::new(stream, GROUP, ids, give_backs);
        scripts()
            .ack
            .run(&self.redis, call.keys(), &call.args())
            .await?;
        Ok(())
    }

    /// Syncs what one pass gathered from every shard: one insert for all of it, then each
    /// shard's acknowledgement. Returns how many events were new in Postgres.
    ///
    /// One statement per pass rather than per shard: under steady traffic every shard holds a
    /// few events at each pass, and sixteen small transactions cost Postgres several times the
    /// CPU of one larger one (docs/PERFORMANCE.md, "What was tried").
    async fn sync(&mut self, gathered: Vec<Gathered>) -> Result<u64, SyncError> {
        let mut events = Vec::with_capacity(gathered.iter().map(|g| g.entries.len()).sum());
        // Events of leases admitted in an earlier life of Redis: (shard, entry id, event).
        let mut earlier = Vec::new();
        for (gi, g) in gathered.iter().enumerate() {
            self.own_pending[g.shard] = true;
            for e in &g.entries {
                match parse_event(e) {
                    Some(ev) => {
                        if earlier_life(e) {
                            earlier.push((gi, e.id.clone(), ev.clone()));
                        }
                        events.push(ev)
                    }
                    // Only settle.lua writes here; an unreadable entry is corruption. It is
                    // logged and acknowledged, or it would block its shard forever.
                    None => tracing::error!(stream = %self.streams[g.shard], id = %e.id,
                        "unreadable usage entry dropped"),
                }
            }
        }
        let new = match self.write(&events).await {
            Ok(new) => new,
            // Postgres refused the batch for what is in it, not for being down: retrying it
            // whole would block the shards forever. Find the culprits one event at a time.
            Err(StoreError::Query(e)) if is_data_error(&e) => {
                let mut new = 0;
                for g in &gathered {
                    new += self
                        .insert_one_by_one(&self.streams[g.shard].clone(), &g.entries)
                        .await?;
                }
                new
            }
            Err(e) => return Err(e.into()),
        };
        self.metrics.events_synced.increment(new);
        let repeats = self.repeats(&earlier).await?;
        for (gi, g) in gathered.iter().enumerate() {
            let ids: Vec<&str> = g.entries.iter().map(|e| e.id.as_str()).collect();
            let stream = &self.streams[g.shard];
            let states: Vec<(&str, String, i64)> = repeats
                .iter()
                .filter(|(i, ..)| *i == gi)
                .filter_map(|(_, id, ev)| {
                    Some((
                        id.as_str(),
                        state_of_event(stream, &ev.event_id)?,
                        ev.cost_nanos,
                    ))
                })
                .collect();
            let give_backs: Vec<GiveBack<'_>> = states
                .iter()
                .map(|(id, state, nanos)| GiveBack {
                    entry_id: id,
                    state,
                    nanos: *nanos,
                })
                .collect();
            self.ack(stream, &ids, &give_backs).await?;
            // A re-read or claimed batch may not have been all this consumer holds (a claim
            // adds to what it already had): look again next pass, until a re-read comes back
            // empty.
            if g.fresh {
                self.own_pending[g.shard] = false;
            }
        }
        Ok(new)
    }

    /// Of the events flagged as admitted in an earlier life of Redis, those Postgres recorded
    /// from another settlement (at another time) than this one: the same lease settled once
    /// before Redis lost its data and again after. Postgres kept the first; Redis's `used`,
    /// seeded from Postgres, already held its charge and then took this one's too, which
    /// ack.lua gives back. An event Postgres recorded from this very settlement (a batch
    /// delivered again, or the insert just made) is not one.
    async fn repeats(
        &mut self,
        earlier: &[(usize, String, UsageEvent)],
    ) -> Result<Vec<(usize, String, UsageEvent)>, SyncError> {
        if earlier.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = earlier.iter().map(|(_, _, e)| e.event_id.clone()).collect();
        // On the syncer's own connection and within its bound, as its writes.
        let bound = self.write_bound;
        let conn = self.connection().await?;
        let recorded = match tokio::time::timeout(bound, settled_at(conn, ids)).await {
            Ok(read) => read,
            Err(_) => Err(StoreError::no_answer(bound)),
        };
        if matches!(recorded, Err(StoreError::Unavailable(_))) {
            self.close_conn();
        }
        let recorded = recorded?;
        let at: std::collections::HashMap<String, i64> = recorded
            .into_iter()
            .map(|(id, t)| (id, t.timestamp_millis()))
            .collect();
        Ok(earlier
            .iter()
            .filter(|(_, _, e)| {
                at.get(&e.event_id)
                    .is_some_and(|t| *t != e.settled_at.timestamp_millis())
            })
            .cloned()
            .collect())
    }

    /// Inserts a shard's events singly; one Postgres refuses for its data moves, with its
    /// original fields and the reason, to the shard's dead-letter stream (`<stream>:dead`,
    /// same slot) for an operator to inspect, instead of being retried forever.
    async fn insert_one_by_one(
        &mut self,
        stream: &str,
        entries: &[StreamId],
    ) -> Result<u64, SyncError> {
        let mut new = 0;
        for entry in entries {
            let Some(ev) = parse_event(entry) else {
                continue;
            };
            match self.write(std::slice::from_ref(&ev)).await {
                Ok(n) => new += n,
                Err(StoreError::Query(e)) if is_data_error(&e) => {
                    let mut cmd = redis::cmd("XADD");
                    cmd.arg(format!("{stream}:dead")).arg("*");
                    for field in entry.map.keys() {
                        let value = entry.get::<String>(field).unwrap_or_default();
                        cmd.arg(field).arg(value);
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

    /// What one shard gives this pass, at most `room` entries, and whether it is a fresh read.
    async fn gather(
        &mut self,
        shard: usize,
        stream: &str,
        claim: bool,
        room: usize,
    ) -> Result<Option<(Vec<StreamId>, bool)>, RedisFailure> {
        // Claims come first, not only when a shard is idle: under steady traffic a shard is
        // never idle, and a dead replica's entries would wait forever. What this consumer held
        // already is re-read next pass (a re-read now would return the claimed entries a
        // second time).
        if claim {
            let claimed = self.claim(stream, room).await?;
            if !claimed.is_empty() {
                return Ok(Some((claimed, false)));
            }
        }
        if self.own_pending[shard] {
            let entries = self.read(stream, "0", room).await?;
            if !entries.is_empty() {
                return Ok(Some((entries, false)));
            }
            self.own_pending[shard] = false;
        }
        let entries = self.read(stream, ">", room).await?;
        Ok((!entries.is_empty()).then_some((entries, true)))
    }

    /// One pass: gathers up to [`BATCH`] entries from the shards, then syncs them together.
    async fn pass(&mut self, claim: bool) -> Result<Pass, SyncError> {
        let mut gathered = Vec::new();
        let mut room = BATCH;
        let n = self.streams.len();
        let first = self.next_shard % n.max(1);
        self.next_shard = first + 1;
        for shard in (first..n).chain(0..first) {
            if room == 0 {
                break;
            }
            let stream = self.streams[shard].clone();
            if let Some((entries, fresh)) = self.gather(shard, &stream, claim, room).await? {
                room = room.saturating_sub(entries.len());
                gathered.push(Gathered {
                    shard,
                    entries,
                    fresh,
                });
            }
        }
        if gathered.is_empty() {
            return Ok(Pass::Idle);
        }
        self.sync(gathered).await?;
        Ok(if room == 0 { Pass::Full } else { Pass::Partial })
    }

    /// Runs until `shutdown` turns true, then drains what it can within `drain` and returns.
    /// The backlog gauges are published all along, whatever the sync loop is waiting for.
    pub async fn run(self, shutdown: watch::Receiver<bool>, drain: Duration) {
        let (done_tx, done_rx) = watch::channel(false);
        let gauges = self.backlog.clone().run(done_rx);
        let work = async move {
            self.work(shutdown, drain).await;
            let _ = done_tx.send(true);
        };
        tokio::join!(work, gauges);
        tracing::info!("usage syncer stopped");
    }

    async fn work(mut self, mut shutdown: watch::Receiver<bool>, drain: Duration) {
        if let Some(ready) = self.pg_ready.clone() {
            tokio::select! {
                _ = ready.wait() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
        for s in self.streams.clone() {
            if let Err(e) = self.ensure_group(&s).await {
                tracing::warn!(error = %e, "could not create usage consumer group yet");
            }
        }
        let mut backoff = Duration::from_millis(200);
        // `Instant - Duration` panics on a machine booted more recently than the duration.
        let start = Instant::now();
        let mut last_claim = start.checked_sub(self.claim_idle).unwrap_or(start);
        loop {
            if *shutdown.borrow() {
                break;
            }
            let claim = last_claim.elapsed() >= self.claim_idle / 3;
            if claim {
                last_claim = Instant::now();
            }
            let wait = match self.pass(claim).await {
                Ok(pass) => {
                    backoff = Duration::from_millis(200);
                    match pass {
                        Pass::Full => Duration::ZERO,
                        Pass::Partial => BUSY_POLL,
                        Pass::Idle => IDLE_POLL,
                    }
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
                Ok(Ok(Pass::Full | Pass::Partial)) => continue,
                Ok(Ok(Pass::Idle)) | Err(_) => break,
                // A transient failure (a deadlock with another replica's batch, a Redis
                // hiccup) is worth another try while the bound allows; what is left stays in
                // Redis for the next process.
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "usage flush retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    fn entry(fields: &[(&str, &str)]) -> StreamId {
        StreamId {
            id: "1-0".into(),
            map: fields
                .iter()
                .map(|(k, v)| (k.to_string(), Value::BulkString(v.as_bytes().to_vec())))
                .collect(),
            ..Default::default()
        }
    }

    const KEY: &str = "6f1c2d3e-4a5b-4c6d-8e7f-001122334455";

    #[test]
    fn a_packed_event_and_the_same_event_in_named_fields_read_the_same() {
        let packed = format!(
            "sid.nonce\u{1f}{KEY}\u{1f}u-1\u{1f}1234\u{1f}10\u{1f}20\u{1f}30\u{1f}-1\u{1f}200\u{1f}\
             openai\u{1f}openai:chat\u{1f}gpt-4o\u{1f}1700000000000\u{1f}1700000001000\u{1f}1"
        );
        let named = [
            ("e", "sid.nonce"),
            ("k", KEY),
            ("u", "u-1"),
            ("c", "1234"),
            ("it", "10"),
            ("ot", "20"),
            ("tt", "30"),
            ("rt", "-1"),
            ("sc", "200"),
            ("p", "openai"),
            ("f", "openai:chat"),
            ("m", "gpt-4o"),
            ("at", "1700000000000"),
            ("ts", "1700000001000"),
            ("x", "1"),
        ];
        let a = parse_event(&entry(&[("v", &packed)])).expect("packed");
        let b = parse_event(&entry(&named)).expect("named");
        assert_eq!(a, b);
        assert_eq!(a.cost_nanos, 1234);
        assert_eq!(a.response_time_ms, None);
        assert_eq!(a.status_code, Some(200));
        assert!(a.lease_expired);
        assert_eq!(a.settled_at.timestamp_millis(), 1_700_000_001_000);
    }

    #[test]
    fn a_packed_event_with_a_missing_or_unreadable_value_is_not_an_event() {
        let good = format!(
            "e\u{1f}{KEY}\u{1f}u\u{1f}1\u{1f}1\u{1f}1\u{1f}2\u{1f}-1\u{1f}-1\u{1f}p\u{1f}f\u{1f}m\
             \u{1f}1700000000000\u{1f}1700000000001\u{1f}0"
        );
        assert!(parse_event(&entry(&[("v", &good)])).is_some());
        // Settled by this build: a sixteenth value says whether the lease is from an earlier
        // life of Redis; events from before it have fifteen and say no.
        let flagged = format!("{good}\u{1f}1");
        assert!(parse_event(&entry(&[("v", &flagged)])).is_some());
        assert!(earlier_life(&entry(&[("v", &flagged)])));
        assert!(!earlier_life(&entry(&[("v", &format!("{good}\u{1f}0"))])));
        assert!(!earlier_life(&entry(&[("v", &good)])));
        let short = good.rsplit_once('\u{1f}').expect("fields").0.to_string();
        let long = format!("{good}\u{1f}1\u{1f}extra");
        let bad_cost = good.replacen(
            "\u{1f}1\u{1f}1\u{1f}1\u{1f}2",
            "\u{1f}x\u{1f}1\u{1f}1\u{1f}2",
            1,
        );
        for bad in [short, long, bad_cost, String::new()] {
            assert!(parse_event(&entry(&[("v", &bad)])).is_none(), "{bad:?}");
        }
    }
}
