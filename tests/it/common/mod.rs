//! Test harness: a real tollgate on port 0 against the real Redis and Postgres.
//!
//! Every [`TestApp`] gets its own Postgres database (created by tollgate's own start-up path,
//! then migrated) and its own Redis namespace, so tests run in parallel and see nothing of each
//! other. Dropping it stops the server, drops the database and deletes the namespace's keys.
//! Redis and Postgres must be running: a test fails loudly when they are not, it never skips.
//!
//! Environment: `TEST_REDIS_URL` (default `redis://127.0.0.1:6379`), `TEST_DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432`, a server URL without a database name).

pub mod alone;
pub mod answer;
pub mod hot_suite;
pub mod money;
pub mod private_pg;
pub mod private_redis;
pub mod process;
pub mod proxies;
pub mod silent_relay;
pub mod tools;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tollgate::app::App;
use tollgate::config::Config;
use tollgate::http::AppState;

pub use answer::{assert_fails, Answer};
pub use money::{amount, amount_of, decimal, nanos, USD};

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn pg_server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// The usage event id of a lease: its id's first two parts, `<sid>.<nonce>` (the rest is the
/// sealed body, see `hot::lease_id`).
pub fn event_id(lease_id: &str) -> String {
    let mut parts = lease_id.splitn(3, '.');
    match (parts.next(), parts.next()) {
        (Some(sid), Some(nonce)) => format!("{sid}.{nonce}"),
        _ => lease_id.to_string(),
    }
}

pub fn encryption_key() -> String {
    base64::engine::general_purpose::STANDARD.encode([42u8; 32])
}

/// Settings a test starts from: port 0, a fresh database and namespace, tokens set.
pub fn base_settings() -> HashMap<&'static str, String> {
    let db = unique("tollgate_t_");
    HashMap::from([
        ("TOLLGATE_LISTEN", "127.0.0.1:0".to_string()),
        ("TOLLGATE_ADMIN_LISTEN", "127.0.0.1:0".to_string()),
        ("TOLLGATE_REDIS_URL", redis_url()),
        ("TOLLGATE_DATABASE_URL", format!("{}/{db}", pg_server_url())),
        ("TOLLGATE_REDIS_NAMESPACE", unique("t")),
        ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
        ("TOLLGATE_ENCRYPTION_KEY", encryption_key()),
        ("TOLLGATE_CLEANUP_INTERVAL_SECONDS", "0".to_string()),
        // The tests assert limits, exactness and shapes, not latency: on a loaded 2-core host
        // a Redis stall past the 250 ms default reads as `unavailable`, which is not what any
        // of them checks. Tests of the deadline itself set their own (fail_mode.rs).
        ("TOLLGATE_REDIS_TIMEOUT_MS", "2000".to_string()),
    ])
}

/// Fails the test loudly if Redis or Postgres is not there.
pub async fn require_services() {
    let client = redis::Client::open(redis_url()).expect("TEST_REDIS_URL is not a redis URL");
    let mut c = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .expect("Redis did not answer within 5s: start it (see README)")
    .expect("Redis is not reachable: start it (see README)");
    let _: String = redis::cmd("PING")
        .query_async(&mut c)
        .await
        .expect("Redis PING failed");
    let pg = format!("{}/postgres", pg_server_url());
    let pool = tokio::time::timeout(Duration::from_secs(5), PgPool::connect(&pg))
        .await
        .expect("Postgres did not answer within 5s: start it (see README)")
        .expect("Postgres is not reachable: start it (see README)");
    pool.close().await;
}

pub struct TestApp {
    pub data: String,
    pub admin: String,
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The access-log receiver, when `TOLLGATE_ACCESS_LOG_LISTEN` is set.
    pub access_log: Option<SocketAddr>,
    pub http: reqwest::Client,
    /// Direct access for assertions on what tollgate stored.
    pub db: PgPool,
    pub redis: redis::aio::MultiplexedConnection,
    pub namespace: String,
    pub db_name: String,
    pub db_url: String,
    pub settings: HashMap<&'static str, String>,
    pub state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    cleanup: bool,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts tollgate with the base settings, changed by `tweak`.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut HashMap<&'static str, String>)) -> TestApp {
    let mut settings = base_settings();
    tweak(&mut settings);
    spawn_app_from(settings).await
}

/// A test app on the Redis at `redis_url` (a private server, a proxy in front of one) instead
/// of the shared one, everything else as [`spawn_app`].
pub async fn spawn_app_on(redis_url: String) -> TestApp {
    spawn_app_with(move |s| {
        s.insert("TOLLGATE_REDIS_URL", redis_url);
    })
    .await
}

