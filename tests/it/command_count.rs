//! Exactly one Redis command per admission, settlement and release, counted on the wire.
//!
//! A TCP proxy between tollgate and Redis parses every RESP command the client sends and counts
//! it by name. `INFO commandstats` would not do: it also counts the commands a script runs.
//! tollgate's usage syncer shares the connection: it polls the streams with X* commands and
//! acknowledges with its own script (`lua/ack.lua`, told apart by its SHA); those are allowed
//! during the measured phases, anything else (EVAL, SCRIPT, HGET, PING …) is not.

use crate::common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::hot_suite::{self, with_key, DataPlane};
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Counts = Arc<Mutex<BTreeMap<String, u64>>>;

/// What the usage syncer sends on its own schedule.
const SYNCER_COMMANDS: &[&str] = &[
    "XREADGROUP",
    "XAUTOCLAIM",
    "XLEN",
    "XRANGE",
    "XACK",
    "XDEL",
    "XGROUP",
    ACK,
];

/// How the counter names an `EVALSHA` of the syncer's acknowledgement script.
const ACK: &str = "EVALSHA(ack)";

fn ack_sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| {
        redis::Script::new(include_str!("../../lua/ack.lua"))
            .get_hash()
            .to_string()
    })
}

/// A counting proxy in front of the test Redis.
struct RespCounter {
    url: String,
    counts: Counts,
    accept: tokio::task::JoinHandle<()>,
}

impl RespCounter {
    async fn start() -> Self {
        let upstream = redis_url()
            .trim_start_matches("redis://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind redis proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let counts: Counts = Arc::default();
        let c = counts.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, c) = (upstream.clone(), c.clone());
                tokio::spawn(async move {
                    let _ = relay(client, &upstream, c).await;
                });
            }
        });
        RespCounter {
            url: format!("redis://{addr}"),
            counts,
            accept,
        }
    }

    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts.lock().expect("counts").clone()
    }
}

impl Drop for RespCounter {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay(client: TcpStream, upstream: &str, counts: Counts) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    });
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = cr.read(&mut chunk).await?;
        if n == 0 {
            let _ = sw.shutdown().await;
            return Ok(());
        }
        pending.extend_from_slice(&chunk[..n]);
        // Count every command that is complete before forwarding its last byte, so a command
        // is counted before Redis can answer it (and so before tollgate answers its caller).
        let mut used = 0;
        while let Some((len, name)) = parse_command(&pending[used..]) {
            *counts.lock().expect("counts").entry(name).or_insert(0) += 1;
            used += len;
        }
        pending.drain(..used);
        sw.write_all(&chunk[..n]).await?;
    }
}

/// One complete client command at the start of `buf`: (bytes, upper-case name). Clients send
/// arrays of bulk strings (`*<n>\r\n` then `$<len>\r\n<bytes>\r\n` n times); an inline command
/// is a single line.
fn parse_command(buf: &[u8]) -> Option<(usize, String)> {
    fn line(buf: &[u8], from: usize) -> Option<(&[u8], usize)> {
        let end = buf[from..].windows(2).position(|w| w == b"\r\n")? + from;
        Some((&buf[from..end], end + 2))
    }
    fn number(bytes: &[u8]) -> usize {
        std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("malformed RESP length {bytes:?}"))
    }
    if buf.is_empty() {
        return None;
    }
    if buf[0] != b'*' {
        let (text, next) = line(buf, 0)?;
        let name = String::from_utf8_lossy(text)
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_uppercase();
        return Some((next, format!("inline:{name}")));
    }
    let (header, mut at) = line(buf, 0)?;
    let items = number(&header[1..]);
    let mut name = String::new();
    for i in 0..items {
        let (bulk, next) = line(buf, at)?;
        assert_eq!(bulk.first(), Some(&b'$'), "clients send bulk strings");
        let len = number(&bulk[1..]);
        if buf.len() < next + len + 2 {
            return None;
        }
        if i == 0 {
            name = String::from_utf8_lossy(&buf[next..next + len]).to_uppercase();
        }
        if i == 1 && name == "EVALSHA" && &buf[next..next + len] == ack_sha().as_bytes() {
            name = ACK.to_string();
        }
        at = next + len + 2;
    }
    Some((at, name))
}

/// What was sent between two snapshots, by command name.
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// Asserts that a phase sent exactly `n` EVALSHA and nothing but syncer traffic besides.
#[track_caller]
fn assert_one_evalsha_each(phase: &str, n: u64, sent: &BTreeMap<String, u64>) {
    assert_eq!(
        sent.get("EVALSHA").copied().unwrap_or(0),
        n,
        "{phase}: {n} requests must send {n} EVALSHA; sent {sent:?}"
    );
    // The reconciler checks the namespace's `loaded` marker every 2 s on its own schedule: a
    // phase that lasts a few seconds on a loaded machine sees one or two of those, never one per
    // request.
    let reconciler = sent.get("EXISTS").copied().unwrap_or(0);
    assert!(
        reconciler <= 3,
        "{phase}: {reconciler} EXISTS is more than the reconciler's schedule"
    );
    let other: BTreeMap<_, _> = sent
        .iter()
        .filter(|(k, _)| {
            k.as_str() != "EVALSHA"
                && k.as_str() != "EXISTS"
                && !SYNCER_COMMANDS.contains(&k.as_str())
        })
        .collect();
    assert!(
        other.is_empty(),
        "{phase}: commands beyond one EVALSHA per request: {other:?}"
    );
}

