//! The OpenAPI document (docs/openapi.yaml → docs/openapi.json): a valid OpenAPI 3.1 document,
//! served at /admin/openapi.json, naming every route and code of the contract, and true of a
//! live tollgate: Schemathesis generates requests for every operation of both listeners and
//! finds no 5xx, no status, header, content type or body the document does not allow, and no
//! error without the contract's `{code, message}`.

use crate::common;

use std::collections::BTreeSet;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::tools::{bin_dir, repo_file};
use common::*;
use serde_json::{json, Value};

fn document() -> Value {
    let text = std::fs::read_to_string(repo_file("docs/openapi.json")).expect("docs/openapi.json");
    serde_json::from_str(&text).expect("docs/openapi.json is JSON")
}

fn show(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_openapi_document_is_a_valid_openapi_3_1_document() {
    let out = Command::new(bin_dir().join("openapi-spec-validator"))
        .arg(repo_file("docs/openapi.json"))
        .output()
        .expect("run openapi-spec-validator");
    assert!(
        out.status.success(),
        "openapi-spec-validator: {}",
        show(&out)
    );
    assert_eq!(document()["openapi"], "3.1.0");
}

#[test]
fn the_served_json_is_the_yaml_source_converted() {
    // docs/openapi.yaml is what people edit; the binary embeds docs/openapi.json. They must
    // agree, or the served document is stale: regenerate with scripts/openapi-json.sh.
    let out = Command::new(bin_dir().join("python"))
        .arg("-c")
        .arg(
            "import json, sys, yaml\n\
             y = yaml.safe_load(open(sys.argv[1]))\n\
             j = json.load(open(sys.argv[2]))\n\
             sys.exit(0 if y == j else 'docs/openapi.json is not docs/openapi.yaml: run scripts/openapi-json.sh')",
        )
        .arg(repo_file("docs/openapi.yaml"))
        .arg(repo_file("docs/openapi.json"))
        .output()
        .expect("run python");
    assert!(out.status.success(), "{}", show(&out));
}

#[test]
fn the_document_names_every_route_and_every_code_of_the_contract() {
    let doc = document();
    let paths: BTreeSet<&str> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .map(String::as_str)
        .collect();
    let want: BTreeSet<&str> = [
        "/v1/admit",
        "/v1/settle",
        "/v1/release",
        "/auth",
        "/auth/nginx",
        "/auth/envoy/{path}",
        "/healthz",
        "/readyz",
        "/admin/keys",
        "/admin/keys/lookup",
        "/admin/keys/cleanup-expired",
        "/admin/keys/{id}",
        "/admin/keys/{id}/secret",
        "/admin/keys/{id}/balance",
        "/admin/keys/{id}/stats",
        "/admin/users/{user_id}/keys",
        "/admin/standalone-keys",
        "/admin/openapi.json",
        "/admin/prices",
        "/metrics",
    ]
    .into();
    assert_eq!(paths, want);
    let text = doc.to_string();
    // Every denial code the server can answer (a new one fails here until it is documented),
    // then the error codes that are not denials.
    let denials = tollgate::decision::DenyCode::ALL.map(|c| c.as_str());
    for code in denials.into_iter().chain([
        "price_unknown",
        "lease_unknown",
        "unauthorized",
        "not_found",
        "bad_request",
        "unknown_field",
        "zero_amount",
        "not_standalone",
        "insufficient_balance",
        "idempotency_conflict",
        "payload_too_large",
        "method_not_allowed",
    ]) {
        assert!(
            text.contains(&format!("\"{code}\"")),
            "the document does not name the code {code}"
        );
    }
    // Contract 1.1, section 1 (built), and the request fields of every body.
    let admit = &doc["components"]["schemas"]["AdmitRequest"]["properties"];
    for f in [
        "key",
        "provider",
        "api_format",
        "model",
        "reserve_usd",
        "lease_ttl_seconds",
        "lease",
        "reserve_tokens",
    ] {
        assert!(admit.get(f).is_some(), "AdmitRequest lacks {f}");
    }
    let api_key = &doc["components"]["schemas"]["ApiKey"]["required"];
    assert_eq!(api_key.as_array().map(Vec::len), Some(24), "ApiKey fields");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_the_document_to_the_admin_only() {
    let app = spawn_app().await;
    let url = format!("{}/admin/openapi.json", app.admin);
    let anonymous = app.http.get(&url).send().await.expect("request");
    assert_eq!(anonymous.status(), 401);
    let body: Value = anonymous.json().await.expect("json");
    assert_eq!(body["code"], "unauthorized");
    let res = app.admin_get("/admin/openapi.json").await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap_or_default()
        .starts_with("application/json"));
    let served: Value = res.json().await.expect("json");
    assert_eq!(served, document());
    // Not on the data plane.
    let res = app
        .http
        .get(format!("{}/admin/openapi.json", app.data))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), 404);
}

