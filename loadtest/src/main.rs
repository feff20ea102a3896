//! `loadtest`: drives a running tollgate with a realistic admit-and-settle mix, measures
//! throughput and latency against the Redis ceiling of the same work, and checks that every
//! limit and every balance held under that load. `loadtest faults …` is the fault-injection
//! run instead (`faults/mod.rs`).
//!
//! Exit status: 0 when every invariant held, 1 when one failed (or more errors than
//! `--max-errors`), 2 when the run could not be set up.

mod admin;
mod ceiling;
mod check;
mod faults;
mod http;
mod load;
mod memory;
mod observe;
mod report;
mod script_cost;
mod verify;

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use rand::Rng;
use serde_json::json;
use tollgate::hot::admission::LATE_SETTLE_GRACE;
use tollgate::hot::layout::Layout;
use tollgate::money::Money;

use admin::{Class, Spec};
use http::{Conn, Endpoint};
use report::{CeilingReport, HttpReport, Report, ScriptCostReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    /// The admit-and-settle mix through tollgate's HTTP API.
    Http,
    /// tollgate's scripts straight on Redis, pipelined: the most one Redis can do.
    Ceiling,
    /// The ceiling, then the HTTP mix, with the HTTP throughput as a share of the ceiling.
    Both,
}

fn duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((t, "s"), |i| (&t[..i], &t[i..]));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?}: expected e.g. 10s, 500ms, 5m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{text:?}: unit must be ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

fn money(text: &str) -> Result<Money, String> {
    let m = Money::parse(text).map_err(|e| e.to_string())?;
    if m.is_negative() {
        return Err("must not be negative".into());
    }
    Ok(m)
}

fn share(text: &str) -> Result<f64, String> {
    let v: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err("must be between 0 and 1".into())
    }
}

