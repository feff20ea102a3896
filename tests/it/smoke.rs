//! The harness itself: a server starts on port 0 with its own database and namespace, and
//! dropping it leaves nothing behind.

use crate::common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_app_cleans_up_its_database_and_namespace() {
    let app = spawn_app().await;
    let (key, _) = app.create_key(json!({"user_id": "u-1"})).await;
    let (status, body) = app.admit(&key, json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert!(!app.namespace_keys().await.is_empty());
    let (db_name, ns) = (app.db_name.clone(), app.namespace.clone());
    drop(app);

    let pool = sqlx::PgPool::connect(&format!("{}/postgres", pg_server_url()))
        .await
        .unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&db_name)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!exists, "test database {db_name} was dropped");
    let mut c = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:*"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(keys.is_empty(), "namespace keys left: {keys:?}");
}
