//! Egress through an HTTP CONNECT proxy (`upstream.egress_proxy`).
//!
//! Every new FinHub connection of the API path is a tunnel: TCP to the proxy, `CONNECT
//! host:port HTTP/1.1` (with `Proxy-Authorization: Basic` when configured, on the CONNECT only),
//! a 2xx answer read within `upstream.connect_timeout` and capped in size, then the bare stream
//! is handed to Pingora, which runs TLS with the client certificate end to end inside it. The
//! proxy never sees plaintext. Pingora opens the stream through [`Tunnel`], its public
//! `PeerOptions::custom_l4` hook; pooled tunnels are reused like direct connections.
//!
//! A refusal is typed ([`EgressError`]) and travels as the cause of the Pingora error, so
//! `error.rs` classifies it by walking the cause chain; each failure is counted in
//! `finhub_sidecar_egress_proxy_errors_total{path, reason}` ([`EgressMetrics`]).

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use pingora::connectors::L4Connect;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::{Error, ErrorType};
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::ProxyAuth;

/// The largest CONNECT answer header read from a proxy.
pub const MAX_ANSWER_BYTES: usize = 8 * 1024;

/// The most header lines read in one CONNECT answer (an 8 KiB answer of short headers stays
/// readable).
pub const MAX_ANSWER_HEADERS: usize = 128;

/// Why a tunnel through the egress proxy could not be opened. Carries no credential and no
/// byte of the proxy's answer beyond its status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    /// The proxy could not be reached (refused, unreachable, or no TCP connection in time).
    #[error("the egress proxy could not be reached ({0:?})")]
    Unreachable(std::io::ErrorKind),
    /// The proxy answered the CONNECT with a non-2xx status (407, 403, 502, ...).
    #[error("the egress proxy refused the tunnel (HTTP {0})")]
    Refused(u16),
    /// The proxy's answer was not a well-formed HTTP/1.x response header within the size cap,
    /// it closed before answering, or it sent bytes after its 2xx answer.
    #[error("the egress proxy sent a malformed answer")]
    Malformed,
    /// The proxy accepted the connection but did not answer the CONNECT in time.
    #[error("the egress proxy did not answer the CONNECT in time")]
    Timeout,
}

impl EgressError {
    /// The `reason` label of `finhub_sidecar_egress_proxy_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            EgressError::Unreachable(_) => "unreachable",
            EgressError::Refused(_) => "refused",
            EgressError::Malformed => "malformed",
            EgressError::Timeout => "timeout",
        }
    }

    /// Every `reason` label, to create the series at 0.
    pub const REASONS: [&'static str; 4] = ["unreachable", "refused", "malformed", "timeout"];
}

/// The `path` label of `finhub_sidecar_egress_proxy_errors_total`: whose tunnel failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EgressPath {
    /// Pingora's pool (the API path).
    Api,
    /// Login, refresh and logout.
    Auth,
}

impl EgressPath {
    /// Every path, to create the series at 0.
    pub const ALL: [EgressPath; 2] = [EgressPath::Api, EgressPath::Auth];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            EgressPath::Api => "api",
            EgressPath::Auth => "auth",
        }
    }
}

/// The egress proxy's metrics; cheap to clone.
#[derive(Clone, Debug)]
pub struct EgressMetrics {
    /// `finhub_sidecar_egress_proxy_errors_total{path="api|auth", reason="unreachable|refused|malformed|timeout"}`:
    /// CONNECT tunnels through `upstream.egress_proxy` that could not be opened, for the API
    /// pool or for login/refresh/logout.
    errors: IntCounterVec,
}

impl EgressMetrics {
    /// The egress metrics, registered in `registry` (a fresh one: each name once), every
    /// series created at 0.
    pub fn register(registry: &Registry) -> Self {
        let m = EgressMetrics::unregistered();
        crate::registry::register_all(registry, [Box::new(m.errors.clone()) as _]);
        m
    }

