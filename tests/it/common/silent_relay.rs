//! A TCP relay in front of Postgres whose connections can go silent: stop relaying but stay
//! open, as a half-open connection does after a failover or once a NAT has forgotten it. The
//! client then waits for an answer that never comes, with no error to wake it.

use std::any::Any;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::hot_suite::PgUrl;

type Held = Arc<Mutex<Vec<Box<dyn Any + Send>>>>;

pub struct SilentRelay {
    pub addr: SocketAddr,
    /// One switch per connection made so far.
    quiet: Arc<Mutex<Vec<watch::Sender<bool>>>>,
    /// The halves of silenced connections, kept open.
    held: Held,
    accept: tokio::task::JoinHandle<()>,
}

/// Silences the first connection whose client sends `pattern`, before those bytes go on.
#[derive(Clone)]
struct Trigger {
    pattern: &'static [u8],
    fired: Arc<AtomicBool>,
}

impl SilentRelay {
    /// A relay whose connections go silent when [`SilentRelay::freeze`] is called.
    pub async fn start() -> SilentRelay {
        Self::start_with(None).await
    }

    /// A relay that silences the first connection on which the client sends `pattern`, at
    /// that moment (the bytes are not forwarded); every other connection relays normally.
    pub async fn silencing_first(pattern: &'static [u8]) -> SilentRelay {
        Self::start_with(Some(Trigger {
            pattern,
            fired: Arc::new(AtomicBool::new(false)),
        }))
        .await
    }

    async fn start_with(trigger: Option<Trigger>) -> SilentRelay {
        let upstream = PgUrl::parse(&super::pg_server_url()).hostport;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let quiet: Arc<Mutex<Vec<watch::Sender<bool>>>> = Arc::default();
        let held: Held = Arc::default();
        let (switches, kept) = (quiet.clone(), held.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (tx, rx) = watch::channel(false);
                switches.lock().expect("switches").push(tx.clone());
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(
                    client_read,
                    server_write,
                    tx.clone(),
                    rx.clone(),
                    trigger.clone(),
                    kept.clone(),
                ));
                tokio::spawn(pump(server_read, client_write, tx, rx, None, kept.clone()));
            }
        });
        SilentRelay {
            addr,
            quiet,
            held,
            accept,
        }
    }

    /// `url` (a database URL) through the relay, without TLS so that a pattern can be seen.
    pub fn route(&self, url: &str) -> String {
        let upstream = PgUrl::parse(url).hostport;
        let routed = url.replacen(&upstream, &self.addr.to_string(), 1);
        let joiner = if routed.contains('?') { '&' } else { '?' };
        format!("{routed}{joiner}sslmode=disable")
    }

    /// Silences every connection open now; later ones relay normally.
    pub fn freeze(&self) {
        for q in self.quiet.lock().expect("switches").iter() {
            let _ = q.send(true);
        }
    }

    /// Directions of silenced connections (two per connection once both have stopped).
    pub fn silent_connections(&self) -> usize {
        self.held.lock().expect("held").len()
    }
}

impl Drop for SilentRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies one direction until the connection closes or goes silent; silent, it keeps both
/// halves open (in `held`) and never reads or writes again.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    silence: watch::Sender<bool>,
    mut quiet: watch::Receiver<bool>,
    trigger: Option<Trigger>,
    held: Held,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if *quiet.borrow_and_update() {
            break;
        }
        tokio::select! {
            _ = quiet.changed() => {}
            read = from.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if let Some(t) = &trigger {
                    if buf[..n].windows(t.pattern.len()).any(|w| w == t.pattern)
                        && !t.fired.swap(true, Ordering::SeqCst)
                    {
                        let _ = silence.send(true);
                        break;
                    }
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    held.lock().expect("held").push(Box::new((from, to)));
}
