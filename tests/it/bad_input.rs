//! Bad input never yields a 500 or a panic, and always the contract's JSON error shape:
//! malformed JSON, wrong types, negative, huge and non-finite numbers, oversized and empty
//! bodies, odd headers, bad ids, unknown paths and wrong methods, on both listeners. And no
//! answer ever echoes a plaintext key that was sent where it does not belong.

use crate::common;

use std::time::Duration;

use common::*;
use reqwest::header::{HeaderValue, CONTENT_TYPE};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

#[derive(Clone, Copy, PartialEq)]
enum Listener {
    Data,
    Admin,
}

use Listener::{Admin, Data};

struct Client<'a> {
    app: &'a TestApp,
}

impl Client<'_> {
    fn base(&self, on: Listener) -> &str {
        match on {
            Data => &self.app.data,
            Admin => &self.app.admin,
        }
    }

    async fn send(
        &self,
        on: Listener,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, HeaderValue)],
        token: bool,
    ) -> Answer {
        let what = format!(
            "{method} {path} body {}",
            body.as_deref()
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(80)]).into_owned())
                .unwrap_or_else(|| "none".into())
        );
        let mut req = self
            .app
            .http
            .request(method, format!("{}{path}", self.base(on)));
        if token {
            req = req.bearer_auth(ADMIN_TOKEN);
        }
        for (name, value) in headers {
            req = req.header(*name, value.clone());
        }
        if let Some(b) = body {
            req = req.header(CONTENT_TYPE, "application/json").body(b);
        }
        let res = req.send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap_or_default();
        Answer::new(what, status, headers, text)
    }

    async fn get(&self, on: Listener, path: &str) -> Answer {
        self.send(on, Method::GET, path, None, &[], on == Admin)
            .await
    }

    async fn post_raw(&self, on: Listener, method: Method, path: &str, body: &[u8]) -> Answer {
        self.send(on, method, path, Some(body.to_vec()), &[], on == Admin)
            .await
    }

    async fn post_json(&self, on: Listener, method: Method, path: &str, body: &Value) -> Answer {
        self.post_raw(on, method, path, body.to_string().as_bytes())
            .await
    }
}

