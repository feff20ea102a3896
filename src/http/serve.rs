//! The listeners' serve loop: HTTP/1 connections with tollgate's own timeouts, a connection cap and JSON answers for the HTTP stack's own errors.
//!
//! `axum::serve` has no header, body or idle timeout, no connection cap, and hyper answers its
//! own errors (oversized headers, a malformed request line) with an empty body. Here:
//!
//! - **Header timeout**: a request's head must arrive within `header_timeout`, counted from
//!   the connection's accept for its first request and from the first byte for later ones.
//!   A client that sent part of a head gets `408` `request_timeout`; one that sent nothing is
//!   closed without an answer (there is no request to answer).
//! - **Body timeout**: a request's whole body must arrive within `body_timeout` of its head;
//!   otherwise the handler's read fails and the answer is `408` `request_timeout`, then close.
//! - **Idle timeout**: a keep-alive connection with no request for `idle_timeout` is closed.
//!   Kept longer than the gateways' own upstream keep-alive, so that the client side closes
//!   first and never reuses a connection at the moment tollgate closes it.
//! - **Connection cap**: above `max_connections` open connections on a listener, a new one is
//!   answered `503` `unavailable` with `Retry-After: 1` and closed; open ones go on.
//! - **Accept errors**: out of file descriptors (EMFILE/ENFILE) or memory, the loop backs off
//!   (up to a second) instead of spinning on an accept that fails at once.
//! - hyper's automatic answers (`400` malformed request, `414`, `431` headers too large) are
//!   replaced on the wire by the same status with the JSON error shape.
//!
//! Hyper's own `header_read_timeout` is not used: it also runs while a keep-alive connection
//! is idle, so it would cut idle connections after the (short) header timeout.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Request, Response, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};

use super::error;

/// The connection settings of a listener (`TOLLGATE_HEADER_TIMEOUT_SECONDS`,
/// `TOLLGATE_BODY_TIMEOUT_SECONDS`, `TOLLGATE_IDLE_TIMEOUT_SECONDS`, `TOLLGATE_MAX_CONNECTIONS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Largest request head (request line and headers) accepted; larger → 431. Gateways send a
/// few KiB; this leaves room for a proxy that forwards every header of a client, and is below
/// hyper's own default (about 400 KiB), which a connection would hold in memory.
pub(crate) const MAX_HEAD: usize = 128 * 1024;
/// Refused connections being answered at once; beyond, a refused connection is just closed.
const REFUSING_AT_ONCE: usize = 64;
/// How long a refused connection gets to take its 503 before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const LAST_BACKOFF: Duration = Duration::from_secs(1);

/// What the connection's service tells its socket: how many requests it has started, and how
/// many answers hyper has finished with. Equal counts mean the connection is between
/// requests (waiting for a head); otherwise a request is being read or answered.
#[derive(Default)]
struct ConnState {
    started: AtomicU64,
    finished: AtomicU64,
    /// The current request's body did not arrive within the body timeout.
    body_timed_out: AtomicBool,
    /// The socket's reader, parked while a request was being answered: the end of the answer
    /// wakes it so that it starts the idle timeout then, not at its next wake-up.
    reader: Mutex<Option<Waker>>,
}

/// Serves `router` on `listener` until `stop` turns true, then stops accepting and waits for
/// the open connections to finish their requests (idle ones close at once). The caller bounds
/// that wait.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSING_AT_ONCE));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_header_size(MAX_HEAD);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => {
                backoff = FIRST_BACKOFF;
                tcp
            }
            // The client gave up before the accept: nothing is wrong here.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "accept failed; backing off");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                backoff = (backoff * 2).min(LAST_BACKOFF);
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            refuse(tcp, &refusing);
            continue;
        };
        let conn = Arc::new(ConnState::default());
        let io = TokioIo::new(Guarded::new(tcp, conn.clone(), limits));
        let service = ConnService {
            router: TowerToHyperService::new(router.clone()),
            conn,
            body_timeout: limits.body_timeout,
        };
        let connection = graceful.watch(builder.serve_connection(io, service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Answers a connection over the cap with 503 and closes it. Its request is not read: the
/// answer does not depend on it. The socket lingers briefly, reading what the client sends,
/// so that closing it with unread data does not reset the connection before the client has
/// read the answer.
fn refuse(mut tcp: TcpStream, refusing: &Arc<Semaphore>) {
    let Ok(permit) = refusing.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let answer = error::raw_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "too many open connections; retry shortly",
        );
        let linger = async {
            tcp.write_all(&answer).await?;
            tcp.shutdown().await?;
            let mut sink = [0u8; 4096];
            while tcp.read(&mut sink).await? > 0 {}
            Ok::<_, io::Error>(())
        };
        let _ = tokio::time::timeout(REFUSAL_LINGER, linger).await;
        drop(permit);
    });
}

