//! Admin listener: its own port (`admin.address`), never proxies anything, and keeps answering
//! while the proxy drains.
//!
//! | Endpoint         | Meaning                                                                   |
//! |------------------|---------------------------------------------------------------------------|
//! | `GET /live`      | 200 while the process is up.                                              |
//! | `GET /ready`     | 200 when the client certificate (if configured) is loaded and unexpired,  |
//! |                  | every tenant has a usable session, and no shutdown has begun; else 503    |
//! |                  | with the reason.                                                          |
//! | `GET /metrics`   | Prometheus text exposition of every metric in `metrics.rs`.               |
//! | `GET /status`    | JSON for people: version, uptime, certificate subject/serial/expiry,      |
//! |                  | FinHub's clock offset, per-tenant session expiry and last auth result,    |
//! |                  | each Redis pool's mode, primary in use and its role.                      |
//! |                  | Never a secret.                                                           |
//! | `POST /shutdown` | Only with `admin.shutdown_endpoint = true`: starts the graceful drain, as |
//! |                  | SIGTERM does (for Jobs). Loopback peers only (IPv4-mapped included);      |
//! |                  | others get 403. Without the setting it does not exist (404).              |
//!
//! Any other path is 404, any other method 405, each with a JSON body.
//!
//! Under abuse the probes keep answering: a request header must arrive within
//! [`ADMIN_HEADER_TIMEOUT`], and when [`MAX_ADMIN_CONNECTIONS`] are open the oldest one is closed
//! to make room, so slow or idle clients can never hold every slot.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::listener::LineState;
use crate::state::AppState;
use crate::time::unix_now;
use crate::time::{FinHubTime, Local};
use crate::tls::Availability;

/// Admin connections kept open; a new one beyond this closes one of the largest source's.
pub const MAX_ADMIN_CONNECTIONS: usize = 256;

/// Admin connections one source (this pod, or one remote address) may hold; its next one
/// closes its own oldest.
pub const ADMIN_CONNECTIONS_PER_SOURCE: usize = 64;

/// The largest admin request header: probes and scrapes send a few hundred bytes. A larger
/// one is answered 431 (JSON) and the connection closed, so no admin connection buffers more.
pub const ADMIN_MAX_HEADER_BYTES: usize = 16 * 1024;

/// An admin request header must arrive whole within this (probes send theirs at once).
pub const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What the admin endpoints look at: the application state.
pub type AdminState = AppState;

impl AppState {
    /// `None` while the process can still serve, else why a restart is needed: a PKCS#11
    /// call that has not returned for [`crate::tls::pkcs11::STUCK_AFTER_TIMEOUTS`] ×
    /// `pkcs11_timeout` (it cannot be cancelled; the token thread serves nothing else).
    pub fn not_live_reason(&self) -> Option<String> {
        let tls = self.tls.current();
        let stuck = tls.token.as_ref()?.stuck()?;
        Some(format!(
            "a call into the client key token has not returned for {}s (client_cert.pkcs11_timeout × {})",
            stuck.as_secs(),
            crate::tls::pkcs11::STUCK_AFTER_TIMEOUTS
        ))
    }

    /// `None` when ready, else why not.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.lifecycle.is_draining() {
            return Some("shutting down".into());
        }
        if self.config.client_cert.is_some() {
            let tls = self.tls.current();
            if let Availability::WaitingForPin { reason } = &tls.availability {
                return Some(reason.clone());
            }
            match &tls.identity {
                None => return Some("client certificate not loaded".into()),
                Some(id) if id.not_after_unix < unix_now() => {
                    return Some("client certificate expired".into())
                }
                Some(_) => {}
            }
            if let Some(e) = tls.token.as_ref().and_then(|t| t.health()) {
                return Some(format!("client key token unavailable: {e}"));
            }
        }
        let now = SystemTime::now();
        let missing: Vec<&str> = self
            .sessions
            .tenants()
            .iter()
            .filter(|t| t.usable(now).is_none())
            .map(|t| t.tenant.id.as_str())
            .collect();
        if missing.is_empty() {
            return None;
        }
        let mut reason = format!("no valid session for tenant(s): {}", missing.join(", "));
        if let Some(e) = self.upstream.auth_egress_failure() {
            reason.push_str(&format!(
                "; the last auth call could not pass upstream.egress_proxy: {e}"
            ));
        }
        Some(reason)
    }

    /// The `/status` document. Built from identities and times only, never from secrets.
    pub fn status(&self) -> serde_json::Value {
        let tls = self.tls.current();
        let certificate = tls.identity.as_ref().map(|id| {
            json!({
                "subject": id.subject,
                "issuer": id.issuer,
                "serial": id.serial_hex,
                "not_after_unix": id.not_after_unix,
                "warnings": tls.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })
        });
        let default_id = &self.config.default_tenant().id;
        let tenants: Vec<_> = self
            .sessions
            .tenants()
            .iter()
            .map(|t| {
                let session = t.current();
                let st = t.status();
                json!({
                    "id": t.tenant.id,
                    "default": &t.tenant.id == default_id,
                    "session_valid": t.usable(SystemTime::now()).is_some(),
                    "session_expires_unix": session.as_ref().map(|s| Local::from_system(s.expires_at()).secs()),
                    "finhub_exp_unix": session.as_ref().and_then(|s| s.finhub_expiry()).map(FinHubTime::secs),
                    "refreshable": session.as_ref().map(|s| s.internal_token_key.is_some()),
                    "last_result": st.last_result,
                    "last_attempt_unix": st.last_attempt_unix,
                    "consecutive_failures": st.failures,
                    "shared": st.fleet,
                })
            })
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "ready": self.not_ready_reason().is_none(),
            "draining": self.lifecycle.is_draining(),
            "in_flight": self.lifecycle.in_flight(),
            "environment": self.config.auth.environment.to_string(),
            "upstream": format!("{}:{}", self.config.upstream.host, self.config.upstream.port),
            "certificate": certificate,
            "finhub_clock": self.sessions.clock().report(),
            "tenants": tenants,
            "rate_limits": null,
            "redis": self.metrics.redis.views().report(),
        })
    }
}

