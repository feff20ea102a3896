//! Redis time per script call (issue #15): each tollgate script, and a minimal exact
//! sliding-window script as the reference, run on Redis in a phase of its own and timed by
//! Redis itself (`INFO commandstats`), so that their ratios hold whatever else the host does.
//!
//! Phases, in this order, each `--ceiling-duration` long unless said otherwise:
//! 1. `admit.lua` on plain keys (a rate limit, no concurrency limit, no balance), keeping the
//!    leases; 2. `settle.lua` of exactly those leases, timed alone (as long as that takes);
//! 3. `exact_window.lua`, the reference, on one fresh log per plain key, making as many calls
//!    as phase 1 did, so that its logs end as long as the rate logs phase 1 worked on;
//! 4. and 5. as 1 and 2 on keys with a concurrency limit and a balance, admitted with a
//!    reserve (a hold), and with `--state-format 2` again on keys of their own admitted in
//!    state format 2 (the hold in the live set's member);
//! 6. and 7. flows (`admit.lua` then `settle.lua` of the same lease) on each kind of key;
//! 8. any candidate scripts (`--script-cost-candidates`: scratch designs, not tollgate) on the
//!    plain keys, each given the key's state and a fresh key of its own, as many calls as 3;
//! 9. the reference again, on fresh logs: the two reference figures bracket the round, and
//!    their mean is what the round's ratios divide by.
//!
//! `--script-cost-rounds N` repeats 1–2, 4–8 and 9 N times, each round on keys of its own
//! (so that every round starts as the first did: rate rings as long as its own admissions
//! made them, nothing yet leaving the window, as for the reference's fresh logs): each round's
//! phases are bracketed by the reference before and after them, and the report gives each
//! ratio's median over the rounds with every round's figure. One round's ratio moves with what
//! the host does during its minutes (the reference itself moved by up to a fifth within one
//! run); interleaved rounds give that movement to every phase alike.
//!
//! Settlements append their usage events to a scratch stream beside the shard's (same hash
//! tag, same `XADD`), which tollgate's syncer does not read: the syncer's `ack.lua` would
//! otherwise run during the phase and be counted as one of its `EVALSHA`s.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use redis::aio::MultiplexedConnection;
use redis::Value;
use tollgate::hot::layout::{new_nonce, KeyRedisKeys};

use crate::ceiling::{self, Plan};
use crate::observe::{self, RedisSnapshot};

pub const REFERENCE_LUA: &str = include_str!("../lua/exact_window.lua");

/// A set of keys of one kind and the reserve their admissions ask for.
#[derive(Debug, Clone)]
pub struct Target {
    pub plan: Plan,
    pub reserve_nanos: i64,
}

/// Everything the phases need.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Keys with a rate limit only, one set per round.
    pub plain: Vec<Target>,
    /// Keys with a rate limit, a concurrency limit and a balance; admitted with a reserve. One
    /// set per round.
    pub held: Vec<Target>,
    /// The same kind of keys admitted in state format 2 (their holds in the live set's
    /// members), one set per round; empty unless `--state-format 2`, when each round measures
    /// both formats.
    pub held_in_members: Vec<Target>,
    /// The reference's limit: tollgate's keys' rate limit, never reached.
    pub limit: u64,
    /// `CONFIG RESETSTAT` before each phase (clears every client's counters on that Redis).
    pub reset_stats: bool,
    /// Scratch scripts measured after tollgate's, on the plain keys: (file name, source).
    pub candidates: Vec<(String, String)>,
}

