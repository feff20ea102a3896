//! The hot-path suite: admission, settlement and release scenarios, written once and run against
//! a single Redis (`tests/it/admission.rs`) and a Redis Cluster (`tests/it/cluster.rs`).
//!
//! Every scenario is a `pub async fn` that takes a running [`TestApp`] and drives it over HTTP
//! only (data plane and admin API), so it holds on any Redis topology. Scenarios that need a
//! short rate window or lease TTL name the settings tweak to start the app with
//! ([`short_window`], [`short_lease`]) and refuse to run without it. Two scenarios need more:
//! [`unknown_keys_cost_bounded_postgres_lookups`] needs the app's Postgres traffic routed
//! through a [`PgLookupCounter`], and [`lost_redis_state_is_rehydrated_from_postgres`] wipes
//! the namespace through the harness's direct connection, so it is for a single Redis only.
//!
//! Money is compared in exact nano-USD, read from the JSON numbers' decimal text, never via f64.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tollgate::gate::{LOOKUPS_PER_SECOND, LOOKUP_BURST};
use tollgate::money::Money;

use super::{amount, nanos, new_key, unique, Answer, Api, TestApp, USD};

pub type Settings = HashMap<&'static str, String>;

/// Settings tweak for [`the_rate_window_slides`]: a 2-second window.
pub fn short_window(s: &mut Settings) {
    s.insert("TOLLGATE_RATE_WINDOW_SECONDS", "2".into());
}

/// Settings tweak for the lease-expiry scenarios: leases live 1 second.
pub fn short_lease(s: &mut Settings) {
    s.insert("TOLLGATE_LEASE_TTL_SECONDS", "1".into());
}

/// Every scenario that runs on any topology, with the settings tweak it needs: `$run!(name)` or
/// `$run!(name, tweak)` for each, where `$run` is a macro of the caller's that makes one test of
/// it (`tests/it/admission.rs` on a single Redis, `tests/it/cluster.rs` on the cluster). Left
/// out: [`unknown_keys_cost_bounded_postgres_lookups`] (it takes a [`PgLookupCounter`] too) and
/// [`lost_redis_state_is_rehydrated_from_postgres`] (single Redis only), which each caller
/// writes out.
#[rustfmt::skip]
macro_rules! every_scenario {
    ($run:ident) => {
        $run!(parallel_admissions_never_exceed_the_rate_limit);
        $run!(parallel_admissions_never_exceed_the_concurrency_limit);
        $run!(parallel_reservations_never_exceed_the_balance);
        $run!(a_denied_admission_consumes_nothing);
        $run!(checks_run_in_the_contract_order);
        $run!(allow_lists_admit_only_listed_values);
        $run!(a_lowered_rate_limit_retries_after_the_entry_that_must_leave, $crate::common::hot_suite::short_window);
        $run!(the_rate_window_slides, $crate::common::hot_suite::short_window);
        $run!(an_expired_lease_frees_its_slot_and_its_hold, $crate::common::hot_suite::short_lease);
        $run!(a_lease_lives_as_long_as_its_admission_asked);
        $run!(a_short_lease_taken_after_a_long_one_frees_its_slot_when_it_expires);
        $run!(an_admission_without_a_lease_skips_concurrency_and_holds);
        $run!(priced_settlements_are_exact_to_the_nano_dollar, $crate::common::hot_suite::awkward_prices);
        $run!(token_limits_admit_exactly_what_fits);
        $run!(budgets_admit_exactly_what_fits);
        $run!(a_late_settlement_is_still_charged, $crate::common::hot_suite::short_lease);
        $run!(a_settlement_charges_exactly_once);
        $run!(unknown_and_malformed_leases_are_404);
        $run!(release_frees_the_lease_and_a_later_settlement_still_charges);
        $run!(a_thousand_tiny_charges_sum_exactly);
        $run!(reserve_holds_add_up);
        $run!(large_amounts_stay_exact);
        $run!(admin_changes_reach_the_next_admission);
        $run!(a_budget_turns_over_with_its_period);
    };
}
pub(crate) use every_scenario;

