//! The accept loop ([`AppListener`]): allowlist at accept, connection cap with eviction of the
//! connection idle longest, then one Pingora HTTP/1 session per request on a guarded stream.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::{HttpProxy, ProxyHttp};
use pingora::server::ShutdownWatch;
use prometheus::IntGauge;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::guard::HeaderGuard;
use super::idle::{IdleConnections, Registered};
use super::metrics::{ListenerMetrics, Refusal};
use super::stream::{Ahead, GuardedStream};
use crate::error::{raw_response, ProxyError};
use crate::policy::allow;

/// Keep-alive: how long an idle app connection waits for its next request (Pingora's value).
const KEEPALIVE_SECS: u64 = 60;

/// How long a new connection that closed an idle one waits for that one's slot.
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// The HTTP app the listener serves each request with.
pub trait ServeHttp: HttpServerApp + Send + Sync + 'static {
    /// The future that serves one request on `session` (Pingora's `process_new_http`), built
    /// directly in its own allocation: the proxy's ~14 KB state machine is never built on the
    /// stack and copied, and an idle connection holds none of it.
    fn serve<'a>(
        self: &'a Arc<Self>,
        session: ServerSession,
        shutdown: &'a ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'a>>;
}

impl<SV> ServeHttp for HttpProxy<SV>
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    fn serve<'a>(
        self: &'a Arc<Self>,
        session: ServerSession,
        shutdown: &'a ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'a>> {
        in_place(|| self.process_new_http_unboxed(session, shutdown))
    }
}

/// `make()`'s future in a new allocation, written there directly: unlike `Box::pin(make())`,
/// the compiler can build it in place instead of on the stack and then copying it.
fn in_place<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

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

/// The app listener service: accept loop, connection cap, guarded streams, and the HTTP app
/// that serves each request (Pingora's proxy with the sidecar's hooks).
pub struct AppListener<A> {
    listener: Option<std::net::TcpListener>,
    app: Arc<A>,
    limits: Arc<Limits>,
    threads: usize,
    counters: ListenerMetrics,
}

impl<A> AppListener<A> {
    /// A listener serving `app` on the already bound `listener`.
    pub fn new(
        listener: std::net::TcpListener,
        app: A,
        limits: Limits,
        threads: usize,
        metrics: &ListenerMetrics,
    ) -> Self {
        AppListener {
            listener: Some(listener),
            app: Arc::new(app),
            limits: Arc::new(limits),
            threads,
            counters: metrics.clone(),
        }
    }
}

/// Binds `addr` for an [`AppListener`], with a large backlog (connection bursts from many app
/// threads).
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

#[async_trait]
impl<A> pingora::services::Service for AppListener<A>
where
    A: ServeHttp,
{
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
        let idle = Arc::new(IdleConnections::new());
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
                self.counters.refused(Refusal::ClientNotAllowed);
                drop(tcp);
                continue;
            }
            let (app, limits, counters, shutdown, idle) = (
                self.app.clone(),
                self.limits.clone(),
                self.counters.clone(),
                shutdown.clone(),
                idle.clone(),
            );
            let permit = match slots.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                // Full: close the connection idle longest and wait for its slot (one waiter
                // per eviction, so a flood cannot pile up tasks).
                Err(_)
                    if idle.waiting.load(Ordering::Relaxed) < self.limits.max_connections
                        && idle.evict_oldest_idle() =>
                {
                    self.counters.evicted();
                    None
                }
                Err(_) => {
                    self.counters.refused(Refusal::TooManyConnections);
                    refuse_at_accept(tcp, &ProxyError::TooManyConnections);
                    continue;
                }
            };
            let slots = slots.clone();
            tokio::spawn(async move {
                let permit = match permit {
                    Some(p) => p,
                    None => {
                        idle.waiting.fetch_add(1, Ordering::Relaxed);
                        let p = tokio::time::timeout(EVICTION_WAIT, slots.acquire_owned()).await;
                        idle.waiting.fetch_sub(1, Ordering::Relaxed);
                        match p {
                            Ok(Ok(p)) => p,
                            _ => {
                                counters.refused(Refusal::TooManyConnections);
                                refuse_at_accept(tcp, &ProxyError::TooManyConnections);
                                return;
                            }
                        }
                    }
                };
                let _open = OpenGuard::new(counters.open());
                let registered = idle.register();
                serve(tcp, peer, app, &limits, &counters, &shutdown, &registered).await;
                drop(registered);
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
/// before each. Between requests the connection holds only its socket and this small future:
/// Pingora's session (and its boxed request future) is created once the next request's first
/// bytes are read, so idle keep-alive connections, used or not, cost little memory.
async fn serve<A: ServeHttp>(
    tcp: TcpStream,
    peer: SocketAddr,
    app: Arc<A>,
    limits: &Limits,
    counters: &ListenerMetrics,
    shutdown: &ShutdownWatch,
    registered: &Registered,
) {
    let _ = tcp.set_nodelay(true);
    let mut stream = Box::new(GuardedStream::new(
        tcp,
        peer,
        HeaderGuard::new(limits.header_timeout, limits.max_header_bytes),
        counters.clone(),
    ));
    let mut shutdown = shutdown.clone();
    let mut settings: Option<HttpPersistentSettings> = None;
    let mut first = true;
    // A new connection must start its request within the header deadline; an idle keep-alive
    // connection is closed after Pingora's keep-alive time.
    let mut idle_limit = limits.header_timeout;
    loop {
        let idle_until = tokio::time::Instant::now() + idle_limit;
        loop {
            tokio::select! {
                // Readiness first: when the request is already there (the common case) the
                // timer is never polled, so never registered.
                biased;
                ready = stream.tcp.readable() => {
                    if ready.is_err() {
                        return;
                    }
                }
                // Another app needs the slot and this connection has been idle longest.
                _ = registered.state.close.notified() => return,
                _ = tokio::time::sleep_until(idle_until) => {
                    if first {
                        // Connected, never sent a byte: as a header that did not arrive in time.
                        let _ = stream.refuse(&ProxyError::HeaderTimeout);
                    }
                    return;
                }
                changed = shutdown.changed() => {
                    // Shutting down: an idle connection is closed now, not reused.
                    if changed.is_err() || *shutdown.borrow() {
                        return;
                    }
                    continue;
                }
            }
            match stream.read_ahead() {
                Ok(Ahead::Begun) => break,
                Ok(Ahead::NotYet) => continue,
                Ok(Ahead::Closed) | Err(_) => return,
            }
        }
        registered.busy();
        let mut session = ServerSession::new_http1(stream);
        match settings.take() {
            Some(s) => HttpPersistentSettings::apply_to_session(s, &mut session),
            None => session.set_keepalive(Some(KEEPALIVE_SECS)),
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }
        let Some(reused) = app.serve(session, &shutdown).await else {
            return;
        };
        let (next, next_settings) = reused.consume();
        let Some(next) = rearm(next) else { return };
        stream = next;
        settings = next_settings;
        registered.idle();
        first = false;
        idle_limit = Duration::from_secs(KEEPALIVE_SECS);
    }
}

/// Re-arms the header guard of a stream Pingora hands back for the next request; `None` for
/// a stream that is not one of ours (it cannot happen: every stream this listener hands to
/// Pingora is a [`GuardedStream`]), which closes the connection.
fn rearm(stream: Stream) -> Option<Box<GuardedStream>> {
    let mut g = stream.into_any().downcast::<GuardedStream>().ok()?;
    g.guard.next_request();
    Some(g)
}
