//! The Redis ceiling: tollgate's own scripts run straight on Redis, pipelined over many
//! connections, with nothing in between. What one Redis can do for this work bounds what
//! tollgate can do through HTTP; the report shows the HTTP phase as a share of it.
//!
//! Two measurements, on keys that tollgate created and hydrated (so the state hash is the one
//! tollgate wrote) and that never deny (so every call takes the whole allow path):
//! - `admit`: `admit.lua` alone, the admission decision;
//! - `flow`: `admit.lua` then `settle.lua` for the same lease, exactly the Redis work of one
//!   admit-and-settle flow of the HTTP phase (the settle appends the usage event to the shard
//!   stream, which tollgate's syncer then drains into Postgres as it would in production).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use redis::{FromRedisValue, Value};
use tollgate::gate::{AdmitArgs, LeaseTerm};
use tollgate::hot::known_keys::{KnownKey, KnownKeys};
use tollgate::hot::layout::{new_nonce, KeyRedisKeys};
use tollgate::hot::lease_id::{LeaseFacts, LeaseRef, MemberHold};
use tollgate::hot::scripts::{admit, scripts, settle};
use tollgate::money::Money;

use crate::load::histogram;

pub const ADMIT_LUA: &str = admit::SOURCE;
pub const SETTLE_LUA: &str = settle::SOURCE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    Admit,
    Flow,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub redis_url: String,
    pub keys: Vec<KeyRedisKeys>,
    pub connections: usize,
    pub pipeline: usize,
    pub duration: Duration,
    pub window_ms: u64,
    pub lease_ttl_ms: u64,
    /// How long after its admission a lease can be settled (its TTL and the late-settle
    /// grace): a sealed lease id's deadline, and its tombstone's lifetime.
    pub settle_window_ms: u64,
    pub max_cost_nanos: i64,
    /// What the harness remembers of its keys, as tollgate's process does (`hot::known_keys`):
    /// so that its calls tell admit.lua what tollgate's would. Shared by every clone.
    pub known: Arc<KnownKeys>,
    /// tollgate's state format 2 (`--state-format`): holds in the live set's members.
    pub holds_in_members: bool,
}

pub struct Outcome {
    pub elapsed: Duration,
    /// Flows (or admissions) that completed the allow path.
    pub completed: u64,
    /// Replies other than a grant/settlement, by kind: must stay empty.
    pub other: BTreeMap<String, u64>,
    pub errors: u64,
    pub error_sample: Option<String>,
    /// Round trip of one pipeline.
    pub batch: Histogram<u64>,
    /// Per key index: settled cost and count (flow only).
    pub cost: HashMap<usize, (i64, u64)>,
}

impl Outcome {
    fn empty() -> Outcome {
        Outcome {
            elapsed: Duration::ZERO,
            completed: 0,
            other: BTreeMap::new(),
            errors: 0,
            error_sample: None,
            batch: histogram(),
            cost: HashMap::new(),
        }
    }
}

pub async fn load_scripts(redis_url: &str) -> Result<(String, String), String> {
    let shas = script_load(redis_url, &[ADMIT_LUA, SETTLE_LUA]).await?;
    Ok((shas[0].clone(), shas[1].clone()))
}

/// `SCRIPT LOAD`s each source, returning the SHA-1s in order.
pub async fn script_load(redis_url: &str, sources: &[&str]) -> Result<Vec<String>, String> {
    let client = redis::Client::open(redis_url).map_err(|e| e.to_string())?;
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("redis: {e}"))?;
    let mut shas = Vec::new();
    for src in sources {
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(*src)
            .query_async(&mut c)
            .await
            .map_err(|e| format!("SCRIPT LOAD: {e}"))?;
        shas.push(sha);
    }
    Ok(shas)
}

/// One `admit.lua` call as tollgate's gate makes it for an admission with no token reserve
/// (its wire contract is tollgate's own, `hot::scripts::admit`); answers the entry of
/// `plan.known` the call was made with, which reading its reply needs.
pub fn push_admit(
    pipe: &mut redis::Pipeline,
    sha: &str,
    plan: &Plan,
    k: &KeyRedisKeys,
    nonce: &str,
    reserve_nanos: i64,
) -> Option<Arc<KnownKey>> {
    let (known, prior) = plan.known.lookup(&k.state);
    let ask = AdmitArgs {
        key_hash: "",
        provider: "openai",
        api_format: "openai:chat",
        model: "gpt-4o",
        reserve: Money::from_nanos(reserve_nanos),
        reserve_tokens: 0,
        lease: LeaseTerm::Default,
    };
    let call = admit::Call::new(
        k,
        &ask,
        i64::try_from(plan.window_ms).unwrap_or(i64::MAX),
        i64::try_from(plan.lease_ttl_ms).unwrap_or(i64::MAX),
        nonce,
        known,
    )
    .holds_in_members(plan.holds_in_members);
    // The SHA the harness loaded is tollgate's: the same source.
    debug_assert_eq!(scripts().admit.sha(), sha);
    pipe.add_command(scripts().admit.evalsha(&call.keys(), &call.args()));
    prior
}

