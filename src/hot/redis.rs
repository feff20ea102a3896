//! The hot path's Redis connection and its failure taxonomy.
//!
//! Admission and settlement share one multiplexed connection (single node: an auto-reconnecting
//! `ConnectionManager`; cluster: a `ClusterConnection`), which pipelines every concurrent
//! request over one socket. A checkout pool would add nothing here and cost a round trip:
//! deadpool recycles each checkout with `PING`. The syncer opens a second handle of its own,
//! so its large stream replies never queue in front of admission replies.
//!
//! Every call is bounded by `TOLLGATE_REDIS_TIMEOUT_MS`, connecting included: while Redis is
//! unreachable, each call fails within that deadline and the next call tries again, so service
//! resumes by itself when Redis is back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::io::tcp::TcpSettings;
use redis::{Cmd, ErrorKind, IntoConnectionInfo, RedisError, ServerErrorKind, Value};
use tokio::sync::Notify;

/// Why a Redis call failed, split the way an operator acts on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisFailure {
    /// No answer within the deadline.
    #[error("redis did not answer in time")]
    Timeout,
    /// Cannot reach Redis, or the connection broke: transient, retry later.
    #[error("redis connection failed")]
    Connection,
    /// Redis answered with an error (a script bug, wrong type, cluster misconfiguration):
    /// retrying the same call will not help.
    #[error("redis refused the command: {0}")]
    Command(String),
    /// A script refused the call before writing anything, with the first word of its error
    /// reply (`LIMIT_EXCEEDED`, `INVALID_ARGUMENT`, `CORRUPT_STATE`; see lua/settle.lua): an
    /// answer about the call, not a failure of Redis.
    #[error("script refused the call: {code}: {detail}")]
    Refused { code: &'static str, detail: String },
}

/// The refusals the scripts answer with (see [`RedisFailure::Refused`]).
const REFUSALS: [&str; 3] = ["LIMIT_EXCEEDED", "INVALID_ARGUMENT", "CORRUPT_STATE"];

impl RedisFailure {
    /// Label of `tollgate_redis_errors_total{kind}`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            RedisFailure::Timeout => "timeout",
            RedisFailure::Connection => "connection",
            RedisFailure::Command(_) => "command",
            RedisFailure::Refused { .. } => "refused",
        }
    }

    /// True when Redis could not be reached at all (what fail-open mode is for).
    pub(crate) fn is_transient(&self) -> bool {
        !matches!(
            self,
            RedisFailure::Command(_) | RedisFailure::Refused { .. }
        )
    }
}

impl From<RedisError> for RedisFailure {
    fn from(e: RedisError) -> Self {
        if e.is_timeout() {
            RedisFailure::Timeout
        } else if e.is_io_error()
            || e.is_connection_refusal()
            || e.is_connection_dropped()
            || matches!(
                e.kind(),
                ErrorKind::Io
                    | ErrorKind::ClusterConnectionNotFound
                    | ErrorKind::Server(ServerErrorKind::BusyLoading)
                    | ErrorKind::Server(ServerErrorKind::TryAgain)
                    | ErrorKind::Server(ServerErrorKind::ClusterDown)
                    | ErrorKind::Server(ServerErrorKind::MasterDown)
            )
        {
            RedisFailure::Connection
        } else if let Some(code) = REFUSALS.iter().find(|c| e.code() == Some(**c)) {
            RedisFailure::Refused {
                code,
                detail: e.detail().unwrap_or_default().to_string(),
            }
        } else {
            // The server's own words identify the problem; they never contain key material
            // because tollgate only sends hashes.
            RedisFailure::Command(e.code().unwrap_or("error").to_string())
        }
    }
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Shared handle to Redis for the hot path.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

struct Inner {
    urls: Vec<String>,
    timeout: Duration,
    conn: RwLock<Option<Conn>>,
    /// True while a background task is connecting to the cluster.
    connecting: AtomicBool,
    /// Wakes the callers waiting for that task, whether it succeeded or not.
    attempt_done: Notify,
    /// Why the last cluster connection attempt failed.
    last_failure: Mutex<Option<RedisFailure>>,
}

/// Ends a cluster connection attempt even when its task is cancelled (runtime shutdown), so
/// a later call can start another one.
struct Attempt(Arc<Inner>);

impl Drop for Attempt {
    fn drop(&mut self) {
        self.0.connecting.store(false, Ordering::Release);
        self.0.attempt_done.notify_waiters();
    }
}

impl Redis {
    /// Does not connect: the first call does, so tollgate starts (and can fail open) while
    /// Redis is still down.
    pub fn new(urls: Vec<String>, timeout: Duration) -> Self {
        Redis {
            inner: Arc::new(Inner {
                urls,
                timeout,
                conn: RwLock::new(None),
                connecting: AtomicBool::new(false),
                attempt_done: Notify::new(),
                last_failure: Mutex::new(None),
            }),
        }
    }

