//! The real `tollgate` binary as a child process, for tests that crash or signal it.
//!
//! [`TollgateProcess::start`] runs `tollgate serve` with exactly the given `TOLLGATE_*`
//! settings (listeners on port 0, JSON logs), reads its stderr until the `tollgate serving`
//! line names the bound addresses, and keeps draining stderr afterwards so the child never
//! blocks on a full pipe. [`TollgateProcess::kill9`] is a crash (SIGKILL: no drain, no flush);
//! [`TollgateProcess::terminate`] is a graceful stop (SIGTERM) waited for with a bound. A
//! process still running when dropped is killed, so a failing test leaves nothing behind.
//!
//! The process does not own its database or namespace: replicas and restarts share them, so
//! the test removes them itself (see [`cleanup_state`]).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

/// How long start-up (create database, migrate, bind) may take on a loaded machine.
const START_BOUND: Duration = Duration::from_secs(90);
/// Lines of stderr kept for failure messages.
const LOG_KEEP: usize = 2000;

pub struct TollgateProcess {
    child: Option<Child>,
    pub pid: u32,
    pub data: String,
    pub admin: String,
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The access-log receiver, when `TOLLGATE_ACCESS_LOG_LISTEN` is set.
    pub access_log: Option<SocketAddr>,
    pub http: reqwest::Client,
    logs: Arc<Mutex<Vec<String>>>,
}

type Addrs = (SocketAddr, SocketAddr, Option<SocketAddr>);

fn serving_addrs(line: &str) -> Option<Addrs> {
    let v: Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    if fields.get("message")?.as_str()? != "tollgate serving" {
        return None;
    }
    let listen = fields.get("listen")?.as_str()?.parse().ok()?;
    let admin = fields.get("admin")?.as_str()?.parse().ok()?;
    let access_log = fields
        .get("access_log")
        .and_then(Value::as_str)
        .and_then(|a| a.parse().ok());
    Some((listen, admin, access_log))
}

impl super::Api for TollgateProcess {
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

impl TollgateProcess {
    /// Starts `tollgate serve` with `settings` (plus port-0 listeners and JSON logs when the
    /// settings do not name them) and waits until it serves and Postgres is migrated (its
    /// `/readyz` says `"postgres": "ok"`). Panics with its stderr if it exits or is not there
    /// within the start bound.
    pub async fn start(settings: &HashMap<&'static str, String>) -> TollgateProcess {
        let p = Self::start_serving(settings).await;
        let deadline = tokio::time::Instant::now() + START_BOUND;
        loop {
            let ready = p.http.get(format!("{}/readyz", p.admin)).send().await.ok();
            let body: Option<Value> = match ready {
                Some(res) => res.json().await.ok(),
                None => None,
            };
            if body.is_some_and(|b| b["postgres"] == "ok") {
                return p;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "postgres not ready within {START_BOUND:?}; stderr:\n{}",
                p.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts `tollgate serve` and waits only until it serves (its `tollgate serving` line),
    /// not for Postgres.
    pub async fn start_serving(settings: &HashMap<&'static str, String>) -> TollgateProcess {
        let mut settings = settings.clone();
        settings
            .entry("TOLLGATE_LISTEN")
            .or_insert_with(|| "127.0.0.1:0".into());
        settings
            .entry("TOLLGATE_ADMIN_LISTEN")
            .or_insert_with(|| "127.0.0.1:0".into());
        settings.insert("TOLLGATE_LOG_FORMAT", "json".into());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Only the given settings count: nothing leaks in from the test runner's environment.
        for (name, _) in std::env::vars() {
            if name.starts_with("TOLLGATE_") {
                cmd.env_remove(name);
            }
        }
        for (name, value) in &settings {
            cmd.env(name, value);
        }
        cmd.env("TOLLGATE_LOG", "info");
        let mut child = cmd.spawn().expect("spawn the tollgate binary");
        let pid = child.id();
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addrs) = serving_addrs(&line) {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(addrs);
                    }
                }
                if let Ok(mut l) = sink.lock() {
                    if l.len() >= LOG_KEEP {
                        l.remove(0);
                    }
                    l.push(line);
                }
            }
        });
        let waited = tokio::task::spawn_blocking(move || ready_rx.recv_timeout(START_BOUND))
            .await
            .expect("waiting for the serving line");
        let mut process = TollgateProcess {
            child: Some(child),
            pid,
            data: String::new(),
            admin: String::new(),
            data_addr: ([127, 0, 0, 1], 0).into(),
            admin_addr: ([127, 0, 0, 1], 0).into(),
            access_log: None,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            logs,
        };
        match waited {
            Ok((data, admin, access_log)) => {
                process.access_log = access_log;
                process.data_addr = data;
                process.admin_addr = admin;
                process.data = format!("http://{data}");
                process.admin = format!("http://{admin}");
                process
            }
            Err(_) => {
                let status = process
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                // Give the reader a moment to collect the last lines before reporting them.
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "tollgate did not report `tollgate serving` (exit status {status:?}); stderr:\n{}",
                    process.logs()
                );
            }
        }
    }

    /// Everything the process wrote to stderr so far (the last lines).
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL, as a crash: nothing is drained or flushed. Waits until the process is gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .expect("run kill -TERM");
        assert!(status.success(), "kill -TERM {} failed", self.pid);
    }

    /// Waits up to `bound` for the process to exit; `None` if it is still running then.
    pub async fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits up to `bound` for the exit; `None` if it did not exit in time.
    pub async fn terminate(&mut self, bound: Duration) -> Option<ExitStatus> {
        self.signal_term();
        self.wait_exit(bound).await
    }

    /// `POST /v1/settle` with a raw JSON body (so money can be written as an exact decimal).
    pub async fn settle_raw(&self, body: String) -> Result<(u16, Value), reqwest::Error> {
        let res = self
            .http
            .post(format!("{}/v1/settle", self.data))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let status = res.status().as_u16();
        Ok((status, res.json().await?))
    }

    /// Value of an unlabelled series in `/metrics`, if present.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric_value(&super::Api::metrics_text(self).await, name)
    }
}

/// Value of the unlabelled series `name` in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

impl Drop for TollgateProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Drops a database and deletes a namespace's Redis keys that processes of a test shared.
pub fn cleanup_state(settings: &HashMap<&'static str, String>) {
    let db_name = settings["TOLLGATE_DATABASE_URL"]
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let redis_url = settings["TOLLGATE_REDIS_URL"]
        .split(',')
        .next()
        .unwrap_or_default()
        .to_string();
    super::cleanup_blocking(
        None,
        Some(db_name),
        redis_url,
        settings["TOLLGATE_REDIS_NAMESPACE"].clone(),
    );
}
