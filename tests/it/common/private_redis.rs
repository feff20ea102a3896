//! Private `redis-server` processes for tests that kill Redis or need a Redis Cluster.
//!
//! The shared server on 6379 is never touched. Each private server runs on a free loopback
//! port, without persistence, in its own temp directory, and dies with its owner:
//!
//! - on `Drop` (killed, reaped, directory removed);
//! - when the test process exits without dropping it (a shared cluster in a `static`, a
//!   panic that aborts, `cargo test` killed): every server gets a watchdog shell, in its own
//!   process group so a Ctrl-C of the test does not take it down first, which polls the test
//!   process and kills the server once the test process is gone. The watchdog also exits as
//!   soon as its server does, so restarts leave no stray watchdogs behind.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a fresh server may take to answer `PING` on a loaded machine.
const START_WAIT: Duration = Duration::from_secs(20);
/// How long a new cluster may take to reach `cluster_state:ok` on every node.
const CLUSTER_WAIT: Duration = Duration::from_secs(60);
const PORT_ATTEMPTS: usize = 10;

/// Fails loudly when `redis-server`/`redis-cli` are missing and cannot be installed.
pub fn require_redis_binaries() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let present = |bin: &str| {
            Command::new(bin)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if present("redis-server") && present("redis-cli") {
            return;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-test-deps.sh");
        let status = Command::new("bash").arg(&script).status();
        assert!(
            present("redis-server") && present("redis-cli"),
            "redis-server/redis-cli are missing and {} could not install them ({status:?}); \
             install the redis-server and redis-tools packages",
            script.display()
        );
    });
}

/// A loopback port nobody listens on right now (it may be taken again before we bind it:
/// callers retry).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tollgate-{prefix}-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Sends one inline command and returns the raw reply, or `None` when nothing answers.
fn inline(port: u16, command: &str) -> Option<String> {
    let addr = (Ipv4Addr::LOCALHOST, port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("{command}\r\n").as_bytes()).ok()?;
    let mut buf = vec![0u8; 8192];
    let mut out = Vec::new();
    // A bulk reply may arrive in several segments; read until the declared length is in.
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if reply_complete(&out) {
            break;
        }
    }
    String::from_utf8(out).ok()
}

fn reply_complete(r: &[u8]) -> bool {
    let Some(end) = r.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    match r.first() {
        Some(b'$') => {
            let len: i64 = std::str::from_utf8(&r[1..end])
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            len < 0 || r.len() >= end + 2 + len as usize + 2
        }
        _ => true,
    }
}

fn pings(port: u16) -> bool {
    inline(port, "PING").is_some_and(|r| r.starts_with("+PONG"))
}

/// One `redis-server` process on a fixed port, with its watchdog.
struct Server {
    port: u16,
    child: Child,
    watchdog: Child,
}

