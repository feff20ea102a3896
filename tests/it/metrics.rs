//! `/metrics` on the admin listener: every contract series is there and moves by exactly what
//! happened, no label value identifies a key, user or lease; and the binary's structured logs
//! are JSON lines that never contain a secret.
//!
//! Metrics are process-global, so each metric test runs alone in a process of its own
//! (`common::alone`): no other server in its process admits while it measures deltas.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use common::alone::{in_own_process, this_test};
use common::private_redis::PrivateRedis;
use common::*;
use serde_json::{json, Value};

/// One sample line of the Prometheus text format.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let name: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if name.is_empty() {
            return out;
        }
        assert_eq!(chars.next(), Some('='), "label {name} in {text}");
        assert_eq!(chars.next(), Some('"'), "label {name} in {text}");
        let mut value = String::new();
        loop {
            match chars
                .next()
                .unwrap_or_else(|| panic!("unterminated label in {text}"))
            {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => panic!("bad escape in {text}"),
                },
                c => value.push(c),
            }
        }
        out.insert(name, value);
    }
}

fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("sample line {l:?}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value in {l:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (
                    n,
                    parse_labels(rest.strip_suffix('}').expect("closing brace")),
                ),
                None => (series, BTreeMap::new()),
            };
            Sample {
                name: name.to_string(),
                labels,
                value,
            }
        })
        .collect()
}

struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    /// The value of the series with exactly these labels; panics when it is missing.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in:\n{}", self.text))
            .value
    }

    fn admissions(&self, decision: &str) -> f64 {
        self.get("tollgate_admissions_total", &[("decision", decision)])
    }

    fn settlements(&self, result: &str) -> f64 {
        self.get("tollgate_settlements_total", &[("result", result)])
    }

    fn redis_errors(&self, kind: &str) -> f64 {
        self.get("tollgate_redis_errors_total", &[("kind", kind)])
    }

    /// `(le, cumulative count)` of the admission-duration histogram, in bucket order.
    fn buckets(&self) -> Vec<(f64, f64)> {
        let mut b: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|s| s.name == "tollgate_admission_duration_seconds_bucket")
            .map(|s| {
                let le = s.labels.get("le").expect("le label");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("le number")
                };
                (le, s.value)
            })
            .collect();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        b
    }
}

async fn scrape(app: &TestApp) -> Scrape {
    let res = app
        .http
        .get(format!("{}/metrics", app.admin))
        .send()
        .await
        .expect("scrape");
    assert_eq!(res.status(), 200, "/metrics needs no token");
    let ct = res.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    let text = res.text().await.expect("metrics text");
    Scrape {
        samples: parse(&text),
        text,
    }
}

const DECISIONS: [&str; 14] = [
    "allowed",
    "key_missing",
    "key_invalid",
    "key_disabled",
    "key_expired",
    "provider_not_allowed",
    "api_format_not_allowed",
    "model_not_allowed",
    "balance_exhausted",
    "budget_exceeded",
    "rate_limited",
    "token_limited",
    "concurrency_limited",
    "unavailable",
];
const RESULTS: [&str; 4] = ["settled", "duplicate", "lease_expired", "lease_unknown"];
const KINDS: [&str; 3] = ["timeout", "connection", "command"];

