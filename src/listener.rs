//! The app listener: the sidecar's own accept loop in front of Pingora's HTTP proxy.
//!
//! Pingora's listening service reads whatever a peer sends before any hook runs: a peer outside
//! `policy.allowed_clients` could park 1 MiB of unterminated header per connection, a
//! slowloris could keep a connection by sending one header line per read timeout, and nothing
//! bounds the number of connections. So the sidecar accepts connections itself
//! ([`AppListener`], a Pingora service with its own runtime) and hands each to Pingora's
//! [`HttpProxy`] through its public `process_new_http`, one request at a time:
//!
//! 1. **at accept**: a peer outside the allowlist is closed before a byte is read; beyond
//!    `listener.max_connections` open connections a new one gets 503 `too_many_connections`
//!    and is closed;
//! 2. **while a header is read** ([`GuardedStream`]): the header block must arrive whole within
//!    `listener.header_timeout` (from accept for the first request, from its first byte for the
//!    next ones; 408 `request_header_timeout` and close) and is capped at
//!    `policy.max_header_bytes` while it is read (431 `request_headers_too_large` and close),
//!    so a connection never buffers more than that;
//! 3. then Pingora parses the request and the proxy's hooks take over.
//!
//! Every refusal here is counted in `finhub_sidecar_listener_refusals_total{reason}`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType,
};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};

use crate::error::{raw_response, ProxyError};
use crate::metrics::Metrics;
use crate::policy::allow;
use crate::proxy::FinHubProxy;

/// Response bytes buffered before a write reaches the socket: a response header and a body of a
/// few KiB leave in one segment.
const WRITE_BUFFER: usize = 16 * 1024;

/// Keep-alive: how long an idle app connection waits for its next request (Pingora's value).
const KEEPALIVE_SECS: u64 = 60;

/// What the listener enforces before Pingora reads a request.
#[derive(Debug, Clone)]
pub struct Limits {
    /// TCP peers that may connect.
    pub allowed_clients: Vec<ipnet::IpNet>,
    /// Open connections beyond this are refused.
    pub max_connections: usize,
    /// A header block must arrive whole within this.
    pub header_timeout: Duration,
    /// A header block larger than this is refused while it is read.
    pub max_header_bytes: usize,
}

/// Counters of the refusals made here.
#[derive(Clone)]
struct Counters {
    not_allowed: IntCounter,
    too_many: IntCounter,
    timeout: IntCounter,
    too_large: IntCounter,
    open: IntGauge,
}

impl Counters {
    fn new(m: &Metrics) -> Self {
        let r = |reason: &str| m.listener_refusals.with_label_values(&[reason]);
        Counters {
            not_allowed: r("client_not_allowed"),
            too_many: r("too_many_connections"),
            timeout: r("header_timeout"),
            too_large: r("header_too_large"),
            open: m.app_connections.clone(),
        }
    }
}

/// The app listener service: accept loop, connection cap, guarded streams, Pingora's proxy.
pub struct AppListener {
    listener: Option<std::net::TcpListener>,
    app: Arc<HttpProxy<FinHubProxy>>,
    limits: Arc<Limits>,
    threads: usize,
    counters: Counters,
}

impl AppListener {
    /// A listener serving `app` on the already bound `listener`.
    pub fn new(
        listener: std::net::TcpListener,
        app: HttpProxy<FinHubProxy>,
        limits: Limits,
        threads: usize,
        metrics: &Metrics,
    ) -> Self {
        AppListener {
            listener: Some(listener),
            app: Arc::new(app),
            limits: Arc::new(limits),
            threads,
            counters: Counters::new(metrics),
        }
    }

    /// Binds `addr` with a large backlog (connection bursts from many app threads).
    pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        Ok(socket.into())
    }
}

#[async_trait]
impl pingora::services::Service for AppListener {
    async fn start_service(
        &mut self,
        #[cfg(unix)] _fds: Option<pingora::server::ListenFds>,
        mut shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let Some(std_listener) = self.listener.take() else {
            return;
        };
        let listener = match tokio::net::TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "app listener unusable");
                return;
            }
        };
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                    continue;
                }
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: calm down instead of spinning on accept.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if !allow::client_allowed(&self.limits.allowed_clients, peer.ip()) {
                // Closed before a byte is read: nothing is buffered, nothing is answered.
                self.counters.not_allowed.inc();
                drop(tcp);
                continue;
            }
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                self.counters.too_many.inc();
                refuse_at_accept(tcp, &ProxyError::TooManyConnections);
                continue;
            };
            let (app, limits, counters, shutdown) = (
                self.app.clone(),
                self.limits.clone(),
                self.counters.clone(),
                shutdown.clone(),
            );
            tokio::spawn(async move {
                let _open = OpenGuard::new(&counters.open);
                serve(tcp, peer, app, &limits, &counters, &shutdown).await;
                drop(permit);
            });
        }
        self.app.cleanup().await;
    }

    fn name(&self) -> &str {
        "finhub-proxy"
    }

    fn threads(&self) -> Option<usize> {
        Some(self.threads)
    }
}