impl Setup {
    /// Rounds of the phases, each on its own keys and bracketed by the reference.
    fn rounds(&self) -> usize {
        self.plain.len().min(self.held.len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// The reference on its logs of that round (0 or 1).
    Reference(usize),
    Admit,
    Settle,
    Flow,
    /// The candidate script of that index in `Setup::candidates`.
    Candidate(usize),
}

#[derive(Debug, Clone)]
struct Shas {
    admit: String,
    settle: String,
    reference: String,
    candidates: Vec<String>,
}

/// What the harness saw of one phase.
#[derive(Debug, Default)]
struct Run {
    elapsed: Duration,
    /// EVALSHA calls sent.
    sent: u64,
    /// Units that took the allow path: reference admissions, admissions, settlements, flows.
    done: u64,
    /// Replies other than an allow, by kind: must stay empty.
    other: BTreeMap<String, u64>,
    errors: u64,
    error_sample: Option<String>,
    /// Leases an admit phase took, for the settle phase after it: (key index, nonce).
    leases: Vec<(usize, ceiling::Granted)>,
}

impl Run {
    fn absorb(&mut self, o: Run) {
        self.sent += o.sent;
        self.done += o.done;
        for (k, v) in o.other {
            *self.other.entry(k).or_default() += v;
        }
        self.errors += o.errors;
        if self.error_sample.is_none() {
            self.error_sample = o.error_sample;
        }
        self.leases.extend(o.leases);
    }

    fn failed(&mut self, e: &redis::RedisError) {
        self.errors += 1;
        self.error_sample.get_or_insert_with(|| e.to_string());
    }
}

/// One measured phase: what was sent, and what Redis counted for it.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Stable identifier (`admit_plain`, …), used by the report's ratios.
    pub id: String,
    /// The round (0-based); a reference phase's is its index: round r is bracketed by the
    /// references r and r + 1.
    pub round: usize,
    pub name: String,
    pub script: String,
    /// What a unit is: a call, or a flow (two calls).
    pub unit: &'static str,
    pub seconds: f64,
    pub sent: u64,
    pub units: u64,
    pub other: BTreeMap<String, u64>,
    pub errors: u64,
    pub error_sample: Option<String>,
    /// `cmdstat_evalsha` calls and usec during the phase.
    pub evalsha_calls: u64,
    pub evalsha_usec: u64,
    pub redis_cpu_seconds: f64,
    /// The commands the scripts ran (every other command of commandstats but the harness's own
    /// `INFO` and `CONFIG`): name, calls and usec during the phase. Their usec is part of
    /// `evalsha_usec`; the rest of it is the scripts' own Lua and each call's crossing.
    pub inner: Vec<(String, u64, u64)>,
}

/// Where a settlement's usage event goes: beside the shard's stream, out of the syncer's reach.
fn scratch_stream(k: &KeyRedisKeys) -> String {
    format!("{}:scriptcost", k.stream())
}

/// The reference's log for an API key in a round: one per API key, as each key has its own
/// rate log (named after it, so with the same hash tag: the reference runs on a cluster too).
/// Until session 8 this was named after the shard's stream, so the 1,000 keys of a run shared
/// 16 logs, each about 60 times as long as a key's own rate log.
fn reference_log(k: &KeyRedisKeys, round: usize) -> String {
    format!("{}:reference{round}", k.rate)
}

/// A candidate script's own key for an API key: same hash tag as the key's state.
fn candidate_key(k: &KeyRedisKeys, candidate: usize) -> String {
    format!("{}:candidate{candidate}", k.rate)
}

/// Runs every phase in order; see the module comment.
pub async fn measure(
    redis: &mut MultiplexedConnection,
    setup: &Setup,
) -> Result<Vec<Measured>, String> {
    let mut sources = vec![ceiling::ADMIT_LUA, ceiling::SETTLE_LUA, REFERENCE_LUA];
    sources.extend(setup.candidates.iter().map(|(_, src)| src.as_str()));
    let first = setup.plain.first().ok_or("no keys to measure on")?;
    let mut shas = ceiling::script_load(&first.plan.redis_url, &sources)
        .await?
        .into_iter();
    let mut sha = || shas.next().ok_or("SCRIPT LOAD answered too few SHAs");
    let shas = Shas {
        admit: sha()?,
        settle: sha()?,
        reference: sha()?,
        candidates: setup
            .candidates
            .iter()
            .map(|_| sha())
            .collect::<Result<_, _>>()?,
    };
    let mut out = Vec::new();
    let mut budget = None;
    let rounds = setup.rounds();
    for round in 0..rounds {
        let (plain, held) = (&setup.plain[round], &setup.held[round]);
        let mut kinds = vec![
            (plain, "plain", "plain key"),
            (held, "held", "concurrency + hold"),
        ];
        if let Some(members) = setup.held_in_members.get(round) {
            kinds.push((
                members,
                "held_in_members",
                "concurrency + hold, state format 2",
            ));
        }
        for &(target, kind, name) in &kinds {
            let admit = Phase::new(
                &format!("admit_{kind}"),
                &format!("admit.lua, {name}"),
                "admit.lua",
                "call",
                Work::Admit,
            )
            .in_round(round);
            let (m, run) = phase(redis, setup, &shas, admit, target, Vec::new()).await?;
            out.push(m);
            let settle = Phase::new(
                &format!("settle_{kind}"),
                &format!("settle.lua, {name}"),
                "settle.lua",
                "call",
                Work::Settle,
            )
            .in_round(round);
            out.push(
                phase(redis, setup, &shas, settle, target, run.leases)
                    .await?
                    .0,
            );
            if budget.is_none() {
                // The reference makes as many calls on as many keys as admit.lua did, so that
                // its logs hold as many entries as the rate logs admit.lua worked on.
                budget = Some(run.sent);
                let first = Phase::reference(0, rounds, budget);
                out.push(
                    phase(redis, setup, &shas, first, plain, Vec::new())
                        .await?
                        .0,
                );
            }
        }
        for &(target, kind, name) in &kinds {
            let flow = Phase::new(
                &format!("flow_{kind}"),
                &format!("flow, {name}"),
                "admit.lua + settle.lua",
                "flow",
                Work::Flow,
            )
            .in_round(round);
            out.push(
                phase(redis, setup, &shas, flow, target, Vec::new())
                    .await?
                    .0,
            );
        }
        for (i, (file, _)) in setup.candidates.iter().enumerate() {
            let mut c = Phase::new(
                &format!("candidate:{file}"),
                &format!("CANDIDATE {file}"),
                &format!("candidates/{file}"),
                "call",
                Work::Candidate(i),
            )
            .in_round(round);
            c.budget = budget;
            out.push(phase(redis, setup, &shas, c, plain, Vec::new()).await?.0);
        }
        let next = Phase::reference(round + 1, rounds, budget);
        out.push(phase(redis, setup, &shas, next, plain, Vec::new()).await?.0);
    }
    clean_up(redis, setup).await?;
    Ok(out)
}

/// What a phase is called and what it sends.
#[derive(Debug, Clone)]
struct Phase {
    id: String,
    name: String,
    script: String,
    unit: &'static str,
    work: Work,
    /// Calls to make, whatever the time; `None`: as many as `--ceiling-duration` allows.
    budget: Option<u64>,
    round: usize,
}

impl Phase {
    fn new(id: &str, name: &str, script: &str, unit: &'static str, work: Work) -> Phase {
        Phase {
            id: id.into(),
            name: name.into(),
            script: script.into(),
            unit,
            work,
            budget: None,
            round: 0,
        }
    }