/// Per connection: counts requests for [`Guarded`], and bounds each request's body.
#[derive(Clone)]
struct ConnService {
    router: TowerToHyperService<Router>,
    conn: Arc<ConnState>,
    body_timeout: Duration,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.conn.started.fetch_add(1, Ordering::AcqRel);
        self.conn.body_timed_out.store(false, Ordering::Release);
        let conn = self.conn.clone();
        let deadline = Instant::now() + self.body_timeout;
        let req = req.map(|body| {
            Body::new(Timed {
                inner: body,
                deadline,
                timer: None,
                conn: conn.clone(),
            })
        });
        let answer = hyper::service::Service::call(&self.router, req);
        Box::pin(async move {
            let res = match answer.await {
                Ok(res) => res,
                Err(never) => match never {},
            };
            let res = if conn.body_timed_out.load(Ordering::Acquire) {
                let mut res = error::ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the request body did not arrive in time",
                )
                .into_response();
                // Its unread body cannot be skipped: the connection ends here.
                res.headers_mut()
                    .insert("connection", HeaderValue::from_static("close"));
                res
            } else {
                res
            };
            Ok(res.map(|inner| Tracked {
                inner,
                conn: Some(conn),
            }))
        })
    }
}

/// A request body that fails once its deadline passes.
struct Timed {
    inner: Incoming,
    deadline: Instant,
    /// Made only when the body is not all there at once (small JSON bodies usually are).
    timer: Option<Pin<Box<Sleep>>>,
    conn: Arc<ConnState>,
}

impl http_body::Body for Timed {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_ready() {
            this.conn.body_timed_out.store(true, Ordering::Release);
            return Poll::Ready(Some(Err("request body timed out".into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that tells the connection when hyper is done with it.
pub(crate) struct Tracked {
    inner: Body,
    conn: Option<Arc<ConnState>>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            conn.finished.fetch_add(1, Ordering::AcqRel);
            let parked = conn.reader.lock().ok().and_then(|mut r| r.take());
            if let Some(waker) = parked {
                waker.wake();
            }
        }
    }
}

/// Where a connection is, as its socket sees it.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Accepted, no request yet: the header timeout runs from the accept.
    Fresh { since: Instant, sent: bool },
    /// Between requests: the idle timeout runs from the end of the last answer.
    Idle { since: Instant },
    /// Part of a head arrived: the header timeout runs from its first byte.
    Head { since: Instant },
    /// A request is being read or answered: its body has its own deadline ([`Timed`]).
    Busy,
}

/// The socket as hyper sees it: it enforces the header and idle timeouts on reads, and turns
/// hyper's automatic error answers into JSON on writes.
struct Guarded {
    tcp: TcpStream,
    conn: Arc<ConnState>,
    limits: ConnectionLimits,
    phase: Phase,
    /// `finished` as of the last read, to see an answer end.
    finished_seen: u64,
    timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    /// A replacement answer being written instead of hyper's, and how much is written.
    rewrite: Option<(Vec<u8>, usize)>,
}

impl Guarded {
    fn new(tcp: TcpStream, conn: Arc<ConnState>, limits: ConnectionLimits) -> Self {
        let now = Instant::now();
        Guarded {
            tcp,
            conn,
            limits,
            phase: Phase::Fresh {
                since: now,
                sent: false,
            },
            finished_seen: 0,
            timer: Box::pin(tokio::time::sleep_until(now + limits.header_timeout)),
            armed: None,
            rewrite: None,
        }
    }

