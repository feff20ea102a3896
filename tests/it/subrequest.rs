//! Reverse-proxy subrequests: `/auth` (Traefik, Caddy, generic), `/auth/nginx` (nginx
//! `auth_request`), `/auth/envoy/<path>` (Envoy `ext_authz`). Where the key comes from, how
//! provider, API format and model are found (headers, the original path, a forwarded JSON
//! body, a user rules file), and how allowed and denied answers look to each proxy.

use crate::common;

use common::private_redis::PrivateRedis;
use common::proxies::TempDir;
use common::*;
use reqwest::Method;
use serde_json::{json, Value};

async fn ask(
    app: &TestApp,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Answer {
    let mut req = app
        .http
        .request(method.clone(), format!("{}{path}", app.data));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    let what = format!("{method} {path}");
    let res = req.send().await.expect("subrequest");
    Answer::read(what, res).await
}

async fn get(app: &TestApp, path: &str, headers: &[(&str, &str)]) -> Answer {
    ask(app, Method::GET, path, headers, None).await
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// One list member of a structured-field header (RFC 8941) as the ratelimit-headers draft
/// uses it: a string item with integer parameters, e.g. `"default";r=99;t=60`.
fn sf_item(value: &str) -> (String, Vec<(String, i64)>) {
    assert!(!value.contains(','), "one policy expected: {value}");
    let mut parts = value.trim().split(';');
    let name = parts.next().unwrap_or_default();
    assert!(
        name.len() >= 2 && name.starts_with('"') && name.ends_with('"'),
        "the item is a quoted string: {value}"
    );
    let name = name[1..name.len() - 1].to_string();
    let params = parts
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .unwrap_or_else(|| panic!("param {p:?} in {value}"));
            assert!(
                !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase()),
                "param key {k:?} in {value}"
            );
            let n: i64 = v
                .parse()
                .unwrap_or_else(|_| panic!("integer param {p:?} in {value}"));
            (k.to_string(), n)
        })
        .collect();
    (name, params)
}

