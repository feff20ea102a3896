//! Wiring: pools, scripts, the gate, the background tasks and both listeners.
//!
//! [`App::build`] does everything that can fail at start-up (bind, the pools' settings) and
//! reports it as one [`StartError`] line; it never waits for Postgres, which `startup` brings
//! up in the background while the listeners already serve from Redis. [`App::run`] serves
//! until the shutdown future resolves, then drains: listeners stop accepting, in-flight
//! requests finish, the syncer flushes what is already in the streams, all within
//! [`SHUTDOWN_BOUND`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::access_log::Receiver;
use crate::config::Config;
use crate::gate::Gate;
use crate::hot::admission::{HotPath, StateFormat};
use crate::hot::layout::Layout;
use crate::hot::redis::Redis;
use crate::http::{self, serve, AppState};
use crate::key_state::KeyState;
use crate::metrics::{self, Metrics};
use crate::store;
use crate::sync;

/// Longest a graceful shutdown may take before tollgate exits anyway.
pub const SHUTDOWN_BOUND: Duration = Duration::from_secs(20);
/// Part of the bound given to the syncer's final flush.
const SYNC_DRAIN: Duration = Duration::from_secs(5);
/// Headroom for the tasks to notice the stop and return after their own bounds.
const SHUTDOWN_SLACK: Duration = Duration::from_secs(1);
/// How long `tollgate migrate` waits for Postgres to accept connections.
const DB_START_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Database(String),
    #[error("serving failed: {0}")]
    Serve(std::io::Error),
}

async fn database(config: &Config) -> Result<PgPool, StartError> {
    let url = config.database_url.expose();
    let deadline = tokio::time::Instant::now() + DB_START_WAIT;
    loop {
        let attempt = async {
            store::ensure_database(url).await?;
            let pool = store::connect(url).await?;
            store::migrate(&pool).await?;
            Ok::<_, store::StoreError>(pool)
        }
        .await;
        match attempt {
            Ok(pool) => return Ok(pool),
            Err(e @ store::StoreError::Unavailable(_))
                if tokio::time::Instant::now() < deadline =>
            {
                tracing::warn!(error = %e, "waiting for postgres");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                let detail = std::error::Error::source(&e)
                    .map(|s| format!("{e}: {s}"))
                    .unwrap_or_else(|| e.to_string());
                return Err(StartError::Database(detail));
            }
        }
    }
}

/// `tollgate migrate`.
pub async fn migrate(config: &Config) -> Result<(), StartError> {
    database(config).await.map(drop)
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tollgate".to_string())
}

/// The usage syncer's thread (see [`spawn_syncer`]).
pub const SYNC_THREAD: &str = "tollgate-sync";

/// Runs the syncer on a thread of its own, with a single-threaded runtime, so that a pass
/// (parsing hundreds of stream entries, building the insert) never holds a worker with
/// admissions queued on it: the kernel, which can preempt, shares the CPU between them. On
/// this thread the admission tail is about as with the sync in a separate process, and lower
/// than with it on the serving runtime (docs/PERFORMANCE.md, "Load test"). The handle
/// resolves when the syncer is done. Should the OS
/// refuse a thread or a runtime, the syncer runs on the serving one.
fn spawn_syncer(syncer: sync::usage::Syncer, stop: watch::Receiver<bool>) -> JoinHandle<()> {
    let serving = tokio::runtime::Handle::current();
    // The work is handed over only once the thread exists, so that it can still run here if
    // the thread cannot be had.
    let (work_tx, work_rx) = std::sync::mpsc::channel::<(sync::usage::Syncer, _)>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(SYNC_THREAD.into())
        .spawn(move || {
            let Ok((syncer, stop)) = work_rx.recv() else {
                return;
            };
            let run = syncer.run(stop, SYNC_DRAIN);
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(own) => own.block_on(run),
                Err(e) => {
                    tracing::warn!(error = %e, "no runtime of its own for the usage sync");
                    serving.block_on(run)
                }
            }
            let _ = done_tx.send(());
        });
    let work = (syncer, stop);
    let (syncer, stop) = match thread {
        Ok(_) => match work_tx.send(work) {
            Ok(()) => {
                return tokio::spawn(async move {
                    let _ = done_rx.await;
                })
            }
            Err(std::sync::mpsc::SendError(work)) => work,
        },
        Err(_) => work,
    };
    tracing::warn!("no thread for the usage sync; it runs on the serving runtime");
    tokio::spawn(syncer.run(stop, SYNC_DRAIN))
}

