//! Invariant checks over what the clients observed.
//!
//! The client never sees the instant at which Redis decided: only that it lies between the
//! moment the request was sent and the moment the answer arrived. Every check here therefore
//! reasons with those intervals, on the harness's one monotonic clock, and only reports a
//! failure that is *proven* whatever the true instants inside the intervals were. A check can
//! miss a violation whose evidence is blurred by latency, but it never reports a false one.
//! The intervals on loopback are tens of microseconds to a few milliseconds wide against a
//! window of seconds, so the blur is small.
//!
//! Redis stamps rate-log entries in whole milliseconds (`TIME` truncated), which is one more
//! millisecond of slack, accounted for explicitly below.

use std::collections::HashMap;

/// Nanoseconds since the harness started.
pub type Nanos = u64;

const MS: Nanos = 1_000_000;

/// One admission the server granted.
#[derive(Debug, Clone, Copy)]
pub struct Granted {
    pub key: u32,
    /// When the admit request was sent and when its answer arrived.
    pub sent: Nanos,
    pub recv: Nanos,
    /// When the first settle/release of this lease was sent: the lease was certainly live
    /// until then. `None` when the harness never tried to end it.
    pub end_sent: Option<Nanos>,
    /// When the server confirmed the end; `None` when it never did (the lease may still be
    /// live, until its TTL).
    pub end_recv: Option<Nanos>,
}

/// An admit request that was denied with a rate or concurrency code, or whose outcome is
/// unknown (transport error or timeout: the server may have admitted it).
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    pub key: u32,
    pub sent: Nanos,
    pub recv: Nanos,
}

/// A proven violation, described for the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Violation {
    pub check: &'static str,
    pub key: u32,
    pub detail: String,
}

/// Per key, its grants sorted by send time.
pub fn by_key(grants: &[Granted]) -> HashMap<u32, Vec<Granted>> {
    let mut m: HashMap<u32, Vec<Granted>> = HashMap::new();
    for g in grants {
        m.entry(g.key).or_default().push(*g);
    }
    for v in m.values_mut() {
        v.sort_by_key(|g| g.sent);
    }
    m
}

/// No key was admitted more than `limit` times in any window of `window` (sliding).
///
/// Proof of a violation: `limit + 1` grants all of whose intervals fit in a span shorter than
/// `window − 1 ms`. Then whichever of them Redis ran last saw the other `limit` in its log
/// (their millisecond stamps are all within the window of its own) and still admitted.
/// Candidates are `limit + 1` grants consecutive in send order, which on loopback are also
/// the tightest groups.
pub fn rate_window(grants: &[Granted], limit: u64, window: Nanos) -> Option<String> {
    let l = usize::try_from(limit).unwrap_or(usize::MAX);
    if grants.len() <= l || window <= MS {
        return None;
    }
    let span_max = window - MS;
    // Sliding maximum of `recv` over groups of l+1 consecutive grants.
    let mut dq: std::collections::VecDeque<usize> = std::collections::VecDeque::new();
    for (j, g) in grants.iter().enumerate() {
        while dq.back().is_some_and(|&b| grants[b].recv <= g.recv) {
            dq.pop_back();
        }
        dq.push_back(j);
        if j < l {
            continue;
        }
        let i = j - l;
        while dq.front().is_some_and(|&f| f < i) {
            dq.pop_front();
        }
        let max_recv = dq.front().map_or(g.recv, |&f| grants[f].recv);
        let span = max_recv.saturating_sub(grants[i].sent);
        if span < span_max {
            return Some(format!(
                "{} admissions within {:.3} ms (limit {limit} per {:.3} s)",
                l + 1,
                span as f64 / MS as f64,
                window as f64 / 1e9
            ));
        }
    }
    None
}

/// One settlement of a key with a token limit: when it was sent and confirmed, and its tokens.
#[derive(Debug, Clone, Copy)]
pub struct TokenSettle {
    pub key: u32,
    pub sent: Nanos,
    pub recv: Nanos,
    pub tokens: u64,
}

