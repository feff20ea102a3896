//! `reports`: how many access-log records per second one tollgate receiver turns into
//! settlements, and what a busy receiver does to admission latency.
//!
//! Against a running tollgate with `TOLLGATE_ACCESS_LOG_LISTEN` on: creates keys, measures the
//! admit latency at a fixed rate with the receiver idle, takes `--leases` leases, then sends one
//! settle record for each (TCP lines, or UDP datagrams paced to `--udp-rate`) while the same
//! admit load runs again, and reports records/s (first record sent → the last one counted as
//! settled in `/metrics`) and both latency distributions.

#[path = "http.rs"]
mod http;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use http::{Conn, Endpoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Transport {
    Tcp,
    Udp,
}

#[derive(Debug, Parser)]
#[command(about = "Access-log receiver throughput, and admit latency with it busy")]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    data: String,
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    admin: String,
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN")]
    admin_token: String,
    /// The receiver (TOLLGATE_ACCESS_LOG_LISTEN)
    #[arg(long, default_value = "127.0.0.1:5140")]
    receiver: SocketAddr,
    /// Leases to settle through records
    #[arg(long, default_value_t = 50_000)]
    leases: usize,
    #[arg(long, value_enum, default_value = "tcp")]
    transport: Transport,
    /// Datagrams per second with --transport udp
    #[arg(long, default_value_t = 20_000)]
    udp_rate: u64,
    /// Admissions per second of the latency probe
    #[arg(long, default_value_t = 1000)]
    admit_rate: u64,
    /// Length of each latency phase, in seconds
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("reports: {what}: {e}");
    std::process::exit(2)
}

async fn create_key(admin: &mut Conn, i: usize) -> String {
    let (status, body) = admin
        .post_json(
            "/admin/keys",
            &json!({"user_id": format!("bench-reports-{i}"), "rate_limit": null,
                "concurrent_limit": null}),
        )
        .await
        .unwrap_or_else(|e| fail("create key", e));
    let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| fail("create key", e));
    if status.as_u16() != 201 {
        fail("create key", v);
    }
    v["key"]
        .as_str()
        .unwrap_or_else(|| fail("create key", "no key"))
        .to_string()
}

async fn admit(conn: &mut Conn, key: &str) -> Option<String> {
    let (status, body) = conn
        .post_json("/v1/admit", &json!({"key": key, "lease_ttl_seconds": 3600}))
        .await
        .ok()?;
    let v: Value = serde_json::from_slice(&body).ok()?;
    (status.as_u16() == 200)
        .then(|| v["lease_id"].as_str().map(str::to_string))
        .flatten()
}

/// Admissions at `rate` per second for `secs` seconds, on 8 connections; their latencies (µs).
async fn probe(data: &Endpoint, keys: &[String], rate: u64, secs: u64) -> Histogram<u64> {
    let workers = 8u64;
    let per_worker = Duration::from_secs_f64(workers as f64 / rate as f64);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (data, keys) = (data.clone(), keys.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::new(data, None);
            let mut hist = Histogram::<u64>::new(3).unwrap_or_else(|e| fail("histogram", e));
            let mut tick = tokio::time::interval(per_worker);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let end = Instant::now() + Duration::from_secs(secs);
            let mut i = w as usize;
            while Instant::now() < end {
                tick.tick().await;
                let started = Instant::now();
                let key = &keys[i % keys.len()];
                let (status, _) = conn
                    .post_json("/v1/admit", &json!({"key": key, "lease": "none"}))
                    .await
                    .unwrap_or_else(|e| fail("probe admission", e));
                if status.as_u16() != 200 {
                    fail("probe admission", status);
                }
                let _ = hist.record(started.elapsed().as_micros() as u64);
                i += workers as usize;
            }
            hist
        }));
    }
    let mut all = Histogram::<u64>::new(3).unwrap_or_else(|e| fail("histogram", e));
    for t in tasks {
        let h = t.await.unwrap_or_else(|e| fail("probe", e));
        let _ = all.add(h);
    }
    all
}

