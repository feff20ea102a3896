//! `loadtest faults`: real traffic through a private tollgate while a seeded schedule kills it,
//! empties Redis, cuts and silences Postgres, flushes the scripts and fills the connection
//! table; then everything is healed and drained, and the audit proves the invariants held,
//! attributing each lost event to the Redis loss that was allowed to lose it.
//!
//! Exit status: 0 when every fault was survived and nothing is unexplained, 1 otherwise, 2 when
//! the run could not be set up.

mod audit;
mod procs;
mod relay;
mod traffic;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::{Parser, ValueEnum};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tollgate::hot::layout::Layout;
use tollgate::money::Money;

use crate::admin::{self, Class, Spec};
use crate::check::Nanos;
use crate::http::{Conn, Endpoint};
use crate::verify::{self, Invariant};
use audit::{Loss, PgView};
use procs::{psql, Redis, Tollgate};
use relay::{Net, Relay};

/// Fault-injection run: a private Redis and tollgate, real traffic, seeded faults, an audit.
#[derive(Debug, Parser)]
#[command(name = "loadtest faults")]
struct FaultArgs {
    /// How long faults are injected (the traffic runs as long; heal, drain and audit follow)
    #[arg(long, default_value = "60s", value_parser = crate::duration)]
    duration: Duration,
    /// Seed of the schedule and of the traffic [default: random, printed]
    #[arg(long)]
    seed: Option<u64>,
    /// The tollgate binary [default: `tollgate` beside this binary]
    #[arg(long)]
    tollgate: Option<PathBuf>,
    /// The redis-server binary (a private one is started on a free port, without persistence)
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// Postgres server URL without a database; a fresh database is created and dropped
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pg_url: String,
    /// Traffic workers (keep-alive connections)
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Admit-and-settle flows per second over all workers
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Keys of the run (a sixth rate-limited, a quarter standalone, the rest plain)
    #[arg(long, default_value_t = 48)]
    keys: usize,
    /// Initial balance of standalone keys; a third of them get $0.01 and run out
    #[arg(long, default_value = "50", value_parser = crate::money)]
    balance_usd: Money,
    /// tollgate's TOLLGATE_MAX_CONNECTIONS, which the connection-table fault fills
    #[arg(long, default_value_t = 48)]
    max_connections: usize,
    /// Quiet time between two faults: uniform between these bounds
    #[arg(long, default_value = "2s", value_parser = crate::duration)]
    gap_min: Duration,
    #[arg(long, default_value = "8s", value_parser = crate::duration)]
    gap_max: Duration,
    /// How long a fault may take to heal (tollgate ready again, strict) before it counts as
    /// not survived
    #[arg(long, default_value = "60s", value_parser = crate::duration)]
    recover_timeout: Duration,
    /// How long the final drain of the usage streams may take
    #[arg(long, default_value = "180s", value_parser = crate::duration)]
    sync_timeout: Duration,
    /// Only these kinds of fault, comma-separated [default: all]
    #[arg(long, value_enum, value_delimiter = ',')]
    kinds: Vec<Kind>,
    /// Start with one fault of each kind (of --kinds) in a seeded order, then draw at random:
    /// a short run then covers every kind
    #[arg(long)]
    each_kind_first: bool,
    /// Keep the work directory (tollgate's and Redis's logs)
    #[arg(long)]
    keep_logs: bool,
}