/// Every contract series is present (at zero before anything happened).
fn assert_contract_series(s: &Scrape) {
    for d in DECISIONS {
        s.admissions(d);
    }
    for r in RESULTS {
        s.settlements(r);
    }
    for k in KINDS {
        s.redis_errors(k);
    }
    s.get("tollgate_fail_open_admissions_total", &[]);
    s.get("tollgate_usage_sync_lag_seconds", &[]);
    s.get("tollgate_usage_events_pending", &[]);
    s.get("tollgate_admission_duration_seconds_count", &[]);
    s.get("tollgate_admission_duration_seconds_sum", &[]);
    for (name, kind) in [
        ("tollgate_admissions_total", "counter"),
        ("tollgate_settlements_total", "counter"),
        ("tollgate_redis_errors_total", "counter"),
        ("tollgate_fail_open_admissions_total", "counter"),
        ("tollgate_usage_sync_lag_seconds", "gauge"),
        ("tollgate_usage_events_pending", "gauge"),
        ("tollgate_admission_duration_seconds", "histogram"),
    ] {
        assert!(
            s.text.lines().any(|l| l == format!("# TYPE {name} {kind}")),
            "{name} is a {kind}:\n{}",
            s.text
        );
    }
    let buckets = s.buckets();
    assert!(buckets.len() >= 5, "histogram buckets: {buckets:?}");
    assert_eq!(
        buckets.last().map(|b| b.0),
        Some(f64::INFINITY),
        "+Inf bucket"
    );
    let sub_ms: Vec<f64> = buckets
        .iter()
        .map(|b| b.0)
        .filter(|le| *le < 0.001)
        .collect();
    assert!(sub_ms.len() >= 2, "sub-millisecond buckets: {buckets:?}");
    for w in buckets.windows(2) {
        assert!(w[0].1 <= w[1].1, "buckets are cumulative: {buckets:?}");
    }
    assert_eq!(
        buckets.last().map(|b| b.1),
        Some(s.get("tollgate_admission_duration_seconds_count", &[])),
        "+Inf bucket = count"
    );
}

/// No label value anywhere in the scrape is, or contains, one of `secrets` (key ids, user ids,
/// lease ids, plaintext keys, key hashes), and the contract labels take only their closed sets.
fn assert_no_identifying_labels(s: &Scrape, secrets: &[String]) {
    assert!(!secrets.is_empty());
    for sample in &s.samples {
        for (name, value) in &sample.labels {
            for secret in secrets {
                assert!(
                    !value.contains(secret.as_str()),
                    "label {name}={value:?} of {} carries {secret:?}",
                    sample.name
                );
            }
            if sample.name.starts_with("tollgate_") && name != "le" {
                assert!(
                    value.len() <= 32 && value.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                    "label {name}={value:?} of {} is not a closed-set code",
                    sample.name
                );
            }
        }
        match sample.name.as_str() {
            "tollgate_admissions_total" => {
                assert!(DECISIONS.contains(&sample.labels["decision"].as_str()))
            }
            "tollgate_settlements_total" => {
                assert!(RESULTS.contains(&sample.labels["result"].as_str()))
            }
            "tollgate_redis_errors_total" => {
                assert!(KINDS.contains(&sample.labels["kind"].as_str()))
            }
            _ => {}
        }
    }
}

fn delta(after: &Scrape, before: &Scrape, f: impl Fn(&Scrape) -> f64) -> f64 {
    f(after) - f(before)
}

/// What identifies a key: plaintext, its random body, its hash, its id and its user.
fn remember(key: &str, k: &Value, secrets: &mut Vec<String>) {
    secrets.push(key.to_string());
    secrets.push(key.rsplit_once('-').unwrap().1.to_string());
    secrets.push(tollgate::keys::hash(key));
    secrets.push(k["id"].as_str().unwrap().to_string());
    secrets.push(k["user_id"].as_str().unwrap().to_string());
}