    fn in_round(mut self, round: usize) -> Phase {
        self.round = round;
        self
    }

    /// The reference's phase `index` (0 ..= rounds: before the first round, then after each),
    /// each on fresh logs.
    fn reference(index: usize, rounds: usize, budget: Option<u64>) -> Phase {
        let (id, when) = match index {
            0 => ("reference_first".to_string(), "first".to_string()),
            i if i >= rounds.max(1) => ("reference_last".to_string(), "last".to_string()),
            i => (format!("reference_{i}"), format!("after round {i}")),
        };
        let mut p = Phase::new(
            &id,
            &format!("exact_window.lua (reference, {when})"),
            "exact_window.lua",
            "call",
            Work::Reference(index),
        )
        .in_round(index);
        p.budget = budget;
        p
    }
}

/// One phase between two commandstats snapshots (after `CONFIG RESETSTAT` if asked).
async fn phase(
    redis: &mut MultiplexedConnection,
    setup: &Setup,
    shas: &Shas,
    p: Phase,
    target: &Target,
    leases: Vec<(usize, ceiling::Granted)>,
) -> Result<(Measured, Run), String> {
    let round = match p.work {
        Work::Reference(_) => String::new(),
        _ => format!(" (round {})", p.round + 1),
    };
    eprintln!("loadtest: script cost: {}{round}", p.name);
    if setup.reset_stats {
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async::<()>(&mut *redis)
            .await
            .map_err(|e| format!("CONFIG RESETSTAT: {e}"))?;
    }
    let before = observe::snapshot(redis).await?;
    let run = drive(setup, shas, &p, target, leases).await?;
    let after = observe::snapshot(redis).await?;
    Ok((measured(p, &run, &before, &after), run))
}

fn measured(p: Phase, run: &Run, before: &RedisSnapshot, after: &RedisSnapshot) -> Measured {
    let d = |m: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>| {
        m.get("evalsha")
            .unwrap_or(&0)
            .saturating_sub(*b.get("evalsha").unwrap_or(&0))
    };
    let inner = after
        .calls
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "evalsha" | "eval" | "info" | "config"))
        .map(|(name, calls)| {
            let was = |m: &BTreeMap<String, u64>| *m.get(name).unwrap_or(&0);
            (
                name.clone(),
                calls.saturating_sub(was(&before.calls)),
                was(&after.usec).saturating_sub(was(&before.usec)),
            )
        })
        .filter(|(_, calls, _)| *calls > 0)
        .collect();
    Measured {
        inner,
        round: p.round,
        id: p.id,
        name: p.name,
        script: p.script,
        unit: p.unit,
        seconds: run.elapsed.as_secs_f64(),
        sent: run.sent,
        units: run.done,
        other: run.other.clone(),
        errors: run.errors,
        error_sample: run.error_sample.clone(),
        evalsha_calls: d(&after.calls, &before.calls),
        evalsha_usec: d(&after.usec, &before.usec),
        redis_cpu_seconds: after.cpu_seconds - before.cpu_seconds,
    }
}