fn param(params: &[(String, i64)], key: &str) -> i64 {
    params
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no {key} in {params:?}"))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_comes_from_bearer_x_api_key_or_api_key_on_every_endpoint() {
    let app = spawn_app().await;
    let (key, k) = app
        .create_key(json!({"user_id": "u-hdr", "rate_limit": null, "concurrent_limit": null}))
        .await;
    let id = k["id"].as_str().unwrap();
    let bearer_upper = bearer(&key);
    let bearer_lower = format!("bearer {key}");
    for path in ["/auth", "/auth/nginx", "/auth/envoy/v1/chat/completions"] {
        for (name, value) in [
            ("authorization", bearer_upper.as_str()),
            ("authorization", bearer_lower.as_str()),
            ("x-api-key", key.as_str()),
            ("api-key", key.as_str()),
        ] {
            let a = get(&app, path, &[(name, value)]).await;
            assert_eq!(a.status, 200, "{path} {name}: {}", a.body);
            assert_eq!(a.header("x-tollgate-key-id"), Some(id), "{path} {name}");
            assert_eq!(
                a.header("x-tollgate-user-id"),
                Some("u-hdr"),
                "{path} {name}"
            );
        }
        // A key in a header tollgate does not read is no key.
        let a = get(&app, path, &[("x-auth-token", key.as_str())]).await;
        assert_eq!(a.status, 401, "{path}: {}", a.body);
        if path == "/auth/nginx" {
            assert_eq!(a.header("x-tollgate-code"), Some("key_missing"));
        } else {
            assert_eq!(a.code(), Some("key_missing"), "{path}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_answer_carries_the_ids_and_structured_ratelimit_fields() {
    let app = spawn_app_with(|s| {
        s.insert("TOLLGATE_RATE_WINDOW_SECONDS", "30".into());
    })
    .await;
    let (key, k) = app
        .create_key(json!({"user_id": "u-rl", "rate_limit": 5}))
        .await;
    let auth = bearer(&key);
    let mut leases = Vec::new();
    for (i, path) in ["/auth", "/auth/nginx", "/auth/envoy/v1/chat/completions"]
        .into_iter()
        .enumerate()
    {
        let a = get(&app, path, &[("authorization", &auth)]).await;
        assert_eq!(a.status, 200, "{path}: {}", a.body);
        assert_eq!(a.header("x-tollgate-key-id"), k["id"].as_str());
        assert_eq!(a.header("x-tollgate-user-id"), Some("u-rl"));
        let lease = a
            .header("x-tollgate-lease-id")
            .expect("lease id")
            .to_string();
        assert_eq!(
            a.body["lease_id"].as_str(),
            Some(lease.as_str()),
            "header and body agree"
        );

        let policy = a.header("ratelimit-policy").expect("RateLimit-Policy");
        assert_eq!(policy, r#""default";q=5;w=30"#);
        let (name, params) = sf_item(policy);
        assert_eq!(
            (name.as_str(), param(&params, "q"), param(&params, "w")),
            ("default", 5, 30)
        );

        let now = a.header("ratelimit").expect("RateLimit");
        let (name, params) = sf_item(now);
        assert_eq!(name, "default", "{now}: names the policy it reports on");
        assert_eq!(
            param(&params, "r"),
            4 - i as i64,
            "{path}: remaining in {now}"
        );
        let t = param(&params, "t");
        assert!(
            (1..=30).contains(&t),
            "{path}: reset {t}s within the window: {now}"
        );
        assert_eq!(params.len(), 2, "only r and t: {now}");
        leases.push(lease);
    }
    // The lease ids handed to the proxy are real leases.
    let (st, body) = app.settle(&leases[0], "0.01").await;
    assert_eq!(
        (st, &body["settled"], &body["duplicate"]),
        (200, &json!(true), &json!(false)),
        "{body}"
    );
    let (st, body) = app.release(&leases[1]).await;
    assert_eq!(st, 200, "{body}");

    // No rate limit, no RateLimit fields (there is no quota to state).
    let (unl, _) = app
        .create_key(json!({"user_id": "u-unl", "rate_limit": null}))
        .await;
    let a = get(&app, "/auth", &[("x-api-key", unl.as_str())]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.header("x-tollgate-lease-id").is_some());
    assert_eq!(
        (a.header("ratelimit"), a.header("ratelimit-policy")),
        (None, None)
    );
}

/// Keys for each kind of denial, plus the rate-limited key already at its limit.
struct DenialKeys {
    limited: String,
    broke: String,
    disabled: String,
    expired: String,
    anthropic_only: String,
}

async fn denial_keys(app: &TestApp) -> DenialKeys {
    let (limited, _) = app
        .create_key(json!({"user_id": "u-lim", "rate_limit": 1}))
        .await;
    let (st, body) = app.admit(&limited, json!({})).await;
    assert_eq!(st, 200, "{body}");
    let (broke, _) = app
        .create_key(json!({"user_id": "u-broke", "is_standalone": true, "initial_balance_usd": 0}))
        .await;
    let (disabled, d) = app.create_key(json!({"user_id": "u-dis"})).await;
    let res = app
        .admin_patch(
            &format!("/admin/keys/{}", d["id"].as_str().unwrap()),
            json!({"is_active": false}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let (expired, e) = app.create_key(json!({"user_id": "u-exp"})).await;
    let res = app
        .admin_patch(
            &format!("/admin/keys/{}", e["id"].as_str().unwrap()),
            json!({"expires_at": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let (anthropic_only, _) = app
        .create_key(json!({"user_id": "u-anth", "allowed_providers": ["anthropic"]}))
        .await;
    DenialKeys {
        limited,
        broke,
        disabled,
        expired,
        anthropic_only,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_envoy_denials_carry_the_real_status_json_body_and_retry_after() {
    let app = spawn_app().await;
    let k = denial_keys(&app).await;
    for path in ["/auth", "/auth/envoy/v1/chat/completions"] {
        #[rustfmt::skip]
        let cases: [(Option<&str>, u16, &str); 7] = [
            (None, 401, "key_missing"),
            (Some("sk-NoSuchKey0123456789abcdefABCDEF"), 401, "key_invalid"),
            (Some(&k.disabled), 403, "key_disabled"),
            (Some(&k.expired), 403, "key_expired"),
            (Some(&k.anthropic_only), 403, "provider_not_allowed"),
            (Some(&k.broke), 402, "balance_exhausted"),
            (Some(&k.limited), 429, "rate_limited"),
        ];
        for (key, status, code) in cases {
            let auth = key.map(bearer);
            let headers: Vec<(&str, &str)> =
                auth.iter().map(|a| ("authorization", a.as_str())).collect();
            let a = get(&app, path, &headers).await;
            assert_eq!(
                (a.status, a.code()),
                (status, Some(code)),
                "{path}: {}",
                a.body
            );
            assert_eq!(a.body["allowed"], json!(false), "{path} {code}");
            assert!(
                a.body["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{path} {code}"
            );
            assert!(
                a.header("content-type")
                    .is_some_and(|c| c.starts_with("application/json")),
                "{path} {code}"
            );
            assert_eq!(
                a.header("x-tollgate-key-id"),
                None,
                "{path} {code}: no ids on a denial"
            );
            assert_eq!(
                a.header("x-tollgate-status"),
                None,
                "{path}: nginx-only header"
            );
            if status == 429 {
                let retry: u64 = a
                    .header("retry-after")
                    .expect("Retry-After on 429")
                    .parse()
                    .expect("whole seconds");
                let ms = a.body["retry_after_ms"].as_u64().expect("retry_after_ms");
                assert!((1..=60).contains(&retry), "{retry}");
                assert_eq!(
                    retry,
                    ms.div_ceil(1000).max(1),
                    "Retry-After is retry_after_ms rounded up"
                );
                let (_, params) = sf_item(a.header("ratelimit").expect("RateLimit on 429"));
                assert_eq!(param(&params, "r"), 0);
            } else {
                assert_eq!(a.header("retry-after"), None, "{path} {code}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_denials_are_401_or_403_with_the_real_status_in_headers() {
    let app = spawn_app().await;
    let k = denial_keys(&app).await;
    #[rustfmt::skip]
    let cases: [(Option<&str>, u16, &str, &str); 7] = [
        (None, 401, "401", "key_missing"),
        (Some("sk-NoSuchKey0123456789abcdefABCDEF"), 401, "401", "key_invalid"),
        (Some(&k.disabled), 403, "403", "key_disabled"),
        (Some(&k.expired), 403, "403", "key_expired"),
        (Some(&k.anthropic_only), 403, "403", "provider_not_allowed"),
        (Some(&k.broke), 403, "402", "balance_exhausted"),
        (Some(&k.limited), 403, "429", "rate_limited"),
    ];
    for (key, status, real, code) in cases {
        let auth = key.map(bearer);
        let mut headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        headers.push(("x-original-uri", "/v1/chat/completions"));
        let a = get(&app, "/auth/nginx", &headers).await;
        assert_eq!(a.status, status, "{code}: {}", a.body);
        assert_eq!(a.header("x-tollgate-status"), Some(real), "{code}");
        assert_eq!(a.header("x-tollgate-code"), Some(code));
        if code == "rate_limited" {
            let retry: u64 = a
                .header("retry-after")
                .expect("Retry-After")
                .parse()
                .expect("seconds");
            assert!((1..=60).contains(&retry), "{retry}");
        } else {
            assert_eq!(a.header("retry-after"), None, "{code}");
        }
    }
    // An allowed answer is a plain 200 without the denial headers.
    let (ok, _) = app.create_key(json!({"user_id": "u-ok"})).await;
    let a = get(&app, "/auth/nginx", &[("x-api-key", ok.as_str())]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        (a.header("x-tollgate-status"), a.header("x-tollgate-code")),
        (None, None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_503_unavailable_and_nginx_carries_it_in_x_tollgate_status() {
    let mut redis = PrivateRedis::start();
    let app = spawn_app_with(|s| {
        s.insert("TOLLGATE_REDIS_URL", redis.url());
    })
    .await;
    let (key, _) = app.create_key(json!({"user_id": "u-down"})).await;
    let auth = bearer(&key);
    let a = get(&app, "/auth", &[("authorization", &auth)]).await;
    assert_eq!(a.status, 200, "{}", a.body);

    redis.stop();
    let a = get(&app, "/auth", &[("authorization", &auth)]).await;
    assert_eq!(
        (a.status, a.code()),
        (503, Some("unavailable")),
        "{}",
        a.body
    );
    let a = get(&app, "/auth/envoy/v1/messages", &[("authorization", &auth)]).await;
    assert_eq!(
        (a.status, a.code()),
        (503, Some("unavailable")),
        "{}",
        a.body
    );
    let a = get(&app, "/auth/nginx", &[("authorization", &auth)]).await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(
        (a.header("x-tollgate-status"), a.header("x-tollgate-code")),
        (Some("503"), Some("unavailable"))
    );
}

/// The built-in table: original path → (provider, API format, model from the path).
#[rustfmt::skip]
const TABLE: &[(&str, &str, &str, Option<&str>)] = &[
    ("/v1/chat/completions", "openai", "openai:chat", None),
    ("/v1/completions", "openai", "openai:completions", None),
    ("/v1/responses", "openai", "openai:responses", None),
    ("/v1/embeddings", "openai", "openai:embeddings", None),
    ("/v1/messages", "anthropic", "anthropic:messages", None),
    ("/v1beta/models/gemini-2.0-flash:generateContent", "gemini", "gemini:generateContent", Some("gemini-2.0-flash")),
    ("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", "gemini", "gemini:streamGenerateContent", Some("gemini-2.0-flash")),
    ("/v1/models/gemini-1.5-pro:generateContent", "gemini", "gemini:generateContent", Some("gemini-1.5-pro")),
    ("/v1/models/gemini-1.5-pro:streamGenerateContent", "gemini", "gemini:streamGenerateContent", Some("gemini-1.5-pro")),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inference_table_decides_provider_format_and_gemini_model_from_the_path() {
    let app = spawn_app().await;
    for (i, (path, provider, format, model)) in TABLE.iter().enumerate() {
        // A key allowed exactly what this row infers: only the row's inference admits it.
        let mut body = json!({
            "user_id": format!("u-row{i}"),
            "allowed_providers": [provider],
            "allowed_api_formats": [format],
            "rate_limit": null,
            "concurrent_limit": null,
        });
        if let Some(m) = model {
            body["allowed_models"] = json!([m]);
        }
        let (key, _) = app.create_key(body).await;
        let auth = bearer(&key);
        let mounted = format!("/gateway{path}");
        let envoy = format!("/auth/envoy{path}");
        for (how, endpoint, headers) in [
            ("x-original-uri", "/auth", vec![("x-original-uri", *path)]),
            ("x-forwarded-uri", "/auth", vec![("x-forwarded-uri", *path)]),
            (
                "mounted",
                "/auth/nginx",
                vec![("x-original-uri", mounted.as_str())],
            ),
            ("envoy suffix", envoy.as_str(), vec![]),
        ] {
            let mut headers = headers;
            headers.push(("authorization", auth.as_str()));
            let a = get(&app, endpoint, &headers).await;
            assert_eq!(a.status, 200, "{path} via {how}: {}", a.body);
        }
        // Some clients percent-encode the `:` of a Gemini path.
        if path.contains(':') {
            let encoded = path.replace(':', "%3A");
            let a = get(
                &app,
                "/auth",
                &[("authorization", &auth), ("x-original-uri", &encoded)],
            )
            .await;
            assert_eq!(a.status, 200, "{encoded}: {}", a.body);
        }
        // Every other row's path is denied for this key (another format, provider or model).
        for (other, oprov, oformat, omodel) in TABLE.iter() {
            if (oprov, oformat, omodel) == (provider, format, model) {
                continue;
            }
            let a = get(
                &app,
                "/auth",
                &[("authorization", &auth), ("x-original-uri", other)],
            )
            .await;
            let want = if oprov != provider {
                "provider_not_allowed"
            } else if oformat != format {
                "api_format_not_allowed"
            } else {
                "model_not_allowed"
            };
            assert_eq!(
                (a.status, a.code()),
                (403, Some(want)),
                "key for {path} on {other}"
            );
        }
        // Without any original path nothing is inferred, and a restricted key needs a provider.
        let a = get(&app, "/auth", &[("authorization", &auth)]).await;
        assert_eq!(
            (a.status, a.code()),
            (403, Some("provider_not_allowed")),
            "{path}, no path"
        );
        // A path that merely starts like a known one is not that one.
        let suffixed = format!("{}X", path.split('?').next().unwrap());
        let a = get(
            &app,
            "/auth",
            &[("authorization", &auth), ("x-original-uri", &suffixed)],
        )
        .await;
        assert_eq!(
            (a.status, a.code()),
            (403, Some("provider_not_allowed")),
            "{suffixed}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_comes_from_a_forwarded_json_body_and_headers_override_inference() {
    let app = spawn_app().await;
    let (key, _) = app
        .create_key(json!({"user_id": "u-model", "allowed_models": ["gpt-4o"], "rate_limit": null, "concurrent_limit": null}))
        .await;
    let auth = bearer(&key);
    let json_ct = ("content-type", "application/json");
    let chat = ("x-original-uri", "/v1/chat/completions");
    let body_ok = r#"{"model": "gpt-4o", "messages": []}"#;
    let body_other = r#"{"messages": [], "model": "gpt-4o-mini"}"#;

    for endpoint in ["/auth", "/auth/envoy/v1/chat/completions"] {
        let h = [("authorization", auth.as_str()), json_ct, chat];
        let a = ask(&app, Method::POST, endpoint, &h, Some(body_ok)).await;
        assert_eq!(a.status, 200, "{endpoint}: {}", a.body);
        let a = ask(&app, Method::POST, endpoint, &h, Some(body_other)).await;
        assert_eq!(
            (a.status, a.code()),
            (403, Some("model_not_allowed")),
            "{endpoint}"
        );
        // No body: no model, and a key restricted to models needs one.
        let a = ask(&app, Method::POST, endpoint, &h, None).await;
        assert_eq!(
            (a.status, a.code()),
            (403, Some("model_not_allowed")),
            "{endpoint}"
        );
        // A body that is not JSON names no model.
        let a = ask(&app, Method::POST, endpoint, &h, Some("model=gpt-4o")).await;
        assert_eq!(
            (a.status, a.code()),
            (403, Some("model_not_allowed")),
            "{endpoint}"
        );
    }

    // Envoy forwards no Content-Type, and with `allow_partial_message` only the first bytes
    // of a long body: the model is still read when it comes before the cut.
    let envoy = "/auth/envoy/v1/chat/completions";
    let h = [("authorization", auth.as_str())];
    let cut = r#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "a very long pro"#;
    let a = ask(&app, Method::POST, envoy, &h, Some(cut)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let cut =
        r#"{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a very long pro"#;
    let a = ask(&app, Method::POST, envoy, &h, Some(cut)).await;
    assert_eq!((a.status, a.code()), (403, Some("model_not_allowed")));

    // X-Tollgate-Model wins over the body, both ways.
    for (model, body, want) in [("gpt-4o", body_other, 200), ("gpt-4o-mini", body_ok, 403)] {
        let h = [
            ("authorization", auth.as_str()),
            ("x-tollgate-model", model),
        ];
        let a = ask(&app, Method::POST, "/auth", &h, Some(body)).await;
        assert_eq!(a.status, want, "header model {model}: {}", a.body);
    }

    // X-Tollgate-Provider / -Api-Format win over what the path says.
    let (azure, _) = app
        .create_key(json!({"user_id": "u-az", "allowed_providers": ["azure"], "allowed_api_formats": ["azure:chat"]}))
        .await;
    let az = bearer(&azure);
    let a = get(&app, "/auth", &[("authorization", &az), chat]).await;
    assert_eq!((a.status, a.code()), (403, Some("provider_not_allowed")));
    let a = get(
        &app,
        "/auth",
        &[
            ("authorization", &az),
            chat,
            ("x-tollgate-provider", "azure"),
        ],
    )
    .await;
    assert_eq!((a.status, a.code()), (403, Some("api_format_not_allowed")));
    let h = [
        ("authorization", az.as_str()),
        chat,
        ("x-tollgate-provider", "azure"),
        ("x-tollgate-api-format", "azure:chat"),
    ];
    let a = get(&app, "/auth/nginx", &h).await;
    assert_eq!(a.status, 200, "{:?}", a.headers);

    // Envoy sends any method; the suffix-less prefix works too.
    let (open, _) = app.create_key(json!({"user_id": "u-open"})).await;
    for method in [Method::PUT, Method::DELETE, Method::PATCH] {
        let a = ask(
            &app,
            method.clone(),
            "/auth/envoy/v1/files/abc",
            &[("x-api-key", &open)],
            None,
        )
        .await;
        assert_eq!(a.status, 200, "{method}: {}", a.body);
    }
    let a = get(&app, "/auth/envoy", &[("x-api-key", &open)]).await;
    assert_eq!(a.status, 200, "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_file_extends_and_overrides_the_built_in_table() {
    let dir = TempDir::new("rules");
    let rules = dir.path().join("rules.json");
    std::fs::write(
        &rules,
        r#"[
            {"path": "/openai/deployments/{model}/chat/completions", "provider": "azure", "api_format": "openai:chat"},
            {"path": "/v1/messages", "provider": "bedrock", "api_format": "anthropic:messages"}
        ]"#,
    )
    .unwrap();
    let rules_path = rules.display().to_string();
    let app = spawn_app_with(|s| {
        s.insert("TOLLGATE_INFERENCE_RULES", rules_path);
    })
    .await;

    let (azure, _) = app
        .create_key(json!({"user_id": "u-az", "allowed_providers": ["azure"], "allowed_models": ["gpt4o-prod"]}))
        .await;
    let az = bearer(&azure);
    let uri = "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21";
    let a = get(
        &app,
        "/auth",
        &[("authorization", &az), ("x-original-uri", uri)],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let envoy = format!("/auth/envoy{}", uri.split('?').next().unwrap());
    let a = get(&app, &envoy, &[("authorization", &az)]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let other = "/openai/deployments/gpt35/chat/completions";
    let a = get(
        &app,
        "/auth",
        &[("authorization", &az), ("x-original-uri", other)],
    )
    .await;
    assert_eq!(
        (a.status, a.code()),
        (403, Some("model_not_allowed")),
        "{}",
        a.body
    );

    // A user rule comes before the built-in one for the same path.
    let (bedrock, _) = app
        .create_key(json!({"user_id": "u-br", "allowed_providers": ["bedrock"]}))
        .await;
    let (anthropic, _) = app
        .create_key(json!({"user_id": "u-an", "allowed_providers": ["anthropic"]}))
        .await;
    let msgs = ("x-original-uri", "/v1/messages");
    let a = get(&app, "/auth", &[("authorization", &bearer(&bedrock)), msgs]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = get(
        &app,
        "/auth",
        &[("authorization", &bearer(&anthropic)), msgs],
    )
    .await;
    assert_eq!((a.status, a.code()), (403, Some("provider_not_allowed")));

    // The built-in rows the file does not override still apply.
    let (openai, _) = app
        .create_key(json!({"user_id": "u-oa", "allowed_providers": ["openai"]}))
        .await;
    let oa = bearer(&openai);
    let h = [
        ("authorization", oa.as_str()),
        ("x-original-uri", "/v1/chat/completions"),
    ];
    let a = get(&app, "/auth", &h).await;
    assert_eq!(a.status, 200, "{}", a.body);

    // A bad file stops start-up, naming the setting.
    let bad = dir.path().join("bad.json");
    for content in [
        r#"{"path": "/x"}"#,
        r#"[{"path": "no-slash", "provider": "p", "api_format": "f"}]"#,
    ] {
        std::fs::write(&bad, content).unwrap();
        let mut s = base_settings();
        s.insert("TOLLGATE_INFERENCE_RULES", bad.display().to_string());
        let err = tollgate::config::Config::from_map(&s).expect_err(content);
        assert_eq!(err.name, "TOLLGATE_INFERENCE_RULES");
    }
    let mut s = base_settings();
    s.insert(
        "TOLLGATE_INFERENCE_RULES",
        dir.path().join("missing.json").display().to_string(),
    );
    let err = tollgate::config::Config::from_map(&s).expect_err("missing file");
    assert_eq!(err.name, "TOLLGATE_INFERENCE_RULES");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_asks_about_the_gateway_root_path_too() {
    // Envoy appends the original path to `path_prefix: /auth/envoy`, so a request for `/`
    // arrives as `/auth/envoy/` (and `/?q=1` as `/auth/envoy/?q=1`).
    let app = spawn_app().await;
    let (key, _) = app.create_key(json!({"user_id": "u-root"})).await;
    for path in ["/auth/envoy/", "/auth/envoy/?q=1"] {
        let a = get(&app, path, &[("x-api-key", &key)]).await;
        assert_eq!(a.status, 200, "{path}: {}", a.body);
        let a = get(&app, path, &[]).await;
        assert_eq!((a.status, a.code()), (401, Some("key_missing")), "{path}");
    }
}

/// A subrequest's lease lives `TOLLGATE_SUBREQUEST_LEASE_TTL_SECONDS` (here 1 s), or what
/// `X-Tollgate-Lease-Ttl` asks; `X-Tollgate-Lease: none` takes no lease at all. A bad value
/// is 400 `bad_request` (nginx: 403 with the real status in `X-Tollgate-Status`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subrequests_take_their_lease_term_from_headers_or_the_subrequest_default() {
    let app = spawn_app_with(|s| {
        s.insert("TOLLGATE_SUBREQUEST_LEASE_TTL_SECONDS", "1".into());
    })
    .await;
    let (key, _) = app
        .create_key(json!({"user_id": "u-term", "rate_limit": null, "concurrent_limit": 1}))
        .await;
    let auth = bearer(&key);
    let auth = ("authorization", auth.as_str());

    for _ in 0..3 {
        let a = get(&app, "/auth", &[auth, ("x-tollgate-lease", "none")]).await;
        assert_eq!(a.status, 200, "lease-less: {}", a.body);
        assert_eq!(a.header("x-tollgate-lease-id"), None, "no lease id header");
        assert_eq!(a.body["lease_id"], Value::Null);
    }

    // The subrequest default: 1 s.
    let started = std::time::Instant::now();
    let a = get(&app, "/auth", &[auth]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.header("x-tollgate-lease-id").is_some());
    let d = get(&app, "/auth", &[auth]).await;
    assert_eq!(
        (d.status, d.code(), d.header("retry-after")),
        (429, Some("concurrency_limited"), Some("1")),
        "{}",
        d.body
    );
    let freed = app
        .eventually(std::time::Duration::from_secs(5), || async {
            get(&app, "/auth", &[auth, ("x-tollgate-lease-ttl", "3")])
                .await
                .status
                == 200
        })
        .await;
    assert!(freed, "the 1 s default lease never freed its slot");
    assert!(started.elapsed() >= std::time::Duration::from_millis(990));

    // The header's 3 s: still held after the default's 1 s.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let d = get(&app, "/auth", &[auth]).await;
    assert_eq!(d.status, 429, "the 3 s lease still holds: {}", d.body);

    for (name, value) in [
        ("x-tollgate-lease-ttl", "0"),
        ("x-tollgate-lease-ttl", "86401"),
        ("x-tollgate-lease-ttl", "soon"),
        ("x-tollgate-lease", "some"),
    ] {
        // A bad lifetime is refused with `X-Tollgate-Lease: none` too.
        let a = get(
            &app,
            "/auth",
            &[auth, ("x-tollgate-lease", "none"), (name, value)],
        )
        .await;
        if name == "x-tollgate-lease-ttl" {
            assert_eq!(a.status, 400, "none + {name}: {value}: {}", a.body);
        }
        let a = get(&app, "/auth", &[auth, (name, value)]).await;
        assert_eq!(
            (a.status, a.code()),
            (400, Some("bad_request")),
            "{name}: {value}: {}",
            a.body
        );
        assert!(a.body["message"].is_string());
        let n = get(&app, "/auth/nginx", &[auth, (name, value)]).await;
        assert_eq!(
            (
                n.status,
                n.header("x-tollgate-status"),
                n.header("x-tollgate-code")
            ),
            (403, Some("400"), Some("bad_request")),
            "nginx {name}: {value}"
        );
    }
}