/// Load harness for tollgate.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version)]
struct Args {
    /// tollgate's data-plane URL
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// tollgate's admin URL (keys are created there)
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    admin_url: String,
    /// Admin bearer token
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// The Redis tollgate uses (INFO counters, memory, the ceiling phase)
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// tollgate's Redis namespace
    #[arg(long, env = "TOLLGATE_REDIS_NAMESPACE", default_value = "tollgate")]
    namespace: String,
    #[arg(long, value_enum, default_value = "http")]
    mode: Mode,
    /// Shorthand for --mode ceiling
    #[arg(long)]
    ceiling: bool,
    /// Concurrent keep-alive connections (closed loop: flows in flight)
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Length of the HTTP phase (e.g. 10s, 5m)
    #[arg(long, default_value = "10s", value_parser = duration)]
    duration: Duration,
    /// Open loop: admit-and-settle flows per second, on a fixed schedule; latency counts from
    /// the scheduled instant when the request had to wait
    #[arg(long)]
    rate: Option<f64>,
    /// Valid keys in the HTTP phase
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Share of keys with a small rate limit
    #[arg(long, default_value = "0.05", value_parser = share)]
    limited_share: f64,
    /// The small rate limit (admissions per window)
    #[arg(long, default_value_t = 10)]
    limited_rate_limit: u64,
    /// Rate limit of the other keys: high enough never to be reached, so their rate log is
    /// kept (the cost a real key pays) without denials
    #[arg(long, default_value_t = 1_000_000)]
    normal_rate_limit: u64,
    /// concurrent_limit of every key in the HTTP phase
    #[arg(long, default_value_t = 5)]
    concurrent_limit: u64,
    /// Share of keys that are standalone with a balance (admitted with a reserve)
    #[arg(long, default_value = "0.1", value_parser = share)]
    standalone_share: f64,
    /// Initial balance of standalone keys (USD)
    #[arg(long, default_value = "10", value_parser = money)]
    standalone_balance_usd: Money,
    /// Share of standalone keys that get a tiny balance instead, to be exhausted
    #[arg(long, default_value = "0.3", value_parser = share)]
    tiny_balance_share: f64,
    /// Share of keys with a token limit the load exceeds (admitted with --reserve-tokens,
    /// settled within it)
    #[arg(long, default_value = "0.05", value_parser = share)]
    token_share: f64,
    /// Their token limit per rate window
    #[arg(long, default_value_t = 20_000)]
    token_limit: u64,
    /// Tokens each of their admissions reserves
    #[arg(long, default_value_t = 400)]
    reserve_tokens: u64,
    /// Share of keys with a daily spend budget the load exhausts
    #[arg(long, default_value = "0.05", value_parser = share)]
    budget_share: f64,
    /// Their budget per UTC day (USD)
    #[arg(long, default_value = "0.05", value_parser = money)]
    budget_usd: Money,
    /// The tiny balance (USD)
    #[arg(long, default_value = "0.01", value_parser = money)]
    tiny_balance_usd: Money,
    /// Largest cost of one settlement (USD); standalone keys reserve this much
    #[arg(long, default_value = "0.002", value_parser = money)]
    max_cost_usd: Money,
    /// Normal keys that receive --hot-share of the requests (traffic is skewed)
    #[arg(long, default_value_t = 5)]
    hot_keys: usize,
    /// Share of requests sent to the hot keys
    #[arg(long, default_value = "0.2", value_parser = share)]
    hot_share: f64,
    /// Invalid keys (never created) in the mix
    #[arg(long, default_value_t = 100)]
    invalid_keys: usize,
    /// Share of requests made with an invalid key
    #[arg(long, default_value = "0.03", value_parser = share)]
    invalid_share: f64,
    /// Share of admitted flows that release instead of settling
    #[arg(long, default_value = "0.05", value_parser = share)]
    release_share: f64,
    /// Share of settlements sent twice (the second must be a duplicate and charge nothing)
    #[arg(long, default_value = "0.01", value_parser = share)]
    resettle_share: f64,
    /// Time between admission and settlement (the "upstream call")
    #[arg(long, default_value = "0ms", value_parser = duration)]
    hold: Duration,
    /// tollgate's rate window in seconds, or "auto" to measure it (reset_ms of a first admission)
    #[arg(long, default_value = "auto")]
    rate_window: String,
    /// tollgate's TOLLGATE_LEASE_TTL_SECONDS (the ceiling passes it to the scripts)
    #[arg(long, default_value_t = 600)]
    lease_ttl_seconds: u64,
    /// Length of each of the two ceiling measurements
    #[arg(long, default_value = "5s", value_parser = duration)]
    ceiling_duration: Duration,
    /// Redis connections of the ceiling phase
    #[arg(long, default_value_t = 8)]
    ceiling_connections: usize,
    /// Commands per pipeline in the ceiling phase
    #[arg(long, default_value_t = 32)]
    ceiling_pipeline: usize,
    /// Keys of the ceiling phase
    #[arg(long, default_value_t = 100)]
    ceiling_keys: usize,
    /// Ceiling mode also measures Redis's own time per call of each script against a minimal
    /// exact sliding-window script (issue #15), on keys of its own, one phase per script
    #[arg(long)]
    script_cost: bool,
    /// With --script-cost: `CONFIG RESETSTAT` before each phase. It clears the counters of
    /// every client of that Redis: use it on a private Redis only (else deltas are taken)
    #[arg(long, requires = "script_cost")]
    reset_stats: bool,
    /// With --script-cost: also measure every `*.lua` in this directory (scratch designs, e.g.
    /// loadtest/lua/candidates), called with KEYS = the key's state and a key of its own,
    /// ARGV = window ms, limit, now ms, a unique id
    #[arg(long, requires = "script_cost")]
    script_cost_candidates: Option<std::path::PathBuf>,
    /// tollgate's process id: sample its RSS every second and its CPU time
    #[arg(long)]
    pid: Option<u32>,
    /// tollgate's Postgres database name: report the CPU of the backends serving it
    #[arg(long)]
    postgres_db: Option<String>,
    /// Also measure Redis memory per key (MEMORY USAGE at rest and with a full window)
    #[arg(long)]
    memory: bool,
    /// How long to wait for the syncer to bring Postgres up to date
    #[arg(long, default_value = "60s", value_parser = duration)]
    sync_timeout: Duration,
    /// Transport errors and `unavailable` answers tolerated before the run fails
    #[arg(long, default_value_t = 0)]
    max_errors: u64,
    /// Soft-delete the keys the run created when it ends
    #[arg(long)]
    cleanup: bool,
    /// Runtime worker threads [default: the CPUs this process may use]
    #[arg(long)]
    threads: Option<usize>,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    // A subcommand of its own: it starts its own tollgate, so none of the flags above apply.
    if std::env::args().nth(1).as_deref() == Some("faults") {
        return faults::main(std::env::args().skip(1));
    }
    let mut args = Args::parse();
    if args.ceiling {
        args.mode = Mode::Ceiling;
    }
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok(report) => {
            if report.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("loadtest: {e}"),
                }
            } else {
                report.print();
            }
            if report.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::from(2)
        }
    }
}

