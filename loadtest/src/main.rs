//! `loadtest`: drives a running tollgate with a realistic admit-and-settle mix, measures
//! throughput and latency against the Redis ceiling of the same work, and checks that every
//! limit and every balance held under that load. `loadtest faults …` is the fault-injection
//! run instead (`faults/mod.rs`), and `loadtest lua-costs` the cost of single Lua operations
//! inside Redis (`lua_costs.rs`).
//!
//! Exit status: 0 when every invariant held, 1 when one failed (or more errors than
//! `--max-errors`), 2 when the run could not be set up.

mod admin;
mod ceiling;
mod check;
mod faults;
mod http;
mod load;
mod lua_costs;
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
    /// tollgate's TOLLGATE_STATE_FORMAT (1 or 2): how the ceiling's admissions write holds
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    state_format: u8,
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
    /// With --script-cost: the rate limit of its keys and of the reference, never reached (the
    /// logs grow by the calls each key takes; --ceiling-keys sets how long they get)
    #[arg(long, default_value_t = 1_000_000, requires = "script_cost")]
    script_cost_rate_limit: u64,
    /// With --script-cost: rounds of the phases, each bracketed by the reference; the ratios
    /// are the medians of the rounds' (a round takes about seven --ceiling-duration)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=20), requires = "script_cost")]
    script_cost_rounds: u64,
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
    if std::env::args().nth(1).as_deref() == Some("lua-costs") {
        return lua_costs::main(std::env::args().skip(1));
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
    check_args(&args)?;
    let mut run = Run::start(args).await?;
    if matches!(run.args.mode, Mode::Ceiling | Mode::Both) {
        run.ceiling_phase().await?;
    }
    if matches!(run.args.mode, Mode::Http | Mode::Both) {
        run.http_phase().await?;
    }
    if run.args.memory {
        run.memory_phase().await?;
    }
    Ok(run.finish().await)
}

/// The flag combinations clap cannot refuse by itself.
fn check_args(args: &Args) -> Result<(), String> {
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
    Ok(())
}

/// What the phases of one run share, and the report they fill in.
struct Run {
    args: Args,
    data: Endpoint,
    admin_ep: Endpoint,
    token: String,
    layout: Layout,
    redis: redis::aio::MultiplexedConnection,
    run_id: String,
    window_ms: u64,
    /// Every key the run created, soft-deleted at the end with `--cleanup`.
    created: Vec<String>,
    report: Report,
}

/// One ceiling measurement with the Redis and host snapshots taken around it.
struct CeilingRun {
    out: ceiling::Outcome,
    before: observe::RedisSnapshot,
    after: observe::RedisSnapshot,
    host: (observe::HostCpu, observe::HostCpu),
}

/// tollgate's admission-duration histogram as `/metrics` shows it: (bucket bound, count).
type Buckets = Vec<(f64, u64)>;

/// What was observed around the HTTP phase, beside the workers' own outcome.
struct HttpObserved {
    elapsed: Duration,
    samples: Vec<observe::Sample>,
    redis: (observe::RedisSnapshot, observe::RedisSnapshot),
    tollgate_cpu: Option<f64>,
    self_cpu: Option<f64>,
    host: (observe::HostCpu, observe::HostCpu),
    processes: Vec<(String, f64)>,
    postgres_db_cpu: Option<f64>,
    buckets: (Buckets, Buckets),
}

