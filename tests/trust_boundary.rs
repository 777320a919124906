//! The trust boundary, tried as a hostile app in the pod would: every request below is written
//! as raw bytes (HTTP clients would normalise most of them), against the real sidecar binary
//! and the real HTTPS+mTLS emulator. Each test is one promise: no app can read, revoke or misuse
//! the tenant's FinHub session, hold the sidecar's memory or connections, or see a secret in
//! its logs.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A parsed HTTP/1.1 response read off a raw socket.
#[derive(Debug)]
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The JSON `error` code of a refusal.
    fn code(&self) -> String {
        self.json()["error"].as_str().unwrap_or("").to_string()
    }
}

/// Connects to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// Reads one response (header, then a `Content-Length` body) within 10 s; `None` if the
/// connection closed (or failed) before a complete header.
async fn read_response(s: &mut TcpStream) -> Option<Raw> {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => body.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    Some(Raw {
        status,
        headers,
        body,
    })
}

/// Sends `bytes` on a new connection from 127.0.0.1 and reads one response.
async fn exchange(to: SocketAddr, bytes: &[u8]) -> Raw {
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_response(&mut s)
        .await
        .unwrap_or_else(|| panic!("no response to {}", bytes.escape_ascii()))
}

/// Whether the peer closes `s` within 10 s (reads return EOF or an error), discarding bytes.
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

const FORWARDER: &str = "127.0.0.3";

/// The sidecar config used by most tests: a trusted forwarder and a strict per-route bucket.
fn policy(config: SidecarConfig) -> SidecarConfig {
    config
        .trusted_forwarders(&["127.0.0.3/32"])
        .route_limit("/api/v2/payments", 1, 1)
}

async fn start() -> (World, finhub_testkit::emulator::Emulator, SidecarProcess) {
    World::start(policy).await
}

