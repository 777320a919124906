//! A FinHub emulator for the demo and the tests: a real HTTPS server (HTTP/1.1 and h2, optional
//! or required mTLS) on loopback implementing login, refresh, logout and an echo API the way
//! `finhub-protocol.md` describes them (§2, §4, §5, §6, §9), with knobs to inject failures.
//!
//! ```text
//! POST /api/v2/auth/sandbox/token   login, sandbox/playground body (customerId or customerKey)
//! POST /api/v2/auth/token           login, integration/production body (grantType)
//! POST /api/v2/auth/token/refresh   refresh with the 10 % rule
//! POST /api/v2/auth/logout          revoke one token
//! *    /api/...                     echo: validates the session headers, answers what it saw
//! ```
//!
//! Times are FinHub's: whole-second `iat`/`exp`, `expires_in` = whole seconds left when the
//! answer is made, the 10 % refresh rule and every expiry check on the emulator's own clock,
//! which can be set off the real one ([`Controls::set_clock_offset_ms`]); every answer carries
//! a `Date` header from that clock. The token issuer's clock can differ from the gateway's
//! `Date` clock ([`Controls::set_token_clock_offset_ms`]), and tokens can carry the claims of
//! a buggy issuer ([`ClaimStyle`]).
//!
//! Nothing secret is logged; only `debug` lines with method, path and status.

mod faults;
mod handlers;
mod state;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::pki::{cert_identity, CertIdentity};
pub use faults::ApiFaults;
pub use state::{Controls, LogoutRecord, RecordedRequest, Stats};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Client-certificate policy of the emulator's TLS listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MtlsMode {
    /// A certificate issued by `client_ca_pem` is mandatory (production).
    Required,
    /// A certificate is verified if presented, not required (sandbox, integration).
    Optional,
    /// No certificate is requested.
    #[default]
    Off,
}

/// Shape of login and refresh answers (protocol §2.8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResponseShape {
    /// Flat, snake_case `expires_in`, `userSessionToken`, `refreshToken` (guides).
    #[default]
    S1,
    /// `access_token` style (sandbox quick start).
    S2,
    /// Flat camelCase `expiresIn` (generated API reference).
    S3,
    /// Envelope `{code,message,data{userSessionToken,expiresIn,…}}` (try-it widgets).
    S4,
}

/// How the emulator writes `iat`/`exp` into tokens (issuer bugs seen in the wild). The
/// server-side validity, `expires_in` and the 10 % rule stay the real ones in every style.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClaimStyle {
    /// Whole seconds (RFC 7519), `exp = iat + lifetime`.
    #[default]
    Seconds,
    /// `iat` and `exp` in milliseconds.
    Milliseconds,
    /// `exp` ten years after `iat`.
    FarFutureExp,
    /// `exp` a lifetime before `iat` (already past when issued).
    PastExp,
}

/// A user the emulator accepts. `Debug` hides the password and the customer secret.
#[derive(Clone)]
pub struct EmulatorUser {
    /// Login name.
    pub username: String,
    /// Password (secret).
    pub password: String,
    /// Client id (`customerId` / `customerKey`).
    pub customer_id: String,
    /// Client secret (secret).
    pub customer_secret: String,
    /// The user's tenant (`X-Tenant-ID` must match it).
    pub tenant_id: String,
}

impl fmt::Debug for EmulatorUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatorUser")
            .field("username", &self.username)
            .field("customer_id", &self.customer_id)
            .field("tenant_id", &self.tenant_id)
            .finish_non_exhaustive()
    }
}