    /// The metrics without a registry (counted, never exported: tests and tools).
    pub fn unregistered() -> Self {
        let errors = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_egress_proxy_errors_total",
                "CONNECT tunnels through the egress proxy that could not be opened, by path and reason",
            ),
            &["path", "reason"],
        )
        .expect("static metric definition is valid");
        for path in EgressPath::ALL {
            for reason in EgressError::REASONS {
                errors.with_label_values(&[path.as_str(), reason]);
            }
        }
        EgressMetrics { errors }
    }

    /// Counts a tunnel on `path` that could not be opened because of `e`.
    pub fn count(&self, path: EgressPath, e: &EgressError) {
        self.errors
            .with_label_values(&[path.as_str(), e.reason()])
            .inc();
    }

    /// How many tunnels on `path` failed with `reason` so far (tests read the counter).
    #[cfg(test)]
    fn errors(&self, path: EgressPath, reason: &str) -> u64 {
        self.errors
            .with_label_values(&[path.as_str(), reason])
            .get()
    }
}

/// Opens CONNECT tunnels to one target through the proxy at the address Pingora dials.
#[derive(Debug)]
pub struct Tunnel {
    /// `host:port` sent in the CONNECT line and `Host` (IPv6 literals bracketed).
    target: String,
    auth: Option<ProxyAuth>,
    /// Bound on TCP connect plus the CONNECT exchange (Pingora does not bound custom
    /// connectors itself).
    timeout: Duration,
    metrics: EgressMetrics,
    /// Whose tunnel this is, for the failures counted: the API pool's or the auth client's.
    path: EgressPath,
}

impl Tunnel {
    /// Tunnels to `host:port` with `auth`, each within `timeout`, counting failures in
    /// `metrics` under `path="api"` (see [`Tunnel::for_path`]).
    pub fn new(
        host: &str,
        port: u16,
        auth: Option<ProxyAuth>,
        timeout: Duration,
        metrics: EgressMetrics,
    ) -> Tunnel {
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Tunnel {
            target,
            auth,
            timeout,
            metrics,
            path: EgressPath::Api,
        }
    }

    /// The same tunnel, its failures counted under `path`.
    pub fn for_path(mut self, path: EgressPath) -> Tunnel {
        self.path = path;
        self
    }

    /// Opens one tunnel through the proxy at `proxy`; a failure is counted in
    /// `finhub_sidecar_egress_proxy_errors_total{path, reason}` and logged at debug (the
    /// caller's own failure line names it).
    pub async fn open(&self, proxy: SocketAddr) -> Result<TcpStream, EgressError> {
        let r = self.open_uncounted(proxy).await;
        if let Err(e) = &r {
            self.count(e);
            tracing::debug!(path = self.path.as_str(), reason = e.reason(), error = %e, %proxy, "egress proxy tunnel failed");
        }
        r
    }

    /// Counts `e` (a tunnel that could not be opened) under this tunnel's path.
    pub fn count(&self, e: &EgressError) {
        self.metrics.count(self.path, e);
    }

    async fn open_uncounted(&self, proxy: SocketAddr) -> Result<TcpStream, EgressError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut stream = match tokio::time::timeout_at(deadline, TcpStream::connect(proxy)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(EgressError::Unreachable(e.kind())),
            Err(_) => return Err(EgressError::Unreachable(std::io::ErrorKind::TimedOut)),
        };
        let request = connect_request(&self.target, self.auth.as_ref());
        match tokio::time::timeout_at(deadline, exchange(&mut stream, &request)).await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(EgressError::Timeout),
        }
    }
}

#[async_trait]
impl L4Connect for Tunnel {
    async fn connect(&self, addr: &PeerAddr) -> pingora::Result<Stream> {
        let Some(proxy) = addr.as_inet().copied() else {
            return Error::e_explain(ErrorType::InternalError, "egress proxy address is not IP");
        };
        match self.open(proxy).await {
            Ok(stream) => Ok(stream.into()),
            Err(e) => {
                // Counted and logged at debug by `open`: the request's own failure line
                // carries the code, not a second warning per failed connection.
                let etype = match e {
                    EgressError::Timeout => ErrorType::ConnectTimedout,
                    _ => ErrorType::ConnectProxyFailure,
                };
                Err(Error::because(etype, "opening the egress proxy tunnel", e))
            }
        }
    }
}