impl Run {
    /// Connects, waits for tollgate and settles the rate window.
    async fn start(args: Args) -> Result<Run, String> {
        let data = Endpoint::parse(&args.url)?;
        let admin_ep = Endpoint::parse(&args.admin_url)?;
        let token = args.admin_token.clone();
        let layout = Layout::new(&args.namespace);
        let redis = observe::connect(&args.redis_url).await?;
        let run_id: String = format!("lt{:08x}", rand::thread_rng().gen::<u32>());
        let report = Report::new(
            args.json,
            format!("{:?}", args.mode).to_lowercase(),
            run_id.clone(),
        );
        let mut run = Run {
            args,
            data,
            admin_ep,
            token,
            layout,
            redis,
            run_id,
            window_ms: 0,
            created: Vec::new(),
            report,
        };
        wait_ready(&run.data).await?;
        run.window_ms = run.rate_window().await?;
        run.report.rate_window_ms = run.window_ms;
        progress(&format!(
            "run {}: rate window {} ms",
            run.run_id, run.window_ms
        ));
        Ok(run)
    }

    /// `--rate-window`, or the window measured on a probe key of its own.
    async fn rate_window(&mut self) -> Result<u64, String> {
        match self.args.rate_window.as_str() {
            "auto" => {
                let (w, id) =
                    detect_window(&self.data, &self.admin_ep, &self.token, &self.run_id).await?;
                self.created.push(id);
                Ok(w)
            }
            s => {
                let secs: u64 = s
                    .parse()
                    .map_err(|_| format!("--rate-window {s:?}: expected seconds or auto"))?;
                Ok(secs * 1000)
            }
        }
    }

    /// Creates keys of `specs`, named after the run and `suffix`, remembered for the clean-up.
    async fn create_keys(
        &mut self,
        suffix: &str,
        specs: Vec<Spec>,
    ) -> Result<Vec<admin::Key>, String> {
        let keys = admin::create_many(
            &self.admin_ep,
            &self.token,
            &format!("{}{suffix}", self.run_id),
            specs,
            8,
        )
        .await?;
        self.created.extend(keys.iter().map(|k| k.id.clone()));
        Ok(keys)
    }

    /// The Redis ceiling: admit.lua alone, then admit and settle, straight on Redis; then that
    /// every usage event they wrote reached Postgres, and `--script-cost` when asked for.
    async fn ceiling_phase(&mut self) -> Result<(), String> {
        progress(&format!("creating {} ceiling keys", self.args.ceiling_keys));
        let spec = Spec {
            class: Class::Ceiling,
            rate_limit: Some(self.args.normal_rate_limit),
            concurrent_limit: None,
            balance: None,
            token_limit: None,
            budget: None,
        };
        let keys = self
            .create_keys("-ceiling", vec![spec; self.args.ceiling_keys.max(1)])
            .await?;
        let plan = self.ceiling_plan(&keys);
        progress("ceiling: admit.lua alone");
        let admit = self.measure_ceiling(&plan, ceiling::Work::Admit).await?;
        ceiling::clean_up(&self.args.redis_url, &plan.keys).await?;
        progress("ceiling: admit.lua then settle.lua");
        let flow = self.measure_ceiling(&plan, ceiling::Work::Flow).await?;
        progress("waiting for the syncer to drain the ceiling's usage events");
        let drained = drain(&mut self.redis, &self.layout, self.args.sync_timeout).await;
        let mut c = CeilingReport::new(
            &plan,
            &admit.out,
            &admit.before,
            &admit.after,
            (&admit.host.0, &admit.host.1),
        );
        c.add_flow(
            &flow.out,
            &flow.before,
            &flow.after,
            (&flow.host.0, &flow.host.1),
            drained.as_ref().ok().copied(),
        );
        if let Err(e) = &drained {
            self.report.invariants.push(verify::Invariant::new(
                "usage_events_synced",
                "ceiling usage streams".into(),
                vec![e.clone()],
            ));
        }
        self.ceiling_invariants(&keys, &admit.out, &flow.out).await;
        self.report.ceiling = Some(c);
        if self.args.script_cost {
            let (s, ids) = script_cost(
                &self.args,
                &self.admin_ep,
                &self.token,
                &self.run_id,
                &self.layout,
                &plan,
            )
            .await?;
            self.created.extend(ids);
            self.report.invariants.push(s.1);
            self.report.script_cost = Some(s.0);
        }
        Ok(())
    }

