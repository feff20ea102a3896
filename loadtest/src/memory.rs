//! Redis memory per key, measured with `MEMORY USAGE … SAMPLES 0` on the keys tollgate itself
//! wrote: at rest, with a full rate window, with live leases, and after settlement.

use redis::aio::MultiplexedConnection;
use serde::Serialize;
use serde_json::json;
use tollgate::hot::layout::Layout;
use tollgate::money::Money;

use crate::admin::{self, Class, Spec};
use crate::http::{Conn, Endpoint};
use crate::load;
use crate::observe::memory_usage;

/// The window is filled with this many admissions (the key's rate limit).
pub const FULL: usize = 100;

#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub rate_limit: usize,
    /// State hash right after the key was created (pushed by the admin API).
    pub state_at_rest: u64,
    /// State hash after the admissions and settlements (counters written).
    pub state_after_use: u64,
    /// Rate log with `rate_limit` entries.
    pub rate_log_full: u64,
    /// Live-lease set with `rate_limit` live leases.
    pub live_set_full: u64,
    /// One live lease's record (mean over the leases).
    pub lease_record: u64,
    /// One settled lease's tombstone, kept 10 minutes to answer retries (mean).
    pub tombstone: u64,
    /// State + full rate log: a busy key between bursts.
    pub key_with_full_window: u64,
    /// State + full rate log + live set + one record per live lease.
    pub key_with_full_window_all_live: u64,
    /// The admission after the window filled was `rate_limited`, as it must be.
    pub next_admission_rate_limited: bool,
}

pub async fn measure(
    data: &Endpoint,
    admin_ep: &Endpoint,
    token: &str,
    run_id: &str,
    layout: &Layout,
    redis: &mut MultiplexedConnection,
) -> Result<(MemoryReport, Vec<String>), String> {
    let mut a = Conn::new(admin_ep.clone(), Some(token));
    let spec = Spec {
        class: Class::Normal,
        rate_limit: Some(FULL as u64),
        concurrent_limit: None,
        balance: None,
        token_limit: None,
        budget: None,
    };
    let key = admin::create(&mut a, run_id, &format!("loadtest {run_id} memory"), &spec).await?;
    let k = layout.for_hash(&tollgate::keys::hash(&key.secret));
    let state_at_rest = memory_usage(redis, &k.state).await?;

    let mut d = Conn::new(data.clone(), None);
    let body = load::admit_body(&key.secret, Money::ZERO, 0);
    let mut leases = Vec::with_capacity(FULL);
    for _ in 0..FULL {
        let (status, b) = d
            .send(hyper::Method::POST, "/v1/admit", Some(body.clone()))
            .await
            .map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_slice(&b).map_err(|e| e.to_string())?;
        let lease = v["lease_id"]
            .as_str()
            .filter(|_| status.is_success())
            .ok_or_else(|| format!("memory probe admission answered {status}: {v}"))?;
        leases.push(lease.to_string());
    }
    let (status, b) = d
        .send(hyper::Method::POST, "/v1/admit", Some(body.clone()))
        .await
        .map_err(|e| e.to_string())?;
    let next: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
    let next_admission_rate_limited =
        status.as_u16() == 429 && next["code"].as_str() == Some("rate_limited");

    let rate_log_full = memory_usage(redis, &k.rate).await?;
    let live_set_full = memory_usage(redis, &k.live).await?;
    let nonces: Vec<String> = leases
        .iter()
        .filter_map(|l| l.split('.').nth(1).map(str::to_string))
        .collect();
    let mut records = 0;
    for n in &nonces {
        records += memory_usage(redis, &k.lease(n)).await?;
    }
    for lease in &leases {
        let (s, b) = d
            .post_json("/v1/settle", &json!({"lease_id": lease, "cost_usd": 0.001}))
            .await
            .map_err(|e| e.to_string())?;
        if !s.is_success() {
            return Err(format!(
                "memory probe settle answered {s}: {}",
                String::from_utf8_lossy(&b)
            ));
        }
    }
    let state_after_use = memory_usage(redis, &k.state).await?;
    let mut tombstones = 0;
    for n in &nonces {
        tombstones += memory_usage(redis, &k.lease(n)).await?;
    }
    let n = FULL as u64;
    let lease_record = records / n;
    Ok((
        MemoryReport {
            rate_limit: FULL,
            state_at_rest,
            state_after_use,
            rate_log_full,
            live_set_full,
            lease_record,
            tombstone: tombstones / n,
            key_with_full_window: state_after_use + rate_log_full,
            key_with_full_window_all_live: state_after_use
                + rate_log_full
                + live_set_full
                + records,
            next_admission_rate_limited,
        },
        vec![key.id],
    ))
}
