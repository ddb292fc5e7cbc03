//! Serving an axum [`Router`] with every resource a client can hold bounded; used by the webhook listener, the
//! admin server and the sandbox (`axum::serve` sets none of these, so half-sent requests stayed open for minutes).
//!
//! Per listener, from [`HttpLimits`] (`[http]` in the configuration):
//! - **header read timeout**: hyper's `header_read_timeout` — the request line and headers must arrive within it,
//!   else the connection is closed. hyper starts this timer whenever it waits for a request head, so it also closes
//!   a keep-alive connection that sends no next request within it;
//! - **request body deadline**: the whole body must have arrived `request_timeout` after its head; a body frame
//!   after that is an error the handler's extractor turns into a 4xx. The handler itself is not cut short (a
//!   webhook waiting for a publisher confirm finishes; cancelling it half-way would be worse);
//! - **idle timeout**: a connection with no byte read or written for `idle_timeout` while no handler is running is
//!   dropped (a client that stops reading its response, or one that holds a socket without a request);
//! - **connection cap**: at most `max_connections` connections are served at once; over the cap a new connection is
//!   closed at once (the client sees EOF and retries), so a flood cannot starve memory or file descriptors;
//! - **max header bytes**: hyper's `max_header_size` (431 above it) and `max_buf_size` (the read buffer);
//! - body size limits stay with each router (`DefaultBodyLimit`, the webhook's `max_body_bytes`).
//!
//! HTTP/1.1 only (what the listeners served before: nothing here speaks HTTP/2 to Didit or to probes).
//! Graceful shutdown keeps `with_graceful_shutdown` semantics: once `stop` resolves no connection is accepted, idle
//! connections close, and in-flight requests finish (bounded by the limits above); [`serve`] returns when the last
//! connection has closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::Request;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Bounds applied to every connection of one listener; see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Request line and headers must arrive within this.
    pub header_read_timeout: Duration,
    /// The request body must have arrived this long after the head.
    pub request_timeout: Duration,
    /// A connection with no I/O for this long, while no handler runs, is dropped.
    pub idle_timeout: Duration,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Largest request line plus headers, in bytes (at least 8192, hyper's smallest read buffer).
    pub max_header_bytes: usize,
}

/// hyper's smallest allowed read buffer; `max_buf_size` below it panics.
pub const MIN_HEADER_BYTES: usize = 8192;

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_read_timeout: Duration::from_millis(5_000),
            request_timeout: Duration::from_millis(10_000),
            idle_timeout: Duration::from_millis(30_000),
            max_connections: 512,
            max_header_bytes: 16_384,
        }
    }
}

/// Serves `router` on `listener` within `limits` until `stop` resolves, then drains (see the module doc).
pub async fn serve<F>(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    stop: F,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    serve_wrapped(listener, router, limits, stop, |stream| (stream, ())).await
}

/// [`serve`], with every accepted socket passed through `wrap` first: it returns the stream to serve and a value
/// handed to every request on that connection as `axum::extract::ConnectInfo<C>` (the sandbox uses this to break a
/// connection on purpose from a handler).
pub async fn serve_wrapped<F, W, S, C>(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    stop: F,
    wrap: W,
) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
    W: Fn(tokio::net::TcpStream) -> (S, C),
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    C: Clone + Send + Sync + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    let draining = CancellationToken::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(MIN_HEADER_BYTES))
        .keep_alive(true);
    let builder = Arc::new(builder);
    tokio::pin!(stop);
    loop {
        let (stream, _peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: the same pause axum::serve makes, not a failure.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            // Over the cap: closing at once costs nothing and the client sees EOF, not a hang.
            tracing::debug!(
                max_connections = limits.max_connections,
                "connection refused over the cap"
            );
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (stream, info) = wrap(stream);
        let builder = Arc::clone(&builder);
        let router = router.clone();
        let draining = draining.clone();
        connections.spawn(async move {
            serve_connection(stream, info, router, &builder, limits, draining).await;
            drop(permit);
        });
    }
    drop(listener);
    draining.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

async fn serve_connection<S, C>(
    stream: S,
    info: C,
    router: Router,
    builder: &hyper::server::conn::http1::Builder,
    limits: HttpLimits,
    draining: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    C: Clone + Send + Sync + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: Arc::clone(&activity),
    });
    let service_activity = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let guard = Running::enter(Arc::clone(&service_activity));
        let deadline = tokio::time::Instant::now() + limits.request_timeout;
        let mut request = request.map(|body| Body::new(DeadlineBody::new(body, deadline)));
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(info.clone()));
        let router = router.clone();
        async move {
            let response = router.oneshot(request).await;
            drop(guard);
            response
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut shutting_down = false;
    let tick = (limits.idle_timeout / 4).max(Duration::from_millis(50));
    let mut watchdog = tokio::time::interval(tick);
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = draining.cancelled(), if !shutting_down => {
                shutting_down = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = watchdog.tick() => {
                if activity.idle_for() >= limits.idle_timeout {
                    tracing::debug!("idle connection dropped");
                    return;
                }
            }
        }
    }
}

