//! Connections the sandbox can break on purpose: `drop_response_rate` (see [`super::limits`]) carries a request
//! out in full and then resets the connection instead of answering, the way a load balancer or a network fault
//! loses an answer. A handler cannot reach the TCP stream, so every connection is served wrapped ([`breakable`])
//! with a [`ConnHandle`] (its connect info, in every request's extensions) sharing a switch with the stream: once the
//! switch is thrown, the stream's next write fails and the socket closes with an RST, so the answer already
//! written into hyper's buffers never leaves.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The connect info of one connection: the switch that breaks it.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    broken: Arc<AtomicBool>,
}

impl ConnHandle {
    /// From now on the connection sends nothing more: the answer in progress is lost.
    pub fn break_connection(&self) {
        self.broken.store(true, Ordering::SeqCst);
    }
}

/// Wraps an accepted connection so that a handler can break it: the stream to serve, and the handle every request
/// on it carries (as `ConnectInfo<ConnHandle>`).
pub fn breakable(stream: TcpStream) -> (BreakableStream, ConnHandle) {
    let broken = Arc::new(AtomicBool::new(false));
    (
        BreakableStream {
            inner: stream,
            broken: Arc::clone(&broken),
        },
        ConnHandle { broken },
    )
}

/// A TCP stream that fails every write once its connection was broken.
pub struct BreakableStream {
    inner: TcpStream,
    broken: Arc<AtomicBool>,
}

impl BreakableStream {
    fn reset(&self) -> io::Error {
        // SO_LINGER 0 makes the close an RST (what a client sees as "connection reset"); with a zero timeout the
        // close never blocks, which is what the deprecation warns about.
        #[allow(deprecated)]
        let _ = self.inner.set_linger(Some(Duration::ZERO));
        io::Error::new(
            io::ErrorKind::ConnectionReset,
            "sandbox fault: the answer was dropped",
        )
    }
}

impl AsyncRead for BreakableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.broken.load(Ordering::SeqCst) {
            return Poll::Ready(Err(self.reset()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for BreakableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.broken.load(Ordering::SeqCst) {
            return Poll::Ready(Err(self.reset()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.broken.load(Ordering::SeqCst) {
            return Poll::Ready(Err(self.reset()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.broken.load(Ordering::SeqCst) {
            return Poll::Ready(Err(self.reset()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
