//! The admin API of the contract, call by call, against a real server, Postgres and Redis:
//! statuses, codes, defaults, validation, PATCH semantics, balances (exact to the nano-dollar),
//! statistics, expiry clean-up, the periodic sweeper and the bearer token.

use crate::common;

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use common::*;
use serde_json::{json, Value};
use uuid::Uuid;

/// Status and JSON body of a response; fails when the body is not JSON.
async fn read(res: reqwest::Response) -> (u16, Value) {
    let status = res.status().as_u16();
    let text = res.text().await.expect("response body");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    (status, body)
}

/// Asserts the contract's error shape with this status and code.
fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    let (s, body) = got;
    assert_eq!(*s, status, "status of {body}");
    assert_eq!(body["code"], code, "code of {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error has a message: {body}"
    );
}

fn time(v: &Value) -> DateTime<Utc> {
    let s = v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}"));
    DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}

fn id_of(key: &Value) -> String {
    key["id"].as_str().expect("id").to_string()
}

async fn get_key(app: &TestApp, id: &str) -> (u16, Value) {
    read(app.admin_get(&format!("/admin/keys/{id}")).await).await
}

async fn adjust(app: &TestApp, id: &str, amount: Value) -> (u16, Value) {
    read(
        app.admin_post(
            &format!("/admin/keys/{id}/balance"),
            json!({ "amount_usd": amount }),
        )
        .await,
    )
    .await
}

async fn row_count(app: &TestApp, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.db).await.expect(sql)
}