/// The CONNECT request for `target`; the only place the proxy password is put on the wire.
fn connect_request(target: &str, auth: Option<&ProxyAuth>) -> Vec<u8> {
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(a) = auth {
        let pair = format!("{}:{}", a.username, a.password.current().expose());
        let b64 = base64::engine::general_purpose::STANDARD.encode(pair.as_bytes());
        req.push_str("Proxy-Authorization: Basic ");
        req.push_str(&b64);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// Sends `request` and reads the proxy's answer header. Interim 1xx answers (100, 102, 103)
/// are skipped; the whole exchange stays within [`MAX_ANSWER_BYTES`].
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> Result<(), EgressError> {
    stream
        .write_all(request)
        .await
        .map_err(|e| EgressError::Unreachable(e.kind()))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let mut total = 0usize;
    loop {
        // A reset is the proxy (or the path to it) going away, not a malformed answer.
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| EgressError::Unreachable(e.kind()))?;
        if n == 0 {
            return Err(EgressError::Malformed);
        }
        total += n;
        buf.extend_from_slice(&chunk[..n]);
        while let Some((status, len)) = parse_answer(&buf)? {
            match status {
                // Switching protocols is no answer to a CONNECT.
                101 => return Err(EgressError::Malformed),
                100..=199 => {
                    buf.drain(..len);
                }
                _ => return verdict(status, buf.len() - len),
            }
        }
        if total >= MAX_ANSWER_BYTES {
            return Err(EgressError::Malformed);
        }
    }
}

/// What a complete answer header means: only a 2xx with nothing after it opens the tunnel (the
/// proxy must not speak before the TLS client does; any such bytes would be taken for TLS).
fn verdict(status: u16, trailing: usize) -> Result<(), EgressError> {
    match status {
        200..=299 if trailing == 0 => Ok(()),
        200..=299 => Err(EgressError::Malformed),
        s => Err(EgressError::Refused(s)),
    }
}

/// `Some((status, header length))` once `buf` holds a complete HTTP/1.x response header;
/// `None` while more is needed; an error when it can never be one (or exceeds the cap).
pub fn parse_answer(buf: &[u8]) -> Result<Option<(u16, usize)>, EgressError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_ANSWER_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let status = resp.code.ok_or(EgressError::Malformed)?;
            Ok(Some((status, len)))
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_ANSWER_BYTES => Ok(None),
        _ => Err(EgressError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::{Secret, SecretSource};

    #[test]
    fn answers_are_read_strictly() {
        assert_eq!(
            parse_answer(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Ok(Some((200, 39)))
        );
        assert_eq!(parse_answer(b"HTTP/1.1 200 OK\r\nVia: x"), Ok(None));
        assert_eq!(
            parse_answer(b"HTTP/1.0 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\n\r\n")
                .unwrap()
                .map(|a| a.0),
            Some(407)
        );
        assert_eq!(
            parse_answer(b"SSH-2.0-OpenSSH\r\n\r\n"),
            Err(EgressError::Malformed)
        );
        assert_eq!(
            parse_answer(b"HTTP/1.1 2000 OK\r\n\r\n"),
            Err(EgressError::Malformed)
        );
        let endless = [b"HTTP/1.1 200 OK\r\n".as_slice(), &b"X: y\r\n".repeat(2000)].concat();
        assert_eq!(parse_answer(&endless), Err(EgressError::Malformed));
        assert_eq!(verdict(200, 0), Ok(()));
        assert_eq!(verdict(200, 5), Err(EgressError::Malformed));
        for s in [301, 403, 407, 502, 503] {
            assert_eq!(verdict(s, 0), Err(EgressError::Refused(s)));
        }
    }

    #[test]
    fn the_request_carries_credentials_only_when_configured() {
        let plain = String::from_utf8(connect_request("api.finhub.cloud:443", None)).unwrap();
        assert_eq!(
            plain,
            "CONNECT api.finhub.cloud:443 HTTP/1.1\r\nHost: api.finhub.cloud:443\r\n\r\n"
        );
        let auth = ProxyAuth {
            username: "svc".into(),
            password: SecretSource::fixed(Secret::new("pw")),
        };
        let with = String::from_utf8(connect_request("[::1]:443", Some(&auth))).unwrap();
        assert!(with.starts_with("CONNECT [::1]:443 HTTP/1.1\r\n"), "{with}");
        // base64("svc:pw")
        assert!(
            with.contains("\r\nProxy-Authorization: Basic c3ZjOnB3\r\n"),
            "{with}"
        );
        let t = Tunnel::new(
            "::1",
            443,
            None,
            Duration::from_secs(1),
            EgressMetrics::unregistered(),
        );
        assert_eq!(t.target, "[::1]:443");
    }

    /// A one-shot proxy that answers `answer` to whatever it is sent.
    async fn fake_proxy(answer: &'static [u8]) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(answer).await.unwrap();
            // Hold the connection open until the client goes.
            let _ = s.read(&mut buf).await;
        });
        addr
    }

    fn tunnel() -> Tunnel {
        let metrics = EgressMetrics::unregistered();
        Tunnel::new(
            "finhub.test",
            443,
            None,
            Duration::from_millis(500),
            metrics,
        )
    }

    #[tokio::test]
    async fn refusals_timeouts_and_dead_proxies_are_told_apart() {
        let t = tunnel();
        let ok = fake_proxy(b"HTTP/1.1 200 Connection established\r\n\r\n").await;
        assert!(t.open(ok).await.is_ok());
        let denied = fake_proxy(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n").await;
        assert_eq!(t.open(denied).await.unwrap_err(), EgressError::Refused(407));
        let early = fake_proxy(b"HTTP/1.1 200 OK\r\n\r\n\x16\x03\x01").await;
        assert_eq!(t.open(early).await.unwrap_err(), EgressError::Malformed);
        // Accepts, never answers: bounded by the timeout.
        let silent = fake_proxy(b"").await;
        assert_eq!(t.open(silent).await.unwrap_err(), EgressError::Timeout);
        // Nothing listens there.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(matches!(
            t.open(closed).await.unwrap_err(),
            EgressError::Unreachable(_)
        ));
    }

    #[tokio::test]
    async fn interim_answers_many_headers_and_resets() {
        let t = tunnel();
        // 1xx answers are interim: the 2xx after them opens the tunnel.
        let interim = fake_proxy(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
        )
        .await;
        assert!(t.open(interim).await.is_ok());
        // Interim then a refusal: the refusal's code, not 100.
        let then_no = fake_proxy(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 407 No\r\n\r\n").await;
        assert_eq!(
            t.open(then_no).await.unwrap_err(),
            EgressError::Refused(407)
        );
        let switching = fake_proxy(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").await;
        assert_eq!(t.open(switching).await.unwrap_err(), EgressError::Malformed);
        // Endless interim answers stay within the size cap.
        let endless: &'static [u8] = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(400).leak();
        let many_100 = fake_proxy(endless).await;
        assert_eq!(t.open(many_100).await.unwrap_err(), EgressError::Malformed);
        // 40 short headers are well within 8 KiB: a normal 2xx.
        let mut wordy = b"HTTP/1.1 200 Connection established\r\n".to_vec();
        for i in 0..40 {
            wordy.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        wordy.extend_from_slice(b"\r\n");
        let wordy = fake_proxy(wordy.leak()).await;
        assert!(t.open(wordy).await.is_ok());
        // A reset right after the CONNECT is the proxy going away, not a malformed answer.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let resetting = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(s);
        });
        assert_eq!(
            t.open(resetting).await.unwrap_err(),
            EgressError::Unreachable(std::io::ErrorKind::ConnectionReset)
        );
        // Every failure above is counted under the tunnel's path.
        assert_eq!(t.metrics.errors(EgressPath::Api, "malformed"), 2);
        let auth = tunnel().for_path(EgressPath::Auth);
        let denied = fake_proxy(b"HTTP/1.1 407 No\r\n\r\n").await;
        assert!(auth.open(denied).await.is_err());
        assert_eq!(auth.metrics.errors(EgressPath::Auth, "refused"), 1);
    }
}