const WINDOW_SECONDS: u64 = 2;
/// Short, so that leases orphaned by lost admission answers free their slots and holds soon,
/// and the audit can wait them out before probing balances.
const LEASE_TTL_SECONDS: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
enum Kind {
    TollgateKill,
    RedisRestart,
    RedisRestartPostgresDown,
    PostgresCut,
    PostgresSilent,
    ScriptFlush,
    ConnectionTableFull,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::TollgateKill => "kill -9 tollgate, restart",
            Kind::RedisRestart => "kill -9 Redis, restart empty",
            Kind::RedisRestartPostgresDown => "kill -9 Redis, restart empty while Postgres is cut",
            Kind::PostgresCut => "cut Postgres",
            Kind::PostgresSilent => "Postgres silent",
            Kind::ScriptFlush => "SCRIPT FLUSH",
            Kind::ConnectionTableFull => "fill the connection table",
        }
    }

    /// The schedule's mix: the cheap faults more often, a Redis loss (which resets every
    /// window and loses events) less.
    fn pick(rng: &mut StdRng, only: &[Kind]) -> Kind {
        loop {
            let k = Kind::draw(rng);
            if only.is_empty() || only.contains(&k) {
                return k;
            }
        }
    }

    fn draw(rng: &mut StdRng) -> Kind {
        match rng.gen_range(0..100) {
            0..=19 => Kind::TollgateKill,
            20..=31 => Kind::RedisRestart,
            32..=39 => Kind::RedisRestartPostgresDown,
            40..=54 => Kind::PostgresCut,
            55..=69 => Kind::PostgresSilent,
            70..=84 => Kind::ScriptFlush,
            _ => Kind::ConnectionTableFull,
        }
    }
}

/// One fault as it happened.
#[derive(Debug, Clone)]
struct Fault {
    kind: Kind,
    at: Nanos,
    held: Duration,
    /// Usage events waiting in Redis when it was killed (the last read before the SIGKILL).
    backlog_at_kill: Option<u64>,
    /// What the harness saw of the fault while it lasted.
    note: String,
    recovered_in: Result<Duration, String>,
}

pub fn main(args: impl Iterator<Item = String>) -> ExitCode {
    let args = FaultArgs::parse_from(args);
    let result = tokio::runtime::Runtime::new()
        .map_err(|e| format!("cannot start the runtime: {e}"))
        .and_then(|rt| rt.block_on(run(args)));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("loadtest faults: {e}");
            ExitCode::from(2)
        }
    }
}

fn progress(msg: &str) {
    eprintln!("loadtest faults: {msg}");
}

fn random_hex(n: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..n).map(|_| format!("{:02x}", rng.gen::<u8>())).collect()
}

/// `postgres://user@host:port` → (user part, host:port as an address).
fn pg_parts(url: &str) -> Result<(String, SocketAddr), String> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
        .ok_or_else(|| format!("{url}: expected postgres://user@host:port"))?;
    let rest = rest.split('/').next().unwrap_or_default();
    let (user, host) = rest.rsplit_once('@').unwrap_or(("", rest));
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5432")
    };
    use std::net::ToSocketAddrs;
    let addr = host
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    Ok((user.to_string(), addr))
}