impl Server {
    /// Starts a server and waits until it answers. `Err` carries the log when it died at
    /// start-up (a port collision, usually), so the caller can retry on another port.
    fn start(dir: &Path, port: u16, extra: &[String]) -> Result<Server, String> {
        let log = dir.join(format!("redis-{port}.log"));
        let mut args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "no".into(),
            "--daemonize".into(),
            "no".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--logfile".into(),
            log.display().to_string(),
        ];
        args.extend(extra.iter().cloned());
        let child = Command::new("redis-server")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let script = format!(
            "while kill -0 {test} 2>/dev/null && kill -0 {redis} 2>/dev/null; do sleep 1; done; \
             kill -9 {redis} 2>/dev/null; \
             if ! kill -0 {test} 2>/dev/null; then rm -rf '{dir}'; fi",
            test = std::process::id(),
            redis = child.id(),
            dir = dir.display()
        );
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn watchdog shell");
        let mut server = Server {
            port,
            child,
            watchdog,
        };
        let deadline = Instant::now() + START_WAIT;
        loop {
            if pings(port) {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                drop(server);
                return Err(format!("redis-server on {port} exited ({status}): {log}"));
            }
            if Instant::now() >= deadline {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                drop(server);
                panic!("redis-server on {port} did not answer within {START_WAIT:?}: {log}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn kill(&mut self) {
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A single private Redis that a test can kill and bring back on the same port.
pub struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    server: Option<Server>,
}

impl PrivateRedis {
    /// Starts a fresh server on a free port.
    pub fn start() -> PrivateRedis {
        require_redis_binaries();
        let dir = temp_dir("redis");
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            match Server::start(&dir, port, &[]) {
                Ok(server) => {
                    return PrivateRedis {
                        port,
                        dir,
                        server: Some(server),
                    }
                }
                Err(e) => last = e,
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("no private redis-server after {PORT_ATTEMPTS} ports: {last}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`, for `TOLLGATE_REDIS_URL`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL, like a crash) and waits until the port is closed.
    pub fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.kill();
        }
        let deadline = Instant::now() + START_WAIT;
        while pings(self.port) {
            assert!(
                Instant::now() < deadline,
                "redis on {} still answers after kill",
                self.port
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers, like a hung
    /// host. [`thaw`](Self::thaw) resumes it with its data.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let s = self.server.as_ref().expect("redis is running");
        let status = Command::new("kill")
            .args([sig, &s.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} redis-server");
    }

    /// Starts the server again on the same port. It comes back empty: nothing is persisted.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_WAIT;
        loop {
            match Server::start(&self.dir, self.port, &[]) {
                Ok(s) => {
                    self.server = Some(s);
                    return;
                }
                // The port can linger briefly after the kill; anything else is a real failure.
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restart on {} failed, retrying: {e}", self.port);
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("redis-server would not restart on {}: {e}", self.port),
            }
        }
    }

    /// Runs a command through `redis-cli` against this server; returns its stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }

    /// How many times this Redis ran `command` (`calls` of `INFO commandstats`, commands that
    /// scripts run included; 0 when it never ran since the last reset). Its statistics are the
    /// test's own: nothing else uses a private Redis.
    pub fn calls(&self, command: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:");
        info.lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()).map(str::to_string))
            .and_then(|stats| {
                stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls=")?.parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        drop(self.server.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `redis-cli -h 127.0.0.1 -p <port> <args>`; panics when it cannot run.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A real Redis Cluster of three masters (no replicas), on private ports.
pub struct RedisCluster {
    dir: PathBuf,
    servers: Vec<Server>,
}

impl RedisCluster {
    pub const MASTERS: usize = 3;

    /// Starts three cluster-enabled servers, joins them with `redis-cli --cluster create`
    /// and waits until every node reports `cluster_state:ok`.
    pub fn start() -> RedisCluster {
        require_redis_binaries();
        let dir = temp_dir("cluster");
        let mut servers = Vec::new();
        for _ in 0..Self::MASTERS {
            servers.push(Self::start_node(&dir));
        }
        let cluster = RedisCluster { dir, servers };
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for p in cluster.ports() {
            create.arg(format!("127.0.0.1:{p}"));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + CLUSTER_WAIT;
        loop {
            let states: Vec<bool> = cluster
                .ports()
                .iter()
                .map(|p| redis_cli(*p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
                .collect();
            // Every node must also know all three masters, or a client seeded from a lagging
            // node would be redirected around until gossip catches up.
            let known = cluster.ports().iter().all(|p| {
                redis_cli(*p, &["CLUSTER", "NODES"])
                    .lines()
                    .filter(|l| l.contains("master") && !l.contains("fail"))
                    .count()
                    == Self::MASTERS
            });
            if states.iter().all(|ok| *ok) && known {
                return cluster;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ok within {CLUSTER_WAIT:?}: {states:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn start_node(dir: &Path) -> Server {
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let (port, bus) = (free_port(), free_port());
            if port == bus {
                continue;
            }
            // An explicit bus port: the default (port + 10000) overflows for high ephemeral ports.
            let extra = [
                "--cluster-enabled".to_string(),
                "yes".to_string(),
                "--cluster-config-file".to_string(),
                dir.join(format!("nodes-{port}.conf")).display().to_string(),
                "--cluster-node-timeout".to_string(),
                "2000".to_string(),
                "--cluster-port".to_string(),
                bus.to_string(),
            ];
            match Server::start(dir, port, &extra) {
                Ok(s) => return s,
                Err(e) => last = e,
            }
        }
        panic!("no cluster node after {PORT_ATTEMPTS} ports: {last}");
    }

    pub fn ports(&self) -> Vec<u16> {
        self.servers.iter().map(|s| s.port).collect()
    }

    /// Comma-separated seed URLs, for `TOLLGATE_REDIS_URL`.
    pub fn url(&self) -> String {
        self.ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `redis-cli` against one node (no `-c`: the answer is that node's own).
    pub fn cli(&self, node: usize, args: &[&str]) -> String {
        redis_cli(self.servers[node].port, args)
    }

    /// Hash slot of a Redis key, as the cluster computes it.
    pub fn keyslot(&self, key: &str) -> u16 {
        self.cli(0, &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT {key} answered nonsense"))
    }

    /// Index (into [`ports`](Self::ports)) of the master that serves `slot`.
    pub fn node_of_slot(&self, slot: u16) -> usize {
        for (i, port) in self.ports().iter().enumerate() {
            // Each node's own line in CLUSTER NODES ends with the slot ranges it serves.
            let nodes = redis_cli(*port, &["CLUSTER", "NODES"]);
            let me = nodes
                .lines()
                .find(|l| l.contains("myself"))
                .unwrap_or_else(|| panic!("node {port} does not list itself"));
            for range in me.split_whitespace().skip(8) {
                let (lo, hi) = match range.split_once('-') {
                    Some((a, b)) => (a.parse::<u16>(), b.parse::<u16>()),
                    None => (range.parse::<u16>(), range.parse::<u16>()),
                };
                if let (Ok(lo), Ok(hi)) = (lo, hi) {
                    if (lo..=hi).contains(&slot) {
                        return i;
                    }
                }
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// Every key on one node matching `pattern`.
    pub fn node_keys(&self, node: usize, pattern: &str) -> Vec<String> {
        self.cli(node, &["--scan", "--pattern", pattern])
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// `SCRIPT FLUSH` on every master.
    pub fn script_flush_all(&self) {
        for p in self.ports() {
            let r = redis_cli(p, &["SCRIPT", "FLUSH"]);
            assert!(r.trim() == "OK", "SCRIPT FLUSH on {p}: {r}");
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.servers.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One cluster for the whole test binary: starting one takes seconds, and tests keep apart
/// by namespace. It is never dropped (statics are not); the watchdogs kill its servers when
/// the test process exits, and its temp directory is removed then too.
pub async fn shared_cluster() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    tokio::task::spawn_blocking(|| {
        let c = CLUSTER.get_or_init(RedisCluster::start);
        let _: &'static RedisCluster = c;
    })
    .await
    .expect("cluster start-up panicked");
    CLUSTER.get().expect("cluster started")
}
