//! The access-log receiver alone, against a real tollgate process (so its metrics and memory
//! are its own): syslog datagrams of both RFCs, TCP lines however they are split, what each
//! record does to its lease, and what floods, garbage, an endless line and idle connections
//! cannot do to the receiver or to admissions.

use crate::common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::process::{cleanup_state, TollgateProcess};
use common::*;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};

const RECORDS: &str = "tollgate_access_log_records_total";

/// A tollgate process with its receiver on; its database and namespace go with it.
struct Receiving {
    tg: TollgateProcess,
    settings: HashMap<&'static str, String>,
    db: PgPool,
}

impl Receiving {
    async fn start() -> Receiving {
        require_services().await;
        let mut settings = base_settings();
        settings.insert("TOLLGATE_ACCESS_LOG_LISTEN", "127.0.0.1:0".into());
        let tg = TollgateProcess::start(&settings).await;
        let db = PgPool::connect(&settings["TOLLGATE_DATABASE_URL"])
            .await
            .expect("test database");
        Receiving { tg, settings, db }
    }

    fn addr(&self) -> SocketAddr {
        self.tg.access_log.expect("the receiver's address")
    }

    async fn datagram(&self, payload: &str) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("udp socket");
        socket
            .send_to(payload.as_bytes(), self.addr())
            .await
            .expect("send datagram");
    }

    async fn count(&self, result: &str) -> u64 {
        self.tg
            .metric_sum(RECORDS, Some(&format!("result=\"{result}\"")))
            .await as u64
    }

    /// Waits up to `bound` until the `result` count reaches `want`; returns the count.
    async fn await_count(&self, result: &str, want: u64, bound: Duration) -> u64 {
        let deadline = Instant::now() + bound;
        loop {
            let n = self.count(result).await;
            if n >= want || Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn lease(&self, key: &str) -> String {
        let (status, body) = self.tg.admit(key, json!({})).await;
        assert_eq!(status, 200, "admit: {body}");
        body["lease_id"].as_str().expect("lease id").to_string()
    }

    async fn in_flight(&self, key: &str) -> u64 {
        let (status, body) = self.tg.admit(key, json!({"lease": "none"})).await;
        assert_eq!(status, 200, "{body}");
        body["concurrency"]["in_flight"]
            .as_u64()
            .expect("in_flight")
    }

    /// `(cost_nanos, input, output, status)` of every usage event of `key_id`, once `n` exist.
    async fn events(&self, key_id: &str, n: usize) -> Vec<(i64, i64, i64, Option<i32>)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let rows: Vec<(i64, i64, i64, Option<i32>)> = sqlx::query_as(
                "SELECT cost_nanos, input_tokens, output_tokens, status_code \
                 FROM usage_events WHERE key_id = $1::uuid ORDER BY cost_nanos",
            )
            .bind(key_id)
            .fetch_all(&self.db)
            .await
            .expect("usage events");
            if rows.len() >= n || Instant::now() >= deadline {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.tg.pid))
            .expect("process status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.tg.pid))
            .map(|d| d.count())
            .expect("fd list")
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.tg.kill9();
        cleanup_state(&self.settings);
    }
}