/// Starts tollgate with exactly these settings (a second replica reuses the first's).
pub async fn spawn_app_from(settings: HashMap<&'static str, String>) -> TestApp {
    require_services().await;
    let config = Config::from_map(&settings).expect("test settings are valid");
    let app = App::build(config).await.expect("tollgate starts");
    let (data_addr, admin_addr) = (app.data_addr(), app.admin_addr());
    let access_log = app.access_log_addr();
    let state = app.state();
    // `serve` no longer waits for Postgres before serving (it migrates in the background);
    // tests start once it is migrated, as they always did.
    let postgres = state.postgres.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        app.run(async {
            let _ = stopped.await;
        })
        .await
        .expect("tollgate runs");
    });
    tokio::time::timeout(Duration::from_secs(60), postgres.wait())
        .await
        .expect("postgres migrated within 60 s");
    let db_url = settings["TOLLGATE_DATABASE_URL"].clone();
    let db = PgPool::connect(&db_url)
        .await
        .expect("test database reachable");
    let client = redis::Client::open(
        settings["TOLLGATE_REDIS_URL"]
            .split(',')
            .next()
            .unwrap_or_default(),
    )
    .expect("redis url");
    let redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis reachable");
    TestApp {
        data: format!("http://{data_addr}"),
        admin: format!("http://{admin_addr}"),
        data_addr,
        admin_addr,
        access_log,
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .expect("http client"),
        db,
        redis,
        namespace: settings["TOLLGATE_REDIS_NAMESPACE"].clone(),
        // The path's last segment, without a query (a relay's URL carries `?sslmode=…`).
        db_name: db_url
            .rsplit('/')
            .next()
            .and_then(|last| last.split('?').next())
            .unwrap_or_default()
            .to_string(),
        db_url,
        settings,
        state,
        stop: Some(stop),
        task: Some(task),
        cleanup: true,
    }
}

/// Sum of every sample of the series `name` in Prometheus text (all label sets, or only those
/// containing `label`, e.g. `kind="timeout"`); 0 when absent.
pub fn metric_sum(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| label.is_none_or(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// HTTP helpers shared by an in-process [`TestApp`] and a [`process::TollgateProcess`].
#[allow(async_fn_in_trait)]
pub trait Api {
    fn http(&self) -> &reqwest::Client;
    /// Base URL of the data-plane listener.
    fn data_url(&self) -> &str;
    /// Base URL of the admin listener.
    fn admin_url(&self) -> &str;

    async fn admin_post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http()
            .post(format!("{}{path}", self.admin_url()))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("admin request")
    }

    async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.http()
            .get(format!("{}{path}", self.admin_url()))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("admin request")
    }

    async fn admin_patch(&self, path: &str, body: Value) -> reqwest::Response {
        self.http()
            .patch(format!("{}{path}", self.admin_url()))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .expect("admin request")
    }

    async fn admin_delete(&self, path: &str) -> reqwest::Response {
        self.http()
            .delete(format!("{}{path}", self.admin_url()))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("admin request")
    }

    /// The JSON body of `GET path` on the admin listener, whatever its status.
    async fn admin_get_json(&self, path: &str) -> Value {
        self.admin_get(path)
            .await
            .json()
            .await
            .expect("admin answers JSON")
    }

    /// Creates a key; returns (plaintext key, ApiKey JSON).
    async fn create_key(&self, body: Value) -> (String, Value) {
        let res = self.admin_post("/admin/keys", body).await;
        assert_eq!(res.status(), 201, "create key");
        let v: Value = res.json().await.expect("json");
        (
            v["key"].as_str().expect("key").to_string(),
            v["api_key"].clone(),
        )
    }

    async fn post_data(&self, path: &str, body: Value) -> reqwest::Response {
        self.http()
            .post(format!("{}{path}", self.data_url()))
            .json(&body)
            .send()
            .await
            .expect("data-plane request")
    }

    /// `POST /v1/admit` with the key in the body plus `extra` fields; returns (status, JSON).
    async fn admit(&self, key: &str, extra: Value) -> (u16, Value) {
        let mut body = json!({ "key": key });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let res = self.post_data("/v1/admit", body).await;
        let status = res.status().as_u16();
        (status, res.json().await.expect("admit answers JSON"))
    }

    /// Settles `lease_id` with `cost_usd`, an exact decimal (it goes out as written).
    async fn settle(&self, lease_id: &str, cost_usd: &str) -> (u16, Value) {
        let res = self
            .post_data(
                "/v1/settle",
                json!({"lease_id": lease_id, "cost_usd": amount(cost_usd)}),
            )
            .await;
        let status = res.status().as_u16();
        (status, res.json().await.expect("settle answers JSON"))
    }

    async fn release(&self, lease_id: &str) -> (u16, Value) {
        let res = self
            .post_data("/v1/release", json!({"lease_id": lease_id}))
            .await;
        let status = res.status().as_u16();
        (status, res.json().await.expect("release answers JSON"))
    }

    /// The `/metrics` text of the admin listener (no token needed).
    async fn metrics_text(&self) -> String {
        let res = self
            .http()
            .get(format!("{}/metrics", self.admin_url()))
            .send()
            .await
            .expect("metrics request");
        assert_eq!(res.status(), 200, "metrics answers");
        res.text().await.expect("metrics text")
    }

    /// [`metric_sum`] over a fresh scrape.
    async fn metric_sum(&self, name: &str, label: Option<&str>) -> f64 {
        metric_sum(&self.metrics_text().await, name, label)
    }
}

