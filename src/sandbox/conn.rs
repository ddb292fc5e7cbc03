//! Connections the sandbox can break on purpose: `drop_response_rate` (see [`super::limits`]) carries a request
//! out in full and then resets the connection instead of answering, the way a load balancer or a network fault
//! loses an answer. A handler cannot reach the TCP stream, so the listener hands every connection out with a
//! [`ConnHandle`] (its connect info, in every request's extensions) sharing a switch with the stream: once the
//! switch is thrown, the stream's next write fails and the socket closes with an RST, so the answer already
//! written into hyper's buffers never leaves.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A TCP listener whose connections can be reset from a handler.
pub struct BreakableListener(pub TcpListener);

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

impl Listener for BreakableListener {
    type Io = BreakableStream;
    type Addr = ConnHandle;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, _peer) = Listener::accept(&mut self.0).await;
        let broken = Arc::new(AtomicBool::new(false));
        (
            BreakableStream {
                inner: stream,
                broken: Arc::clone(&broken),
            },
            ConnHandle { broken },
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        // Only to satisfy the trait: the sandbox reads its address from the TCP listener before wrapping it.
        self.0.local_addr().map(|_| ConnHandle {
            broken: Arc::default(),
        })
    }
}

impl Connected<IncomingStream<'_, BreakableListener>> for ConnHandle {
    fn connect_info(stream: IncomingStream<'_, BreakableListener>) -> Self {
        stream.remote_addr().clone()
    }
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