/// The value of a header as FinHub received it on the last API call.
fn sent_header(emu: &finhub_testkit::emulator::Emulator, name: &str) -> Option<String> {
    emu.controls()
        .api_requests()
        .last()?
        .header(name)
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_and_track_are_refused_locally() {
    let (_w, emu, sc) = start().await;
    for method in ["TRACE", "TRACK", "trace"] {
        let r = exchange(
            sc.proxy,
            format!("{method} /api/v2/anything HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(r.status, 405, "{method}: {r:?}");
        assert_eq!(r.code(), "method_not_allowed");
    }
    assert!(
        emu.controls().api_requests().is_empty(),
        "nothing reached FinHub"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_and_session_surface_is_the_sidecars_own() {
    let (_w, emu, sc) = start().await;
    let before = emu.controls().stats();
    let total = emu.controls().total_requests();
    let junk_login = r#"{"username":"demo","password":"wrong","customerId":"x","customerSecret":"y","accountType":"B2B"}"#;
    let attempts: Vec<(String, u16, &str)> = [
        ("POST", "/api/v2/auth/sandbox/token", 403, "reserved_path"),
        ("POST", "/api/v2/auth/token/refresh", 403, "reserved_path"),
        ("POST", "/api/v2/auth/logout", 403, "reserved_path"),
        ("POST", "/api/v2/session/logoutAll", 403, "reserved_path"),
        ("POST", "/API/v2/auth/logout", 403, "reserved_path"),
        ("POST", "/api/v2/AUTH/Logout", 403, "reserved_path"),
        (
            "POST",
            "/api/v2/auth;jsessionid=1/logout",
            400,
            "invalid_path",
        ),
        ("POST", "/;/api/v2/auth/logout", 400, "invalid_path"),
        ("POST", "/api/v2/;x/auth/logout", 400, "invalid_path"),
        ("POST", "/api/v1/auth/token", 403, "reserved_path"),
        ("POST", "/api/v2/customers/c-1/logout", 403, "reserved_path"),
        ("POST", "//api/v2/auth/logout", 400, "invalid_path"),
        ("POST", "/api/v2/./auth/logout", 400, "invalid_path"),
        ("POST", "/api/v2/x/../auth/logout", 400, "invalid_path"),
        ("POST", "/api/v2/%61uth/logout", 400, "invalid_path"),
        ("POST", "/api/v2/auth%2Flogout", 400, "invalid_path"),
        ("POST", "/api/v2\\auth/logout", 400, "invalid_path"),
        (
            "DELETE",
            "/api/v2.1/customer/individual/c-1/users/u-1/sessions/s-1",
            403,
            "reserved_path",
        ),
        (
            "POST",
            "http://api.finhub.cloud/api/v2/auth/logout",
            403,
            "reserved_path",
        ),
        (
            "POST",
            "http://api.finhub.cloud/;/api/v2/auth/logout",
            400,
            "invalid_path",
        ),
    ]
    .iter()
    .map(|(m, p, s, c)| (format!("{m} {p}"), *s, *c))
    .collect();
    for (line, status, code) in &attempts {
        // An absolute-form target must agree with Host (else Pingora refuses it as ambiguous).
        let host = if line.contains("http://") {
            "api.finhub.cloud"
        } else {
            "x"
        };
        let req = format!(
            "{line} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{junk_login}",
            junk_login.len()
        );
        let r = exchange(sc.proxy, req.as_bytes()).await;
        assert_eq!((r.status, r.code().as_str()), (*status, *code), "{line}");
    }
    assert_eq!(
        emu.controls().total_requests(),
        total,
        "no reserved request reached FinHub"
    );
    let after = emu.controls().stats();
    assert_eq!(after.logins, before.logins, "no extra sidecar login");
    assert_eq!(after.failed_logins, before.failed_logins);
    // The session survived: business calls still work with the same session.
    let r = exchange(
        sc.proxy,
        b"GET /api/v2/accounts HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(emu.controls().stats().logins, before.logins);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_refused_and_the_connection_closed() {
    let (_w, emu, sc) = start().await;
    for upgrade in ["websocket", "h2c", "anything/1.0"] {
        let mut s = TcpStream::connect(sc.proxy).await.unwrap();
        let req = format!(
            "GET /api/v2/stream HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let r = read_response(&mut s).await.expect("an answer");
        assert_eq!(r.status, 400, "{upgrade}: {r:?}");
        assert_eq!(r.code(), "upgrade_not_supported");
        assert!(closed_by_peer(&mut s).await, "{upgrade}: connection closed");
    }
    assert!(emu.controls().api_requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_read_over_every_field_line() {
    let (_w, emu, sc) = start().await;
    let refused = [
        "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-For: 198.51.100.1\r\n",
        "X-Forwarded-For: 203.0.113.9\r\nx-forwarded-for: 203.0.113.9\r\n",
        "X-Forwarded-For: 0.0.0.0\r\n",
        "X-Forwarded-For: 127.0.0.1\r\n",
        "X-Forwarded-For: ::1\r\n",
        "X-Forwarded-For: ::ffff:127.0.0.1\r\n",
        "X-Forwarded-For: 224.0.0.1\r\n",
        "X-Forwarded-For: 203.0.113.9,\r\n",
    ];
    for xff in refused {
        let mut s = connect_from(FORWARDER, sc.proxy).await;
        let req = format!("GET /api/v2/accounts HTTP/1.1\r\nHost: x\r\n{xff}\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let r = read_response(&mut s).await.expect("an answer");
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "invalid_forwarded_for"),
            "{xff}"
        );
    }
    assert!(emu.controls().api_requests().is_empty());
    // One address on one line is the end user's.
    let mut s = connect_from(FORWARDER, sc.proxy).await;
    s.write_all(
        b"GET /api/v2/accounts HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n",
    )
    .await
    .unwrap();
    let r = read_response(&mut s).await.expect("an answer");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        sent_header(&emu, "x-forwarded-for").as_deref(),
        Some("203.0.113.9")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_override_and_client_ip_headers_never_reach_finhub() {
    let (_w, emu, sc) = start().await;
    let req = concat!(
        "GET /api/v2/accounts HTTP/1.1\r\nHost: x\r\n",
        "x-user_session-token: app-session\r\n",
        "X_User_Session_Token: app-session-2\r\n",
        "x_session_active: false\r\n",
        "Proxy_Authorization: Basic YXBwOnB3\r\n",
        "X-HTTP-Method-Override: DELETE\r\n",
        "X-HTTP-Method: DELETE\r\n",
        "X-Method-Override: DELETE\r\n",
        "X-Original-URL: /api/v2/auth/logout\r\n",
        "X-Rewrite-URL: /api/v2/auth/logout\r\n",
        "True-Client-IP: 203.0.113.66\r\n",
        "X-Client-IP: 203.0.113.67\r\n",
        "X-Real-IP: 203.0.113.68\r\n",
        "X_Forwarded_For: 203.0.113.69\r\n",
        "X-Forwarded-Host: evil.example\r\n",
        "X_Tenant_ID: other-tenant\r\n",
        "X-App: kept\r\n",
        "\r\n"
    );
    let r = exchange(sc.proxy, req.as_bytes()).await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = emu.controls().api_requests();
    let names: Vec<&str> = seen[0].headers.iter().map(|(k, _)| k.as_str()).collect();
    for gone in [
        "x-user_session-token",
        "x_user_session_token",
        "x_session_active",
        "proxy_authorization",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
        "true-client-ip",
        "x-client-ip",
        "x-real-ip",
        "x_forwarded_for",
        "x-forwarded-host",
        "x_tenant_id",
    ] {
        assert!(!names.contains(&gone), "{gone} reached FinHub: {names:?}");
    }
    assert!(names.contains(&"x-app"));
    assert_eq!(seen[0].method, "GET");
    for v in seen[0].headers.iter().map(|(_, v)| v) {
        assert!(
            !v.contains("203.0.113.6"),
            "a client IP claim got through: {v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_limits_match_the_normalised_path() {
    let (_w, emu, sc) = start().await;
    // The route bucket holds one request; every spelling of the path draws from it.
    let first = exchange(
        sc.proxy,
        b"GET /api/v2/payments HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(first.status, 200, "{first:?}");
    for path in ["/API/v2/payments", "/api/V2/Payments/1"] {
        let r = exchange(
            sc.proxy,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (429, "rate_limited"),
            "{path}"
        );
    }
    for path in [
        "//api/v2/payments",
        "/api/v2/./payments",
        "/api/v2/%70ayments",
        "/api/v2/payments;x=1",
        "/;/api/v2/payments",
    ] {
        let r = exchange(
            sc.proxy,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "invalid_path"),
            "{path}"
        );
    }
    assert_eq!(emu.controls().api_requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pingora_parse_errors_and_malformed_bodies_are_json_400s() {
    let (_w, emu, sc) = start().await;
    let cases: [&[u8]; 5] = [
        b"GET /api/v2/accounts HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"POST /api/v2/accounts HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"GET /api/v2/accounts HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
        b"POST /api/v2/accounts HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /api/v2/accounts HTTP/1.1\r\nHost: a\r\nContent-Length: x1\r\n\r\n",
    ];
    for raw in cases {
        let r = exchange(sc.proxy, raw).await;
        assert_eq!(r.status, 400, "{}: {r:?}", raw.escape_ascii());
        assert_eq!(r.code(), "invalid_request", "{}", raw.escape_ascii());
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(r.header("server").is_none_or(|s| !s.contains("Pingora")));
    }
    // A malformed chunked body is the app's fault, not FinHub's.
    let r = exchange(
        sc.proxy,
        b"POST /api/v2/payments/1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n\r\n",
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "invalid_request"),
        "{r:?}"
    );
    assert!(emu
        .controls()
        .api_requests()
        .iter()
        .all(|r| r.status != 200 || r.method != "POST"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_peers_hold_no_memory_and_are_closed_before_a_byte_is_read() {
    // Only 127.0.0.2 is an app; the test's own connections come from 127.0.0.1.
    let (_world, _emu, sc) = World::start(|c| c.allowed_clients(&["127.0.0.2/32"])).await;
    let rss_before = sc.peak_rss_kib();
    let refusals = "finhub_sidecar_listener_refusals_total{reason=\"client_not_allowed\"}";
    // wait_ready's own connection check came from a refused address too.
    let refused_before = sc.counter(refusals).await;
    // One header line just under Pingora's own 1 MiB limit, never terminated: Pingora alone
    // would hold it (and its buffer) until its read timeout.
    let header_flood = {
        let mut v = b"GET /api/v2/accounts HTTP/1.1\r\nHost: x\r\nX-Padding: ".to_vec();
        v.resize(1_000_000, b'a');
        v
    };
    let mut tasks = Vec::new();
    for _ in 0..120 {
        let (to, flood) = (sc.proxy, header_flood.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(to).await.unwrap();
            // The sidecar may close before the whole flood is written: that is the point.
            let _ = s.write_all(&flood).await;
            closed_by_peer(&mut s).await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap(), "a refused peer's connection stays open");
    }
    let growth_kib = sc.peak_rss_kib().saturating_sub(rss_before);
    eprintln!("RSS growth under 120 x 1 MiB header floods from refused peers: {growth_kib} KiB");
    assert!(
        growth_kib < 16 * 1024,
        "peak RSS grew by {growth_kib} KiB under the flood"
    );
    assert_eq!(sc.metric(refusals).await, Some(refused_before + 120.0));
    // A refused peer gets nothing back, not even an error.
    let mut s = TcpStream::connect(sc.proxy).await.unwrap();
    let _ = s
        .write_all(b"GET /api/v2/accounts HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert!(read_response(&mut s).await.is_none());
    // The app still works.
    let mut s = connect_from("127.0.0.2", sc.proxy).await;
    s.write_all(b"GET /api/v2/accounts HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s).await.map(|r| r.status), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused_while_they_are_read() {
    let (_w, emu, sc) = start().await;
    let mut s = TcpStream::connect(sc.proxy).await.unwrap();
    s.write_all(b"GET /api/v2/accounts HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never terminated: the sidecar answers once 32 KiB (the default cap) have arrived.
    let line = format!("X-Padding: {}\r\n", "a".repeat(1000));
    let mut sent = 0usize;
    let answer = loop {
        if s.write_all(line.as_bytes()).await.is_err() {
            break read_response(&mut s).await;
        }
        sent += line.len();
        if sent > 256 * 1024 {
            break read_response(&mut s).await;
        }
    };
    let r = answer.expect("a 431 before the connection closed");
    assert_eq!(
        (r.status, r.code().as_str()),
        (431, "request_headers_too_large")
    );
    assert!(closed_by_peer(&mut s).await);
    assert!(emu.controls().api_requests().is_empty());
    assert_eq!(
        sc.metric("finhub_sidecar_listener_refusals_total{reason=\"header_too_large\"}")
            .await,
        Some(1.0)
    );
}

/// A hostile slow client: sends `start`, then `drip` every 200 ms until the sidecar closes the
/// connection (at most 30 s, else the test fails). Returns what the sidecar answered and how
/// long the connection was held.
async fn trickle(to: SocketAddr, start: &[u8], drip: &'static [u8]) -> (String, Duration) {
    let s = TcpStream::connect(to).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(start).await.unwrap();
    let started = Instant::now();
    let dripping = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            if wr.write_all(drip).await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut got)).await;
    dripping.abort();
    assert!(closed.is_ok(), "a slow client kept its connection for 30 s");
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

/// The sidecar answered a slow client 408 with `code`, and not before the 2 s deadline.
fn assert_cut_at_deadline(answer: &str, held: Duration, code: &str) {
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains(code), "{answer}");
    assert!(
        held >= Duration::from_secs(2),
        "cut before the deadline: {held:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_is_closed_at_the_header_deadline() {
    let (_world, emu, sc) = World::start(|c| policy(c).set("listener.header_timeout", "2s")).await;
    // One header line every 200 ms, forever: each read is quick, the header never completes.
    let (got, held) = trickle(
        sc.proxy,
        b"GET /api/v2/accounts HTTP/1.1\r\n",
        b"X-Drip: 1\r\n",
    )
    .await;
    eprintln!("slowloris closed after {held:?}");
    assert_cut_at_deadline(&got, held, "request_header_timeout");
    assert!(emu.controls().api_requests().is_empty());
    // A connection that sends nothing at all is closed at the same deadline.
    let mut idle = TcpStream::connect(sc.proxy).await.unwrap();
    assert!(closed_by_peer(&mut idle).await);
    // A client's broken-off header is its failure, not an error of the sidecar's.
    assert!(!sc.log().contains("\"level\":\"ERROR\""), "{}", sc.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_body_is_cut_at_the_body_deadline() {
    let (_world, _emu, sc) = World::start(|c| policy(c).set("listener.body_timeout", "2s")).await;
    // One body byte every 200 ms: every read is quick, the body never completes.
    let (got, held) = trickle(
        sc.proxy,
        b"POST /api/v2/payments/1 HTTP/1.1\r\nHost: x\r\nX-Idempotency-Key: 7c9e6679-7425-40de-944b-e07fc1f90ae7\r\nContent-Length: 100000\r\n\r\n",
        b"a",
    )
    .await;
    eprintln!("trickling body cut after {held:?}");
    assert_cut_at_deadline(&got, held, "request_body_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused_with_503() {
    let (_world, _emu, sc) = World::start(|c| policy(c).set("listener.max_connections", 4)).await;
    // wait_ready's own probe connection may still be closing: wait until none is open.
    eventually(Duration::from_secs(5), || async {
        (sc.metric("finhub_sidecar_app_connections").await == Some(0.0)).then_some(())
    })
    .await
    .expect("no app connection left open");
    // Every slot busy: each connection is in the middle of its request header (an idle
    // keep-alive connection would give its slot up, see below).
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(sc.proxy).await.unwrap();
        s.write_all(b"GET /api/v2/accounts HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        held.push(s);
    }
    eventually(Duration::from_secs(5), || async {
        (sc.metric("finhub_sidecar_app_connections").await == Some(4.0)).then_some(())
    })
    .await
    .expect("four connections open");
    let mut extra = TcpStream::connect(sc.proxy).await.unwrap();
    let r = read_response(&mut extra).await.expect("a 503 at accept");
    assert_eq!((r.status, r.code().as_str()), (503, "too_many_connections"));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(closed_by_peer(&mut extra).await);
    drop(held);
    // Once they close, new connections are served again.
    let served = eventually(Duration::from_secs(5), || async {
        let mut s = TcpStream::connect(sc.proxy).await.ok()?;
        s.write_all(b"GET /api/v2/accounts HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        read_response(&mut s)
            .await
            .filter(|r| r.status == 200)
            .map(|_| ())
    })
    .await;
    assert!(served.is_some());
}

/// Issue 28.14: 100 idle keep-alive connections from one app with `max_connections` 100
/// locked every other app out for the keep-alive idle time (60 s). A new connection that finds
/// every slot taken closes the connection idle longest and is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_give_their_slot_to_a_new_app() {
    let (_world, _emu, sc) = World::start(|c| policy(c).set("listener.max_connections", 4)).await;
    eventually(Duration::from_secs(5), || async {
        (sc.metric("finhub_sidecar_app_connections").await == Some(0.0)).then_some(())
    })
    .await
    .expect("no app connection left open");
    let mut hog = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(sc.proxy).await.unwrap();
        s.write_all(b"GET /api/v2/accounts HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut s).await.map(|r| r.status), Some(200));
        hog.push(s);
    }
    // Every slot is held by an idle keep-alive connection; another app arrives.
    let mut other = TcpStream::connect(sc.proxy).await.unwrap();
    other
        .write_all(b"GET /api/v2/accounts HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let r = read_response(&mut other).await.expect("an answer");
    assert_eq!(r.status, 200, "served, not refused: {}", r.code());
    // The oldest idle connection was closed for it.
    assert!(
        closed_by_peer(&mut hog[0]).await,
        "the oldest idle connection closed"
    );
    assert_eq!(
        sc.counter("finhub_sidecar_listener_idle_evictions_total")
            .await,
        1.0
    );
    assert_eq!(
        sc.counter("finhub_sidecar_listener_refusals_total{reason=\"too_many_connections\"}")
            .await,
        0.0
    );
    // The others still work.
    let s = &mut hog[1];
    s.write_all(b"GET /api/v2/accounts HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(s).await.map(|r| r.status), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_while_slow_clients_hold_the_admin_listener() {
    let (_w, _emu, sc) = start().await;
    // More slow holders than the admin listener keeps open: each sends a partial header and
    // keeps its connection.
    let mut holders = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(sc.admin).await.unwrap();
        s.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        holders.push(s);
    }
    let client = client_with_timeout(Duration::from_secs(1));
    for path in ["/live", "/ready", "/live", "/ready"] {
        let started = Instant::now();
        let r = client
            .get(format!("http://{}{path}", sc.admin))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path} did not answer within 1 s: {e}"));
        assert_eq!(r.status(), 200, "{path}");
        eprintln!(
            "{path} answered in {:?} under 300 slow holders",
            started.elapsed()
        );
    }
    drop(holders);
    // POST /shutdown is opt-in: without admin.shutdown_endpoint it does not exist.
    let r = client
        .post(format!("http://{}/shutdown", sc.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(sc.child.lock().unwrap().try_wait().unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_reaches_the_log_even_at_trace() {
    let (_world, emu, sc) = World::start(|c| policy(c).log_level("trace")).await;
    let body_secret = "customer-iban-DE89370400440532013000";
    let header_secret = "app-header-secret-7c1d";
    for path in ["/api/v2/accounts", "/api/v2/payments"] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nX-App-Secret: {header_secret}\r\nAuthorization: Bearer {header_secret}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body_secret}",
            body_secret.len()
        );
        let r = exchange(sc.proxy, req.as_bytes()).await;
        assert_eq!(r.status, 200, "{r:?}");
        // The echo answer carries the app's secret header back (in its body): a logged
        // response body would show it.
        assert!(String::from_utf8_lossy(&r.body).contains(header_secret));
    }
    let token = sent_header(&emu, "authorization")
        .and_then(|a| a.strip_prefix("Bearer ").map(str::to_string))
        .expect("FinHub saw the session");
    let signature = token.rsplit('.').next().unwrap().to_string();
    // Wait until the trace output has caught up with the requests (the audit lines).
    sc.wait_audit(2).await;
    let log = sc.log();
    for (what, secret) in [
        ("session token signature", signature.as_str()),
        ("password", "demo-password"),
        ("customer secret", "demo-secret"),
        ("request body", body_secret),
        ("app header", header_secret),
    ] {
        assert!(
            !log.contains(secret),
            "{what} found in the trace log:\n{}",
            log.lines()
                .filter(|l| l.contains(secret))
                .take(3)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
