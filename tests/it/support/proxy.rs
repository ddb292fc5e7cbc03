//! A TCP proxy between the code under test and a server (the broker by default, or any address such as PostgreSQL),
//! which a test can cut: it drops every live connection on demand and can refuse new ones for a while, like a network
//! partition. It can also *freeze*: connections stay open but no byte moves in either direction until it thaws, like
//! a server that hangs or a network that silently drops packets.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A running proxy; stops when dropped.
pub struct Proxy {
    addr: SocketAddr,
    inner: Arc<Inner>,
    stop: CancellationToken,
}

struct Inner {
    target: String,
    refuse: AtomicBool,
    frozen: watch::Sender<bool>,
    cut: Mutex<CancellationToken>,
    accepted: AtomicUsize,
    live: AtomicUsize,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards to the broker of [`super::amqp_url`].
    pub async fn start() -> Proxy {
        Proxy::start_to(&broker_address(&super::amqp_url())).await
    }

    /// Listens on 127.0.0.1:0 and forwards to `target` (`host:port`).
    pub async fn start_to(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let inner = Arc::new(Inner {
            target: target.to_string(),
            refuse: AtomicBool::new(false),
            frozen: watch::Sender::new(false),
            cut: Mutex::new(CancellationToken::new()),
            accepted: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, inner.clone(), stop.clone()));
        Proxy { addr, inner, stop }
    }

    /// The broker URL, pointing at the proxy.
    pub fn amqp_url(&self) -> String {
        let url = super::amqp_url();
        url.replacen(&broker_address(&url), &self.addr.to_string(), 1)
    }

    /// Drops every live connection (both directions at once).
    pub fn cut(&self) {
        let mut token = self.inner.cut.lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
    }

    /// The proxy's own address (`127.0.0.1:port`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// While `true`, no byte is forwarded in either direction on any connection, old or new (they stay open, so the
    /// peer sees a server that stopped answering, not a closed socket); `false` lets held bytes through again.
    pub fn freeze(&self, frozen: bool) {
        self.inner.frozen.send_replace(frozen);
    }

    /// Refuses (accepts and closes at once) new connections while `true`.
    pub fn refuse(&self, refuse: bool) {
        self.inner.refuse.store(refuse, Ordering::SeqCst);
    }

    /// Connections forwarded so far.
    pub fn accepted(&self) -> usize {
        self.inner.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn live(&self) -> usize {
        self.inner.live.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}

/// `host:port` of an `amqp://user:pass@host:port/vhost` URL.
fn broker_address(url: &str) -> String {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
    let host = rest.split('/').next().unwrap_or(rest);
    if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:5672")
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>, stop: CancellationToken) {
    loop {
        let (client, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        if inner.refuse.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let Ok(broker) = TcpStream::connect(&inner.target).await else {
            continue;
        };
        inner.accepted.fetch_add(1, Ordering::SeqCst);
        let cut = inner.cut.lock().unwrap().clone();
        let inner = inner.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            inner.live.fetch_add(1, Ordering::SeqCst);
            let (client_read, client_write) = client.into_split();
            let (broker_read, broker_write) = broker.into_split();
            let up = pump(client_read, broker_write, inner.frozen.subscribe());
            let down = pump(broker_read, client_write, inner.frozen.subscribe());
            tokio::select! {
                _ = cut.cancelled() => {}
                _ = stop.cancelled() => {}
                _ = async { tokio::join!(up, down) } => {}
            }
            inner.live.fetch_sub(1, Ordering::SeqCst);
            // Dropping both sockets here is the cut.
        });
    }
}

/// Copies bytes one way until either side closes, holding each chunk while the proxy is frozen.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if frozen.wait_for(|f| !*f).await.is_err() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