/// Emulator settings; start from [`EmulatorConfig::new`] and adjust fields.
#[derive(Clone)]
pub struct EmulatorConfig {
    /// Listen address (`127.0.0.1:0` picks a free port; see [`Emulator::addr`]).
    pub listen: SocketAddr,
    /// Server certificate chain (PEM).
    pub server_cert_pem: String,
    /// Server private key (PEM, secret).
    pub server_key_pem: String,
    /// CA that verifies client certificates; needed unless `mtls` is `Off`.
    pub client_ca_pem: Option<String>,
    /// Client-certificate policy.
    pub mtls: MtlsMode,
    /// Lifetime of issued tokens (changeable later with [`Controls::set_token_lifetime`]).
    pub token_lifetime: Duration,
    /// HS256 key of the session JWTs (secret).
    pub jwt_secret: Vec<u8>,
    /// Production-like header checks: the API also needs `X-Request-ID`, `X-Session-ID`,
    /// `X-Correlation-ID`; login also `User-Agent`, `sec-ch-ua-platform`, `X-Tenant-ID`.
    /// (`X-Forwarded-For` is required on login and logout in either mode.)
    pub strict_headers: bool,
    /// Users that may log in.
    pub users: Vec<EmulatorUser>,
    /// Initial shape of login/refresh answers.
    pub response_shape: ResponseShape,
    /// Put an `internalTokenKey` claim in tokens (A3); without it refresh always fails.
    pub include_internal_token_key: bool,
    /// How many echo API requests [`Controls::api_requests`] keeps (the most recent; 0 = none).
    pub max_recorded: usize,
    /// Milliseconds the emulator's clock runs ahead of the real one (negative: behind); see
    /// [`Controls::set_clock_offset_ms`].
    pub clock_offset_ms: i64,
}

impl fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("listen", &self.listen)
            .field("mtls", &self.mtls)
            .field("token_lifetime", &self.token_lifetime)
            .field("strict_headers", &self.strict_headers)
            .field("users", &self.users)
            .field("response_shape", &self.response_shape)
            .field(
                "include_internal_token_key",
                &self.include_internal_token_key,
            )
            .field("max_recorded", &self.max_recorded)
            .field("clock_offset_ms", &self.clock_offset_ms)
            .finish_non_exhaustive()
    }
}

impl EmulatorConfig {
    /// Defaults: no mTLS, 3600 s tokens, a random JWT key, lenient headers, S1 answers,
    /// `internalTokenKey` on, the real clock, and the demo user (`demo` / `demo-password`, customer
    /// `demo-customer` / `demo-secret`, tenant `tenant-demo`).
    pub fn new(listen: SocketAddr, server_cert_pem: String, server_key_pem: String) -> Self {
        EmulatorConfig {
            listen,
            server_cert_pem,
            server_key_pem,
            client_ca_pem: None,
            mtls: MtlsMode::Off,
            token_lifetime: Duration::from_secs(3600),
            jwt_secret: rand::random::<[u8; 32]>().to_vec(),
            strict_headers: false,
            users: vec![EmulatorUser {
                username: "demo".into(),
                password: "demo-password".into(),
                customer_id: "demo-customer".into(),
                customer_secret: "demo-secret".into(),
                tenant_id: "tenant-demo".into(),
            }],
            response_shape: ResponseShape::S1,
            include_internal_token_key: true,
            max_recorded: 10_000,
            clock_offset_ms: 0,
        }
    }
}

/// Why the emulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Requested address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// Certificates, key or CA unusable.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// Inconsistent settings.
    #[error("configuration: {0}")]
    Config(String),
}

/// What the handlers know about the connection a request came on.
pub(crate) struct ConnInfo {
    pub client_cert: Option<CertIdentity>,
    pub sni: Option<String>,
    /// Notified to reset the connection (RST, no answer): a fault of FinHub's.
    pub reset: tokio::sync::Notify,
}

impl ConnInfo {
    /// Resets the connection; the caller's request then never completes.
    pub(crate) async fn abort(&self) -> ! {
        self.reset.notify_one();
        std::future::pending().await
    }
}

/// A running emulator. Stops accepting (and closes idle connections) on [`Emulator::shutdown`]
/// or drop.
pub struct Emulator {
    addr: SocketAddr,
    controls: Controls,
    stop: watch::Sender<bool>,
}

