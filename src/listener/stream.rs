//! [`GuardedStream`]: an app connection as Pingora reads and writes it (the header guard in its
//! reads, response writes buffered until a flush).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::SystemTime;

use async_trait::async_trait;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::guard::{HeaderGuard, Phase};
use super::metrics::{ListenerMetrics, Refusal};
use crate::error::{raw_response, ProxyError};

/// Response bytes buffered before a write reaches the socket: a response header and a body of a
/// few KiB leave in one segment.
const WRITE_BUFFER: usize = 16 * 1024;

/// An app connection as Pingora reads it: the TCP stream with the header guard in its reads.
pub struct GuardedStream {
    pub(super) tcp: TcpStream,
    pub(super) guard: HeaderGuard,
    pub(super) digest: Arc<SocketDigest>,
    pub(super) established: SystemTime,
    pub(super) counters: ListenerMetrics,
    /// Response bytes not yet written, and how many of them are.
    pub(super) wbuf: Vec<u8>,
    pub(super) written: usize,
    /// The next request's first bytes, read while the connection waited for them
    /// ([`Self::read_ahead`]), and how many of them Pingora has read: served before the socket.
    pub(super) ahead: Vec<u8>,
    pub(super) ahead_read: usize,
}

/// At most this many bytes are read to learn that the next request has begun (on the stack;
/// what arrived is kept in a buffer of its size).
const READ_AHEAD: usize = 1024;

/// Whether the next request has begun ([`GuardedStream::read_ahead`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ahead {
    /// Its first bytes are read and held for Pingora.
    Begun,
    /// Nothing to read yet: the readiness was stale.
    NotYet,
    /// The app closed the connection.
    Closed,
}

impl std::fmt::Debug for GuardedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedStream")
            .field("peer", &self.digest.peer_addr())
            .field("phase", &self.guard.phase)
            .finish_non_exhaustive()
    }
}

impl GuardedStream {
    pub(super) fn new(
        tcp: TcpStream,
        peer: SocketAddr,
        guard: HeaderGuard,
        counters: ListenerMetrics,
    ) -> Self {
        use std::os::unix::io::AsRawFd;
        let digest = SocketDigest::from_raw_fd(tcp.as_raw_fd());
        let _ = digest.peer_addr.set(Some(PingoraAddr::Inet(peer)));
        GuardedStream {
            tcp,
            guard,
            digest: Arc::new(digest),
            established: SystemTime::now(),
            counters,
            wbuf: Vec::new(),
            written: 0,
            ahead: Vec::new(),
            ahead_read: 0,
        }
    }

    /// Reads the first bytes of the next request, if they are there. tokio's readiness can be
    /// stale (a new socket starts out readable, and a request read whole leaves it set); a
    /// request has begun only once bytes are read. They count against the header guard as
    /// Pingora's own reads do, and Pingora reads them first.
    pub(super) fn read_ahead(&mut self) -> io::Result<Ahead> {
        // Only a stream waiting for a header is read ahead: one past its header or refused is
        // never handed back for another request.
        let Some(budget) = self.guard.budget() else {
            return Err(io::ErrorKind::ConnectionAborted.into());
        };
        let room = budget.min(READ_AHEAD);
        if room == 0 {
            return Err(self.refuse(&ProxyError::HeadersTooLarge));
        }
        let mut buf = [0u8; READ_AHEAD];
        let mut read = ReadBuf::new(&mut buf[..room]);
        // tokio's own read, not `try_read`: a read shorter than asked for clears the readiness,
        // so the next wait goes to epoll instead of another read that finds nothing. Pending
        // (nothing there) is answered at once: the caller waits for readiness itself.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match Pin::new(&mut self.tcp).poll_read(&mut cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => Ok(Ahead::Closed),
            Poll::Ready(Ok(())) => {
                let got = read.filled();
                self.guard.saw(got);
                self.ahead = got.to_vec();
                self.ahead_read = 0;
                Ok(Ahead::Begun)
            }
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(Ahead::NotYet),
        }
    }

    /// Answers `err` straight on the socket (best effort) and fails every further read.
    pub(super) fn refuse(&mut self, err: &ProxyError) -> io::Error {
        self.guard.phase = Phase::Refused;
        match err {
            ProxyError::HeaderTimeout => self.counters.refused(Refusal::HeaderTimeout),
            _ => self.counters.refused(Refusal::HeaderTooLarge),
        }
        let _ = self.tcp.try_write(&raw_response(err));
        io::Error::new(io::ErrorKind::ConnectionAborted, err.code())
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.ahead_read < this.ahead.len() {
            // Read ahead and accounted already: no socket read, no guard.
            let rest = &this.ahead[this.ahead_read..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.ahead_read += n;
            if this.ahead_read == this.ahead.len() {
                this.ahead = Vec::new();
                this.ahead_read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let Some(budget) = this.guard.budget() else {
            if this.guard.phase == Phase::Refused {
                return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
            }
            return Pin::new(&mut this.tcp).poll_read(cx, buf);
        };
        if budget == 0 {
            return Poll::Ready(Err(this.refuse(&ProxyError::HeadersTooLarge)));
        }
        // Read at most the rest of the header budget, so a connection never holds more.
        let room = buf.remaining().min(budget);
        let mut limited = buf.take(room);
        let start = limited.filled().as_ptr();
        match Pin::new(&mut this.tcp).poll_read(cx, &mut limited) {
            Poll::Ready(Ok(())) => {
                // The inner read must fill the view in place (as tokio's own `Take` checks).
                assert_eq!(limited.filled().as_ptr(), start, "read buffer swapped");
                let n = limited.filled().len();
                this.guard.saw(limited.filled());
                // As tokio's own `Take` does: the view shares `buf`'s memory from its fill
                // position on.
                // SAFETY: the inner read initialised and filled these `n` bytes through the
                // `take` view, which starts at `buf`'s first unfilled byte.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.guard.expired(cx) {
                    Poll::Ready(Err(this.refuse(&ProxyError::HeaderTimeout)))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl GuardedStream {
    /// Writes the buffered response bytes out; `Ready(Ok)` once the buffer is empty (and then
    /// released, so an idle keep-alive connection holds no write buffer).
    pub(super) fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.wbuf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.wbuf = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

/// Response bytes are buffered up to `WRITE_BUFFER` until Pingora flushes, as its own
/// listener does, so a response header and a small body leave in one segment.
impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.wbuf.len() + data.len() > WRITE_BUFFER {
            ready!(this.poll_drain(cx))?;
            if data.len() >= WRITE_BUFFER {
                return Pin::new(&mut this.tcp).poll_write(cx, data);
            }
        }
        this.wbuf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for GuardedStream {
    async fn shutdown(&mut self) {
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.tcp).await;
    }
}

impl UniqueID for GuardedStream {
    fn id(&self) -> UniqueIDType {
        use std::os::unix::io::AsRawFd;
        self.tcp.as_raw_fd()
    }
}

impl Ssl for GuardedStream {}

#[async_trait]
impl Peek for GuardedStream {}

impl GetTimingDigest for GuardedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        vec![Some(TimingDigest {
            established_ts: self.established,
            ..Default::default()
        })]
    }
}

impl GetProxyDigest for GuardedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for GuardedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        Some(self.digest.clone())
    }
}