    pub(crate) fn is_cluster(&self) -> bool {
        self.inner.urls.len() > 1
    }

    fn current(&self) -> Option<Conn> {
        self.inner.conn.read().ok().and_then(|g| g.clone())
    }

    /// The shared connection. Callers bound this with their own deadline.
    async fn connection(&self) -> Result<Conn, RedisFailure> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        if !self.is_cluster() {
            return self.single();
        }
        // Learning the slot map takes several round trips and may outlast one call's deadline.
        // It runs in its own task, started by the first caller; every caller waits for it only
        // as long as its own deadline allows. Callers that queued behind each other's attempts
        // instead would each wait for all the attempts before theirs while the cluster is
        // unreachable.
        let done = self.inner.attempt_done.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        if let Some(c) = self.current() {
            return Ok(c);
        }
        if !self.inner.connecting.swap(true, Ordering::AcqRel) {
            let attempt = Attempt(self.inner.clone());
            tokio::spawn(connect_cluster(attempt));
        }
        done.await;
        self.current().ok_or_else(|| {
            self.inner
                .last_failure
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .unwrap_or(RedisFailure::Connection)
        })
    }

    /// A single node: the connection manager connects lazily and reconnects by itself.
    fn single(&self) -> Result<Conn, RedisFailure> {
        let mut slot = self
            .inner
            .conn
            .write()
            .map_err(|_| RedisFailure::Connection)?;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let timeout = self.inner.timeout;
        let info = self.inner.urls[0]
            .as_str()
            .into_connection_info()?
            .set_tcp_settings(tcp_settings());
        let client = redis::Client::open(info)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = Conn::Single(ConnectionManager::new_lazy_with_config(client, config)?);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Sends one command, bounded by the configured deadline (connecting included).
    pub async fn query(&self, cmd: &Cmd) -> Result<Value, RedisFailure> {
        let call = async {
            let value = match self.connection().await? {
                Conn::Single(mut c) => c.req_packed_command(cmd).await?,
                Conn::Cluster(mut c) => c.req_packed_command(cmd).await?,
            };
            match value {
                Value::ServerError(e) => Err(RedisError::from(e).into()),
                v => Ok(v),
            }
        };
        tokio::time::timeout(self.inner.timeout, call)
            .await
            .unwrap_or(Err(RedisFailure::Timeout))
    }
}

/// `TCP_NODELAY`, which redis-rs leaves off: with Nagle's algorithm on, a command written while
/// an earlier one is unanswered waits in the kernel for that answer, so on a multiplexed
/// connection every admission queued behind another pays an extra Redis round trip.
fn tcp_settings() -> TcpSettings {
    TcpSettings::default().set_nodelay(true)
}

/// One attempt to connect to the cluster; stores the connection, or why there is none.
async fn connect_cluster(attempt: Attempt) {
    let inner = &attempt.0;
    let timeout = inner.timeout;
    let result = async {
        let client = ClusterClientBuilder::new(inner.urls.clone())
            .tcp_settings(tcp_settings())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(1)
            .build()?;
        tokio::time::timeout(timeout * 4, client.get_async_connection())
            .await
            .map_err(|_| RedisFailure::Timeout)?
            .map_err(RedisFailure::from)
    }
    .await;
    match result {
        Ok(c) => {
            if let Ok(mut slot) = inner.conn.write() {
                *slot = Some(Conn::Cluster(c));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot connect to the redis cluster");
            if let Ok(mut f) = inner.last_failure.lock() {
                *f = Some(e);
            }
        }
    }
    // Dropping `attempt` wakes the waiters.
}