    /// Brings the phase up to date with what the service reported.
    fn observe(&mut self) {
        let started = self.conn.started.load(Ordering::Acquire);
        let finished = self.conn.finished.load(Ordering::Acquire);
        if started > finished {
            self.phase = Phase::Busy;
        } else if finished != self.finished_seen || matches!(self.phase, Phase::Busy) {
            self.phase = Phase::Idle {
                since: Instant::now(),
            };
        }
        self.finished_seen = finished;
    }

    fn got_bytes(&mut self) {
        match self.phase {
            Phase::Fresh { since, .. } => self.phase = Phase::Fresh { since, sent: true },
            Phase::Idle { .. } => {
                self.phase = Phase::Head {
                    since: Instant::now(),
                }
            }
            Phase::Head { .. } | Phase::Busy => {}
        }
    }

    /// When the current wait ends, and whether a `408` is owed then.
    fn deadline(&self) -> Option<(Instant, bool)> {
        match self.phase {
            Phase::Fresh { since, sent } => Some((since + self.limits.header_timeout, sent)),
            Phase::Head { since } => Some((since + self.limits.header_timeout, true)),
            Phase::Idle { since } => Some((since + self.limits.idle_timeout, false)),
            Phase::Busy => None,
        }
    }
}

/// hyper's automatic answer to a request it could not parse: one of these statuses with an
/// empty body (tollgate's own error answers always have a JSON body).
fn hyper_error_status(buf: &[u8]) -> Option<StatusCode> {
    let status = match buf.get(..13)? {
        b"HTTP/1.1 400 " => StatusCode::BAD_REQUEST,
        b"HTTP/1.1 414 " => StatusCode::URI_TOO_LONG,
        b"HTTP/1.1 431 " => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        _ => return None,
    };
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let empty = buf[..head_end]
        .windows(19)
        .any(|w| w.eq_ignore_ascii_case(b"\r\ncontent-length: 0"));
    (empty && head_end == buf.len()).then_some(status)
}

fn stack_error(status: StatusCode) -> Vec<u8> {
    let (code, message) = match status {
        StatusCode::URI_TOO_LONG => ("uri_too_long", "the request URI is too long"),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            "headers_too_large",
            "the request's headers are too large (at most 128 KiB and 100 fields)",
        ),
        StatusCode::REQUEST_TIMEOUT => (
            "request_timeout",
            "the request's headers did not arrive in time",
        ),
        _ => ("bad_request", "malformed HTTP request"),
    };
    error::raw_response(status, code, message)
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.observe();
        let before = buf.filled().len();
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.got_bytes();
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        let Some((deadline, owes_answer)) = this.deadline() else {
            if let Ok(mut parked) = this.conn.reader.lock() {
                *parked = Some(cx.waker().clone());
            }
            // The answer may have ended between `observe` and parking.
            if this.conn.finished.load(Ordering::Acquire) != this.finished_seen {
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        };
        if this.armed != Some(deadline) {
            this.timer.as_mut().reset(deadline);
            this.armed = Some(deadline);
        }
        if this.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if owes_answer {
            // Best effort: a small answer on a socket with nothing else queued goes out whole.
            let _ = this
                .tcp
                .try_write(&stack_error(StatusCode::REQUEST_TIMEOUT));
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head timed out",
            )));
        }
        // Idle, or nothing ever sent: end quietly, as if the client had closed.
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.rewrite.is_none() {
            if let Some(status) = hyper_error_status(buf) {
                this.rewrite = Some((stack_error(status), 0));
            }
        }
        let Some((answer, written)) = &mut this.rewrite else {
            return Pin::new(&mut this.tcp).poll_write(cx, buf);
        };
        // hyper closes the connection after such an answer; anything it still writes is
        // claimed as written and dropped, so the replacement stays whole.
        while *written < answer.len() {
            match Pin::new(&mut this.tcp).poll_write(cx, &answer[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                other => return other,
            }
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    // Not vectored, so hyper writes each answer as one buffer, head and body together, which
    // is what `hyper_error_status` looks at.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// Raises the soft limit on open files to the hard limit, so that a busy listener meets its
/// connection cap before it meets EMFILE. Returns the limit now in force.
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(error = %e, "could not raise the open-file limit");
                None
            }
        }
    }
    #[cfg(not(unix))]
    {
        None
    }
}