fn nanos(epoch: Instant) -> Nanos {
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Samples the usage backlog every 100 ms and remembers when it was last seen empty (the send
/// time of that read): the bound of what a Redis loss can take.
fn watch_backlog(
    url: String,
    layout: Layout,
    epoch: Instant,
    last_empty: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let streams = layout.streams();
        let mut conn = None;
        while !stop.load(Ordering::Relaxed) {
            if conn.is_none() {
                conn = crate::observe::connect(&url).await.ok();
            }
            if let Some(c) = conn.as_mut() {
                let sent = nanos(epoch);
                let n = tokio::time::timeout(
                    Duration::from_millis(500),
                    crate::observe::stream_backlog(c, &streams),
                )
                .await;
                match n {
                    Ok(Ok(0)) => last_empty.store(sent, Ordering::SeqCst),
                    Ok(Ok(_)) => {}
                    _ => conn = None,
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Everything the run started, so that it is all stopped and removed however the run ends.
struct Env {
    work: PathBuf,
    pg_url: String,
    db: String,
    relay: Option<Relay>,
    redis: Redis,
    tollgate: Tollgate,
    layout: Layout,
    token: String,
}

impl Env {
    async fn teardown(mut self, keep_logs: bool, failed: bool) {
        if let Err(e) = self.tollgate.stop().await {
            progress(&format!("warning: {e}"));
        }
        self.redis.kill9().await;
        if let Some(r) = self.relay.take() {
            r.stop();
        }
        let drop_db = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.db);
        if let Err(e) = psql(&format!("{}/postgres", self.pg_url), &drop_db) {
            progress(&format!(
                "warning: could not drop database {}: {e}",
                self.db
            ));
        }
        if failed {
            if let Ok(text) = std::fs::read_to_string(&self.tollgate.log) {
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("tollgate's log (last 30 lines):");
                for l in &lines[lines.len().saturating_sub(30)..] {
                    eprintln!("  {l}");
                }
            }
        }
        if keep_logs {
            progress(&format!("logs kept in {}", self.work.display()));
        } else {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

async fn run(args: FaultArgs) -> Result<bool, String> {
    if args.rate <= 0.0 || args.concurrency == 0 || args.keys < 6 {
        return Err("--rate, --concurrency and --keys (at least 6) must be positive".into());
    }
    if args.gap_max < args.gap_min {
        return Err("--gap-max must not be below --gap-min".into());
    }
    let seed = args.seed.unwrap_or_else(|| rand::thread_rng().gen());
    progress(&format!(
        "seed {seed} (--seed {seed} repeats this schedule)"
    ));
    let tollgate_bin = match &args.tollgate {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("tollgate"),
    };
    if !tollgate_bin.exists() {
        return Err(format!("{}: no such binary", tollgate_bin.display()));
    }
    let (pg_user, pg_addr) = pg_parts(&args.pg_url)?;
    let pg_url = args.pg_url.trim_end_matches('/').to_string();
    psql(&format!("{pg_url}/postgres"), "select 1")
        .map_err(|e| format!("Postgres at {pg_url}: {e}"))?;

    let suffix = random_hex(6);
    let work = std::env::temp_dir().join(format!("tollgate-faults-{suffix}"));
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let db = format!("tollgate_faults_{suffix}");
    let ns = format!("faults{suffix}");
    let token = format!("faults-{}", random_hex(16));
    let mut key_bytes = [0u8; 32];
    rand::thread_rng().fill(&mut key_bytes);
    let enc_key = base64::engine::general_purpose::STANDARD.encode(key_bytes);

    let relay = Relay::start(pg_addr).await?;
    let redis = Redis::new(
        args.redis_server.clone(),
        procs::free_port()?,
        work.join("redis.log"),
    );
    let (data_port, admin_port) = (procs::free_port()?, procs::free_port()?);
    let data = Endpoint::parse(&format!("http://127.0.0.1:{data_port}"))?;
    let admin_ep = Endpoint::parse(&format!("http://127.0.0.1:{admin_port}"))?;
    let at = if pg_user.is_empty() {
        String::new()
    } else {
        format!("{pg_user}@")
    };
    let env: Vec<(String, String)> = [
        ("TOLLGATE_LISTEN", data.host.clone()),
        ("TOLLGATE_ADMIN_LISTEN", admin_ep.host.clone()),
        ("TOLLGATE_REDIS_URL", redis.url()),
        (
            "TOLLGATE_DATABASE_URL",
            format!("postgres://{at}{}/{db}", relay.addr),
        ),
        ("TOLLGATE_REDIS_NAMESPACE", ns.clone()),
        ("TOLLGATE_ADMIN_TOKEN", token.clone()),
        ("TOLLGATE_ENCRYPTION_KEY", enc_key),
        ("TOLLGATE_RATE_WINDOW_SECONDS", WINDOW_SECONDS.to_string()),
        ("TOLLGATE_LEASE_TTL_SECONDS", LEASE_TTL_SECONDS.to_string()),
        ("TOLLGATE_CLEANUP_INTERVAL_SECONDS", "0".into()),
        ("TOLLGATE_MAX_CONNECTIONS", args.max_connections.to_string()),
        ("TOLLGATE_LOG_FORMAT", "json".into()),
        ("TOLLGATE_LOG", "info".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let tollgate = Tollgate::new(tollgate_bin, env, work.join("tollgate.log"), data, admin_ep);
    let mut env = Env {
        work,
        pg_url,
        db,
        relay: Some(relay),
        redis,
        tollgate,
        layout: Layout::new(&ns),
        token,
    };
    progress(&format!(
        "database {}, namespace {ns}, Redis port {}, work dir {}",
        env.db,
        env.redis.port,
        env.work.display()
    ));
    let result = run_in(&mut env, &args, seed).await;
    let failed = !matches!(result, Ok(true));
    env.teardown(args.keep_logs, failed).await;
    result
}

fn specs(args: &FaultArgs) -> Vec<Spec> {
    let n = args.keys;
    let limited = n / 6;
    let standalone = n / 4;
    let tiny = standalone / 3;
    (0..n)
        .map(|i| {
            let (class, rate_limit, balance) = if i < limited {
                (Class::Limited, Some(5), None)
            } else if i < limited + standalone {
                let b = if i < limited + tiny {
                    Money::from_nanos(10_000_000)
                } else {
                    args.balance_usd
                };
                (Class::Standalone, None, Some(b))
            } else {
                (Class::Normal, Some(1_000_000), None)
            };
            Spec {
                class,
                rate_limit,
                concurrent_limit: Some(2),
                balance,
                token_limit: None,
                budget: None,
            }
        })
        .collect()
}

fn between(rng: &mut StdRng, lo_ms: u64, hi_ms: u64) -> Duration {
    Duration::from_millis(rng.gen_range(lo_ms..=hi_ms))
}

/// Kills Redis and starts an empty one after `down`; the loss as the audit needs it.
async fn lose_redis(
    env: &mut Env,
    down: Duration,
    epoch: Instant,
    last_empty: &AtomicU64,
    fault: usize,
) -> Result<(Loss, Option<u64>), String> {
    let backlog = match crate::observe::connect(&env.redis.url()).await {
        Ok(mut c) => tokio::time::timeout(
            Duration::from_millis(500),
            crate::observe::stream_backlog(&mut c, &env.layout.streams()),
        )
        .await
        .ok()
        .and_then(Result::ok),
        Err(_) => None,
    };
    let kill_sent = nanos(epoch);
    env.redis.kill9().await;
    let kill_done = nanos(epoch);
    let last_empty = last_empty.load(Ordering::SeqCst);
    tokio::time::sleep(down).await;
    env.redis.start().await?;
    let loss = Loss {
        fault,
        last_empty,
        kill_sent,
        kill_done,
        back: nanos(epoch),
    };
    Ok((loss, backlog))
}

/// One GET on a fresh connection: its status, or why there was none.
async fn probe(ep: &Endpoint, path: &str) -> String {
    match Conn::new(ep.clone(), None).get(path).await {
        Ok((s, _)) => s.as_u16().to_string(),
        Err(e) => e.to_string(),
    }
}

/// What a new connection receives without sending anything: tollgate answers one over its
/// connection cap with a 503 at once; one it accepts stays silent.
async fn refused(addr: SocketAddr) -> String {
    use tokio::io::AsyncReadExt;
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return "connection refused by the kernel".into();
    };
    let mut buf = vec![0u8; 512];
    match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
        Ok(Ok(0)) => "closed without an answer".into(),
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "accepted (nothing received in 2 s)".into(),
    }
}

/// Holds the data listener's connection table full with idle sockets for `hold`. One more
/// connection must be refused with 503 (else the table was not full and the fault not real);
/// the admin listener, which has its own table, must still answer.
async fn fill_connections(env: &Env, n: usize, hold: Duration) -> Result<String, String> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(env.tollgate.data.addr),
        )
        .await
        {
            held.push(s);
        }
    }
    let extra = refused(env.tollgate.data.addr).await;
    tokio::time::sleep(hold / 2).await;
    let admin = probe(&env.tollgate.admin, "/healthz").await;
    tokio::time::sleep(hold / 2).await;
    drop(held);
    if !extra.starts_with("HTTP/1.1 503") {
        return Err(format!(
            "one connection over the table was not refused with 503: {extra:?}"
        ));
    }
    if admin != "200" {
        return Err(format!(
            "the admin /healthz answered {admin} while the data table was full"
        ));
    }
    Ok(format!(
        "{n} idle sockets; one more got 503; admin /healthz 200"
    ))
}

/// Takes Postgres away (cut or silent) for `hold`. Halfway, the plain /readyz must still say
/// 200 (admissions need Redis alone) and the strict one must not (the outage is real).
async fn postgres_outage(env: &Env, net: Net, hold: Duration) -> Result<String, String> {
    let set = |n: Net| {
        if let Some(r) = env.relay.as_ref() {
            r.set(n);
        }
    };
    set(net);
    tokio::time::sleep(hold / 2).await;
    let plain = probe(&env.tollgate.data, "/readyz").await;
    let strict = probe(&env.tollgate.data, "/readyz?strict=true").await;
    tokio::time::sleep(hold / 2).await;
    set(Net::Open);
    if plain != "200" {
        return Err(format!(
            "/readyz answered {plain} while only Postgres was away"
        ));
    }
    Ok(format!("mid-outage /readyz 200, strict {strict}"))
}

async fn inject(
    env: &mut Env,
    kind: Kind,
    rng: &mut StdRng,
    epoch: Instant,
    last_empty: &AtomicU64,
    index: usize,
    args: &FaultArgs,
) -> (Fault, Option<Loss>) {
    let at = nanos(epoch);
    let started = Instant::now();
    let mut loss = None;
    let mut backlog_at_kill = None;
    let mut note = String::new();
    let relay_set = |env: &Env, n: Net| {
        if let Some(r) = env.relay.as_ref() {
            r.set(n);
        }
    };
    let applied: Result<(), String> = match kind {
        Kind::TollgateKill => {
            let down = between(rng, 0, 1500);
            env.tollgate.kill9().await;
            tokio::time::sleep(down).await;
            env.tollgate.start()
        }
        Kind::RedisRestart => {
            let down = between(rng, 200, 3000);
            lose_redis(env, down, epoch, last_empty, index)
                .await
                .map(|(l, b)| {
                    loss = Some(l);
                    backlog_at_kill = b;
                })
        }
        Kind::RedisRestartPostgresDown => {
            let (before, down, after) = (
                between(rng, 1000, 4000),
                between(rng, 200, 2000),
                between(rng, 1000, 6000),
            );
            relay_set(env, Net::Cut);
            tokio::time::sleep(before).await;
            let r = lose_redis(env, down, epoch, last_empty, index).await;
            tokio::time::sleep(after).await;
            relay_set(env, Net::Open);
            r.map(|(l, b)| {
                loss = Some(l);
                backlog_at_kill = b;
            })
        }
        Kind::PostgresCut | Kind::PostgresSilent => {
            let hold = between(rng, 3000, 20000);
            let net = if kind == Kind::PostgresCut {
                Net::Cut
            } else {
                Net::Silent
            };
            postgres_outage(env, net, hold).await.map(|n| note = n)
        }
        Kind::ScriptFlush => match crate::observe::connect(&env.redis.url()).await {
            Ok(mut c) => {
                let r: Result<(), _> = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut c).await;
                r.map_err(|e| format!("SCRIPT FLUSH: {e}"))
            }
            Err(e) => Err(e),
        },
        Kind::ConnectionTableFull => {
            let hold = between(rng, 3000, 9000);
            fill_connections(env, args.max_connections, hold)
                .await
                .map(|n| note = n)
        }
    };
    let held = started.elapsed();
    let recovered_in = match applied {
        Err(e) => Err(e),
        Ok(()) => {
            env.tollgate
                .ready("/readyz?strict=true", args.recover_timeout)
                .await
        }
    };
    (
        Fault {
            kind,
            at,
            held,
            backlog_at_kill,
            note,
            recovered_in,
        },
        loss,
    )
}

async fn run_in(env: &mut Env, args: &FaultArgs, seed: u64) -> Result<bool, String> {
    env.redis.start().await?;
    env.tollgate.start()?;
    env.tollgate
        .ready("/readyz?strict=true", Duration::from_secs(120))
        .await?;
    let specs = specs(args);
    progress(&format!("creating {} keys", specs.len()));
    let keys = admin::create_many(&env.tollgate.admin, &env.token, "faults", specs, 4).await?;
    let tkeys: Vec<traffic::TKey> = keys
        .iter()
        .map(|k| {
            let reserve = if k.spec.class == Class::Standalone {
                Money::from_nanos(2_000_000)
            } else {
                Money::ZERO
            };
            traffic::TKey {
                class: k.spec.class,
                admit_body: crate::load::admit_body(&k.secret, reserve, 0),
                reserve,
            }
        })
        .collect();
    let first_normal = keys
        .iter()
        .position(|k| k.spec.class == Class::Normal)
        .unwrap_or(0);
    let epoch = Instant::now();
    let started_utc = chrono::Utc::now().format("%Y-%m-%d %H:%M:%S").to_string();
    let host_load = load_average();
    let stop = Arc::new(AtomicBool::new(false));
    let last_empty = Arc::new(AtomicU64::new(0));
    let watcher = watch_backlog(
        env.redis.url(),
        env.layout.clone(),
        epoch,
        last_empty.clone(),
        stop.clone(),
    );
    let plan = traffic::Plan {
        data: env.tollgate.data.clone(),
        keys: Arc::new(tkeys),
        hot: first_normal..(first_normal + 2).min(keys.len()),
        hot_share: 0.25,
        release_share: 0.05,
        resettle_share: 0.02,
        max_cost: Money::from_nanos(2_000_000),
        hold: Duration::from_millis(2),
        concurrency: args.concurrency,
        rate: args.rate,
        epoch,
        stop: stop.clone(),
        seed,
    };
    progress(&format!(
        "traffic: {} workers, {} flows/s; faults for {:?}",
        args.concurrency, args.rate, args.duration
    ));
    let traffic = tokio::spawn(traffic::run(plan));

    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults: Vec<Fault> = Vec::new();
    let mut losses: Vec<Loss> = Vec::new();
    let mut first: Vec<Kind> = if args.each_kind_first {
        let mut v: Vec<Kind> = Kind::value_variants()
            .iter()
            .copied()
            .filter(|k| args.kinds.is_empty() || args.kinds.contains(k))
            .collect();
        v.shuffle(&mut rng);
        v
    } else {
        Vec::new()
    };
    let started = Instant::now();
    while started.elapsed() < args.duration {
        let gap = between(
            &mut rng,
            args.gap_min.as_millis() as u64,
            args.gap_max.as_millis() as u64,
        );
        tokio::time::sleep(gap).await;
        let kind = if first.is_empty() {
            Kind::pick(&mut rng, &args.kinds)
        } else {
            first.remove(0)
        };
        let (f, loss) = inject(env, kind, &mut rng, epoch, &last_empty, faults.len(), args).await;
        progress(&format!(
            "fault {} at {:.1} s: {} (held {:.1} s{}) → {}",
            faults.len() + 1,
            f.at as f64 / 1e9,
            kind.name(),
            f.held.as_secs_f64(),
            if f.note.is_empty() {
                String::new()
            } else {
                format!("; {}", f.note)
            },
            match &f.recovered_in {
                Ok(d) => format!("ready again in {:.2} s", d.as_secs_f64()),
                Err(e) => format!("NOT SURVIVED: {e}"),
            }
        ));
        losses.extend(loss);
        faults.push(f);
    }
    let faults_phase = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let seen = traffic.await.map_err(|e| format!("traffic: {e}"))?;
    let _ = watcher.await;
    progress("traffic stopped; healing and draining");
    if let Some(r) = env.relay.as_ref() {
        r.set(Net::Open);
    }
    env.tollgate
        .ready("/readyz?strict=true", args.recover_timeout)
        .await?;
    // Leases whose admission answer was lost are live until their TTL; the balance probe
    // needs them gone.
    tokio::time::sleep(Duration::from_secs(LEASE_TTL_SECONDS + 2)).await;
    let mut redis = crate::observe::connect(&env.redis.url()).await?;
    let drained = crate::drain(&mut redis, &env.layout, args.sync_timeout).await;

    progress("auditing");
    let pg = read_postgres(&format!("{}/{}", env.pg_url, env.db))?;
    let window = WINDOW_SECONDS * 1_000_000_000;
    let mut a = audit::run(
        &seen,
        &losses,
        &keys,
        &pg,
        window,
        LEASE_TTL_SECONDS * 1_000_000_000,
    );
    // Redis against Postgres: each standalone key's remaining balance, through tollgate.
    let mut recorded: HashMap<u32, (i64, u64)> = HashMap::new();
    for (i, k) in keys.iter().enumerate() {
        let used = pg.used.get(&k.id).copied().unwrap_or(0);
        recorded.insert(i as u32, (used, 0));
    }
    let redis_inv = verify::redis_balances(
        &env.tollgate.data,
        &keys,
        &recorded,
        &std::collections::HashSet::new(),
    )
    .await;
    for f in &redis_inv.failures {
        a.unexplained_count += 1;
        a.unexplained.push(format!("balances_exact_in_redis: {f}"));
    }
    let mut invariants = vec![redis_inv];
    invariants.append(&mut a.invariants);
    invariants.push(Invariant::new(
        "usage_streams_drained",
        "every usage event left Redis for Postgres".into(),
        drained.err().into_iter().collect(),
    ));
    invariants.push(Invariant::new(
        "answers_match_the_contract",
        format!("{} flows", seen.leases.len()),
        seen.violations.clone(),
    ));
    let report = Report {
        seed,
        started: started_utc,
        host: (host_load, load_average()),
        faults_phase,
        faults: &faults,
        seen: &seen,
        audit: &a,
        invariants: &invariants,
    };
    report.print();
    Ok(report.passed())
}

/// The 1, 5 and 15 minute load averages of the host, as /proc/loadavg gives them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn read_postgres(url: &str) -> Result<PgView, String> {
    let mut events = HashMap::new();
    for line in psql(url, "SELECT event_id, key_id, cost_nanos FROM usage_events")?.lines() {
        let mut f = line.split('\t');
        if let (Some(id), Some(key), Some(cost)) = (f.next(), f.next(), f.next()) {
            let cost: i64 = cost.parse().map_err(|e| format!("cost {cost:?}: {e}"))?;
            events.insert(id.to_string(), (key.to_string(), cost));
        }
    }
    let mut used = HashMap::new();
    for line in psql(url, "SELECT id, balance_used_nanos FROM api_keys")?.lines() {
        if let Some((id, n)) = line.split_once('\t') {
            used.insert(
                id.to_string(),
                n.parse().map_err(|e| format!("{n:?}: {e}"))?,
            );
        }
    }
    let mut daily = HashMap::new();
    let sql = "SELECT key_id, sum(requests), sum(cost_nanos) FROM usage_daily GROUP BY key_id";
    for line in psql(url, sql)?.lines() {
        let mut f = line.split('\t');
        if let (Some(id), Some(n), Some(c)) = (f.next(), f.next(), f.next()) {
            let n: i64 = n.parse().map_err(|e| format!("{n:?}: {e}"))?;
            let c: i64 = c.parse().map_err(|e| format!("{c:?}: {e}"))?;
            daily.insert(id.to_string(), (n, c));
        }
    }
    Ok(PgView {
        events,
        used,
        daily,
    })
}

struct Report<'a> {
    seed: u64,
    /// UTC start and end, and the host's load averages then: the run shares its host.
    started: String,
    host: (String, String),
    faults_phase: Duration,
    faults: &'a [Fault],
    seen: &'a traffic::Seen,
    audit: &'a audit::Audit,
    invariants: &'a [Invariant],
}

impl Report<'_> {
    fn survived(&self) -> usize {
        self.faults
            .iter()
            .filter(|f| f.recovered_in.is_ok())
            .count()
    }

    fn passed(&self) -> bool {
        self.survived() == self.faults.len()
            && self.audit.unexplained_count == 0
            && self.invariants.iter().all(|i| i.ok)
    }

    fn print(&self) {
        println!("fault-injection run, seed {}", self.seed);
        println!(
            "  started {} UTC, ended {} UTC; host load average {} at the start, {} at the end",
            self.started,
            chrono::Utc::now().format("%Y-%m-%d %H:%M:%S"),
            self.host.0,
            self.host.1
        );
        println!(
            "  faults for {:.0} s: {} injected, {} survived (tollgate ready again, strict)",
            self.faults_phase.as_secs_f64(),
            self.faults.len(),
            self.survived()
        );
        let mut by_kind: BTreeMap<Kind, (usize, usize, Duration, Duration)> = BTreeMap::new();
        for f in self.faults {
            let e = by_kind.entry(f.kind).or_default();
            e.0 += 1;
            if let Ok(d) = f.recovered_in {
                e.1 += 1;
                e.3 = e.3.max(d);
            }
            e.2 += f.held;
        }
        for (k, (n, ok, held, worst)) in &by_kind {
            println!(
                "    {:<52} {n:>4} injected {ok:>4} survived, {:>6.1} s in all, slowest recovery {:.2} s",
                k.name(),
                held.as_secs_f64(),
                worst.as_secs_f64()
            );
        }
        for (i, f) in self.faults.iter().enumerate() {
            if let Err(e) = &f.recovered_in {
                println!("    fault {} ({}) not survived: {e}", i + 1, f.kind.name());
            }
        }
        let s = self.seen;
        println!(
            "  traffic: {} admissions allowed, {} leases ended; {} admissions unanswered or 503",
            s.get("admit_allowed"),
            s.leases.len(),
            s.get("admit_unavailable_or_lost")
        );
        for (k, v) in &s.counts {
            println!("    {k:<40} {v}");
        }
        for e in &s.samples {
            println!("    e.g. {e}");
        }
        println!("  leases by fate (checked against Postgres):");
        for (k, v) in &self.audit.fates {
            println!("    {k:<48} {v}");
        }
        println!(
            "  usage events in Postgres checked: {}",
            self.audit.events_checked
        );
        println!("  losses attributed to Redis losses:");
        let mut none = true;
        for (i, f) in self.faults.iter().enumerate() {
            if !matches!(f.kind, Kind::RedisRestart | Kind::RedisRestartPostgresDown) {
                continue;
            }
            none = false;
            let (n, cost) = self.audit.attributed.get(&i).copied().unwrap_or((0, 0));
            let forgot = self.audit.forgotten.get(&i).copied().unwrap_or(0);
            println!(
                "    fault {:>3} at {:>7.1} s ({}): {n} settled events lost ({} USD), backlog at the kill {}, {forgot} live leases forgotten",
                i + 1,
                f.at as f64 / 1e9,
                f.kind.name(),
                Money::from_nanos(cost),
                f.backlog_at_kill.map_or("unknown".to_string(), |b| b.to_string()),
            );
        }
        if none {
            println!("    (no Redis loss in this run)");
        }
        println!("  limits: {}", self.audit.windows);
        for inv in self.invariants {
            let mark = if inv.ok { "ok" } else { "FAIL" };
            println!("  [{mark}] {} — {}", inv.name, inv.scope);
            inv.failures.iter().for_each(|f| println!("        {f}"));
        }
        println!(
            "  unexplained differences: {}",
            self.audit.unexplained_count
        );
        for u in &self.audit.unexplained {
            println!("    {u}");
        }
        println!("  {}", if self.passed() { "PASSED" } else { "FAILED" });
    }
}