impl fmt::Debug for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emulator")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Emulator {
    /// Binds, then serves on the current tokio runtime until shut down.
    pub async fn start(cfg: EmulatorConfig) -> Result<Emulator, EmulatorError> {
        let acceptor = TlsAcceptor::from(Arc::new(tls_config(&cfg)?));
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| EmulatorError::Bind {
                    addr: cfg.listen,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EmulatorError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let shared = Arc::new(state::Shared::new(&cfg));
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(accept_loop(listener, acceptor, shared.clone(), stop_rx));
        tracing::debug!(%addr, mtls = ?cfg.mtls, "FinHub emulator listening");
        Ok(Emulator {
            addr,
            controls: Controls { shared },
            stop,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Knobs and observations.
    pub fn controls(&self) -> &Controls {
        &self.controls
    }

    /// Stops accepting; open connections finish their in-flight requests and close.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn tls_config(cfg: &EmulatorConfig) -> Result<rustls::ServerConfig, EmulatorError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(cfg.server_cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EmulatorError::Tls(format!("server certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(EmulatorError::Tls("no server certificate in PEM".into()));
    }
    // The key's parse error is not echoed: it could quote key material.
    let key = PrivateKeyDer::from_pem_slice(cfg.server_key_pem.as_bytes())
        .map_err(|_| EmulatorError::Tls("server private key PEM does not parse".into()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| EmulatorError::Tls(e.to_string()))?;
    let builder = match cfg.mtls {
        MtlsMode::Off => builder.with_no_client_auth(),
        MtlsMode::Required | MtlsMode::Optional => {
            let pem = cfg.client_ca_pem.as_deref().ok_or_else(|| {
                EmulatorError::Config("client_ca_pem is needed unless mtls is Off".into())
            })?;
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let ca = ca.map_err(|e| EmulatorError::Tls(format!("client CA PEM: {e}")))?;
                roots
                    .add(ca)
                    .map_err(|e| EmulatorError::Tls(format!("client CA: {e}")))?;
            }
            if roots.is_empty() {
                return Err(EmulatorError::Tls("no certificate in client_ca_pem".into()));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if cfg.mtls == MtlsMode::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| EmulatorError::Tls(format!("client verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| EmulatorError::Tls(format!("server certificate/key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Makes the close of `fd` a reset (SO_LINGER 0); the caller then drops the connection.
fn abort(fd: std::os::fd::RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is the connection's socket, still open (the connection that owns it is
    // dropped only after this returns); `linger` is a valid `struct linger` of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!("emulator could not set SO_LINGER for a reset");
    }
}

/// Resolves once shutdown was requested (or the [`Emulator`] is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard returned by `wait_for` is not `Send`; drop it right here.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<state::Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    tokio::spawn(serve_connection(tcp, peer, acceptor.clone(), shared.clone(), stop.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::debug!(error = %e, "emulator accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        }
    }
    tracing::debug!("FinHub emulator stopped accepting");
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<state::Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "emulator TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "emulator TLS handshake timed out");
            return;
        }
    };
    let client_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| cert_identity(leaf));
    let sni = tls.get_ref().1.server_name().map(str::to_string);
    let conn = Arc::new(ConnInfo {
        client_cert,
        sni,
        reset: tokio::sync::Notify::new(),
    });
    let control = conn.clone();
    let service = hyper::service::service_fn(move |req| {
        let (shared, conn) = (shared.clone(), conn.clone());
        async move { Ok::<_, std::convert::Infallible>(handlers::handle(shared, conn, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let served = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(served);
    let result = tokio::select! {
        r = served.as_mut() => r,
        _ = stopped(&mut stop) => {
            served.as_mut().graceful_shutdown();
            served.await
        }
        _ = control.reset.notified() => {
            abort(fd);
            return;
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "emulator connection ended with an error");
    }
}
