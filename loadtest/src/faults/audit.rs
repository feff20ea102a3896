//! The fault run's audit: every lease's fate against the usage rows in Postgres, each missing
//! event attributed to the Redis loss that could have taken it or counted as unexplained,
//! balances in Postgres and Redis, and the limit checks of `check.rs` on the stretches of
//! the run that no Redis loss cut through.

use std::collections::{HashMap, HashSet};

use crate::admin::Key;
use crate::check::{self, Granted, Nanos};
use crate::faults::traffic::{End, Seen};
use crate::verify::Invariant;

/// One Redis loss, on the harness's clock.
#[derive(Debug, Clone, Copy)]
pub struct Loss {
    /// Which fault of the schedule caused it.
    pub fault: usize,
    /// When the harness last saw every usage stream empty before the kill (the request's
    /// send time): every event written before then had been committed to Postgres.
    pub last_empty: Nanos,
    /// Before the SIGKILL was sent, and once the process was reaped.
    pub kill_sent: Nanos,
    pub kill_done: Nanos,
    /// When the new, empty Redis answered PING.
    pub back: Nanos,
}

impl Loss {
    /// Could this loss have taken an event written somewhere in `[sent, recv]`? Only if it was
    /// written after the streams were last seen empty, and before the old Redis died.
    fn could_take(&self, sent: Nanos, recv: Nanos) -> bool {
        recv > self.last_empty && sent < self.kill_done
    }

    /// Could this loss have forgotten a lease admitted at `admit_sent` and unknown at `recv`?
    fn could_forget(&self, admit_sent: Nanos, recv: Nanos) -> bool {
        admit_sent < self.kill_done && self.kill_sent < recv
    }
}

/// What Postgres holds once the streams are drained.
pub struct PgView {
    /// event_id → (key id, cost in nano-USD).
    pub events: HashMap<String, (String, i64)>,
    /// key id → balance_used_nanos.
    pub used: HashMap<String, i64>,
    /// key id → (requests, cost) summed over usage_daily.
    pub daily: HashMap<String, (i64, i64)>,
}