// ---------------------------------------------------------------------------------------------
// create

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_applies_the_defaults_of_a_new_key() {
    let app = spawn_app().await;
    let before = Utc::now() - chrono::Duration::seconds(2);
    let res = app
        .admin_post("/admin/keys", json!({"user_id": "u-1"}))
        .await;
    let after = Utc::now() + chrono::Duration::seconds(2);
    let (status, body) = read(res).await;
    assert_eq!(status, 201, "{body}");

    let key = body["key"].as_str().expect("plaintext key");
    let tail = key.strip_prefix("sk-").expect("key starts with sk-");
    assert_eq!(tail.len(), 32, "{key}");
    assert!(tail.bytes().all(|b| b.is_ascii_alphanumeric()), "{key}");

    let k = &body["api_key"];
    Uuid::parse_str(k["id"].as_str().expect("id")).expect("id is a UUID");
    assert_eq!(k["user_id"], "u-1");
    assert_eq!(
        k["display"].as_str().expect("display"),
        format!("sk-{}…{}", &tail[..4], &tail[28..]),
        "display form"
    );
    assert!(
        !k.to_string().contains(tail),
        "the ApiKey object holds no plaintext: {k}"
    );

    let name = k["name"].as_str().expect("name");
    let stamp = name.strip_prefix("API Key ").expect("default name");
    let named_at = NaiveDateTime::parse_from_str(stamp, "%Y%m%d%H%M%S")
        .expect("name is API Key YYYYmmddHHMMSS")
        .and_utc();
    assert!(
        named_at >= before && named_at <= after,
        "name {name} is now in UTC"
    );

    assert_eq!(k["rate_limit"], 100);
    assert_eq!(k["concurrent_limit"], 5);
    assert_eq!(k["expires_at"], Value::Null);
    assert_eq!(k["is_active"], true);
    assert_eq!(k["is_standalone"], false);
    assert_eq!(k["auto_delete_on_expiry"], false);
    assert_eq!(k["allowed_providers"], Value::Null);
    assert_eq!(k["allowed_api_formats"], Value::Null);
    assert_eq!(k["allowed_models"], Value::Null);
    assert_eq!(k["current_balance_usd"], Value::Null);
    assert_eq!(k["remaining_balance_usd"], Value::Null);
    assert_eq!(nanos(&k["balance_used_usd"]), 0);
    assert_eq!(k["last_used_at"], Value::Null);
    let created = time(&k["created_at"]);
    assert!(
        created >= before && created <= after,
        "created_at {created}"
    );
    time(&k["updated_at"]);

    // The new key admits at once, with the default limits.
    let (status, admitted) = app.admit(key, json!({})).await;
    assert_eq!(status, 200, "{admitted}");
    assert_eq!(admitted["key_id"], k["id"]);
    assert_eq!(admitted["rate_limit"]["limit"], 100);
    assert_eq!(admitted["concurrency"]["limit"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_stores_empty_allow_lists_as_null_and_keeps_given_ones() {
    let app = spawn_app().await;
    let (_, k) = app
        .create_key(json!({
            "user_id": "u-1", "name": "  ci key  ",
            "allowed_providers": [], "allowed_api_formats": ["openai:chat"],
            "allowed_models": ["gpt-4o", "gpt-4o-mini"],
            "rate_limit": 7, "concurrent_limit": null, "auto_delete_on_expiry": true
        }))
        .await;
    assert_eq!(k["name"], "ci key");
    assert_eq!(k["allowed_providers"], Value::Null);
    assert_eq!(k["allowed_api_formats"], json!(["openai:chat"]));
    assert_eq!(k["allowed_models"], json!(["gpt-4o", "gpt-4o-mini"]));
    assert_eq!(k["rate_limit"], 7);
    assert_eq!(k["concurrent_limit"], Value::Null);
    assert_eq!(k["auto_delete_on_expiry"], true);
    let stored: (Option<Vec<String>>, Option<i32>) =
        sqlx::query_as("SELECT allowed_providers, concurrent_limit FROM api_keys WHERE id = $1")
            .bind(Uuid::parse_str(&id_of(&k)).unwrap())
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(stored, (None, None), "[] and null are stored as NULL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_days_sets_the_expiry_that_many_days_from_now() {
    let app = spawn_app().await;
    let before = Utc::now() - chrono::Duration::seconds(2);
    let (key, k) = app
        .create_key(json!({"user_id": "u-1", "expire_days": 7}))
        .await;
    let after = Utc::now() + chrono::Duration::seconds(2);
    let expires = time(&k["expires_at"]);
    let days = chrono::Duration::days(7);
    assert!(
        expires >= before + days && expires <= after + days,
        "expires_at {expires}"
    );
    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "not expired yet: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_keys_report_their_balance() {
    let app = spawn_app().await;
    let (key, k) = app
        .create_key(json!({"user_id": "u-1", "is_standalone": true, "initial_balance_usd": 12.5}))
        .await;
    assert_eq!(k["is_standalone"], true);
    assert_eq!(decimal(&k["current_balance_usd"]), "12.5");
    assert_eq!(decimal(&k["remaining_balance_usd"]), "12.5");
    assert_eq!(nanos(&k["balance_used_usd"]), 0);
    let (status, admitted) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{admitted}");
    assert_eq!(decimal(&admitted["balance_remaining_usd"]), "12.5");

    // Standalone without a balance: unlimited, so both balances are null.
    let (key, k) = app
        .create_key(json!({"user_id": "u-1", "is_standalone": true}))
        .await;
    assert_eq!(k["current_balance_usd"], Value::Null);
    assert_eq!(k["remaining_balance_usd"], Value::Null);
    let (status, admitted) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{admitted}");
    assert_eq!(admitted["balance_remaining_usd"], Value::Null);

    // A zero balance is a balance: nothing is admitted.
    let (key, k) = app
        .create_key(json!({"user_id": "u-1", "is_standalone": true, "initial_balance_usd": 0}))
        .await;
    assert_eq!(nanos(&k["current_balance_usd"]), 0);
    hot_suite::admit(&app, hot_suite::with_key(&key, json!({})))
        .await
        .denied(402, "balance_exhausted", "nothing remains");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_rejects_invalid_bodies_and_stores_nothing() {
    let app = spawn_app().await;
    let long = "x".repeat(129);
    #[rustfmt::skip]
    let cases: Vec<(Value, &str)> = vec![
        (json!({}), "bad_request"),
        (json!({"user_id": ""}), "bad_request"),
        (json!({"user_id": "   "}), "bad_request"),
        (json!({"user_id": long}), "bad_request"),
        (json!({"user_id": null}), "bad_request"),
        (json!({"user_id": 5}), "bad_request"),
        (json!({"user_id": "u", "rate_limit": 0}), "bad_request"),
        (json!({"user_id": "u", "rate_limit": -3}), "bad_request"),
        (json!({"user_id": "u", "rate_limit": "10"}), "bad_request"),
        (json!({"user_id": "u", "rate_limit": 1.5}), "bad_request"),
        (json!({"user_id": "u", "rate_limit": 1e30}), "bad_request"),
        (json!({"user_id": "u", "concurrent_limit": -1}), "bad_request"),
        (json!({"user_id": "u", "concurrent_limit": 0}), "bad_request"),
        (json!({"user_id": "u", "expire_days": 0}), "bad_request"),
        (json!({"user_id": "u", "expire_days": -1}), "bad_request"),
        (json!({"user_id": "u", "is_standalone": true, "initial_balance_usd": -1}), "bad_request"),
        (json!({"user_id": "u", "is_standalone": true, "initial_balance_usd": "5"}), "bad_request"),
        (json!({"user_id": "u", "is_standalone": true, "initial_balance_usd": 1e-12}), "bad_request"),
        (json!({"user_id": "u", "initial_balance_usd": 5}), "bad_request"),
        (json!({"user_id": "u", "is_standalone": false, "initial_balance_usd": 5}), "bad_request"),
        (json!({"user_id": "u", "is_standalone": "yes"}), "bad_request"),
        (json!({"user_id": "u", "allowed_models": "gpt-4o"}), "bad_request"),
        (json!({"user_id": "u", "allowed_models": [1]}), "bad_request"),
        (json!({"user_id": "u", "allowed_models": [""]}), "bad_request"),
        (json!({"user_id": "u", "name": 5}), "bad_request"),
        (json!({"user_id": "u", "name": ""}), "bad_request"),
        (json!({"user_id": "u", "auto_delete_on_expiry": "true"}), "bad_request"),
        (json!({"user_id": "u", "colour": "red"}), "unknown_field"),
        (json!({"user_id": "u", "is_active": false}), "unknown_field"),
        (json!({"user_id": "u", "balance_used_usd": 0}), "unknown_field"),
        (json!(["u"]), "bad_request"),
        (json!("u"), "bad_request"),
    ];
    for (body, code) in cases {
        let got = read(app.admin_post("/admin/keys", body.clone()).await).await;
        assert_eq!(got.0, 400, "{body} → {}", got.1);
        assert_error(&got, 400, code);
    }
    assert_eq!(row_count(&app, "SELECT count(*) FROM api_keys").await, 0);

    // The bounds themselves are valid.
    let (_, k) = app.create_key(json!({"user_id": "x".repeat(128), "rate_limit": 1, "concurrent_limit": 1, "expire_days": 1})).await;
    assert_eq!(k["user_id"].as_str().unwrap().len(), 128);
    assert_eq!(row_count(&app, "SELECT count(*) FROM api_keys").await, 1);
}

// ---------------------------------------------------------------------------------------------
// get, lookup, secret

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_lookup_and_secret_find_the_key() {
    let app = spawn_app().await;
    let (key, k) = app
        .create_key(json!({"user_id": "u-1", "allowed_models": ["m"]}))
        .await;
    let id = id_of(&k);

    let (status, got) = get_key(&app, &id).await;
    assert_eq!(status, 200);
    assert_eq!(got, k, "GET returns the created ApiKey");

    let (status, found) = read(
        app.admin_post("/admin/keys/lookup", json!({"key": key}))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["id"], k["id"]);

    let (status, secret) = read(app.admin_get(&format!("/admin/keys/{id}/secret")).await).await;
    assert_eq!(status, 200, "{secret}");
    assert_eq!(
        secret,
        json!({ "key": key }),
        "the secret is the plaintext shown at creation"
    );

    let missing = Uuid::new_v4();
    assert_error(&get_key(&app, &missing.to_string()).await, 404, "not_found");
    assert_error(&get_key(&app, "not-a-uuid").await, 404, "not_found");
    let other = format!("sk-{}", "A".repeat(32));
    let lookup = "/admin/keys/lookup";
    #[rustfmt::skip]
    let refused = [
        (app.admin_get(&format!("/admin/keys/{missing}/secret")).await, 404, "not_found"),
        (app.admin_get("/admin/keys/xyz/secret").await, 404, "not_found"),
        (app.admin_post(lookup, json!({ "key": other })).await, 404, "not_found"),
        (app.admin_post(lookup, json!({})).await, 400, "bad_request"),
        (app.admin_post(lookup, json!({"key": key, "id": id})).await, 400, "unknown_field"),
    ];
    for (res, status, code) in refused {
        assert_fails(res, status, code).await;
    }
}

// ---------------------------------------------------------------------------------------------
// listings

fn ids(list: &Value) -> Vec<String> {
    list["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("no keys array: {list}"))
        .iter()
        .map(id_of)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_listing_excludes_standalone_keys_filters_and_sorts_newest_first() {
    let app = spawn_app().await;
    let user = "alice@example.com";
    let mut created = Vec::new();
    for i in 0..3 {
        let (_, k) = app
            .create_key(json!({"user_id": user, "name": format!("k{i}")}))
            .await;
        created.push(id_of(&k));
    }
    app.create_key(json!({"user_id": user, "is_standalone": true}))
        .await;
    app.create_key(json!({"user_id": "bob"})).await;
    let (status, disabled) = read(
        app.admin_delete(&format!("/admin/keys/{}", created[1]))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{disabled}");

    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    let path = "/admin/users/alice%40example.com/keys";
    let (status, all) = read(app.admin_get(path).await).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(
        ids(&all),
        newest_first,
        "the user's own keys, newest first, no standalone"
    );
    assert!(all["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["user_id"] == user));

    let (_, active) = read(app.admin_get(&format!("{path}?is_active=true")).await).await;
    assert_eq!(ids(&active), vec![created[2].clone(), created[0].clone()]);
    let (_, inactive) = read(app.admin_get(&format!("{path}?is_active=false")).await).await;
    assert_eq!(ids(&inactive), vec![created[1].clone()]);

    assert_fails(
        app.admin_get(&format!("{path}?is_active=maybe")).await,
        400,
        "bad_request",
    )
    .await;
    let (status, none) = read(app.admin_get("/admin/users/nobody/keys").await).await;
    assert_eq!((status, none), (200, json!({"keys": []})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_listing_returns_only_standalone_keys_newest_first() {
    let app = spawn_app().await;
    let mut created = Vec::new();
    for user in ["a", "b", "c"] {
        let (_, k) = app
            .create_key(json!({"user_id": user, "is_standalone": true, "initial_balance_usd": 1}))
            .await;
        created.push(id_of(&k));
    }
    app.create_key(json!({"user_id": "a"})).await;
    let (status, _) = read(
        app.admin_delete(&format!("/admin/keys/{}", created[0]))
            .await,
    )
    .await;
    assert_eq!(status, 200);

    let (status, all) = read(app.admin_get("/admin/standalone-keys").await).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(ids(&all), created.iter().rev().cloned().collect::<Vec<_>>());
    assert!(all["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["is_standalone"] == true));
    let (_, active) = read(app.admin_get("/admin/standalone-keys?is_active=true").await).await;
    assert_eq!(ids(&active), vec![created[2].clone(), created[1].clone()]);
    let (_, inactive) = read(
        app.admin_get("/admin/standalone-keys?is_active=false")
            .await,
    )
    .await;
    assert_eq!(ids(&inactive), vec![created[0].clone()]);
    assert_fails(
        app.admin_get("/admin/standalone-keys?is_active=1").await,
        400,
        "bad_request",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// PATCH and DELETE

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_leaves_absent_fields_and_clears_null_ones() {
    let app = spawn_app().await;
    let (key, k) = app
        .create_key(json!({
            "user_id": "u-1", "name": "before", "allowed_providers": ["openai"],
            "allowed_models": ["gpt-4o"], "rate_limit": 10, "concurrent_limit": 2, "expire_days": 3
        }))
        .await;
    let id = id_of(&k);
    let path = format!("/admin/keys/{id}");

    let (status, renamed) = read(app.admin_patch(&path, json!({"name": "after"})).await).await;
    assert_eq!(status, 200, "{renamed}");
    assert_eq!(renamed["name"], "after");
    for field in [
        "user_id",
        "allowed_providers",
        "allowed_api_formats",
        "allowed_models",
        "rate_limit",
        "concurrent_limit",
        "expires_at",
        "is_active",
        "auto_delete_on_expiry",
        "created_at",
    ] {
        assert_eq!(
            renamed[field], k[field],
            "{field} is unchanged by an absent field"
        );
    }
    assert!(
        time(&renamed["updated_at"]) > time(&k["updated_at"]),
        "updated_at moves"
    );

    let (status, cleared) = read(
        app.admin_patch(
            &path,
            json!({"rate_limit": null, "concurrent_limit": null, "expires_at": null,
                   "allowed_models": null, "allowed_providers": [], "auto_delete_on_expiry": null}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{cleared}");
    for field in [
        "rate_limit",
        "concurrent_limit",
        "expires_at",
        "allowed_models",
        "allowed_providers",
        "auto_delete_on_expiry",
    ] {
        assert_eq!(cleared[field], Value::Null, "{field} cleared");
    }
    assert_eq!(cleared["name"], "after");
    assert!(time(&cleared["updated_at"]) > time(&renamed["updated_at"]));

    // Cleared means unlimited and unrestricted for the next admission.
    let (status, admitted) = app
        .admit(&key, json!({"provider": "anthropic", "model": "claude"}))
        .await;
    assert_eq!(status, 200, "{admitted}");
    assert_eq!(admitted["rate_limit"]["limit"], Value::Null);
    assert_eq!(admitted["concurrency"]["limit"], Value::Null);

    let (status, set) = read(
        app.admin_patch(
            &path,
            json!({"expires_at": "2030-01-01T01:00:00+01:00", "rate_limit": 3,
                   "allowed_api_formats": ["openai:chat"], "is_active": false}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{set}");
    assert_eq!(
        time(&set["expires_at"]),
        Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap()
    );
    assert_eq!(set["rate_limit"], 3);
    assert_eq!(set["allowed_api_formats"], json!(["openai:chat"]));
    assert_eq!(set["is_active"], false);
    let (status, back) = read(app.admin_patch(&path, json!({"is_active": true})).await).await;
    assert_eq!((status, &back["is_active"]), (200, &json!(true)));
    let (_, stored) = get_key(&app, &id).await;
    assert_eq!(stored, back, "GET shows what PATCH answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_rejects_unknown_fields_and_bad_values_and_changes_nothing() {
    let app = spawn_app().await;
    let (_, k) = app.create_key(json!({"user_id": "u-1"})).await;
    let id = id_of(&k);
    let path = format!("/admin/keys/{id}");
    let version = || async {
        let v: i64 = sqlx::query_scalar("SELECT version FROM api_keys WHERE id = $1")
            .bind(Uuid::parse_str(&id).unwrap())
            .fetch_one(&app.db)
            .await
            .unwrap();
        v
    };
    let v0 = version().await;
    for field in [
        "user_id",
        "is_standalone",
        "current_balance_usd",
        "key",
        "id",
        "expire_days",
    ] {
        let got = read(
            app.admin_patch(&path, json!({ field: "x", "name": "n" }))
                .await,
        )
        .await;
        assert_error(&got, 400, "unknown_field");
    }
    for body in [
        json!({"rate_limit": 0}),
        json!({"concurrent_limit": -1}),
        json!({"rate_limit": "5"}),
        json!({"expires_at": "tomorrow"}),
        json!({"expires_at": 12}),
        json!({"is_active": "false"}),
        json!({"is_active": null}),
        json!({"name": null}),
        json!({"name": ""}),
        json!({"allowed_models": "gpt-4o"}),
        json!({"auto_delete_on_expiry": 1}),
        json!([]),
    ] {
        let got = read(app.admin_patch(&path, body.clone()).await).await;
        assert_eq!(got.0, 400, "{body} → {}", got.1);
        assert_error(&got, 400, "bad_request");
    }
    assert_eq!(version().await, v0, "a rejected PATCH writes nothing");
    let (_, now) = get_key(&app, &id).await;
    assert_eq!(now, k);

    let missing = format!("/admin/keys/{}", Uuid::new_v4());
    #[rustfmt::skip]
    let refused = [
        (app.admin_patch(&missing, json!({"name": "n"})).await, 404, "not_found"),
        (app.admin_patch("/admin/keys/nope", json!({"name": "n"})).await, 404, "not_found"),
    ];
    for (res, status, code) in refused {
        assert_fails(res, status, code).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_is_seen_by_the_next_admission_on_another_replica() {
    let app = spawn_app().await;
    let replica = app.replica().await;
    let (key, k) = app
        .create_key(json!({"user_id": "u-1", "allowed_models": ["a"]}))
        .await;
    let path = format!("/admin/keys/{}", id_of(&k));

    let (status, denied) = replica.admit(&key, json!({"model": "b"})).await;
    assert_eq!(
        (status, &denied["code"]),
        (403, &json!("model_not_allowed")),
        "{denied}"
    );
    let (status, _) = read(
        app.admin_patch(&path, json!({"allowed_models": null}))
            .await,
    )
    .await;
    assert_eq!(status, 200);
    let (status, admitted) = replica.admit(&key, json!({"model": "b"})).await;
    assert_eq!(
        status, 200,
        "the replica sees the cleared allow-list: {admitted}"
    );

    // One admission is already in the window: a limit of 1 leaves no room.
    let (status, _) = read(app.admin_patch(&path, json!({"rate_limit": 1})).await).await;
    assert_eq!(status, 200);
    let (status, denied) = replica.admit(&key, json!({})).await;
    assert_eq!(
        (status, &denied["code"]),
        (429, &json!("rate_limited")),
        "{denied}"
    );
    let (status, _) = read(app.admin_patch(&path, json!({"rate_limit": 2})).await).await;
    assert_eq!(status, 200);
    let (status, admitted) = replica.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{admitted}");
    assert_eq!(admitted["rate_limit"]["limit"], 2);

    let (status, _) = read(
        app.admin_patch(
            &path,
            json!({"expires_at": (Utc::now() - chrono::Duration::minutes(1)).to_rfc3339()}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200);
    let (status, denied) = replica.admit(&key, json!({})).await;
    assert_eq!(
        (status, &denied["code"]),
        (403, &json!("key_expired")),
        "{denied}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_is_a_soft_delete_and_the_key_stops_admitting_at_once() {
    let app = spawn_app().await;
    let (key, k) = app.create_key(json!({"user_id": "u-1"})).await;
    let id = id_of(&k);
    let (status, admitted) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{admitted}");

    let (status, deleted) = read(app.admin_delete(&format!("/admin/keys/{id}")).await).await;
    assert_eq!(status, 200, "{deleted}");
    assert_eq!(deleted["is_active"], false);
    assert_eq!(deleted["id"], k["id"]);
    let (status, still) = get_key(&app, &id).await;
    assert_eq!(
        (status, &still["is_active"]),
        (200, &json!(false)),
        "the row is kept"
    );
    let (status, denied) = app.admit(&key, json!({})).await;
    assert_eq!(
        (status, &denied["code"]),
        (403, &json!("key_disabled")),
        "{denied}"
    );

    #[rustfmt::skip]
    let refused = [
        (app.admin_delete(&format!("/admin/keys/{}", Uuid::new_v4())).await, 404, "not_found"),
        (app.admin_delete("/admin/keys/123").await, 404, "not_found"),
    ];
    for (res, status, code) in refused {
        assert_fails(res, status, code).await;
    }
}

// ---------------------------------------------------------------------------------------------
// balance

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_adjustments_are_exact_and_each_writes_one_ledger_row() {
    let app = spawn_app().await;
    let (key, k) = app
        .create_key(json!({"user_id": "u-1", "is_standalone": true, "initial_balance_usd": 0}))
        .await;
    let id = id_of(&k);
    let (status, after) = adjust(&app, &id, amount("0.1")).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(decimal(&after["current_balance_usd"]), "0.1");
    let (_, after) = adjust(&app, &id, amount("0.2")).await;
    assert_eq!(
        decimal(&after["current_balance_usd"]),
        "0.3",
        "0.1 + 0.2 is exactly 0.3"
    );
    assert_eq!(decimal(&after["remaining_balance_usd"]), "0.3");
    assert!(time(&after["updated_at"]) > time(&k["updated_at"]));
    for _ in 0..10 {
        let (status, _) = adjust(&app, &id, amount("0.000000001")).await;
        assert_eq!(status, 200);
    }
    let (_, after) = adjust(&app, &id, amount("-0.1")).await;
    assert_eq!(decimal(&after["current_balance_usd"]), "0.20000001");
    let (status, after) = adjust(&app, &id, amount("-0.20000001")).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(decimal(&after["current_balance_usd"]), "0");
    assert_eq!(decimal(&after["remaining_balance_usd"]), "0");
    hot_suite::admit(&app, hot_suite::with_key(&key, json!({})))
        .await
        .denied(402, "balance_exhausted", "nothing remains");
    let (_, after) = adjust(&app, &id, json!(1e-3)).await;
    assert_eq!(decimal(&after["current_balance_usd"]), "0.001");
    let (status, admitted) = app.admit(&key, json!({})).await;
    assert_eq!(
        status, 200,
        "a top-up is seen by the next admission: {admitted}"
    );
    assert_eq!(decimal(&admitted["balance_remaining_usd"]), "0.001");

    let ledger: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT amount_nanos, balance_after_nanos FROM balance_ledger WHERE key_id = $1 ORDER BY id",
    )
    .bind(Uuid::parse_str(&id).unwrap())
    .fetch_all(&app.db)
    .await
    .unwrap();
    let mut expected = vec![(100_000_000, 100_000_000), (200_000_000, 300_000_000)];
    for i in 1..=10 {
        expected.push((1, 300_000_000 + i));
    }
    expected.push((-100_000_000, 200_000_010));
    expected.push((-200_000_010, 0));
    expected.push((1_000_000, 1_000_000));
    assert_eq!(ledger, expected, "one ledger row per adjustment, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_errors_have_their_codes_and_write_no_ledger_row() {
    let app = spawn_app().await;
    let (_, plain) = app.create_key(json!({"user_id": "u-1"})).await;
    let (_, sa_id) = standalone_key_holding(&app, "1").await;

    let (other, plain_id) = (Uuid::new_v4().to_string(), id_of(&plain));
    #[rustfmt::skip]
    let refused: Vec<(&str, Value, u16, &str)> = vec![
        (&other, amount("1"), 404, "not_found"),
        ("not-a-uuid", amount("1"), 404, "not_found"),
        (&plain_id, amount("1"), 409, "not_standalone"),
        (&sa_id, amount("0"), 400, "zero_amount"),
        (&sa_id, amount("-0.0"), 400, "zero_amount"),
        (&sa_id, amount("-1.5"), 409, "insufficient_balance"),
        (&sa_id, amount("-1.000000001"), 409, "insufficient_balance"),
        (&sa_id, json!("1"), 400, "bad_request"),
        (&sa_id, json!(null), 400, "bad_request"),
        (&sa_id, amount("1e-10"), 400, "bad_request"),
        (&sa_id, amount("1e300"), 400, "bad_request"),
    ];
    for (id, usd, status, code) in refused {
        assert_error(&adjust(&app, id, usd).await, status, code);
    }
    let balance = format!("/admin/keys/{sa_id}/balance");
    assert_fails(
        app.admin_post(&balance, json!({})).await,
        400,
        "bad_request",
    )
    .await;
    let noted = json!({"amount_usd": 1, "note": "x"});
    assert_fails(app.admin_post(&balance, noted).await, 400, "unknown_field").await;
    assert_eq!(
        row_count(&app, "SELECT count(*) FROM balance_ledger").await,
        0
    );
    let (_, unchanged) = get_key(&app, &sa_id).await;
    assert_eq!(decimal(&unchanged["current_balance_usd"]), "1");

    // Exactly what remains may be deducted.
    let (status, emptied) = adjust(&app, &sa_id, amount("-1")).await;
    assert_eq!(status, 200, "{emptied}");
    assert_eq!(decimal(&emptied["remaining_balance_usd"]), "0");
    assert_error(
        &adjust(&app, &sa_id, amount("-0.000000001")).await,
        409,
        "insufficient_balance",
    );
    assert_eq!(
        row_count(&app, "SELECT count(*) FROM balance_ledger").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deduction_is_checked_against_what_remains_after_usage() {
    let app = spawn_app().await;
    let (key, k) = app
        .create_key(json!({"user_id": "u-1", "is_standalone": true, "initial_balance_usd": 1}))
        .await;
    let id = id_of(&k);
    let settled = app.admit_and_settle(&key, json!({"cost_usd": 0.7})).await;
    assert_eq!(decimal(&settled["balance_remaining_usd"]), "0.3");

    // Right after the charge, before the syncer has written it to Postgres.
    assert_error(
        &adjust(&app, &id, amount("-0.5")).await,
        409,
        "insufficient_balance",
    );

    // The charge reaches Postgres.
    hot_suite::await_balance_used(&app, &id, 700_000_000).await;
    let (_, k) = get_key(&app, &id).await;
    assert_eq!(decimal(&k["remaining_balance_usd"]), "0.3");
    assert!(k["last_used_at"].is_string(), "last_used_at is set: {k}");
    assert_error(
        &adjust(&app, &id, amount("-0.300000001")).await,
        409,
        "insufficient_balance",
    );

    let (status, after) = adjust(&app, &id, amount("-0.3")).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(decimal(&after["current_balance_usd"]), "0.7");
    assert_eq!(decimal(&after["remaining_balance_usd"]), "0");
    hot_suite::admit(&app, hot_suite::with_key(&key, json!({})))
        .await
        .denied(402, "balance_exhausted", "nothing remains");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_ups_and_charges_racing_each_other_are_all_counted() {
    let app = spawn_app().await;
    let (key, k) = app
        .create_key(
            json!({"user_id": "u-1", "is_standalone": true, "initial_balance_usd": 10,
                           "rate_limit": null, "concurrent_limit": null}),
        )
        .await;
    let id = id_of(&k);
    let mut tasks = Vec::new();
    for i in 0..30 {
        let (app_http, data, admin, key, id) = (
            app.http.clone(),
            app.data.clone(),
            app.admin.clone(),
            key.clone(),
            id.clone(),
        );
        tasks.push(tokio::spawn(async move {
            if i % 3 == 0 {
                let res = app_http
                    .post(format!("{admin}/admin/keys/{id}/balance"))
                    .bearer_auth(ADMIN_TOKEN)
                    .json(&json!({"amount_usd": 0.1}))
                    .send()
                    .await
                    .expect("top-up");
                assert_eq!(res.status(), 200);
            } else {
                let res = app_http
                    .post(format!("{data}/v1/admit"))
                    .json(&json!({"key": key}))
                    .send()
                    .await
                    .expect("admit");
                assert_eq!(res.status(), 200);
                let v: Value = res.json().await.unwrap();
                let res = app_http
                    .post(format!("{data}/v1/settle"))
                    .json(&json!({"lease_id": v["lease_id"], "cost_usd": 0.011}))
                    .send()
                    .await
                    .expect("settle");
                assert_eq!(res.status(), 200);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    // 10 + 10 × 0.1 − 20 × 0.011 = 10.78
    // Every charge reaches Postgres.
    hot_suite::await_balance_used(&app, &id, 220_000_000).await;
    let (_, k) = get_key(&app, &id).await;
    assert_eq!(decimal(&k["current_balance_usd"]), "11");
    assert_eq!(decimal(&k["remaining_balance_usd"]), "10.78");
    let (status, admitted) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(
        decimal(&admitted["balance_remaining_usd"]),
        "10.78",
        "Redis agrees"
    );
    assert_eq!(
        row_count(&app, "SELECT count(*) FROM balance_ledger").await,
        10
    );
}

// ---------------------------------------------------------------------------------------------
// stats

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_settled_usage_after_the_syncer_writes_it() {
    let app = spawn_app().await;
    let (key, k) = app
        .create_key(json!({"user_id": "u-1", "name": "stats key"}))
        .await;
    let id = id_of(&k);
    let (status, empty) = read(app.admin_get(&format!("/admin/keys/{id}/stats")).await).await;
    assert_eq!(status, 200, "{empty}");
    assert_eq!(empty["total_requests"], 0);
    assert_eq!(empty["daily_stats"], json!([]));

    app.admit_and_settle(
        &key,
        json!({"cost_usd": 0.0123, "input_tokens": 120, "output_tokens": 380, "total_tokens": 500,
               "response_time_ms": 100}),
    )
    .await;
    app.admit_and_settle(
        &key,
        json!({"cost_usd": 0.1, "input_tokens": 10, "output_tokens": 20, "response_time_ms": 200}),
    )
    .await;
    app.admit_and_settle(
        &key,
        json!({"cost_usd": 0.0000001, "total_tokens": 7, "response_time_ms": 600}),
    )
    .await;
    app.admit_and_settle(&key, json!({"cost_usd": 0})).await;

    let path = format!("/admin/keys/{id}/stats");
    let arrived = app
        .eventually(Duration::from_secs(15), || async {
            let (_, s) = read(app.admin_get(&path).await).await;
            s["total_requests"] == 4
        })
        .await;
    assert!(arrived, "settled usage reaches the stats");
    let (status, s) = read(app.admin_get(&path).await).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["key_id"], k["id"]);
    assert_eq!(s["key_name"], "stats key");
    // total_tokens defaults to input + output.
    assert_eq!(s["total_tokens"], 500 + 30 + 7, "{s}");
    assert_eq!(decimal(&s["total_cost_usd"]), "0.1123001");
    assert_eq!(
        s["avg_response_time_ms"].as_f64(),
        Some(300.0),
        "the average of the known times"
    );
    let today: chrono::NaiveDate = sqlx::query_scalar(
        "SELECT (max(created_at) AT TIME ZONE 'UTC')::date FROM usage_events WHERE key_id = $1",
    )
    .bind(Uuid::parse_str(&id).unwrap())
    .fetch_one(&app.db)
    .await
    .unwrap();
    let daily = s["daily_stats"].as_array().expect("daily_stats");
    assert_eq!(daily.len(), 1, "{s}");
    assert_eq!(daily[0]["date"], today.format("%Y-%m-%d").to_string());
    assert_eq!(daily[0]["requests"], 4);
    assert_eq!(daily[0]["tokens"], 537);
    assert_eq!(decimal(&daily[0]["cost_usd"]), "0.1123001");
}

/// One usage row, inserted the way the syncer writes it (event plus daily roll-up).
async fn insert_usage(
    app: &TestApp,
    key_id: Uuid,
    at: DateTime<Utc>,
    tokens: i64,
    cost_nanos: i64,
    rt: Option<i64>,
) {
    let mut tx = app.db.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO usage_events (event_id, key_id, user_id, provider, api_format, model, \
         input_tokens, output_tokens, total_tokens, cost_nanos, response_time_ms, status_code, \
         lease_expired, admitted_at, created_at) \
         VALUES ($1, $2, 'u-1', 'openai', 'openai:chat', 'gpt-4o', 0, $3, $3, $4, $5, 200, false, $6, $6)",
    )
    .bind(Uuid::new_v4().to_string())
    .bind(key_id)
    .bind(tokens)
    .bind(cost_nanos)
    .bind(rt)
    .bind(at)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO usage_daily AS d (key_id, day, requests, tokens, cost_nanos, \
         response_time_sum, response_time_count) VALUES ($1, ($2 AT TIME ZONE 'UTC')::date, 1, $3, $4, \
         COALESCE($5, 0), CASE WHEN $5 IS NULL THEN 0 ELSE 1 END) \
         ON CONFLICT (key_id, day) DO UPDATE SET requests = d.requests + 1, \
         tokens = d.tokens + EXCLUDED.tokens, cost_nanos = d.cost_nanos + EXCLUDED.cost_nanos, \
         response_time_sum = d.response_time_sum + EXCLUDED.response_time_sum, \
         response_time_count = d.response_time_count + EXCLUDED.response_time_count",
    )
    .bind(key_id)
    .bind(at)
    .bind(tokens)
    .bind(cost_nanos)
    .bind(rt)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

fn at(d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, d, h, 0, 0).unwrap()
}

/// (date, requests, tokens, cost text) of each day.
fn days(s: &Value) -> Vec<(String, i64, i64, String)> {
    s["daily_stats"]
        .as_array()
        .unwrap_or_else(|| panic!("no daily_stats: {s}"))
        .iter()
        .map(|d| {
            (
                d["date"].as_str().unwrap().to_string(),
                d["requests"].as_i64().unwrap(),
                d["tokens"].as_i64().unwrap(),
                decimal(&d["cost_usd"]),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_aggregate_days_oldest_first_and_honour_the_range() {
    let app = spawn_app().await;
    let (_, k) = app.create_key(json!({"user_id": "u-1"})).await;
    let (_, other) = app.create_key(json!({"user_id": "u-1"})).await;
    let id = id_of(&k);
    let kid = Uuid::parse_str(&id).unwrap();
    // Inserted out of order, to see the answer sorted.
    insert_usage(&app, kid, at(12, 9), 40, 4_000_000_000, Some(400)).await;
    insert_usage(&app, kid, at(10, 23), 10, 1_000_000_000, Some(100)).await;
    insert_usage(&app, kid, at(11, 6), 20, 2_000_000_000, None).await;
    insert_usage(&app, kid, at(11, 18), 30, 3_000_000_000, Some(300)).await;
    insert_usage(
        &app,
        Uuid::parse_str(&id_of(&other)).unwrap(),
        at(11, 7),
        999,
        9,
        Some(9),
    )
    .await;

    let stats = |query: Vec<(&'static str, String)>| {
        let (http, url) = (
            app.http.clone(),
            format!("{}/admin/keys/{id}/stats", app.admin),
        );
        async move {
            read(
                http.get(url)
                    .query(&query)
                    .bearer_auth(ADMIN_TOKEN)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };

    let (status, all) = stats(vec![]).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["total_requests"], 4);
    assert_eq!(all["total_tokens"], 100);
    assert_eq!(decimal(&all["total_cost_usd"]), "10");
    assert_eq!(
        all["avg_response_time_ms"].as_f64(),
        Some(800.0 / 3.0),
        "rows without a time are not averaged"
    );
    assert_eq!(
        days(&all),
        vec![
            ("2026-01-10".into(), 1, 10, "1".into()),
            ("2026-01-11".into(), 2, 50, "5".into()),
            ("2026-01-12".into(), 1, 40, "4".into()),
        ],
        "oldest day first"
    );

    // A range cutting 11 January in half, through to the end of the 12th.
    let (status, s) = stats(vec![
        ("start", "2026-01-11T12:00:00Z".into()),
        ("end", "2026-01-12T23:59:59Z".into()),
    ])
    .await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(
        days(&s),
        vec![
            ("2026-01-11".into(), 1, 30, "3".into()),
            ("2026-01-12".into(), 1, 40, "4".into())
        ]
    );
    assert_eq!(s["total_requests"], 2);
    assert_eq!(s["total_tokens"], 70);
    assert_eq!(decimal(&s["total_cost_usd"]), "7");
    assert_eq!(s["avg_response_time_ms"].as_f64(), Some(350.0));

    // Both ends inside one day; offsets other than Z are understood.
    let (_, s) = stats(vec![
        ("start", "2026-01-11T01:00:00+01:00".into()),
        ("end", "2026-01-11T13:00:00+01:00".into()),
    ])
    .await;
    assert_eq!(
        days(&s),
        vec![("2026-01-11".into(), 1, 20, "2".into())],
        "{s}"
    );
    assert_eq!(
        s["avg_response_time_ms"].as_f64(),
        Some(0.0),
        "no known time in range"
    );

    // The same with the `+` of the offsets not percent-encoded, as curl users write it.
    let raw = format!(
        "/admin/keys/{id}/stats?start=2026-01-11T01:00:00+01:00&end=2026-01-11T13:00:00+01:00"
    );
    let (status, s) = read(app.admin_get(&raw).await).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(
        days(&s),
        vec![("2026-01-11".into(), 1, 20, "2".into())],
        "{s}"
    );

    // Only a start; only an end; the end is inclusive.
    let (_, s) = stats(vec![("start", "2026-01-11T18:00:00Z".into())]).await;
    assert_eq!(s["total_requests"], 2, "{s}");
    let (_, s) = stats(vec![("end", "2026-01-11T06:00:00Z".into())]).await;
    assert_eq!(
        days(&s),
        vec![
            ("2026-01-10".into(), 1, 10, "1".into()),
            ("2026-01-11".into(), 1, 20, "2".into())
        ]
    );
    // A range with nothing in it.
    let (status, s) = stats(vec![
        ("start", "2025-01-01T00:00:00Z".into()),
        ("end", "2025-12-31T00:00:00Z".into()),
    ])
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        (s["total_requests"].clone(), s["daily_stats"].clone()),
        (json!(0), json!([]))
    );

    assert_error(
        &stats(vec![("start", "yesterday".into())]).await,
        400,
        "bad_request",
    );
    assert_error(
        &stats(vec![("end", "2026-01-11".into())]).await,
        400,
        "bad_request",
    );
    assert_error(
        &stats(vec![
            ("start", "2026-01-12T00:00:00Z".into()),
            ("end", "2026-01-11T00:00:00Z".into()),
        ])
        .await,
        400,
        "bad_request",
    );
    assert_fails(
        app.admin_get(&format!("/admin/keys/{}/stats", Uuid::new_v4()))
            .await,
        404,
        "not_found",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// expiry clean-up

/// A key with this `auto_delete_on_expiry` (`true`, `false` or `null`); returns its ApiKey.
async fn key_deleting(app: &TestApp, auto_delete: Value) -> Value {
    let body = json!({"user_id": "u", "auto_delete_on_expiry": auto_delete});
    app.create_key(body).await.1
}

async fn expire(app: &TestApp, id: &str) {
    let (status, body) = read(
        app.admin_patch(
            &format!("/admin/keys/{id}"),
            json!({"expires_at": "2020-01-01T00:00:00Z"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

async fn cleanup(app: &TestApp, body: Option<Value>) -> i64 {
    let mut req = app
        .http
        .post(format!("{}/admin/keys/cleanup-expired", app.admin))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let (status, res) = read(req.send().await.expect("cleanup")).await;
    assert_eq!(status, 200, "{res}");
    res["cleaned"]
        .as_i64()
        .unwrap_or_else(|| panic!("no cleaned count: {res}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_or_disables_expired_keys_by_their_own_setting_first() {
    let app = spawn_app().await;
    let (del_key, del) = app
        .create_key(json!({"user_id": "u", "auto_delete_on_expiry": true}))
        .await;
    let keep = key_deleting(&app, json!(false)).await;
    let unset = key_deleting(&app, json!(null)).await;
    let (fresh_key, fresh) = app
        .create_key(json!({"user_id": "u", "expire_days": 1, "auto_delete_on_expiry": true}))
        .await;
    let never = key_deleting(&app, json!(true)).await;
    // Used before it expires: its usage must outlive it.
    app.admit_and_settle(&del_key, json!({"cost_usd": 0.5, "total_tokens": 10}))
        .await;
    let del_id = Uuid::parse_str(&id_of(&del)).unwrap();
    let synced = app
        .eventually(Duration::from_secs(15), || async {
            app.usage_events_of_key(&id_of(&del)).await == 1
        })
        .await;
    assert!(synced, "usage synced");
    for k in [&del, &keep, &unset] {
        expire(&app, &id_of(k)).await;
    }

    // No body: the key's own flag, else the global default (false).
    assert_eq!(cleanup(&app, None).await, 3);
    assert_error(&get_key(&app, &id_of(&del)).await, 404, "not_found");
    let (_, kept) = get_key(&app, &id_of(&keep)).await;
    assert_eq!(
        kept["is_active"], false,
        "auto_delete_on_expiry false: disabled"
    );
    let (_, unset_now) = get_key(&app, &id_of(&unset)).await;
    assert_eq!(
        unset_now["is_active"], false,
        "null and global default false: disabled"
    );
    for k in [&fresh, &never] {
        let (_, now) = get_key(&app, &id_of(k)).await;
        assert_eq!(now, *k, "keys that have not expired are untouched");
    }
    let (usage, daily): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM usage_events WHERE key_id = $1), \
         (SELECT count(*) FROM usage_daily WHERE key_id = $1)",
    )
    .bind(del_id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!((usage, daily), (1, 1), "usage of a deleted key is kept");
    let (status, denied) = app.admit(&del_key, json!({})).await;
    assert_eq!(
        (status, &denied["code"]),
        (401, &json!("key_invalid")),
        "a deleted key is unknown"
    );
    let (status, admitted) = app.admit(&fresh_key, json!({})).await;
    assert_eq!(status, 200, "{admitted}");

    // Already clean: nothing more to do; disabled keys are not deleted later.
    assert_eq!(cleanup(&app, Some(json!({"auto_delete": true}))).await, 0);
    let (status, _) = get_key(&app, &id_of(&unset)).await;
    assert_eq!(status, 200);

    // The body's auto_delete decides for keys whose own flag is null, not for the others.
    let a = key_deleting(&app, json!(null)).await;
    let b = key_deleting(&app, json!(false)).await;
    expire(&app, &id_of(&a)).await;
    expire(&app, &id_of(&b)).await;
    assert_eq!(cleanup(&app, Some(json!({"auto_delete": true}))).await, 2);
    assert_error(&get_key(&app, &id_of(&a)).await, 404, "not_found");
    let (_, b_now) = get_key(&app, &id_of(&b)).await;
    assert_eq!(b_now["is_active"], false);

    let c = key_deleting(&app, json!(null)).await;
    expire(&app, &id_of(&c)).await;
    assert_eq!(cleanup(&app, Some(json!({"auto_delete": false}))).await, 1);
    let (_, c_now) = get_key(&app, &id_of(&c)).await;
    assert_eq!(c_now["is_active"], false);

    let cleanup_path = "/admin/keys/cleanup-expired";
    #[rustfmt::skip]
    let refused = [
        (app.admin_post(cleanup_path, json!({"auto_delete": "yes"})).await, 400, "bad_request"),
        (app.admin_post(cleanup_path, json!({"force": true})).await, 400, "unknown_field"),
    ];
    for (res, status, code) in refused {
        assert_fails(res, status, code).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_falls_back_to_the_global_default() {
    let app = spawn_app_with(|s| {
        s.insert("TOLLGATE_AUTO_DELETE_EXPIRED", "true".into());
    })
    .await;
    let unset = key_deleting(&app, json!(null)).await;
    let keep = key_deleting(&app, json!(false)).await;
    let body_says_no = key_deleting(&app, json!(null)).await;
    expire(&app, &id_of(&body_says_no)).await;
    assert_eq!(
        cleanup(&app, Some(json!({"auto_delete": false}))).await,
        1,
        "the body beats the default"
    );
    let (_, disabled) = get_key(&app, &id_of(&body_says_no)).await;
    assert_eq!(disabled["is_active"], false);

    expire(&app, &id_of(&unset)).await;
    expire(&app, &id_of(&keep)).await;
    assert_eq!(cleanup(&app, Some(json!({}))).await, 2);
    assert_error(&get_key(&app, &id_of(&unset)).await, 404, "not_found");
    let (_, kept) = get_key(&app, &id_of(&keep)).await;
    assert_eq!(
        kept["is_active"], false,
        "the key's own false beats the global true"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_sweeper_cleans_up_expired_keys() {
    let app = spawn_app_with(|s| {
        s.insert("TOLLGATE_CLEANUP_INTERVAL_SECONDS", "1".into());
    })
    .await;
    let (del_key, del) = app
        .create_key(json!({"user_id": "u", "auto_delete_on_expiry": true}))
        .await;
    let (keep_key, keep) = app.create_key(json!({"user_id": "u"})).await;
    let (_, fresh) = app
        .create_key(json!({"user_id": "u", "expire_days": 1, "auto_delete_on_expiry": true}))
        .await;
    expire(&app, &id_of(&del)).await;
    expire(&app, &id_of(&keep)).await;

    let swept = app
        .eventually(Duration::from_secs(15), || async {
            let (deleted, _) = get_key(&app, &id_of(&del)).await;
            let (_, kept) = get_key(&app, &id_of(&keep)).await;
            deleted == 404 && kept["is_active"] == false
        })
        .await;
    assert!(
        swept,
        "within a few seconds the sweeper deleted one key and disabled the other"
    );
    let (_, fresh_now) = get_key(&app, &id_of(&fresh)).await;
    assert_eq!(fresh_now, fresh, "a key that has not expired is untouched");
    let (status, denied) = app.admit(&del_key, json!({})).await;
    assert_eq!((status, &denied["code"]), (401, &json!("key_invalid")));
    let (status, denied) = app.admit(&keep_key, json!({})).await;
    assert_eq!(status, 403, "{denied}");
}

// ---------------------------------------------------------------------------------------------
// auth

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_the_bearer_token() {
    let app = spawn_app().await;
    let (_, k) = app.create_key(json!({"user_id": "u-1"})).await;
    let id = id_of(&k);
    let wrong_same_length = "x".repeat(ADMIN_TOKEN.len());
    #[rustfmt::skip]
    let calls: Vec<(reqwest::Method, String, Option<Value>)> = vec![
        (reqwest::Method::POST, "/admin/keys".into(), Some(json!({"user_id": "intruder"}))),
        (reqwest::Method::GET, format!("/admin/keys/{id}"), None),
        (reqwest::Method::GET, format!("/admin/keys/{id}/secret"), None),
        (reqwest::Method::PATCH, format!("/admin/keys/{id}"), Some(json!({"rate_limit": null}))),
        (reqwest::Method::DELETE, format!("/admin/keys/{id}"), None),
        (reqwest::Method::POST, format!("/admin/keys/{id}/balance"), Some(json!({"amount_usd": 1}))),
        (reqwest::Method::GET, format!("/admin/keys/{id}/stats"), None),
        (reqwest::Method::POST, "/admin/keys/lookup".into(), Some(json!({"key": "sk-x"}))),
        (reqwest::Method::POST, "/admin/keys/cleanup-expired".into(), Some(json!({}))),
        (reqwest::Method::GET, "/admin/users/u-1/keys".into(), None),
        (reqwest::Method::GET, "/admin/standalone-keys".into(), None),
    ];
    let auths: Vec<Option<String>> = vec![
        None,
        Some("Bearer wrong".into()),
        Some(format!("Bearer {wrong_same_length}")),
        Some(format!("Bearer {ADMIN_TOKEN}x")),
        Some(format!("Basic {ADMIN_TOKEN}")),
        Some(ADMIN_TOKEN.to_string()),
        Some("Bearer".into()),
        Some("Bearer ".into()),
    ];
    for (method, path, body) in &calls {
        for auth in &auths {
            let mut req = app
                .http
                .request(method.clone(), format!("{}{path}", app.admin));
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let got = read(req.send().await.unwrap()).await;
            assert_eq!(got.0, 401, "{method} {path} with {auth:?}: {}", got.1);
            assert_error(&got, 401, "unauthorized");
        }
    }
    let (_, after) = get_key(&app, &id).await;
    assert_eq!(after, k, "nothing changed without the token");
    assert_eq!(row_count(&app, "SELECT count(*) FROM api_keys").await, 1);

    // The scheme is case-insensitive, as HTTP says.
    let res = app
        .http
        .get(format!("{}/admin/keys/{id}", app.admin))
        .header("authorization", format!("bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let res = app
        .http
        .get(format!("{}/metrics", app.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "/metrics needs no token");
    let body = res.text().await.unwrap();
    assert!(body.contains("tollgate_"), "Prometheus text: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_token_the_admin_api_is_never_open() {
    let app = spawn_app_with(|s| {
        s.remove("TOLLGATE_ADMIN_TOKEN");
    })
    .await;
    for auth in [
        None,
        Some(format!("Bearer {ADMIN_TOKEN}")),
        Some("Bearer ".to_string()),
        Some("Bearer".into()),
    ] {
        for (method, path) in [
            (reqwest::Method::POST, "/admin/keys"),
            (reqwest::Method::GET, "/admin/standalone-keys"),
            (reqwest::Method::POST, "/admin/keys/cleanup-expired"),
        ] {
            let mut req = app
                .http
                .request(method.clone(), format!("{}{path}", app.admin))
                .json(&json!({"user_id": "u"}));
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            let (status, body) = read(req.send().await.unwrap()).await;
            assert_eq!(status, 503, "{method} {path} with {auth:?}: {body}");
            assert!(
                body["code"].is_string() && body["message"].is_string(),
                "{body}"
            );
        }
    }
    assert_eq!(row_count(&app, "SELECT count(*) FROM api_keys").await, 0);
    let res = app
        .http
        .get(format!("{}/metrics", app.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "/metrics still answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_lists_the_table_in_force_to_the_admin_only() {
    let path = std::env::temp_dir().join(unique("tollgate-prices-"));
    std::fs::write(
        &path,
        r#"{"openai/gpt-4o": {"input_per_mtok_usd": 1.5, "output_per_mtok_usd": 6},
            "acme/m1": {"input_per_mtok_usd": 0.000000001, "output_per_mtok_usd": 2, "cached_input_per_mtok_usd": 0}}"#,
    )
    .expect("write prices");
    let file = path.display().to_string();
    let app = spawn_app_with(move |s| {
        s.insert("TOLLGATE_PRICES_FILE", file);
    })
    .await;
    let res = app.admin_get("/admin/prices").await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.expect("json");
    let prices = &body["prices"];
    assert_eq!(
        prices["openai/gpt-4o"],
        json!({"input_per_mtok_usd": 1.5, "output_per_mtok_usd": 6, "cached_input_per_mtok_usd": 1.5}),
        "replaced, the cached price defaulting to the input price"
    );
    let m1 = &prices["acme/m1"];
    assert_eq!(
        (
            m1["input_per_mtok_usd"].to_string(),
            m1["output_per_mtok_usd"].to_string(),
            m1["cached_input_per_mtok_usd"].to_string()
        ),
        ("0.000000001".into(), "2".into(), "0".into()),
        "added, exact: {m1}"
    );
    assert!(
        prices["anthropic/claude-sonnet-4-5"].is_object(),
        "built-in kept"
    );
    assert!(prices["gemini/gemini-2.5-pro"].is_object(), "built-in kept");
    let res = app
        .http
        .get(format!("{}/admin/prices", app.admin))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), 401, "no token, no prices");
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_limits_and_budgets_are_validated_set_and_cleared() {
    let app = spawn_app().await;
    for bad in [
        json!({"user_id": "u", "token_limit": 0}),
        json!({"user_id": "u", "token_limit": 1.5}),
        json!({"user_id": "u", "budget_usd": -1}),
        json!({"user_id": "u", "budget_period": "fortnight"}),
        json!({"user_id": "u", "budget_usd": 1, "budget_period": "Day"}),
    ] {
        let res = app.admin_post("/admin/keys", bad.clone()).await;
        assert_eq!(res.status(), 400, "{bad}");
        let body: Value = res.json().await.expect("json");
        assert_eq!(body["code"], "bad_request", "{bad}: {body}");
    }
    let (_, k) = app
        .create_key(
            json!({"user_id": "u-b", "token_limit": 5000, "budget_usd": 2.5,
            "budget_period": "week"}),
        )
        .await;
    assert_eq!(k["token_limit"], json!(5000));
    assert_eq!(k["budget_usd"].to_string(), "2.5");
    assert_eq!(k["budget_period"], json!("week"));
    assert_eq!(k["budget_spent_usd"].to_string(), "0");
    assert!(k["budget_resets_at"].is_string(), "{k}");
    let id = k["id"].as_str().expect("id");
    let res = app
        .admin_patch(
            &format!("/admin/keys/{id}"),
            json!({"token_limit": null, "budget_period": null}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let k: Value = res.json().await.expect("json");
    assert_eq!(k["token_limit"], Value::Null);
    assert_eq!(k["budget_period"], Value::Null);
    assert_eq!(k["budget_resets_at"], Value::Null, "never resets");
    assert_eq!(k["budget_usd"].to_string(), "2.5", "untouched");
    let res = app
        .admin_patch(&format!("/admin/keys/{id}"), json!({"budget_usd": null}))
        .await;
    let k: Value = res.json().await.expect("json");
    assert_eq!(k["budget_usd"], Value::Null);
}