fn json_response(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Answers one admin request from `peer`.
pub fn handle(
    state: &AdminState,
    method: &Method,
    path: &str,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    match (path, method) {
        ("/live", &Method::GET) => match state.not_live_reason() {
            None => json_response(StatusCode::OK, json!({"status": "live"})),
            Some(reason) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "not_live", "reason": reason}),
            ),
        },
        ("/ready", &Method::GET) => match state.not_ready_reason() {
            None => json_response(StatusCode::OK, json!({"status": "ready"})),
            Some(reason) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "not_ready", "reason": reason}),
            ),
        },
        ("/metrics", &Method::GET) => {
            let mut r = Response::new(Full::new(Bytes::from(state.metrics.render())));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        ("/status", &Method::GET) => json_response(StatusCode::OK, state.status()),
        ("/shutdown", &Method::POST) if state.config.admin.shutdown_endpoint => {
            if !peer.ip().to_canonical().is_loopback() {
                return json_response(
                    StatusCode::FORBIDDEN,
                    json!({"error": "forbidden", "message": "shutdown is accepted from loopback only"}),
                );
            }
            tracing::info!(%peer, "shutdown requested through the admin endpoint");
            state.lifecycle.request_shutdown();
            json_response(StatusCode::ACCEPTED, json!({"status": "draining"}))
        }
        ("/shutdown", _) if !state.config.admin.shutdown_endpoint => json_response(
            StatusCode::NOT_FOUND,
            json!({"error": "not_found", "message": "unknown admin endpoint (POST /shutdown needs admin.shutdown_endpoint = true)"}),
        ),
        ("/live" | "/ready" | "/metrics" | "/status" | "/shutdown", _) => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "method_not_allowed", "message": "wrong method for this endpoint"}),
        ),
        _ => json_response(
            StatusCode::NOT_FOUND,
            json!({"error": "not_found", "message": "unknown admin endpoint"}),
        ),
    }
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: std::net::TcpListener, state: Arc<AdminState>) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin listener unusable");
            return;
        }
    };
    let open = Arc::new(std::sync::Mutex::new(OpenConnections::default()));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = Source::of(peer.ip(), stream.local_addr().ok().map(|a| a.ip()));
        let (id, close) = lock(&open).admit(source);
        let (state, open) = (state.clone(), open.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = handle(&state, req.method(), req.uri().path(), peer);
                async move { Ok::<_, Infallible>(resp) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT);
            tokio::select! {
                _ = builder.serve_connection(TokioIo::new(CappedHeader::new(stream)), svc) => {}
                _ = close.notified() => {}
            }
            lock(&open).remove(source, id);
        });
    }
}

/// The admin connection's stream: each request header is capped at
/// [`ADMIN_MAX_HEADER_BYTES`] while it is read (hyper would buffer about 400 KiB). Reads never
/// take more than what is left of the cap; past it the peer gets a JSON 431 and end of stream.
/// Bytes after a header's end (a body, the next request) count toward the next header: no
/// admin endpoint takes a body.
struct CappedHeader {
    inner: tokio::net::TcpStream,
    line: LineState,
    read: usize,
    refused: bool,
}

