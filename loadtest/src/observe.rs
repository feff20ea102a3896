//! What the harness reads besides HTTP answers: Redis `INFO` counters, Redis memory, and a
//! process's RSS and CPU time from `/proc`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use serde::Serialize;

pub async fn connect(url: &str) -> Result<MultiplexedConnection, String> {
    let client = redis::Client::open(url).map_err(|e| format!("{url}: {e}"))?;
    tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| format!("{url}: Redis did not answer within 5 s"))?
    .map_err(|e| format!("{url}: {e}"))
}

async fn info(
    c: &mut MultiplexedConnection,
    section: &str,
) -> Result<BTreeMap<String, String>, String> {
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query_async(c)
        .await
        .map_err(|e| format!("INFO {section}: {e}"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect())
}

/// Redis counters at one instant.
#[derive(Debug, Clone, Default)]
pub struct RedisSnapshot {
    /// Command name → calls. `INFO commandstats` counts every command Redis executes, those a
    /// script runs (`hget`, `zadd`, …) included, so only `evalsha`/`eval` count round trips.
    pub calls: BTreeMap<String, u64>,
    /// Command name → microseconds Redis spent executing it (`usec`): a script's whole run,
    /// without reading the request and writing the reply.
    pub usec: BTreeMap<String, u64>,
    pub cpu_seconds: f64,
    pub used_memory: u64,
}

pub async fn snapshot(c: &mut MultiplexedConnection) -> Result<RedisSnapshot, String> {
    let stats = info(c, "commandstats").await?;
    let mut calls = BTreeMap::new();
    let mut usec = BTreeMap::new();
    for (k, v) in stats {
        let Some(name) = k.strip_prefix("cmdstat_") else {
            continue;
        };
        let field = |f: &str| {
            v.split(',')
                .find_map(|kv| kv.strip_prefix(f))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        calls.insert(name.to_string(), field("calls="));
        usec.insert(name.to_string(), field("usec="));
    }
    let cpu = info(c, "cpu").await?;
    let f = |k: &str| {
        cpu.get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let mem = info(c, "memory").await?;
    Ok(RedisSnapshot {
        calls,
        usec,
        cpu_seconds: f("used_cpu_sys") + f("used_cpu_user"),
        used_memory: mem
            .get("used_memory")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    })
}

/// Calls between two snapshots, by command.
pub fn delta(before: &RedisSnapshot, after: &RedisSnapshot) -> BTreeMap<String, u64> {
    after
        .calls
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.saturating_sub(*before.calls.get(k).unwrap_or(&0)),
            )
        })
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Events waiting in the usage streams of a namespace (what the syncer has not drained).
pub async fn stream_backlog(
    c: &mut MultiplexedConnection,
    streams: &[String],
) -> Result<u64, String> {
    let mut pipe = redis::pipe();
    for s in streams {
        pipe.cmd("XLEN").arg(s);
    }
    let lens: Vec<u64> = pipe
        .query_async(c)
        .await
        .map_err(|e| format!("XLEN: {e}"))?;
    Ok(lens.iter().sum())
}

/// `MEMORY USAGE key SAMPLES 0` (every element counted); 0 when the key does not exist.
pub async fn memory_usage(c: &mut MultiplexedConnection, key: &str) -> Result<u64, String> {
    let v: Option<u64> = redis::cmd("MEMORY")
        .arg("USAGE")
        .arg(key)
        .arg("SAMPLES")
        .arg(0)
        .query_async(c)
        .await
        .map_err(|e| format!("MEMORY USAGE: {e}"))?;
    Ok(v.unwrap_or(0))
}

/// Resident set size of a process, bytes.
pub fn rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// User + system CPU time of a process, seconds (`/proc/<pid>/stat`, 100 ticks a second).
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields count from after its closing parenthesis.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the phase started.
    pub t: f64,
    pub rss_bytes: Option<u64>,
    /// Admissions completed in the second before this sample.
    pub admissions_per_second: u64,
}

/// Samples once a second until stopped: the watched process's RSS and the harness's own
/// admission count.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    pub fn start(pid: Option<u32>, progress: Arc<AtomicU64>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut samples = vec![Sample {
                t: 0.0,
                rss_bytes: pid.and_then(rss),
                admissions_per_second: 0,
            }];
            let mut last = progress.load(Ordering::Relaxed);
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + Duration::from_secs(1),
                Duration::from_secs(1),
            );
            while !flag.load(Ordering::Relaxed) {
                tick.tick().await;
                let now = progress.load(Ordering::Relaxed);
                samples.push(Sample {
                    t: started.elapsed().as_secs_f64(),
                    rss_bytes: pid.and_then(rss),
                    admissions_per_second: now - last,
                });
                last = now;
            }
            samples
        });
        Sampler { stop, task }
    }

    pub async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// Busy and total jiffies of the whole host (`/proc/stat` line `cpu`) and of each CPU.