impl Api for TestApp {
    fn http(&self) -> &reqwest::Client {
        &self.http
    }
    fn data_url(&self) -> &str {
        &self.data
    }
    fn admin_url(&self) -> &str {
        &self.admin
    }
}

impl TestApp {
    /// The hot path as this app's settings configure it, on a connection of the test's own:
    /// for assertions and set-ups below the HTTP API (the app's own is private to its gate).
    pub fn hot_path(&self) -> tollgate::hot::admission::HotPath {
        let c = Config::from_map(&self.settings).expect("test settings are valid");
        tollgate::hot::admission::HotPath::new(
            tollgate::hot::redis::Redis::new(c.redis_urls.clone(), c.redis_timeout),
            &c.redis_namespace,
            c.rate_window,
            c.lease_ttl,
            c.lease_secrets,
        )
        .with_state_format(c.state_format)
    }

    /// [`admit_and_settle`] of `key` with these settlement fields; returns the settlement.
    pub async fn admit_and_settle(&self, key: &str, settle: Value) -> Value {
        admit_and_settle(
            &self.http,
            &self.data,
            json!({ "key": key }),
            settle,
            |_| {},
        )
        .await
        .unwrap_or_else(|e| panic!("tollgate did not answer: {e}"))
        .1
    }

    /// Settings for a second replica sharing this one's database and namespace.
    pub fn replica_settings(&self) -> HashMap<&'static str, String> {
        let mut s = self.settings.clone();
        s.insert("TOLLGATE_LISTEN", "127.0.0.1:0".into());
        s.insert("TOLLGATE_ADMIN_LISTEN", "127.0.0.1:0".into());
        s
    }

    /// A replica that shares this app's database and namespace; it cleans up nothing on drop.
    pub async fn replica(&self) -> TestApp {
        self.replica_with(|_| {}).await
    }

    /// [`TestApp::replica`] with settings of its own.
    pub async fn replica_with(
        &self,
        tweak: impl FnOnce(&mut HashMap<&'static str, String>),
    ) -> TestApp {
        let mut settings = self.replica_settings();
        tweak(&mut settings);
        let mut r = spawn_app_from(settings).await;
        r.cleanup = false;
        r
    }

    /// Stops the server gracefully (as on SIGTERM) and waits for it.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    }

    /// Every Redis key of this app's namespace.
    pub async fn namespace_keys(&self) -> Vec<String> {
        let mut c = self.redis.clone();
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}:*", self.namespace))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .expect("scan");
            out.extend(batch);
            if next == 0 {
                return out;
            }
            cursor = next;
        }
    }

    /// Deletes every Redis key of this namespace (a Redis that lost everything); returns the
    /// names deleted. tollgate's background tasks may re-create some at once (streams, the
    /// `loaded` marker, reloaded key state), so the namespace need not stay empty.
    pub async fn wipe_namespace(&self) -> Vec<String> {
        let mut c = self.redis.clone();
        let mut deleted = Vec::new();
        for k in self.namespace_keys().await {
            let n: i64 = redis::cmd("DEL")
                .arg(&k)
                .query_async(&mut c)
                .await
                .expect("del");
            if n == 1 {
                deleted.push(k);
            }
        }
        deleted
    }

    /// The usage events of the key with this id that reached Postgres.
    pub async fn usage_events_of_key(&self, key_id: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE key_id = $1::uuid")
            .bind(key_id)
            .fetch_one(&self.db)
            .await
            .expect("count usage events")
    }

    /// The usage events with this event id in Postgres: 0 or 1.
    pub async fn usage_events_with_id(&self, event_id: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM usage_events WHERE event_id = $1")
            .bind(event_id)
            .fetch_one(&self.db)
            .await
            .expect("count usage events")
    }

    /// Polls `check` until it returns true or `within` passes.
    pub async fn eventually<F, Fut>(&self, within: Duration, check: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        poll_every(Duration::from_millis(50), within, check).await
    }
}

