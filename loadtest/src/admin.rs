//! Talking to tollgate's admin API: creating the harness's keys, reading them back.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::json;
use tollgate::money::Money;

use crate::http::{Conn, Endpoint};

/// What the harness asks a key to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// A high rate limit that is never reached: the rate log is kept, as for a real key.
    Normal,
    /// A small rate limit that the load exceeds: most of its requests are `rate_limited`.
    Limited,
    /// Standalone, with a balance; admitted with a reserve and charged on settle.
    Standalone,
    /// A token limit that the load exceeds; admitted with `reserve_tokens`, settled within it.
    Tokens,
    /// A daily spend budget that the load exhausts; admitted with a reserve, charged within it.
    Budget,
    /// Used only by the Redis ceiling phase.
    Ceiling,
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub class: Class,
    pub rate_limit: Option<u64>,
    pub concurrent_limit: Option<u64>,
    pub balance: Option<Money>,
    pub token_limit: Option<u64>,
    pub budget: Option<Money>,
}

#[derive(Debug, Clone)]
pub struct Key {
    pub id: String,
    pub secret: String,
    pub spec: Spec,
}

/// The fields of the contract's `ApiKey` the harness checks.
#[derive(Debug, Deserialize)]
pub struct ApiKey {
    pub id: String,
    pub balance_used_usd: Money,
    pub remaining_balance_usd: Option<Money>,
}

#[derive(Debug, Deserialize)]
struct Created {
    key: String,
    api_key: ApiKey,
}

#[derive(Debug, Deserialize)]
pub struct Stats {
    pub total_requests: u64,
    pub total_cost_usd: Money,
}

pub fn limit_json(v: Option<u64>) -> serde_json::Value {
    v.map_or(serde_json::Value::Null, |n| json!(n))
}

/// Creates one key.
pub async fn create(conn: &mut Conn, user: &str, name: &str, spec: &Spec) -> Result<Key, String> {
    let mut body = json!({
        "user_id": user,
        "name": name,
        "rate_limit": limit_json(spec.rate_limit),
        "concurrent_limit": limit_json(spec.concurrent_limit),
    });
    if let Some(t) = spec.token_limit {
        body["token_limit"] = json!(t);
    }
    if let Some(b) = spec.budget {
        body["budget_usd"] = json!(b);
        body["budget_period"] = json!("day");
    }
    if spec.class == Class::Standalone {
        body["is_standalone"] = json!(true);
        if let Some(b) = spec.balance {
            body["initial_balance_usd"] = json!(b);
        }
    }
    let (status, bytes) = conn
        .post_json("/admin/keys", &body)
        .await
        .map_err(|e| format!("POST /admin/keys: {e}"))?;
    if status.as_u16() != 201 {
        return Err(format!(
            "POST /admin/keys answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        ));
    }
    let c: Created = serde_json::from_slice(&bytes)
        .map_err(|e| format!("POST /admin/keys: unexpected body ({e})"))?;
    Ok(Key {
        id: c.api_key.id,
        secret: c.key,
        spec: spec.clone(),
    })
}

/// Creates many keys over `parallel` connections, keeping the order of `specs`.
pub async fn create_many(
    admin: &Endpoint,
    token: &str,
    user: &str,
    specs: Vec<Spec>,
    parallel: usize,
) -> Result<Vec<Key>, String> {
    let specs = Arc::new(specs);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel.max(1) {
        let (specs, next, admin, token, user) = (
            specs.clone(),
            next.clone(),
            admin.clone(),
            token.to_string(),
            user.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(admin, Some(&token));
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(spec) = specs.get(i) else { break };
                let name = format!("loadtest {user} {i}");
                out.push((i, create(&mut conn, &user, &name, spec).await?));
            }
            Ok::<_, String>(out)
        }));
    }
    let mut all = Vec::with_capacity(specs.len());
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, k)| k).collect())
}

pub async fn get_key(conn: &mut Conn, id: &str) -> Result<ApiKey, String> {
    let (status, bytes) = conn
        .get(&format!("/admin/keys/{id}"))
        .await
        .map_err(|e| format!("GET /admin/keys/{id}: {e}"))?;
    if !status.is_success() {
        return Err(format!("GET /admin/keys/{id} answered {status}"));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("GET /admin/keys/{id}: {e}"))
}

pub async fn stats(conn: &mut Conn, id: &str) -> Result<Stats, String> {
    let (status, bytes) = conn
        .get(&format!("/admin/keys/{id}/stats"))
        .await
        .map_err(|e| format!("GET /admin/keys/{id}/stats: {e}"))?;
    if !status.is_success() {
        return Err(format!("GET /admin/keys/{id}/stats answered {status}"));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("GET /admin/keys/{id}/stats: {e}"))
}

/// Soft-deletes keys (`--cleanup`), so a long-lived tollgate does not keep admitting them.
pub async fn delete_many(
    admin: &Endpoint,
    token: &str,
    ids: Vec<String>,
    parallel: usize,
) -> usize {
    let ids = Arc::new(ids);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel.max(1) {
        let (ids, next, admin, token) =
            (ids.clone(), next.clone(), admin.clone(), token.to_string());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(admin, Some(&token));
            let mut done = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else { break };
                let path = format!("/admin/keys/{id}");
                if let Ok((s, _)) = conn.send(hyper::Method::DELETE, &path, None).await {
                    if s.is_success() {
                        done += 1;
                    }
                }
            }
            done
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap_or(0);
    }
    done
}