fn flat(lease: &str, fields: Value) -> String {
    let mut record = json!({ "lease_id": lease });
    if let (Some(r), Some(f)) = (record.as_object_mut(), fields.as_object()) {
        r.extend(f.clone());
    }
    record.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_datagrams_of_either_rfc_settle_or_release_their_leases_once() {
    let r = Receiving::start().await;
    let (key, api_key) =
        r.tg.create_key(
            json!({"user_id": "u-udp", "is_standalone": true, "initial_balance_usd": 10,
            "rate_limit": null, "concurrent_limit": 3}),
        )
        .await;
    let key_id = api_key["id"].as_str().expect("id");
    let (a, b, c) = (
        r.lease(&key).await,
        r.lease(&key).await,
        r.lease(&key).await,
    );

    // RFC 3164 as nginx sends it, every number a string, "-" and "" meaning absent.
    let sent = Instant::now();
    r.datagram(&format!(
        "<190>Nov 27 09:00:00 tollgate: {}",
        flat(
            &a,
            json!({"status": "200", "cost_usd": "0.25", "input_tokens": "120",
                "output_tokens": "380", "cached_input_tokens": "-", "response_time_ms": ""})
        )
    ))
    .await;
    // RFC 5424 as HAProxy sends it, with structured data, numbers as numbers.
    r.datagram(&format!(
        "<134>1 2026-11-27T09:00:00.123Z gw haproxy 77 - [meta@1 k=\"{{v]\"] {}",
        flat(
            &b,
            json!({"status": 201, "cost_usd": 0.000000001, "output_tokens": 5})
        )
    ))
    .await;
    // The client left before an answer: released, nothing charged.
    r.datagram(&format!(
        "<190>Nov 27 09:00:00 tollgate: {}",
        flat(&c, json!({"status": "499", "cost_usd": "3"}))
    ))
    .await;
    assert_eq!(r.await_count("settled", 2, Duration::from_secs(2)).await, 2);
    assert_eq!(
        r.await_count("released", 1, Duration::from_secs(2)).await,
        1
    );
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "records took {:?} to take effect",
        sent.elapsed()
    );
    assert_eq!(r.in_flight(&key).await, 0, "every slot is free");

    // Named again: duplicates, nothing changes. A settle record for the released lease too.
    for lease in [&a, &b, &c] {
        r.datagram(&format!(
            "<190>Nov 27 09:00:00 tollgate: {}",
            flat(lease, json!({"status": "200", "cost_usd": "1"}))
        ))
        .await;
    }
    assert_eq!(
        r.await_count("duplicate", 3, Duration::from_secs(2)).await,
        3
    );
    let events = r.events(key_id, 2).await;
    assert_eq!(
        events,
        vec![(1, 0, 5, Some(201)), (250_000_000, 120, 380, Some(200))],
        "exactly the two settled requests, once each"
    );
    let k: Value =
        r.tg.admin_get(&format!("/admin/keys/{key_id}"))
            .await
            .json()
            .await
            .expect("key");
    assert_eq!(k["balance_used_usd"], json!(0.250000001), "{k}");

    // Unknown leases, no lease, garbage: counted, dropped.
    let unknown = format!("{}.AAAAAAAAAAAAAAAAAAAAAA", "0".repeat(32));
    for raw in [
        flat(&unknown, json!({"status": 200})),
        flat("not-a-lease", json!({"status": 200})),
        json!({"status": 200}).to_string(),
    ] {
        r.datagram(&raw).await;
    }
    r.datagram("<13>Nov 27 09:00:00 host app: not json at all")
        .await;
    r.datagram(&flat(&a, json!({"status": "two hundred"})))
        .await;
    assert_eq!(
        r.await_count("lease_unknown", 3, Duration::from_secs(2))
            .await,
        3
    );
    assert_eq!(
        r.await_count("malformed", 2, Duration::from_secs(2)).await,
        2
    );
    assert_eq!(r.count("settled").await, 2, "nothing more was settled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_lines_are_read_whole_however_the_stream_splits_them() {
    let r = Receiving::start().await;
    let (key, api_key) =
        r.tg.create_key(json!({"user_id": "u-tcp", "rate_limit": null, "concurrent_limit": null}))
            .await;
    let key_id = api_key["id"].as_str().expect("id");
    let leases = [
        r.lease(&key).await,
        r.lease(&key).await,
        r.lease(&key).await,
    ];
    let lines: Vec<String> = leases
        .iter()
        .enumerate()
        .map(|(i, l)| {
            flat(
                l,
                json!({"status": 200, "cost_usd": format!("0.00{}", i + 1)}),
            ) + "\n"
        })
        .collect();
    let mut stream = TcpStream::connect(r.addr()).await.expect("connect");
    // The first line in three packets, split mid-field; the other two in one write, with a
    // syslog header on the second.
    let first = lines[0].as_bytes();
    for part in [&first[..7], &first[7..30], &first[30..]] {
        stream.write_all(part).await.expect("write");
        stream.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let rest = format!("<190>Nov 27 09:00:00 caddy: {}{}", lines[1], lines[2]);
    stream.write_all(rest.as_bytes()).await.expect("write");
    stream.flush().await.expect("flush");
    assert_eq!(r.await_count("settled", 3, Duration::from_secs(2)).await, 3);
    let costs: Vec<i64> = r.events(key_id, 3).await.iter().map(|e| e.0).collect();
    assert_eq!(costs, vec![1_000_000, 2_000_000, 3_000_000]);
    assert_eq!(r.count("malformed").await, 0);

    // Tokens and no cost: priced at the admission's model (built-in openai/gpt-4o, 2.5 and
    // 10 $/Mtok): 1,000 in + 100 out = 0.0035 USD.
    let (status, body) =
        r.tg.admit(&key, json!({"provider": "openai", "model": "gpt-4o"}))
            .await;
    assert_eq!(status, 200, "{body}");
    let lease = body["lease_id"].as_str().expect("lease");
    let line = flat(
        lease,
        json!({"status": "200", "input_tokens": "1000", "output_tokens": "100"}),
    );
    stream
        .write_all(format!("{line}\n").as_bytes())
        .await
        .expect("write");
    assert_eq!(r.await_count("settled", 4, Duration::from_secs(2)).await, 4);
    let costs: Vec<i64> = r.events(key_id, 4).await.iter().map(|e| e.0).collect();
    assert_eq!(costs, vec![1_000_000, 2_000_000, 3_000_000, 3_500_000]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_garbage_an_endless_line_and_idle_connections_leave_it_serving() {
    let r = Receiving::start().await;
    let (key, _) = r
        .tg
        .create_key(json!({"user_id": "u-flood", "rate_limit": null, "concurrent_limit": null}))
        .await;
    // Warm up, then measure where memory stands.
    for _ in 0..20 {
        r.lease(&key).await;
    }
    let rss_before = r.rss_kib();

    // 10,000 garbage datagrams, paced by what the receiver has counted so none is dropped by
    // the kernel: the metric must count every one.
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
    let garbage = [
        "{not json",
        "<13>\u{0}\u{1}",
        "[]",
        "{\"lease_id\":[7]}",
        "xyzzy",
    ];
    for batch in 0..50u64 {
        for i in 0..200 {
            let g = garbage[i % garbage.len()];
            socket.send_to(g.as_bytes(), r.addr()).await.expect("send");
        }
        let want = (batch + 1) * 200;
        let got = r
            .await_count("malformed", want, Duration::from_secs(5))
            .await;
        assert_eq!(got, want, "malformed records counted after batch {batch}");
    }

    // A 10 MB line without a newline, then a good record on the same connection.
    let lease = r.lease(&key).await;
    let mut endless = TcpStream::connect(r.addr()).await.expect("connect");
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..160 {
        endless.write_all(&chunk).await.expect("write 10 MB");
    }
    assert_eq!(
        r.await_count("malformed", 10_001, Duration::from_secs(5))
            .await,
        10_001,
        "the endless line counts once"
    );
    endless
        .write_all(format!("\n{}\n", flat(&lease, json!({"status": 200}))).as_bytes())
        .await
        .expect("write after the endless line");
    assert_eq!(r.await_count("settled", 1, Duration::from_secs(2)).await, 1);

    // 1,000 idle connections: at most MAX_CONNECTIONS are kept, a live sender still gets in.
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect(r.addr()).await.expect("idle connection"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds = r.open_fds();
    assert!(
        fds < tollgate::access_log::MAX_CONNECTIONS + 150,
        "the process holds {fds} descriptors with 1,000 idle clients"
    );
    let lease = r.lease(&key).await;
    let mut live = TcpStream::connect(r.addr()).await.expect("connect");
    live.write_all(format!("{}\n", flat(&lease, json!({"status": 200}))).as_bytes())
        .await
        .expect("write");
    assert_eq!(r.await_count("settled", 2, Duration::from_secs(2)).await, 2);

    // Admissions answer as before, and memory did not follow the flood.
    let mut slowest = Duration::ZERO;
    for _ in 0..100 {
        let t = Instant::now();
        r.lease(&key).await;
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(1),
        "an admission took {slowest:?} with the receiver flooded"
    );
    let grown = r.rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 64 * 1024,
        "RSS grew by {grown} KiB through the flood"
    );
    drop(idle);
}