/// Progress goes to stderr even with `--json` (stdout holds the report): `loadtest/bench.sh`
/// starts its late syncer on "checking invariants".
fn progress(msg: &str) {
    eprintln!("loadtest: {msg}");
}

/// The rate window, measured: a first admission on a fresh key reports `reset_ms` equal to
/// the window (the only log entry is the one just made).
async fn detect_window(
    data: &Endpoint,
    admin_ep: &Endpoint,
    token: &str,
    user: &str,
) -> Result<(u64, String), String> {
    let mut a = Conn::new(admin_ep.clone(), Some(token));
    let spec = Spec {
        class: Class::Limited,
        rate_limit: Some(1),
        concurrent_limit: None,
        balance: None,
        token_limit: None,
        budget: None,
    };
    let key = admin::create(
        &mut a,
        user,
        &format!("loadtest {user} window probe"),
        &spec,
    )
    .await?;
    let mut d = Conn::new(data.clone(), None);
    let (status, body) = d
        .send(
            hyper::Method::POST,
            "/v1/admit",
            Some(load::admit_body(&key.secret, Money::ZERO, 0)),
        )
        .await
        .map_err(|e| format!("POST /v1/admit: {e}"))?;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("window probe admission answered {status}: {v}"));
    }
    if let Some(lease) = v["lease_id"].as_str() {
        let _ = d
            .post_json("/v1/release", &json!({ "lease_id": lease }))
            .await;
    }
    let window = v["rate_limit"]["reset_ms"]
        .as_u64()
        .filter(|ms| *ms > 0)
        .ok_or_else(|| format!("window probe: no rate_limit.reset_ms in {v}"))?;
    Ok((window, key.id))
}

