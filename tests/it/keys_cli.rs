//! `tollgate keys …` against a real tollgate: every subcommand as a table and as `--json`,
//! plaintext keys only from `create` and `secret`, and the exit codes (1 for the API's
//! refusals, with its code and message on one line; 2 for usage errors).

use crate::common;

use std::process::Output;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("--json output does not parse ({e}):\n{}", self.stdout))
    }
    fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs `tollgate keys --admin-url <admin> ARGS` with only `token` in the environment.
async fn keys_as(admin: &str, token: Option<&str>, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.arg("keys")
        .args(["--admin-url", admin])
        .args(args)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(t) = token {
        cmd.env("TOLLGATE_ADMIN_TOKEN", t);
    }
    let out: Output = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("tollgate keys {args:?} did not exit within 60s"))
        .expect("run tollgate keys");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn keys(app: &TestApp, args: &[&str]) -> Run {
    keys_as(&app.admin, Some(ADMIN_TOKEN), args).await
}

/// The value column of a FIELD/VALUE table row.
fn field<'a>(table: &'a str, name: &str) -> &'a str {
    table
        .lines()
        .find_map(|l| {
            let (f, v) = l.split_once(char::is_whitespace)?;
            (f == name).then(|| v.trim())
        })
        .unwrap_or_else(|| panic!("no row {name} in:\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_create_prints_the_plaintext_once_then_get_and_secret_behave() {
    let app = spawn_app().await;
    let run = keys(
        &app,
        &[
            "create",
            "--user",
            "u-cli",
            "--name",
            "cli key",
            "--allowed-models",
            "gpt-4o,gpt-4o-mini",
            "--rate-limit",
            "7",
            "--concurrent-limit",
            "unlimited",
            "--expire-days",
            "30",
        ],
    )
    .await
    .ok();
    let plaintext = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("key: "))
        .expect("create prints `key: …`")
        .to_string();
    assert!(
        plaintext.starts_with("sk-") && plaintext.len() == 35,
        "{plaintext}"
    );
    assert_eq!(run.stdout.matches(&plaintext).count(), 1, "{}", run.stdout);
    let id = field(&run.stdout, "id").to_string();
    assert_eq!(field(&run.stdout, "name"), "cli key");
    assert_eq!(field(&run.stdout, "allowed_models"), "gpt-4o,gpt-4o-mini");
    assert_eq!(field(&run.stdout, "rate_limit"), "7");
    assert_eq!(field(&run.stdout, "concurrent_limit"), "-");
    assert_ne!(field(&run.stdout, "expires_at"), "-");

    // get: a table, and the API's JSON with --json; never the plaintext.
    let got = keys(&app, &["get", &id]).await.ok();
    assert_eq!(field(&got.stdout, "user_id"), "u-cli");
    assert!(!got.stdout.contains(&plaintext));
    let got = keys(&app, &["get", &id, "--json"]).await.ok();
    let api = app.admin_get(&format!("/admin/keys/{id}")).await;
    let api: Value = api.json().await.expect("json");
    assert_eq!(got.json(), api, "--json prints the API's answer");
    assert!(!got.stdout.contains(&plaintext));

    // secret: the plaintext, alone (table) or as the API's JSON.
    let secret = keys(&app, &["secret", &id]).await.ok();
    assert_eq!(secret.stdout.trim(), plaintext);
    let secret = keys(&app, &["--json", "secret", &id]).await.ok();
    assert_eq!(secret.json(), json!({"key": plaintext}));

    // create --json: the API's 201 body.
    let created = keys(&app, &["create", "--user", "u-cli", "--json"])
        .await
        .ok();
    let v = created.json();
    assert!(v["key"].as_str().is_some_and(|k| k.starts_with("sk-")));
    assert_eq!(v["api_key"]["user_id"], "u-cli");
    assert_eq!(v["api_key"]["rate_limit"], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_list_shows_a_users_keys_or_the_standalone_ones_without_plaintext() {
    let app = spawn_app().await;
    let (k1, a) = app
        .create_key(json!({"user_id": "u/list 1", "name": "first"}))
        .await;
    let (k2, b) = app
        .create_key(json!({"user_id": "u/list 1", "name": "second"}))
        .await;
    let (k3, s) = app
        .create_key(json!({"user_id": "other", "is_standalone": true, "initial_balance_usd": 2.5}))
        .await;
    app.admin_delete(&format!(
        "/admin/keys/{}",
        a["id"].as_str().unwrap_or_default()
    ))
    .await;

    let run = keys(&app, &["list", "--user", "u/list 1"]).await.ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("REMAINING_USD"),
        "{}",
        run.stdout
    );
    assert_eq!(lines.len(), 3, "{}", run.stdout);
    // Newest first.
    assert!(
        lines[1].contains(b["id"].as_str().unwrap_or("?")),
        "{}",
        run.stdout
    );
    for k in [&k1, &k2, &k3] {
        assert!(
            !run.stdout.contains(k.as_str()),
            "list printed a plaintext key"
        );
    }
    let active = keys(
        &app,
        &["list", "--user", "u/list 1", "--active", "true", "--json"],
    )
    .await
    .ok()
    .json();
    let ids: Vec<&str> = active["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["id"].as_str())
        .collect();
    assert_eq!(ids, vec![b["id"].as_str().unwrap_or_default()]);

    let run = keys(&app, &["list", "--standalone"]).await.ok();
    assert!(
        run.stdout.contains(s["id"].as_str().unwrap_or("?")),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("2.5"), "{}", run.stdout);
    let v = keys(&app, &["list", "--standalone", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(v["keys"][0]["id"], s["id"]);

    let none = keys(&app, &["list", "--user", "nobody"]).await.ok();
    assert_eq!(none.stdout.trim(), "no keys");
    // --user and --standalone together, or neither: a usage error.
    assert_eq!(keys(&app, &["list"]).await.code, 2);
    assert_eq!(
        keys(&app, &["list", "--user", "x", "--standalone"])
            .await
            .code,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_update_sets_the_given_fields_and_clear_sets_them_to_null() {
    let app = spawn_app().await;
    let (_, k) = app
        .create_key(json!({"user_id": "u-up", "allowed_providers": ["openai"], "auto_delete_on_expiry": true}))
        .await;
    let id = k["id"].as_str().expect("id").to_string();
    let run = keys(
        &app,
        &[
            "update",
            &id,
            "--name",
            "renamed",
            "--rate-limit",
            "unlimited",
            "--concurrent-limit",
            "3",
            "--allowed-models",
            "m1, m2",
            "--expires-at",
            "2099-01-01T00:00:00Z",
            "--clear",
            "allowed-providers",
            "--clear",
            "auto-delete-on-expiry",
        ],
    )
    .await
    .ok();
    assert_eq!(field(&run.stdout, "name"), "renamed");
    assert_eq!(field(&run.stdout, "rate_limit"), "-");
    assert_eq!(field(&run.stdout, "concurrent_limit"), "3");
    assert_eq!(field(&run.stdout, "allowed_models"), "m1,m2");
    assert_eq!(field(&run.stdout, "allowed_providers"), "-");
    let v: Value = app
        .admin_get(&format!("/admin/keys/{id}"))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(v["rate_limit"], Value::Null);
    assert_eq!(v["allowed_providers"], Value::Null);
    assert_eq!(v["auto_delete_on_expiry"], Value::Null);
    assert_eq!(v["expires_at"], "2099-01-01T00:00:00Z");

    let v = keys(
        &app,
        &[
            "update",
            &id,
            "--active",
            "false",
            "--clear",
            "expires-at",
            "--json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(v["is_active"], false);
    assert_eq!(v["expires_at"], Value::Null);

    // The API's validation speaks through the CLI: exit 1, code and message on one line.
    let bad = keys(&app, &["update", &id, "--expires-at", "tomorrow"]).await;
    assert_eq!(bad.code, 1, "{}", bad.stderr);
    assert!(
        bad.stderr.starts_with("error: bad_request: "),
        "{}",
        bad.stderr
    );
    assert_eq!(bad.stderr.trim_end().lines().count(), 1, "{}", bad.stderr);
    // Usage errors, before any request.
    for args in [
        vec!["update", id.as_str()],
        vec![
            "update",
            id.as_str(),
            "--rate-limit",
            "5",
            "--clear",
            "rate-limit",
        ],
        vec!["update", id.as_str(), "--clear", "name"],
        vec!["update", id.as_str(), "--rate-limit", "0"],
    ] {
        let run = keys(&app, &args).await;
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_disable_stops_the_key_at_once() {
    let app = spawn_app().await;
    let (plaintext, k) = app.create_key(json!({"user_id": "u-off"})).await;
    let id = k["id"].as_str().expect("id");
    assert_eq!(app.admit(&plaintext, json!({})).await.0, 200);
    let run = keys(&app, &["disable", id]).await.ok();
    assert_eq!(field(&run.stdout, "is_active"), "false");
    let (status, body) = app.admit(&plaintext, json!({})).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("key_disabled")));
    let v = keys(&app, &["disable", id, "--json"]).await.ok().json();
    assert_eq!(v["is_active"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_balance_adds_and_deducts_exactly_and_an_idempotency_key_applies_once() {
    let app = spawn_app().await;
    let (_, k) = app
        .create_key(json!({"user_id": "u-bal", "is_standalone": true, "initial_balance_usd": 1}))
        .await;
    let id = k["id"].as_str().expect("id");
    let run = keys(&app, &["balance", id, "+0.1"]).await.ok();
    assert_eq!(field(&run.stdout, "remaining_balance_usd"), "1.1");
    let v = keys(&app, &["balance", id, "-0.000000001", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(v["remaining_balance_usd"].to_string(), "1.099999999");
    for _ in 0..2 {
        let v = keys(
            &app,
            &["balance", id, "2", "--idempotency-key", "topup-1", "--json"],
        )
        .await
        .ok()
        .json();
        assert_eq!(v["remaining_balance_usd"].to_string(), "3.099999999");
    }
    let conflict = keys(&app, &["balance", id, "3", "--idempotency-key", "topup-1"]).await;
    assert_eq!(conflict.code, 1);
    assert!(
        conflict.stderr.starts_with("error: idempotency_conflict: "),
        "{}",
        conflict.stderr
    );
    let too_much = keys(&app, &["balance", id, "-100"]).await;
    assert_eq!(too_much.code, 1);
    assert!(
        too_much.stderr.starts_with("error: insufficient_balance: "),
        "{}",
        too_much.stderr
    );
    let zero = keys(&app, &["balance", id, "0"]).await;
    assert_eq!(zero.code, 1);
    assert!(
        zero.stderr.starts_with("error: zero_amount: "),
        "{}",
        zero.stderr
    );
    let (_, plain) = app.create_key(json!({"user_id": "u-bal"})).await;
    let not = keys(&app, &["balance", plain["id"].as_str().expect("id"), "5"]).await;
    assert!(
        not.stderr.starts_with("error: not_standalone: "),
        "{}",
        not.stderr
    );
    let bad = keys(&app, &["balance", id, "five"]).await;
    assert_eq!(bad.code, 2, "{}", bad.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_stats_shows_settled_usage_per_day_within_from_and_to() {
    let app = spawn_app().await;
    let (plaintext, k) = app.create_key(json!({"user_id": "u-stats"})).await;
    let id = k["id"].as_str().expect("id").to_string();
    let empty = keys(&app, &["stats", &id]).await.ok();
    assert_eq!(field(&empty.stdout, "total_requests"), "0");
    assert!(
        empty.stdout.contains("no usage in this period"),
        "{}",
        empty.stdout
    );
    for cost in ["0.25", "0.5"] {
        let (status, admitted) = app.admit(&plaintext, json!({})).await;
        assert_eq!(status, 200);
        let lease = admitted["lease_id"].as_str().expect("lease");
        assert_eq!(app.settle(lease, cost).await.0, 200);
    }
    let synced = app
        .eventually(Duration::from_secs(10), || async {
            let run = keys(&app, &["stats", &id, "--json"]).await;
            run.code == 0 && run.json()["total_requests"] == 2
        })
        .await;
    assert!(synced, "two settlements never showed in stats");
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let run = keys(&app, &["stats", &id, "--from", &today, "--to", &today])
        .await
        .ok();
    assert_eq!(field(&run.stdout, "total_cost_usd"), "0.75");
    let day = run
        .stdout
        .lines()
        .find(|l| l.starts_with(&today))
        .unwrap_or_else(|| panic!("no row for {today}:\n{}", run.stdout));
    assert_eq!(
        day.split_whitespace().collect::<Vec<_>>(),
        vec![today.as_str(), "2", "0", "0.75"]
    );
    let v = keys(
        &app,
        &[
            "stats",
            &id,
            "--from",
            "2000-01-01",
            "--to",
            "2000-01-02",
            "--json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(v["total_requests"], 0);
    let plus = keys(
        &app,
        &[
            "stats",
            &id,
            "--from",
            "2000-01-01T00:00:00+01:00",
            "--json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(
        plus["total_requests"], 2,
        "a + offset reaches the API intact"
    );
    let bad = keys(&app, &["stats", &id, "--from", "yesterday"]).await;
    assert_eq!(bad.code, 1);
    assert!(
        bad.stderr.starts_with("error: bad_request: "),
        "{}",
        bad.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_or_an_unknown_key_id_exits_1_with_the_apis_code_and_message() {
    let app = spawn_app().await;
    let unknown = uuid::Uuid::new_v4().to_string();
    for args in [
        vec!["get", unknown.as_str()],
        vec!["secret", unknown.as_str()],
        vec!["disable", unknown.as_str()],
        vec!["update", unknown.as_str(), "--name", "x"],
        vec!["balance", unknown.as_str(), "1"],
        vec!["stats", unknown.as_str()],
        vec!["get", "not-a-uuid"],
    ] {
        let run = keys(&app, &args).await;
        assert_eq!(run.code, 1, "{args:?}");
        assert_eq!(
            run.stderr.trim_end(),
            "error: not_found: no such key",
            "{args:?}"
        );
        assert!(run.stdout.is_empty(), "{args:?}: {}", run.stdout);
    }
    for args in [
        vec!["get", unknown.as_str()],
        vec!["list", "--standalone"],
        vec!["create", "--user", "u"],
    ] {
        let run = keys_as(&app.admin, Some("wrong-token-0123456789"), &args).await;
        assert_eq!(run.code, 1, "{args:?}");
        assert_eq!(
            run.stderr.trim_end(),
            "error: unauthorized: missing or wrong admin bearer token",
            "{args:?}"
        );
    }
    // No token at all: a usage error, and no request.
    let run = keys_as(&app.admin, None, &["list", "--standalone"]).await;
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("TOLLGATE_ADMIN_TOKEN"),
        "{}",
        run.stderr
    );
    // Nothing listening: exit 1, one line.
    let run = keys_as(
        "http://127.0.0.1:9",
        Some(ADMIN_TOKEN),
        &["list", "--standalone"],
    )
    .await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.starts_with("error: unreachable: "),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.trim_end().lines().count(), 1, "{}", run.stderr);
    // Unknown subcommand or flag: clap's usage error, 2.
    assert_eq!(keys(&app, &["frobnicate"]).await.code, 2);
    assert_eq!(keys(&app, &["get"]).await.code, 2);
    // Not a plain http:// URL: a usage error, before any request.
    for url in ["ftp://x", "https://127.0.0.1:1", "127.0.0.1:8081"] {
        assert_eq!(
            keys_as(url, Some(ADMIN_TOKEN), &["get", "x"]).await.code,
            2,
            "{url}"
        );
    }
}