/// No key's settled tokens in any window of `window` exceeded `limit`, for keys whose every
/// settlement stayed within its admission's `reserve_tokens` (which the harness ensures): the
/// admission counted the reservation, so the settlement can only shrink what it held.
///
/// Proof of a violation: settlements all of whose intervals fit in a span shorter than
/// `window − 1 ms` (so Redis stamped them all within one window, whatever the true instants)
/// whose tokens add up to more than `limit`. Candidates are runs consecutive in send order.
pub fn token_window(settles: &[TokenSettle], limit: u64, window: Nanos) -> Option<String> {
    if window <= MS {
        return None;
    }
    let span_max = window - MS;
    for i in 0..settles.len() {
        let (mut sum, mut max_recv) = (0u64, 0);
        for s in &settles[i..] {
            max_recv = max_recv.max(s.recv);
            if max_recv.saturating_sub(settles[i].sent) >= span_max {
                break;
            }
            sum += s.tokens;
            if sum > limit {
                return Some(format!(
                    "{sum} tokens settled within {:.3} ms (limit {limit} per {:.3} s)",
                    max_recv.saturating_sub(settles[i].sent) as f64 / MS as f64,
                    window as f64 / 1e9
                ));
            }
        }
    }
    None
}

/// Every `rate_limited` denial was deserved: at its instant the key had `limit` admissions
/// in the window.
///
/// Proof of an undeserved one: fewer than `limit` grants (or unknown outcomes, which may have
/// been grants) could possibly have been in the window at any instant of the denial's
/// interval. A grant j can be in the window of a denial at t ∈ [s, r] only if it ran no later
/// than t (stamp ≤ t, so sent before r + 1 ms) and its stamp is newer than t − window (so it
/// arrived after s − window − 1 ms).
pub fn rate_denials(
    grants: &[Granted],
    unknown: &[Attempt],
    denials: &[Attempt],
    limit: u64,
    window: Nanos,
) -> Option<String> {
    let mut times: Vec<(Nanos, Nanos)> = grants.iter().map(|g| (g.sent, g.recv)).collect();
    times.extend(unknown.iter().map(|a| (a.sent, a.recv)));
    times.sort_unstable();
    for d in denials {
        let lo = d.sent.saturating_sub(window + MS);
        let hi = d.recv + MS;
        let possible = times
            .iter()
            .take_while(|(s, _)| *s < hi)
            .filter(|(_, r)| *r > lo)
            .count() as u64;
        if possible < limit {
            return Some(format!(
                "rate_limited while at most {possible} of {limit} admissions could be in the window"
            ));
        }
    }
    None
}

/// No key ever had more than `limit` live leases.
///
/// A lease was certainly live from the arrival of its grant to the sending of its first
/// settle/release. More than `limit` such intervals sharing an instant prove a violation.
pub fn concurrency(grants: &[Granted], limit: u64) -> Option<String> {
    let mut events: Vec<(Nanos, i8)> = Vec::with_capacity(grants.len() * 2);
    for g in grants {
        let Some(end) = g.end_sent else { continue };
        if end > g.recv {
            events.push((g.recv, 1));
            events.push((end, -1));
        }
    }
    // At equal instants ends go first: only strictly overlapping intervals count.
    events.sort_unstable();
    let mut live: i64 = 0;
    for (t, d) in events {
        live += i64::from(d);
        if live > i64::try_from(limit).unwrap_or(i64::MAX) {
            return Some(format!(
                "{live} leases certainly live at once at t={:.3} ms (limit {limit})",
                t as f64 / MS as f64
            ));
        }
    }
    None
}