/// The answer to an admin request header over the cap: 431 with a JSON body, then close.
fn header_too_large() -> Vec<u8> {
    let body = json!({
        "error": "request_headers_too_large",
        "message": format!("admin request header over {} KiB", ADMIN_MAX_HEADER_BYTES / 1024),
    })
    .to_string();
    format!(
        "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl CappedHeader {
    fn new(inner: tokio::net::TcpStream) -> Self {
        CappedHeader {
            inner,
            line: LineState::Leading,
            read: 0,
            refused: false,
        }
    }

    /// Accounts `bytes` just read: header ends reset the count.
    fn saw(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.line.feed(bytes) {
                Some(end) => {
                    bytes = &bytes[end..];
                    self.line = LineState::Leading;
                    self.read = 0;
                }
                None => {
                    self.read += bytes.len();
                    return;
                }
            }
        }
    }
}

impl AsyncRead for CappedHeader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.refused {
            return Poll::Ready(Ok(()));
        }
        let budget = ADMIN_MAX_HEADER_BYTES.saturating_sub(self.read);
        if budget == 0 {
            // Best effort, never waits: a fresh socket's send buffer takes these bytes.
            let _ = self.inner.try_write(&header_too_large());
            self.refused = true;
            return Poll::Ready(Ok(()));
        }
        let mut capped = buf.take(budget);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut capped))?;
        let n = capped.filled().len();
        let this = &mut *self;
        this.saw(&capped.filled()[..n]);
        // SAFETY: `capped` wrote these `n` bytes into `buf`'s unfilled part.
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for CappedHeader {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Where an admin connection comes from. Every process in the pod shares its network
/// namespace, so all of them count as one source: loopback or the listener's own address. The
/// kubelet (node IP) and Prometheus (its pod IP) are other sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    /// This pod.
    Local,
    /// Another host.
    Remote(std::net::IpAddr),
}

impl Source {
    fn of(peer: std::net::IpAddr, local: Option<std::net::IpAddr>) -> Source {
        let peer = peer.to_canonical();
        if peer.is_loopback() || Some(peer) == local.map(|l| l.to_canonical()) {
            Source::Local
        } else {
            Source::Remote(peer)
        }
    }
}

/// The admin connections open now, by source and oldest first, each with a handle that closes
/// it. A source over its share closes its own oldest connection; when every slot is taken the
/// largest source gives one up. So a flood from inside the pod only ever evicts its own
/// connections, never the kubelet's probes.
#[derive(Default)]
struct OpenConnections {
    next_id: u64,
    total: usize,
    by_source: std::collections::HashMap<
        Source,
        std::collections::VecDeque<(u64, Arc<tokio::sync::Notify>)>,
    >,
}