async fn wait_ready(data: &Endpoint) -> Result<(), String> {
    let mut c = Conn::new(data.clone(), None);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // strict: the run creates its keys through the admin API, which needs Postgres.
        match c.get("/readyz?strict=true").await {
            Ok((s, _)) if s.is_success() => return Ok(()),
            Ok((s, b)) if Instant::now() > deadline => {
                return Err(format!(
                    "tollgate is not ready: {s} {}",
                    String::from_utf8_lossy(&b)
                ))
            }
            Err(e) if Instant::now() > deadline => return Err(format!("tollgate: {e}")),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Waits until the syncer has drained every usage stream of the namespace.
async fn drain(
    redis: &mut redis::aio::MultiplexedConnection,
    layout: &Layout,
    timeout: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let streams = layout.streams();
    loop {
        let n = observe::stream_backlog(redis, &streams).await?;
        if n == 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "{n} usage events still waiting in Redis after {timeout:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn specs(args: &Args) -> Vec<Spec> {
    let n = args.keys;
    let limited = ((n as f64) * args.limited_share).round() as usize;
    let standalone = ((n as f64) * args.standalone_share).round() as usize;
    let tiny = ((standalone as f64) * args.tiny_balance_share).round() as usize;
    let token_keys = ((n as f64) * args.token_share).round() as usize;
    let budget_keys = ((n as f64) * args.budget_share).round() as usize;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (mut token_limit, mut budget) = (None, None);
        let (class, rate, balance) = if i < limited {
            (Class::Limited, Some(args.limited_rate_limit), None)
        } else if i < limited + token_keys {
            token_limit = Some(args.token_limit);
            (Class::Tokens, None, None)
        } else if i < limited + token_keys + budget_keys {
            budget = Some(args.budget_usd);
            (Class::Budget, None, None)
        } else if i < limited + token_keys + budget_keys + standalone {
            let b = if i < limited + token_keys + budget_keys + tiny {
                args.tiny_balance_usd
            } else {
                args.standalone_balance_usd
            };
            // Unlimited rate: the end-of-run balance probe must not be rate limited.
            (Class::Standalone, None, Some(b))
        } else {
            (Class::Normal, Some(args.normal_rate_limit), None)
        };
        out.push(Spec {
            class,
            rate_limit: rate,
            concurrent_limit: Some(args.concurrent_limit),
            balance,
            token_limit,
            budget,
        });
    }
    out
}

fn invalid_key() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    let tail: String = (0..32)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("sk-{tail}")
}

fn cpu_now(pid: Option<u32>) -> Option<f64> {
    pid.and_then(|p| observe::cpu_seconds(&p.to_string()))
}

async fn run(args: Args) -> Result<Report, String> {
    if args.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err("--rate must be a positive number".into());
    }
    if args.script_cost && args.mode == Mode::Http {
        return Err("--script-cost needs --mode ceiling or both".into());
    }
    if args.keys == 0 && args.mode != Mode::Ceiling {
        return Err("--keys must be at least 1".into());
    }
    let data = Endpoint::parse(&args.url)?;
    let admin_ep = Endpoint::parse(&args.admin_url)?;
    let token = args.admin_token.clone();
    let layout = Layout::new(&args.namespace);
    let mut redis = observe::connect(&args.redis_url).await?;
    let run_id: String = format!("lt{:08x}", rand::thread_rng().gen::<u32>());
    let mut report = Report::new(
        args.json,
        format!("{:?}", args.mode).to_lowercase(),
        run_id.clone(),
    );

    wait_ready(&data).await?;
    let mut created: Vec<String> = Vec::new();
    let window_ms = match args.rate_window.as_str() {
        "auto" => {
            let (w, id) = detect_window(&data, &admin_ep, &token, &run_id).await?;
            created.push(id);
            w
        }
        s => {
            let secs: u64 = s
                .parse()
                .map_err(|_| format!("--rate-window {s:?}: expected seconds or auto"))?;
            secs * 1000
        }
    };
    report.rate_window_ms = window_ms;
    progress(&format!("run {run_id}: rate window {window_ms} ms"));

    if matches!(args.mode, Mode::Ceiling | Mode::Both) {
        progress(&format!("creating {} ceiling keys", args.ceiling_keys));
        let spec = Spec {
            class: Class::Ceiling,
            rate_limit: Some(args.normal_rate_limit),
            concurrent_limit: None,
            balance: None,
            token_limit: None,
            budget: None,
        };
        let keys = admin::create_many(
            &admin_ep,
            &token,
            &format!("{run_id}-ceiling"),
            vec![spec; args.ceiling_keys.max(1)],
            8,
        )
        .await?;
        created.extend(keys.iter().map(|k| k.id.clone()));
        let plan = ceiling::Plan {
            redis_url: args.redis_url.clone(),
            keys: keys
                .iter()
                .map(|k| layout.for_hash(&tollgate::keys::hash(&k.secret)))
                .collect(),
            connections: args.ceiling_connections,
            pipeline: args.ceiling_pipeline.max(1),
            duration: args.ceiling_duration,
            window_ms,
            lease_ttl_ms: args.lease_ttl_seconds * 1000,
            settle_window_ms: (args.lease_ttl_seconds + LATE_SETTLE_GRACE.as_secs()) * 1000,
            max_cost_nanos: args.max_cost_usd.nanos(),
        };
        progress("ceiling: admit.lua alone");
        let before = observe::snapshot(&mut redis).await?;
        let host0 = observe::host_cpu();
        let admit = ceiling::run(&plan, ceiling::Work::Admit).await?;
        let host1 = observe::host_cpu();
        let after = observe::snapshot(&mut redis).await?;
        ceiling::clean_up(&args.redis_url, &plan.keys).await?;
        progress("ceiling: admit.lua then settle.lua");
        let before_flow = observe::snapshot(&mut redis).await?;
        let host2 = observe::host_cpu();
        let flow = ceiling::run(&plan, ceiling::Work::Flow).await?;
        let host3 = observe::host_cpu();
        let after_flow = observe::snapshot(&mut redis).await?;
        progress("waiting for the syncer to drain the ceiling's usage events");
        let drained = drain(&mut redis, &layout, args.sync_timeout).await;
        let mut c = CeilingReport::new(&plan, &admit, &before, &after, (&host0, &host1));
        c.add_flow(
            &flow,
            &before_flow,
            &after_flow,
            (&host2, &host3),
            drained.as_ref().ok().copied(),
        );
        if let Err(e) = &drained {
            report.invariants.push(verify::Invariant::new(
                "usage_events_synced",
                "ceiling usage streams".into(),
                vec![e.clone()],
            ));
        }
        // The ceiling's own settlements must reach Postgres too, each exactly once.
        let costs = flow.cost.iter().map(|(i, v)| (*i as u32, *v)).collect();
        let (inv, _) = verify::postgres(
            &admin_ep,
            &token,
            &keys,
            &costs,
            &HashSet::new(),
            args.sync_timeout,
            "ceiling_usage_in_postgres",
        )
        .await;
        report.invariants.push(inv);
        if admit.errors + flow.errors > 0 || !admit.other.is_empty() || !flow.other.is_empty() {
            report.invariants.push(verify::Invariant::new(
                "ceiling_scripts_allow",
                "every ceiling call takes the allow path".into(),
                vec![format!(
                    "errors {} ({:?}), other replies {:?} {:?}",
                    admit.errors + flow.errors,
                    admit.error_sample.as_ref().or(flow.error_sample.as_ref()),
                    admit.other,
                    flow.other
                )],
            ));
        }
        report.ceiling = Some(c);
        if args.script_cost {
            let (s, ids) = script_cost(&args, &admin_ep, &token, &run_id, &layout, &plan).await?;
            created.extend(ids);
            report.invariants.push(s.1);
            report.script_cost = Some(s.0);
        }
    }

    if matches!(args.mode, Mode::Http | Mode::Both) {
        let specs = specs(&args);
        progress(&format!("creating {} keys", specs.len()));
        let keys = admin::create_many(&admin_ep, &token, &run_id, specs, 8).await?;
        created.extend(keys.iter().map(|k| k.id.clone()));
        let mut load_keys: Vec<load::LoadKey> = keys
            .iter()
            .map(|k| {
                let reserve = if matches!(k.spec.class, Class::Standalone | Class::Budget) {
                    args.max_cost_usd
                } else {
                    Money::ZERO
                };
                let reserve_tokens = if k.spec.class == Class::Tokens {
                    args.reserve_tokens
                } else {
                    0
                };
                load::LoadKey {
                    class: k.spec.class,
                    rate_limit: k.spec.rate_limit,
                    concurrent_limit: k.spec.concurrent_limit,
                    admit_body: load::admit_body(&k.secret, reserve, reserve_tokens),
                    reserve,
                    reserve_tokens,
                }
            })
            .collect();
        for _ in 0..args.invalid_keys {
            load_keys.push(load::LoadKey {
                class: Class::Normal,
                rate_limit: None,
                concurrent_limit: None,
                admit_body: load::admit_body(&invalid_key(), Money::ZERO, 0),
                reserve: Money::ZERO,
                reserve_tokens: 0,
            });
        }
        let epoch = Instant::now();
        let first_day = chrono::Utc::now().date_naive();
        let plan = load::Plan {
            data: data.clone(),
            keys: Arc::new(load_keys),
            first_invalid: keys.len(),
            hot: {
                let first = keys
                    .iter()
                    .position(|k| k.spec.class == Class::Normal)
                    .unwrap_or(keys.len());
                let normal = keys.len() - first;
                first..first + args.hot_keys.min(normal)
            },
            hot_share: args.hot_share,
            invalid_share: args.invalid_share,
            release_share: args.release_share,
            resettle_share: args.resettle_share,
            max_cost: args.max_cost_usd,
            hold: args.hold,
            concurrency: args.concurrency,
            duration: args.duration,
            rate: args.rate,
            epoch,
            window_ms,
        };
        progress(&format!(
            "HTTP phase: {} connections, {:?}, {}",
            args.concurrency,
            args.duration,
            args.rate.map_or("closed loop".to_string(), |r| format!(
                "open loop at {r} flows/s"
            ))
        ));
        let counter = Arc::new(AtomicU64::new(0));
        let redis_before = observe::snapshot(&mut redis).await?;
        let (tg_cpu0, self_cpu0) = (cpu_now(args.pid), observe::cpu_seconds("self"));
        let host0 = observe::host_cpu();
        let procs0 = observe::processes();
        let pgdb0 = args
            .postgres_db
            .as_deref()
            .map(observe::postgres_db_cpu_seconds);
        let buckets0 = scrape_buckets(&admin_ep).await;
        let sampler = observe::Sampler::start(args.pid, counter.clone());
        let started = Instant::now();
        let out = load::run(plan, counter).await;
        let elapsed = started.elapsed();
        let samples = sampler.finish().await;
        let (tg_cpu1, self_cpu1) = (cpu_now(args.pid), observe::cpu_seconds("self"));
        let host1 = observe::host_cpu();
        let procs1 = observe::processes();
        let pgdb1 = args
            .postgres_db
            .as_deref()
            .map(observe::postgres_db_cpu_seconds);
        let buckets1 = scrape_buckets(&admin_ep).await;
        let redis_after = observe::snapshot(&mut redis).await?;

        progress("checking invariants");
        let window_ns = window_ms * 1_000_000;
        report.invariants.extend(verify::local(
            &keys,
            &out,
            window_ns,
            chrono::Utc::now().date_naive() == first_day,
        ));
        let uncertain: HashSet<u32> = out.uncertain.iter().copied().collect();
        report
            .invariants
            .push(verify::redis_balances(&data, &keys, &out.cost, &uncertain).await);
        let drained = drain(&mut redis, &layout, args.sync_timeout).await;
        if let Err(e) = &drained {
            report.invariants.push(verify::Invariant::new(
                "usage_events_synced",
                "usage streams".into(),
                vec![e.clone()],
            ));
        }
        let (inv, _) = verify::postgres(
            &admin_ep,
            &token,
            &keys,
            &out.cost,
            &uncertain,
            args.sync_timeout,
            "usage_exact_in_postgres",
        )
        .await;
        report.invariants.push(inv);
        let errors = out.error_count();
        report.invariants.push(verify::Invariant::new(
            "errors_within_budget",
            format!(
                "at most {} transport errors or unavailable answers",
                args.max_errors
            ),
            if errors > args.max_errors {
                vec![format!(
                    "{errors} errors: {:?} e.g. {:?}",
                    out.errors, out.error_samples
                )]
            } else {
                vec![]
            },
        ));
        let mut h = HttpReport::new(&args_summary(&args, &keys), &out, elapsed);
        h.set_redis(&redis_before, &redis_after, &out);
        h.set_process(
            args.pid,
            tg_cpu0.zip(tg_cpu1).map(|(a, b)| b - a),
            self_cpu0.zip(self_cpu1).map(|(a, b)| b - a),
            samples,
        );
        h.set_host(&host0, &host1, observe::processes_delta(&procs0, &procs1));
        h.set_server_side(&buckets0, &buckets1, pgdb0.zip(pgdb1).map(|(a, b)| b - a));
        h.sync_drain_seconds = drained.ok().map(|d| d.as_secs_f64());
        if let Some(c) = &report.ceiling {
            h.set_ceiling(c);
        }
        report.http = Some(h);
    }

    if args.memory {
        progress("measuring Redis memory per key");
        let (m, ids) =
            memory::measure(&data, &admin_ep, &token, &run_id, &layout, &mut redis).await?;
        created.extend(ids);
        report.memory = Some(m);
    }

    if args.cleanup {
        let n = created.len();
        let done = admin::delete_many(&admin_ep, &token, created, 8).await;
        progress(&format!("soft-deleted {done} of {n} keys"));
    }
    report.finish();
    Ok(report)
}