/// Creates a key (for a fresh user unless the body names one); returns (plaintext, key id).
pub async fn new_key(app: &TestApp, mut body: Value) -> (String, String) {
    if body.get("user_id").is_none() {
        body["user_id"] = json!(unique("u-"));
    }
    let (key, api_key) = app.create_key(body).await;
    (key, api_key["id"].as_str().expect("key id").to_string())
}

/// A standalone key of user `u-1` holding `balance_usd`, an exact decimal; (plaintext, key id).
pub async fn standalone_key_holding(app: &TestApp, balance_usd: &str) -> (String, String) {
    let body = json!({"user_id": "u-1", "is_standalone": true, "initial_balance_usd": amount(balance_usd)});
    new_key(app, body).await
}

/// Runs `check` every `every` until it returns true (true) or `within` passes (false).
pub async fn poll_every<F, Fut>(every: Duration, within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// One admission with the body `admit`, then the settlement of its lease with the fields of
/// `settle` (the lease id is added), against the data plane at `data`; `granted` sees the lease
/// between the two. Both must answer 200, the settlement `settled` and no duplicate. Returns the
/// lease and the settlement's answer; `Err` only when the server could not be reached or hung up.
pub async fn admit_and_settle(
    http: &reqwest::Client,
    data: &str,
    admit: Value,
    mut settle: Value,
    granted: impl FnOnce(&str),
) -> Result<(String, Value), String> {
    let post = |path: &str, body: &Value| http.post(format!("{data}{path}")).json(body).send();
    let res = post("/v1/admit", &admit).await.map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let admitted: Value = res.json().await.map_err(|e| e.to_string())?;
    assert_eq!(status, 200, "admit: {admitted}");
    let lease = admitted["lease_id"].as_str().expect("lease_id").to_string();
    granted(&lease);
    settle["lease_id"] = json!(lease);
    let res = post("/v1/settle", &settle)
        .await
        .map_err(|e| e.to_string())?;
    let status = res.status().as_u16();
    let settled: Value = res.json().await.map_err(|e| e.to_string())?;
    assert_eq!(status, 200, "settle: {settled}");
    assert_eq!(settled["settled"], true, "{settled}");
    assert_eq!(settled["duplicate"], false, "{settled}");
    Ok((lease, settled))
}

/// Waits for the server to stop, then drops its test database and Redis namespace. Runs on
/// its own thread, so it works from `Drop`; tests use the multi-thread runtime, whose workers
/// keep shutting the server down meanwhile.
pub fn cleanup_blocking(
    server: Option<tokio::task::JoinHandle<()>>,
    db_name: Option<String>,
    redis_url: String,
    namespace: String,
) {
    let done = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            if let Some(server) = server {
                if tokio::time::timeout(Duration::from_secs(25), server)
                    .await
                    .is_err()
                {
                    eprintln!("test server did not stop within 25s");
                }
            }
            let Some(db_name) = db_name else { return };
            if let Ok(pool) = PgPool::connect(&format!("{}/postgres", pg_server_url())).await {
                let r = sqlx::query(&format!(
                    "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
                ))
                .execute(&pool)
                .await;
                if let Err(e) = r {
                    eprintln!("drop database {db_name}: {e}");
                }
                pool.close().await;
            }
            if let Ok(client) = redis::Client::open(redis_url) {
                if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                    let mut cursor: u64 = 0;
                    loop {
                        let r: Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(format!("{namespace}:*"))
                            .arg("COUNT")
                            .arg(1000)
                            .query_async(&mut c)
                            .await;
                        let Ok((next, keys)) = r else { break };
                        if !keys.is_empty() {
                            let _: Result<i64, _> =
                                redis::cmd("DEL").arg(&keys).query_async(&mut c).await;
                        }
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
            }
        });
    });
    let _ = done.join();
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let url = self.settings["TOLLGATE_REDIS_URL"]
            .split(',')
            .next()
            .unwrap_or_default()
            .to_string();
        cleanup_blocking(
            self.task.take(),
            self.cleanup.then(|| self.db_name.clone()),
            url,
            self.namespace.clone(),
        );
    }
}