pub struct Audit {
    pub invariants: Vec<Invariant>,
    /// Per fault index: events lost and their cost.
    pub attributed: HashMap<usize, (u64, i64)>,
    /// Per fault index: leases Redis forgot before their end was sent.
    pub forgotten: HashMap<usize, u64>,
    pub fates: Vec<(&'static str, u64)>,
    pub events_checked: usize,
    pub unexplained: Vec<String>,
    pub unexplained_count: usize,
    pub windows: String,
}

impl Audit {
    fn unexplained(&mut self, what: String) {
        self.unexplained_count += 1;
        if self.unexplained.len() < 50 {
            self.unexplained.push(what);
        }
    }
}

/// `window` is the rate window and `ttl` the lease lifetime, in nanoseconds.
pub fn run(
    seen: &Seen,
    losses: &[Loss],
    keys: &[Key],
    pg: &PgView,
    window: Nanos,
    ttl: Nanos,
) -> Audit {
    let mut a = Audit {
        invariants: Vec::new(),
        attributed: HashMap::new(),
        forgotten: HashMap::new(),
        fates: Vec::new(),
        events_checked: pg.events.len(),
        unexplained: Vec::new(),
        unexplained_count: 0,
        windows: String::new(),
    };
    ledger(&mut a, seen, losses, keys, pg);
    balances(&mut a, keys, pg);
    limits(&mut a, seen, losses, keys, (window, ttl));
    a
}

/// The usage event id of a lease: its id's first two parts, `<sid>.<nonce>` (the rest is the
/// sealed body, which Postgres does not keep).
fn event_id(lease_id: &str) -> &str {
    match lease_id.match_indices('.').nth(1) {
        Some((at, _)) => &lease_id[..at],
        None => lease_id,
    }
}

/// Every settled lease recorded once with its cost, nothing recorded for a released or
/// forgotten one, no event nobody settled; what is missing must fit a Redis loss.
fn ledger(a: &mut Audit, seen: &Seen, losses: &[Loss], keys: &[Key], pg: &PgView) {
    let mut fates: HashMap<&'static str, u64> = HashMap::new();
    let mut ours: HashSet<&str> = HashSet::with_capacity(seen.leases.len());
    for l in &seen.leases {
        let event = event_id(&l.id);
        ours.insert(event);
        let key_id = keys.get(l.key as usize).map_or("", |k| k.id.as_str());
        let row = pg.events.get(event);
        let wrong_key = row.is_some_and(|(k, _)| k != key_id);
        if wrong_key {
            a.unexplained(format!("lease {}: its event names another key", l.id));
        }
        let fate = match l.end {
            End::Settled { cost, sent, recv } => match row {
                Some((_, c)) if same_cost(a, &l.id, cost, *c) => "settled, recorded once",
                Some(_) => "settled, recorded with another cost",
                None => match losses.iter().find(|x| x.could_take(sent, recv)) {
                    Some(x) => {
                        let e = a.attributed.entry(x.fault).or_default();
                        e.0 += 1;
                        e.1 += cost;
                        "settled, lost with Redis"
                    }
                    None => {
                        a.unexplained(format!(
                            "lease {}: settled at {:.3} s, no event in Postgres, no Redis loss could take it",
                            l.id,
                            recv as f64 / 1e9
                        ));
                        "settled, missing"
                    }
                },
            },
            End::SettleUnknown { cost } => match row {
                Some((_, c)) if same_cost(a, &l.id, cost, *c) => "settle unconfirmed, recorded",
                Some(_) => "settle unconfirmed, recorded with another cost",
                None => "settle unconfirmed, not recorded",
            },
            End::Released | End::ReleaseUnknown | End::Lost { .. } | End::Refused => {
                if row.is_some() {
                    a.unexplained(format!(
                        "lease {}: recorded in Postgres although it ended as {:?}",
                        l.id, l.end
                    ));
                }
                match l.end {
                    End::Released => "released, nothing recorded",
                    End::ReleaseUnknown => "release unconfirmed, nothing recorded",
                    End::Lost { recv } => {
                        match losses.iter().find(|x| x.could_forget(l.admit_sent, recv)) {
                            Some(x) => {
                                *a.forgotten.entry(x.fault).or_default() += 1;
                                "forgotten by a Redis loss, nothing recorded"
                            }
                            None => {
                                a.unexplained(format!(
                                    "lease {}: lease_unknown at {:.3} s without a Redis loss since its admission",
                                    l.id,
                                    recv as f64 / 1e9
                                ));
                                "lease_unknown, unexplained"
                            }
                        }
                    }
                    _ => "refused (a violation)",
                }
            }
        };
        *fates.entry(fate).or_default() += 1;
    }
    for (id, (key, _)) in &pg.events {
        if !ours.contains(id.as_str()) {
            a.unexplained(format!(
                "event {id} of key {key}: no lease of the run settled it"
            ));
        }
    }
    let mut v: Vec<_> = fates.into_iter().collect();
    v.sort();
    a.fates = v;
}

/// A recorded event must carry the cost its settle sent; a different one is unexplained.
fn same_cost(a: &mut Audit, lease: &str, sent: i64, recorded: i64) -> bool {
    if sent != recorded {
        a.unexplained(format!(
            "lease {lease}: settled {sent} nano-USD, recorded {recorded}"
        ));
    }
    sent == recorded
}

/// Postgres agrees with itself: each key's balance_used and its daily roll-up equal the sum
/// of its usage rows.
fn balances(a: &mut Audit, keys: &[Key], pg: &PgView) {
    let mut sums: HashMap<&str, (i64, i64)> = HashMap::new();
    for (key, cost) in pg.events.values() {
        let e = sums.entry(key.as_str()).or_default();
        e.0 += 1;
        e.1 += cost;
    }
    let mut failures = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let (n, cost) = sums.get(k.id.as_str()).copied().unwrap_or((0, 0));
        let used = pg.used.get(&k.id).copied().unwrap_or(0);
        if used != cost {
            failures.push(format!(
                "key #{i}: balance_used_nanos {used}, its usage rows add up to {cost}"
            ));
        }
        let daily = pg.daily.get(&k.id).copied().unwrap_or((0, 0));
        if daily != (n, cost) {
            failures.push(format!(
                "key #{i}: usage_daily {} requests / {} nano-USD, usage rows {n} / {cost}",
                daily.0, daily.1
            ));
        }
    }
    for f in &failures {
        a.unexplained(f.clone());
    }
    a.invariants.push(Invariant::new(
        "balances_exact_in_postgres",
        format!(
            "{} keys: balance_used and usage_daily = Σ usage rows",
            keys.len()
        ),
        failures,
    ));
}

