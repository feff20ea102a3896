//! Where proxies report the end of a request: a receiver for their access logs that turns each
//! record into a settlement or a release of the lease the request was admitted with.
//!
//! A reverse proxy that only makes an auth subrequest cannot call `/v1/settle`, but it can log
//! every request it finished, and nginx, HAProxy and Caddy can send that log over the network.
//! The receiver listens on `TOLLGATE_ACCESS_LOG_LISTEN` for UDP syslog datagrams and for TCP
//! streams of newline-delimited JSON, on one port. Each record runs the same scripts as
//! `/v1/settle` and `/v1/release` (so it is idempotent and its usage reaches Postgres once),
//! on a Redis connection of its own (`Gate::settle_reported`), so a burst of reports never
//! queues in front of admissions.
//!
//! Nothing a sender does can exhaust the process: a line is at most [`MAX_LINE`] bytes (a
//! longer one is skipped to its newline without being kept), at most [`MAX_CONNECTIONS`] TCP
//! connections are kept (a new one closes the one idle longest, so a flood of idle or half-open
//! clients cannot lock out a live proxy), a connection silent for [`IDLE`] is closed, and at most
//! [`IN_FLIGHT`] records are being applied at once: beyond that the receiver stops reading, so
//! TCP senders wait and the kernel drops surplus datagrams (records are not acknowledged; a lost
//! one leaves its lease to its TTL and never charges twice).

mod record;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Notify, Semaphore};

use record::{Dropped, Report, Settlement};

use crate::gate::RedisFailure;
use crate::gate::{ReleaseOutcome, SettleArgs, SettleOutcome};
use crate::http::AppState;

/// Longest record accepted, in bytes. A Caddy access-log line with every request and response
/// header is a few KiB; this leaves room for large cookies and long URLs.
pub(crate) const MAX_LINE: usize = 64 * 1024;
/// TCP connections kept open at once.
pub const MAX_CONNECTIONS: usize = 256;
/// A TCP connection that sends nothing for this long is closed. Longer than any quiet spell of
/// a live proxy's log connection is worth keeping a slot for; the proxy reconnects on its next
/// record.
pub(crate) const IDLE: Duration = Duration::from_secs(300);
/// Records being applied at once (each one Redis script).
pub(crate) const IN_FLIGHT: usize = 64;
/// Tries of one record while Redis does not answer, within the contract's one second.
const TRIES: u32 = 3;
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// Pause after a failed accept (out of file descriptors), instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// `result` label of `tollgate_access_log_records_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordResult {
    Settled,
    Released,
    Duplicate,
    LeaseUnknown,
    Malformed,
}

impl RecordResult {
    pub(crate) const ALL: [RecordResult; 5] = [
        RecordResult::Settled,
        RecordResult::Released,
        RecordResult::Duplicate,
        RecordResult::LeaseUnknown,
        RecordResult::Malformed,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RecordResult::Settled => "settled",
            RecordResult::Released => "released",
            RecordResult::Duplicate => "duplicate",
            RecordResult::LeaseUnknown => "lease_unknown",
            RecordResult::Malformed => "malformed",
        }
    }
}

/// The receiver's two sockets, bound to one port.
pub struct Receiver {
    udp: UdpSocket,
    tcp: TcpListener,
}

