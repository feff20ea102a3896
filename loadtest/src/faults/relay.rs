//! A TCP relay between tollgate and Postgres that the fault run can cut or silence, so that
//! outages are real to tollgate without touching the shared Postgres server.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    Open,
    /// New connections are closed at once and open ones are torn down: Postgres is gone.
    Cut,
    /// Connections are accepted and kept, but no byte moves either way: a partition that
    /// TCP does not notice.
    Silent,
}

pub struct Relay {
    pub addr: SocketAddr,
    state: watch::Sender<Net>,
    task: JoinHandle<()>,
}

impl Relay {
    pub async fn start(upstream: SocketAddr) -> Result<Relay, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("relay: {e}"))?;
        let addr = listener.local_addr().map_err(|e| format!("relay: {e}"))?;
        let (state, rx) = watch::channel(Net::Open);
        let task = tokio::spawn(accept_loop(listener, upstream, rx));
        Ok(Relay { addr, state, task })
    }

    pub fn set(&self, net: Net) {
        self.state.send_replace(net);
    }

    pub fn stop(self) {
        self.set(Net::Cut);
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, rx: watch::Receiver<Net>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if *rx.borrow() == Net::Cut {
            drop(client);
            continue;
        }
        let rx = rx.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(pipe(cr, sw, rx.clone()), pipe(sr, cw, rx));
        });
    }
}

/// Waits while the relay is silent; false once it is cut.
async fn open(rx: &mut watch::Receiver<Net>) -> bool {
    loop {
        match *rx.borrow_and_update() {
            Net::Open => return true,
            Net::Cut => return false,
            Net::Silent => {}
        }
        if rx.changed().await.is_err() {
            return false;
        }
    }
}

async fn until_cut(rx: &mut watch::Receiver<Net>) {
    while *rx.borrow_and_update() != Net::Cut {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Copies one direction. The gate is checked before each read and again before each write,
/// so a read already under way when the relay goes silent holds its bytes until it opens.
async fn pipe(mut r: OwnedReadHalf, mut w: OwnedWriteHalf, mut rx: watch::Receiver<Net>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut cut = rx.clone();
    loop {
        if !open(&mut rx).await {
            return;
        }
        let n = tokio::select! {
            r = r.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            () = until_cut(&mut cut) => return,
        };
        if !open(&mut rx).await {
            return;
        }
        let written = tokio::select! {
            r = w.write_all(&buf[..n]) => r.is_ok(),
            () = until_cut(&mut cut) => false,
        };
        if !written {
            return;
        }
    }
}
