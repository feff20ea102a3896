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
    let mut out = Outcome::new();
    let mut conn = Conn::new(plan.data.clone(), None);
    let mut rng = SmallRng::from_entropy();
    let deadline = start + plan.duration;
    let epoch = plan.epoch;
    let valid = plan.first_invalid;
    let invalid = plan.keys.len() - valid;
    let n = plan.concurrency as f64;
    let mut flow: u64 = 0;
    loop {
        // Where the latency of this admission is measured from: its send time, or, in open
        // loop, its scheduled time when the worker was still busy then (the request waited
        // because of the server, so the wait is part of its latency: no coordinated omission).
        let mut scheduled: Option<Instant> = None;
        if let Some(rate) = plan.rate {
            let at = start + Duration::from_secs_f64((w as f64 + flow as f64 * n) / rate);
            if at >= deadline {
                break;
            }
            if Instant::now() < at {
                tokio::time::sleep_until(at.into()).await;
            } else {
                scheduled = Some(at);
            }
        } else if Instant::now() >= deadline {
            break;
        }
        flow += 1;

        let use_invalid = invalid > 0 && (valid == 0 || rng.gen_bool(plan.invalid_share));
        let idx = if use_invalid {
            valid + rng.gen_range(0..invalid)
        } else if !plan.hot.is_empty() && rng.gen_bool(plan.hot_share) {
            rng.gen_range(plan.hot.clone())
        } else {
            rng.gen_range(0..valid)
        };
        let key = &plan.keys[idx];
        let kid = idx as u32;

        let send_instant = Instant::now();
        let sent = now(epoch);
        let res = conn
            .send(
                hyper::Method::POST,
                "/v1/admit",
                Some(key.admit_body.clone()),
            )
            .await;
        let recv = now(epoch);
        progress.fetch_add(1, Ordering::Relaxed);
        let (status, body) = match res {
            Ok(r) => r,
            Err(e) => {
                out.error("admit_transport", e.to_string());
                if !use_invalid {
                    out.unknown.push(Attempt {
                        key: kid,
                        sent,
                        recv,
                    });
                }
                continue;
            }
        };
        out.admits += 1;
        let from = scheduled.unwrap_or(send_instant);
        out.admit
            .saturating_record(u64::try_from(from.elapsed().as_nanos()).unwrap_or(u64::MAX));

        let reply: AdmitReply = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                out.error("admit_body", format!("{status}: {e}"));
                if !use_invalid {
                    out.unknown.push(Attempt {
                        key: kid,
                        sent,
                        recv,
                    });
                }
                continue;
            }
        };
        if !(status.is_success() && reply.allowed) {
            let code = reply
                .code
                .unwrap_or_else(|| format!("http_{}", status.as_u16()));
            *out.denials.entry(code.clone()).or_default() += 1;
            if code == "unavailable" {
                out.error("unavailable", "tollgate answered 503 unavailable".into());
                if !use_invalid {
                    out.unknown.push(Attempt {
                        key: kid,
                        sent,
                        recv,
                    });
                }
                continue;
            }
            if !expected_denial(key.class, use_invalid, &code) {
                out.violation(
                    "denials_match_configuration",
                    kid,
                    format!("{:?} key denied with {code}", key.class),
                );
            }
            match code.as_str() {
                "rate_limited" => out.rate_denials.push(Attempt {
                    key: kid,
                    sent,
                    recv,
                }),
                "concurrency_limited" => out.conc_denials.push(Attempt {
                    key: kid,
                    sent,
                    recv,
                }),
                _ => {}
            }
            continue;
        }
        out.allowed += 1;
        if use_invalid {
            out.violation(
                "invalid_keys_denied",
                kid,
                "an invalid key was admitted".into(),
            );
        }
        check_counters(&mut out, key, kid, &reply, plan.window_ms);
        let Some(lease) = reply.lease_id else {
            out.error("admit_body", "allowed without lease_id".into());
            continue;
        };
        let mut grant = Granted {
            key: kid,
            sent,
            recv,
            end_sent: None,
            end_recv: None,
        };

        if !plan.hold.is_zero() {
            tokio::time::sleep(plan.hold).await;
        }

        if rng.gen_bool(plan.release_share) {
            let body = Bytes::from(format!(r#"{{"lease_id":"{lease}"}}"#));
            let t0 = Instant::now();
            grant.end_sent = Some(now(epoch));
            let res = conn
                .send(hyper::Method::POST, "/v1/release", Some(body))
                .await;
            match res {
                Ok((s, b)) if s.is_success() => {
                    grant.end_recv = Some(now(epoch));
                    out.releases += 1;
                    out.release
                        .saturating_record(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(0));
                    if !serde_json::from_slice::<ReleaseReply>(&b).is_ok_and(|r| r.released) {
                        out.violation("release_answers", kid, String::from_utf8_lossy(&b).into());
                    }
                }
                Ok((s, b)) => {
                    out.violation(
                        "granted_leases_release",
                        kid,
                        format!("{s}: {}", String::from_utf8_lossy(&b)),
                    );
                }
                Err(e) => out.error("release_transport", e.to_string()),
            }
        } else {
            let cost = if key.reserve > Money::ZERO {
                rng.gen_range(0..=key.reserve.nanos())
            } else {
                rng.gen_range(0..=plan.max_cost.nanos())
            };
            // A token key's settlement stays within what its admission reserved.
            let most = if key.reserve_tokens > 0 {
                u32::try_from(key.reserve_tokens / 2).unwrap_or(1000).max(2)
            } else {
                2000
            };
            let input = rng.gen_range(1..most);
            let output = rng.gen_range(1..most);
            let body = Bytes::from(format!(
                r#"{{"lease_id":"{lease}","cost_usd":{},"input_tokens":{input},"output_tokens":{output},"response_time_ms":{},"status_code":200}}"#,
                Money::from_nanos(cost),
                rng.gen_range(50..3000u32),
            ));
            let t0 = Instant::now();
            grant.end_sent = Some(now(epoch));
            let res = conn
                .send(hyper::Method::POST, "/v1/settle", Some(body.clone()))
                .await;
            match res {
                Ok((s, b)) if s.is_success() => {
                    grant.end_recv = Some(now(epoch));
                    out.settle
                        .saturating_record(u64::try_from(t0.elapsed().as_nanos()).unwrap_or(0));
                    match serde_json::from_slice::<SettleReply>(&b) {
                        Ok(r) if r.settled && !r.duplicate && !r.lease_expired => {
                            out.settles += 1;
                            if key.reserve_tokens > 0 {
                                out.token_settles.push(TokenSettle {
                                    key: kid,
                                    sent: grant.end_sent.unwrap_or(0),
                                    recv: now(epoch),
                                    tokens: u64::from(input + output),
                                });
                            }
                            let e = out.cost.entry(kid).or_default();
                            e.0 += cost;
                            e.1 += 1;
                        }
                        _ => {
                            out.uncertain.push(kid);
                            out.violation(
                                "first_settle_charges",
                                kid,
                                String::from_utf8_lossy(&b).into(),
                            );
                        }
                    }
                    if rng.gen_bool(plan.resettle_share) {
                        // A retried settle: must be recognised, and charge nothing.
                        match conn
                            .send(hyper::Method::POST, "/v1/settle", Some(body))
                            .await
                        {
                            Ok((s, b)) if s.is_success() => {
                                out.resettles += 1;
                                if !serde_json::from_slice::<SettleReply>(&b)
                                    .is_ok_and(|r| r.settled && r.duplicate)
                                {
                                    out.uncertain.push(kid);
                                    out.violation(
                                        "duplicate_settle_detected",
                                        kid,
                                        String::from_utf8_lossy(&b).into(),
                                    );
                                }
                            }
                            Ok((s, b)) => out.violation(
                                "duplicate_settle_detected",
                                kid,
                                format!("{s}: {}", String::from_utf8_lossy(&b)),
                            ),
                            Err(e) => {
                                out.uncertain.push(kid);
                                out.error("settle_transport", e.to_string());
                            }
                        }
                    }
                }
                Ok((s, b)) => {
                    out.uncertain.push(kid);
                    out.violation(
                        "granted_leases_settle",
                        kid,
                        format!("{s}: {}", String::from_utf8_lossy(&b)),
                    );
                }
                Err(e) => {
                    out.uncertain.push(kid);
                    out.error("settle_transport", e.to_string());
                }
            }
        }
        out.grants.push(grant);
    }
    out.reconnects = conn.reconnects;
    out
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