/// What settle.lua needs of a granted lease: tollgate seals it into the lease id and opens it
/// (checking its MAC) before calling the script; here it comes from admit.lua's reply.
#[derive(Debug, Clone)]
pub struct Granted {
    pub nonce: String,
    pub key_id: String,
    pub user_id: String,
    pub admitted_at_ms: i64,
    pub tracked: bool,
    pub member_hold: Option<MemberHold>,
}

impl Granted {
    /// The grant in an admit.lua reply, read as tollgate reads it: `prior` is what
    /// [`push_admit`] answered for the call.
    pub fn from_reply(
        v: &Value,
        nonce: String,
        plan: &Plan,
        k: &KeyRedisKeys,
        prior: Option<&KnownKey>,
    ) -> Option<Granted> {
        match admit::parse(v.clone()).ok()? {
            admit::Reply::Ok(g) => {
                let (key_id, user_id) = plan.known.ids(&k.state, prior, &g)?;
                Some(Granted {
                    nonce,
                    key_id,
                    user_id,
                    admitted_at_ms: g.now_ms,
                    tracked: g.tracked,
                    member_hold: g.member_hold,
                })
            }
            _ => None,
        }
    }
}

/// One `settle.lua` call as tollgate makes it for `/v1/settle` of a sealed lease id, its usage
/// event appended to `stream` (the key's shard stream, or a scratch stream that the syncer
/// does not read).
pub fn push_settle(
    pipe: &mut redis::Pipeline,
    sha: &str,
    plan: &Plan,
    k: &KeyRedisKeys,
    g: &Granted,
    stream: &str,
    cost_nanos: i64,
) {
    let ms = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let lease = LeaseRef {
        keys: k.clone(),
        nonce: g.nonce.clone(),
        event_id: k.lease_id(&g.nonce),
        facts: Some(LeaseFacts {
            tracked: g.tracked,
            member_hold: g.member_hold,
            key_id: g.key_id.clone(),
            user_id: g.user_id.clone(),
            provider: "openai".into(),
            api_format: "openai:chat".into(),
            model: "gpt-4o".into(),
            admitted_at_ms: g.admitted_at_ms,
            expires_at_ms: g.admitted_at_ms + ms(plan.lease_ttl_ms),
        }),
    };
    let usage = settle::Usage {
        cost_nanos: Some(cost_nanos),
        input_tokens: 120,
        output_tokens: 380,
        total_tokens: 500,
        response_time_ms: 840,
        status_code: 200,
        ..Default::default()
    };
    let call = settle::Call::new(&lease, usage, ms(plan.settle_window_ms), ms(plan.window_ms))
        .with_stream(stream.to_string())
        .expecting_plain(plan.known.expects_plain(&k.state));
    debug_assert_eq!(scripts().settle.sha(), sha);
    pipe.add_command(scripts().settle.evalsha(&call.keys(), &call.args()));
}

pub fn kind(v: &Value) -> String {
    match Vec::<String>::from_redis_value(v.clone()) {
        Ok(parts) => match parts.as_slice() {
            [first, code, ..] if first == "deny" => format!("deny:{code}"),
            [first, ..] => first.clone(),
            [] => "empty".into(),
        },
        Err(_) => format!("{v:?}").chars().take(80).collect(),
    }
}

pub fn first_is(v: &Value, what: &str) -> bool {
    match v {
        Value::Array(items) => {
            matches!(items.first(), Some(Value::BulkString(b)) if b == what.as_bytes())
        }
        _ => false,
    }
}

/// `n` (at least one) connections with TCP_NODELAY as tollgate sets it: the ceiling's
/// connections must not be slower than tollgate's for a reason that has nothing to do with Redis.
pub async fn connections(
    redis_url: &str,
    n: usize,
) -> Result<Vec<redis::aio::MultiplexedConnection>, String> {
    let info = redis::IntoConnectionInfo::into_connection_info(redis_url)
        .map_err(|e| e.to_string())?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    let client = redis::Client::open(info).map_err(|e| e.to_string())?;
    let mut conns = Vec::new();
    for _ in 0..n.max(1) {
        conns.push(
            client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| format!("redis: {e}"))?,
        );
    }
    Ok(conns)
}