/// Every endpoint that reads a JSON body: (listener, method, path).
#[rustfmt::skip]
fn json_endpoints(id: &str) -> Vec<(Listener, Method, String)> {
    vec![
        (Data, Method::POST, "/v1/admit".into()),
        (Data, Method::POST, "/v1/settle".into()),
        (Data, Method::POST, "/v1/release".into()),
        (Admin, Method::POST, "/admin/keys".into()),
        (Admin, Method::POST, "/admin/keys/lookup".into()),
        (Admin, Method::POST, "/admin/keys/cleanup-expired".into()),
        (Admin, Method::PATCH, format!("/admin/keys/{id}")),
        (Admin, Method::POST, format!("/admin/keys/{id}/balance")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_a_400_everywhere() {
    let app = spawn_app().await;
    let (_, id) = standalone_key_holding(&app, "1").await;
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let deep_obj = format!("{}1{}", "{\"a\":".repeat(5000), "}".repeat(5000));
    let bodies: Vec<Vec<u8>> = vec![
        b"{".to_vec(),
        b"}".to_vec(),
        b"{\"a\":}".to_vec(),
        b"{\"key\": \"sk-x\",}".to_vec(),
        b"[]".to_vec(),
        b"[1, 2]".to_vec(),
        b"\"a string\"".to_vec(),
        b"null".to_vec(),
        b"true".to_vec(),
        b"123".to_vec(),
        b"NaN".to_vec(),
        b"{\"x\": NaN}".to_vec(),
        b"{\"x\": Infinity}".to_vec(),
        b"{\"x\": -Infinity}".to_vec(),
        b"{\"x\": 1e99999}".to_vec(),
        b"\xff\xfe{}".to_vec(),
        b"\xef\xbb\xbf{}".to_vec(),
        b"{\"x\": \"\xff\"}".to_vec(),
        b"{\"x\": \"\\ud800\"}".to_vec(),
        b"{\"x\": \"\\q\"}".to_vec(),
        b"{} trailing".to_vec(),
        b"{}{}".to_vec(),
        b"{\"a\": 1, \"a\": 2}".to_vec(),
        b"\0".to_vec(),
        b"{\0}".to_vec(),
        deep.into_bytes(),
        deep_obj.into_bytes(),
        b"<xml/>".to_vec(),
        b"a=1&b=2".to_vec(),
    ];
    let c = Client { app: &app };
    for (on, method, path) in json_endpoints(&id) {
        for body in &bodies {
            let a = c.post_raw(on, method.clone(), &path, body).await;
            assert_eq!(a.status, 400, "{}: {}", a.what, a.text);
            a.assert_clean();
        }
    }
    assert_eq!(
        app.http
            .get(format!("{}/healthz", app.data))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_types_and_out_of_range_numbers_are_a_400() {
    let app = spawn_app().await;
    let (key, id) = standalone_key_holding(&app, "1").await;
    let c = Client { app: &app };
    let lease = |app: &TestApp, key: String| {
        let app_http = app.http.clone();
        let data = app.data.clone();
        async move {
            let v: Value = app_http
                .post(format!("{data}/v1/admit"))
                .json(&json!({ "key": key }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["lease_id"].as_str().expect("lease").to_string()
        }
    };
    let l = lease(&app, key.clone()).await;
    let huge = "1".repeat(400);
    let raw = |s: String| serde_json::from_str::<Value>(&s).expect("test JSON");
    #[rustfmt::skip]
    let cases: Vec<(Listener, Method, String, Value)> = vec![
        (Data, Method::POST, "/v1/admit".into(), json!({"key": 5})),
        (Data, Method::POST, "/v1/admit".into(), json!({"key": [key]})),
        (Data, Method::POST, "/v1/admit".into(), json!({"key": key, "reserve_usd": -1})),
        (Data, Method::POST, "/v1/admit".into(), json!({"key": key, "reserve_usd": "NaN"})),
        (Data, Method::POST, "/v1/admit".into(), json!({"key": key, "reserve_usd": "Infinity"})),
        (Data, Method::POST, "/v1/admit".into(), json!({"key": key, "reserve_usd": 1e-12})),
        (Data, Method::POST, "/v1/admit".into(), raw(format!("{{\"key\": \"{key}\", \"reserve_usd\": {huge}}}"))),
        (Data, Method::POST, "/v1/admit".into(), raw(format!("{{\"key\": \"{key}\", \"reserve_usd\": -{huge}}}"))),
        (Data, Method::POST, "/v1/admit".into(), json!({"key": key, "reserve_usd": 1e300})),
        (Data, Method::POST, "/v1/admit".into(), json!({"key": key, "model": ["a"]})),
        (Data, Method::POST, "/v1/admit".into(), json!({"key": key, "provider": {"a": 1}})),
        (Data, Method::POST, "/v1/admit".into(), json!({"key": key, "colour": "red"})),
        (Data, Method::POST, "/v1/settle".into(), json!({"cost_usd": 1})),
        // Since contract v1.1 `cost_usd` is optional (a settlement without it is priced from
        // its tokens), so `{"lease_id": l}` and `"cost_usd": null` are valid.
        (Data, Method::POST, "/v1/settle".into(), json!({"lease_id": l, "cost_usd": 0, "input_tokens": 1, "cached_input_tokens": 2})),
        (Data, Method::POST, "/v1/settle".into(), json!({"lease_id": l, "cached_input_tokens": -1})),
        (Data, Method::POST, "/v1/settle".into(), json!({"lease_id": 5, "cost_usd": 1})),
        (Data, Method::POST, "/v1/settle".into(), json!({"lease_id": l, "cost_usd": -1})),
        (Data, Method::POST, "/v1/settle".into(), json!({"lease_id": l, "cost_usd": "NaN"})),
        (Data, Method::POST, "/v1/settle".into(), json!({"lease_id": l, "cost_usd": "0.1"})),
        (Data, Method::POST, "/v1/admit".into(), json!({"key": key, "reserve_tokens": -1})),
        (Data, Method::POST, "/v1/settle".into(), raw(format!("{{\"lease_id\": \"{l}\", \"cost_usd\": {huge}}}"))),
        (Data, Method::POST, "/v1/settle".into(), json!({"lease_id": l, "cost_usd": 1e-10})),
        (Data, Method::POST, "/v1/settle".into(), json!({"lease_id": l, "cost_usd": 0, "input_tokens": -1})),
        (Data, Method::POST, "/v1/settle".into(), json!({"lease_id": l, "cost_usd": 0, "input_tokens": 1.5})),
        (Data, Method::POST, "/v1/settle".into(), json!({"lease_id": l, "cost_usd": 0, "input_tokens": 1e30})),
        (Data, Method::POST, "/v1/settle".into(), raw(format!("{{\"lease_id\": \"{l}\", \"cost_usd\": 0, \"output_tokens\": {huge}}}"))),
        (Data, Method::POST, "/v1/settle".into(), json!({"lease_id": l, "cost_usd": 0, "status_code": 70000})),
        (Data, Method::POST, "/v1/settle".into(), json!({"lease_id": l, "cost_usd": 0, "response_time_ms": -5})),
        (Data, Method::POST, "/v1/settle".into(), json!({"lease_id": l, "cost_usd": 0, "response_time_ms": "fast"})),
        (Data, Method::POST, "/v1/settle".into(), json!({"lease_id": l, "cost_usd": 0, "model": 4})),
        (Data, Method::POST, "/v1/release".into(), json!({})),
        (Data, Method::POST, "/v1/release".into(), json!({"lease_id": null})),
        (Data, Method::POST, "/v1/release".into(), json!({"lease_id": [l]})),
        (Admin, Method::POST, "/admin/keys".into(), raw(format!("{{\"user_id\": \"u\", \"rate_limit\": {huge}}}"))),
        (Admin, Method::POST, "/admin/keys".into(), json!({"user_id": "u", "rate_limit": 2147483648i64})),
        (Admin, Method::POST, "/admin/keys".into(), json!({"user_id": "u", "concurrent_limit": 1e300})),
        (Admin, Method::POST, "/admin/keys".into(), json!({"user_id": "u", "expire_days": i64::MAX})),
        (Admin, Method::POST, "/admin/keys".into(), json!({"user_id": "u", "expire_days": 1e10})),
        (Admin, Method::POST, "/admin/keys".into(), json!({"user_id": "u", "expire_days": "7"})),
        (Admin, Method::POST, "/admin/keys".into(), json!({"user_id": "u", "is_standalone": true, "initial_balance_usd": 1e30})),
        (Admin, Method::POST, "/admin/keys".into(), json!({"user_id": "u", "is_standalone": true, "initial_balance_usd": "Infinity"})),
        (Admin, Method::POST, "/admin/keys".into(), json!({"user_id": "u", "name": "n".repeat(10_000)})),
        (Admin, Method::POST, "/admin/keys".into(), json!({"user_id": "u", "allowed_models": vec!["m"; 5000]})),
        (Admin, Method::POST, "/admin/keys".into(), json!({"user_id": "u", "allowed_models": ["x".repeat(300)]})),
        (Admin, Method::POST, "/admin/keys".into(), json!({"user_id": "u\u{0}x"})),
        (Admin, Method::POST, "/admin/keys".into(), json!({"user_id": "u", "name": "a\u{0}b"})),
        (Admin, Method::POST, "/admin/keys".into(), json!({"user_id": "u", "allowed_models": ["a\u{0}b"]})),
        (Admin, Method::POST, "/admin/keys/lookup".into(), json!({"key": 5})),
        (Admin, Method::POST, "/admin/keys/lookup".into(), json!({"key": null})),
        (Admin, Method::POST, "/admin/keys/cleanup-expired".into(), json!({"auto_delete": 1})),
        (Admin, Method::PATCH, format!("/admin/keys/{id}"), json!({"expires_at": "+200000-01-01T00:00:00Z"})),
        (Admin, Method::PATCH, format!("/admin/keys/{id}"), json!({"expires_at": "300000-01-01T00:00:00Z"})),
        (Admin, Method::PATCH, format!("/admin/keys/{id}"), json!({"expires_at": "2026-13-01T00:00:00Z"})),
        (Admin, Method::PATCH, format!("/admin/keys/{id}"), json!({"expires_at": 1e300})),
        (Admin, Method::PATCH, format!("/admin/keys/{id}"), json!({"rate_limit": -1e300})),
        (Admin, Method::PATCH, format!("/admin/keys/{id}"), json!({"name": "a\u{0}b"})),
        (Admin, Method::PATCH, format!("/admin/keys/{id}"), json!({"allowed_providers": ["a\u{0}b"]})),
        (Admin, Method::POST, format!("/admin/keys/{id}/balance"), json!({"amount_usd": "NaN"})),
        (Admin, Method::POST, format!("/admin/keys/{id}/balance"), json!({"amount_usd": 1e30})),
        (Admin, Method::POST, format!("/admin/keys/{id}/balance"), json!({"amount_usd": -1e30})),
        (Admin, Method::POST, format!("/admin/keys/{id}/balance"), raw(format!("{{\"amount_usd\": -{huge}}}"))),
        (Admin, Method::POST, format!("/admin/keys/{id}/balance"), json!({"amount_usd": 9007199.254740992})),
    ];
    for (on, method, path, body) in cases {
        let a = c.post_json(on, method, &path, &body).await;
        assert_eq!(a.status, 400, "{}: {}", a.what, a.text);
        a.assert_clean();
    }
    // None of it changed the key or its balance.
    let (_, now) = {
        let res = app.admin_get(&format!("/admin/keys/{id}")).await;
        (res.status(), res.json::<Value>().await.unwrap())
    };
    assert_eq!(now["current_balance_usd"].to_string(), "1");
    assert_eq!(now["expires_at"], Value::Null);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(n, 1, "no bad create stored a key");
    let (status, body) = app.settle(&l, "0.25").await;
    assert_eq!(
        status, 200,
        "the lease survived the bad settlements: {body}"
    );
    assert_eq!(body["balance_remaining_usd"].to_string(), "0.75");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_strings_in_paths_and_queries_are_clean_errors() {
    let app = spawn_app().await;
    let (_, id) = new_key(&app, json!({"user_id": "u-1"})).await;
    let c = Client { app: &app };
    let long = "a".repeat(10_000);
    for bad_id in [
        "not-a-uuid",
        "%00",
        "%ff%fe",
        "..%2F..%2Fetc",
        &long,
        "12345678-1234-1234-1234-12345678901z",
    ] {
        for (method, suffix) in [
            (Method::GET, ""),
            (Method::PATCH, ""),
            (Method::DELETE, ""),
            (Method::GET, "/secret"),
            (Method::GET, "/stats"),
            (Method::POST, "/balance"),
        ] {
            let body = (method != Method::GET && method != Method::DELETE)
                .then(|| br#"{"name": "x", "amount_usd": 1}"#.to_vec());
            let path = format!("/admin/keys/{bad_id}{suffix}");
            let a = c.send(Admin, method, &path, body, &[], true).await;
            a.assert_clean();
            assert!(
                a.status == 404 || a.status == 400,
                "{}: {} {}",
                a.what,
                a.status,
                a.text
            );
        }
    }
    for q in [
        "start=yesterday",
        "start=%00",
        "start=%ff",
        "end=2026-01-01",
        "start=%2B200000-01-01T00:00:00Z",
        "start=0000-01-01T00:00:00Z&end=9999-12-31T23:59:59Z",
        "start=2026-01-01T00:00:00Z&start=2026-01-02T00:00:00Z",
        "unknown=1",
    ] {
        let a = c.get(Admin, &format!("/admin/keys/{id}/stats?{q}")).await;
        a.assert_clean();
    }
    for path in [
        "/admin/users/%00/keys",
        "/admin/users/%ff/keys",
        "/admin/users/u-1/keys?is_active=%00",
        "/admin/users/u-1/keys?is_active=true&is_active=false",
        "/admin/standalone-keys?is_active=",
    ] {
        let a = c.get(Admin, path).await;
        a.assert_clean();
        assert!(
            a.status != 200 || a.json()["keys"].is_array(),
            "{}: {}",
            a.what,
            a.text
        );
    }
    let a = c.get(Admin, &format!("/admin/users/{long}/keys")).await;
    a.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_one_mebibyte_are_a_413_and_empty_bodies_are_not_a_500() {
    let app = spawn_app().await;
    let (_, id) = standalone_key_holding(&app, "1").await;
    let c = Client { app: &app };
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(1024 * 1024 + 16)).into_bytes();
    let mut endpoints = json_endpoints(&id);
    endpoints.push((Data, Method::POST, "/auth".into()));
    endpoints.push((Data, Method::POST, "/auth/envoy/v1/chat/completions".into()));
    for (on, method, path) in &endpoints {
        let a = c.post_raw(*on, method.clone(), path, &big).await;
        a.assert_clean();
        if path.starts_with("/v1/") || path.starts_with("/admin/") {
            assert_eq!(a.status, 413, "{}: {}", a.what, a.text);
        }
        let a = c
            .send(
                *on,
                method.clone(),
                path,
                Some(Vec::new()),
                &[],
                *on == Admin,
            )
            .await;
        a.assert_clean();
        let a = c
            .send(*on, method.clone(), path, None, &[], *on == Admin)
            .await;
        a.assert_clean();
    }
    // Without a Content-Length: chunked, as a streaming client sends it.
    for (on, path) in [(Data, "/v1/admit"), (Admin, "/admin/keys")] {
        let (status, head, body) = raw_chunked(
            match on {
                Data => app.data_addr,
                Admin => app.admin_addr,
            },
            path,
            &big,
        )
        .await;
        assert_eq!(status, 413, "chunked {path}: {head}\n{body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
        assert!(v["code"].is_string(), "{v}");
    }
    // Exactly at the limit is still read (and judged: a 1 MiB model name is refused as such,
    // not as a body over the limit).
    let mut at_limit = br#"{"key": "sk-nope", "model": ""#.to_vec();
    at_limit.resize(1024 * 1024 - 2, b'x');
    at_limit.extend_from_slice(b"\"}");
    assert_eq!(at_limit.len(), 1024 * 1024);
    let a = c.post_raw(Data, Method::POST, "/v1/admit", &at_limit).await;
    a.assert_error(400, "bad_request");
    assert!(a.text.contains("model"), "{}", a.text);
}

/// Sends `body` chunked over a raw connection; returns (status, head, body).
async fn raw_chunked(addr: std::net::SocketAddr, path: &str, body: &[u8]) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("write head");
    for chunk in body.chunks(64 * 1024) {
        let frame = format!("{:x}\r\n", chunk.len());
        // The server may answer and close before the whole body is sent.
        if s.write_all(frame.as_bytes()).await.is_err()
            || s.write_all(chunk).await.is_err()
            || s.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    read_response(s).await
}

async fn read_response(mut s: tokio::net::TcpStream) -> (u16, String, String) {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, head.to_string(), body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A request written byte for byte, for header values no HTTP client would send.
async fn raw_request(addr: std::net::SocketAddr, head: &[u8]) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head).await.expect("write");
    read_response(s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_headers_are_clean_errors() {
    let app = spawn_app().await;
    let (key, _) = app.create_key(json!({"user_id": "u-1"})).await;
    let c = Client { app: &app };
    let non_utf8 = HeaderValue::from_bytes(b"Bearer sk-\xff\xfe\xfd").unwrap();
    let huge = HeaderValue::from_str(&format!("Bearer sk-{}", "A".repeat(64 * 1024))).unwrap();
    #[rustfmt::skip]
    let cases: Vec<(&str, HeaderValue)> = vec![
        ("authorization", non_utf8.clone()),
        ("authorization", huge.clone()),
        ("authorization", HeaderValue::from_static("Bearer")),
        ("authorization", HeaderValue::from_static("Bearer ")),
        ("authorization", HeaderValue::from_static("Bearer    ")),
        ("authorization", HeaderValue::from_static("Basic dXNlcjpwYXNz")),
        ("authorization", HeaderValue::from_static("sk-nope")),
        ("x-api-key", HeaderValue::from_bytes(b"\x80\x81").unwrap()),
        ("x-api-key", HeaderValue::from_static("")),
        ("api-key", HeaderValue::from_bytes(b"\xff").unwrap()),
        ("x-tollgate-model", HeaderValue::from_bytes(b"\xff").unwrap()),
        ("x-original-uri", HeaderValue::from_bytes(b"/v1/\xff").unwrap()),
        ("x-forwarded-uri", HeaderValue::from_static("not a path at all")),
        ("content-type", HeaderValue::from_bytes(b"application/\xff").unwrap()),
    ];
    for (name, value) in &cases {
        let hs = [(*name, value.clone())];
        for (method, path) in [
            (Method::POST, "/v1/admit"),
            (Method::GET, "/auth"),
            (Method::GET, "/auth/nginx"),
            (Method::POST, "/auth/envoy/v1/chat/completions"),
        ] {
            let body = (method == Method::POST).then(Vec::new);
            let a = c.send(Data, method, path, body, &hs, false).await;
            a.assert_clean();
            assert!(
                a.status == 401 || a.status == 403,
                "{name}: {}: {} {}",
                a.what,
                a.status,
                a.text
            );
        }
        if *name == "authorization" {
            let a = c
                .send(
                    Admin,
                    Method::GET,
                    "/admin/standalone-keys",
                    None,
                    &hs,
                    false,
                )
                .await;
            a.assert_error(401, "unauthorized");
        }
    }
    // The empty bearer with a good key elsewhere: the key still counts.
    let hs = [
        ("authorization", HeaderValue::from_static("Bearer ")),
        ("x-api-key", HeaderValue::from_str(&key).unwrap()),
    ];
    let a = c
        .send(
            Data,
            Method::POST,
            "/v1/admit",
            Some(Vec::new()),
            &hs,
            false,
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let a = c
        .send(
            Data,
            Method::POST,
            "/v1/admit",
            Some(Vec::new()),
            &[("authorization", HeaderValue::from_static("Bearer"))],
            false,
        )
        .await;
    a.assert_error(401, "key_missing");

    // Header bytes no client library would send: control characters, obs-text, no value.
    for (addr, path) in [
        (app.data_addr, "/v1/admit"),
        (app.admin_addr, "/admin/standalone-keys"),
    ] {
        for header in [
            &b"Authorization: Bearer \x01\x02"[..],
            b"Authorization: \xc3\x28",
            b"Authorization:",
            b"X-Api-Key: \xff\xff",
        ] {
            let method = if path == "/v1/admit" { "POST" } else { "GET" };
            let mut req = format!(
                "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 0\r\n"
            )
            .into_bytes();
            req.extend_from_slice(header);
            req.extend_from_slice(b"\r\n\r\n");
            let (status, head, body) = raw_request(addr, &req).await;
            assert!(
                status < 500,
                "{path} {:?}: {head}\n{body}",
                String::from_utf8_lossy(header)
            );
            if status > 400 {
                let v: Value =
                    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {head}\n{body}"));
                assert!(v["code"].is_string(), "{v}");
            }
        }
    }

    // A header block over the server's limit is refused, and the server keeps serving.
    let giant = format!("Bearer {}", "A".repeat(2 * 1024 * 1024));
    let refused = app
        .http
        .post(format!("{}/v1/admit", app.data))
        .header("authorization", giant)
        .send()
        .await;
    if let Ok(res) = refused {
        assert!(res.status().is_client_error(), "{}", res.status());
    }
    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "still serving: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404_and_wrong_methods_405_on_both_listeners() {
    let app = spawn_app().await;
    let c = Client { app: &app };
    #[rustfmt::skip]
    let not_found: Vec<(Listener, Method, &str)> = vec![
        (Data, Method::GET, "/"),
        (Data, Method::GET, "/nope"),
        (Data, Method::POST, "/v1/nope"),
        (Data, Method::POST, "/v2/admit"),
        (Data, Method::POST, "/admin/keys"),
        (Data, Method::GET, "/admin/standalone-keys"),
        (Data, Method::GET, "/metrics"),
        (Data, Method::GET, "/v1/admit/extra"),
        (Admin, Method::GET, "/"),
        (Admin, Method::POST, "/v1/admit"),
        (Admin, Method::GET, "/auth"),
        (Admin, Method::GET, "/admin"),
        (Admin, Method::GET, "/admin/nope"),
        (Admin, Method::GET, "/admin/keys/lookup/x"),
        (Admin, Method::GET, "/admin/users/u-1"),
        (Admin, Method::GET, "/%ff"),
    ];
    for (on, method, path) in not_found {
        let a = c.send(on, method, path, None, &[], on == Admin).await;
        a.assert_error(404, "not_found");
    }
    #[rustfmt::skip]
    let wrong_method: Vec<(Listener, Method, &str)> = vec![
        (Data, Method::GET, "/v1/admit"),
        (Data, Method::PUT, "/v1/settle"),
        (Data, Method::DELETE, "/v1/release"),
        (Data, Method::OPTIONS, "/v1/admit"),
        (Data, Method::POST, "/healthz"),
        (Data, Method::DELETE, "/readyz"),
        (Data, Method::PUT, "/auth"),
        (Admin, Method::GET, "/admin/keys"),
        (Admin, Method::PUT, "/admin/keys"),
        (Admin, Method::GET, "/admin/keys/lookup"),
        (Admin, Method::GET, "/admin/keys/cleanup-expired"),
        (Admin, Method::POST, "/admin/standalone-keys"),
        (Admin, Method::DELETE, "/admin/users/u-1/keys"),
        (Admin, Method::PUT, "/admin/keys/00000000-0000-0000-0000-000000000000"),
        (Admin, Method::GET, "/admin/keys/00000000-0000-0000-0000-000000000000/balance"),
        (Admin, Method::POST, "/metrics"),
        (Admin, Method::POST, "/healthz"),
    ];
    for (on, method, path) in wrong_method {
        let a = c.send(on, method, path, None, &[], on == Admin).await;
        a.assert_error(405, "method_not_allowed");
    }
    for on in [Data, Admin] {
        for path in ["/healthz", "/readyz"] {
            let a = c.send(on, Method::GET, path, None, &[], false).await;
            assert_eq!(a.status, 200, "{}: {}", a.what, a.text);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_error_echoes_a_plaintext_key() {
    let app = spawn_app().await;
    let (key, k) = app
        .create_key(json!({"user_id": "u-1", "is_standalone": true, "initial_balance_usd": 1}))
        .await;
    let id = k["id"].as_str().unwrap().to_string();
    let random_part = key.split_once('-').unwrap().1.to_string();
    let quoted = format!("\"{key}\"");
    let c = Client { app: &app };
    let j = |v: Value| v.to_string().into_bytes();
    let none = Vec::new;
    let (admit, settle, release) = ("/v1/admit", "/v1/settle", "/v1/release");
    let (keys, lookup) = ("/admin/keys".to_string(), "/admin/keys/lookup".to_string());
    let (one, balance) = (
        format!("/admin/keys/{id}"),
        format!("/admin/keys/{id}/balance"),
    );
    let data = |p: &str, b: Vec<u8>| (Data, Method::POST, p.to_string(), b);
    let admin = |m: Method, p: &String, b: Vec<u8>| (Admin, m, p.clone(), b);
    #[rustfmt::skip]
    let cases: Vec<(Listener, Method, String, Vec<u8>)> = vec![
        data(admit, j(json!({"key": [key]}))),
        data(admit, j(json!({"key": {"k": key}}))),
        data(admit, j(json!({"key": key, "reserve_usd": key}))),
        data(admit, j(json!({"key": key, "reserve_usd": quoted}))),
        data(admit, j(json!({"key": 1, "model": key}))),
        data(admit, j(json!({ key.clone(): 1 }))),
        data(admit, j(json!({ quoted.clone(): 1 }))),
        data(admit, j(json!({"key": format!("{key}x")}))),
        data(admit, format!("{{\"key\": \"{key}\"").into_bytes()),
        data(admit, format!("{{\"key\": \"{key}\\q\"}}").into_bytes()),
        data(admit, format!("{{\"key\": \"{key}\"}} {key}").into_bytes()),
        data(admit, format!("{{\"key\": {key}}}").into_bytes()),
        data(admit, key.clone().into_bytes()),
        data(settle, j(json!({"lease_id": key, "cost_usd": 1}))),
        data(settle, j(json!({"lease_id": [key], "cost_usd": 1}))),
        data(settle, j(json!({"lease_id": "x", "cost_usd": key}))),
        data(settle, j(json!({"lease_id": "x", "cost_usd": 1, "model": [quoted]}))),
        data(release, j(json!({"lease_id": key}))),
        data(release, j(json!({"lease_id": {"a": quoted}}))),
        admin(Method::POST, &keys, j(json!({"user_id": [key]}))),
        admin(Method::POST, &keys, j(json!({"user_id": "u", "name": [key]}))),
        admin(Method::POST, &keys, j(json!({"user_id": "u", "rate_limit": key}))),
        admin(Method::POST, &keys, j(json!({"user_id": "u", "expire_days": quoted}))),
        admin(Method::POST, &keys, j(json!({"user_id": "u", key.clone(): true}))),
        admin(Method::POST, &keys, j(json!({"user_id": "u", "allowed_models": key}))),
        admin(Method::POST, &keys, j(json!({"user_id": "u", "allowed_models": [quoted, 1]}))),
        admin(Method::POST, &keys, j(json!({"user_id": format!("{key}{}", "x".repeat(200))}))),
        admin(Method::POST, &lookup, j(json!({"key": [key]}))),
        admin(Method::POST, &lookup, j(json!({"key": format!("{key}x")}))),
        admin(Method::POST, &lookup, j(json!({"key": key, "other": key}))),
        admin(Method::POST, &"/admin/keys/cleanup-expired".into(), j(json!({"auto_delete": key}))),
        admin(Method::PATCH, &one, j(json!({"expires_at": key}))),
        admin(Method::PATCH, &one, j(json!({"expires_at": quoted}))),
        admin(Method::PATCH, &one, j(json!({"name": {"a": key}}))),
        admin(Method::PATCH, &one, j(json!({"rate_limit": quoted}))),
        admin(Method::PATCH, &one, j(json!({ key.clone(): null }))),
        admin(Method::PATCH, &format!("/admin/keys/{key}"), j(json!({"name": "n"}))),
        admin(Method::POST, &balance, j(json!({"amount_usd": key}))),
        admin(Method::POST, &balance, j(json!({"amount_usd": quoted}))),
        admin(Method::GET, &format!("/admin/keys/{key}"), none()),
        admin(Method::GET, &format!("/admin/keys/{key}/secret"), none()),
        admin(Method::GET, &format!("/admin/keys/{id}/stats?start={key}"), none()),
        admin(Method::GET, &format!("/admin/keys/{id}/stats?start=%22{key}%22"), none()),
        admin(Method::GET, &format!("/admin/users/u-1/keys?is_active={key}"), none()),
        admin(Method::GET, &format!("/admin/nope/{key}"), none()),
        (Data, Method::GET, format!("/nope/{key}"), none()),
    ];
    for (on, method, path, body) in cases {
        let body = (!body.is_empty()).then_some(body);
        let a = c.send(on, method, &path, body, &[], on == Admin).await;
        a.assert_clean();
        assert!(
            a.status >= 400 || a.json()["keys"].is_array(),
            "{}: {} {}",
            a.what,
            a.status,
            a.text
        );
        a.assert_no_echo(&random_part);
    }
    // Keys in headers where they fail: disabled, wrong, or as the admin token.
    #[rustfmt::skip]
    let header_cases: Vec<(Listener, Method, &str, (&str, String))> = vec![
        (Data, Method::GET, "/auth", ("authorization", format!("Bearer {key}x"))),
        (Data, Method::GET, "/auth/nginx", ("x-api-key", format!("{key}x"))),
        (Data, Method::GET, "/auth/envoy/v1/chat/completions", ("api-key", format!("{key}x"))),
        (Admin, Method::GET, "/admin/standalone-keys", ("authorization", format!("Bearer {key}"))),
        (Data, Method::GET, "/auth", ("x-tollgate-model", key.clone())),
    ];
    for (on, method, path, (name, value)) in header_cases {
        let hs = [(name, HeaderValue::from_str(&value).unwrap())];
        let a = c.send(on, method, path, None, &hs, false).await;
        a.assert_clean();
        a.assert_no_echo(&random_part);
    }
    // The key itself, disabled: denials do not name it either.
    let res = app.admin_delete(&format!("/admin/keys/{id}")).await;
    assert_eq!(res.status(), 200);
    let a = c
        .post_json(Data, Method::POST, "/v1/admit", &json!({"key": key}))
        .await;
    a.assert_error(403, "key_disabled");
    a.assert_no_echo(&random_part);
    let hs = [(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
    )];
    let a = c
        .send(Data, Method::GET, "/auth/nginx", None, &hs, false)
        .await;
    a.assert_clean();
    a.assert_no_echo(&random_part);
    // A sanity check of the check: a lookup does answer, by id, without the key.
    let a = c
        .post_json(
            Admin,
            Method::POST,
            "/admin/keys/lookup",
            &json!({"key": key}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["id"], Value::String(id.clone()));
    a.assert_no_echo(&random_part);
    let _ = Uuid::parse_str(&id).expect("uuid");
}

/// Waits until `n` usage events of this key are in Postgres.
async fn usage_rows(app: &TestApp, key_id: &str, n: i64) -> bool {
    app.eventually(Duration::from_secs(15), || async {
        app.usage_events_of_key(key_id).await >= n
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_usage_values_never_block_the_usage_pipeline() {
    #[rustfmt::skip]
    let hostile: Vec<(Value, Value)> = vec![
        (json!({"model": "a\u{0}b"}), json!({"cost_usd": 0})),
        (json!({}), json!({"cost_usd": 0, "provider": "p\u{0}"})),
        (json!({}), json!({"cost_usd": 0, "input_tokens": u64::MAX, "output_tokens": u64::MAX})),
        (json!({}), json!({"cost_usd": 0, "total_tokens": i64::MAX as u64})),
        (json!({}), json!({"cost_usd": 0, "response_time_ms": u64::MAX})),
        (json!({}), json!({"cost_usd": 9_000_000_000u64})),
    ];
    let mut failures = Vec::new();
    for (admit, settle) in hostile {
        // A fresh app each time: a blocked shard must not be blamed on the next case.
        let app = spawn_app().await;
        let (key, id) = new_key(
            &app,
            json!({"user_id": "u-1", "rate_limit": null, "concurrent_limit": null}),
        )
        .await;
        let c = Client { app: &app };
        let mut expected = 0;
        // Twice: sums of two hostile values overflow where one does not.
        for _ in 0..2 {
            let (status, lease) = app.admit(&key, admit.clone()).await;
            if status != 200 {
                assert_eq!(status, 400, "{admit}: {lease}");
                continue;
            }
            let mut body = settle.clone();
            body["lease_id"] = lease["lease_id"].clone();
            let a = c.post_json(Data, Method::POST, "/v1/settle", &body).await;
            if a.status >= 500 {
                failures.push(format!(
                    "{admit} / {settle}: settle answered {} {}",
                    a.status, a.text
                ));
            }
            if a.status == 200 {
                expected += 1;
            }
        }
        let (status, lease) = app.admit(&key, json!({})).await;
        assert_eq!(status, 200, "{lease}");
        let (status, body) = app
            .settle(lease["lease_id"].as_str().unwrap(), "0.001")
            .await;
        assert_eq!(status, 200, "{body}");
        expected += 1;
        if !usage_rows(&app, &id, expected).await {
            let got = app.usage_events_of_key(&id).await;
            failures.push(format!(
                "after {admit} / {settle}: {got} of {expected} settled events reached Postgres"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