impl OpenConnections {
    /// Registers a new connection from `source`, closing another one if needed.
    fn admit(&mut self, source: Source) -> (u64, Arc<tokio::sync::Notify>) {
        let own = self.by_source.get(&source).map_or(0, |q| q.len());
        let victim = if own >= ADMIN_CONNECTIONS_PER_SOURCE {
            Some(source)
        } else if self.total >= MAX_ADMIN_CONNECTIONS {
            self.by_source
                .iter()
                .max_by_key(|(_, q)| q.len())
                .map(|(s, _)| *s)
        } else {
            None
        };
        if let Some(q) = victim.and_then(|v| self.by_source.get_mut(&v)) {
            if let Some((_, oldest)) = q.pop_front() {
                self.total -= 1;
                // Stores a permit: the connection closes even if it is not waiting yet.
                oldest.notify_one();
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let close = Arc::new(tokio::sync::Notify::new());
        self.by_source
            .entry(source)
            .or_default()
            .push_back((id, close.clone()));
        self.total += 1;
        (id, close)
    }

    fn remove(&mut self, source: Source, id: u64) {
        if let Some(q) = self.by_source.get_mut(&source) {
            let before = q.len();
            q.retain(|(i, _)| *i != id);
            self.total -= before - q.len();
            if q.is_empty() {
                self.by_source.remove(&source);
            }
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::SessionTable;
    use crate::config::Config;
    use crate::lifecycle::Lifecycle;
    use crate::metrics::Metrics;
    use crate::tls::{RulePolicy, TlsFiles};
    use std::time::Duration;
    use std::time::Instant;

    fn state() -> AdminState {
        let toml = r#"
[upstream]
base_url = "https://api.finhub.cloud"
[auth]
environment = "integration"
[[tenants]]
id = "t1"
username = "u"
password = "${PW}"
"#;
        let config = Config::from_toml(std::path::Path::new("/x/proxy.toml"), toml, &|_| {
            Some("pw-secret".into())
        })
        .unwrap();
        let tls = TlsFiles {
            cert_key: None,
            ca: None,
            policy: RulePolicy::Warn,
        }
        .load(unix_now())
        .unwrap();
        let metrics = Metrics::new();
        let sessions = Arc::new(SessionTable::new(&config));
        let (audit, _guard) = crate::audit::Audit::open(
            &crate::config::AuditOutput::Off,
            false,
            crate::config::DEFAULT_AUDIT_FLUSH_INTERVAL,
        )
        .unwrap();
        AppState {
            upstream: Arc::new(crate::upstream::UpstreamAddrs::new("api.finhub.cloud", 443)),
            sessions,
            config: Arc::new(config),
            tls: Arc::new(crate::tls::TlsStore::new(tls)),
            lifecycle: Lifecycle::new(Duration::ZERO, Duration::ZERO, metrics.clone()),
            metrics,
            audit,
            started: Instant::now(),
            tracer: None,
        }
    }

    #[test]
    fn shutdown_does_not_exist_unless_enabled() {
        let s = state();
        let r = handle(
            &s,
            &Method::POST,
            "/shutdown",
            "127.0.0.1:5555".parse().unwrap(),
        );
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(!s.lifecycle.is_draining());
    }

    #[test]
    fn a_local_flood_only_evicts_its_own_connections() {
        let local = Source::of(
            "127.0.0.1".parse().unwrap(),
            Some("10.1.2.3".parse().unwrap()),
        );
        assert_eq!(local, Source::Local);
        assert_eq!(
            Source::of(
                "10.1.2.3".parse().unwrap(),
                Some("10.1.2.3".parse().unwrap())
            ),
            Source::Local,
            "the pod's own address is the pod"
        );
        let kubelet = Source::of(
            "10.0.0.1".parse().unwrap(),
            Some("10.1.2.3".parse().unwrap()),
        );
        let mut open = OpenConnections::default();
        let (probe, probe_close) = open.admit(kubelet);
        let (first_local, first_close) = open.admit(Source::Local);
        for _ in 0..10 * MAX_ADMIN_CONNECTIONS {
            open.admit(Source::Local);
        }
        let held = |open: &OpenConnections, s: Source, id: u64| {
            open.by_source
                .get(&s)
                .is_some_and(|q| q.iter().any(|(i, _)| *i == id))
        };
        assert!(held(&open, kubelet, probe), "the probe survives the flood");
        assert!(!held(&open, Source::Local, first_local));
        assert_eq!(
            open.by_source[&Source::Local].len(),
            ADMIN_CONNECTIONS_PER_SOURCE
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), first_close.notified())
                .await
                .expect("the flood's oldest connection was told to close");
            assert!(
                tokio::time::timeout(Duration::from_millis(50), probe_close.notified())
                    .await
                    .is_err(),
                "the probe was not"
            );
        });
        // Many remote sources fill the listener: the largest gives way, the total holds.
        for i in 0..2 * MAX_ADMIN_CONNECTIONS {
            let ip = std::net::IpAddr::from([10, 9, (i / 200) as u8, (i % 200) as u8]);
            open.admit(Source::Remote(ip));
        }
        assert_eq!(open.total, MAX_ADMIN_CONNECTIONS);
        assert_eq!(
            open.total,
            open.by_source.values().map(|q| q.len()).sum::<usize>()
        );
        open.remove(kubelet, probe);
        assert_eq!(
            open.total,
            open.by_source.values().map(|q| q.len()).sum::<usize>()
        );
    }

    #[test]
    fn shutdown_is_refused_from_a_non_loopback_peer() {
        let mut s = state();
        let mut config = (*s.config).clone();
        config.admin.shutdown_endpoint = true;
        s.config = Arc::new(config);
        let r = handle(
            &s,
            &Method::POST,
            "/shutdown",
            "10.1.2.3:5555".parse().unwrap(),
        );
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(!s.lifecycle.is_draining());
        let r = handle(
            &s,
            &Method::POST,
            "/shutdown",
            "127.0.0.1:5555".parse().unwrap(),
        );
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        assert!(s.lifecycle.is_draining());
        let r = handle(
            &s,
            &Method::POST,
            "/shutdown",
            "[::ffff:127.0.0.1]:5555".parse().unwrap(),
        );
        assert_eq!(r.status(), StatusCode::ACCEPTED, "IPv4-mapped loopback");
    }

    #[test]
    fn not_ready_without_sessions_and_status_has_no_secret() {
        let s = state();
        assert!(s.not_ready_reason().unwrap().contains("t1"));
        let text = s.status().to_string();
        assert!(text.contains("\"t1\""));
        assert!(!text.contains("pw-secret"));
        let r = handle(&s, &Method::GET, "/nope", "127.0.0.1:1".parse().unwrap());
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
}