/// Counts one open connection until dropped (also if serving it panics).
struct OpenGuard(IntGauge);

impl OpenGuard {
    fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        OpenGuard(gauge.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Answers a connection that will not be served and closes it (best effort, never waits).
fn refuse_at_accept(tcp: TcpStream, err: &ProxyError) {
    let _ = tcp.try_write(&raw_response(err));
}

/// Serves one app connection: one Pingora HTTP/1 session per request, the header guard re-armed
/// before each.
async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    app: Arc<HttpProxy<FinHubProxy>>,
    limits: &Limits,
    counters: &Counters,
    shutdown: &ShutdownWatch,
) {
    let _ = tcp.set_nodelay(true);
    let stream = GuardedStream::new(tcp, peer, limits, counters.clone());
    let mut session = ServerSession::new_http1(Box::new(stream));
    session.set_keepalive(if *shutdown.borrow() {
        None
    } else {
        Some(KEEPALIVE_SECS)
    });
    let mut next = app.process_new_http(session, shutdown).await;
    while let Some(reused) = next {
        let (stream, settings) = reused.consume();
        let stream = rearm(stream);
        let mut session = ServerSession::new_http1(stream);
        if let Some(settings) = settings {
            settings.apply_to_session(&mut session);
        }
        next = app.process_new_http(session, shutdown).await;
    }
}

/// Re-arms the header guard of a stream Pingora hands back for the next request.
fn rearm(stream: Stream) -> Stream {
    match stream.into_any().downcast::<GuardedStream>() {
        Ok(mut g) => {
            g.guard.next_request();
            g
        }
        // Every stream this listener hands to Pingora is a GuardedStream; anything else cannot
        // come back here. Dropping it closes the connection.
        Err(_) => Box::new(ClosedStream),
    }
}

/// Where the guard is in the current request's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing of this request read yet; the deadline starts at the first byte.
    Idle,
    /// Nothing read yet on a new connection; the deadline started at accept.
    Fresh,
    /// Inside the header block; `line` tracks line ends to find the empty line.
    Header { read: usize, line: LineState },
    /// Header complete: body bytes and whatever follows pass unguarded until re-armed.
    Passed,
    /// Refused: every further read fails.
    Refused,
}

/// Line-end scanner state (a header ends at an empty line; LF or CRLF line ends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineState {
    /// Only empty lines so far (ignored before the request line, RFC 9112 §2.2).
    Leading,
    /// Inside a line.
    Text,
    /// Just after a line end.
    LineStart,
    /// A CR at the start of a line.
    LineStartCr,
}

impl LineState {
    /// Feeds `bytes`; returns how many bytes belong to the header if its end is among them.
    fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            if *self == LineState::Text {
                // Inside a line only the next LF matters: jump to it.
                let lf = memchr::memchr(b'\n', &bytes[i..])?;
                i += lf + 1;
                *self = LineState::LineStart;
                continue;
            }
            *self = match (*self, bytes[i]) {
                (LineState::Leading, b'\r' | b'\n') => LineState::Leading,
                (LineState::LineStart | LineState::LineStartCr, b'\n') => return Some(i + 1),
                (LineState::LineStart, b'\r') => LineState::LineStartCr,
                (_, b'\n') => LineState::LineStart,
                _ => LineState::Text,
            };
            i += 1;
        }
        None
    }
}

/// The header deadline and size cap of one connection.
struct HeaderGuard {
    phase: Phase,
    deadline: Instant,
    timer: Option<Pin<Box<Sleep>>>,
    timeout: Duration,
    max: usize,
}

impl HeaderGuard {
    fn new(timeout: Duration, max: usize) -> Self {
        HeaderGuard {
            phase: Phase::Fresh,
            deadline: Instant::now() + timeout,
            timer: None,
            timeout,
            max,
        }
    }

    /// The previous request is done: guard the next header.
    fn next_request(&mut self) {
        if self.phase != Phase::Refused {
            self.phase = Phase::Idle;
        }
    }

    /// Bytes the next read may take: never more than what is left of the header cap.
    fn budget(&self) -> Option<usize> {
        match self.phase {
            Phase::Fresh | Phase::Idle => Some(self.max),
            Phase::Header { read, .. } => Some(self.max.saturating_sub(read)),
            Phase::Passed | Phase::Refused => None,
        }
    }