fn lease_of(body: &Value) -> String {
    body["lease_id"].as_str().expect("lease_id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admissions_settlements_and_latency_move_by_exactly_what_happened() {
    if !in_own_process(this_test!()).await {
        return;
    }
    let app = spawn_app().await;
    let s0 = scrape(&app).await;
    assert_contract_series(&s0);

    let mut secrets: Vec<String> = Vec::new();
    let (limited, k1) = app
        .create_key(json!({"user_id": "metrics-user-limited", "rate_limit": 2}))
        .await;
    remember(&limited, &k1, &mut secrets);
    let (disabled, k2) = app
        .create_key(json!({"user_id": "metrics-user-disabled"}))
        .await;
    remember(&disabled, &k2, &mut secrets);
    let res = app
        .admin_delete(&format!("/admin/keys/{}", k2["id"].as_str().unwrap()))
        .await;
    assert_eq!(res.status(), 200);
    let (gpt_only, k3) = app
        .create_key(json!({"user_id": "metrics-user-models", "allowed_models": ["gpt-4o"]}))
        .await;
    remember(&gpt_only, &k3, &mut secrets);
    let invalid = "sk-MetricsNoSuchKey0123456789abcd";
    secrets.push(invalid.to_string());
    secrets.push(tollgate::keys::hash(invalid));

    // Phase 1: decisions made by the gate, each one timed.
    let (st, a1) = app.admit(&limited, json!({})).await;
    assert_eq!(st, 200, "{a1}");
    let (st, a2) = app.admit(&limited, json!({})).await;
    assert_eq!(st, 200, "{a2}");
    let (st, _) = app.admit(&limited, json!({})).await;
    assert_eq!(st, 429);
    let (st, _) = app.admit(&disabled, json!({})).await;
    assert_eq!(st, 403);
    let auth = app
        .http
        .get(format!("{}/auth", app.data))
        .header("x-api-key", &disabled)
        .send()
        .await
        .unwrap();
    assert_eq!(auth.status(), 403, "subrequests count too");
    let (st, _) = app.admit(invalid, json!({})).await;
    assert_eq!(st, 401);
    let (st, _) = app.admit(&gpt_only, json!({"model": "gpt-4o-mini"})).await;
    assert_eq!(st, 403);
    let (st, a3) = app.admit(&gpt_only, json!({"model": "gpt-4o"})).await;
    assert_eq!(st, 200, "{a3}");
    let s1 = scrape(&app).await;
    let want = [
        ("allowed", 3.0),
        ("rate_limited", 1.0),
        ("key_disabled", 2.0),
        ("key_invalid", 1.0),
        ("model_not_allowed", 1.0),
    ];
    for d in DECISIONS {
        let w = want.iter().find(|(n, _)| *n == d).map_or(0.0, |(_, v)| *v);
        assert_eq!(
            delta(&s1, &s0, |s| s.admissions(d)),
            w,
            "admissions{{decision={d}}}"
        );
    }
    let timed = 8.0;
    let count = delta(&s1, &s0, |s| {
        s.get("tollgate_admission_duration_seconds_count", &[])
    });
    assert_eq!(count, timed, "one duration sample per gate decision");
    let sum = delta(&s1, &s0, |s| {
        s.get("tollgate_admission_duration_seconds_sum", &[])
    });
    assert!(sum > 0.0 && sum < timed * 10.0, "duration sum {sum}");
    let (b0, b1) = (s0.buckets(), s1.buckets());
    assert_eq!(
        b0.iter().map(|b| b.0).collect::<Vec<_>>(),
        b1.iter().map(|b| b.0).collect::<Vec<_>>()
    );
    for (x, y) in b0.iter().zip(&b1) {
        assert!(
            y.1 - x.1 >= 0.0 && y.1 - x.1 <= timed,
            "bucket le={} moved {}",
            x.0,
            y.1 - x.1
        );
    }
    assert_eq!(
        b1.last().unwrap().1 - b0.last().unwrap().1,
        timed,
        "+Inf bucket"
    );
    assert_contract_series(&s1);

    // Phase 2: a request without a key is refused before the gate.
    let res = app.post_data("/v1/admit", json!({})).await;
    assert_eq!(res.status(), 401);
    let s2 = scrape(&app).await;
    assert_eq!(delta(&s2, &s1, |s| s.admissions("key_missing")), 1.0);
    assert_eq!(delta(&s2, &s1, |s| s.admissions("allowed")), 0.0);

    // Phase 3: settlements, by result.
    let (l1, l2, l3) = (lease_of(&a1), lease_of(&a2), lease_of(&a3));
    secrets.extend([l1.clone(), l2.clone(), l3.clone()]);
    for l in [&l1, &l2, &l3] {
        secrets.push(l.split('.').nth(1).unwrap().to_string());
    }
    let (st, b) = app.settle(&l1, "0.5").await;
    assert_eq!((st, &b["duplicate"]), (200, &json!(false)), "{b}");
    let (st, b) = app.settle(&l1, "0.5").await;
    assert_eq!((st, &b["duplicate"]), (200, &json!(true)), "{b}");
    let (st, _) = app.settle(&l3, "0.25").await;
    assert_eq!(st, 200);
    let (st, _) = app.release(&l2).await;
    assert_eq!(st, 200, "a release is no settlement");
    let unknown = format!(
        "{}.AAAAAAAAAAAAAAAAAAAAAA",
        &tollgate::keys::hash(&limited)[..32]
    );
    let (st, b) = app.settle(&unknown, "0.1").await;
    assert_eq!(
        (st, b["code"].as_str()),
        (404, Some("lease_unknown")),
        "{b}"
    );

    // A lease past its TTL is still charged, and counted as such.
    let short = spawn_app_with(|s| {
        s.insert("TOLLGATE_LEASE_TTL_SECONDS", "1".into());
    })
    .await;
    let (key, k4) = short
        .create_key(json!({"user_id": "metrics-user-short"}))
        .await;
    remember(&key, &k4, &mut secrets);
    let (st, a4) = short.admit(&key, json!({})).await;
    assert_eq!(st, 200, "{a4}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (st, b) = short.settle(&lease_of(&a4), "0.1").await;
    assert_eq!((st, &b["lease_expired"]), (200, &json!(true)), "{b}");
    secrets.push(lease_of(&a4));

    let s3 = scrape(&app).await;
    for (r, w) in [
        ("settled", 2.0),
        ("duplicate", 1.0),
        ("lease_expired", 1.0),
        ("lease_unknown", 1.0),
    ] {
        assert_eq!(
            delta(&s3, &s2, |s| s.settlements(r)),
            w,
            "settlements{{result={r}}}"
        );
    }
    // Nothing here touched Redis's health or fail-open.
    for k in KINDS {
        assert_eq!(
            delta(&s3, &s0, |s| s.redis_errors(k)),
            0.0,
            "redis_errors{{kind={k}}}"
        );
    }
    assert_eq!(
        delta(&s3, &s0, |s| s
            .get("tollgate_fail_open_admissions_total", &[])),
        0.0
    );
    // Both servers render the same process-wide registry.
    let s3b = scrape(&short).await;
    assert_eq!(
        s3b.settlements("lease_expired"),
        s3.settlements("lease_expired")
    );

    assert_no_identifying_labels(&s3, &secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_gauges_show_events_waiting_for_postgres_and_their_age() {
    if !in_own_process(this_test!()).await {
        return;
    }
    let app = spawn_app().await;
    let pending = |s: &Scrape| s.get("tollgate_usage_events_pending", &[]);
    let lag = |s: &Scrape| s.get("tollgate_usage_sync_lag_seconds", &[]);

    // Postgres refuses usage rows (as if it were down for the syncer) while the hot path works.
    sqlx::query(
        "CREATE FUNCTION refuse_usage() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN RAISE EXCEPTION 'usage writes refused by the test'; END $$",
    )
    .execute(&app.db)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse_usage BEFORE INSERT ON usage_events
         FOR EACH ROW EXECUTE FUNCTION refuse_usage()",
    )
    .execute(&app.db)
    .await
    .unwrap();

    let (key, _) = app
        .create_key(
            json!({"user_id": "metrics-gauges", "rate_limit": null, "concurrent_limit": null}),
        )
        .await;
    for _ in 0..3 {
        let (st, a) = app.admit(&key, json!({})).await;
        assert_eq!(st, 200, "{a}");
        let (st, b) = app.settle(&lease_of(&a), "0.01").await;
        assert_eq!(st, 200, "{b}");
    }

    let last = Mutex::new((0.0, 0.0));
    let waiting = app
        .eventually(Duration::from_secs(20), || async {
            let s = scrape(&app).await;
            *last.lock().unwrap() = (pending(&s), lag(&s));
            pending(&s) == 3.0 && lag(&s) >= 1.0
        })
        .await;
    let (_, first_lag) = *last.lock().unwrap();
    assert!(
        waiting,
        "3 events pending and lag >= 1s while Postgres refuses; last {last:?}"
    );
    let growing = app
        .eventually(Duration::from_secs(20), || async {
            lag(&scrape(&app).await) >= first_lag + 1.0
        })
        .await;
    assert!(growing, "the lag grows while events wait");

    sqlx::query("DROP TRIGGER refuse_usage ON usage_events")
        .execute(&app.db)
        .await
        .unwrap();
    let caught_up = app
        .eventually(Duration::from_secs(30), || async {
            let s = scrape(&app).await;
            pending(&s) == 0.0 && lag(&s) == 0.0
        })
        .await;
    assert!(
        caught_up,
        "pending and lag return to 0 once Postgres takes the events"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_events")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(rows, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_errors_by_kind_and_fail_open_admissions_are_counted() {
    if !in_own_process(this_test!()).await {
        return;
    }

    // A command error: the key's state in Redis is not what the script expects.
    let app = spawn_app().await;
    let (key, _) = app.create_key(json!({"user_id": "metrics-cmd"})).await;
    let (st, _) = app.admit(&key, json!({})).await;
    assert_eq!(st, 200);
    let state = tollgate::hot::layout::Layout::new(&app.namespace)
        .for_hash(&tollgate::keys::hash(&key))
        .state;
    let mut r = app.redis.clone();
    let _: () = redis::cmd("DEL")
        .arg(&state)
        .query_async(&mut r)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&state)
        .arg("garbage")
        .query_async(&mut r)
        .await
        .unwrap();
    let s0 = scrape(&app).await;
    let (st, b) = app.admit(&key, json!({})).await;
    assert_eq!((st, b["code"].as_str()), (503, Some("unavailable")), "{b}");
    let s1 = scrape(&app).await;
    assert_eq!(delta(&s1, &s0, |s| s.redis_errors("command")), 1.0);
    assert_eq!(delta(&s1, &s0, |s| s.admissions("unavailable")), 1.0);
    let _: () = redis::cmd("DEL")
        .arg(&state)
        .query_async(&mut r)
        .await
        .unwrap();
    let (st, b) = app.admit(&key, json!({})).await;
    assert_eq!(st, 200, "rebuilt from Postgres: {b}");
    drop(app);

    // Redis gone, fail-open: validated keys pass and are counted; balance keys do not.
    let mut private = PrivateRedis::start();
    let app = spawn_app_with(|s| {
        s.insert("TOLLGATE_REDIS_URL", private.url());
        s.insert("TOLLGATE_FAIL_MODE", "open".into());
    })
    .await;
    let (plain, _) = app.create_key(json!({"user_id": "metrics-open"})).await;
    let (funded, _) = app
        .create_key(
            json!({"user_id": "metrics-funded", "is_standalone": true, "initial_balance_usd": 5}),
        )
        .await;
    for k in [&plain, &funded] {
        let (st, b) = app.admit(k, json!({})).await;
        assert_eq!(st, 200, "{b}");
    }
    let s0 = scrape(&app).await;
    private.stop();
    for _ in 0..2 {
        let (st, b) = app.admit(&plain, json!({})).await;
        assert_eq!(st, 200, "fail-open admits a validated key: {b}");
    }
    let (st, b) = app.admit(&funded, json!({})).await;
    assert_eq!(
        (st, b["code"].as_str()),
        (503, Some("unavailable")),
        "a key with a balance fails closed: {b}"
    );
    let s1 = scrape(&app).await;
    assert_eq!(
        delta(&s1, &s0, |s| s
            .get("tollgate_fail_open_admissions_total", &[])),
        2.0
    );
    assert_eq!(delta(&s1, &s0, |s| s.admissions("allowed")), 2.0);
    assert_eq!(delta(&s1, &s0, |s| s.admissions("unavailable")), 1.0);
    // Three admissions failed to reach Redis; background tasks may add their own failures.
    let transport = |s: &Scrape| s.redis_errors("timeout") + s.redis_errors("connection");
    assert!(delta(&s1, &s0, transport) >= 3.0, "{}", s1.text);
    assert_eq!(delta(&s1, &s0, |s| s.redis_errors("command")), 0.0);
    assert_no_identifying_labels(
        &s1,
        &[plain.clone(), funded.clone(), tollgate::keys::hash(&plain)],
    );
}

/// The `tollgate` binary, with exactly these settings and `TOLLGATE_LOG=debug`, its stderr
/// collected line by line.
struct Binary {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    data: SocketAddr,
    admin: SocketAddr,
}

impl Binary {
    async fn start(settings: &HashMap<&'static str, String>) -> Binary {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, _) in std::env::vars() {
            if name.starts_with("TOLLGATE_") {
                cmd.env_remove(name);
            }
        }
        cmd.envs(settings.iter().map(|(k, v)| (*k, v.as_str())));
        cmd.env("TOLLGATE_LOG", "debug");
        let mut child = cmd.spawn().expect("spawn tollgate");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = mpsc::channel::<(SocketAddr, SocketAddr)>();
        for (pipe, is_stderr) in [
            (
                Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
                true,
            ),
            (Box::new(child.stdout.take().unwrap()), false),
        ] {
            let sink = lines.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if is_stderr {
                        if let Some(addrs) = serving(&line) {
                            let _ = tx.send(addrs);
                        }
                    }
                    sink.lock().unwrap().push(line);
                }
            });
        }
        let got = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(90)))
            .await
            .unwrap();
        let Ok((data, admin)) = got else {
            let _ = child.kill();
            panic!(
                "no `tollgate serving` line:\n{}",
                lines.lock().unwrap().join("\n")
            );
        };
        // `serve` migrates in the background while it already serves: wait for Postgres, as
        // start-up used to.
        let http = reqwest::Client::new();
        let mut migrated = false;
        for _ in 0..900 {
            let body: Option<Value> = match http.get(format!("http://{admin}/readyz")).send().await
            {
                Ok(res) => res.json().await.ok(),
                Err(_) => None,
            };
            if body.is_some_and(|b| b["postgres"] == "ok") {
                migrated = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            migrated,
            "postgres not ready:\n{}",
            lines.lock().unwrap().join("\n")
        );
        Binary {
            child,
            lines,
            data,
            admin,
        }
    }

    /// SIGTERM, then waits for the exit and the last lines.
    async fn stop(&mut self) -> String {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        for _ in 0..600 {
            if let Ok(Some(s)) = self.child.try_wait() {
                assert!(s.success(), "exit status {s}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                return self.lines.lock().unwrap().join("\n");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("tollgate did not exit within 30s of SIGTERM");
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serving(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let v: Value = serde_json::from_str(line).ok()?;
    let f = v.get("fields")?;
    (f.get("message")?.as_str()? == "tollgate serving").then_some(())?;
    Some((
        f.get("listen")?.as_str()?.parse().ok()?,
        f.get("admin")?.as_str()?.parse().ok()?,
    ))
}

/// Drops the binary's database and namespace, also when the test fails.
struct State(HashMap<&'static str, String>);

impl Drop for State {
    fn drop(&mut self) {
        let db = self.0["TOLLGATE_DATABASE_URL"]
            .rsplit('/')
            .next()
            .unwrap()
            .to_string();
        cleanup_blocking(
            None,
            Some(db),
            self.0["TOLLGATE_REDIS_URL"].clone(),
            self.0["TOLLGATE_REDIS_NAMESPACE"].clone(),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_at_debug_level_never_contain_a_secret() {
    let password = "pg-Password-7f3a9c1e-never-logged";
    let mut settings = base_settings();
    // Postgres trusts local connections, so a password in the URL is accepted and unused:
    // it is here only to be looked for in the logs.
    let url = settings["TOLLGATE_DATABASE_URL"].clone();
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user, host) = rest.split_once('@').unwrap_or(("postgres", rest));
    let user = user.split(':').next().unwrap();
    settings.insert(
        "TOLLGATE_DATABASE_URL",
        format!("{scheme}://{user}:{password}@{host}"),
    );
    // A Redis that requires a password, so the Redis URL carries a secret too.
    let redis_password = "redis-Password-2c8e5b07-never-logged";
    let redis = PrivateRedis::start();
    redis.cli(&["CONFIG", "SET", "requirepass", redis_password]);
    settings.insert(
        "TOLLGATE_REDIS_URL",
        format!("redis://:{redis_password}@127.0.0.1:{}", redis.port()),
    );
    settings.insert("TOLLGATE_LOG_FORMAT", "json".into());
    let state = State(settings.clone());
    let mut bin = Binary::start(&state.0).await;
    let http = reqwest::Client::new();
    let (data, admin) = (
        format!("http://{}", bin.data),
        format!("http://{}", bin.admin),
    );

    // A full cycle: create, look up, reveal, admit (body, header, subrequest), settle, deny.
    let res = http
        .post(format!("{admin}/admin/keys"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"user_id": "log-user", "is_standalone": true, "initial_balance_usd": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    let id = created["api_key"]["id"].as_str().unwrap().to_string();
    let res = http
        .get(format!("{admin}/admin/keys/{id}/secret"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.json::<Value>().await.unwrap()["key"], json!(key));
    let res = http
        .post(format!("{admin}/admin/keys/lookup"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"key": key}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let wrong_token = "wrong-admin-token-5d1b2e8f0c";
    let res = http
        .get(format!("{admin}/admin/keys/{id}"))
        .bearer_auth(wrong_token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = http
        .post(format!("{data}/v1/admit"))
        .json(&json!({"key": key, "reserve_usd": 0.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let lease = res.json::<Value>().await.unwrap()["lease_id"]
        .as_str()
        .unwrap()
        .to_string();
    let res = http
        .post(format!("{data}/v1/settle"))
        .json(&json!({"lease_id": lease, "cost_usd": 0.25, "input_tokens": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = http
        .post(format!("{data}/v1/admit"))
        .bearer_auth(&key)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = http
        .get(format!("{data}/auth"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let bad_key = "sk-NotARealKeyButSecret0123456789";
    let res = http
        .post(format!("{data}/v1/admit"))
        .json(&json!({"key": bad_key}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    // Let the usage reach Postgres, so the syncer's logging is covered too.
    let mut synced = false;
    for _ in 0..100 {
        let res = http
            .get(format!("{admin}/admin/keys/{id}/stats"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        if res.json::<Value>().await.unwrap()["total_requests"] == json!(1) {
            synced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(synced, "usage synced");

    let logs = bin.stop().await;
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{logs}");
    let mut levels = HashMap::new();
    for line in &lines {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not a JSON line: {line}"));
        assert!(
            v["timestamp"].is_string() && v["fields"].is_object(),
            "{line}"
        );
        *levels
            .entry(v["level"].as_str().expect("level").to_string())
            .or_insert(0) += 1;
    }
    assert!(
        levels.contains_key("DEBUG"),
        "debug logging was on: {levels:?}"
    );
    assert!(lines.iter().any(|l| l.contains("tollgate serving")));
    assert!(
        lines.iter().any(|l| l.contains("shutdown complete")),
        "{logs}"
    );

    let encryption = state.0["TOLLGATE_ENCRYPTION_KEY"].clone();
    let secrets = [
        ("the API key", key.clone()),
        (
            "the API key body",
            key.rsplit_once('-').unwrap().1.to_string(),
        ),
        ("an invalid API key", bad_key.to_string()),
        ("the admin token", ADMIN_TOKEN.to_string()),
        ("a wrong admin token", wrong_token.to_string()),
        ("the encryption key", encryption.clone()),
        (
            "the encryption key bytes",
            String::from_utf8(vec![42u8; 32]).unwrap(),
        ),
        ("the database password", password.to_string()),
        ("the redis password", redis_password.to_string()),
    ];
    for (what, secret) in secrets {
        assert!(
            !logs.contains(&secret),
            "{what} appears in the logs:\n{logs}"
        );
    }
}