impl Receiver {
    /// Binds TCP and UDP on `addr`. With port 0 both get the same free port.
    pub async fn bind(addr: SocketAddr) -> io::Result<Receiver> {
        let mut last = None;
        // Port 0: the port TCP got may be taken for UDP; another try gets another port.
        for _ in 0..8 {
            let tcp = TcpListener::bind(addr).await?;
            let bound = tcp.local_addr()?;
            match UdpSocket::bind(bound).await {
                Ok(udp) => return Ok(Receiver { udp, tcp }),
                Err(e) if addr.port() == 0 => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no port free for both TCP and UDP")))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Receives until `stop` turns true. Records already being applied finish on their own.
    pub async fn run(self, state: Arc<AppState>, stop: watch::Receiver<bool>) {
        let sink = Arc::new(Sink {
            state,
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
        });
        let udp = datagrams(self.udp, sink.clone(), stop.clone());
        let tcp = streams(self.tcp, sink, stop);
        tokio::join!(udp, tcp);
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Where records go: parsed on the receiving task, applied on a task of their own.
struct Sink {
    state: Arc<AppState>,
    in_flight: Arc<Semaphore>,
}

impl Sink {
    fn count(&self, result: RecordResult) {
        self.state.metrics.access_log_record(result);
    }

    /// Takes one record. Waits while [`IN_FLIGHT`] records are being applied.
    async fn take(&self, raw: &[u8]) {
        let report = match record::parse(raw) {
            Ok(r) => r,
            Err(Dropped::Malformed) => return self.count(RecordResult::Malformed),
            Err(Dropped::NoLease) => return self.count(RecordResult::LeaseUnknown),
        };
        let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
            return;
        };
        let state = self.state.clone();
        tokio::spawn(async move {
            if let Some(result) = apply(&state, &report).await {
                state.metrics.access_log_record(result);
            }
            drop(permit);
        });
    }
}

/// Applies one report; `None` when Redis could not be reached (the lease is left to its TTL).
async fn apply(state: &AppState, report: &Report) -> Option<RecordResult> {
    for attempt in 1..=TRIES {
        let outcome = match report {
            Report::Settle(s) => settle(state, s).await,
            Report::Release { lease_id } => release(state, lease_id).await,
        };
        match outcome {
            Ok(result) => return Some(result),
            Err(e) => {
                state.metrics.redis_error(e.kind());
                if attempt == TRIES || !e.is_transient() {
                    tracing::warn!(error = %e, "an access-log record could not be applied; its lease is left to expire");
                    return None;
                }
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
    None
}

async fn settle(state: &AppState, s: &Settlement) -> Result<RecordResult, RedisFailure> {
    let outcome = state
        .gate
        .settle_reported(&SettleArgs {
            lease_id: &s.lease_id,
            cost: s.cost,
            input_tokens: s.input_tokens.unwrap_or(0),
            cached_input_tokens: s.cached_input_tokens.unwrap_or(0),
            output_tokens: s.output_tokens.unwrap_or(0),
            total_tokens: s.total_tokens,
            response_time_ms: s.response_time_ms,
            status_code: s.status,
            provider: s.provider.as_deref(),
            api_format: s.api_format.as_deref(),
            model: s.model.as_deref(),
            only_live: true,
        })
        .await?;
    let m = &state.metrics;
    Ok(match outcome {
        SettleOutcome::Unknown => RecordResult::LeaseUnknown,
        // The lease stays live (to its TTL): the record said too little to charge it.
        SettleOutcome::PriceUnknown
        | SettleOutcome::NeedsPrice { .. }
        | SettleOutcome::CostTooLarge => RecordResult::Malformed,
        SettleOutcome::Duplicate { .. } => RecordResult::Duplicate,
        SettleOutcome::Settled { lease_expired, .. } => {
            if lease_expired {
                m.settle_lease_expired.increment(1);
            } else {
                m.settled.increment(1);
            }
            RecordResult::Settled
        }
    })
}

async fn release(state: &AppState, lease_id: &str) -> Result<RecordResult, RedisFailure> {
    Ok(match state.gate.release_reported(lease_id).await? {
        ReleaseOutcome::Released => RecordResult::Released,
        ReleaseOutcome::Ended => RecordResult::Duplicate,
        ReleaseOutcome::Unknown => RecordResult::LeaseUnknown,
    })
}

/// UDP: one record per datagram.
async fn datagrams(socket: UdpSocket, sink: Arc<Sink>, stop: watch::Receiver<bool>) {
    // The largest datagram UDP can carry; a longer record cannot arrive whole anyway.
    let mut buf = vec![0u8; 65_536];
    let stop = stopped(stop);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, _)) => sink.take(&buf[..n]).await,
                // An ICMP error for an earlier datagram, or a full buffer: nothing to act on.
                Err(e) => tracing::debug!(error = %e, "access-log datagram not received"),
            },
        }
    }
}

/// One open TCP connection, as the accept loop sees it.
struct Conn {
    /// Milliseconds since the receiver started, at the connection's last read.
    last_read: AtomicU64,
    close: Notify,
}

/// The open connections, so that the accept loop can close the one idle longest.
struct Conns {
    started: Instant,
    next_id: u64,
    open: HashMap<u64, Arc<Conn>>,
}

impl Conns {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Registers a new connection, closing the longest-idle one when full.
    fn admit(&mut self) -> (u64, Arc<Conn>) {
        if self.open.len() >= MAX_CONNECTIONS {
            let idlest = self
                .open
                .iter()
                .min_by_key(|(_, c)| c.last_read.load(Ordering::Relaxed))
                .map(|(id, _)| *id);
            if let Some(c) = idlest.and_then(|id| self.open.remove(&id)) {
                c.close.notify_one();
            }
        }
        let conn = Arc::new(Conn {
            last_read: AtomicU64::new(self.now_ms()),
            close: Notify::new(),
        });
        self.next_id += 1;
        self.open.insert(self.next_id, conn.clone());
        (self.next_id, conn)
    }
}

/// TCP: newline-delimited records.
async fn streams(listener: TcpListener, sink: Arc<Sink>, stop: watch::Receiver<bool>) {
    let conns = Arc::new(Mutex::new(Conns {
        started: Instant::now(),
        next_id: 0,
        open: HashMap::new(),
    }));
    let stopping = stopped(stop.clone());
    tokio::pin!(stopping);
    loop {
        let accepted = tokio::select! {
            _ = &mut stopping => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "access-log receiver could not accept");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok((id, conn)) = conns.lock().map(|mut c| c.admit()) else {
            return;
        };
        let (sink, conns, stop) = (sink.clone(), conns.clone(), stop.clone());
        tokio::spawn(async move {
            read_lines(stream, &sink, &conn, &conns, stop).await;
            if let Ok(mut c) = conns.lock() {
                c.open.remove(&id);
            }
        });
    }
}

async fn read_lines(
    mut stream: TcpStream,
    sink: &Sink,
    conn: &Conn,
    conns: &Mutex<Conns>,
    stop: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 8192];
    let mut line: Vec<u8> = Vec::new();
    // Inside a line over MAX_LINE: skipped up to its newline.
    let mut skipping = false;
    let stop = stopped(stop);
    tokio::pin!(stop);
    loop {
        let n = tokio::select! {
            _ = &mut stop => return,
            _ = conn.close.notified() => return,
            r = tokio::time::timeout(IDLE, stream.read(&mut buf)) => match r {
                Ok(Ok(n)) => n,
                Ok(Err(_)) | Err(_) => return,
            },
        };
        if n == 0 {
            if !skipping && !line.is_empty() {
                sink.take(&line).await;
            }
            return;
        }
        if let Ok(c) = conns.lock() {
            conn.last_read.store(c.now_ms(), Ordering::Relaxed);
        }
        let mut chunk = &buf[..n];
        while let Some(end) = chunk.iter().position(|b| *b == b'\n') {
            let part = &chunk[..end];
            if skipping {
                skipping = false;
            } else if line.len() + part.len() > MAX_LINE {
                sink.count(RecordResult::Malformed);
            } else if line.is_empty() {
                sink.take(part).await;
            } else {
                line.extend_from_slice(part);
                sink.take(&line).await;
            }
            line.clear();
            chunk = &chunk[end + 1..];
        }
        if skipping {
            continue;
        }
        if line.len() + chunk.len() > MAX_LINE {
            sink.count(RecordResult::Malformed);
            skipping = true;
            line.clear();
        } else {
            line.extend_from_slice(chunk);
        }
    }
}
