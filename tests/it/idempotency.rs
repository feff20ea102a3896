//! A balance adjustment retried with the same `Idempotency-Key` (its answer was lost to a
//! timeout or a crash) is applied once.

use crate::common;

use common::*;
use serde_json::{json, Value};

async fn adjust(app: &TestApp, id: &str, amount: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = app
        .http
        .post(format!("{}/admin/keys/{id}/balance", app.admin))
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(format!(r#"{{"amount_usd": {amount}}}"#));
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    let res = req.send().await.expect("balance request");
    let status = res.status().as_u16();
    (status, res.json().await.expect("JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_top_up_with_the_same_idempotency_key_is_applied_once() {
    let app = spawn_app().await;
    let (key, api_key) = app
        .create_key(json!({"user_id": "u-1", "is_standalone": true, "initial_balance_usd": 1}))
        .await;
    let id = api_key["id"].as_str().expect("id").to_string();

    for _ in 0..3 {
        let (status, body) = adjust(&app, &id, "0.5", Some("top-up-42")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["current_balance_usd"].to_string(), "1.5");
    }
    // Without a key, every call applies.
    adjust(&app, &id, "0.25", None).await;
    let (_, body) = adjust(&app, &id, "0.25", None).await;
    assert_eq!(body["current_balance_usd"].to_string(), "2");

    // The same key for another amount is a conflict, and changes nothing.
    let (status, body) = adjust(&app, &id, "7", Some("top-up-42")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );

    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM balance_ledger WHERE key_id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.db)
            .await
            .expect("ledger");
    assert_eq!(
        rows, 3,
        "one ledger row for the keyed top-up, one per unkeyed call"
    );
    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["balance_remaining_usd"].to_string(),
        "2",
        "Redis saw the same balance"
    );

    let (status, body) = adjust(&app, &id, "1", Some("bad key with spaces")).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("bad_request")));
}