async fn settled(admin: &mut Conn) -> u64 {
    let (_, body) = admin
        .get("/metrics")
        .await
        .unwrap_or_else(|e| fail("metrics", e));
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with("tollgate_access_log_records_total{") && l.contains("settled"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn record(lease: &str) -> String {
    format!(
        r#"{{"lease_id":"{lease}","status":"200","cost_usd":"0.000123","input_tokens":"100","output_tokens":"20"}}"#
    )
}

async fn send_records(transport: Transport, to: SocketAddr, leases: Vec<String>, udp_rate: u64) {
    match transport {
        Transport::Tcp => {
            let stream = tokio::net::TcpStream::connect(to)
                .await
                .unwrap_or_else(|e| fail("connect to the receiver", e));
            let mut w = tokio::io::BufWriter::new(stream);
            for l in &leases {
                let line = record(l) + "\n";
                w.write_all(line.as_bytes())
                    .await
                    .unwrap_or_else(|e| fail("send", e));
            }
            w.flush().await.unwrap_or_else(|e| fail("send", e));
            // Keep the connection until the receiver read everything.
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        Transport::Udp => {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .unwrap_or_else(|e| fail("udp", e));
            let batch = (udp_rate / 100).max(1) as usize;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for chunk in leases.chunks(batch) {
                tick.tick().await;
                for l in chunk {
                    let dgram = format!("<190>Nov 27 09:00:00 tollgate: {}", record(l));
                    let _ = socket.send_to(dgram.as_bytes(), to).await;
                }
            }
        }
    }
}

fn line(name: &str, h: &Histogram<u64>) {
    println!(
        "{name:<28} n={:<7} p50={:>6} µs  p99={:>6} µs  p99.9={:>6} µs  max={:>6} µs",
        h.len(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let data = Endpoint::parse(&args.data).unwrap_or_else(|e| fail("--data", e));
    let admin_ep = Endpoint::parse(&args.admin).unwrap_or_else(|e| fail("--admin", e));
    let mut admin = Conn::new(admin_ep, Some(&args.admin_token));
    let mut keys = Vec::new();
    for i in 0..100 {
        keys.push(create_key(&mut admin, i).await);
    }

    let idle = probe(&data, &keys, args.admit_rate, args.seconds).await;

    eprintln!("reports: taking {} leases", args.leases);
    let mut takers = Vec::new();
    for w in 0..16 {
        let (data, keys, n) = (data.clone(), keys.clone(), args.leases);
        takers.push(tokio::spawn(async move {
            let mut conn = Conn::new(data, None);
            let mut out = Vec::new();
            let mut i = w;
            while i < n {
                let lease = admit(&mut conn, &keys[i % keys.len()])
                    .await
                    .unwrap_or_else(|| fail("take a lease", "refused"));
                out.push(lease);
                i += 16;
            }
            out
        }));
    }
    let mut leases = Vec::new();
    for t in takers {
        leases.extend(t.await.unwrap_or_else(|e| fail("take leases", e)));
    }
    let before = settled(&mut admin).await;
    let n = leases.len() as u64;

    let started = Instant::now();
    let sender = tokio::spawn(send_records(
        args.transport,
        args.receiver,
        leases,
        args.udp_rate,
    ));
    let busy = tokio::spawn({
        let (data, keys) = (data.clone(), keys.clone());
        async move { probe(&data, &keys, args.admit_rate, args.seconds).await }
    });
    let mut done_at = None;
    let deadline = started + Duration::from_secs(120);
    while Instant::now() < deadline {
        if settled(&mut admin).await - before >= n {
            done_at = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let busy = busy.await.unwrap_or_else(|e| fail("probe", e));
    sender.abort();
    let got = settled(&mut admin).await - before;

    println!("transport                    {:?}", args.transport);
    match done_at {
        Some(t) => println!(
            "records settled              {n} in {:.2} s = {:.0} records/s",
            t.as_secs_f64(),
            n as f64 / t.as_secs_f64()
        ),
        None => println!("records settled              {got} of {n} within 120 s"),
    }
    line("admit, receiver idle", &idle);
    line("admit, receiver busy", &busy);
}