/// The script-cost phases (`--script-cost`) on keys of their own: plain ones, like the
/// ceiling's, and ones with a concurrency limit and a balance that every admission holds from.
async fn script_cost(
    args: &Args,
    admin_ep: &Endpoint,
    token: &str,
    run_id: &str,
    layout: &Layout,
    plan: &ceiling::Plan,
) -> Result<((ScriptCostReport, verify::Invariant), Vec<String>), String> {
    let never = Some(args.normal_rate_limit);
    let plain = Spec {
        class: Class::Ceiling,
        rate_limit: never,
        concurrent_limit: None,
        balance: None,
        token_limit: None,
        budget: None,
    };
    // Standalone with a balance no run can spend, so that admissions hold and never deny.
    let held = Spec {
        class: Class::Standalone,
        concurrent_limit: never,
        balance: Some(Money::from_nanos(1_000_000 * 1_000_000_000)),
        ..plain.clone()
    };
    let n = args.ceiling_keys.max(1);
    progress(&format!(
        "script cost: creating {n} plain and {n} held keys"
    ));
    let mut ids = Vec::new();
    let mut targets = Vec::new();
    for (spec, name, reserve) in [
        (plain, "plain", 0),
        (held, "held", args.max_cost_usd.nanos()),
    ] {
        let keys = admin::create_many(
            admin_ep,
            token,
            &format!("{run_id}-cost-{name}"),
            vec![spec; n],
            8,
        )
        .await?;
        ids.extend(keys.iter().map(|k| k.id.clone()));
        targets.push(script_cost::Target {
            plan: ceiling::Plan {
                keys: keys
                    .iter()
                    .map(|k| layout.for_hash(&tollgate::keys::hash(&k.secret)))
                    .collect(),
                ..plan.clone()
            },
            reserve_nanos: reserve,
        });
    }
    let held = targets.pop().ok_or("no held keys")?;
    let plain = targets.pop().ok_or("no plain keys")?;
    let candidates = match &args.script_cost_candidates {
        Some(dir) => read_scripts(dir)?,
        None => Vec::new(),
    };
    let setup = script_cost::Setup {
        candidates,
        limit: args.normal_rate_limit,
        reset_stats: args.reset_stats,
        plain,
        held,
    };
    let mut redis = observe::connect(&args.redis_url).await?;
    let measured = script_cost::measure(&mut redis, &setup).await?;
    let failures: Vec<String> = measured
        .iter()
        .filter(|m| m.errors > 0 || !m.other.is_empty())
        .map(|m| {
            format!(
                "{}: errors {} ({:?}), other replies {:?}",
                m.name, m.errors, m.error_sample, m.other
            )
        })
        .collect();
    let inv = verify::Invariant::new(
        "script_cost_scripts_allow",
        "every script-cost call takes the allow path".into(),
        failures,
    );
    let report = ScriptCostReport::new(&setup.plain.plan, args.reset_stats, &measured);
    Ok(((report, inv), ids))
}