/// Splits the run at each Redis loss: a window that spans one is not judged, because the
/// new Redis starts with empty windows and no live leases.
fn limits(
    a: &mut Audit,
    seen: &Seen,
    losses: &[Loss],
    keys: &[Key],
    (window, ttl): (Nanos, Nanos),
) {
    // Stretches [from, to) of the run during which one Redis lived.
    let mut cuts: Vec<(Nanos, Nanos)> = losses.iter().map(|l| (l.kill_sent, l.back)).collect();
    cuts.sort_unstable();
    let mut stretches = Vec::new();
    let mut from = 0;
    for (kill, back) in &cuts {
        stretches.push((from, *kill));
        from = *back;
    }
    stretches.push((from, Nanos::MAX));
    let grants = check::by_key(&seen.grants);
    // Per key: its rate denials, its concurrency denials, its admissions of unknown outcome.
    let mut attempts: HashMap<u32, [Vec<check::Attempt>; 3]> = HashMap::new();
    let lists = [&seen.rate_denials, &seen.conc_denials, &seen.unknown];
    for (slot, list) in lists.into_iter().enumerate() {
        for x in list {
            attempts.entry(x.key).or_default()[slot].push(*x);
        }
    }
    let (mut rate_f, mut rate_den_f, mut conc_f, mut conc_den_f) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut judged, mut straddling) = (0usize, 0usize);
    let none_g = Vec::new();
    let none_a: [Vec<check::Attempt>; 3] = Default::default();
    for (i, k) in keys.iter().enumerate() {
        let kid = i as u32;
        let g = grants.get(&kid).unwrap_or(&none_g);
        let [rate_d, conc_d, u] = attempts.get(&kid).unwrap_or(&none_a);
        for &(lo, hi) in &stretches {
            // Grants decided by this Redis; a lease's certain life ends at the loss, or at
            // its TTL, at the latest.
            let part: Vec<Granted> = g
                .iter()
                .filter(|x| x.sent >= lo && x.recv < hi)
                .map(|x| Granted {
                    end_sent: x
                        .end_sent
                        .map(|e| e.min(hi).min(x.recv.saturating_add(ttl))),
                    ..*x
                })
                .collect();
            judged += part.len();
            if let Some(limit) = k.spec.rate_limit {
                if let Some(f) = check::rate_window(&part, limit, window) {
                    rate_f.push(format!("key #{i}: {f}"));
                }
            }
            if let Some(limit) = k.spec.concurrent_limit {
                if let Some(f) = check::concurrency(&part, limit) {
                    conc_f.push(format!("key #{i}: {f}"));
                }
            }
        }
        straddling += g
            .iter()
            .filter(|x| {
                !stretches
                    .iter()
                    .any(|&(lo, hi)| x.sent >= lo && x.recv < hi)
            })
            .count();
        // Denials: every grant and unknown outcome of the whole run counts as possibly in
        // the window or live, a superset of what the Redis that denied could hold, so an
        // undeserved denial is still proven.
        if let Some(limit) = k.spec.rate_limit {
            if let Some(f) = check::rate_denials(g, u, rate_d, limit, window) {
                rate_den_f.push(format!("key #{i}: {f}"));
            }
        }
        if let Some(limit) = k.spec.concurrent_limit {
            if let Some(f) = check::concurrency_denials(g, u, conc_d, limit) {
                conc_den_f.push(format!("key #{i}: {f}"));
            }
        }
    }
    a.windows = format!(
        "{} stretches between Redis losses; {judged} grants judged, {straddling} straddling a loss not judged",
        stretches.len()
    );
    for (name, scope, f) in [
        ("rate_limit_never_exceeded", a.windows.clone(), rate_f),
        (
            "rate_denials_deserved",
            format!("{} rate_limited denials", seen.rate_denials.len()),
            rate_den_f,
        ),
        (
            "concurrency_limit_never_exceeded",
            a.windows.clone(),
            conc_f,
        ),
        (
            "concurrency_denials_deserved",
            format!("{} concurrency_limited denials", seen.conc_denials.len()),
            conc_den_f,
        ),
    ] {
        for x in &f {
            a.unexplained(format!("{name}: {x}"));
        }
        a.invariants.push(Invariant::new(name, scope, f));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{Class, Spec};
    use crate::faults::traffic::Lease;

    const S: Nanos = 1_000_000_000;

    fn key() -> Key {
        Key {
            id: "k0".into(),
            secret: String::new(),
            spec: Spec {
                class: Class::Normal,
                rate_limit: None,
                concurrent_limit: None,
                balance: None,
                token_limit: None,
                budget: None,
            },
        }
    }

    #[test]
    fn a_sealed_lease_id_is_found_by_its_event_id() {
        assert_eq!(event_id("0f.nonce.sealedbody"), "0f.nonce");
        assert_eq!(event_id("0f.nonce"), "0f.nonce");
    }

    fn lease(id: &str, end: End) -> Lease {
        Lease {
            key: 0,
            id: id.into(),
            admit_sent: 0,
            end,
        }
    }

    fn settled(cost: i64, at: Nanos) -> End {
        End::Settled {
            cost,
            sent: at,
            recv: at + 1000,
        }
    }

    /// Postgres holding `events`, with balance and roll-up consistent with them.
    fn pg(events: &[(&str, i64)]) -> PgView {
        let total: i64 = events.iter().map(|e| e.1).sum();
        PgView {
            events: events
                .iter()
                .map(|(id, c)| (id.to_string(), ("k0".to_string(), *c)))
                .collect(),
            used: [("k0".to_string(), total)].into_iter().collect(),
            daily: [("k0".to_string(), (events.len() as i64, total))]
                .into_iter()
                .collect(),
        }
    }

    fn audit(leases: Vec<Lease>, losses: &[Loss], pg: &PgView) -> Audit {
        let seen = Seen {
            leases,
            ..Seen::default()
        };
        run(&seen, losses, &[key()], pg, 2 * S, 10 * S)
    }

    /// Redis was last seen drained at 10 s and killed at 20 s.
    const LOSS: Loss = Loss {
        fault: 3,
        last_empty: 10 * S,
        kill_sent: 20 * S,
        kill_done: 20 * S + 5,
        back: 21 * S,
    };

    #[test]
    fn a_missing_event_is_attributed_only_to_a_loss_that_could_take_it() {
        let leases = vec![lease("a", settled(7, S)), lease("b", settled(5, 15 * S))];
        let db = pg(&[("a", 7)]);
        let a = audit(leases.clone(), &[LOSS], &db);
        assert_eq!(a.unexplained_count, 0, "{:?}", a.unexplained);
        assert_eq!(a.attributed.get(&3), Some(&(1, 5)));
        // Without the loss, or settled before Redis was last seen drained: unexplained.
        assert_eq!(audit(leases.clone(), &[], &db).unexplained_count, 1);
        let early = vec![lease("a", settled(7, S)), lease("b", settled(5, 5 * S))];
        assert_eq!(audit(early, &[LOSS], &db).unexplained_count, 1);
        // Settled after the kill: the new Redis had it, nothing could lose it.
        let late = vec![lease("a", settled(7, S)), lease("b", settled(5, 30 * S))];
        assert_eq!(audit(late, &[LOSS], &db).unexplained_count, 1);
    }

    #[test]
    fn recorded_events_must_be_settled_once_at_their_cost() {
        // An event for a released lease, an event nobody settled, a wrong cost.
        let leases = vec![
            lease("r", End::Released),
            lease("s", settled(5, S)),
            lease("u", End::SettleUnknown { cost: 4 }),
        ];
        let a = audit(leases, &[], &pg(&[("r", 1), ("s", 6), ("x", 2), ("u", 4)]));
        assert_eq!(a.unexplained_count, 3, "{:?}", a.unexplained);
    }

    #[test]
    fn balances_must_equal_the_usage_rows() {
        let mut db = pg(&[("s", 5)]);
        db.used.insert("k0".into(), 10);
        let a = audit(vec![lease("s", settled(5, S))], &[], &db);
        assert_eq!(a.unexplained_count, 1, "{:?}", a.unexplained);
    }

    #[test]
    fn lease_unknown_needs_a_loss_between_admission_and_end() {
        let lost = vec![lease("l", End::Lost { recv: 25 * S })];
        assert_eq!(audit(lost.clone(), &[LOSS], &pg(&[])).unexplained_count, 0);
        assert_eq!(audit(lost, &[], &pg(&[])).unexplained_count, 1);
    }
}
