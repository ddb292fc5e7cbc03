//! A TCP proxy between the code under test and the broker, which a test can cut: it drops every live connection
//! on demand and can refuse new ones for a while, like a network partition.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
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
    cut: Mutex<CancellationToken>,
    accepted: AtomicUsize,
    live: AtomicUsize,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards to the broker of [`super::amqp_url`].
    pub async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let inner = Arc::new(Inner {
            target: broker_address(&super::amqp_url()),
            refuse: AtomicBool::new(false),
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
            let (mut client, mut broker) = (client, broker);
            tokio::select! {
                _ = cut.cancelled() => {}
                _ = stop.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut client, &mut broker) => {}
            }
            inner.live.fetch_sub(1, Ordering::SeqCst);
            // Dropping both sockets here is the cut.
        });
    }
}
