//! A private Postgres cluster for outage tests: they stop and start it, which they must never
//! do to the shared server.
//!
//! [`PrivatePg::start`] runs `initdb` into a fresh directory under the system temp dir and
//! starts the cluster on a free loopback port with trust authentication. [`PrivatePg::stop`] /
//! [`PrivatePg::crash`] take it down (`pg_ctl stop -m fast` / `-m immediate`) and
//! [`PrivatePg::restart`] brings it back on the same port with the same data. Postgres refuses
//! to run as root, so when the tests run as root every command runs as the `postgres` OS user
//! (via `runuser`) in a directory that user owns. Dropping it stops the cluster and removes the
//! directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::Rng;

pub struct PrivatePg {
    pub port: u16,
    /// Parent directory: data, socket and log live inside.
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    running: bool,
}

fn bin_dir() -> PathBuf {
    let find = || -> Option<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
            .collect();
        // The newest major version when several are installed.
        found.sort_by_key(|p| {
            p.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0)
        });
        found.pop()
    };
    if let Some(p) = find() {
        return p;
    }
    let status = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/install-test-deps.sh"
        ))
        .status()
        .expect("run scripts/install-test-deps.sh");
    assert!(status.success(), "scripts/install-test-deps.sh failed");
    find().expect("initdb and pg_ctl under /usr/lib/postgresql/*/bin after installing postgresql")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A free port below the kernel's ephemeral range, so no port-0 listener of a concurrent test
/// can take it while the cluster is stopped between a stop and a restart.
fn free_port() -> u16 {
    let mut rng = rand::thread_rng();
    for _ in 0..200 {
        let port = rng.gen_range(20_000..32_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port for a private postgres");
}

impl PrivatePg {
    /// Creates and starts a fresh cluster. Blocking: call it from `spawn_blocking` or accept a
    /// few seconds of a blocked worker.
    pub fn start() -> PrivatePg {
        let bin = bin_dir();
        let as_postgres = is_root();
        let dir =
            std::env::temp_dir().join(format!("tollgate-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create private postgres dir");
        let mut pg = PrivatePg {
            port: free_port(),
            dir,
            bin,
            as_postgres,
            running: false,
        };
        if as_postgres {
            let out = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&pg.dir)
                .output()
                .expect("run chown");
            assert!(
                out.status.success(),
                "chown postgres {}: {}",
                pg.dir.display(),
                text(&out)
            );
        }
        let data = pg.data_dir();
        let out = pg.run(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        assert!(out.status.success(), "initdb failed: {}", text(&out));
        pg.restart();
        pg
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.arg("-u").arg("postgres").arg("--").arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            .current_dir(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"))
    }

    /// Server URL without a database name, like `TEST_DATABASE_URL`.
    pub fn server_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("{}/{db}", self.server_url())
    }

    /// Starts the (stopped) cluster on its port and waits until it accepts connections.
    pub fn restart(&mut self) {
        let options = format!(
            // fsync off: the data only has to survive a stopped server, not a lost machine.
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.port,
            path_str(&self.dir)
        );
        let data = self.data_dir();
        let log = self.dir.join("log");
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data),
                "-o",
                &options,
                "-l",
                path_str(&log),
                "-t",
                "60",
                "start",
                "-w",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\nserver log:\n{}",
            text(&out),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        self.running = true;
    }

    fn stop_mode(&mut self, mode: &str) {
        let data = self.data_dir();
        let out = self.run(
            "pg_ctl",
            &["-D", path_str(&data), "-m", mode, "-t", "60", "stop", "-w"],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop -m {mode} failed: {}",
            text(&out)
        );
        self.running = false;
    }

    /// A clean, fast shutdown: open connections are cut, nothing committed is lost.
    pub fn stop(&mut self) {
        self.stop_mode("fast");
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        if self.running {
            let data = self.data_dir();
            let _ = self.run(
                "pg_ctl",
                &["-D", path_str(&data), "-m", "immediate", "stop", "-w"],
            );
        }
        // Best effort: a temp dir left behind is harmless, a panic in Drop is not.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
