//! The hot path's Redis connection and its failure taxonomy.
//!
//! Admission and settlement share one multiplexed connection (single node: an auto-reconnecting
//! `ConnectionManager`; cluster: a `ClusterConnection`), which pipelines every concurrent
//! request over one socket. A checkout pool would add nothing here and cost a round trip:
//! deadpool recycles each checkout with `PING`. Background work that blocks (stream reads)
//! uses its own pooled connections instead (see `sync`), so it can never stall admissions.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, ServerErrorKind, Value};

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
}

impl RedisFailure {
    /// Label of `tollgate_redis_errors_total{kind}`.
    pub fn kind(&self) -> &'static str {
        match self {
            RedisFailure::Timeout => "timeout",
            RedisFailure::Connection => "connection",
            RedisFailure::Command(_) => "command",
        }
    }

    /// True when Redis could not be reached at all (what fail-open mode is for).
    pub fn is_transient(&self) -> bool {
        !matches!(self, RedisFailure::Command(_))
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
    connecting: tokio::sync::Mutex<()>,
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
                connecting: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn is_cluster(&self) -> bool {
        self.inner.urls.len() > 1
    }

    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    fn current(&self) -> Option<Conn> {
        self.inner.conn.read().ok().and_then(|g| g.clone())
    }

    async fn connection(&self) -> Result<Conn, RedisFailure> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _guard = self.inner.connecting.lock().await;
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let timeout = self.inner.timeout;
        let conn = if self.is_cluster() {
            let client = ClusterClientBuilder::new(self.inner.urls.clone())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(1)
                .build()?;
            let c = tokio::time::timeout(timeout * 4, client.get_async_connection())
                .await
                .map_err(|_| RedisFailure::Timeout)??;
            Conn::Cluster(c)
        } else {
            let client = redis::Client::open(self.inner.urls[0].as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            Conn::Single(ConnectionManager::new_lazy_with_config(client, config)?)
        };
        if let Ok(mut slot) = self.inner.conn.write() {
            *slot = Some(conn.clone());
        }
        Ok(conn)
    }

    /// Sends one command, bounded by the configured deadline.
    pub async fn query(&self, cmd: &Cmd) -> Result<Value, RedisFailure> {
        let conn = self.connection().await?;
        let fut = async move {
            match conn {
                Conn::Single(mut c) => c.req_packed_command(cmd).await,
                Conn::Cluster(mut c) => c.req_packed_command(cmd).await,
            }
        };
        match tokio::time::timeout(self.inner.timeout, fut).await {
            Ok(Ok(Value::ServerError(e))) => Err(RedisError::from(e).into()),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(RedisFailure::Timeout),
        }
    }

    /// Sends a pipeline (one round trip), bounded by the configured deadline.
    pub async fn pipeline(&self, pipe: &Pipeline) -> Result<Vec<Value>, RedisFailure> {
        let conn = self.connection().await?;
        let n = pipe.len();
        let fut = async move {
            match conn {
                Conn::Single(mut c) => c.req_packed_commands(pipe, 0, n).await,
                Conn::Cluster(mut c) => c.req_packed_commands(pipe, 0, n).await,
            }
        };
        let values = match tokio::time::timeout(self.inner.timeout, fut).await {
            Ok(r) => r?,
            Err(_) => return Err(RedisFailure::Timeout),
        };
        for v in &values {
            if let Value::ServerError(e) = v {
                return Err(RedisError::from(e.clone()).into());
            }
        }
        Ok(values)
    }
}
