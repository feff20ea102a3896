//! The fault run's traffic: paced admit → settle/release flows that keep, per lease, what
//! tollgate answered, and retry the end of a flow through an outage as a gateway would. The
//! plain load phase (`load.rs`) counts per key and treats any failed settle as a violation;
//! under faults the audit needs each lease's own fate instead.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use tollgate::money::Money;

use crate::admin::Class;
use crate::check::{Attempt, Granted, Nanos};
use crate::http::{Conn, Endpoint};

/// Tries of a settle or release before its outcome is left unknown, and the first back-off
/// (doubled each time): about 6 s in all, longer than a tollgate or Redis restart.
const END_TRIES: u32 = 6;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct TKey {
    pub class: Class,
    pub admit_body: Bytes,
    pub reserve: Money,
}

#[derive(Clone)]
pub struct Plan {
    pub data: Endpoint,
    pub keys: Arc<Vec<TKey>>,
    pub hot: std::ops::Range<usize>,
    pub hot_share: f64,
    pub release_share: f64,
    pub resettle_share: f64,
    pub max_cost: Money,
    pub hold: Duration,
    pub concurrency: usize,
    /// Flows per second over all workers; a worker that falls behind does not catch up in a
    /// burst (that would be a load spike after every outage, not the traffic's shape).
    pub rate: f64,
    pub epoch: Instant,
    pub stop: Arc<AtomicBool>,
    pub seed: u64,
}

/// How a lease ended, as far as tollgate's answers tell.
#[derive(Debug, Clone, Copy)]
pub enum End {
    /// An answer confirmed the charge (directly, or as a duplicate of an earlier try whose
    /// answer was lost): the usage event was written between `sent` and `recv`.
    Settled {
        cost: i64,
        sent: Nanos,
        recv: Nanos,
    },
    /// Settles were sent but none confirmed: the event may or may not exist.
    SettleUnknown {
        cost: i64,
    },
    Released,
    ReleaseUnknown,
    /// The first try of its end answered `lease_unknown`: Redis no longer knew the lease.
    Lost {
        recv: Nanos,
    },
    /// An answer the contract does not allow here (recorded as a violation).
    Refused,
}

#[derive(Debug, Clone)]
pub struct Lease {
    pub key: u32,
    pub id: String,
    pub admit_sent: Nanos,
    pub end: End,
}

#[derive(Default)]
pub struct Seen {
    pub grants: Vec<Granted>,
    pub unknown: Vec<Attempt>,
    pub rate_denials: Vec<Attempt>,
    pub conc_denials: Vec<Attempt>,
    pub leases: Vec<Lease>,
    pub counts: BTreeMap<String, u64>,
    pub violations: Vec<String>,
    /// A few answers that were lost or 503, to tell an expected outage from a broken set-up.
    pub samples: Vec<String>,
}

impl Seen {
    fn count(&mut self, what: &str) {
        *self.counts.entry(what.to_string()).or_default() += 1;
    }

    fn violation(&mut self, v: String) {
        self.count("violations");
        if self.violations.len() < 50 {
            self.violations.push(v);
        }
    }

    fn sample(&mut self, what: String) {
        if self.samples.len() < 10 && !self.samples.contains(&what) {
            self.samples.push(what);
        }
    }

    fn merge(&mut self, o: Seen) {
        self.grants.extend(o.grants);
        self.unknown.extend(o.unknown);
        self.rate_denials.extend(o.rate_denials);
        self.conc_denials.extend(o.conc_denials);
        self.leases.extend(o.leases);
        for (k, v) in o.counts {
            *self.counts.entry(k).or_default() += v;
        }
        for v in o.violations {
            if self.violations.len() < 50 {
                self.violations.push(v);
            }
        }
        for v in o.samples {
            self.sample(v);
        }
    }

    pub fn get(&self, what: &str) -> u64 {
        self.counts.get(what).copied().unwrap_or(0)
    }
}

#[derive(Debug, Deserialize)]
struct Reply {
    #[serde(default)]
    allowed: bool,
    lease_id: Option<String>,
    code: Option<String>,
    #[serde(default)]
    settled: bool,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    released: bool,
}