#[test]
fn the_resp_parser_counts_whole_commands_only() {
    let cmd = b"*3\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n0\r\n";
    assert_eq!(parse_command(cmd), Some((cmd.len(), "EVALSHA".into())));
    for cut in 0..cmd.len() {
        assert_eq!(parse_command(&cmd[..cut]), None, "incomplete at {cut}");
    }
    // A bulk string may contain CRLF and '*' without confusing the parser.
    let echo: &[u8] = b"*2\r\n$4\r\nECHO\r\n$6\r\n*1\r\n\r\n\r\n";
    let ping: &[u8] = b"*1\r\n$4\r\nPING\r\n";
    let both = [echo, ping].concat();
    assert_eq!(parse_command(&both), Some((echo.len(), "ECHO".into())));
    assert_eq!(
        parse_command(&both[echo.len()..]),
        Some((ping.len(), "PING".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_redis_command_per_admission_settlement_and_release() {
    const N: usize = 25;
    let proxy = RespCounter::start().await;
    let app = spawn_app_on(proxy.url.clone()).await;
    let dp = DataPlane::of(&app);
    let (key, _) = app
        .create_key(
            json!({"user_id": "u-count", "is_standalone": true, "initial_balance_usd": 100,
                           "rate_limit": null, "concurrent_limit": null}),
        )
        .await;
    let (limited, _) = app
        .create_key(json!({"user_id": "u-count", "rate_limit": 1, "concurrent_limit": null}))
        .await;

    // Warm up: connections made, scripts loaded, the syncer's groups created, one full cycle.
    let l = hot_suite::admit(&app, with_key(&key, json!({})))
        .await
        .lease("warm-up");
    hot_suite::settle(&app, &l, "0.001").await;
    hot_suite::admit(&app, with_key(&limited, json!({})))
        .await
        .lease("warm-up, rate 1");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let warm = proxy.snapshot();
    assert!(
        warm.get("EVALSHA").copied().unwrap_or(0) > 0,
        "the proxy saw tollgate's traffic: {warm:?}"
    );

    // Admissions, half of them concurrent.
    let before = proxy.snapshot();
    let body = with_key(&key, json!({"reserve_usd": amount("0.01"), "model": "m"}));
    let mut leases = Vec::new();
    for _ in 0..N / 2 {
        leases.push(dp.post("/v1/admit", &body).await.lease("admission"));
    }
    let parallel = hot_suite::admit_all_at_once(&app, vec![body.clone(); N - N / 2]).await;
    leases.extend(parallel.iter().map(|a| a.lease("parallel admission")));
    assert_one_evalsha_each("admissions", N as u64, &delta(&before, &proxy.snapshot()));

    // Denied admissions cost the same single command.
    let before = proxy.snapshot();
    for _ in 0..N {
        dp.post("/v1/admit", &with_key(&limited, json!({})))
            .await
            .denied(429, "rate_limited", "over rate 1");
    }
    assert_one_evalsha_each(
        "denied admissions",
        N as u64,
        &delta(&before, &proxy.snapshot()),
    );

    // Settlements (and a duplicate each).
    let before = proxy.snapshot();
    let settles: Vec<Value> = leases
        .iter()
        .map(|l| json!({"lease_id": l, "cost_usd": amount("0.002"), "input_tokens": 10, "output_tokens": 5}))
        .collect();
    let answers: Vec<Answer> =
        hot_suite::post_in_batches(&app, "/v1/settle", settles.clone(), 8).await;
    for a in &answers {
        assert_eq!(
            (a.status, &a.body["duplicate"]),
            (200, &json!(false)),
            "{}",
            a.body
        );
    }
    assert_one_evalsha_each("settlements", N as u64, &delta(&before, &proxy.snapshot()));
    let before = proxy.snapshot();
    for a in hot_suite::post_in_batches(&app, "/v1/settle", settles, 8).await {
        assert_eq!(
            (a.status, &a.body["duplicate"]),
            (200, &json!(true)),
            "{}",
            a.body
        );
    }
    assert_one_evalsha_each(
        "duplicate settlements",
        N as u64,
        &delta(&before, &proxy.snapshot()),
    );

    // Releases.
    let mut fresh = Vec::new();
    for _ in 0..N {
        fresh.push(
            dp.post("/v1/admit", &body)
                .await
                .lease("admission to release"),
        );
    }
    let before = proxy.snapshot();
    for l in &fresh {
        let r = hot_suite::release(&app, l).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_one_evalsha_each("releases", N as u64, &delta(&before, &proxy.snapshot()));
}
