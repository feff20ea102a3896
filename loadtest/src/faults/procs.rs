//! The processes a fault run owns: a private Redis without persistence and a real
//! `tollgate serve`, each started, killed with SIGKILL and restarted on the same port.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::http::{Conn, Endpoint};

/// A free loopback port: bound, read, released. Another process could take it in between,
/// which would make a start fail loudly rather than test the wrong thing.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

fn log_file(path: &Path) -> Result<(File, File), String> {
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let g = f.try_clone().map_err(|e| e.to_string())?;
    Ok((f, g))
}

/// SIGKILL, then reap, without blocking the runtime on `wait`.
async fn kill9(child: &mut Option<Child>) {
    let Some(mut c) = child.take() else { return };
    let _ = c.kill();
    for _ in 0..500 {
        if !matches!(c.try_wait(), Ok(None)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub struct Redis {
    pub bin: String,
    pub port: u16,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Redis {
    pub fn new(bin: String, port: u16, log: PathBuf) -> Redis {
        Redis {
            bin,
            port,
            log,
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts an empty Redis (no RDB, no AOF) and waits until it answers PING.
    pub async fn start(&mut self) -> Result<(), String> {
        let (out, err) = log_file(&self.log)?;
        let port = self.port.to_string();
        let child = Command::new(&self.bin)
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("{}: {e}", self.bin))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = crate::observe::connect(&self.url()).await {
                let pong: Result<String, _> = redis::cmd("PING").query_async(&mut c).await;
                if pong.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server on port {port} did not answer in 20 s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn kill9(&mut self) {
        kill9(&mut self.child).await;
    }
}

pub struct Tollgate {
    pub bin: PathBuf,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    pub data: Endpoint,
    pub admin: Endpoint,
    child: Option<Child>,
}

impl Tollgate {
    pub fn new(
        bin: PathBuf,
        env: Vec<(String, String)>,
        log: PathBuf,
        data: Endpoint,
        admin: Endpoint,
    ) -> Tollgate {
        Tollgate {
            bin,
            env,
            log,
            data,
            admin,
            child: None,
        }
    }

    pub fn start(&mut self) -> Result<(), String> {
        let (out, err) = log_file(&self.log)?;
        let child = Command::new(&self.bin)
            .arg("serve")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("{}: {e}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn exited(&mut self) -> Option<String> {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            _ => None,
        }
    }

    pub async fn kill9(&mut self) {
        kill9(&mut self.child).await;
    }

    /// SIGTERM and wait for a clean exit; the exit status, or why there was none.
    pub async fn stop(&mut self) -> Result<(), String> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        for _ in 0..600 {
            match c.try_wait() {
                Ok(Some(s)) if s.success() => return Ok(()),
                Ok(Some(s)) => return Err(format!("tollgate exited with {s} after SIGTERM")),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let _ = c.kill();
        Err("tollgate did not stop within 30 s of SIGTERM".into())
    }

    /// Waits until `path` on the data listener answers 200; how long that took.
    pub async fn ready(&mut self, path: &str, timeout: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let mut c = Conn::new(self.data.clone(), None);
        let mut last = String::new();
        while started.elapsed() < timeout {
            if let Some(s) = self.exited() {
                return Err(format!("tollgate exited ({s})"));
            }
            match c.get(path).await {
                Ok((s, _)) if s.is_success() => return Ok(started.elapsed()),
                Ok((s, b)) => last = format!("{s} {}", String::from_utf8_lossy(&b)),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("{path} not 200 after {timeout:?}: {last}"))
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `psql` against `url` and returns its unaligned, tab-separated output.
pub fn psql(url: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([
            url,
            "-X",
            "-q",
            "-At",
            "-F",
            "\t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "psql: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    String::from_utf8(out.stdout).map_err(|e| format!("psql: {e}"))
}
