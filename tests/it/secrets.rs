//! Key material stays secret: no plaintext key, admin token or encryption key anywhere in
//! Postgres (every column of every table), in Redis (every key name and value of the
//! namespace), in a response other than the two that exist to return a key, or in the logs.
//! The recoverable copy opens only under the encryption key that sealed it, and a copy that
//! does not open is a clean error, never a 500.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use common::process::{cleanup_state, TollgateProcess};
use common::*;
use redis::Value as RedisValue;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Something that must not be found, in every form it could plausibly be stored in.
struct Needle {
    what: String,
    forms: Vec<Vec<u8>>,
}

fn needle(what: impl Into<String>, secret: &[u8]) -> Needle {
    let mut forms = vec![
        secret.to_vec(),
        hex::encode(secret).into_bytes(),
        base64::engine::general_purpose::STANDARD
            .encode(secret)
            .trim_end_matches('=')
            .as_bytes()
            .to_vec(),
    ];
    forms.retain(|f| f.len() >= 16);
    Needle {
        what: what.into(),
        forms,
    }
}

/// The needles of one plaintext API key: the whole key and its random part alone.
fn key_needles(key: &str) -> Vec<Needle> {
    let body = key.split_once('-').map(|(_, b)| b).unwrap_or(key);
    vec![
        needle(format!("plaintext key {key}"), key.as_bytes()),
        needle(format!("random part of {key}"), body.as_bytes()),
    ]
}

/// The process-wide secrets of the test settings.
fn config_needles() -> Vec<Needle> {
    let raw_key = base64::engine::general_purpose::STANDARD
        .decode(encryption_key())
        .expect("test encryption key is base64");
    vec![
        needle("admin token", ADMIN_TOKEN.as_bytes()),
        needle("encryption key (base64)", encryption_key().as_bytes()),
        needle("encryption key (raw bytes)", &raw_key),
    ]
}

fn contains(hay: &[u8], form: &[u8]) -> bool {
    hay.windows(form.len()).any(|w| w == form)
}

/// Which needles `hay` holds, described with `place`.
fn findings(place: &str, hay: &[u8], needles: &[Needle]) -> Vec<String> {
    let mut out = Vec::new();
    for n in needles {
        for f in &n.forms {
            if contains(hay, f) || contains(&hay.to_ascii_lowercase(), &f.to_ascii_lowercase()) {
                out.push(format!("{} found in {place}", n.what));
                break;
            }
        }
    }
    out
}

/// Every column of every table of the test database, each cast to text, concatenated per
/// column. bytea columns come out as hex, which the needles' hex forms cover.
async fn database_text(app: &TestApp) -> Vec<(String, Vec<u8>)> {
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT table_schema::text, table_name::text, column_name::text FROM information_schema.columns \
         WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2, 3",
    )
    .fetch_all(&app.db)
    .await
    .expect("list columns");
    assert!(
        columns
            .iter()
            .any(|(_, t, c)| t == "api_keys" && c == "key_sealed"),
        "the scan sees the keys table: {columns:?}"
    );
    let mut out = Vec::new();
    for (schema, table, column) in columns {
        let sql = format!(
            "SELECT COALESCE(string_agg(\"{column}\"::text, E'\\n'), '') FROM \"{schema}\".\"{table}\""
        );
        let text: String = sqlx::query_scalar(&sql)
            .fetch_one(&app.db)
            .await
            .expect(&sql);
        out.push((format!("{schema}.{table}.{column}"), text.into_bytes()));
    }
    out
}

fn flatten(v: &RedisValue, out: &mut Vec<u8>) {
    match v {
        RedisValue::BulkString(b) => out.extend_from_slice(b),
        RedisValue::SimpleString(s) => out.extend_from_slice(s.as_bytes()),
        RedisValue::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
        RedisValue::Double(d) => out.extend_from_slice(d.to_string().as_bytes()),
        RedisValue::Array(items) | RedisValue::Set(items) => {
            for i in items {
                flatten(i, out);
                out.push(b'\n');
            }
        }
        RedisValue::Map(pairs) => {
            for (k, v) in pairs {
                flatten(k, out);
                out.push(b'\n');
                flatten(v, out);
                out.push(b'\n');
            }
        }
        other => out.extend_from_slice(format!("{other:?}").as_bytes()),
    }
}