pub struct App {
    data: TcpListener,
    admin: TcpListener,
    /// The access-log receiver (`TOLLGATE_ACCESS_LOG_LISTEN`); none when unset.
    access_log: Option<Receiver>,
    state: Arc<AppState>,
    /// The usage sync's own connection (`store::connect_usage_sync`); none with the sync off.
    sync_db: Option<PgPool>,
}

impl App {
    pub async fn build(config: Config) -> Result<App, StartError> {
        let prometheus = metrics::install();
        if let Some(n) = serve::raise_fd_limit() {
            tracing::debug!(limit = n, "open-file limit");
        }
        let data = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: config.listen,
                source,
            })?;
        let admin = TcpListener::bind(config.admin_listen)
            .await
            .map_err(|source| StartError::Listen {
                addr: config.admin_listen,
                source,
            })?;
        let access_log = match config.access_log_listen {
            Some(addr) => Some(
                Receiver::bind(addr)
                    .await
                    .map_err(|source| StartError::Listen { addr, source })?,
            ),
            None => None,
        };
        // Lazy pools: nothing here waits for Postgres (`startup::postgres` brings it up).
        let db = store::connect(config.database_url.expose())
            .await
            .map_err(|e| StartError::Database(e.to_string()))?;
        let sync_db = config
            .sync_enabled
            .then(|| store::connect_usage_sync(config.database_url.expose()))
            .transpose()
            .map_err(|e| StartError::Database(e.to_string()))?;
        let redis = Redis::new(config.redis_urls.clone(), config.redis_timeout);
        let hot = HotPath::new(
            redis.clone(),
            &config.redis_namespace,
            config.rate_window,
            config.lease_ttl,
            config.lease_secrets.clone(),
        )
        .with_state_format(config.state_format);
        if config.state_format == StateFormat::Two {
            tracing::info!(
                "TOLLGATE_STATE_FORMAT=2: leases keep their holds in the live set, which a \
                 release without this setting cannot read: none may share this namespace"
            );
        }
        if config.lease_secrets.ephemeral {
            tracing::warn!(
                "neither TOLLGATE_LEASE_SECRET nor TOLLGATE_ENCRYPTION_KEY is set: lease ids are \
                 sealed with a random secret, so only this process can settle them, and only \
                 until it restarts"
            );
        }
        hot.scripts().preload(&redis).await;
        let metrics = Metrics::new();
        let key_state = KeyState::new(hot.clone(), db.clone(), metrics.clone());
        let gate = Gate::new(
            hot,
            Redis::new(config.redis_urls.clone(), config.redis_timeout),
            config.prices.clone(),
            db.clone(),
            metrics.clone(),
            config.fail_mode,
            config.lease_ttl,
        );
        let state = Arc::new(AppState {
            inference: config.inference.clone(),
            config: Arc::new(config),
            gate,
            key_state,
            db,
            postgres: store::PgReady::default(),
            metrics,
            prometheus,
        });
        Ok(App {
            data,
            admin,
            access_log,
            state,
            sync_db,
        })
    }

    pub fn data_addr(&self) -> SocketAddr {
        self.data.local_addr().unwrap_or(self.state.config.listen)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or(self.state.config.admin_listen)
    }

    /// Where the access-log receiver listens (TCP and UDP), when it is on.
    pub fn access_log_addr(&self) -> Option<SocketAddr> {
        self.access_log.as_ref().and_then(|r| r.local_addr().ok())
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let state = self.state.clone();
        let config = state.config.clone();
        let (data_addr, admin_addr) = (self.data_addr(), self.admin_addr());
        let access_log_addr = self.access_log_addr();

        // The syncer gets its own stop signal, sent only after both listeners have drained:
        // a settlement still in flight when the shutdown starts writes its event after the
        // listeners stop accepting, and the final flush must see it.
        let (sync_stop_tx, sync_stop_rx) = watch::channel(false);
        let syncer = self.sync_db.map(|sync_db| {
            let consumer = config
                .sync_consumer
                .clone()
                .unwrap_or_else(|| format!("{}:{}", hostname(), admin_addr.port()));
            // The syncer has a Redis connection of its own: its replies (hundreds of stream
            // entries) on the hot path's multiplexed connection would hold back the admission
            // replies queued behind them, on the socket and in the reply parser. Its Postgres
            // connection is its own too (see `store::connect_usage_sync`).
            let syncer = sync::usage::Syncer::new(
                Redis::new(config.redis_urls.clone(), config.redis_timeout),
                sync_db,
                state.metrics.clone(),
                Layout::new(&config.redis_namespace).streams(),
                consumer,
            )
            .with_claim_idle(config.sync_claim_idle)
            .writing_once(state.postgres.clone());
            spawn_syncer(syncer, sync_stop_rx)
        });
        if syncer.is_none() {
            tracing::info!("usage sync is off here (TOLLGATE_SYNC_ENABLED=false): events wait in redis for a process that has it on");
        }
        // Postgres comes up in the background (migrations, then reconciler and sweeper);
        // admissions from Redis do not wait for it.
        let postgres = tokio::spawn(crate::startup::postgres(state.clone(), stop_rx.clone()));

        let limits = config.connections;
        let data = tokio::spawn(serve::serve(
            self.data,
            http::data_router(state.clone()),
            limits,
            stop_rx.clone(),
        ));
        let admin = tokio::spawn(serve::serve(
            self.admin,
            http::admin_router(state.clone()),
            limits,
            stop_rx.clone(),
        ));
        // The access-log receiver settles and releases through Redis alone: it starts at once.
        let receiver = self
            .access_log
            .map(|r| tokio::spawn(r.run(state.clone(), stop_rx.clone())));
        tracing::info!(
            listen = %data_addr,
            admin = %admin_addr,
            access_log = access_log_addr.map(tracing::field::display),
            "tollgate serving"
        );

        shutdown.await;
        tracing::info!("shutting down: draining requests and usage");
        let _ = stop_tx.send(true);
        // Requests first (bounded so a client that never lets go cannot eat the syncer's
        // share), then the syncer's flush, which then sees every event those requests wrote.
        let requests_bound = SHUTDOWN_BOUND.saturating_sub(SYNC_DRAIN + SHUTDOWN_SLACK);
        let served =
            tokio::time::timeout(requests_bound, async { tokio::join!(data, admin) }).await;
        let _ = sync_stop_tx.send(true);
        let background = tokio::time::timeout(SYNC_DRAIN + SHUTDOWN_SLACK, async {
            if let Some(s) = syncer {
                let _ = s.await;
            }
            if let Some(r) = receiver {
                let _ = r.await;
            }
            for task in postgres.await.unwrap_or_default() {
                let _ = task.await;
            }
        })
        .await;
        match served {
            Ok((Ok(Err(e)), _)) | Ok((_, Ok(Err(e)))) => return Err(StartError::Serve(e)),
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("requests still in flight at the shutdown bound; closing them")
            }
        }
        if background.is_err() {
            tracing::warn!("usage flush did not finish in time; unsynced events stay in redis");
        } else {
            tracing::info!("shutdown complete");
        }
        Ok(())
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