/// Cases per operation (per phase) and the seed: bounded and repeatable. Two runs, one per
/// listener, of 16 and 15 operations: 1,000 to 1,200 generated requests each, under a minute each
/// here.
const MAX_EXAMPLES: &str = "25";
const SEED: &str = "17";
/// A run that takes longer than this is stopped and fails.
const RUN_BOUND: Duration = Duration::from_secs(240);

/// No 5xx; every status, content type, header and body as documented; schema-violating
/// requests refused; 405 for undeclared methods; 401 without the admin token; every non-2xx is
/// `{code, message}` JSON (`error_has_code_and_message`, tests/schemathesis/hooks.py). Left out:
/// `positive_data_acceptance`, because JSON Schema's `integer` admits `1.0` and the document
/// cannot say "at most 9 decimals" or cross-field rules (start ≤ end, a balance only for
/// standalone keys), all of which the API refuses by design with a documented 400; and
/// `use_after_free`, because DELETE is the contract's soft delete: the key stays readable.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance,\
                      negative_data_rejection,missing_required_header,unsupported_method,\
                      allow_header_conformance,ensure_resource_availability,ignored_auth,\
                      error_has_code_and_message";

/// Runs Schemathesis in `work` (it keeps a cache in its working directory).
fn schemathesis(base_url: &str, tags: &str, bearer: &str, work: &std::path::Path) -> Output {
    std::fs::create_dir_all(work).expect("schemathesis work dir");
    let started = Instant::now();
    let mut child = Command::new(bin_dir().join("schemathesis"))
        .arg("--config-file")
        .arg(repo_file("tests/schemathesis/schemathesis.toml"))
        .arg("run")
        .arg(repo_file("docs/openapi.json"))
        .args(["--url", base_url])
        .args(["--include-tag-regex", tags])
        .args(["--checks", CHECKS])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--seed", SEED])
        // One worker: Python 3.11's `ast` is not thread-safe, and Hypothesis parses lambdas
        // while describing strategies ("AST constructor recursion depth mismatch").
        .args(["--workers", "1"])
        .args(["--request-timeout", "10"])
        .args(["--suppress-health-check", "all"])
        .args(["--header", &format!("Authorization: Bearer {bearer}")])
        .current_dir(work)
        .env("SCHEMATHESIS_HOOKS", "hooks")
        .env("PYTHONPATH", repo_file("tests/schemathesis"))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run schemathesis");
    // Drain the pipes on threads so a chatty run cannot block on a full pipe.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut b);
        b
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait schemathesis") {
            break s;
        }
        if started.elapsed() > RUN_BOUND {
            let _ = child.kill();
            let _ = child.wait();
            panic!("schemathesis did not finish within {RUN_BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("schemathesis {tags} on {base_url}: {:?}", started.elapsed());
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_5xx_and_no_answer_outside_the_document_on_either_listener() {
    let app = spawn_app().await;
    // A real key for the data plane's Authorization header, so generated admissions are also
    // allowed (and take leases, hold balance, hit limits), not only denied as unknown.
    let (key, _) = app
        .create_key(json!({
            "user_id": "schemathesis",
            "is_standalone": true,
            "initial_balance_usd": 1000,
            "rate_limit": null,
            "concurrent_limit": null,
        }))
        .await;
    let reports = std::env::temp_dir().join(unique("tollgate-schemathesis-"));
    let data = app.data.clone();
    let admin = app.admin.clone();
    let (data_reports, admin_reports) = (reports.join("data"), reports.join("admin"));
    let runs = tokio::task::spawn_blocking(move || {
        let data_run = schemathesis(
            &data,
            "^(data-plane|subrequest|health)$",
            &key,
            &data_reports,
        );
        let admin_run = schemathesis(&admin, "^(admin|ops|health)$", ADMIN_TOKEN, &admin_reports);
        (data_run, admin_run)
    })
    .await
    .expect("schemathesis runs");
    let mut failures = Vec::new();
    for (name, out) in [
        ("data-plane listener", &runs.0),
        ("admin listener", &runs.1),
    ] {
        let text = show(out);
        // Proof that something ran, with the right credentials.
        assert!(
            text.contains(" generated, "),
            "{name}: schemathesis generated no test cases:\n{text}"
        );
        assert!(
            !text.contains("Authentication failed"),
            "{name}: every request was refused as unauthenticated:\n{text}"
        );
        if !out.status.success() {
            failures.push(format!("== {name}\n{text}"));
        } else {
            let summary: Vec<&str> = text
                .lines()
                .filter(|l| l.contains(" generated, ") || l.contains("Tested:"))
                .collect();
            eprintln!("{name}:\n{}", summary.join("\n"));
        }
    }
    let _ = std::fs::remove_dir_all(&reports);
    assert!(
        failures.is_empty(),
        "schemathesis found problems:\n{}",
        failures.join("\n")
    );
}