/// Every key name and value of the app's namespace, whatever its type.
async fn redis_text(app: &TestApp) -> Vec<(String, Vec<u8>)> {
    let mut c = app.redis.clone();
    let mut out = Vec::new();
    for key in app.namespace_keys().await {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut c)
            .await
            .expect("TYPE");
        let mut cmd = match kind.as_str() {
            "string" => redis::cmd("GET"),
            "hash" => redis::cmd("HGETALL"),
            "list" => {
                let mut c = redis::cmd("LRANGE");
                c.arg(&key).arg(0).arg(-1);
                c
            }
            "set" => redis::cmd("SMEMBERS"),
            "zset" => {
                let mut c = redis::cmd("ZRANGE");
                c.arg(&key).arg(0).arg(-1).arg("WITHSCORES");
                c
            }
            "stream" => {
                let mut c = redis::cmd("XRANGE");
                c.arg(&key).arg("-").arg("+");
                c
            }
            "none" => continue, // expired meanwhile
            other => panic!("unexpected Redis type {other} of {key}"),
        };
        if matches!(kind.as_str(), "string" | "hash" | "set") {
            cmd.arg(&key);
        }
        let v: RedisValue = cmd.query_async(&mut c).await.expect("read redis value");
        let mut bytes = key.clone().into_bytes();
        bytes.push(b'\n');
        flatten(&v, &mut bytes);
        if kind == "stream" {
            let groups: RedisValue = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&key)
                .query_async(&mut c)
                .await
                .expect("XINFO GROUPS");
            flatten(&groups, &mut bytes);
        }
        out.push((key, bytes));
    }
    out
}

