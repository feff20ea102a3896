//! The HTTP phase: workers that admit and then settle (or release) over keep-alive
//! connections, closed-loop (each worker sends its next flow as soon as the last one ended) or
//! open-loop at a fixed rate (each worker owns an even share of a fixed schedule).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use tollgate::money::Money;

use crate::admin::Class;
use crate::check::{Attempt, Granted, Nanos, TokenSettle, Violation};
use crate::http::{Conn, Endpoint};

/// One key as the workers use it.
#[derive(Debug, Clone)]
pub struct LoadKey {
    pub class: Class,
    pub rate_limit: Option<u64>,
    pub concurrent_limit: Option<u64>,
    /// The whole admit body, built once.
    pub admit_body: Bytes,
    /// Held at admission (standalone and budget keys), so that no interleaving can overspend.
    pub reserve: Money,
    /// Tokens held at admission (token keys); every settlement stays within them.
    pub reserve_tokens: u64,
}

pub fn admit_body(secret: &str, reserve: Money, reserve_tokens: u64) -> Bytes {
    let mut b = format!(
        r#"{{"key":"{secret}","provider":"openai","api_format":"openai:chat","model":"gpt-4o""#
    );
    if reserve > Money::ZERO {
        b.push_str(&format!(r#","reserve_usd":{reserve}"#));
    }
    if reserve_tokens > 0 {
        b.push_str(&format!(r#","reserve_tokens":{reserve_tokens}"#));
    }
    b.push('}');
    Bytes::from(b)
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub data: Endpoint,
    /// Valid keys, then invalid ones (`class` is irrelevant for those; see `first_invalid`).
    pub keys: Arc<Vec<LoadKey>>,
    pub first_invalid: usize,
    /// Keys that get `hot_share` of the valid requests (skew, as real traffic has).
    pub hot: std::ops::Range<usize>,
    pub hot_share: f64,
    pub invalid_share: f64,
    pub release_share: f64,
    pub resettle_share: f64,
    pub max_cost: Money,
    pub hold: Duration,
    pub concurrency: usize,
    pub duration: Duration,
    /// Flows per second (open loop); `None` = closed loop.
    pub rate: Option<f64>,
    pub epoch: Instant,
    /// The server's rate window: no `reset_ms` may exceed it.
    pub window_ms: u64,
}

#[derive(Debug, Deserialize)]
struct AdmitReply {
    allowed: bool,
    lease_id: Option<String>,
    code: Option<String>,
    rate_limit: Option<RateInfo>,
    concurrency: Option<ConcInfo>,
}

#[derive(Debug, Deserialize)]
struct RateInfo {
    limit: Option<u64>,
    remaining: Option<u64>,
    reset_ms: u64,
}

#[derive(Debug, Deserialize)]
struct ConcInfo {
    limit: Option<u64>,
    in_flight: u64,
}

#[derive(Debug, Deserialize)]
struct SettleReply {
    settled: bool,
    duplicate: bool,
    lease_expired: bool,
}

#[derive(Debug, Deserialize)]
struct ReleaseReply {
    released: bool,
}

pub fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).unwrap_or_else(|_| {
        Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits is valid"))
    })
}

/// Everything one worker saw.
pub struct Outcome {
    pub admit: Histogram<u64>,
    pub settle: Histogram<u64>,
    pub release: Histogram<u64>,
    pub admits: u64,
    pub allowed: u64,
    pub denials: BTreeMap<String, u64>,
    pub settles: u64,
    pub releases: u64,
    pub resettles: u64,
    pub errors: BTreeMap<String, u64>,
    pub error_samples: Vec<String>,
    pub grants: Vec<Granted>,
    pub rate_denials: Vec<Attempt>,
    pub conc_denials: Vec<Attempt>,
    pub unknown: Vec<Attempt>,
    /// Confirmed settlements of token keys.
    pub token_settles: Vec<TokenSettle>,
    /// Per key: confirmed settled cost and count; keys with an unconfirmed settle.
    pub cost: HashMap<u32, (i64, u64)>,
    pub uncertain: Vec<u32>,
    pub violations: Vec<Violation>,
    pub reconnects: u64,
}

impl Outcome {
    fn new() -> Outcome {
        Outcome {
            admit: histogram(),
            settle: histogram(),
            release: histogram(),
            admits: 0,
            allowed: 0,
            denials: BTreeMap::new(),
            settles: 0,
            releases: 0,
            resettles: 0,
            errors: BTreeMap::new(),
            error_samples: Vec::new(),
            grants: Vec::new(),
            rate_denials: Vec::new(),
            conc_denials: Vec::new(),
            unknown: Vec::new(),
            token_settles: Vec::new(),
            cost: HashMap::new(),
            uncertain: Vec::new(),
            violations: Vec::new(),
            reconnects: 0,
        }
    }

    fn error(&mut self, kind: &str, detail: String) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
        if self.error_samples.len() < 10 {
            self.error_samples.push(format!("{kind}: {detail}"));
        }
    }

    fn violation(&mut self, check: &'static str, key: u32, detail: String) {
        // A systematic bug would repeat on every request: keep the report readable.
        if self.violations.len() < 100 {
            self.violations.push(Violation { check, key, detail });
        }
    }

    /// An answer that breaks `check`, shown as its status and body.
    fn bad_answer(
        &mut self,
        check: &'static str,
        key: u32,
        status: hyper::StatusCode,
        body: &[u8],
    ) {
        self.violation(
            check,
            key,
            format!("{status}: {}", String::from_utf8_lossy(body)),
        );
    }

    /// A settle that got no answer: whether it charged the key is unknown.
    fn settle_lost(&mut self, key: u32, detail: String) {
        self.uncertain.push(key);
        self.error("settle_transport", detail);
    }

    pub fn merge(&mut self, o: Outcome) {
        let _ = self.admit.add(&o.admit);
        let _ = self.settle.add(&o.settle);
        let _ = self.release.add(&o.release);
        self.admits += o.admits;
        self.allowed += o.allowed;
        for (k, v) in o.denials {
            *self.denials.entry(k).or_default() += v;
        }
        self.settles += o.settles;
        self.releases += o.releases;
        self.resettles += o.resettles;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for s in o.error_samples {
            if self.error_samples.len() < 10 {
                self.error_samples.push(s);
            }
        }
        self.grants.extend(o.grants);
        self.rate_denials.extend(o.rate_denials);
        self.conc_denials.extend(o.conc_denials);
        self.unknown.extend(o.unknown);
        self.token_settles.extend(o.token_settles);
        for (k, (c, n)) in o.cost {
            let e = self.cost.entry(k).or_default();
            e.0 += c;
            e.1 += n;
        }
        self.uncertain.extend(o.uncertain);
        for v in o.violations {
            if self.violations.len() < 100 {
                self.violations.push(v);
            }
        }
        self.reconnects += o.reconnects;
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

fn now(epoch: Instant) -> Nanos {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn expected_denial(class: Class, invalid: bool, code: &str) -> bool {
    if invalid {
        return code == "key_invalid";
    }
    match class {
        Class::Normal | Class::Ceiling => code == "concurrency_limited",
        Class::Limited => matches!(code, "rate_limited" | "concurrency_limited"),
        Class::Standalone => matches!(code, "balance_exhausted" | "concurrency_limited"),
        Class::Tokens => matches!(code, "token_limited" | "concurrency_limited"),
        Class::Budget => matches!(code, "budget_exceeded" | "concurrency_limited"),
    }
}

/// Runs the phase: `concurrency` workers until `duration` has passed. `progress` counts
/// admissions as they complete, for the time series.
pub async fn run(plan: Plan, progress: Arc<AtomicU64>) -> Outcome {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..plan.concurrency {
        let plan = plan.clone();
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            worker(plan, w, start, progress).await
        }));
    }
    let mut all = Outcome::new();
    for t in tasks {
        match t.await {
            Ok(o) => all.merge(o),
            Err(e) => all.error("worker_panic", e.to_string()),
        }
    }
    all
}

async fn worker(plan: Plan, w: usize, start: Instant, progress: Arc<AtomicU64>) -> Outcome {
    let mut worker = Worker::new(plan, w, start, progress);
    while let Some(scheduled) = worker.next_slot().await {
        let (idx, invalid) = worker.pick_key();
        let Some((lease, mut grant)) = worker.admit(idx, invalid, scheduled).await else {
            continue;
        };
        if !worker.plan.hold.is_zero() {
            tokio::time::sleep(worker.plan.hold).await;
        }
        if worker.rng.gen_bool(worker.plan.release_share) {
            worker.release(&lease, &mut grant).await;
        } else {
            worker.settle(idx, &lease, &mut grant).await;
        }
        worker.out.grants.push(grant);
    }
    worker.out.reconnects = worker.conn.reconnects;
    worker.out
}

/// One worker of the phase: its connection, its random choices and what it has seen.
struct Worker {
    plan: Plan,
    /// This worker's place among `plan.concurrency`: its offset in the open-loop schedule.
    w: usize,
    start: Instant,
    deadline: Instant,
    progress: Arc<AtomicU64>,
    conn: Conn,
    rng: SmallRng,
    out: Outcome,
    /// Flows started so far.
    flows: u64,
}

impl Worker {
    fn new(plan: Plan, w: usize, start: Instant, progress: Arc<AtomicU64>) -> Worker {
        Worker {
            conn: Conn::new(plan.data.clone(), None),
            deadline: start + plan.duration,
            plan,
            w,
            start,
            progress,
            rng: SmallRng::from_entropy(),
            out: Outcome::new(),
            flows: 0,
        }
    }

    /// Waits for the next flow's turn; `None` once the phase is over. Inside: where the
    /// latency of its admission is measured from. `None` is its send time; in open loop, when
    /// the worker was still busy at the flow's scheduled time, that time (the request waited
    /// because of the server, so the wait is part of its latency: no coordinated omission).
    async fn next_slot(&mut self) -> Option<Option<Instant>> {
        let mut scheduled = None;
        if let Some(rate) = self.plan.rate {
            let n = self.plan.concurrency as f64;
            let at = self.start
                + Duration::from_secs_f64((self.w as f64 + self.flows as f64 * n) / rate);
            if at >= self.deadline {
                return None;
            }
            if Instant::now() < at {
                tokio::time::sleep_until(at.into()).await;
            } else {
                scheduled = Some(at);
            }
        } else if Instant::now() >= self.deadline {
            return None;
        }
        self.flows += 1;
        Some(scheduled)
    }

    /// The next flow's key (an index into `plan.keys`), and whether it is an invalid one.
    fn pick_key(&mut self) -> (usize, bool) {
        let valid = self.plan.first_invalid;
        let invalid = self.plan.keys.len() - valid;
        let use_invalid = invalid > 0 && (valid == 0 || self.rng.gen_bool(self.plan.invalid_share));
        let idx = if use_invalid {
            valid + self.rng.gen_range(0..invalid)
        } else if !self.plan.hot.is_empty() && self.rng.gen_bool(self.plan.hot_share) {
            self.rng.gen_range(self.plan.hot.clone())
        } else {
            self.rng.gen_range(0..valid)
        };
        (idx, use_invalid)
    }

    /// Sends the flow's admission and checks the answer; the lease and its grant when it was
    /// allowed, `None` when the flow ends here.
    async fn admit(
        &mut self,
        idx: usize,
        invalid: bool,
        scheduled: Option<Instant>,
    ) -> Option<(String, Granted)> {
        let epoch = self.plan.epoch;
        let send_instant = Instant::now();
        let sent = now(epoch);
        let res = self
            .conn
            .send(
                hyper::Method::POST,
                "/v1/admit",
                Some(self.plan.keys[idx].admit_body.clone()),
            )
            .await;
        let recv = now(epoch);
        self.progress.fetch_add(1, Ordering::Relaxed);
        let attempt = Attempt {
            key: idx as u32,
            sent,
            recv,
        };
        let (status, body) = match res {
            Ok(r) => r,
            Err(e) => {
                self.out.error("admit_transport", e.to_string());
                self.unknown(invalid, attempt);
                return None;
            }
        };
        self.out.admits += 1;
        let from = scheduled.unwrap_or(send_instant);
        self.out
            .admit
            .saturating_record(u64::try_from(from.elapsed().as_nanos()).unwrap_or(u64::MAX));
        let reply: AdmitReply = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                self.out.error("admit_body", format!("{status}: {e}"));
                self.unknown(invalid, attempt);
                return None;
            }
        };
        if !(status.is_success() && reply.allowed) {
            let code = reply
                .code
                .unwrap_or_else(|| format!("http_{}", status.as_u16()));
            self.denied(idx, invalid, attempt, code);
            return None;
        }
        self.allowed(idx, invalid, &reply);
        let Some(lease) = reply.lease_id else {
            self.out
                .error("admit_body", "allowed without lease_id".into());
            return None;
        };
        Some((
            lease,
            Granted {
                key: attempt.key,
                sent,
                recv,
                end_sent: None,
                end_recv: None,
            },
        ))
    }

    /// An admission whose outcome is unknown (the server may have admitted it): kept for the
    /// checks, unless its key was an invalid one.
    fn unknown(&mut self, invalid: bool, attempt: Attempt) {
        if !invalid {
            self.out.unknown.push(attempt);
        }
    }

    /// Counts a denial and checks that the key's configuration explains it.
    fn denied(&mut self, idx: usize, invalid: bool, attempt: Attempt, code: String) {
        *self.out.denials.entry(code.clone()).or_default() += 1;
        if code == "unavailable" {
            self.out
                .error("unavailable", "tollgate answered 503 unavailable".into());
            self.unknown(invalid, attempt);
            return;
        }
        let class = self.plan.keys[idx].class;
        if !expected_denial(class, invalid, &code) {
            self.out.violation(
                "denials_match_configuration",
                attempt.key,
                format!("{class:?} key denied with {code}"),
            );
        }
        match code.as_str() {
            "rate_limited" => self.out.rate_denials.push(attempt),
            "concurrency_limited" => self.out.conc_denials.push(attempt),
            _ => {}
        }
    }

    /// Counts an allowed admission and checks the counters it reports.
    fn allowed(&mut self, idx: usize, invalid: bool, reply: &AdmitReply) {
        let kid = idx as u32;
        self.out.allowed += 1;
        if invalid {
            self.out.violation(
                "invalid_keys_denied",
                kid,
                "an invalid key was admitted".into(),
            );
        }
        check_counters(
            &mut self.out,
            &self.plan.keys[idx],
            kid,
            reply,
            self.plan.window_ms,
        );
    }

    /// Ends the flow with a release.
    async fn release(&mut self, lease: &str, grant: &mut Granted) {
        let epoch = self.plan.epoch;
        let kid = grant.key;
        let body = Bytes::from(format!(r#"{{"lease_id":"{lease}"}}"#));
        let t0 = Instant::now();
        grant.end_sent = Some(now(epoch));
        let res = self
            .conn
            .send(hyper::Method::POST, "/v1/release", Some(body))
            .await;
        match res {
            Ok((s, b)) if s.is_success() => {
                grant.end_recv = Some(now(epoch));
                self.out.releases += 1;
                self.out
                    .release
                    .saturating_record(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(0));
                if !serde_json::from_slice::<ReleaseReply>(&b).is_ok_and(|r| r.released) {
                    self.out
                        .violation("release_answers", kid, String::from_utf8_lossy(&b).into());
                }
            }
            Ok((s, b)) => self.out.bad_answer("granted_leases_release", kid, s, &b),
            Err(e) => self.out.error("release_transport", e.to_string()),
        }
    }

    /// Ends the flow with a settlement, sometimes sent twice.
    async fn settle(&mut self, idx: usize, lease: &str, grant: &mut Granted) {
        let epoch = self.plan.epoch;
        let kid = grant.key;
        let reserve_tokens = self.plan.keys[idx].reserve_tokens;
        let (body, cost, tokens) = self.settle_body(idx, lease);
        let t0 = Instant::now();
        grant.end_sent = Some(now(epoch));
        let res = self
            .conn
            .send(hyper::Method::POST, "/v1/settle", Some(body.clone()))
            .await;
        match res {
            Ok((s, b)) if s.is_success() => {
                grant.end_recv = Some(now(epoch));
                self.out
                    .settle
                    .saturating_record(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(0));
                match serde_json::from_slice::<SettleReply>(&b) {
                    Ok(r) if r.settled && !r.duplicate && !r.lease_expired => {
                        self.out.settles += 1;
                        if reserve_tokens > 0 {
                            self.out.token_settles.push(TokenSettle {
                                key: kid,
                                sent: grant.end_sent.unwrap_or(0),
                                recv: now(epoch),
                                tokens,
                            });
                        }
                        let e = self.out.cost.entry(kid).or_default();
                        e.0 += cost;
                        e.1 += 1;
                    }
                    _ => {
                        self.out.uncertain.push(kid);
                        self.out.violation(
                            "first_settle_charges",
                            kid,
                            String::from_utf8_lossy(&b).into(),
                        );
                    }
                }
                if self.rng.gen_bool(self.plan.resettle_share) {
                    self.resettle(kid, body).await;
                }
            }
            Ok((s, b)) => {
                self.out.uncertain.push(kid);
                self.out.bad_answer("granted_leases_settle", kid, s, &b);
            }
            Err(e) => self.out.settle_lost(kid, e.to_string()),
        }
    }

    /// A settlement of a random cost and token count within what the key reserved: its body,
    /// its cost in nano-USD and its tokens.
    fn settle_body(&mut self, idx: usize, lease: &str) -> (Bytes, i64, u64) {
        let (reserve, reserve_tokens) = {
            let key = &self.plan.keys[idx];
            (key.reserve, key.reserve_tokens)
        };
        let cost = if reserve > Money::ZERO {
            self.rng.gen_range(0..=reserve.nanos())
        } else {
            self.rng.gen_range(0..=self.plan.max_cost.nanos())
        };
        // A token key's settlement stays within what its admission reserved.
        let most = if reserve_tokens > 0 {
            u32::try_from(reserve_tokens / 2).unwrap_or(1000).max(2)
        } else {
            2000
        };
        let input = self.rng.gen_range(1..most);
        let output = self.rng.gen_range(1..most);
        let body = Bytes::from(format!(
            r#"{{"lease_id":"{lease}","cost_usd":{},"input_tokens":{input},"output_tokens":{output},"response_time_ms":{},"status_code":200}}"#,
            Money::from_nanos(cost),
            self.rng.gen_range(50..3000u32),
        ));
        (body, cost, u64::from(input + output))
    }

    /// A retried settle: must be recognised, and charge nothing.
    async fn resettle(&mut self, kid: u32, body: Bytes) {
        match self
            .conn
            .send(hyper::Method::POST, "/v1/settle", Some(body))
            .await
        {
            Ok((s, b)) if s.is_success() => {
                self.out.resettles += 1;
                if !serde_json::from_slice::<SettleReply>(&b)
                    .is_ok_and(|r| r.settled && r.duplicate)
                {
                    self.out.uncertain.push(kid);
                    self.out.violation(
                        "duplicate_settle_detected",
                        kid,
                        String::from_utf8_lossy(&b).into(),
                    );
                }
            }
            Ok((s, b)) => self.out.bad_answer("duplicate_settle_detected", kid, s, &b),
            Err(e) => self.out.settle_lost(kid, e.to_string()),
        }
    }
}

/// What the server reports about the key's counters must agree with its configuration.
fn check_counters(out: &mut Outcome, key: &LoadKey, kid: u32, r: &AdmitReply, window_ms: u64) {
    if let Some(rl) = &r.rate_limit {
        if rl.limit != key.rate_limit {
            out.violation(
                "reported_limits",
                kid,
                format!(
                    "rate_limit.limit {:?}, configured {:?}",
                    rl.limit, key.rate_limit
                ),
            );
        }
        if let (Some(l), Some(rem)) = (rl.limit, rl.remaining) {
            if rem >= l {
                out.violation(
                    "reported_limits",
                    kid,
                    format!("rate_limit.remaining {rem} after an admission, limit {l}"),
                );
            }
        }
        if rl.limit.is_some() && rl.reset_ms > window_ms {
            out.violation(
                "reported_limits",
                kid,
                format!(
                    "rate_limit.reset_ms {} beyond the {window_ms} ms window",
                    rl.reset_ms
                ),
            );
        }
    }
    if let Some(c) = &r.concurrency {
        if c.limit != key.concurrent_limit {
            out.violation(
                "reported_limits",
                kid,
                format!(
                    "concurrency.limit {:?}, configured {:?}",
                    c.limit, key.concurrent_limit
                ),
            );
        }
        if let Some(l) = c.limit {
            if c.in_flight > l || c.in_flight == 0 {
                out.violation(
                    "reported_limits",
                    kid,
                    format!("concurrency.in_flight {} with limit {l}", c.in_flight),
                );
            }
        }
    }
}