/// What the idle watchdog reads: the last I/O and how many handlers run.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    running: AtomicUsize,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            running: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// Zero while a handler runs (a slow handler is not an idle connection).
    fn idle_for(&self) -> Duration {
        if self.running.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// Counts a running handler; dropped when it ends or is cancelled.
struct Running(Arc<Activity>);

impl Running {
    fn enter(activity: Arc<Activity>) -> Running {
        activity.running.fetch_add(1, Ordering::Relaxed);
        Running(activity)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.touch();
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A socket that records when bytes last moved.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The request body error once the body deadline has passed.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within the request timeout")]
pub struct BodyDeadline;

/// A request body that fails once its deadline passes (one deadline for the whole body, not per frame, so a
/// byte-at-a-time trickle cannot keep it alive).
struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl DeadlineBody {
    fn new(inner: Incoming, deadline: tokio::time::Instant) -> DeadlineBody {
        DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyDeadline))));
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Serves a router echoing the body length; answers the address and the stop token.
    async fn start(limits: HttpLimits) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route(
            "/",
            post(|body: String| async move { body.len().to_string() }),
        );
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(serve(listener, router, limits, async move {
            token.cancelled().await
        }));
        (addr, stop)
    }

    /// Reads until EOF (or an error) and answers what arrived; panics after `limit`.
    async fn read_to_close(socket: &mut TcpStream, limit: Duration) -> String {
        let mut out = Vec::new();
        let read = tokio::time::timeout(limit, async {
            let mut buf = [0u8; 4096];
            loop {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(
            read.is_ok(),
            "the server did not close the socket within {limit:?}"
        );
        String::from_utf8_lossy(&out).into_owned()
    }

    fn long() -> HttpLimits {
        HttpLimits {
            header_read_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            ..HttpLimits::default()
        }
    }

    #[tokio::test]
    async fn a_connection_over_the_cap_is_closed_at_once() {
        let (addr, stop) = start(HttpLimits {
            max_connections: 2,
            ..long()
        })
        .await;
        let _held: Vec<TcpStream> = vec![
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        tokio::time::sleep(Duration::from_millis(100)).await; // let the server accept both
        let mut third = TcpStream::connect(addr).await.unwrap();
        read_to_close(&mut third, Duration::from_secs(5)).await;
        stop.cancel();
    }

    #[tokio::test]
    async fn a_body_that_does_not_arrive_by_the_deadline_is_refused() {
        let (addr, stop) = start(HttpLimits {
            request_timeout: Duration::from_millis(300),
            ..long()
        })
        .await;
        let mut socket = TcpStream::connect(addr).await.unwrap();
        socket
            .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten b")
            .await
            .unwrap();
        let answer = read_to_close(&mut socket, Duration::from_secs(10)).await;
        assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
        stop.cancel();
    }

    #[tokio::test]
    async fn an_idle_connection_is_dropped_and_a_complete_request_is_served() {
        let (addr, stop) = start(HttpLimits {
            idle_timeout: Duration::from_millis(300),
            ..long()
        })
        .await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        read_to_close(&mut idle, Duration::from_secs(10)).await;
        let mut socket = TcpStream::connect(addr).await.unwrap();
        socket
            .write_all(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
            )
            .await
            .unwrap();
        let answer = read_to_close(&mut socket, Duration::from_secs(10)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("\r\n3"), "{answer}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_head_over_max_header_bytes_is_refused() {
        let (addr, stop) = start(long()).await;
        let mut socket = TcpStream::connect(addr).await.unwrap();
        let mut head = b"POST / HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', 20 * 1024));
        let _ = socket.write_all(&head).await;
        let answer = read_to_close(&mut socket, Duration::from_secs(10)).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "{answer}"
        );
        stop.cancel();
    }
}
