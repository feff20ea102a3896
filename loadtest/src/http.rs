//! A bare HTTP/1.1 keep-alive client: one TCP connection, one request at a time.
//!
//! Each load worker owns one connection, like a gateway's upstream pool entry would. A pooled
//! client (reqwest, hyper-util's legacy client) would add a pool look-up, a lock and a task
//! hop to every request; at tens of thousands of requests a second on a shared 2-core host that
//! overhead would be charged to tollgate's latency.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Upper bound of one request, connect included: a stuck request is an error, not a hang.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub host: String,
}

impl Endpoint {
    /// Parses `http://host:port` (a path, if any, is ignored).
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
        let host = rest.split('/').next().unwrap_or_default().to_string();
        use std::net::ToSocketAddrs;
        let addr = host
            .to_socket_addrs()
            .map_err(|e| format!("{url}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: no address"))?;
        Ok(Endpoint { addr, host })
    }
}

#[derive(Debug)]
pub enum HttpError {
    Connect(String),
    Io(String),
    Timeout,
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Connect(e) => write!(f, "connect: {e}"),
            HttpError::Io(e) => write!(f, "i/o: {e}"),
            HttpError::Timeout => write!(f, "timed out after {REQUEST_TIMEOUT:?}"),
        }
    }
}

/// One keep-alive connection that reconnects on the next request after a failure.
pub struct Conn {
    endpoint: Endpoint,
    auth: Option<String>,
    sender: Option<SendRequest<Full<Bytes>>>,
    pub reconnects: u64,
}

impl Conn {
    pub fn new(endpoint: Endpoint, bearer: Option<&str>) -> Conn {
        Conn {
            endpoint,
            auth: bearer.map(|t| format!("Bearer {t}")),
            sender: None,
            reconnects: 0,
        }
    }

    async fn connect(&mut self) -> Result<(), HttpError> {
        let stream = TcpStream::connect(self.endpoint.addr)
            .await
            .map_err(|e| HttpError::Connect(e.to_string()))?;
        // Small request/response pairs: Nagle would add up to 40 ms to each.
        stream
            .set_nodelay(true)
            .map_err(|e| HttpError::Connect(e.to_string()))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| HttpError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.sender = Some(sender);
        Ok(())
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        match tokio::time::timeout(REQUEST_TIMEOUT, self.send_inner(method, path, body)).await {
            Ok(r) => {
                if r.is_err() {
                    self.sender = None;
                }
                r
            }
            Err(_) => {
                self.sender = None;
                Err(HttpError::Timeout)
            }
        }
    }

    async fn send_inner(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            if self.sender.is_some() {
                self.reconnects += 1;
            }
            self.connect().await?;
        }
        let Some(sender) = self.sender.as_mut() else {
            return Err(HttpError::Connect("no connection".into()));
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.endpoint.host.as_str());
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.as_str());
        }
        let body = match body {
            Some(b) => {
                req = req.header(CONTENT_TYPE, "application/json");
                Full::new(b)
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body).map_err(|e| HttpError::Io(e.to_string()))?;
        sender
            .ready()
            .await
            .map_err(|e| HttpError::Io(e.to_string()))?;
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| HttpError::Io(e.to_string()))?;
        let status = res.status();
        let bytes = res
            .into_body()
            .collect()
            .await
            .map_err(|e| HttpError::Io(e.to_string()))?
            .to_bytes();
        Ok((status, bytes))
    }

    pub async fn post_json(
        &mut self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let bytes = serde_json::to_vec(body).map_err(|e| HttpError::Io(e.to_string()))?;
        self.send(Method::POST, path, Some(Bytes::from(bytes)))
            .await
    }

    pub async fn get(&mut self, path: &str) -> Result<(StatusCode, Bytes), HttpError> {
        self.send(Method::GET, path, None).await
    }
}