    /// Accounts `bytes` just read.
    fn saw(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let (read, mut line) = match self.phase {
            Phase::Idle => {
                self.deadline = Instant::now() + self.timeout;
                (0, LineState::Leading)
            }
            Phase::Fresh => (0, LineState::Leading),
            Phase::Header { read, line } => (read, line),
            Phase::Passed | Phase::Refused => return,
        };
        self.phase = match line.feed(bytes) {
            Some(_) => Phase::Passed,
            None => Phase::Header {
                read: read + bytes.len(),
                line,
            },
        };
    }

    /// Whether the deadline of the header being read has passed (arming the timer so that
    /// the task is woken when it does).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !matches!(self.phase, Phase::Fresh | Phase::Header { .. }) {
            return false;
        }
        let deadline = self.deadline;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready()
    }
}

/// An app connection as Pingora reads it: the TCP stream with the header guard in its reads.
pub struct GuardedStream {
    tcp: TcpStream,
    guard: HeaderGuard,
    digest: Arc<SocketDigest>,
    established: SystemTime,
    counters: Counters,
    /// Response bytes not yet written, and how many of them are.
    wbuf: Vec<u8>,
    written: usize,
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
    fn new(tcp: TcpStream, peer: SocketAddr, limits: &Limits, counters: Counters) -> Self {
        use std::os::unix::io::AsRawFd;
        let digest = SocketDigest::from_raw_fd(tcp.as_raw_fd());
        let _ = digest.peer_addr.set(Some(PingoraAddr::Inet(peer)));
        GuardedStream {
            tcp,
            guard: HeaderGuard::new(limits.header_timeout, limits.max_header_bytes),
            digest: Arc::new(digest),
            established: SystemTime::now(),
            counters,
            wbuf: Vec::new(),
            written: 0,
        }
    }

    /// Answers `err` straight on the socket (best effort) and fails every further read.
    fn refuse(&mut self, err: &ProxyError) -> io::Error {
        self.guard.phase = Phase::Refused;
        match err {
            ProxyError::HeaderTimeout => self.counters.timeout.inc(),
            _ => self.counters.too_large.inc(),
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
        match Pin::new(&mut this.tcp).poll_read(cx, &mut limited) {
            Poll::Ready(Ok(())) => {
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
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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

/// Response bytes are buffered up to [`WRITE_BUFFER`] until Pingora flushes, as its own
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

/// A stream that is already closed (stands in for one that cannot be re-armed).
#[derive(Debug)]
struct ClosedStream;

impl AsyncRead for ClosedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClosedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        _data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[async_trait]
impl Shutdown for ClosedStream {
    async fn shutdown(&mut self) {}
}
impl UniqueID for ClosedStream {
    fn id(&self) -> UniqueIDType {
        -1
    }
}
impl Ssl for ClosedStream {}
#[async_trait]
impl Peek for ClosedStream {}
impl GetTimingDigest for ClosedStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        Vec::new()
    }
}
impl GetProxyDigest for ClosedStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}
impl GetSocketDigest for ClosedStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end_of(bytes: &[u8]) -> Option<usize> {
        LineState::Leading.feed(bytes)
    }

    #[test]
    fn header_end_is_found_with_any_line_ending() {
        assert_eq!(end_of(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"), Some(27));
        assert_eq!(end_of(b"GET / HTTP/1.1\nHost: a\n\n"), Some(24));
        assert_eq!(end_of(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        // Empty lines before the request line do not end anything.
        assert_eq!(end_of(b"\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n"), Some(24));
        assert_eq!(end_of(b"\r\n\r\n"), None);
    }

    #[test]
    fn header_end_split_across_reads() {
        let mut s = LineState::Leading;
        assert_eq!(s.feed(b"GET / HTTP/1.1\r\nA: b\r"), None);
        assert_eq!(s.feed(b"\n\r"), None);
        assert_eq!(s.feed(b"\nrest"), Some(1));
    }

    #[test]
    fn budget_shrinks_while_the_header_is_read_and_resets_per_request() {
        let mut g = HeaderGuard::new(Duration::from_secs(10), 100);
        assert_eq!(g.budget(), Some(100));
        g.saw(b"GET / HTTP/1.1\r\n");
        assert_eq!(g.budget(), Some(84));
        g.saw(b"X: y\r\n\r\n");
        assert_eq!(
            g.budget(),
            None,
            "header complete: body reads are not capped"
        );
        g.next_request();
        assert_eq!(g.budget(), Some(100));
        g.phase = Phase::Refused;
        g.next_request();
        assert_eq!(g.phase, Phase::Refused);
    }
}