    fn ceiling_plan(&self, keys: &[admin::Key]) -> ceiling::Plan {
        let args = &self.args;
        ceiling::Plan {
            redis_url: args.redis_url.clone(),
            keys: keys
                .iter()
                .map(|k| self.layout.for_hash(&tollgate::keys::hash(&k.secret)))
                .collect(),
            connections: args.ceiling_connections,
            pipeline: args.ceiling_pipeline.max(1),
            duration: args.ceiling_duration,
            window_ms: self.window_ms,
            lease_ttl_ms: args.lease_ttl_seconds * 1000,
            settle_window_ms: (args.lease_ttl_seconds + LATE_SETTLE_GRACE.as_secs()) * 1000,
            max_cost_nanos: args.max_cost_usd.nanos(),
            known: Default::default(),
            holds_in_members: args.state_format == 2,
        }
    }

    async fn measure_ceiling(
        &mut self,
        plan: &ceiling::Plan,
        work: ceiling::Work,
    ) -> Result<CeilingRun, String> {
        let before = observe::snapshot(&mut self.redis).await?;
        let host0 = observe::host_cpu();
        let out = ceiling::run(plan, work).await?;
        let host1 = observe::host_cpu();
        let after = observe::snapshot(&mut self.redis).await?;
        Ok(CeilingRun {
            out,
            before,
            after,
            host: (host0, host1),
        })
    }

