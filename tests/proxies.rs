//! End to end through real reverse proxies configured from `deploy/`: a client talks to nginx
//! or Caddy, the proxy asks tollgate, and only admitted requests reach the upstream, which
//! learns who was admitted from the `X-Tollgate-*` headers.

mod common;

use common::proxies::{Proxy, Upstream};
use common::*;
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Nginx,
    Caddy,
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

/// A client request through the proxy: an LLM call with a JSON body, trying to forge the
/// identity headers the upstream trusts.
async fn call(proxy: &Proxy, path: &str, key: Option<&str>) -> Reply {
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
    let body = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
    Reply {
        status,
        headers,
        body,
    }
}

fn header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

async fn scenario(kind: Kind) {
    let app = spawn_app().await;
    let upstream = Upstream::start().await;
    let proxy = match kind {
        Kind::Nginx => Proxy::nginx(app.data_addr, upstream.addr).await,
        Kind::Caddy => Proxy::caddy(app.data_addr, upstream.addr).await,
    };
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
        r.body,
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
    // The lease the upstream got is the real one: settling it works once.
    let (st, body) = app.settle(&lease, 0.001).await;
    assert_eq!(
        (st, body["duplicate"].clone()),
        (200, json!(false)),
        "{body}"
    );

    let r = call(&proxy, "/v1/chat/completions", Some(&good)).await;
    assert_eq!(r.status, 200, "{kind:?} second: {}", r.body);

    // Over the rate limit: 429 with Retry-After in whole seconds.
    let r = call(&proxy, "/v1/chat/completions", Some(&good)).await;
    assert_eq!(r.status, 429, "{kind:?} rate limited: {}", r.body);
    assert_eq!(r.body["code"], "rate_limited", "{}", r.body);
    let retry: u64 = header(&r, "retry-after")
        .unwrap_or_else(|| panic!("{kind:?}: no Retry-After: {:?}", r.headers))
        .parse()
        .expect("Retry-After is whole seconds");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");

    let r = call(&proxy, "/v1/chat/completions", Some(&broke)).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (402, Some("balance_exhausted")),
        "{kind:?} {}",
        r.body
    );

    let r = call(&proxy, "/v1/chat/completions", None).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (401, Some("key_missing")),
        "{kind:?} {}",
        r.body
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
        r.body
    );

    let r = call(&proxy, "/v1/chat/completions", Some(&off)).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (403, Some("key_disabled")),
        "{kind:?} {}",
        r.body
    );

    // The proxy hands tollgate the original path, so path inference decides the API format.
    let r = call(&proxy, "/v1/messages", Some(&anthropic_only)).await;
    assert_eq!(
        r.status, 200,
        "{kind:?} anthropic on /v1/messages: {}",
        r.body
    );
    let r = call(&proxy, "/v1/chat/completions", Some(&anthropic_only)).await;
    assert_eq!(
        (r.status, r.body["code"].as_str()),
        (403, Some("api_format_not_allowed")),
        "{kind:?} {}",
        r.body
    );

    // A key without a rate limit has no RateLimit fields: the upstream gets none, not an
    // empty or placeholder value.
    let (unlimited, unlimited_key) = app
        .create_key(json!({"user_id": "u-unl", "rate_limit": null}))
        .await;
    let r = call(&proxy, "/v1/embeddings", Some(&unlimited)).await;
    assert_eq!(r.status, 200, "{kind:?} unlimited: {}", r.body);
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
    let to_nowhere = match kind {
        Kind::Nginx => Proxy::nginx(app.data_addr, dead).await,
        Kind::Caddy => Proxy::caddy(app.data_addr, dead).await,
    };
    let r = call(&to_nowhere, "/v1/embeddings", Some(&unlimited)).await;
    assert_eq!(r.status, 502, "{kind:?} upstream down: {}", r.body);
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
        r.body,
        r.headers
    );
    assert!(
        header(&r, "retry-after").is_some(),
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