/// The `*.lua` files of a directory, by name: (file name, source).
fn read_scripts(dir: &std::path::Path) -> Result<Vec<(String, String)>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for e in entries {
        let path = e.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|x| x == "lua") {
            let src =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let name = path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            out.push((name, src));
        }
    }
    out.sort();
    Ok(out)
}

/// tollgate's admission-duration histogram, from its `/metrics` (no token needed).
async fn scrape_buckets(admin: &Endpoint) -> Vec<(f64, u64)> {
    let mut c = Conn::new(admin.clone(), None);
    match c.get("/metrics").await {
        Ok((s, b)) if s.is_success() => observe::admission_buckets(&String::from_utf8_lossy(&b)),
        _ => Vec::new(),
    }
}

fn args_summary(args: &Args, keys: &[admin::Key]) -> serde_json::Value {
    let count = |c: Class| keys.iter().filter(|k| k.spec.class == c).count();
    json!({
        "concurrency": args.concurrency,
        "duration_seconds": args.duration.as_secs_f64(),
        "rate_flows_per_second": args.rate,
        "keys": {
            "normal": count(Class::Normal),
            "rate_limited": count(Class::Limited),
            "standalone": count(Class::Standalone),
            "token_limited": count(Class::Tokens),
            "budget": count(Class::Budget),
            "invalid": args.invalid_keys,
        },
        "normal_rate_limit": args.normal_rate_limit,
        "limited_rate_limit": args.limited_rate_limit,
        "concurrent_limit": args.concurrent_limit,
        "hot_keys": args.hot_keys,
        "hot_share": args.hot_share,
        "invalid_share": args.invalid_share,
        "release_share": args.release_share,
        "resettle_share": args.resettle_share,
        "max_cost_usd": args.max_cost_usd,
        "hold_ms": args.hold.as_millis() as u64,
    })
}
