//! End-of-run checks: the interval invariants over what the clients saw, then balances in
//! Redis (through tollgate's own answers) and in Postgres once the syncer has caught up.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use tollgate::money::Money;

use crate::admin::{self, Class, Key};
use crate::check;
use crate::http::{Conn, Endpoint};
use crate::load::{self, Outcome};

#[derive(Debug, Clone, Serialize)]
pub struct Invariant {
    pub name: String,
    pub ok: bool,
    /// What was checked, e.g. "50 keys, 1234 admissions".
    pub scope: String,
    pub failures: Vec<String>,
}

impl Invariant {
    pub fn new(name: &str, scope: String, failures: Vec<String>) -> Invariant {
        Invariant {
            name: name.to_string(),
            ok: failures.is_empty(),
            scope,
            failures: failures.into_iter().take(20).collect(),
        }
    }
}

/// The interval checks of [`check`], per key, plus what the workers flagged on the way.
///
/// `one_day`: the run stayed within one UTC day, so daily budgets never turned during it.
pub fn local(keys: &[Key], out: &Outcome, window_ns: u64, one_day: bool) -> Vec<Invariant> {
    let grants = check::by_key(&out.grants);
    let group = |v: &[check::Attempt]| {
        let mut m: HashMap<u32, Vec<check::Attempt>> = HashMap::new();
        for a in v {
            m.entry(a.key).or_default().push(*a);
        }
        m
    };
    let (rate_d, conc_d, unknown) = (
        group(&out.rate_denials),
        group(&out.conc_denials),
        group(&out.unknown),
    );
    let empty_g = Vec::new();
    let empty_a = Vec::new();
    let (mut rate_f, mut rate_den_f, mut conc_f, mut conc_den_f) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut rate_keys, mut rate_grants) = (0usize, 0usize);
    for (i, k) in keys.iter().enumerate() {
        let kid = i as u32;
        let g = grants.get(&kid).unwrap_or(&empty_g);
        let u = unknown.get(&kid).unwrap_or(&empty_a);
        if let Some(limit) = k.spec.rate_limit {
            rate_keys += 1;
            rate_grants += g.len();
            if let Some(f) = check::rate_window(g, limit, window_ns) {
                rate_f.push(format!("key #{i}: {f}"));
            }
            let d = rate_d.get(&kid).unwrap_or(&empty_a);
            if let Some(f) = check::rate_denials(g, u, d, limit, window_ns) {
                rate_den_f.push(format!("key #{i}: {f}"));
            }
        }
        if let Some(limit) = k.spec.concurrent_limit {
            if let Some(f) = check::concurrency(g, limit) {
                conc_f.push(format!("key #{i}: {f}"));
            }
            let d = conc_d.get(&kid).unwrap_or(&empty_a);
            if let Some(f) = check::concurrency_denials(g, u, d, limit) {
                conc_den_f.push(format!("key #{i}: {f}"));
            }
        }
    }
    // Token and budget keys: the scripts' windows and periods, checked from the outside.
    let mut settles: HashMap<u32, Vec<check::TokenSettle>> = HashMap::new();
    for s in &out.token_settles {
        settles.entry(s.key).or_default().push(*s);
    }
    let (mut token_f, mut token_keys, mut budget_f, mut budget_keys) =
        (Vec::new(), 0usize, Vec::new(), 0usize);
    for (i, k) in keys.iter().enumerate() {
        let kid = i as u32;
        if let Some(limit) = k.spec.token_limit {
            token_keys += 1;
            let mut v = settles.remove(&kid).unwrap_or_default();
            v.sort_by_key(|s| s.sent);
            if let Some(f) = check::token_window(&v, limit, window_ns) {
                token_f.push(format!("key #{i}: {f}"));
            }
        }
        if let (Some(budget), true) = (k.spec.budget, one_day) {
            budget_keys += 1;
            // Confirmed charges only: a lower bound of the spend, so a failure is proven.
            let spent = out.cost.get(&kid).map_or(0, |c| c.0);
            if spent > budget.nanos() {
                budget_f.push(format!(
                    "key #{i}: {} charged against a budget of {budget}",
                    Money::from_nanos(spent)
                ));
            }
        }
    }
    let mut flagged: HashMap<&'static str, Vec<String>> = HashMap::new();
    for v in &out.violations {
        flagged
            .entry(v.check)
            .or_default()
            .push(format!("key #{}: {}", v.key, v.detail));
    }
    let mut inv = vec![
        Invariant::new(
            "rate_limit_never_exceeded",
            format!(
                "{rate_keys} keys, {rate_grants} admissions, every window of {:.3} s",
                window_ns as f64 / 1e9
            ),
            rate_f,
        ),
        Invariant::new(
            "rate_denials_deserved",
            format!("{} rate_limited denials", out.rate_denials.len()),
            rate_den_f,
        ),
        Invariant::new(
            "concurrency_limit_never_exceeded",
            format!("{} leases", out.grants.len()),
            conc_f,
        ),
        Invariant::new(
            "concurrency_denials_deserved",
            format!("{} concurrency_limited denials", out.conc_denials.len()),
            conc_den_f,
        ),
        Invariant::new(
            "token_limit_never_exceeded",
            format!(
                "{token_keys} keys, {} settlements within their reservations, every window",
                out.token_settles.len()
            ),
            token_f,
        ),
        Invariant::new(
            "budget_never_overspent",
            if one_day {
                format!("{budget_keys} keys with a daily budget, charges within their holds")
            } else {
                "skipped: the run crossed a UTC midnight, daily budgets turned".to_string()
            },
            budget_f,
        ),
    ];
    for name in [
        "denials_match_configuration",
        "invalid_keys_denied",
        "reported_limits",
        "granted_leases_settle",
        "granted_leases_release",
        "first_settle_charges",
        "duplicate_settle_detected",
        "release_answers",
    ] {
        let scope = match name {
            "duplicate_settle_detected" => format!("{} repeated settlements", out.resettles),
            "granted_leases_settle" | "first_settle_charges" => {
                format!("{} settlements", out.settles)
            }
            "granted_leases_release" | "release_answers" => format!("{} releases", out.releases),
            _ => format!("{} admissions", out.admits),
        };
        inv.push(Invariant::new(
            name,
            scope,
            flagged.remove(name).unwrap_or_default(),
        ));
    }
    inv
}