/// Every `concurrency_limited` denial was deserved: `limit` leases could have been live.
///
/// A lease could be live at the denial's instant t ∈ [s, r] if its admission may have run
/// before t (sent before r) and its end may have run after t (confirmed after s, or never
/// confirmed). Unknown admit outcomes count as leases that may still be live.
pub fn concurrency_denials(
    grants: &[Granted],
    unknown: &[Attempt],
    denials: &[Attempt],
    limit: u64,
) -> Option<String> {
    for d in denials {
        let from_grants = grants
            .iter()
            .filter(|g| g.sent < d.recv && g.end_recv.is_none_or(|e| e > d.sent))
            .count();
        let from_unknown = unknown.iter().filter(|a| a.sent < d.recv).count();
        let possible = (from_grants + from_unknown) as u64;
        if possible < limit {
            return Some(format!(
                "concurrency_limited while at most {possible} of {limit} leases could be live"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(sent_ms: f64, recv_ms: f64) -> Granted {
        Granted {
            key: 0,
            sent: (sent_ms * MS as f64) as u64,
            recv: (recv_ms * MS as f64) as u64,
            end_sent: None,
            end_recv: None,
        }
    }

    fn lease(admit_recv_ms: u64, end_ms: u64) -> Granted {
        Granted {
            key: 0,
            sent: admit_recv_ms * MS - MS / 2,
            recv: admit_recv_ms * MS,
            end_sent: Some(end_ms * MS),
            end_recv: Some(end_ms * MS + MS / 2),
        }
    }

    fn a(sent_ms: u64, recv_ms: u64) -> Attempt {
        Attempt {
            key: 0,
            sent: sent_ms * MS,
            recv: recv_ms * MS,
        }
    }

    const W: Nanos = 1_000 * MS;

    fn ts(sent_ms: u64, recv_ms: u64, tokens: u64) -> TokenSettle {
        TokenSettle {
            key: 0,
            sent: sent_ms * MS,
            recv: recv_ms * MS,
            tokens,
        }
    }

    #[test]
    fn token_window_sums_only_settlements_certainly_in_one_window() {
        let w = 1000 * MS;
        let ok = [ts(0, 1, 400), ts(10, 11, 400), ts(1500, 1501, 400)];
        assert_eq!(token_window(&ok, 1000, w), None);
        let over = [ts(0, 1, 400), ts(10, 11, 400), ts(900, 901, 400)];
        assert!(token_window(&over, 1000, w).is_some());
        // The third could have landed a window after the first: no proof.
        let blurred = [ts(0, 1, 400), ts(10, 11, 400), ts(900, 1001, 400)];
        assert_eq!(token_window(&blurred, 1000, w), None);
    }

    #[test]
    fn rate_window_accepts_limit_per_window_and_spaced_bursts() {
        // 3 per second, then 3 more a full window later.
        let grants: Vec<_> = [0.0, 1.0, 2.0, 1001.5, 1002.0, 1003.0]
            .iter()
            .map(|&t| g(t, t + 0.2))
            .collect();
        assert_eq!(rate_window(&grants, 3, W), None);
    }

    #[test]
    fn rate_window_catches_one_too_many() {
        let grants: Vec<_> = [0.0, 100.0, 200.0, 900.0]
            .iter()
            .map(|&t| g(t, t + 0.2))
            .collect();
        let v = rate_window(&grants, 3, W).expect("4 admissions in 900 ms exceed 3 per second");
        assert!(v.contains("4 admissions"), "{v}");
    }

    #[test]
    fn rate_window_gives_slow_answers_the_benefit_of_the_doubt() {
        // The fourth grant's answer arrived more than a window after the first was sent: the
        // server may have run it after the first left the window.
        let grants = vec![g(0.0, 0.2), g(1.0, 1.2), g(2.0, 2.2), g(3.0, 1000.0)];
        assert_eq!(rate_window(&grants, 3, W), None);
    }

    #[test]
    fn rate_denials_flags_a_denial_with_an_empty_window() {
        let grants = vec![g(0.0, 0.2), g(1.0, 1.2)];
        // Limit 3: two grants, then a denial long after both left the window.
        let late = vec![a(2_000, 2_001)];
        assert!(rate_denials(&grants, &[], &late, 3, W).is_some());
        // A third possible admission (unknown outcome) makes the denial plausible.
        assert!(rate_denials(&grants, &[a(1, 2)], &[a(10, 11)], 3, W).is_none());
        // Too few grants even early on: undeserved.
        assert!(rate_denials(&grants, &[], &[a(10, 11)], 3, W).is_some());
    }

    #[test]
    fn concurrency_counts_only_certain_overlaps() {
        let ok = vec![lease(1, 10), lease(2, 10), lease(10, 20)];
        assert_eq!(concurrency(&ok, 2), None);
        let bad = vec![lease(1, 10), lease(2, 10), lease(3, 10)];
        assert!(concurrency(&bad, 2).is_some());
    }

    #[test]
    fn concurrency_denials_need_enough_possible_leases() {
        let grants = vec![lease(1, 10), lease(2, 10)];
        assert!(concurrency_denials(&grants, &[], &[a(5, 6)], 2).is_none());
        assert!(concurrency_denials(&grants, &[], &[a(50, 51)], 2).is_some());
    }
}