enum Answer {
    Ok(Reply),
    /// A JSON error answer: status and code.
    Denied(u16, String),
    /// No usable answer: the call may or may not have taken effect.
    Lost(String),
}

async fn call(conn: &mut Conn, path: &str, body: Bytes) -> Answer {
    match conn.send(hyper::Method::POST, path, Some(body)).await {
        Err(e) => Answer::Lost(e.to_string()),
        Ok((s, b)) => match serde_json::from_slice::<Reply>(&b) {
            Ok(r) if s.is_success() => Answer::Ok(r),
            Ok(r) => Answer::Denied(s.as_u16(), r.code.unwrap_or_default()),
            Err(_) => Answer::Lost(format!("{s}: {}", String::from_utf8_lossy(&b))),
        },
    }
}

fn now(epoch: Instant) -> Nanos {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn expected_denial(class: Class, code: &str) -> bool {
    match class {
        Class::Limited => matches!(code, "rate_limited" | "concurrency_limited"),
        Class::Standalone => matches!(code, "balance_exhausted" | "concurrency_limited"),
        _ => code == "concurrency_limited",
    }
}

pub async fn run(plan: Plan) -> Seen {
    let tasks: Vec<_> = (0..plan.concurrency)
        .map(|w| tokio::spawn(worker(plan.clone(), w)))
        .collect();
    let mut all = Seen::default();
    for t in tasks {
        match t.await {
            Ok(s) => all.merge(s),
            Err(e) => all.violation(format!("a traffic worker panicked: {e}")),
        }
    }
    all
}

async fn worker(plan: Plan, w: usize) -> Seen {
    let mut seen = Seen::default();
    let mut conn = Conn::new(plan.data.clone(), None);
    let mut rng = SmallRng::seed_from_u64(plan.seed ^ (w as u64).wrapping_mul(0x9E37_79B9));
    let interval = Duration::from_secs_f64(plan.concurrency as f64 / plan.rate);
    let mut next = Instant::now() + interval.mul_f64(w as f64 / plan.concurrency as f64);
    let epoch = plan.epoch;
    while !plan.stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(next.into()).await;
        next = (next + interval).max(Instant::now());
        let idx = if !plan.hot.is_empty() && rng.gen_bool(plan.hot_share) {
            rng.gen_range(plan.hot.clone())
        } else {
            rng.gen_range(0..plan.keys.len())
        };
        let key = &plan.keys[idx];
        let kid = idx as u32;
        let sent = now(epoch);
        let answer = call(&mut conn, "/v1/admit", key.admit_body.clone()).await;
        let recv = now(epoch);
        let attempt = Attempt {
            key: kid,
            sent,
            recv,
        };
        let lease = match answer {
            Answer::Ok(r) if r.allowed => match r.lease_id {
                Some(l) => l,
                None => {
                    seen.violation(format!("key #{idx}: allowed without a lease_id"));
                    continue;
                }
            },
            Answer::Denied(503, code) | Answer::Lost(code) => {
                seen.count("admit_unavailable_or_lost");
                seen.sample(format!("admit: {code}"));
                seen.unknown.push(attempt);
                continue;
            }
            Answer::Denied(_, code)
            | Answer::Ok(Reply {
                code: Some(code), ..
            }) => {
                seen.count(&format!("admit_denied_{code}"));
                match code.as_str() {
                    "rate_limited" => seen.rate_denials.push(attempt),
                    "concurrency_limited" => seen.conc_denials.push(attempt),
                    _ => {}
                }
                if !expected_denial(key.class, &code) {
                    seen.violation(format!("key #{idx} ({:?}) denied with {code}", key.class));
                }
                continue;
            }
            Answer::Ok(_) => {
                seen.violation(format!("key #{idx}: denied without a code"));
                continue;
            }
        };
        seen.count("admit_allowed");
        if !plan.hold.is_zero() {
            tokio::time::sleep(plan.hold).await;
        }
        let release = rng.gen_bool(plan.release_share);
        let cost = if release {
            0
        } else {
            let most = if key.reserve > Money::ZERO {
                key.reserve.nanos()
            } else {
                plan.max_cost.nanos()
            };
            rng.gen_range(0..=most)
        };
        let body = if release {
            Bytes::from(format!(r#"{{"lease_id":"{lease}"}}"#))
        } else {
            Bytes::from(format!(
                r#"{{"lease_id":"{lease}","cost_usd":{},"input_tokens":{},"output_tokens":{},"response_time_ms":{},"status_code":200}}"#,
                Money::from_nanos(cost),
                rng.gen_range(1..2000u32),
                rng.gen_range(1..2000u32),
                rng.gen_range(50..3000u32),
            ))
        };
        let end_sent = now(epoch);
        let (end, end_recv) =
            end_lease(&mut conn, &mut seen, idx, release, cost, &body, epoch).await;
        seen.grants.push(Granted {
            key: kid,
            sent,
            recv,
            end_sent: Some(end_sent),
            end_recv,
        });
        if let End::Settled { .. } = end {
            if rng.gen_bool(plan.resettle_share) {
                resettle(&mut conn, &mut seen, idx, body).await;
            }
        }
        seen.leases.push(Lease {
            key: kid,
            id: lease,
            admit_sent: sent,
            end,
        });
    }
    seen
}

/// Settles or releases one lease, retrying lost answers and 503s with back-off. Returns the
/// lease's fate and, when an answer confirmed it, when that answer arrived.
async fn end_lease(
    conn: &mut Conn,
    seen: &mut Seen,
    idx: usize,
    release: bool,
    cost: i64,
    body: &Bytes,
    epoch: Instant,
) -> (End, Option<Nanos>) {
    let path = if release { "/v1/release" } else { "/v1/settle" };
    let first_sent = now(epoch);
    // Whether an earlier try may have taken effect although its answer was lost.
    let mut maybe_done = false;
    let mut backoff = FIRST_BACKOFF;
    for _ in 0..END_TRIES {
        let answer = call(conn, path, body.clone()).await;
        let recv = now(epoch);
        match answer {
            Answer::Ok(r) if release && r.released => return (End::Released, Some(recv)),
            Answer::Ok(r) if !release && r.settled && (!r.duplicate || maybe_done) => {
                let end = End::Settled {
                    cost,
                    sent: first_sent,
                    recv,
                };
                return (end, Some(recv));
            }
            Answer::Denied(404, code) if code == "lease_unknown" => {
                seen.count(&format!("{}_lease_unknown", &path[4..]));
                return if maybe_done {
                    (unknown(release, cost), None)
                } else {
                    (End::Lost { recv }, None)
                };
            }
            Answer::Denied(503, what) | Answer::Lost(what) => {
                seen.count(&format!("{}_retried", &path[4..]));
                seen.sample(format!("{path}: {what}"));
                maybe_done = true;
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Answer::Ok(r) => {
                seen.violation(format!(
                    "key #{idx}: {path} answered settled={} duplicate={} released={} on a first try",
                    r.settled, r.duplicate, r.released
                ));
                return (End::Refused, None);
            }
            Answer::Denied(s, code) => {
                seen.violation(format!("key #{idx}: {path} answered {s} {code}"));
                return (End::Refused, None);
            }
        }
    }
    seen.count(&format!("{}_unconfirmed", &path[4..]));
    (unknown(release, cost), None)
}

fn unknown(release: bool, cost: i64) -> End {
    if release {
        End::ReleaseUnknown
    } else {
        End::SettleUnknown { cost }
    }
}

/// A retried settle of a confirmed one must be a duplicate. `lease_unknown` (Redis lost the
/// tombstone) and lost answers prove nothing either way; the Postgres audit still sees any
/// second charge.
async fn resettle(conn: &mut Conn, seen: &mut Seen, idx: usize, body: Bytes) {
    match call(conn, "/v1/settle", body).await {
        Answer::Ok(r) if r.settled && r.duplicate => seen.count("resettle_duplicate"),
        Answer::Ok(r) => seen.violation(format!(
            "key #{idx}: a repeated settle answered settled={} duplicate={}",
            r.settled, r.duplicate
        )),
        _ => seen.count("resettle_inconclusive"),
    }
}