fn require_setting(app: &TestApp, name: &str, value: &str) {
    assert_eq!(
        app.settings.get(name).map(String::as_str),
        Some(value),
        "this scenario needs {name}={value}: start the app with the hot_suite settings tweak"
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A cloneable handle on the data plane, for requests sent from spawned tasks.
#[derive(Clone)]
pub struct DataPlane {
    http: reqwest::Client,
    base: String,
}

impl DataPlane {
    pub fn of(app: &TestApp) -> Self {
        DataPlane {
            http: app.http.clone(),
            base: app.data.clone(),
        }
    }

    pub async fn post(&self, path: &str, body: &Value) -> Answer {
        let res = self
            .http
            .post(format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let answer = Answer::read(format!("POST {path}"), res).await;
        answer.json();
        answer
    }
}

pub async fn admit(app: &TestApp, body: Value) -> Answer {
    DataPlane::of(app).post("/v1/admit", &body).await
}

/// Settles with an exact decimal cost.
pub async fn settle(app: &TestApp, lease: &str, cost: &str) -> Answer {
    DataPlane::of(app)
        .post(
            "/v1/settle",
            &json!({"lease_id": lease, "cost_usd": amount(cost)}),
        )
        .await
}

pub async fn release(app: &TestApp, lease: &str) -> Answer {
    DataPlane::of(app)
        .post("/v1/release", &json!({"lease_id": lease}))
        .await
}

/// `{"key": key}` plus the fields of `extra`.
pub fn with_key(key: &str, extra: Value) -> Value {
    let mut body = json!({ "key": key });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

pub async fn patch_key(app: &TestApp, id: &str, body: Value) {
    let res = app
        .admin_patch(&format!("/admin/keys/{id}"), body.clone())
        .await;
    let status = res.status().as_u16();
    let text = res.text().await.unwrap_or_default();
    assert_eq!(status, 200, "PATCH {body}: {text}");
}

async fn key_json(app: &TestApp, id: &str) -> Value {
    let res = app.admin_get(&format!("/admin/keys/{id}")).await;
    assert_eq!(res.status(), 200, "GET key {id}");
    res.json().await.expect("ApiKey JSON")
}

/// Waits until Postgres (via the admin API) shows `expected` nano-USD used by the key.
pub async fn await_balance_used(app: &TestApp, id: &str, expected: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let used = nanos(&key_json(app, id).await["balance_used_usd"]);
        if used == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "balance_used_usd in Postgres is {}, never reached {}",
            Money::from_nanos(used),
            Money::from_nanos(expected)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stats(app: &TestApp, id: &str) -> Value {
    let res = app.admin_get(&format!("/admin/keys/{id}/stats")).await;
    assert_eq!(res.status(), 200, "stats of {id}");
    res.json().await.expect("stats JSON")
}

/// Sends every body to `/v1/admit` at the same moment (all tasks wait on one barrier first).
pub async fn admit_all_at_once(app: &TestApp, bodies: Vec<Value>) -> Vec<Answer> {
    let dp = DataPlane::of(app);
    let barrier = Arc::new(tokio::sync::Barrier::new(bodies.len()));
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|body| {
            let (dp, barrier) = (dp.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                dp.post("/v1/admit", &body).await
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("admission task"));
    }
    out
}

/// Posts every body to `path`, `width` at a time; answers in order.
pub async fn post_in_batches(
    app: &TestApp,
    path: &str,
    bodies: Vec<Value>,
    width: usize,
) -> Vec<Answer> {
    let dp = DataPlane::of(app);
    let mut out = Vec::with_capacity(bodies.len());
    for chunk in bodies.chunks(width) {
        let tasks: Vec<_> = chunk
            .iter()
            .cloned()
            .map(|body| {
                let (dp, path) = (dp.clone(), path.to_string());
                tokio::spawn(async move { dp.post(&path, &body).await })
            })
            .collect();
        for t in tasks {
            out.push(t.await.expect("request task"));
        }
    }
    out
}

/// How many answers had each outcome.
pub fn tally(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for a in answers {
        *t.entry(a.outcome()).or_insert(0) += 1;
    }
    t
}

fn allowed(answers: &[Answer]) -> Vec<&Answer> {
    answers.iter().filter(|a| a.status == 200).collect()
}

/// Admits every `every` until allowed; denials on the way must be `denied_code`.
async fn admit_until_allowed(
    app: &TestApp,
    body: Value,
    denied_code: &str,
    within: Duration,
) -> (Answer, Instant) {
    let deadline = Instant::now() + within;
    loop {
        let a = admit(app, body.clone()).await;
        let at = Instant::now();
        if a.status == 200 {
            return (a, at);
        }
        assert_eq!(
            a.body["code"].as_str(),
            Some(denied_code),
            "while waiting to be admitted again: {}",
            a.body
        );
        assert!(
            at < deadline,
            "still denied ({denied_code}) after {within:?}: nothing freed the slot or hold"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------------------------
// Exactness under concurrency
// ---------------------------------------------------------------------------------------------

/// 200 simultaneous admissions on a key with `rate_limit` 50 admit exactly 50; the other 150
/// are `429 rate_limited`, and the 50 grants saw the budget shrink one by one (every
/// `remaining` from 49 down to 0 exactly once).
pub async fn parallel_admissions_never_exceed_the_rate_limit(app: &TestApp) {
    let (key, _) = new_key(app, json!({"rate_limit": 50, "concurrent_limit": null})).await;
    let answers = admit_all_at_once(app, vec![with_key(&key, json!({})); 200]).await;
    let t = tally(&answers);
    assert_eq!(
        t,
        BTreeMap::from([("200".into(), 50), ("429 rate_limited".into(), 150)]),
        "200 parallel admissions against rate_limit 50"
    );
    let remaining: BTreeSet<u64> = allowed(&answers)
        .iter()
        .map(|a| {
            a.body["rate_limit"]["remaining"]
                .as_u64()
                .expect("remaining")
        })
        .collect();
    assert_eq!(
        remaining,
        (0..50).collect(),
        "each grant took exactly one unit of budget"
    );
    let leases: BTreeSet<String> = allowed(&answers).iter().map(|a| a.lease("grant")).collect();
    assert_eq!(leases.len(), 50, "lease ids are unique");
    for a in &answers {
        if a.status == 429 {
            let retry = a.retry_after_ms();
            assert!(
                retry > 0 && retry <= 60_000,
                "retry_after_ms {retry} within the window"
            );
        }
    }
}

/// With `concurrent_limit` 3, 200 simultaneous admissions admit exactly 3 (the rest
/// `429 concurrency_limited`); releasing one lease lets exactly one of another 200 in.
pub async fn parallel_admissions_never_exceed_the_concurrency_limit(app: &TestApp) {
    let (key, _) = new_key(app, json!({"rate_limit": null, "concurrent_limit": 3})).await;
    let answers = admit_all_at_once(app, vec![with_key(&key, json!({})); 200]).await;
    assert_eq!(
        tally(&answers),
        BTreeMap::from([("200".into(), 3), ("429 concurrency_limited".into(), 197)]),
        "200 parallel admissions against concurrent_limit 3"
    );
    let granted = allowed(&answers);
    let in_flight: BTreeSet<u64> = granted
        .iter()
        .map(|a| {
            a.body["concurrency"]["in_flight"]
                .as_u64()
                .expect("in_flight")
        })
        .collect();
    assert_eq!(in_flight, BTreeSet::from([1, 2, 3]));
    let released = granted[0].lease("grant");
    let r = release(app, &released).await;
    assert_eq!((r.status, &r.body), (200, &json!({"released": true})));

    let again = admit_all_at_once(app, vec![with_key(&key, json!({})); 200]).await;
    assert_eq!(
        tally(&again),
        BTreeMap::from([("200".into(), 1), ("429 concurrency_limited".into(), 199)]),
        "after one release, exactly one more is admitted"
    );
}

/// A standalone key with balance 1.00, asked 200 times at once with `reserve_usd` 0.10, admits
/// exactly 10 (holds never exceed the balance); the rest are `402 balance_exhausted`. Releasing
/// the 10 gives every hold back exactly once.
pub async fn parallel_reservations_never_exceed_the_balance(app: &TestApp) {
    let (key, _) = new_key(
        app,
        json!({"is_standalone": true, "initial_balance_usd": 1, "rate_limit": null, "concurrent_limit": null}),
    )
    .await;
    let body = with_key(&key, json!({"reserve_usd": amount("0.10")}));
    let answers = admit_all_at_once(app, vec![body; 200]).await;
    assert_eq!(
        tally(&answers),
        BTreeMap::from([("200".into(), 10), ("402 balance_exhausted".into(), 190)]),
        "200 parallel reservations of 0.10 against a balance of 1.00"
    );
    let granted = allowed(&answers);
    let remaining: BTreeSet<i64> = granted
        .iter()
        .map(|a| a.balance().expect("balance"))
        .collect();
    assert_eq!(
        remaining,
        (0..10).map(|i| i * USD / 10).collect(),
        "each grant held exactly 0.10"
    );
    for a in granted {
        let r = release(app, &a.lease("grant")).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let all = admit(app, with_key(&key, json!({"reserve_usd": 1}))).await;
    all.lease("a reservation of the whole balance after every hold was released");
    assert_eq!(all.balance(), Some(0));
}

/// A denied admission consumes nothing. Rate limit 5, concurrency 1: one lease is live, ten
/// more are `concurrency_limited`; after the release exactly four more are admitted (a limiter
/// that counted the denials would refuse them) and the next is `rate_limited`. Balance denials
/// likewise take no rate budget, and a refused reservation holds nothing.
pub async fn a_denied_admission_consumes_nothing(app: &TestApp) {
    let (key, _) = new_key(app, json!({"rate_limit": 5, "concurrent_limit": 1})).await;
    let body = with_key(&key, json!({}));
    let first = admit(app, body.clone()).await.lease("first admission");
    for i in 0..10 {
        admit(app, body.clone()).await.denied(
            429,
            "concurrency_limited",
            &format!("denial {i} while the slot is taken"),
        );
    }
    release(app, &first).await;
    for i in 0..4 {
        let l = admit(app, body.clone())
            .await
            .lease(&format!("admission {} of 5", i + 2));
        release(app, &l).await;
    }
    admit(app, body.clone())
        .await
        .denied(429, "rate_limited", "the sixth admission in the window");

    // Balance denials take no rate budget.
    let (key, _) = new_key(
        app,
        json!({"is_standalone": true, "initial_balance_usd": amount("0.05"), "rate_limit": 2, "concurrent_limit": null}),
    )
    .await;
    for i in 0..5 {
        admit(app, with_key(&key, json!({"reserve_usd": amount("0.10")})))
            .await
            .denied(
                402,
                "balance_exhausted",
                &format!("reservation {i} beyond the balance"),
            );
    }
    admit(app, with_key(&key, json!({})))
        .await
        .lease("first of rate 2");
    admit(app, with_key(&key, json!({})))
        .await
        .lease("second of rate 2");
    admit(app, with_key(&key, json!({})))
        .await
        .denied(429, "rate_limited", "third of rate 2");

    // A refused reservation holds nothing.
    let (key, _) = new_key(
        app,
        json!({"is_standalone": true, "initial_balance_usd": 1, "rate_limit": null, "concurrent_limit": null}),
    )
    .await;
    let held = admit(app, with_key(&key, json!({"reserve_usd": amount("0.6")})))
        .await
        .lease("hold of 0.6");
    for _ in 0..5 {
        admit(app, with_key(&key, json!({"reserve_usd": amount("0.6")})))
            .await
            .denied(402, "balance_exhausted", "second hold of 0.6");
    }
    release(app, &held).await;
    let all = admit(app, with_key(&key, json!({"reserve_usd": 1}))).await;
    all.lease("the whole balance, once the one real hold is released");
    assert_eq!(all.balance(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// Check order and allow-lists
// ---------------------------------------------------------------------------------------------

/// Checks run in the contract table's order: missing key, unknown key, disabled, expired,
/// provider, api format, model, balance, rate, concurrency. Each step makes the key fail one
/// more check and expects the earlier one to answer.
pub async fn checks_run_in_the_contract_order(app: &TestApp) {
    let dp = DataPlane::of(app);
    dp.post("/v1/admit", &json!({"provider": "nope"}))
        .await
        .denied(401, "key_missing", "no key anywhere");
    admit(
        app,
        json!({"key": unique("sk-"), "provider": "nope", "reserve_usd": 5}),
    )
    .await
    .denied(
        401,
        "key_invalid",
        "an unknown key with everything else wrong too",
    );

    let (key, id) = new_key(
        app,
        json!({
            "is_standalone": true, "initial_balance_usd": amount("0.01"),
            "rate_limit": 1, "concurrent_limit": 1,
            "allowed_providers": ["p1"], "allowed_api_formats": ["f1"], "allowed_models": ["m1"],
        }),
    )
    .await;
    let ok = json!({"provider": "p1", "api_format": "f1", "model": "m1"});
    let lease = admit(app, with_key(&key, ok.clone()))
        .await
        .lease("the one allowed admission");
    // The rate budget and the only slot are both used up: rate comes first.
    admit(app, with_key(&key, ok.clone())).await.denied(
        429,
        "rate_limited",
        "over rate and concurrency",
    );
    let s = settle(app, &lease, "0.01").await;
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(s.balance(), Some(0), "the whole balance is spent");
    // Balance exhausted and rate exhausted: balance first.
    admit(app, with_key(&key, ok.clone())).await.denied(
        402,
        "balance_exhausted",
        "over balance and rate",
    );
    // The earliest failing check answers, however many later ones fail too.
    #[rustfmt::skip]
    let narrowing = [
        (json!({"provider": "p1", "api_format": "f1", "model": "m2"}), "model_not_allowed", "model not allowed, over balance and rate"),
        (json!({"provider": "p1", "api_format": "f2", "model": "m2"}), "api_format_not_allowed", "format and model not allowed"),
        (json!({"provider": "p2", "api_format": "f2", "model": "m2"}), "provider_not_allowed", "provider, format and model not allowed"),
        (json!({"api_format": "f2", "model": "m2"}), "provider_not_allowed", "no provider given, format and model wrong"),
    ];
    for (fields, code, what) in narrowing {
        admit(app, with_key(&key, fields))
            .await
            .denied(403, code, what);
    }

    let past = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let all_wrong = json!({"provider": "p2", "api_format": "f2", "model": "m2"});
    #[rustfmt::skip]
    let ended = [
        (json!({"expires_at": past}), "key_expired", "expired, and every later check fails too"),
        (json!({"is_active": false}), "key_disabled", "disabled, expired, and every later check fails too"),
    ];
    for (patch, code, what) in ended {
        patch_key(app, &id, patch).await;
        admit(app, with_key(&key, all_wrong.clone()))
            .await
            .denied(403, code, what);
    }
}

/// Allow-lists admit exactly the listed values: a value absent from a set list, a missing
/// value, a prefix, a longer name or a different case is refused with the list's own code; two
/// listed names glued together with the list separator are refused as bad input; keys without
/// lists take anything.
pub async fn allow_lists_admit_only_listed_values(app: &TestApp) {
    let (key, _) = new_key(
        app,
        json!({
            "rate_limit": null, "concurrent_limit": null,
            "allowed_providers": ["openai", "anthropic"],
            "allowed_api_formats": ["openai:chat"],
            "allowed_models": ["gpt-4o", "gpt-4o-mini"],
        }),
    )
    .await;
    let full = |p: Option<&str>, f: Option<&str>, m: Option<&str>| {
        let mut b = with_key(&key, json!({}));
        if let Some(p) = p {
            b["provider"] = json!(p);
        }
        if let Some(f) = f {
            b["api_format"] = json!(f);
        }
        if let Some(m) = m {
            b["model"] = json!(m);
        }
        b
    };
    let (p, f, m) = (Some("openai"), Some("openai:chat"), Some("gpt-4o"));
    for (body, expect) in [
        (full(p, f, m), None),
        (full(Some("anthropic"), f, Some("gpt-4o-mini")), None),
        (full(Some("azure"), f, m), Some("provider_not_allowed")),
        (full(None, f, m), Some("provider_not_allowed")),
        (full(Some(""), f, m), Some("provider_not_allowed")),
        (full(Some("OpenAI"), f, m), Some("provider_not_allowed")),
        (
            full(p, Some("anthropic:messages"), m),
            Some("api_format_not_allowed"),
        ),
        (full(p, None, m), Some("api_format_not_allowed")),
        (full(p, Some("openai"), m), Some("api_format_not_allowed")),
        (full(p, f, Some("gpt-4")), Some("model_not_allowed")),
        (
            full(p, f, Some("gpt-4o-2024-08-06")),
            Some("model_not_allowed"),
        ),
        (full(p, f, None), Some("model_not_allowed")),
        (full(p, f, Some("o-mini")), Some("model_not_allowed")),
    ] {
        let a = admit(app, body.clone()).await;
        match expect {
            None => {
                let l = a.lease(&format!("{body}"));
                release(app, &l).await;
            }
            Some(code) => a.denied(403, code, &format!("{body}")),
        }
    }

    // Two listed names glued with the list separator never pass: the edge refuses control
    // characters outright (and admit.lua refuses them too, for callers of the script itself).
    for body in [
        full(Some("openai\u{1f}anthropic"), f, m),
        full(p, f, Some("gpt-4o\u{1f}gpt-4o-mini")),
    ] {
        let a = admit(app, body.clone()).await;
        assert_eq!(
            (a.status, a.body["code"].as_str()),
            (400, Some("bad_request")),
            "{body}: {}",
            a.body
        );
    }

    let (open, _) = new_key(app, json!({"rate_limit": null, "concurrent_limit": null})).await;
    for body in [
        with_key(&open, json!({})),
        with_key(
            &open,
            json!({"provider": "x", "api_format": "y", "model": "z"}),
        ),
    ] {
        let l = admit(app, body).await.lease("a key without allow-lists");
        release(app, &l).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Sliding window
// ---------------------------------------------------------------------------------------------

/// The rate window slides (a log, not fixed buckets). Needs [`short_window`] (2 s). Limit 2:
/// A at t≈0, B at t≈1.2 s, C right after is `rate_limited` with `retry_after_ms` equal to the
/// time until A leaves the window and `Retry-After` its ceiling in seconds; once A has left
/// (t≈2.1 s) exactly one more (D) is admitted while B is still inside, and E is refused until B
/// leaves. A fixed-bucket limiter admits C or E, or refuses D. Every assertion is bracketed by
/// host-side timestamps taken around each request, and an attempt whose timing was stretched
/// by the scheduler past what the assertion needs is repeated rather than judged.
pub async fn the_rate_window_slides(app: &TestApp) {
    require_setting(app, "TOLLGATE_RATE_WINDOW_SECONDS", "2");
    for attempt in 1..=4 {
        match sliding_window_attempt(app).await {
            Ok(()) => return,
            Err(why) => eprintln!("sliding-window attempt {attempt} inconclusive: {why}"),
        }
    }
    panic!("every sliding-window attempt was stretched by scheduling delays; the machine is too loaded to judge");
}

/// After a PATCH lowers `rate_limit` below what the window already holds, `retry_after_ms` is
/// the time until enough entries have left for one more admission, not until the oldest
/// leaves. Needs [`short_window`] (2 s): four admissions at t≈0 and t≈1 s (two each) with limit
/// 4; limit lowered to 1; the next denial's retry is at least the time until the later pair
/// leaves (≈1 s after the first pair), so a retry after the oldest's departure is refused.
pub async fn a_lowered_rate_limit_retries_after_the_entry_that_must_leave(app: &TestApp) {
    require_setting(app, "TOLLGATE_RATE_WINDOW_SECONDS", "2");
    const WINDOW: u64 = 2000;
    let (key, id) = new_key(app, json!({"rate_limit": 4, "concurrent_limit": null})).await;
    let body = with_key(&key, json!({}));
    admit(app, body.clone()).await.lease("first");
    admit(app, body.clone()).await.lease("second");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let third_sent = Instant::now();
    admit(app, body.clone()).await.lease("third");
    admit(app, body.clone()).await.lease("fourth");
    patch_key(app, &id, json!({"rate_limit": 1})).await;
    let denied = admit(app, body.clone()).await;
    let asked = Instant::now();
    denied.denied(429, "rate_limited", "four in the window, limit 1");
    let retry = denied.retry_after_ms();
    // The fourth entered at or after `third_sent`; it leaves the window no earlier than
    // `third_sent + WINDOW`, and the answer came at `asked` at the latest.
    let at_least = (third_sent + Duration::from_millis(WINDOW))
        .saturating_duration_since(asked)
        .as_millis() as u64;
    assert!(
        retry + 3 >= at_least && retry <= WINDOW,
        "retry_after_ms {retry}: the fourth entry leaves in at least {at_least} ms (the oldest \
         leaves about 1 s earlier)"
    );
    // Once the oldest pair has left, the window still holds two, over the lowered limit.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    admit(app, body.clone()).await.denied(
        429,
        "rate_limited",
        "the later pair still in the window",
    );
}

async fn sliding_window_attempt(app: &TestApp) -> Result<(), String> {
    const WINDOW: i64 = 2000;
    // Redis TIME is read in whole milliseconds.
    const SLACK: i64 = 3;
    let (key, _) = new_key(app, json!({"rate_limit": 2, "concurrent_limit": null})).await;
    let body = with_key(&key, json!({}));
    let timed = |body: Value| async move {
        let start = Instant::now();
        let a = admit(app, body).await;
        (start, a, Instant::now())
    };

    let (a0, a, a1) = timed(body.clone()).await;
    a.lease("A");
    tokio::time::sleep_until((a1 + Duration::from_millis(1200)).into()).await;
    let (b0, b, b1) = timed(body.clone()).await;
    b.lease("B");
    let (c0, c, c1) = timed(body.clone()).await;
    // A was admitted at some Redis instant in [a0, a1]; C is only certainly inside A's window
    // if it was decided before a0 + window.
    if ms(c1 - a0) >= WINDOW - SLACK {
        return Err(format!("C finished {} ms after A started", ms(c1 - a0)));
    }
    c.denied(429, "rate_limited", "C, third in the window");
    let retry = c.retry_after_ms() as i64;
    let (lo, hi) = (WINDOW - ms(c1 - a0), WINDOW - ms(c0 - a1));
    assert!(
        retry > 0 && retry <= WINDOW && retry >= lo - SLACK && retry <= hi + SLACK,
        "C's retry_after_ms {retry} is the time until A leaves the window: expected {lo}..={hi}"
    );
    let header = c
        .header("retry-after")
        .map(str::to_string)
        .expect("Retry-After header on rate_limited");
    assert_eq!(
        header,
        ((retry as u64).div_ceil(1000)).to_string(),
        "Retry-After is retry_after_ms rounded up to seconds"
    );

    // A left the window at most at a1 + window; B entered at b0 or later.
    tokio::time::sleep_until((a1 + Duration::from_millis(WINDOW as u64 + 100)).into()).await;
    let (_d0, d, _d1) = timed(body.clone()).await;
    d.lease("D, once A has left the window");
    let (e0, e, e1) = timed(body.clone()).await;
    if ms(e1 - b0) >= WINDOW - SLACK {
        return Err(format!("E finished {} ms after B started", ms(e1 - b0)));
    }
    e.denied(
        429,
        "rate_limited",
        "E, while B and D are inside the window",
    );
    let retry = e.retry_after_ms() as i64;
    let lo = WINDOW - ms(e1 - b0);
    assert!(
        retry >= lo - SLACK && retry <= WINDOW - ms(e0.saturating_duration_since(b1)) + SLACK,
        "E's retry_after_ms {retry} is the time until B leaves the window (at least {lo})"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------------------------

/// A lease that is neither settled nor released gives back its slot and its hold when its TTL
/// passes, with no sweeper running. Needs [`short_lease`] (1 s). The freed hold is given back
/// exactly once, even when the key was idle for longer than the TTL.
pub async fn an_expired_lease_frees_its_slot_and_its_hold(app: &TestApp) {
    require_setting(app, "TOLLGATE_LEASE_TTL_SECONDS", "1");
    let (key, _) = new_key(app, json!({"rate_limit": null, "concurrent_limit": 1})).await;
    let body = with_key(&key, json!({}));
    let a0 = Instant::now();
    admit(app, body.clone()).await.lease("the only slot");
    let d = admit(app, body.clone()).await;
    d.denied(429, "concurrency_limited", "second while the slot is taken");
    let retry = d.retry_after_ms();
    assert!(
        retry > 0 && retry <= 1000,
        "retry_after_ms {retry} within the lease TTL"
    );
    let (again, at) = admit_until_allowed(
        app,
        body.clone(),
        "concurrency_limited",
        Duration::from_secs(10),
    )
    .await;
    assert!(
        at - a0 >= Duration::from_millis(990),
        "the slot came back after {:?}, before the 1 s lease TTL",
        at - a0
    );
    assert_eq!(
        again.body["concurrency"]["in_flight"],
        json!(1),
        "the expired lease is not counted"
    );

    let (key, _) = new_key(
        app,
        json!({"is_standalone": true, "initial_balance_usd": 1, "rate_limit": null, "concurrent_limit": null}),
    )
    .await;
    let hold = with_key(&key, json!({"reserve_usd": amount("0.6")}));
    let first = admit(app, hold.clone()).await;
    first.lease("hold of 0.6");
    assert_eq!(first.balance(), Some(USD * 4 / 10));
    admit(app, hold.clone())
        .await
        .denied(402, "balance_exhausted", "a second hold of 0.6");
    // Sleep past the TTL without touching the key, so its lease bookkeeping can lapse whole.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (again, _) = admit_until_allowed(
        app,
        hold.clone(),
        "balance_exhausted",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        again.balance(),
        Some(USD * 4 / 10),
        "the expired hold is given back exactly once"
    );
}

/// admit.lua looks for expired leases only once the earliest expiry it knows of has passed:
/// a lease that expires before every other live one must move that time earlier, or its slot
/// would stay taken until the long lease's expiry.
pub async fn a_short_lease_taken_after_a_long_one_frees_its_slot_when_it_expires(app: &TestApp) {
    let (key, _) = new_key(app, json!({"rate_limit": null, "concurrent_limit": 2})).await;
    admit(app, with_key(&key, json!({"lease_ttl_seconds": 600})))
        .await
        .lease("a long lease");
    let short_at = Instant::now();
    admit(app, with_key(&key, json!({"lease_ttl_seconds": 1})))
        .await
        .lease("a short lease");
    let body = with_key(&key, json!({}));
    admit(app, body.clone())
        .await
        .denied(429, "concurrency_limited", "both slots are taken");
    let (again, at) =
        admit_until_allowed(app, body, "concurrency_limited", Duration::from_secs(10)).await;
    assert!(
        at - short_at >= Duration::from_millis(990),
        "the short lease's slot came back after {:?}, before its 1 s",
        at - short_at
    );
    assert_eq!(
        again.body["concurrency"]["in_flight"],
        json!(2),
        "the long lease and this one"
    );
}

/// A lease settled after its TTL passed is still charged and recorded, answers
/// `lease_expired: true`, and frees nothing twice. Needs [`short_lease`] (1 s).
pub async fn a_late_settlement_is_still_charged(app: &TestApp) {
    require_setting(app, "TOLLGATE_LEASE_TTL_SECONDS", "1");
    let (key, id) = new_key(
        app,
        json!({"is_standalone": true, "initial_balance_usd": 1, "rate_limit": null, "concurrent_limit": 1}),
    )
    .await;
    let lease = admit(app, with_key(&key, json!({"reserve_usd": amount("0.2")})))
        .await
        .lease("hold of 0.2");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = settle(app, &lease, "0.15").await;
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(s.body["settled"], json!(true));
    assert_eq!(s.body["duplicate"], json!(false));
    assert_eq!(s.body["lease_expired"], json!(true), "{}", s.body);
    assert_eq!(
        s.balance(),
        Some(USD * 85 / 100),
        "charged 0.15, the expired hold is gone"
    );
    let dup = settle(app, &lease, "0.15").await;
    assert_eq!((dup.status, &dup.body["duplicate"]), (200, &json!(true)));
    assert_eq!(
        dup.balance(),
        Some(USD * 85 / 100),
        "a duplicate charges nothing"
    );
    let next = admit(app, with_key(&key, json!({}))).await;
    next.lease("the slot is free again");
    assert_eq!(next.balance(), Some(USD * 85 / 100));
    await_balance_used(app, &id, USD * 15 / 100).await;
}

// ---------------------------------------------------------------------------------------------
// Settlement and release
// ---------------------------------------------------------------------------------------------

/// A settlement charges its cost exactly; settling again answers `duplicate: true` and charges
/// and records nothing; Postgres ends with one event and the exact cost.
pub async fn a_settlement_charges_exactly_once(app: &TestApp) {
    let (key, id) = new_key(
        app,
        json!({"is_standalone": true, "initial_balance_usd": 1, "rate_limit": null, "concurrent_limit": null}),
    )
    .await;
    let a = admit(app, with_key(&key, json!({}))).await;
    let lease = a.lease("admission");
    assert_eq!(a.balance(), Some(USD));
    let s = settle(app, &lease, "0.123456789").await;
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(
        (
            &s.body["settled"],
            &s.body["duplicate"],
            &s.body["lease_expired"]
        ),
        (&json!(true), &json!(false), &json!(false))
    );
    assert_eq!(s.balance(), Some(USD - 123_456_789));
    for cost in ["0.123456789", "0.5"] {
        let dup = settle(app, &lease, cost).await;
        assert_eq!(dup.status, 200, "{}", dup.body);
        assert_eq!(
            (&dup.body["settled"], &dup.body["duplicate"]),
            (&json!(true), &json!(true))
        );
        assert_eq!(
            dup.balance(),
            Some(USD - 123_456_789),
            "a duplicate charges nothing"
        );
    }
    let next = admit(app, with_key(&key, json!({}))).await;
    next.lease("next admission");
    assert_eq!(next.balance(), Some(USD - 123_456_789));
    await_balance_used(app, &id, 123_456_789).await;
    let st = stats(app, &id).await;
    assert_eq!(st["total_requests"], json!(1), "recorded once: {st}");
    assert_eq!(nanos(&st["total_cost_usd"]), 123_456_789);
}

/// A lease id that was never issued, or is not a lease id at all, answers `404 lease_unknown`
/// to settle and release alike.
pub async fn unknown_and_malformed_leases_are_404(app: &TestApp) {
    let (key, _) = new_key(app, json!({"rate_limit": null, "concurrent_limit": null})).await;
    let real = admit(app, with_key(&key, json!({})))
        .await
        .lease("a real lease");
    let (sid, _) = real.split_once('.').expect("lease id has a dot");
    let never_issued = format!("{sid}.{}", "A".repeat(22));
    let long = "a".repeat(300);
    let dp = DataPlane::of(app);
    for id in [
        never_issued.as_str(),
        &format!("{}.{}", "0".repeat(32), "B".repeat(22)),
        "",
        "nope",
        "x.y",
        &format!("{sid}.short"),
        &real.to_uppercase(),
        &format!("{real}x"),
        &long,
        "../../etc/passwd",
    ] {
        for path in ["/v1/settle", "/v1/release"] {
            let mut body = json!({"lease_id": id});
            if path == "/v1/settle" {
                body["cost_usd"] = amount("0.01");
            }
            let a = dp.post(path, &body).await;
            assert_eq!(
                (a.status, a.body["code"].as_str()),
                (404, Some("lease_unknown")),
                "{path} {id:?}: {}",
                a.body
            );
        }
    }
    // The real lease was untouched by all of that.
    let s = settle(app, &real, "0").await;
    assert_eq!(
        (s.status, &s.body["duplicate"]),
        (200, &json!(false)),
        "{}",
        s.body
    );
}

/// Release frees the slot and the hold, charges nothing, and is idempotent (a second release
/// gives nothing back twice); a released lease can still be settled, and that usage is
/// charged and recorded.
pub async fn release_frees_the_lease_and_a_later_settlement_still_charges(app: &TestApp) {
    let (key, id) = new_key(
        app,
        json!({"is_standalone": true, "initial_balance_usd": 1, "rate_limit": null, "concurrent_limit": 1}),
    )
    .await;
    let a = admit(app, with_key(&key, json!({"reserve_usd": amount("0.6")}))).await;
    let lease = a.lease("hold of 0.6");
    assert_eq!(a.balance(), Some(USD * 4 / 10));
    for i in 0..3 {
        let r = release(app, &lease).await;
        assert_eq!(
            (r.status, &r.body),
            (200, &json!({"released": true})),
            "release {i}"
        );
    }
    let all = admit(app, with_key(&key, json!({"reserve_usd": 1}))).await;
    let whole = all.lease("the slot and the whole balance after the release");
    assert_eq!(
        all.balance(),
        Some(0),
        "the hold came back once, not three times"
    );

    release(app, &whole).await;
    let s = settle(app, &whole, "0.25").await;
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(
        (&s.body["settled"], &s.body["duplicate"]),
        (&json!(true), &json!(false))
    );
    assert_eq!(
        s.balance(),
        Some(USD * 3 / 4),
        "a settlement after release is charged"
    );
    let r = release(app, &whole).await;
    assert_eq!(r.status, 200, "release after settle is a no-op: {}", r.body);
    let next = admit(app, with_key(&key, json!({}))).await;
    next.lease("next admission");
    assert_eq!(
        next.balance(),
        Some(USD * 3 / 4),
        "release after settle refunds nothing"
    );
    await_balance_used(app, &id, USD / 4).await;
}

/// 1,000 charges of 0.000000123, settled concurrently, sum to exactly 0.000123: in Redis
/// (`balance_remaining_usd` of the next admission) and in Postgres (`balance_used_usd`, stats).
pub async fn a_thousand_tiny_charges_sum_exactly(app: &TestApp) {
    const N: usize = 1000;
    const EACH: i64 = 123;
    let (key, id) = new_key(
        app,
        json!({"is_standalone": true, "initial_balance_usd": 1, "rate_limit": null, "concurrent_limit": null}),
    )
    .await;
    let admitted = post_in_batches(app, "/v1/admit", vec![with_key(&key, json!({})); N], 50).await;
    let leases: Vec<String> = admitted.iter().map(|a| a.lease("tiny admission")).collect();
    let settles: Vec<Value> = leases
        .iter()
        .map(|l| json!({"lease_id": l, "cost_usd": amount("0.000000123"), "input_tokens": 1}))
        .collect();
    let settled = post_in_batches(app, "/v1/settle", settles, 50).await;
    let mut lowest = USD;
    for s in &settled {
        assert_eq!(
            (s.status, &s.body["duplicate"]),
            (200, &json!(false)),
            "{}",
            s.body
        );
        lowest = lowest.min(s.balance().expect("balance"));
    }
    let total = EACH * N as i64;
    assert_eq!(lowest, USD - total, "the last settlement saw every charge");
    let next = admit(app, with_key(&key, json!({}))).await;
    next.lease("admission after the charges");
    assert_eq!(next.balance(), Some(USD - total), "Redis sums exactly");
    await_balance_used(app, &id, total).await;
    let st = stats(app, &id).await;
    assert_eq!(st["total_requests"], json!(N), "{st}");
    assert_eq!(nanos(&st["total_cost_usd"]), total, "{st}");
}

/// Reserve holds add up: balance 1.00 and three holds of 0.30 leave 0.10, so a fourth is `402`;
/// settling one at 0.05 charges 0.05 and gives its 0.30 back (0.35 remain).
pub async fn reserve_holds_add_up(app: &TestApp) {
    let (key, _) = new_key(
        app,
        json!({"is_standalone": true, "initial_balance_usd": 1, "rate_limit": null, "concurrent_limit": null}),
    )
    .await;
    let hold = with_key(&key, json!({"reserve_usd": amount("0.30")}));
    let mut leases = Vec::new();
    for expect in [70, 40, 10] {
        let a = admit(app, hold.clone()).await;
        leases.push(a.lease("hold of 0.30"));
        assert_eq!(a.balance(), Some(USD * expect / 100));
    }
    admit(app, hold.clone()).await.denied(
        402,
        "balance_exhausted",
        "a fourth hold of 0.30 with 0.10 left",
    );
    let s = settle(app, &leases[0], "0.05").await;
    assert_eq!(s.balance(), Some(USD * 35 / 100), "{}", s.body);
    let a = admit(app, hold.clone()).await;
    a.lease("a hold of 0.30 with 0.35 left");
    assert_eq!(a.balance(), Some(USD * 5 / 100));
    // Without reserve_usd only a positive remainder is needed.
    let a = admit(app, with_key(&key, json!({}))).await;
    a.lease("no reservation with 0.05 left");
    assert_eq!(a.balance(), Some(USD * 5 / 100));
}

/// Large numbers stay exact end to end: a balance near the supported maximum (2^53 − 1
/// nano-USD) is admitted and reported to the nano-dollar in admissions and settlements, and a
/// settlement with token counts at the per-settlement cap (2^40 each) reaches Postgres with exactly those counts (and a
/// total summed without rounding).
pub async fn large_amounts_stay_exact(app: &TestApp) {
    let max = tollgate::store::keys::MAX_BALANCE_NANOS;
    let (key, id) = new_key(
        app,
        json!({"is_standalone": true, "initial_balance_usd": amount(&Money::from_nanos(max).to_string()),
               "rate_limit": null, "concurrent_limit": null}),
    )
    .await;
    let a = admit(
        app,
        with_key(&key, json!({"reserve_usd": amount("0.000000001")})),
    )
    .await;
    let lease = a.lease("admission on the largest balance");
    assert_eq!(a.balance(), Some(max - 1));
    let s = DataPlane::of(app)
        .post(
            "/v1/settle",
            &json!({"lease_id": lease, "cost_usd": amount("123456.789"),
                    "input_tokens": 1_u64 << 40, "output_tokens": 1_u64 << 40}),
        )
        .await;
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(s.balance(), Some(max - 123_456_789_000_000), "{}", s.body);
    await_balance_used(app, &id, 123_456_789_000_000).await;
    let st = stats(app, &id).await;
    assert_eq!(st["total_requests"], json!(1), "{st}");
    assert_eq!(st["total_tokens"], json!(1_u64 << 41), "{st}");
    let over = DataPlane::of(app)
        .post(
            "/v1/settle",
            &json!({"lease_id": lease, "cost_usd": 0, "input_tokens": (1_u64 << 40) + 1}),
        )
        .await;
    assert_eq!(
        over.status, 400,
        "token counts over the cap are refused: {}",
        over.body
    );
    // A cost of 16 digits, with a hold to give back: charged exactly, the hold returned.
    let left = max - 123_456_789_000_000;
    let a = admit(
        app,
        with_key(&key, json!({"reserve_usd": amount("0.000000001")})),
    )
    .await;
    let lease = a.lease("a second hold");
    assert_eq!(a.balance(), Some(left - 1));
    let s = settle(app, &lease, "2000000.000000001").await;
    assert_eq!(s.status, 200, "{}", s.body);
    let left = left - 2_000_000_000_000_001;
    assert_eq!(
        s.balance(),
        Some(left),
        "charged exactly, the hold given back"
    );
    let a = admit(app, with_key(&key, json!({}))).await;
    a.lease("nothing held any more");
    assert_eq!(a.balance(), Some(left), "{}", a.body);
}

// ---------------------------------------------------------------------------------------------
// Admin changes, lost state, unknown keys
// ---------------------------------------------------------------------------------------------

/// Every admin write reaches the very next admission: PATCH of `rate_limit`,
/// `concurrent_limit`, `is_active`, `allowed_models`, `expires_at`; DELETE (→ `key_disabled`);
/// and a top-up of an exhausted balance.
pub async fn admin_changes_reach_the_next_admission(app: &TestApp) {
    let (key, id) = new_key(app, json!({"rate_limit": 1, "concurrent_limit": null})).await;
    let body = with_key(&key, json!({"model": "m2"}));
    admit(app, body.clone()).await.lease("1 of rate 1");
    admit(app, body.clone())
        .await
        .denied(429, "rate_limited", "2 of rate 1");
    patch_key(app, &id, json!({"rate_limit": 3})).await;
    let a = admit(app, body.clone()).await;
    a.lease("2 of rate 3");
    assert_eq!(a.body["rate_limit"]["limit"], json!(3));
    admit(app, body.clone()).await.lease("3 of rate 3");
    admit(app, body.clone())
        .await
        .denied(429, "rate_limited", "4 of rate 3");
    patch_key(app, &id, json!({"rate_limit": null})).await;
    let a = admit(app, body.clone()).await;
    a.lease("rate limit cleared");
    assert_eq!(a.body["rate_limit"]["limit"], Value::Null);

    patch_key(app, &id, json!({"concurrent_limit": 1})).await;
    // Leases granted while the key had no limit were not counted (nothing tracks them); the
    // limit counts from the next admission on, so the second one after the PATCH is refused.
    // The first admission after this PATCH, and after the one that clears the limit, is made
    // with the previous grant's guess of whether the key needs its counters
    // (hot/known_keys.rs): wrong each time, and answered right each time.
    let a = admit(app, body.clone()).await;
    a.lease("1 of concurrency 1");
    assert_eq!(a.body["concurrency"]["in_flight"], json!(1), "{}", a.body);
    admit(app, body.clone())
        .await
        .denied(429, "concurrency_limited", "concurrent_limit set to 1");
    patch_key(app, &id, json!({"concurrent_limit": null})).await;
    admit(app, body.clone())
        .await
        .lease("concurrency limit cleared");

    let past = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    let future = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let m1 = with_key(&key, json!({"model": "m1"}));
    // (the PATCH first, if any; the admission; `None`: it is granted, or the code of its 403)
    #[rustfmt::skip]
    let steps: Vec<(Option<Value>, &Value, Option<&str>, &str)> = vec![
        (Some(json!({"is_active": false})), &body, Some("key_disabled"), "is_active false"),
        (Some(json!({"is_active": true})), &body, None, "is_active true again"),
        (Some(json!({"allowed_models": ["m1"]})), &body, Some("model_not_allowed"), "m2 not in [m1]"),
        (None, &m1, None, "m1 in [m1]"),
        (Some(json!({"allowed_models": null})), &body, None, "allow-list cleared"),
        (Some(json!({"expires_at": past})), &body, Some("key_expired"), "expires_at in the past"),
        (Some(json!({"expires_at": future})), &body, None, "expires_at tomorrow"),
        (Some(json!({"expires_at": past})), &body, Some("key_expired"), "expired again"),
        (Some(json!({"expires_at": null})), &body, None, "expiry cleared"),
    ];
    for (patch, admission, refused, what) in steps {
        if let Some(patch) = patch {
            patch_key(app, &id, patch).await;
        }
        let a = admit(app, admission.clone()).await;
        match refused {
            Some(code) => a.denied(403, code, what),
            None => {
                a.lease(what);
            }
        }
    }

    let res = app.admin_delete(&format!("/admin/keys/{id}")).await;
    assert_eq!(res.status(), 200, "DELETE");
    admit(app, body.clone())
        .await
        .denied(403, "key_disabled", "after DELETE");

    let (key, id) = new_key(
        app,
        json!({"is_standalone": true, "initial_balance_usd": amount("0.01"), "rate_limit": null, "concurrent_limit": null}),
    )
    .await;
    let l = admit(app, with_key(&key, json!({})))
        .await
        .lease("spend the balance");
    settle(app, &l, "0.01").await;
    admit(app, with_key(&key, json!({})))
        .await
        .denied(402, "balance_exhausted", "balance spent");
    let res = app
        .admin_post(
            &format!("/admin/keys/{id}/balance"),
            json!({"amount_usd": 1}),
        )
        .await;
    assert_eq!(res.status(), 200, "top-up");
    let a = admit(app, with_key(&key, json!({}))).await;
    a.lease("after the top-up");
    assert_eq!(a.balance(), Some(USD), "1.01 credited, 0.01 used");
}

/// After the namespace's Redis state is lost (every key deleted), existing keys are hydrated
/// again from Postgres on their next admission: their configuration, and the spend already
/// synced to Postgres, so a lost Redis does not refill balances. Single Redis only: it wipes
/// the namespace through the harness's direct connection.
pub async fn lost_redis_state_is_rehydrated_from_postgres(app: &TestApp) {
    let (key, id) = new_key(
        app,
        json!({"is_standalone": true, "initial_balance_usd": 1, "rate_limit": 10, "concurrent_limit": 2,
               "allowed_models": ["m1"]}),
    )
    .await;
    let m1 = with_key(&key, json!({"model": "m1"}));
    let l = admit(app, m1.clone()).await.lease("before the wipe");
    settle(app, &l, "0.25").await;
    await_balance_used(app, &id, USD / 4).await;
    let (limited, limited_id) =
        new_key(app, json!({"rate_limit": 2, "concurrent_limit": null})).await;
    patch_key(app, &limited_id, json!({"allowed_providers": ["p1"]})).await;

    let state = tollgate::hot::layout::Layout::new(&app.namespace)
        .for_hash(&tollgate::keys::hash(&key))
        .state;
    assert!(
        app.wipe_namespace().await.contains(&state),
        "the wipe deleted the key's state"
    );

    let a = admit(app, m1.clone()).await;
    let l = a.lease("the first admission after the wipe");
    assert_eq!(
        a.balance(),
        Some(USD * 3 / 4),
        "the synced spend survives the wipe"
    );
    assert_eq!(a.body["rate_limit"]["limit"], json!(10));
    assert_eq!(a.body["concurrency"]["limit"], json!(2));
    admit(app, with_key(&key, json!({"model": "m2"})))
        .await
        .denied(403, "model_not_allowed", "allow-list after the wipe");
    let s = settle(app, &l, "0.05").await;
    assert_eq!(s.balance(), Some(USD * 7 / 10), "{}", s.body);
    await_balance_used(app, &id, USD * 3 / 10).await;

    let p1 = with_key(&limited, json!({"provider": "p1"}));
    admit(app, with_key(&limited, json!({"provider": "p2"})))
        .await
        .denied(
            403,
            "provider_not_allowed",
            "the patched allow-list after the wipe",
        );
    admit(app, p1.clone())
        .await
        .lease("1 of rate 2 after the wipe");
    admit(app, p1.clone())
        .await
        .lease("2 of rate 2 after the wipe");
    admit(app, p1.clone())
        .await
        .denied(429, "rate_limited", "3 of rate 2 after the wipe");
}

/// A flood of 500 random keys costs Postgres a bounded number of look-ups: each answer is
/// `401 key_invalid` (looked up once, then remembered as unknown) or `503 unavailable` (the
/// per-process look-up budget was spent; no look-up), the look-ups never exceed the budget
/// (burst + rate × elapsed), and asking for the same unknown keys again costs no look-up at
/// all. Needs the app's Postgres traffic routed through `pg` ([`PgLookupCounter::route`]).
pub async fn unknown_keys_cost_bounded_postgres_lookups(app: &TestApp, pg: &PgLookupCounter) {
    assert!(
        app.settings["TOLLGATE_DATABASE_URL"].contains(&pg.addr.to_string()),
        "start the app with PgLookupCounter::route so its look-ups can be counted"
    );
    const FLOOD: usize = 500;
    let keys: Vec<String> = (0..FLOOD).map(|_| unique("sk-")).collect();
    let bodies: Vec<Value> = keys.iter().map(|k| with_key(k, json!({}))).collect();
    let before = pg.lookups();
    let started = Instant::now();
    let answers = post_in_batches(app, "/v1/admit", bodies, 50).await;
    let elapsed = started.elapsed();
    let looked_up = pg.lookups() - before;

    let mut invalid = Vec::new();
    let mut throttled = 0;
    for (k, a) in keys.iter().zip(&answers) {
        match (a.status, a.body["code"].as_str()) {
            (401, Some("key_invalid")) => invalid.push(k.clone()),
            (503, Some("unavailable")) => throttled += 1,
            _ => panic!("an unknown key answered {} {}", a.status, a.body),
        }
    }
    eprintln!(
        "{FLOOD} unknown keys in {elapsed:?}: {} key_invalid, {throttled} throttled, {looked_up} look-ups",
        invalid.len()
    );
    assert!(
        looked_up > 0,
        "no look-up was counted: is the by-hash query still the one counted?"
    );
    assert_eq!(
        looked_up,
        invalid.len() as u64,
        "every key_invalid costs one look-up, every throttled answer none"
    );
    let budget = LOOKUP_BURST + LOOKUPS_PER_SECOND * elapsed.as_secs_f64() + 1.0;
    assert!(
        (looked_up as f64) <= budget,
        "{looked_up} look-ups in {elapsed:?} exceed the budget of {budget:.0}"
    );

    let before = pg.lookups();
    let again: Vec<Value> = invalid.iter().map(|k| with_key(k, json!({}))).collect();
    for a in post_in_batches(app, "/v1/admit", again, 50).await {
        a.denied(401, "key_invalid", "an unknown key asked again");
    }
    assert_eq!(
        pg.lookups() - before,
        0,
        "unknown keys asked again are answered from the negative cache"
    );
}

// ---------------------------------------------------------------------------------------------
// Counting Postgres look-ups
// ---------------------------------------------------------------------------------------------

/// A TCP proxy in front of Postgres that counts executions of the key-by-hash query (the
/// admission path's only Postgres look-up), per proxy, so parallel tests do not see each
/// other's look-ups. It reads the frontend protocol: `Parse` names a statement, `Bind` runs
/// one; TLS requests are declined so the stream stays readable.
pub struct PgLookupCounter {
    pub addr: SocketAddr,
    lookups: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

/// What identifies the look-up statement (`store::keys::by_hash`).
const LOOKUP_SQL: &[u8] = b"FROM api_keys WHERE key_hash = $1";

impl PgLookupCounter {
    /// Starts the proxy in front of the test Postgres server.
    pub async fn start() -> Self {
        let upstream = PgUrl::parse(&super::pg_server_url()).hostport;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind pg proxy");
        let addr = listener.local_addr().expect("pg proxy addr");
        let lookups = Arc::new(AtomicU64::new(0));
        let counter = lookups.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, counter) = (upstream.clone(), counter.clone());
                tokio::spawn(async move {
                    let _ = pg_connection(client, &upstream, counter).await;
                });
            }
        });
        PgLookupCounter {
            addr,
            lookups,
            accept,
        }
    }

    /// Settings tweak: the app reaches Postgres through this proxy.
    pub fn route(&self, s: &mut Settings) {
        let mut url = PgUrl::parse(&s["TOLLGATE_DATABASE_URL"]);
        url.hostport = self.addr.to_string();
        s.insert("TOLLGATE_DATABASE_URL", url.to_string());
    }

    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::SeqCst)
    }
}

impl Drop for PgLookupCounter {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// `postgres://user@host:port/db`, taken apart.
pub struct PgUrl {
    scheme: String,
    userinfo: String,
    pub hostport: String,
    path: String,
}

impl PgUrl {
    pub fn parse(url: &str) -> Self {
        let (scheme, rest) = url.split_once("://").expect("database URL has a scheme");
        let (auth, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match auth.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), auth),
        };
        let hostport = if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:5432")
        };
        PgUrl {
            scheme: scheme.to_string(),
            userinfo,
            hostport,
            path: path.to_string(),
        }
    }
}

impl std::fmt::Display for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}://{}{}{}",
            self.scheme, self.userinfo, self.hostport, self.path
        )
    }
}

async fn pg_connection(
    client: TcpStream,
    upstream: &str,
    lookups: Arc<AtomicU64>,
) -> std::io::Result<()> {
    const SSL_REQUEST: u32 = 80_877_103;
    const GSSENC_REQUEST: u32 = 80_877_104;
    let mut server = TcpStream::connect(upstream).await?;
    let mut client = client;
    // Start-up messages carry no type byte. Decline encryption ourselves ('N'), so the client
    // goes on in plaintext, then pass the StartupMessage (or CancelRequest) through.
    loop {
        let len = client.read_u32().await? as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        client.read_exact(&mut body).await?;
        let code = body
            .get(..4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        if matches!(code, Some(SSL_REQUEST | GSSENC_REQUEST)) {
            client.write_all(b"N").await?;
            continue;
        }
        server.write_all(&(len as u32).to_be_bytes()).await?;
        server.write_all(&body).await?;
        break;
    }
    let (cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    });
    let mut cr = BufReader::new(cr);
    // Statement name -> whether it is the look-up.
    let mut statements: HashMap<Vec<u8>, bool> = HashMap::new();
    loop {
        let kind = cr.read_u8().await?;
        let len = cr.read_u32().await? as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        cr.read_exact(&mut body).await?;
        let mut fields = body.split(|b| *b == 0);
        match kind {
            b'P' => {
                let name = fields.next().unwrap_or_default().to_vec();
                let sql = fields.next().unwrap_or_default();
                statements.insert(name, contains(sql, LOOKUP_SQL));
            }
            b'B' => {
                let _portal = fields.next();
                let name = fields.next().unwrap_or_default();
                if statements.get(name).copied().unwrap_or(false) {
                    lookups.fetch_add(1, Ordering::SeqCst);
                }
            }
            b'Q' if contains(&body, LOOKUP_SQL) => {
                lookups.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
        // Counted before it is forwarded, so a count is in place before any answer exists.
        let mut frame = Vec::with_capacity(len + 1);
        frame.push(kind);
        frame.extend_from_slice(&(len as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        sw.write_all(&frame).await?;
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

// ---------------------------------------------------------------------------------------------
// Lease terms (contract v1.1, section 1)
// ---------------------------------------------------------------------------------------------

/// `lease_ttl_seconds` sets this lease's lifetime instead of `TOLLGATE_LEASE_TTL_SECONDS`
/// (600 s here): a 1 s lease frees its slot after 1 s, and the `concurrency_limited` denial
/// meanwhile says so (`retry_after_ms` ≤ 1000). Out-of-range lifetimes are 400 and take nothing.
pub async fn a_lease_lives_as_long_as_its_admission_asked(app: &TestApp) {
    let (key, _) = new_key(app, json!({"rate_limit": null, "concurrent_limit": 1})).await;
    for bad in [json!(0), json!(86_401), json!(-1), json!(1.5), json!("60")] {
        let a = admit(app, with_key(&key, json!({"lease_ttl_seconds": bad}))).await;
        assert_eq!(
            (a.status, a.body["code"].as_str()),
            (400, Some("bad_request")),
            "lease_ttl_seconds {bad}: {}",
            a.body
        );
    }
    let short = with_key(&key, json!({"lease_ttl_seconds": 1}));
    let a0 = Instant::now();
    admit(app, short.clone()).await.lease("a 1 s lease");
    let d = admit(app, short.clone()).await;
    d.denied(429, "concurrency_limited", "while the 1 s lease lives");
    let retry = d.retry_after_ms();
    assert!((1..=1000).contains(&retry), "retry_after_ms {retry}");
    let (_, at) = admit_until_allowed(
        app,
        short.clone(),
        "concurrency_limited",
        Duration::from_secs(10),
    )
    .await;
    assert!(
        at - a0 >= Duration::from_millis(990),
        "the slot came back after {:?}, before the lease's 1 s",
        at - a0
    );
    // The longest lifetime is accepted, and holds the slot.
    let (key, _) = new_key(app, json!({"rate_limit": null, "concurrent_limit": 1})).await;
    admit(app, with_key(&key, json!({"lease_ttl_seconds": 86_400})))
        .await
        .lease("a day-long lease");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    admit(app, with_key(&key, json!({}))).await.denied(
        429,
        "concurrency_limited",
        "the day-long lease still holds",
    );
}

/// `"lease": "none"` admits without a lease: no lease id, the concurrency limit and holds do
/// not apply, the rate limit and the balance still do.
pub async fn an_admission_without_a_lease_skips_concurrency_and_holds(app: &TestApp) {
    let (key, _) = new_key(app, json!({"rate_limit": 3, "concurrent_limit": 1})).await;
    let none = with_key(&key, json!({"lease": "none", "lease_ttl_seconds": 5}));
    admit(app, with_key(&key, json!({})))
        .await
        .lease("the only slot");
    for i in 0..2 {
        let a = admit(app, none.clone()).await;
        assert_eq!(a.status, 200, "lease-less {i}: {}", a.body);
        assert_eq!(a.body["lease_id"], Value::Null, "{}", a.body);
        assert_eq!(a.body["concurrency"]["in_flight"], json!(1), "{}", a.body);
    }
    admit(app, none.clone()).await.denied(
        429,
        "rate_limited",
        "the rate limit counts lease-less admissions",
    );
    for bad in ["held", "", "NONE please"] {
        let a = admit(app, with_key(&key, json!({"lease": bad}))).await;
        assert_eq!(a.status, 400, "lease {bad:?}: {}", a.body);
    }

    let (key, _) = new_key(
        app,
        json!({"is_standalone": true, "initial_balance_usd": 1, "rate_limit": null, "concurrent_limit": null}),
    )
    .await;
    let none = with_key(&key, json!({"lease": "none", "reserve_usd": amount("0.6")}));
    for i in 0..2 {
        let a = admit(app, none.clone()).await;
        assert_eq!(a.status, 200, "lease-less with a reserve {i}: {}", a.body);
        assert_eq!(a.balance(), Some(USD), "no hold is taken");
    }
    let (broke, _) = new_key(
        app,
        json!({"is_standalone": true, "initial_balance_usd": 0, "rate_limit": null}),
    )
    .await;
    admit(app, with_key(&broke, json!({"lease": "none"})))
        .await
        .denied(402, "balance_exhausted", "the balance must still be > 0");
}

// ---------------------------------------------------------------------------------------------
// Prices (contract v1.1, section 2)
// ---------------------------------------------------------------------------------------------

/// A prices file with awkward prices, for [`priced_settlements_are_exact_to_the_nano_dollar`].
pub fn awkward_prices(s: &mut Settings) {
    let path = std::env::temp_dir().join("tollgate-test-awkward-prices.json");
    std::fs::write(
        &path,
        r#"{"acme/awkward": {"input_per_mtok_usd": 0.123456789, "output_per_mtok_usd": 7.000000001,
            "cached_input_per_mtok_usd": 0.000000001}}"#,
    )
    .expect("write the prices file");
    s.insert("TOLLGATE_PRICES_FILE", path.display().to_string());
}

/// A settlement without `cost_usd` is priced from its tokens at the price of its provider and
/// model (the settlement's, else the admission's), exactly, rounded up to the next nano-dollar;
/// with no price known it is `422 price_unknown` and the lease stays live.
pub async fn priced_settlements_are_exact_to_the_nano_dollar(app: &TestApp) {
    require_setting_present(app, "TOLLGATE_PRICES_FILE");
    let (key, id) = new_key(
        app,
        json!({"is_standalone": true, "initial_balance_usd": 1_000_000, "rate_limit": null,
            "concurrent_limit": null}),
    )
    .await;
    let dp = DataPlane::of(app);
    // Named by the admission only: the script is asked for the model first.
    let lease = admit(
        app,
        with_key(&key, json!({"provider": "acme", "model": "awkward"})),
    )
    .await
    .lease("priced by the admission's model");
    // 3e9 input of which 1e9 cached, 2e9 output:
    // 2e9 × 0.123456789 + 1e9 × 0.000000001 + 2e9 × 7.000000001 $/Mtok
    // = 246.913578 + 0.000001 + 14000.000002 = 14246.913581 USD exactly.
    let a = dp
        .post(
            "/v1/settle",
            &json!({"lease_id": lease, "input_tokens": 3_000_000_000u64,
                "cached_input_tokens": 1_000_000_000u64, "output_tokens": 2_000_000_000u64}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let first = 14_246_913_581_000i64;
    // Named by the settlement: priced in Rust. One input token: 123.456789 nano → 124.
    let lease = admit(app, with_key(&key, json!({})))
        .await
        .lease("unnamed admission");
    let a = dp
        .post(
            "/v1/settle",
            &json!({"lease_id": lease, "input_tokens": 1, "provider": "acme", "model": "awkward"}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    await_balance_used(app, &id, first + 124).await;

    // No price: 422, nothing written, the lease still settles with a cost.
    let lease = admit(
        app,
        with_key(&key, json!({"provider": "acme", "model": "unpriced"})),
    )
    .await
    .lease("an unpriced model");
    let a = dp
        .post(
            "/v1/settle",
            &json!({"lease_id": lease, "output_tokens": 10}),
        )
        .await;
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (422, Some("price_unknown")),
        "{}",
        a.body
    );
    let a = settle(app, &lease, "0.5").await;
    assert_eq!(
        (a.status, a.body["duplicate"].as_bool()),
        (200, Some(false)),
        "the lease stayed live: {}",
        a.body
    );
    // No cost and no tokens: 0. Cached above input: 400.
    let lease = admit(app, with_key(&key, json!({}))).await.lease("free");
    let a = dp.post("/v1/settle", &json!({"lease_id": lease})).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let lease = admit(app, with_key(&key, json!({})))
        .await
        .lease("bad cached");
    let a = dp
        .post(
            "/v1/settle",
            &json!({"lease_id": lease, "input_tokens": 1, "cached_input_tokens": 2,
                "provider": "acme", "model": "awkward"}),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.body);
    await_balance_used(app, &id, first + 124 + USD / 2).await;
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM usage_events WHERE key_id = $1::uuid AND cost_nanos = $2",
    )
    .bind(&id)
    .bind(first)
    .fetch_one(&app.db)
    .await
    .expect("usage events");
    assert_eq!(events, 1, "the priced cost is the event's cost");
}

#[track_caller]
fn require_setting_present(app: &TestApp, name: &str) {
    assert!(
        app.settings.contains_key(name),
        "this scenario needs {name} set"
    );
}

// ---------------------------------------------------------------------------------------------
// Token limits and spend budgets (contract v1.1, section 2)
// ---------------------------------------------------------------------------------------------

/// Settles `lease` with no cost and `total_tokens`.
async fn settle_tokens(app: &TestApp, lease: &str, total: u64) {
    let a = DataPlane::of(app)
        .post(
            "/v1/settle",
            &json!({"lease_id": lease, "cost_usd": 0, "total_tokens": total}),
        )
        .await;
    assert_eq!(a.status, 200, "settle {total} tokens: {}", a.body);
}

/// Settled tokens count against `token_limit` for the rate window, and so do the tokens live
/// leases reserve; 40 simultaneous admissions reserving 10 tokens each under a limit of 100
/// admit exactly 10.
pub async fn token_limits_admit_exactly_what_fits(app: &TestApp) {
    let (key, _) = new_key(
        app,
        json!({"token_limit": 1000, "rate_limit": null, "concurrent_limit": null}),
    )
    .await;
    let first = admit(app, with_key(&key, json!({}))).await;
    assert_eq!(
        first.body["tokens"],
        json!({"limit": 1000, "remaining": 1000, "reset_ms": 0}),
        "{}",
        first.body
    );
    settle_tokens(app, &first.lease("first"), 600).await;
    let d = admit(app, with_key(&key, json!({"reserve_tokens": 500}))).await;
    d.denied(429, "token_limited", "600 settled + 500 reserved > 1000");
    let retry = d.retry_after_ms();
    assert!(
        (1..=60_000).contains(&retry),
        "retry_after_ms {retry}: until the 600 leave the window"
    );
    let held = admit(app, with_key(&key, json!({"reserve_tokens": 400}))).await;
    let held_lease = held.lease("600 + 400 = 1000 fits");
    assert_eq!(held.body["tokens"]["remaining"], json!(0), "{}", held.body);
    let reset = held.body["tokens"]["reset_ms"].as_u64().expect("reset_ms");
    assert!((1..=60_000).contains(&reset), "reset_ms {reset}");
    admit(app, with_key(&key, json!({}))).await.denied(
        429,
        "token_limited",
        "the window and the hold fill the limit",
    );
    release(app, &held_lease).await;
    let a = admit(app, with_key(&key, json!({}))).await;
    a.lease("the hold came back");
    assert_eq!(a.body["tokens"]["remaining"], json!(400), "{}", a.body);

    let (key, _) = new_key(
        app,
        json!({"token_limit": 100, "rate_limit": null, "concurrent_limit": null}),
    )
    .await;
    let bodies = (0..40)
        .map(|_| with_key(&key, json!({"reserve_tokens": 10})))
        .collect();
    let t = tally(&admit_all_at_once(app, bodies).await);
    assert_eq!(t.get("200"), Some(&10), "{t:?}");
    assert_eq!(t.get("429 token_limited"), Some(&30), "{t:?}");

    // A key without a token limit answers a null limit.
    let (plain, _) = new_key(app, json!({"rate_limit": null})).await;
    let a = admit(app, with_key(&plain, json!({"reserve_tokens": 1_000_000}))).await;
    a.lease("no token limit");
    assert_eq!(
        a.body["tokens"],
        json!({"limit": null, "remaining": null, "reset_ms": 0})
    );
}

/// The start of the next UTC day, week (Monday) and month, as the contract defines them.
fn next_period_starts() -> [(String, chrono::DateTime<chrono::Utc>); 3] {
    use chrono::{Datelike, TimeZone};
    let now = chrono::Utc::now();
    let today = now.date_naive();
    let midnight = |d: chrono::NaiveDate| {
        chrono::Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight"))
    };
    let next_day = midnight(today + chrono::Duration::days(1));
    let monday = today - chrono::Duration::days(i64::from(today.weekday().num_days_from_monday()));
    let next_week = midnight(monday + chrono::Duration::days(7));
    let first = today.with_day(1).expect("first of the month");
    let next_month = midnight(
        first
            .checked_add_months(chrono::Months::new(1))
            .expect("next month"),
    );
    [
        ("day".into(), next_day),
        ("week".into(), next_week),
        ("month".into(), next_month),
    ]
}

/// A spend budget counts the period's settled spend plus holds: 40 simultaneous admissions
/// holding 0.1 under a budget of 1 admit exactly 10; spent, it is `402 budget_exceeded` until
/// the period turns, on every replica at once; answers name when each kind of period resets.
pub async fn budgets_admit_exactly_what_fits(app: &TestApp) {
    let (key, id) = new_key(
        app,
        json!({"budget_usd": 1, "budget_period": "day", "rate_limit": null,
            "concurrent_limit": null}),
    )
    .await;
    let bodies = (0..40)
        .map(|_| with_key(&key, json!({"reserve_usd": amount("0.1")})))
        .collect();
    let answers = admit_all_at_once(app, bodies).await;
    let t = tally(&answers);
    assert_eq!(t.get("200"), Some(&10), "{t:?}");
    assert_eq!(t.get("402 budget_exceeded"), Some(&30), "{t:?}");
    let [(_, next_day), ..] = next_period_starts();
    for a in answers.iter().filter(|a| a.status == 402) {
        let retry = a.retry_after_ms();
        let until = (next_day - chrono::Utc::now()).num_milliseconds();
        assert!(
            (retry as i64 - until).abs() < 60_000,
            "retry_after_ms {retry}: until the day turns ({until} ms)"
        );
    }
    for a in answers.iter().filter(|a| a.status == 200) {
        settle(app, a.body["lease_id"].as_str().expect("lease"), "0.1").await;
    }
    admit(app, with_key(&key, json!({}))).await.denied(
        402,
        "budget_exceeded",
        "the day's budget is spent",
    );
    let other = app.replica().await;
    admit(&other, with_key(&key, json!({}))).await.denied(
        402,
        "budget_exceeded",
        "another replica sees it at once",
    );
    await_balance_used(app, &id, USD).await;
    let k = key_json(app, &id).await;
    assert_eq!(nanos(&k["budget_spent_usd"]), USD, "{k}");
    assert_eq!(k["budget_period"], json!("day"));

    // Each kind of period: the answer says when it resets, as the calendar does.
    for (period, next) in next_period_starts() {
        let (key, _) = new_key(
            app,
            json!({"budget_usd": 5, "budget_period": period, "rate_limit": null}),
        )
        .await;
        let a = admit(app, with_key(&key, json!({"reserve_usd": amount("2")}))).await;
        a.lease(&period);
        assert_eq!(nanos(&a.body["budget"]["limit_usd"]), 5 * USD);
        assert_eq!(
            nanos(&a.body["budget"]["remaining_usd"]),
            3 * USD,
            "{}",
            a.body
        );
        let resets = a.body["budget"]["resets_at"].as_str().expect("resets_at");
        let resets = chrono::DateTime::parse_from_rfc3339(resets).expect("RFC 3339");
        assert_eq!(resets, next, "{period}: {}", a.body);
    }
    let (never, _) = new_key(app, json!({"budget_usd": 2, "rate_limit": null})).await;
    let a = admit(app, with_key(&never, json!({}))).await;
    a.lease("a budget that never resets");
    assert_eq!(a.body["budget"]["resets_at"], Value::Null, "{}", a.body);
    // A key with neither a budget nor a token limit gets the short grant from admit.lua (nine
    // fields): both objects still answer "none".
    let (plain, _) = new_key(app, json!({"rate_limit": null})).await;
    let a = admit(app, with_key(&plain, json!({}))).await;
    assert_eq!(a.body["budget"], Value::Null, "{}", a.body);
    assert_eq!(
        a.body["tokens"],
        json!({"limit": null, "remaining": null, "reset_ms": 0}),
        "{}",
        a.body
    );
}

/// A budget's spend starts again when its period turns — decided by the scripts from the
/// period start stored beside the spend, on Redis's clock — so the test moves that start back
/// a day (through tollgate's own Redis handle, which reaches the key's node on a cluster too)
/// instead of waiting for midnight.
pub async fn a_budget_turns_over_with_its_period(app: &TestApp) {
    let (key, _) = new_key(
        app,
        json!({"budget_usd": 1, "budget_period": "day", "rate_limit": null,
            "concurrent_limit": null}),
    )
    .await;
    let lease = admit(app, with_key(&key, json!({}))).await.lease("first");
    settle(app, &lease, "1").await;
    admit(app, with_key(&key, json!({})))
        .await
        .denied(402, "budget_exceeded", "spent");

    let state = tollgate::hot::layout::Layout::new(&app.namespace)
        .for_hash(&tollgate::keys::hash(&key))
        .state;
    let hot = app.hot_path();
    let redis = &hot.redis;
    let mut get = redis::cmd("HGET");
    get.arg(&state).arg("bps");
    let start: i64 = match redis.query(&get).await.expect("period start") {
        redis::Value::BulkString(b) => String::from_utf8_lossy(&b).parse().expect("ms"),
        other => panic!("period start: {other:?}"),
    };
    let mut set = redis::cmd("HSET");
    set.arg(&state).arg("bps").arg(start - 86_400_000);
    redis
        .query(&set)
        .await
        .expect("move the period start back a day");

    let a = admit(app, with_key(&key, json!({}))).await;
    let lease = a.lease("a new period");
    assert_eq!(nanos(&a.body["budget"]["remaining_usd"]), USD, "{}", a.body);
    settle(app, &lease, "0.25").await;
    admit(app, with_key(&key, json!({"reserve_usd": amount("0.8")})))
        .await
        .denied(
            402,
            "budget_exceeded",
            "0.25 spent in the new period + 0.8 > 1",
        );
    admit(app, with_key(&key, json!({"reserve_usd": amount("0.75")})))
        .await
        .lease("0.25 + 0.75 fits exactly");
}