#[derive(Debug, Deserialize)]
struct ProbeReply {
    allowed: bool,
    lease_id: Option<String>,
    code: Option<String>,
    balance_remaining_usd: Option<Money>,
}

/// Redis's view of each standalone key's balance, read through tollgate: one admission
/// without a reserve reports what remains (no other lease is live now), then is released.
/// `balance_exhausted` means nothing remains.
pub async fn redis_balances(
    data: &Endpoint,
    keys: &[Key],
    cost: &HashMap<u32, (i64, u64)>,
    uncertain: &HashSet<u32>,
) -> Invariant {
    let mut conn = Conn::new(data.clone(), None);
    let mut failures = Vec::new();
    let mut checked = 0;
    for (i, k) in keys.iter().enumerate() {
        let kid = i as u32;
        if k.spec.class != Class::Standalone || uncertain.contains(&kid) {
            continue;
        }
        let Some(initial) = k.spec.balance else {
            continue;
        };
        let spent = cost.get(&kid).map_or(0, |c| c.0);
        let expected = initial.nanos() - spent;
        if expected < 0 {
            failures.push(format!(
                "key #{i}: settled {} against a balance of {initial}: overspent",
                Money::from_nanos(spent)
            ));
            continue;
        }
        let body = load::admit_body(&k.secret, Money::ZERO, 0);
        let reply = match conn
            .send(hyper::Method::POST, "/v1/admit", Some(body))
            .await
        {
            Ok((_, b)) => serde_json::from_slice::<ProbeReply>(&b).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        checked += 1;
        match reply {
            Ok(r) if r.allowed => {
                let got = r.balance_remaining_usd.map(Money::nanos);
                if got != Some(expected) {
                    failures.push(format!(
                        "key #{i}: Redis says {} remain, expected {} (initial {initial} − settled {})",
                        got.map_or("nothing".to_string(), |n| Money::from_nanos(n).to_string()),
                        Money::from_nanos(expected),
                        Money::from_nanos(spent)
                    ));
                }
                if let Some(lease) = r.lease_id {
                    let _ = conn
                        .post_json("/v1/release", &serde_json::json!({ "lease_id": lease }))
                        .await;
                }
            }
            Ok(r) if r.code.as_deref() == Some("balance_exhausted") => {
                if expected != 0 {
                    failures.push(format!(
                        "key #{i}: balance_exhausted, expected {} to remain",
                        Money::from_nanos(expected)
                    ));
                }
            }
            Ok(r) => failures.push(format!("key #{i}: probe denied with {:?}", r.code)),
            Err(e) => failures.push(format!("key #{i}: probe failed: {e}")),
        }
    }
    Invariant::new(
        "balances_exact_in_redis",
        format!(
            "{checked} standalone keys, balance_remaining_usd = initial − settled costs{}",
            skipped(uncertain)
        ),
        failures,
    )
}

fn skipped(uncertain: &HashSet<u32>) -> String {
    if uncertain.is_empty() {
        String::new()
    } else {
        format!(
            "; {} keys skipped (a settlement's outcome is unknown)",
            uncertain.len()
        )
    }
}

/// Postgres's view, once the syncer has moved every event: each key's `balance_used_usd`
/// is the sum of its settled costs, standalone keys' `remaining_balance_usd` is initial minus
/// that, and the key's usage stats count every settlement once.
pub async fn postgres(
    admin: &Endpoint,
    token: &str,
    keys: &[Key],
    cost: &HashMap<u32, (i64, u64)>,
    uncertain: &HashSet<u32>,
    timeout: Duration,
    name: &str,
) -> (Invariant, Duration) {
    let started = Instant::now();
    let mut pending: Vec<usize> = (0..keys.len())
        .filter(|i| !uncertain.contains(&(*i as u32)))
        .collect();
    let checked = pending.len();
    let mut failures = Vec::new();
    let mut conns: Vec<Conn> = (0..8)
        .map(|_| Conn::new(admin.clone(), Some(token)))
        .collect();
    let expected = |i: usize| cost.get(&(i as u32)).copied().unwrap_or((0, 0));
    // Wait for balance_used to reach the expected sum on every key.
    loop {
        let mut still = Vec::new();
        for chunk in pending.chunks(conns.len()) {
            let futs = chunk.iter().zip(conns.iter_mut()).map(|(&i, c)| {
                let id = keys[i].id.clone();
                async move { (i, admin::get_key(c, &id).await) }
            });
            for (i, r) in join_all(futs).await {
                match r {
                    Ok(k) if k.balance_used_usd.nanos() == expected(i).0 => {
                        if let Some(initial) = keys[i].spec.balance {
                            let want = Money::from_nanos((initial.nanos() - expected(i).0).max(0));
                            if k.remaining_balance_usd != Some(want) {
                                failures.push(format!(
                                    "key #{i} ({}): remaining_balance_usd {}, expected {want}",
                                    k.id,
                                    k.remaining_balance_usd
                                        .map_or("null".to_string(), |m| m.to_string())
                                ));
                            }
                        }
                    }
                    Ok(k) if k.balance_used_usd.nanos() > expected(i).0 => failures.push(format!(
                        "key #{i} ({}): balance_used_usd {} exceeds the settled {}: charged twice",
                        k.id,
                        k.balance_used_usd,
                        Money::from_nanos(expected(i).0)
                    )),
                    Ok(_) => still.push(i),
                    Err(e) => failures.push(format!("key #{i}: {e}")),
                }
            }
        }
        pending = still;
        if pending.is_empty() || started.elapsed() > timeout {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let synced_after = started.elapsed();
    for &i in &pending {
        failures.push(format!(
            "key #{i} ({}): balance_used_usd did not reach {} within {timeout:?}",
            keys[i].id,
            Money::from_nanos(expected(i).0)
        ));
    }
    // Usage rows: every settlement exactly once.
    let ready: Vec<usize> = (0..keys.len())
        .filter(|i| !uncertain.contains(&(*i as u32)) && !pending.contains(i))
        .collect();
    for chunk in ready.chunks(conns.len()) {
        let futs = chunk.iter().zip(conns.iter_mut()).map(|(&i, c)| {
            let id = keys[i].id.clone();
            async move { (i, admin::stats(c, &id).await) }
        });
        for (i, r) in join_all(futs).await {
            let (c, n) = expected(i);
            match r {
                Ok(s) if s.total_requests == n && s.total_cost_usd.nanos() == c => {}
                Ok(s) => failures.push(format!(
                    "key #{i}: stats {} requests / {} USD, expected {n} / {}",
                    s.total_requests,
                    s.total_cost_usd,
                    Money::from_nanos(c)
                )),
                Err(e) => failures.push(format!("key #{i}: {e}")),
            }
        }
    }
    (
        Invariant::new(
            name,
            format!(
                "{checked} keys: balance_used_usd, remaining_balance_usd and stats after the sync{}",
                skipped(uncertain)
            ),
            failures,
        ),
        synced_after,
    )
}