async fn body_of(res: reqwest::Response) -> (u16, String) {
    let status = res.status().as_u16();
    (status, res.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_column_no_redis_value_and_no_ordinary_response_holds_key_material() {
    let app = spawn_app().await;
    let (k1, a1) = app
        .create_key(json!({"user_id": "u-1", "allowed_models": ["gpt-4o"], "allowed_providers": ["openai"]}))
        .await;
    let (k2, a2) = app
        .create_key(json!({"user_id": "u-2", "is_standalone": true, "initial_balance_usd": 5}))
        .await;
    let (k3, a3) = app
        .create_key(json!({"user_id": "u-3", "expire_days": 1, "name": "open lease"}))
        .await;
    let never_issued = format!("sk-{}", "Zq7".repeat(10) + "x9");
    let mut needles = config_needles();
    for k in [&k1, &k2, &k3, &never_issued] {
        needles.extend(key_needles(k));
    }
    let mut responses: Vec<(String, u16, String)> = Vec::new();
    let mut keep = |what: &str, (status, body): (u16, String)| {
        responses.push((what.to_string(), status, body));
    };

    // Usage: settled, released, and one lease left open.
    let (status, l1) = app
        .admit(&k1, json!({"provider": "openai", "model": "gpt-4o"}))
        .await;
    assert_eq!(status, 200, "{l1}");
    keep("admit", (status, l1.to_string()));
    let settled = app
        .post_data(
            "/v1/settle",
            json!({"lease_id": l1["lease_id"], "cost_usd": 0.25, "input_tokens": 3, "output_tokens": 4}),
        )
        .await;
    keep("settle", body_of(settled).await);
    let (status, l2) = app.admit(&k2, json!({"reserve_usd": 0.5})).await;
    assert_eq!(status, 200, "{l2}");
    let (status, _) = app.settle(l2["lease_id"].as_str().unwrap(), "0.5").await;
    assert_eq!(status, 200);
    let (status, l3) = app
        .admit(&k1, json!({"provider": "openai", "model": "gpt-4o"}))
        .await;
    assert_eq!(status, 200, "{l3}");
    app.release(l3["lease_id"].as_str().unwrap()).await;
    let (status, open) = app.admit(&k3, json!({})).await;
    assert_eq!(status, 200, "{open}");
    // An unknown key, by body and by header: cached as unknown, by hash only.
    let (status, _) = app.admit(&never_issued, json!({})).await;
    assert_eq!(status, 401);
    let res = app
        .http
        .post(format!("{}/v1/admit", app.data))
        .header("x-api-key", &never_issued)
        .send()
        .await
        .unwrap();
    keep("admit by header", body_of(res).await);

    // Every admin call but create and secret.
    let id1 = a1["id"].as_str().unwrap().to_string();
    let id2 = a2["id"].as_str().unwrap().to_string();
    let id3 = a3["id"].as_str().unwrap().to_string();
    keep(
        "get",
        body_of(app.admin_get(&format!("/admin/keys/{id1}")).await).await,
    );
    keep(
        "lookup",
        body_of(
            app.admin_post("/admin/keys/lookup", json!({"key": k1}))
                .await,
        )
        .await,
    );
    keep(
        "lookup of an unknown key",
        body_of(
            app.admin_post("/admin/keys/lookup", json!({"key": never_issued}))
                .await,
        )
        .await,
    );
    keep(
        "list",
        body_of(app.admin_get("/admin/users/u-1/keys").await).await,
    );
    keep(
        "standalone list",
        body_of(app.admin_get("/admin/standalone-keys").await).await,
    );
    keep(
        "patch",
        body_of(
            app.admin_patch(&format!("/admin/keys/{id3}"), json!({"name": "renamed"}))
                .await,
        )
        .await,
    );
    keep(
        "balance",
        body_of(
            app.admin_post(
                &format!("/admin/keys/{id2}/balance"),
                json!({"amount_usd": 1}),
            )
            .await,
        )
        .await,
    );
    keep(
        "stats",
        body_of(app.admin_get(&format!("/admin/keys/{id1}/stats")).await).await,
    );
    keep(
        "cleanup",
        body_of(
            app.admin_post("/admin/keys/cleanup-expired", json!({}))
                .await,
        )
        .await,
    );
    keep(
        "metrics",
        body_of(
            app.http
                .get(format!("{}/metrics", app.admin))
                .send()
                .await
                .unwrap(),
        )
        .await,
    );
    keep(
        "readyz",
        body_of(
            app.http
                .get(format!("{}/readyz", app.data))
                .send()
                .await
                .unwrap(),
        )
        .await,
    );

    for (id, key) in [(&id1, &k1), (&id2, &k2), (&id3, &k3)] {
        let (status, secret) =
            body_of(app.admin_get(&format!("/admin/keys/{id}/secret")).await).await;
        assert_eq!(status, 200, "{secret}");
        let v: Value = serde_json::from_str(&secret).unwrap();
        assert_eq!(
            v,
            json!({ "key": key }),
            "the secret call returns the plaintext"
        );
    }

    let synced = app
        .eventually(Duration::from_secs(15), || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events")
                .fetch_one(&app.db)
                .await
                .unwrap();
            n == 2
        })
        .await;
    assert!(synced, "both settlements reached Postgres");

    let mut found = Vec::new();
    for (what, status, body) in &responses {
        assert!(*status < 500, "{what}: {status} {body}");
        found.extend(findings(
            &format!("the {what} response"),
            body.as_bytes(),
            &needles,
        ));
    }
    let db = database_text(&app).await;
    for (column, text) in &db {
        found.extend(findings(&format!("column {column}"), text, &needles));
    }
    let redis = redis_text(&app).await;
    assert!(
        redis.len() >= 5,
        "the namespace has the keys' state: {:?}",
        redis.iter().map(|r| &r.0).collect::<Vec<_>>()
    );
    for (key, bytes) in &redis {
        found.extend(findings(&format!("redis key {key}"), bytes, &needles));
    }
    assert!(
        found.is_empty(),
        "key material leaked:\n{}",
        found.join("\n")
    );

    // The scan can see: what is meant to be stored is found by the same search.
    let hash1 = hex::encode(Sha256::digest(k1.as_bytes()));
    let stored = [needle("key hash", hash1.as_bytes())];
    assert!(
        db.iter()
            .any(|(_, t)| !findings("db", t, &stored).is_empty()),
        "the database scan finds the key hash"
    );
    let ids = [needle("key id", id1.as_bytes())];
    assert!(
        redis
            .iter()
            .any(|(_, b)| !findings("redis", b, &ids).is_empty()),
        "the Redis scan finds the key id"
    );
}

/// Settings of a second app on the same database and namespace as `app`.
fn sharing(
    app: &TestApp,
    tweak: impl FnOnce(&mut HashMap<&'static str, String>),
) -> HashMap<&'static str, String> {
    let mut s = app.replica_settings();
    tweak(&mut s);
    s
}

async fn secret_of(app: &TestApp, id: &str) -> (u16, Value) {
    let res = app.admin_get(&format!("/admin/keys/{id}/secret")).await;
    let status = res.status().as_u16();
    (status, res.json().await.expect("secret answers JSON"))
}

fn assert_unrecoverable(got: &(u16, Value), plaintext: &str) {
    let (status, body) = got;
    assert_eq!(
        *status, 409,
        "a copy that does not open is a conflict, not a 500: {body}"
    );
    assert_eq!(body["code"], "secret_unrecoverable", "{body}");
    assert!(body["message"].is_string());
    assert!(!body.to_string().contains(plaintext), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_copy_opens_only_under_its_own_encryption_key_and_row() {
    let mut app = spawn_app().await;
    let (key_a, a) = app.create_key(json!({"user_id": "u-1"})).await;
    let id_a = a["id"].as_str().unwrap().to_string();

    let other_key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let other = spawn_app_from(sharing(&app, |s| {
        s.insert("TOLLGATE_ENCRYPTION_KEY", other_key.clone());
    }))
    .await;
    assert_unrecoverable(&secret_of(&other, &id_a).await, &key_a);
    let res = other.admin_get(&format!("/admin/keys/{id_a}")).await;
    assert_eq!(res.status(), 200, "the rest of the key is readable");
    let (status, admitted) = other.admit(&key_a, json!({})).await;
    assert_eq!(status, 200, "admission needs no encryption key: {admitted}");

    // And the other way round.
    let (key_b, b) = other.create_key(json!({"user_id": "u-1"})).await;
    let id_b = b["id"].as_str().unwrap().to_string();
    let (status, v) = secret_of(&other, &id_b).await;
    assert_eq!((status, v), (200, json!({ "key": key_b })));
    assert_unrecoverable(&secret_of(&app, &id_b).await, &key_b);
    let (status, v) = secret_of(&app, &id_a).await;
    assert_eq!(
        (status, v),
        (200, json!({ "key": key_a })),
        "the right key still opens it"
    );

    // The key id is bound into the seal: a copy moved to another row does not open there.
    let (key_c, c) = app.create_key(json!({"user_id": "u-1"})).await;
    let id_c = Uuid::parse_str(c["id"].as_str().unwrap()).unwrap();
    let uuid_a = Uuid::parse_str(&id_a).unwrap();
    sqlx::query("UPDATE api_keys SET key_sealed = (SELECT key_sealed FROM api_keys WHERE id = $1) WHERE id = $2")
        .bind(uuid_a)
        .bind(id_c)
        .execute(&app.db)
        .await
        .unwrap();
    let got = secret_of(&app, &id_c.to_string()).await;
    assert_unrecoverable(&got, &key_a);
    assert!(!got.1.to_string().contains(&key_c));

    // Tampered, truncated, empty, unknown format: all the same clean answer.
    for sql in [
        // One byte flipped (XOR, so it differs whatever it was: setting it to a fixed value
        // left the copy intact once in 256 runs).
        "UPDATE api_keys SET key_sealed = set_byte(key_sealed, 19, get_byte(key_sealed, 19) # 255) WHERE id = $1",
        "UPDATE api_keys SET key_sealed = substring(key_sealed from 1 for 10) WHERE id = $1",
        "UPDATE api_keys SET key_sealed = ''::bytea WHERE id = $1",
        "UPDATE api_keys SET key_sealed = '\\x09'::bytea || substring(key_sealed from 2) WHERE id = $1",
    ] {
        let (key_d, d) = app.create_key(json!({"user_id": "u-1"})).await;
        let id_d = Uuid::parse_str(d["id"].as_str().unwrap()).unwrap();
        sqlx::query(sql).bind(id_d).execute(&app.db).await.expect(sql);
        assert_unrecoverable(&secret_of(&app, &id_d.to_string()).await, &key_d);
    }

    // The second app shares the database: stop the first, then let each clean up.
    app.stop().await;
    drop(other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_encryption_key_no_key_is_created_and_none_is_revealed() {
    let mut app = spawn_app().await;
    let (key, k) = app.create_key(json!({"user_id": "u-1"})).await;
    let id = k["id"].as_str().unwrap().to_string();
    let keyless = spawn_app_from(sharing(&app, |s| {
        s.remove("TOLLGATE_ENCRYPTION_KEY");
    }))
    .await;
    let res = keyless
        .admin_post("/admin/keys", json!({"user_id": "u-2"}))
        .await;
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "encryption_unavailable");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(n, 1, "no key without a recoverable copy");
    let (status, body) = secret_of(&keyless, &id).await;
    assert_eq!(
        (status, &body["code"]),
        (503, &json!("encryption_unavailable")),
        "{body}"
    );
    assert!(!body.to_string().contains(&key));
    let (status, _) = keyless.admit(&key, json!({})).await;
    assert_eq!(status, 200, "admission needs no encryption key");
    app.stop().await;
    drop(keyless);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logs_never_show_key_material() {
    require_services().await;
    let settings = base_settings();
    let mut p = TollgateProcess::start(&settings).await;
    let (key, k) = p
        .create_key(json!({"user_id": "u-1", "is_standalone": true, "initial_balance_usd": 1}))
        .await;
    let id = k["id"].as_str().unwrap().to_string();
    let unknown = format!("sk-{}", "Lg9".repeat(10) + "q2");
    let (status, lease) = p.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{lease}");
    let (status, _) = p
        .settle_raw(json!({"lease_id": lease["lease_id"], "cost_usd": 0.5}).to_string())
        .await
        .unwrap();
    assert_eq!(status, 200);
    p.admit(&unknown, json!({})).await;
    p.admin_post("/admin/keys/lookup", json!({"key": key}))
        .await;
    p.admin_post("/admin/keys/lookup", json!({"key": unknown}))
        .await;
    let res = p.admin_get(&format!("/admin/keys/{id}/secret")).await;
    assert_eq!(res.status(), 200);
    p.admin_post(
        &format!("/admin/keys/{id}/balance"),
        json!({"amount_usd": -0.1}),
    )
    .await;
    // Keys where they do not belong: in wrongly typed fields, as a field name, as a path.
    for body in [
        json!({"key": [key]}),
        json!({ key.clone(): 1 }),
        json!({"key": 5, "model": key}),
    ] {
        p.http
            .post(format!("{}/v1/admit", p.data))
            .json(&body)
            .send()
            .await
            .unwrap();
        p.admin_post("/admin/keys", body.clone()).await;
    }
    p.http
        .post(format!("{}/admin/keys/lookup", p.admin))
        .header("authorization", format!("Bearer {key}"))
        .json(&json!({"key": key}))
        .send()
        .await
        .unwrap();
    p.http
        .get(format!("{}/auth", p.data))
        .bearer_auth(&unknown)
        .send()
        .await
        .unwrap();
    p.admin_get(&format!("/admin/keys/{key}")).await;
    let synced = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let res = p.admin_get(&format!("/admin/keys/{id}")).await;
            let v: Value = res.json().await.unwrap();
            if nanos(&v["balance_used_usd"]) == 500_000_000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(synced.is_ok(), "usage synced");
    let exit = p.terminate(Duration::from_secs(30)).await;
    assert!(exit.is_some_and(|s| s.success()), "graceful exit: {exit:?}");

    let logs = p.logs();
    assert!(
        logs.contains(&id),
        "the logs are captured (they name the key id):\n{logs}"
    );
    let mut needles = config_needles();
    needles.extend(key_needles(&key));
    needles.extend(key_needles(&unknown));
    let found = findings("the logs", logs.as_bytes(), &needles);
    assert!(found.is_empty(), "{found:?}\n{logs}");
    drop(p);
    cleanup_state(&settings);
}