#[derive(Debug, Clone, Default)]
pub struct HostCpu {
    pub all: (u64, u64),
    pub per_cpu: Vec<(u64, u64)>,
}

pub fn host_cpu() -> HostCpu {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return HostCpu::default();
    };
    let parse = |l: &str| {
        let f: Vec<u64> = l
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let total: u64 = f.iter().take(8).sum();
        // idle and iowait are the 4th and 5th fields.
        let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
        (total.saturating_sub(idle), total)
    };
    let mut h = HostCpu::default();
    for l in s.lines() {
        if l.starts_with("cpu ") {
            h.all = parse(l);
        } else if l.starts_with("cpu") {
            h.per_cpu.push(parse(l));
        }
    }
    h
}

/// CPU use of the host between two readings, in cores: the whole host, then each CPU as a
/// fraction of its time.
pub fn host_delta(a: &HostCpu, b: &HostCpu, seconds: f64) -> (f64, Vec<f64>) {
    let cores = |x: (u64, u64), y: (u64, u64)| y.0.saturating_sub(x.0) as f64 / 100.0;
    let frac = |x: (u64, u64), y: (u64, u64)| {
        let total = y.1.saturating_sub(x.1) as f64;
        if total > 0.0 {
            y.0.saturating_sub(x.0) as f64 / total
        } else {
            0.0
        }
    };
    (
        cores(a.all, b.all) / seconds.max(1e-9),
        a.per_cpu
            .iter()
            .zip(&b.per_cpu)
            .map(|(x, y)| frac(*x, *y))
            .collect(),
    )
}

/// CPU time, seconds, of every process on the host, by pid, with its command name.
pub fn processes() -> std::collections::HashMap<u32, (String, f64)> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((a, b)) = s.find('(').zip(s.rfind(')')) else {
            continue;
        };
        if let Some(cpu) = cpu_seconds(&pid.to_string()) {
            out.insert(pid, (s[a + 1..b].to_string(), cpu));
        }
    }
    out
}

/// CPU used between two [`processes`] readings, by command name, most first (processes
/// that started in between count whole; those that ended in between are not seen).
pub fn processes_delta(
    a: &std::collections::HashMap<u32, (String, f64)>,
    b: &std::collections::HashMap<u32, (String, f64)>,
) -> Vec<(String, f64)> {
    let mut by: BTreeMap<String, f64> = BTreeMap::new();
    for (pid, (comm, cpu)) in b {
        let before = a
            .get(pid)
            .filter(|(c, _)| c == comm)
            .map_or(0.0, |(_, c)| *c);
        *by.entry(comm.clone()).or_default() += (cpu - before).max(0.0);
    }
    let mut v: Vec<(String, f64)> = by.into_iter().filter(|(_, c)| *c > 0.0).collect();
    v.sort_by(|x, y| y.1.total_cmp(&x.1));
    v
}

/// Cumulative bucket counts of `tollgate_admission_duration_seconds` from a `/metrics` text:
/// (upper bound in seconds, count), `+Inf` as infinity.
pub fn admission_buckets(metrics: &str) -> Vec<(f64, u64)> {
    let mut out = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("tollgate_admission_duration_seconds_bucket{") else {
            continue;
        };
        let Some(le) = rest.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else {
            continue;
        };
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::INFINITY)
        };
        let count = line
            .rsplit(' ')
            .next()
            .and_then(|c| c.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        out.push((bound, count));
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The bucket bound under which `q` of the admissions between two scrapes fell: tollgate's
/// own view of an admission (its Redis call), without the HTTP hops.
pub fn bucket_quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|(b, c)| {
            let prev = before
                .iter()
                .find(|(pb, _)| pb == b)
                .map_or(0, |(_, pc)| *pc);
            (*b, c.saturating_sub(prev))
        })
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let want = (q * total as f64).ceil() as u64;
    delta.iter().find(|(_, c)| *c >= want).map(|(b, _)| *b)
}

/// CPU seconds of the Postgres backends serving database `db` (matched in their process
/// title, `postgres: … <user> <db> <addr> …`).
pub fn postgres_db_cpu_seconds(db: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let needle = format!(" {db} ");
    let mut total = 0.0;
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.starts_with("postgres:") && cmd.contains(&needle) {
            total += cpu_seconds(pid).unwrap_or(0.0);
        }
    }
    total
}