/// Drives one phase over the ceiling's connections and pipeline depth.
async fn drive(
    setup: &Setup,
    shas: &Shas,
    p: &Phase,
    target: &Target,
    leases: Vec<(usize, ceiling::Granted)>,
) -> Result<Run, String> {
    let plan = &target.plan;
    let conns = ceiling::connections(&plan.redis_url, plan.connections).await?;
    // Each connection settles its own share of the leases, and makes its share of a budget.
    let n = conns.len();
    let work = p.work;
    let budget = p.budget.map(|b| b.div_ceil(n as u64));
    let mut shares: Vec<Vec<(usize, ceiling::Granted)>> = vec![Vec::new(); n];
    for (i, l) in leases.into_iter().enumerate() {
        shares[i % n].push(l);
    }
    let ctx = Arc::new((setup.clone(), shas.clone(), target.clone()));
    let started = Instant::now();
    let deadline = started + plan.duration;
    let mut tasks = Vec::new();
    for (ci, (conn, share)) in conns.into_iter().zip(shares).enumerate() {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let (setup, shas, target) = &*ctx;
            let until = match budget {
                Some(calls) => Until::Calls(calls),
                None => Until::Deadline(deadline),
            };
            connection(setup, shas, target, work, conn, ci, share, until).await
        }));
    }
    let mut all = Run::default();
    for t in tasks {
        all.absorb(t.await.map_err(|e| e.to_string())?);
    }
    all.elapsed = started.elapsed();
    Ok(all)
}

/// When a connection's part of a phase ends (a settle phase: when its leases are settled).
#[derive(Debug, Clone, Copy)]
enum Until {
    Deadline(Instant),
    Calls(u64),
}