pub async fn run(plan: &Plan, work: Work) -> Result<Outcome, String> {
    let (admit_sha, settle_sha) = load_scripts(&plan.redis_url).await?;
    let conns = connections(&plan.redis_url, plan.connections).await?;
    let started = Instant::now();
    let deadline = started + plan.duration;
    let mut tasks = Vec::new();
    for (ci, mut conn) in conns.into_iter().enumerate() {
        let plan = plan.clone();
        let (admit_sha, settle_sha) = (admit_sha.clone(), settle_sha.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::empty();
            let mut rng = SmallRng::from_entropy();
            let mut next = ci * 7919;
            while Instant::now() < deadline {
                let mut pipe = redis::pipe();
                let mut batch = Vec::with_capacity(plan.pipeline);
                for _ in 0..plan.pipeline {
                    next = (next + 1) % plan.keys.len();
                    let k = &plan.keys[next];
                    let nonce = new_nonce();
                    let prior = push_admit(&mut pipe, &admit_sha, &plan, k, &nonce, 0);
                    batch.push((next, nonce, prior));
                }
                let t0 = Instant::now();
                let replies: Vec<Value> = match pipe.query_async(&mut conn).await {
                    Ok(v) => v,
                    Err(e) => {
                        out.errors += 1;
                        out.error_sample.get_or_insert_with(|| e.to_string());
                        continue;
                    }
                };
                let mut granted = Vec::with_capacity(batch.len());
                for (v, (idx, nonce, prior)) in replies.iter().zip(batch) {
                    let k = &plan.keys[idx];
                    match Granted::from_reply(v, nonce, &plan, k, prior.as_deref()) {
                        Some(g) => granted.push((idx, g)),
                        None => *out.other.entry(kind(v)).or_default() += 1,
                    }
                }
                if work == Work::Admit {
                    out.batch
                        .saturating_record(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(0));
                    out.completed += granted.len() as u64;
                    continue;
                }
                let mut pipe = redis::pipe();
                let mut costs = Vec::with_capacity(granted.len());
                for (idx, g) in &granted {
                    let k = &plan.keys[*idx];
                    let cost = rng.gen_range(0..=plan.max_cost_nanos);
                    costs.push((*idx, cost));
                    push_settle(&mut pipe, &settle_sha, &plan, k, g, &k.stream(), cost);
                }
                let replies: Vec<Value> = match pipe.query_async(&mut conn).await {
                    Ok(v) => v,
                    Err(e) => {
                        out.errors += 1;
                        out.error_sample.get_or_insert_with(|| e.to_string());
                        continue;
                    }
                };
                out.batch
                    .saturating_record(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(0));
                for (v, (idx, cost)) in replies.iter().zip(costs) {
                    if first_is(v, "settled") {
                        out.completed += 1;
                        let e = out.cost.entry(idx).or_default();
                        e.0 += cost;
                        e.1 += 1;
                    } else {
                        *out.other.entry(format!("settle:{}", kind(v))).or_default() += 1;
                    }
                }
            }
            out
        }));
    }
    let mut all = Outcome::empty();
    for t in tasks {
        let o = t.await.map_err(|e| e.to_string())?;
        all.completed += o.completed;
        for (k, v) in o.other {
            *all.other.entry(k).or_default() += v;
        }
        all.errors += o.errors;
        if all.error_sample.is_none() {
            all.error_sample = o.error_sample;
        }
        let _ = all.batch.add(&o.batch);
        for (k, (c, n)) in o.cost {
            let e = all.cost.entry(k).or_default();
            e.0 += c;
            e.1 += n;
        }
    }
    all.elapsed = started.elapsed();
    Ok(all)
}

/// Removes what the admit-only measurement left: the ceiling keys' live-lease and rate logs
/// (nobody else uses those keys).
pub async fn clean_up(redis_url: &str, keys: &[KeyRedisKeys]) -> Result<(), String> {
    let client = redis::Client::open(redis_url).map_err(|e| e.to_string())?;
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("redis: {e}"))?;
    let mut names: Vec<&str> = Vec::new();
    for k in keys {
        names.push(&k.live);
        names.push(&k.rate);
    }
    for chunk in names.chunks(1000) {
        let _: i64 = redis::cmd("UNLINK")
            .arg(chunk)
            .query_async(&mut c)
            .await
            .map_err(|e| format!("UNLINK: {e}"))?;
    }
    Ok(())
}