    /// The ceiling's own settlements must reach Postgres too, each exactly once; and every
    /// call must have taken the allow path, or the figures measure something else.
    async fn ceiling_invariants(
        &mut self,
        keys: &[admin::Key],
        admit: &ceiling::Outcome,
        flow: &ceiling::Outcome,
    ) {
        let costs = flow.cost.iter().map(|(i, v)| (*i as u32, *v)).collect();
        let (inv, _) = verify::postgres(
            &self.admin_ep,
            &self.token,
            keys,
            &costs,
            &HashSet::new(),
            self.args.sync_timeout,
            "ceiling_usage_in_postgres",
        )
        .await;
        self.report.invariants.push(inv);
        if admit.errors + flow.errors > 0 || !admit.other.is_empty() || !flow.other.is_empty() {
            self.report.invariants.push(verify::Invariant::new(
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
    }

    /// The admit-and-settle mix through HTTP, then the invariants it must have kept.
    async fn http_phase(&mut self) -> Result<(), String> {
        let specs = specs(&self.args);
        progress(&format!("creating {} keys", specs.len()));
        let keys = self.create_keys("", specs).await?;
        let plan = self.load_plan(&keys);
        let first_day = chrono::Utc::now().date_naive();
        let args = &self.args;
        progress(&format!(
            "HTTP phase: {} connections, {:?}, {}",
            args.concurrency,
            args.duration,
            args.rate.map_or("closed loop".to_string(), |r| format!(
                "open loop at {r} flows/s"
            ))
        ));
        let (out, observed) = self.measure_http(plan).await?;
        progress("checking invariants");
        let drained = self.http_invariants(&keys, &out, first_day).await;
        let mut h = HttpReport::new(&args_summary(&self.args, &keys), &out, observed.elapsed);
        h.set_redis(&observed.redis.0, &observed.redis.1, &out);
        h.set_process(
            self.args.pid,
            observed.tollgate_cpu,
            observed.self_cpu,
            observed.samples,
        );
        h.set_host(&observed.host.0, &observed.host.1, observed.processes);
        h.set_server_side(
            &observed.buckets.0,
            &observed.buckets.1,
            observed.postgres_db_cpu,
        );
        h.sync_drain_seconds = drained.ok().map(|d| d.as_secs_f64());
        if let Some(c) = &self.report.ceiling {
            h.set_ceiling(c);
        }
        self.report.http = Some(h);
        Ok(())
    }

    /// The workers' plan: the created keys as they send them, then the invalid ones.
    fn load_plan(&self, keys: &[admin::Key]) -> load::Plan {
        let args = &self.args;
        let mut load_keys: Vec<load::LoadKey> = keys.iter().map(|k| load_key(args, k)).collect();
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
        load::Plan {
            data: self.data.clone(),
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
            epoch: Instant::now(),
            window_ms: self.window_ms,
        }
    }

    /// Runs the workers with Redis, the processes, the host and tollgate's own histogram
    /// read before and after.
    async fn measure_http(
        &mut self,
        plan: load::Plan,
    ) -> Result<(load::Outcome, HttpObserved), String> {
        let pid = self.args.pid;
        let pgdb = |db: Option<&str>| db.map(observe::postgres_db_cpu_seconds);
        let counter = Arc::new(AtomicU64::new(0));
        let redis_before = observe::snapshot(&mut self.redis).await?;
        let (tg_cpu0, self_cpu0) = (cpu_now(pid), observe::cpu_seconds("self"));
        let host0 = observe::host_cpu();
        let procs0 = observe::processes();
        let pgdb0 = pgdb(self.args.postgres_db.as_deref());
        let buckets0 = scrape_buckets(&self.admin_ep).await;
        let sampler = observe::Sampler::start(pid, counter.clone());
        let started = Instant::now();
        let out = load::run(plan, counter).await;
        let elapsed = started.elapsed();
        let samples = sampler.finish().await;
        let (tg_cpu1, self_cpu1) = (cpu_now(pid), observe::cpu_seconds("self"));
        let host1 = observe::host_cpu();
        let procs1 = observe::processes();
        let pgdb1 = pgdb(self.args.postgres_db.as_deref());
        let buckets1 = scrape_buckets(&self.admin_ep).await;
        let redis_after = observe::snapshot(&mut self.redis).await?;
        let observed = HttpObserved {
            elapsed,
            samples,
            redis: (redis_before, redis_after),
            tollgate_cpu: tg_cpu0.zip(tg_cpu1).map(|(a, b)| b - a),
            self_cpu: self_cpu0.zip(self_cpu1).map(|(a, b)| b - a),
            host: (host0, host1),
            processes: observe::processes_delta(&procs0, &procs1),
            postgres_db_cpu: pgdb0.zip(pgdb1).map(|(a, b)| b - a),
            buckets: (buckets0, buckets1),
        };
        Ok((out, observed))
    }

    /// Every invariant of the HTTP phase, in the report; the syncer's drain time, which the
    /// report also shows.
    async fn http_invariants(
        &mut self,
        keys: &[admin::Key],
        out: &load::Outcome,
        first_day: chrono::NaiveDate,
    ) -> Result<Duration, String> {
        let window_ns = self.window_ms * 1_000_000;
        let invariants = &mut self.report.invariants;
        invariants.extend(verify::local(
            keys,
            out,
            window_ns,
            chrono::Utc::now().date_naive() == first_day,
        ));
        let uncertain: HashSet<u32> = out.uncertain.iter().copied().collect();
        invariants.push(verify::redis_balances(&self.data, keys, &out.cost, &uncertain).await);
        let drained = drain(&mut self.redis, &self.layout, self.args.sync_timeout).await;
        if let Err(e) = &drained {
            invariants.push(verify::Invariant::new(
                "usage_events_synced",
                "usage streams".into(),
                vec![e.clone()],
            ));
        }
        let (inv, _) = verify::postgres(
            &self.admin_ep,
            &self.token,
            keys,
            &out.cost,
            &uncertain,
            self.args.sync_timeout,
            "usage_exact_in_postgres",
        )
        .await;
        invariants.push(inv);
        invariants.push(errors_within_budget(out, self.args.max_errors));
        drained
    }

    async fn memory_phase(&mut self) -> Result<(), String> {
        progress("measuring Redis memory per key");
        let (m, ids) = memory::measure(
            &self.data,
            &self.admin_ep,
            &self.token,
            &self.run_id,
            &self.layout,
            &mut self.redis,
        )
        .await?;
        self.created.extend(ids);
        self.report.memory = Some(m);
        Ok(())
    }

    /// Soft-deletes the run's keys when asked to, and closes the report.
    async fn finish(mut self) -> Report {
        if self.args.cleanup {
            let n = self.created.len();
            let done = admin::delete_many(&self.admin_ep, &self.token, self.created, 8).await;
            progress(&format!("soft-deleted {done} of {n} keys"));
        }
        self.report.finish();
        self.report
    }
}

/// A created key as the workers send it: standalone and budget keys reserve the largest
/// cost, token keys `--reserve-tokens`.
fn load_key(args: &Args, k: &admin::Key) -> load::LoadKey {
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
}

fn errors_within_budget(out: &load::Outcome, max_errors: u64) -> verify::Invariant {
    let errors = out.error_count();
    verify::Invariant::new(
        "errors_within_budget",
        format!("at most {max_errors} transport errors or unavailable answers"),
        if errors > max_errors {
            vec![format!(
                "{errors} errors: {:?} e.g. {:?}",
                out.errors, out.error_samples
            )]
        } else {
            vec![]
        },
    )
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
    let plain = Spec {
        class: Class::Ceiling,
        rate_limit: Some(args.script_cost_rate_limit),
        concurrent_limit: None,
        balance: None,
        token_limit: None,
        budget: None,
    };
    // Standalone with a balance no run can spend, so that admissions hold and never deny.
    let held = Spec {
        class: Class::Standalone,
        concurrent_limit: Some(args.normal_rate_limit),
        balance: Some(Money::from_nanos(1_000_000 * 1_000_000_000)),
        ..plain.clone()
    };
    let n = args.ceiling_keys.max(1);
    let rounds = usize::try_from(args.script_cost_rounds).unwrap_or(1);
    let held_sets = if args.state_format == 2 {
        format!("two sets of {n} held keys (state formats 1 and 2)")
    } else {
        format!("{n} held keys")
    };
    progress(&format!(
        "script cost: creating {n} plain and {held_sets} for each of {rounds} round(s)"
    ));
    let mut ids = Vec::new();
    let (mut plain_sets, mut held_sets, mut member_sets) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        for (spec, name, reserve, in_members) in [
            (&plain, "plain", 0, false),
            (&held, "held", args.max_cost_usd.nanos(), false),
            (&held, "held_in_members", args.max_cost_usd.nanos(), true),
        ] {
            if in_members && args.state_format != 2 {
                continue;
            }
            let keys = admin::create_many(
                admin_ep,
                token,
                &format!("{run_id}-cost{round}-{name}"),
                vec![spec.clone(); n],
                8,
            )
            .await?;
            ids.extend(keys.iter().map(|k| k.id.clone()));
            let target = script_cost::Target {
                plan: ceiling::Plan {
                    keys: keys
                        .iter()
                        .map(|k| layout.for_hash(&tollgate::keys::hash(&k.secret)))
                        .collect(),
                    holds_in_members: in_members,
                    ..plan.clone()
                },
                reserve_nanos: reserve,
            };
            match name {
                "plain" => plain_sets.push(target),
                "held" => held_sets.push(target),
                _ => member_sets.push(target),
            }
        }
    }
    let candidates = match &args.script_cost_candidates {
        Some(dir) => read_scripts(dir)?,
        None => Vec::new(),
    };
    let setup = script_cost::Setup {
        candidates,
        limit: args.script_cost_rate_limit,
        reset_stats: args.reset_stats,
        plain: plain_sets,
        held: held_sets,
        held_in_members: member_sets,
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
    let report = ScriptCostReport::new(plan, args.reset_stats, &measured);
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
async fn scrape_buckets(admin: &Endpoint) -> Buckets {
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