/// One connection's part of a phase: pipelines until the deadline (or, settling, until its
/// share of the leases is gone).
#[allow(clippy::too_many_arguments)]
async fn connection(
    setup: &Setup,
    shas: &Shas,
    target: &Target,
    work: Work,
    mut conn: MultiplexedConnection,
    ci: usize,
    mut share: Vec<(usize, ceiling::Granted)>,
    until: Until,
) -> Run {
    let plan = &target.plan;
    let mut out = Run::default();
    let mut rng = SmallRng::from_entropy();
    let mut next = ci * 7919;
    loop {
        let more = match until {
            _ if work == Work::Settle => !share.is_empty(),
            Until::Calls(calls) => out.sent < calls,
            Until::Deadline(t) => Instant::now() < t,
        };
        if !more {
            return out;
        }
        let mut pipe = redis::pipe();
        if let Work::Reference(_) | Work::Candidate(_) = work {
            let round = if let Work::Reference(r) = work { r } else { 0 };
            let now = chrono::Utc::now().timestamp_millis();
            for _ in 0..plan.pipeline {
                next = (next + 1) % plan.keys.len();
                let k = &plan.keys[next];
                let cmd = pipe.cmd("EVALSHA");
                match work {
                    Work::Candidate(i) => cmd
                        .arg(&shas.candidates[i])
                        .arg(2)
                        .arg(&k.state)
                        .arg(candidate_key(k, i)),
                    _ => cmd.arg(&shas.reference).arg(1).arg(reference_log(k, round)),
                }
                .arg(plan.window_ms)
                .arg(setup.limit)
                .arg(now)
                .arg(new_nonce());
            }
            out.sent += plan.pipeline as u64;
            match pipe.query_async::<Vec<Value>>(&mut conn).await {
                Ok(replies) => {
                    for v in replies {
                        // The reference and ring candidates answer a count, the others
                        // admit.lua's reply.
                        if matches!(v, Value::Int(n) if n >= 0) || ceiling::first_is(&v, "ok") {
                            out.done += 1;
                        } else {
                            *out.other.entry(ceiling::kind(&v)).or_default() += 1;
                        }
                    }
                }
                Err(e) => out.failed(&e),
            }
            continue;
        }
        let to_settle = if work == Work::Settle {
            share.split_off(share.len().saturating_sub(plan.pipeline))
        } else {
            let mut batch = Vec::with_capacity(plan.pipeline);
            for _ in 0..plan.pipeline {
                next = (next + 1) % plan.keys.len();
                let nonce = new_nonce();
                let prior = ceiling::push_admit(
                    &mut pipe,
                    &shas.admit,
                    plan,
                    &plan.keys[next],
                    &nonce,
                    target.reserve_nanos,
                );
                batch.push((next, nonce, prior));
            }
            out.sent += batch.len() as u64;
            let replies = match pipe.query_async::<Vec<Value>>(&mut conn).await {
                Ok(v) => v,
                Err(e) => {
                    out.failed(&e);
                    continue;
                }
            };
            let mut granted = Vec::with_capacity(batch.len());
            for (v, (idx, nonce, prior)) in replies.iter().zip(batch) {
                let k = &plan.keys[idx];
                match ceiling::Granted::from_reply(v, nonce, plan, k, prior.as_deref()) {
                    Some(g) => granted.push((idx, g)),
                    None => *out.other.entry(ceiling::kind(v)).or_default() += 1,
                }
            }
            if work == Work::Admit {
                out.done += granted.len() as u64;
                out.leases.extend(granted);
                continue;
            }
            granted
        };
        let mut pipe = redis::pipe();
        for (idx, g) in &to_settle {
            let k = &plan.keys[*idx];
            // Never above the held keys' reserve (= the largest cost), as at the gateway.
            let cost = rng.gen_range(0..=plan.max_cost_nanos);
            ceiling::push_settle(
                &mut pipe,
                &shas.settle,
                plan,
                k,
                g,
                &scratch_stream(k),
                cost,
            );
        }
        out.sent += to_settle.len() as u64;
        match pipe.query_async::<Vec<Value>>(&mut conn).await {
            Ok(replies) => {
                for v in replies {
                    if ceiling::first_is(&v, "settled") {
                        out.done += 1;
                    } else {
                        *out.other
                            .entry(format!("settle:{}", ceiling::kind(&v)))
                            .or_default() += 1;
                    }
                }
            }
            Err(e) => out.failed(&e),
        }
    }
}

/// Removes the reference logs, the scratch streams and the candidates' keys; the keys' own
/// logs, leases and tombstones expire as tollgate's do.
async fn clean_up(redis: &mut MultiplexedConnection, setup: &Setup) -> Result<(), String> {
    let mut names: Vec<String> = Vec::new();
    let keys = setup
        .plain
        .iter()
        .chain(&setup.held)
        .chain(&setup.held_in_members)
        .flat_map(|t| &t.plan.keys);
    for k in keys {
        names.push(scratch_stream(k));
        names.extend((0..=setup.rounds()).map(|i| reference_log(k, i)));
        names.extend((0..setup.candidates.len()).map(|i| candidate_key(k, i)));
    }
    names.sort();
    names.dedup();
    for chunk in names.chunks(1000) {
        let _: i64 = redis::cmd("UNLINK")
            .arg(chunk)
            .query_async(redis)
            .await
            .map_err(|e| format!("UNLINK: {e}"))?;
    }
    Ok(())
}
