//! End to end through real reverse proxies configured from `deploy/`: a client talks to nginx
//! or Caddy, the proxy asks tollgate, and only admitted requests reach the upstream, which
//! learns who was admitted from the `X-Tollgate-*` headers. The proxies report the end of each
//! request to tollgate's access-log receiver, which settles or releases its lease.

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::proxies::{Proxy, Upstream};
use common::*;
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Nginx,
    Caddy,
}

/// A client request through the proxy: an LLM call with a JSON body, trying to forge the
/// identity headers the upstream trusts.
async fn call(proxy: &Proxy, path: &str, key: Option<&str>) -> Answer {
    let mut req = reqwest::Client::new()
        .post(format!("{}{path}", proxy.url))
        .header("content-type", "application/json")
        .header("x-tollgate-key-id", "forged-key-id")
        .header("x-tollgate-lease-id", "forged-lease-id")
        .body(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let res = req.send().await.unwrap_or_else(|e| {
        panic!(
            "{} request failed: {e}\nproxy log:\n{}",
            proxy.name,
            proxy.log()
        )
    });
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let text = res.text().await.expect("proxy body");
    Answer::new(format!("POST {path}"), status, headers, text)
}

/// A tollgate with its access-log receiver on.
async fn spawn_reporting_app() -> TestApp {
    spawn_app_with(|s| {
        s.insert("TOLLGATE_ACCESS_LOG_LISTEN", "127.0.0.1:0".into());
    })
    .await
}

async fn start_proxy(kind: Kind, app: &TestApp, upstream: SocketAddr) -> Proxy {
    let reports = app.access_log.expect("the access-log receiver is on");
    match kind {
        Kind::Nginx => Proxy::nginx(app.data_addr, upstream, reports).await,
        Kind::Caddy => Proxy::caddy(app.data_addr, upstream, reports).await,
    }
}

async fn scenario(kind: Kind) {
    let app = spawn_reporting_app().await;
    let upstream = Upstream::start().await;
    let proxy = start_proxy(kind, &app, upstream.addr).await;
    let (good, good_key) = app
        .create_key(json!({"user_id": "u-proxy", "rate_limit": 2, "concurrent_limit": null}))
        .await;
    let (broke, _) = app
        .create_key(json!({"user_id": "u-broke", "is_standalone": true, "initial_balance_usd": 0}))
        .await;
    let (off, off_key) = app.create_key(json!({"user_id": "u-off"})).await;
    let res = app
        .admin_delete(&format!("/admin/keys/{}", off_key["id"].as_str().unwrap()))
        .await;
    assert_eq!(res.status(), 200, "disable key");
    let (anthropic_only, _) = app
        .create_key(json!({"user_id": "u-anth", "allowed_api_formats": ["anthropic:messages"]}))
        .await;

    // Admitted: the upstream gets the request, its body, and tollgate's identity headers,
    // never the client's forged ones.
    let r = call(&proxy, "/v1/chat/completions", Some(&good)).await;
    assert_eq!(
        r.status,
        200,
        "{kind:?} admitted: {}\n{}",
        r.text,
        proxy.log()
    );
    assert_eq!(r.body, json!({"upstream": "ok"}));
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "{kind:?}: one request upstream");
    let s = &seen[0];
    assert_eq!(s.method, "POST");
    assert_eq!(s.uri, "/v1/chat/completions");
    assert_eq!(
        &s.body[..],
        br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#,
        "{kind:?}: the body reaches the upstream intact"
    );
    assert_eq!(
        s.header("x-tollgate-key-id"),
        good_key["id"].as_str(),
        "{kind:?}: {:?}",
        s.headers
    );
    assert_eq!(s.header("x-tollgate-user-id"), Some("u-proxy"));
    assert_eq!(
        s.header("ratelimit-policy"),
        Some(r#""default";q=2;w=60"#),
        "{:?}",
        s.headers
    );
    let lease = s
        .header("x-tollgate-lease-id")
        .expect("lease id upstream")
        .to_string();
    assert!(
        !lease.contains("forged"),
        "{kind:?}: forged lease id passed: {lease}"
    );
    // The lease the upstream got is the real one, and the proxy's access log settled it: once
    // the usage is recorded, settling it again is a duplicate (a forged id would be unknown).
    let good_id = good_key["id"].as_str().expect("id").to_string();
    let recorded = within(Duration::from_secs(2), || async {
        total_requests(&app, &good_id).await == 1
    })
    .await;
    assert!(
        recorded.is_some(),
        "{kind:?}: the proxy's record was not settled"
    );
    let (st, body) = app.settle(&lease, "0.001").await;
    assert_eq!(
        (st, body["duplicate"].clone()),
        (200, json!(true)),
        "{body}"
    );

    let r = call(&proxy, "/v1/chat/completions", Some(&good)).await;
    assert_eq!(r.status, 200, "{kind:?} second: {}", r.text);

    // Over the rate limit: 429 with Retry-After in whole seconds.
    let r = call(&proxy, "/v1/chat/completions", Some(&good)).await;
    assert_eq!(r.status, 429, "{kind:?} rate limited: {}", r.text);
    assert_eq!(r.body["code"], "rate_limited", "{}", r.text);
    let retry: u64 = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("{kind:?}: no Retry-After: {:?}", r.headers))
        .parse()
        .expect("Retry-After is whole seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");

    let r = call(&proxy, "/v1/chat/completions", Some(&broke)).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (402, Some("balance_exhausted")),
        "{kind:?} {}",
        r.text
    );

    let r = call(&proxy, "/v1/chat/completions", None).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (401, Some("key_missing")),
        "{kind:?} {}",
        r.text
    );

    let r = call(
        &proxy,
        "/v1/chat/completions",
        Some("sk-NoSuchKey0000000000000000000000"),
    )
    .await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (401, Some("key_invalid")),
        "{kind:?} {}",
        r.text
    );

    let r = call(&proxy, "/v1/chat/completions", Some(&off)).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (403, Some("key_disabled")),
        "{kind:?} {}",
        r.text
    );

    // The proxy hands tollgate the original path, so path inference decides the API format.
    let r = call(&proxy, "/v1/messages", Some(&anthropic_only)).await;
    assert_eq!(
        r.status, 200,
        "{kind:?} anthropic on /v1/messages: {}",
        r.text
    );
    let r = call(&proxy, "/v1/chat/completions", Some(&anthropic_only)).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (403, Some("api_format_not_allowed")),
        "{kind:?} {}",
        r.text
    );

    // A key without a rate limit has no RateLimit fields: the upstream gets none, not an
    // empty or placeholder value.
    let (unlimited, unlimited_key) = app
        .create_key(json!({"user_id": "u-unl", "rate_limit": null}))
        .await;
    let r = call(&proxy, "/v1/embeddings", Some(&unlimited)).await;
    assert_eq!(r.status, 200, "{kind:?} unlimited: {}", r.text);
    let seen = upstream.seen();
    let s = seen.last().expect("seen");
    assert_eq!(s.header("x-tollgate-key-id"), unlimited_key["id"].as_str());
    assert_eq!(
        (s.header("ratelimit"), s.header("ratelimit-policy")),
        (None, None),
        "{kind:?}: {:?}",
        s.headers
    );

    // Denied requests never reached the upstream.
    let uris: Vec<String> = upstream.seen().iter().map(|s| s.uri.clone()).collect();
    assert_eq!(
        uris,
        [
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/messages",
            "/v1/embeddings"
        ],
        "{kind:?}: only admitted requests go upstream"
    );

    // The upstream unreachable after admission is the proxy's own bad gateway, not a denial.
    let dead: std::net::SocketAddr = ([127, 0, 0, 1], common::proxies::free_port()).into();
    let to_nowhere = start_proxy(kind, &app, dead).await;
    let r = call(&to_nowhere, "/v1/embeddings", Some(&unlimited)).await;
    assert_eq!(r.status, 502, "{kind:?} upstream down: {}", r.text);
    assert_ne!(r.body["code"].as_str(), Some("unavailable"), "{kind:?}");
    drop(to_nowhere);

    // Tollgate unreachable: the proxy fails closed with 503 `unavailable`.
    let mut app = app;
    app.stop().await;
    let r = call(&proxy, "/v1/chat/completions", Some(&good)).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (503, Some("unavailable")),
        "{kind:?} tollgate down: {} {:?}",
        r.text,
        r.headers
    );
    assert!(
        r.header("retry-after").is_some(),
        "{kind:?}: {:?}",
        r.headers
    );
    assert_eq!(
        upstream.seen().len(),
        4,
        "{kind:?}: nothing more went upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_admits_and_denies_with_the_real_status() {
    scenario(Kind::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_admits_and_denies_with_the_real_status() {
    scenario(Kind::Caddy).await;
}

/// Polls `probe` every 20 ms until it returns true or `bound` passes; returns the time taken.
async fn within<F, Fut>(bound: Duration, mut probe: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() <= bound {
        if probe().await {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn total_requests(app: &TestApp, key_id: &str) -> u64 {
    let res = app.admin_get(&format!("/admin/keys/{key_id}/stats")).await;
    assert_eq!(res.status(), 200, "stats");
    let v: Value = res.json().await.expect("stats json");
    v["total_requests"].as_u64().expect("total_requests")
}

async fn used_nanos_in_postgres(app: &TestApp, key_id: &str) -> i64 {
    let id: uuid::Uuid = key_id.parse().expect("key id is a uuid");
    sqlx::query_scalar("SELECT balance_used_nanos FROM api_keys WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .expect("key row")
}

/// Leases of `key` live right now, as a lease-less admission reports them.
async fn in_flight(app: &TestApp, key: &str) -> u64 {
    let (status, body) = app.admit(key, json!({"lease": "none"})).await;
    assert_eq!(status, 200, "lease-less admission: {body}");
    assert_eq!(body["lease_id"], Value::Null, "{body}");
    body["concurrency"]["in_flight"]
        .as_u64()
        .expect("in_flight")
}

/// The loop a proxy user gets from the deploy configs: every admitted request ends its lease
/// through the access log, is recorded once, and is charged what the upstream said it cost.
async fn loop_scenario(kind: Kind) {
    let app = spawn_reporting_app().await;
    let upstream = Upstream::start().await;
    let proxy = start_proxy(kind, &app, upstream.addr).await;

    // 30 sequential requests with 2 slots: each lease ends with its request.
    let (key, api_key) = app
        .create_key(json!({"user_id": "u-loop", "rate_limit": null, "concurrent_limit": 2}))
        .await;
    let key_id = api_key["id"].as_str().expect("id").to_string();
    for i in 0..30 {
        let r = call(&proxy, "/v1/chat/completions", Some(&key)).await;
        assert_eq!(
            r.status,
            200,
            "{kind:?} request {i}: {}\n{}",
            r.text,
            proxy.log()
        );
    }
    let took = within(Duration::from_secs(2), || async {
        total_requests(&app, &key_id).await == 30
    })
    .await;
    assert!(
        took.is_some(),
        "{kind:?}: stats has {} of 30 requests after 2 s",
        total_requests(&app, &key_id).await
    );

    // An upstream failure releases the lease: nothing charged, nothing recorded, slot free.
    let (prepaid, prepaid_key) = app
        .create_key(json!({"user_id": "u-prepaid", "is_standalone": true,
            "initial_balance_usd": 1.0, "rate_limit": null, "concurrent_limit": 1}))
        .await;
    let prepaid_id = prepaid_key["id"].as_str().expect("id").to_string();
    upstream.answer_with(502, &[("x-litellm-response-cost", "0.5")]);
    let r = call(&proxy, "/v1/chat/completions", Some(&prepaid)).await;
    assert_eq!(
        r.status, 502,
        "{kind:?}: the upstream's 502 reaches the client"
    );
    let freed = within(Duration::from_secs(1), || async {
        in_flight(&app, &prepaid).await == 0
    })
    .await;
    assert!(
        freed.is_some(),
        "{kind:?}: the 502's lease was not released"
    );

    // An answered request is charged exactly the upstream's cost header.
    upstream.answer_with(200, &[("x-litellm-response-cost", "0.012345678")]);
    let r = call(&proxy, "/v1/chat/completions", Some(&prepaid)).await;
    assert_eq!(r.status, 200, "{kind:?}: {}", r.text);
    let charged = within(Duration::from_secs(2), || async {
        total_requests(&app, &prepaid_id).await == 1
    })
    .await;
    assert!(
        charged.is_some(),
        "{kind:?}: the charged request is not in stats"
    );
    assert_eq!(
        used_nanos_in_postgres(&app, &prepaid_id).await,
        12_345_678,
        "{kind:?}: exactly the cost header, and nothing for the 502"
    );
    let key_json: Value = app
        .admin_get(&format!("/admin/keys/{prepaid_id}"))
        .await
        .json()
        .await
        .expect("key json");
    assert_eq!(
        key_json["remaining_balance_usd"],
        json!(0.987654322),
        "{kind:?}: {key_json}"
    );

    // 20 parallel requests with 5 slots while the upstream holds them: exactly 15 refused.
    let (busy, _) = app
        .create_key(json!({"user_id": "u-busy", "rate_limit": null, "concurrent_limit": 5}))
        .await;
    upstream.answer_with(200, &[]);
    upstream.hold();
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let (url, busy) = (proxy.url.clone(), busy.clone());
            tokio::spawn(async move {
                // A client naming its own lease term does not escape the limit: the deploy
                // configs drop these headers before asking tollgate.
                let res = reqwest::Client::new()
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(&busy)
                    .header("x-tollgate-lease", "none")
                    .header("x-tollgate-lease-ttl", "1")
                    .header("content-type", "application/json")
                    .body(r#"{"model":"gpt-4o"}"#)
                    .send()
                    .await
                    .expect("parallel request");
                let retry = res
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let status = res.status().as_u16();
                let body: Value = res.json().await.unwrap_or(Value::Null);
                (status, body["code"].as_str().map(str::to_string), retry)
            })
        })
        .collect();
    let held = within(Duration::from_secs(10), || async {
        upstream.waiting() == 5
    })
    .await;
    assert!(
        held.is_some(),
        "{kind:?}: {} held upstream",
        upstream.waiting()
    );
    // The 15 refusals come back while the 5 are held; then the 5 are let go.
    tokio::time::sleep(Duration::from_millis(300)).await;
    upstream.let_go();
    let mut refused = 0;
    for c in calls {
        let (status, code, retry) = c.await.expect("request task");
        match status {
            200 => {}
            429 => {
                assert_eq!(code.as_deref(), Some("concurrency_limited"), "{kind:?}");
                assert_eq!(retry.as_deref(), Some("1"), "{kind:?}: Retry-After");
                refused += 1;
            }
            other => panic!("{kind:?}: unexpected {other} {code:?}"),
        }
    }
    let last_answer = Instant::now();
    assert_eq!(refused, 15, "{kind:?}: refused");
    let freed = within(Duration::from_secs(1), || async {
        in_flight(&app, &busy).await == 0
    })
    .await;
    assert!(
        freed.is_some(),
        "{kind:?}: slots still taken {:?} after the last answer",
        last_answer.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_ends_every_lease_with_its_request_through_the_access_log() {
    loop_scenario(Kind::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_ends_every_lease_with_its_request_through_the_access_log() {
    loop_scenario(Kind::Caddy).await;
}
