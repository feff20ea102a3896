//! Real reverse proxies in front of a test tollgate: nginx (`auth_request` → `/auth/nginx`) and
//! Caddy (`forward_auth` → `/auth`), configured from the files users deploy (`deploy/`), plus a
//! tiny upstream that records what reached it.
//!
//! Each proxy runs as a non-daemon child process on a free loopback port, with its config,
//! pid file, logs and state in its own temp directory; dropping it kills the process and
//! removes the directory. The binaries come from `scripts/install-test-deps.sh` when they are
//! missing; a test fails loudly if they still are.

use std::collections::HashMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::Router;

/// How long a proxy may take to listen on a loaded machine.
const START_WAIT: Duration = Duration::from_secs(30);
/// Ports tried before giving up (another process can take a free port before we bind it).
const PORT_ATTEMPTS: usize = 5;

fn deploy_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(rel)
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Where `bin` is: on `PATH`, or in `/usr/sbin` (nginx on Debian, when `PATH` lacks it).
fn find_binary(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// The path of `bin`, installing the test dependencies once when it is missing. Panics when
/// it still is: a test never skips.
pub fn require_binary(bin: &str) -> PathBuf {
    static INSTALL: OnceLock<String> = OnceLock::new();
    if let Some(p) = find_binary(bin) {
        return p;
    }
    let outcome = INSTALL.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-test-deps.sh");
        match Command::new("bash").arg(&script).output() {
            Ok(o) => format!(
                "{} exited {}: {}{}",
                script.display(),
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("could not run {}: {e}", script.display()),
        }
    });
    find_binary(bin).unwrap_or_else(|| {
        panic!("`{bin}` is not installed and scripts/install-test-deps.sh did not install it: {outcome}")
    })
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "tollgate-{prefix}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One request as the upstream saw it. Header names are lower case; repeated headers are
/// joined with ", ".
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HashMap<String, String>,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// How the upstream answers: a status and extra response headers.
#[derive(Debug, Clone)]
struct Canned {
    status: u16,
    headers: Vec<(String, String)>,
}

/// The service behind the proxy: answers 200 `{"upstream": "ok"}` to anything (or what
/// [`Upstream::answer_with`] sets) and records every request. [`Upstream::hold`] makes
/// requests wait until [`Upstream::let_go`], to keep them in flight.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    answer: Arc<Mutex<Canned>>,
    open: tokio::sync::watch::Sender<bool>,
    waiting: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let answer = Arc::new(Mutex::new(Canned {
            status: 200,
            headers: Vec::new(),
        }));
        let (open, open_rx) = tokio::sync::watch::channel(true);
        let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sink = seen.clone();
        let (answering, counting) = (answer.clone(), waiting.clone());
        let app = Router::new().fallback(move |req: Request| {
            let sink = sink.clone();
            let answer = answering.lock().expect("upstream answer").clone();
            let mut open = open_rx.clone();
            let waiting = counting.clone();
            async move {
                use std::sync::atomic::Ordering;
                waiting.fetch_add(1, Ordering::SeqCst);
                let _ = open.wait_for(|o| *o).await;
                waiting.fetch_sub(1, Ordering::SeqCst);
                let (parts, body) = req.into_parts();
                let body = axum::body::to_bytes(body, 64 << 20)
                    .await
                    .unwrap_or_default();
                let mut headers: HashMap<String, String> = HashMap::new();
                for (name, value) in &parts.headers {
                    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                    headers
                        .entry(name.as_str().to_string())
                        .and_modify(|v| {
                            v.push_str(", ");
                            v.push_str(&value);
                        })
                        .or_insert(value);
                }
                sink.lock().expect("upstream log").push(Seen {
                    method: parts.method.to_string(),
                    uri: parts.uri.to_string(),
                    headers,
                    body,
                });
                let mut res = axum::response::Response::builder()
                    .status(StatusCode::from_u16(answer.status).expect("status"))
                    .header("content-type", "application/json");
                for (name, value) in &answer.headers {
                    res = res.header(name, value);
                }
                res.body(axum::body::Body::from(r#"{"upstream":"ok"}"#))
                    .expect("upstream response")
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream {
            addr,
            seen,
            answer,
            open,
            waiting,
            task,
        }
    }

    /// Answers later requests with this status and these extra headers.
    pub fn answer_with(&self, status: u16, headers: &[(&str, &str)]) {
        *self.answer.lock().expect("upstream answer") = Canned {
            status,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        };
    }

    /// Holds every request (new and waiting) until [`Upstream::let_go`].
    pub fn hold(&self) {
        self.open.send_replace(false);
    }

    pub fn let_go(&self) {
        self.open.send_replace(true);
    }

    /// Requests being held right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every request received so far, oldest first.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("upstream log").clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A proxy process: killed (and its temp dir removed) on drop.
pub struct Proxy {
    pub name: &'static str,
    /// `http://127.0.0.1:<port>`
    pub url: String,
    child: Child,
    log: PathBuf,
    /// Removed with the proxy.
    _dir: TempDir,
}

impl Proxy {
    /// What the proxy wrote to its log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Starts nginx with `deploy/nginx/tollgate.conf.template` rendered for these addresses,
    /// inside a minimal `nginx.conf` that keeps pid, logs and temp files in the temp dir.
    pub async fn nginx(
        tollgate: SocketAddr,
        upstream: SocketAddr,
        access_log: SocketAddr,
    ) -> Proxy {
        let bin = require_binary("nginx");
        let template = std::fs::read_to_string(deploy_file("nginx/tollgate.conf.template"))
            .expect("read deploy/nginx/tollgate.conf.template");
        start_with_retries("nginx", |dir, port| {
            let d = dir.display();
            let rendered = render_nginx(
                &template,
                &format!("127.0.0.1:{port}"),
                tollgate,
                upstream,
                access_log,
            );
            std::fs::write(dir.join("rendered.conf"), rendered).expect("write rendered.conf");
            let conf = format!(
                "pid {d}/nginx.pid;\n\
                 error_log {d}/error.log info;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n\
                 \x20   access_log {d}/access.log;\n\
                 \x20   client_body_temp_path {d}/body;\n\
                 \x20   proxy_temp_path {d}/proxy;\n\
                 \x20   fastcgi_temp_path {d}/fastcgi;\n\
                 \x20   uwsgi_temp_path {d}/uwsgi;\n\
                 \x20   scgi_temp_path {d}/scgi;\n\
                 \x20   include {d}/rendered.conf;\n\
                 }}\n"
            );
            std::fs::write(dir.join("nginx.conf"), conf).expect("write nginx.conf");
            let mut cmd = Command::new(&bin);
            // One process (no master/worker split), so killing it leaves no orphaned workers.
            cmd.arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .arg("-g")
                .arg("daemon off; master_process off;");
            (cmd, dir.join("error.log"))
        })
        .await
    }

    /// Starts Caddy with `deploy/caddy/Caddyfile` and its environment placeholders. The
    /// Caddyfile turns the admin endpoint off; config, data and home point into the temp dir,
    /// so parallel tests share nothing.
    pub async fn caddy(
        tollgate: SocketAddr,
        upstream: SocketAddr,
        access_log: SocketAddr,
    ) -> Proxy {
        let bin = require_binary("caddy");
        let caddyfile = deploy_file("caddy/Caddyfile");
        start_with_retries("caddy", |dir, port| {
            let mut cmd = Command::new(&bin);
            cmd.arg("run")
                .arg("--config")
                .arg(&caddyfile)
                .arg("--adapter")
                .arg("caddyfile")
                .env("CADDY_LISTEN", format!("127.0.0.1:{port}"))
                .env("TOLLGATE_ADDR", tollgate.to_string())
                .env("UPSTREAM_ADDR", upstream.to_string())
                .env("TOLLGATE_ACCESS_LOG_ADDR", access_log.to_string())
                .env("XDG_CONFIG_HOME", dir.join("config"))
                .env("XDG_DATA_HOME", dir.join("data"))
                .env("HOME", dir);
            // Caddy logs to stderr, which goes to the stdio log.
            (cmd, dir.join("caddy.stdio.log"))
        })
        .await
    }
}

/// The nginx template with its placeholders replaced, as `envsubst` with named variables
/// does (nginx's own `$variables` stay).
pub fn render_nginx(
    template: &str,
    listen: &str,
    tollgate: SocketAddr,
    upstream: SocketAddr,
    access_log: SocketAddr,
) -> String {
    let out = template
        .replace("${NGINX_LISTEN}", listen)
        .replace("${TOLLGATE_ADDR}", &tollgate.to_string())
        .replace("${UPSTREAM_ADDR}", &upstream.to_string())
        .replace("${TOLLGATE_ACCESS_LOG_ADDR}", &access_log.to_string());
    assert!(
        !out.contains("${"),
        "unrendered placeholder left in the nginx template"
    );
    out
}

/// Starts the command `build` makes for a free port, and waits until that port accepts
/// connections. A process that exits first (the port was taken meanwhile) is retried on
/// another port; anything else fails the test with the proxy's log.
async fn start_with_retries(
    name: &'static str,
    mut build: impl FnMut(&Path, u16) -> (Command, PathBuf),
) -> Proxy {
    let dir = TempDir::new(name);
    let mut last = String::new();
    for _ in 0..PORT_ATTEMPTS {
        let port = free_port();
        let (mut cmd, log) = build(dir.path(), port);
        let stdio_log = dir.path().join(format!("{name}.stdio.log"));
        let out = File::create(&stdio_log).expect("create proxy log");
        let err = out.try_clone().expect("clone proxy log");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + START_WAIT;
        let read_logs = || {
            let mut text = std::fs::read_to_string(&stdio_log).unwrap_or_default();
            if log != stdio_log {
                text.push('\n');
                text.push_str(&std::fs::read_to_string(&log).unwrap_or_default());
            }
            text
        };
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                last = format!("{name} exited ({status}) on port {port}:\n{}", read_logs());
                break;
            }
            let connect = tokio::net::TcpStream::connect(addr);
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), connect).await {
                return Proxy {
                    name,
                    url: format!("http://{addr}"),
                    child,
                    log,
                    _dir: dir,
                };
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{name} did not listen on {addr} within {START_WAIT:?}:\n{}",
                    read_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("{name} would not start after {PORT_ATTEMPTS} ports: {last}");
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
