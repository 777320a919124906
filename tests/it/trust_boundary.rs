//! The trust boundary, tried as a hostile app in the pod would: every request below is written
//! as raw bytes (HTTP clients would normalise most of them), against the real sidecar binary
//! and the real HTTPS+mTLS emulator. Each test is one promise: no app can read, revoke or misuse
//! the tenant's FinHub session, hold the sidecar's memory or connections, or see a secret in
//! its logs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Connects to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
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
/// long the connection was held (timed from before the connect).
async fn trickle(to: SocketAddr, start: &[u8], drip: &'static [u8]) -> (String, Duration) {
    // The sidecar's deadline runs from its accept (header) or its read of the header (body),
    // which can come before this task resumes from `connect` or `write_all` on a busy box:
    // the clock starts first, so the hold is never under-measured.
    let started = Instant::now();
    let s = TcpStream::connect(to).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(start).await.unwrap();
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

/// Whether any request to `path` reached FinHub, once a later marker request has: what the
/// sidecar forwards for one connection reaches FinHub before it answers a later one.
async fn reached_finhub(
    emu: &finhub_testkit::emulator::Emulator,
    sc: &SidecarProcess,
    path: &str,
) -> bool {
    let marker = format!("/api/v2/marker-{}", uuid::Uuid::new_v4());
    let r = exchange(
        sc.proxy,
        format!("GET {marker} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "marker");
    let seen = eventually(Duration::from_secs(10), || async {
        emu.controls()
            .api_requests()
            .iter()
            .any(|r| r.path_and_query == marker)
            .then_some(())
    })
    .await;
    assert!(seen.is_some(), "marker reached FinHub");
    emu.controls()
        .api_requests()
        .iter()
        .any(|r| r.path_and_query.starts_with(path))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_sent_whole_or_not_at_all() {
    let (_world, emu, sc) = World::start(|c| c).await;

    // A chunked POST whose first chunk size is not hex: a JSON 400, and nothing at FinHub.
    let r = exchange(
        sc.proxy,
        b"POST /api/v2/transfers HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.code(), "invalid_request");
    assert!(
        !reached_finhub(&emu, &sc, "/api/v2/transfers").await,
        "a malformed body must not reach FinHub, not even its header"
    );

    // A valid first chunk, then garbage.
    let r = exchange(
        sc.proxy,
        b"POST /api/v2/transfers-2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(!reached_finhub(&emu, &sc, "/api/v2/transfers-2").await);

    // An app that dies mid-upload: nothing reaches FinHub.
    let mut s = TcpStream::connect(sc.proxy).await.unwrap();
    s.write_all(
        b"POST /api/v2/transfers-3 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"amount\":",
    )
    .await
    .unwrap();
    drop(s);
    assert!(!reached_finhub(&emu, &sc, "/api/v2/transfers-3").await);

    // A chunked body just over the retry buffer, arriving in one write, reaches FinHub whole
    // (vendor/PATCHES.md, pingora-proxy patch 3).
    let size = 70 * 1024;
    let mut req = b"POST /api/v2/documents HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    req.extend_from_slice(format!("{size:x}\r\n").as_bytes());
    req.extend_from_slice(&vec![b'x'; size]);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    let r = exchange(sc.proxy, &req).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["body_len"], size as u64);

    // A small chunked body is held whole and sent whole.
    let r = exchange(
        sc.proxy,
        b"POST /api/v2/documents HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["body_len"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_is_answered_by_the_sidecar_and_the_body_goes_whole() {
    let (_world, _emu, sc) = World::start(|c| c).await;
    let mut s = TcpStream::connect(sc.proxy).await.unwrap();
    s.write_all(b"POST /api/v2/transfers HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("a 100 Continue within 10 s")
            .unwrap();
        assert!(n > 0, "closed before 100 Continue");
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 100 Continue"),
        "{}",
        got.escape_ascii()
    );
    s.write_all(b"hello").await.unwrap();
    let r = read_response(&mut s).await.expect("an answer");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["body_len"], 5);
    assert!(
        r.json()["headers"].get("expect").is_none(),
        "FinHub is not asked for a 100 Continue: {}",
        r.json()["headers"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finhub_resetting_after_a_streamed_post_gives_a_json_502_not_a_reset() {
    let (_world, emu, sc) = World::start(|c| c).await;
    // FinHub executes each call, then resets the connection instead of answering.
    emu.controls().set_api_faults(Some(ApiFaults {
        lost_after: 1.0,
        ..ApiFaults::none(1)
    }));
    // Larger than the hold limit: streamed, so sent exactly once and never retried.
    let size = 100 * 1024;
    let mut req = format!(
        "POST /api/v2/transfers HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    req.extend_from_slice(&vec![b'x'; size]);
    let r = exchange(sc.proxy, &req).await;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.code(), "upstream_outcome_unknown");
    let key = r
        .header("x-idempotency-key")
        .expect("the key the app can retry with");
    let executions = emu.controls().executions();
    assert_eq!(
        executions.get(&(TENANT.to_string(), key.to_string())),
        Some(&1),
        "sent exactly once: {executions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expectation_other_than_100_continue_is_a_417() {
    let (_world, emu, sc) = World::start(|c| c).await;
    let r = exchange(
        sc.proxy,
        b"POST /api/v2/expect HTTP/1.1\r\nHost: x\r\nExpect: 100-continue, x\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await;
    assert_eq!(r.status, 417, "{r:?}");
    assert_eq!(r.code(), "expectation_failed");
    assert!(!reached_finhub(&emu, &sc, "/api/v2/expect").await);
}

// ---------------------------------------------------------------------------------------------
// The retry mechanism as an attacker sees it (adversarial review of issues 22.3, 22.4 and 23):
// a connect that fails once, a hold limit below the retry buffer, refusals that would fund
// retries, a session lost between attempts, an earlier attempt that FinHub executed.

use finhub_testkit::emulator::ApiFaults;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

struct Flaky {
    addr: SocketAddr,
    fail_next: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
}

impl Flaky {
    async fn start(target: SocketAddr) -> Flaky {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fail_next = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let (f, a) = (fail_next.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let fail = f
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if fail {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Flaky {
            addr,
            fail_next,
            accepted,
        }
    }
}

/// World + emulator + flaky forwarder + sidecar whose upstream is the forwarder.
async fn start_flaky(
    adjust: impl FnOnce(SidecarConfig) -> SidecarConfig,
) -> (
    World,
    finhub_testkit::emulator::Emulator,
    Flaky,
    SidecarProcess,
) {
    let world = World::new();
    let emu = world.emulator().await;
    let flaky = Flaky::start(emu.addr()).await;
    let sc = world.sidecar(adjust(world.config(flaky.addr.port()))).await;
    (world, emu, flaky, sc)
}

fn api_calls(emu: &finhub_testkit::emulator::Emulator) -> u64 {
    emu.controls().total_requests() - emu.controls().stats().auth_requests
}

/// Review finding 1a. A connect failure decides a retry (`pending = Connect`) that `fail_to_connect`
/// never consumes; the next attempt's first error is taken as that decided retry and resent
/// unconditionally — here a streamed (non-resendable) POST that FinHub executed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_post_is_never_resent_even_after_a_connect_failure() {
    let (_world, emu, flaky, sc) = start_flaky(|c| c).await;
    emu.controls().set_api_faults(Some(ApiFaults {
        lost_after: 1.0,
        ..ApiFaults::none(1)
    }));
    let accepted = flaky.accepted.load(Ordering::SeqCst);
    flaky.fail_next.store(1, Ordering::SeqCst);
    let before = api_calls(&emu);
    let size = 100 * 1024;
    let mut req = format!(
        "POST /api/v2/transfers HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    req.extend_from_slice(&vec![b'x'; size]);
    let mut s = TcpStream::connect(sc.proxy).await.unwrap();
    s.write_all(&req).await.unwrap();
    let r = read_response(&mut s).await.expect("an answer");
    assert!(
        flaky.accepted.load(Ordering::SeqCst) >= accepted + 2,
        "the first connect failed and a second was made"
    );
    let calls = api_calls(&emu) - before;
    let audit = sc.wait_audit(1).await;
    println!(
        "status {} code {} calls {calls} audit {:?}",
        r.status,
        r.code(),
        audit.last()
    );
    assert_eq!(calls, 1, "a streamed body reached FinHub {calls} times");
    assert_eq!(
        (r.status, r.code().as_str()),
        (502, "upstream_outcome_unknown")
    );
}

/// Review finding 1b. Same stale decision: the app goes away while FinHub works on its request; the
/// sidecar sends the request to FinHub again (at once, while the original still runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_went_away_is_not_retried_for_after_a_connect_failure() {
    let (_world, emu, flaky, sc) = start_flaky(|c| c).await;
    emu.controls().set_api_faults(Some(ApiFaults {
        slow: 1.0,
        slow_for: Duration::from_millis(1500),
        ..ApiFaults::none(1)
    }));
    flaky.fail_next.store(1, Ordering::SeqCst);
    let before = api_calls(&emu);
    let mut s = TcpStream::connect(sc.proxy).await.unwrap();
    s.write_all(
        b"POST /api/v2/transfers HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n{\"amount\":1}\n",
    )
    .await
    .unwrap();
    // FinHub has the request (second connection); the app gives up.
    assert!(eventually(Duration::from_secs(10), || async {
        (api_calls(&emu) > before).then_some(())
    })
    .await
    .is_some());
    drop(s);
    // The request is over once its audit line is written.
    let audit = sc.wait_audit(1).await;
    let calls = api_calls(&emu) - before;
    println!("calls {calls} audit {:?}", audit.last());
    assert_eq!(
        calls, 1,
        "FinHub got the POST {calls} times after the app left"
    );
}

/// Review finding 2. With `auth.replay_body_limit` below 64 KiB, a chunked body larger than the
/// limit used to end the hold loop with the body unfinished but Pingora's retry buffer not
/// truncated: Pingora sent the buffer, and request_body_filter prepended the same bytes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_a_lowered_hold_limit_reaches_finhub_unchanged() {
    let (_world, _emu, sc) = World::start(|c| c.set("auth.replay_body_limit", 1024)).await;
    let mut s = TcpStream::connect(sc.proxy).await.unwrap();
    let chunk = |c: u8| {
        let mut v = format!("{:x}\r\n", 800).into_bytes();
        v.extend_from_slice(&[c; 800]);
        v.extend_from_slice(b"\r\n");
        v
    };
    let mut first = b"POST /api/v2/documents HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    first.extend(chunk(b'a'));
    first.extend(chunk(b'b'));
    s.write_all(&first).await.unwrap();
    // The body is held whole (it is under the retry buffer), whatever the replay limit.
    let mut rest = chunk(b'c');
    rest.extend_from_slice(b"0\r\n\r\n");
    s.write_all(&rest).await.unwrap();
    let r = read_response(&mut s).await.expect("an answer");
    println!("{} {}", r.status, r.json());
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 2400, "FinHub got a different body");
}

/// Review finding 4. Requests the sidecar refuses itself (local 429) still deposit into the tenant's
/// retry budget, so a flood of refused requests buys retries against a FinHub that is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locally_refused_requests_do_not_fund_retries() {
    let mut route = toml::Table::new();
    route.insert("method".into(), "GET".into());
    route.insert("path_prefix".into(), "/api/v2/limited".into());
    route.insert("rate".into(), 1.into());
    route.insert("burst".into(), 1.into());
    let (_world, emu, sc) = World::start(|c| {
        c.set("retry.budget_min_per_second", 0)
            .set("retry.budget_ratio", 0.2)
            .set("retry.budget_window", "60s")
            .set("retry.backoff", "10ms")
            .set("retry.backoff_max", "10ms")
            .set("retry.max_attempts", 10)
            .push("policy.rate_limit.routes", route)
    })
    .await;
    let client = http_client();
    // 200 requests, all but one refused locally (never sent to FinHub).
    let mut limited = 0;
    for _ in 0..200 {
        let r = client.get(sc.url("/api/v2/limited")).send().await.unwrap();
        if r.status() == 429 {
            limited += 1;
        }
    }
    assert!(limited >= 190, "{limited}");
    emu.controls().set_api_faults(Some(ApiFaults {
        gateway_503: 1.0,
        ..ApiFaults::none(1)
    }));
    let before = api_calls(&emu);
    let sent = 5u64;
    for i in 0..sent {
        let r = client
            .get(sc.url(&format!("/api/v2/accounts/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
    }
    let calls = api_calls(&emu) - before;
    // Forwarded requests: 1 (the one the limiter let through) + 5; ratio 0.2, no floor.
    let allowed = sent + ((sent + 1) as f64 * 0.2).ceil() as u64;
    println!("{calls} upstream calls for {sent} requests (budget allows {allowed})");
    assert!(
        calls <= allowed,
        "{calls} upstream calls for {sent} requests"
    );
}

/// Review finding 5. A body refused while held (broken chunk) is answered, then the connection is
/// closed with the app's bytes unread: a reset, and the app may never read its JSON 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_held_body_is_answered_not_reset() {
    let (_world, _emu, sc) = World::start(|c| c).await;
    let mut failures = 0;
    for _ in 0..20 {
        let mut s = TcpStream::connect(sc.proxy).await.unwrap();
        let mut req = b"POST /api/v2/transfers HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n".to_vec();
        req.extend_from_slice(&vec![b'x'; 32 * 1024]);
        // The trailing bytes may not all be accepted once the sidecar closes.
        let _ = s.write_all(&req).await;
        match read_response(&mut s).await {
            Some(r) if r.status == 400 => {}
            other => {
                println!("got {other:?}");
                failures += 1;
            }
        }
    }
    assert_eq!(failures, 0, "{failures}/20 apps got no JSON 400");
}

/// Review finding 3. When the request cannot be sent because the session became unusable between
/// attempts (rewrite fails in upstream_request_filter), error_while_proxy classifies that
/// local refusal as an upstream "reset" and retries it; `attempts` is never incremented (no
/// start_attempt), so only the deadline stops it: retries, budget and a connection per loop
/// for a request that can no longer be sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lost_between_attempts_is_not_retried_as_a_reset() {
    let world = World::new();
    let mut cfg = world.emulator_config(&world.server);
    cfg.token_lifetime = Duration::from_secs(3);
    let emu = finhub_testkit::emulator::Emulator::start(cfg)
        .await
        .unwrap();
    let sc = world
        .sidecar(
            world
                .config(emu.addr().port())
                .environment("integration")
                .set("retry.max_attempts", 10)
                .set("retry.backoff", "700ms")
                .set("retry.backoff_max", "700ms"),
        )
        .await;
    emu.controls().set_auth_down(true);
    emu.controls().set_api_faults(Some(ApiFaults {
        gateway_503: 1.0,
        ..ApiFaults::none(1)
    }));
    let r = http_client()
        .get(sc.url("/api/v2/accounts"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    let audit = sc.wait_audit(1).await;
    let resets: Vec<String> = sc
        .scrape()
        .await
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("finhub_sidecar_upstream_retries_total") && l.contains("reset"))
        .map(str::to_string)
        .collect();
    println!("{status} {body} audit {:?} resets {resets:?}", audit.last());
    assert!(
        resets.iter().all(|l| l.ends_with(" 0")),
        "FinHub never reset a connection, yet: {resets:?}"
    );
}

/// Review finding 6. A keyed POST whose first attempt FinHub executed (answer lost) and whose retries
/// then cannot connect is answered `upstream_unreachable` ("surely not sent", README) instead of
/// `upstream_outcome_unknown`: `with_outcome` keeps connect errors as they are, whatever an
/// earlier attempt did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mutation_executed_on_an_earlier_attempt_is_never_reported_as_not_sent() {
    let (_world, emu, flaky, sc) = start_flaky(|c| c).await;
    emu.controls().set_api_faults(Some(ApiFaults {
        lost_after: 1.0,
        ..ApiFaults::none(1)
    }));
    let before = api_calls(&emu);
    let mut s = TcpStream::connect(sc.proxy).await.unwrap();
    s.write_all(
        b"POST /api/v2/transfers HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\nConnection: close\r\n\r\n{\"amount\":1}\n",
    )
    .await
    .unwrap();
    // FinHub executed the first attempt (and lost its answer); from now on FinHub is unreachable
    // (the retry waits retry.mutation_delay, 1 s, first).
    assert!(eventually(Duration::from_secs(10), || async {
        (api_calls(&emu) > before).then_some(())
    })
    .await
    .is_some());
    flaky.fail_next.store(1000, Ordering::SeqCst);
    let r = read_response(&mut s).await.expect("an answer");
    println!("{} {}", r.status, r.json());
    assert_eq!(emu.controls().executed_calls(), 1, "FinHub executed it");
    assert_eq!(
        r.code(),
        "upstream_outcome_unknown",
        "the app is told its executed transfer was not sent"
    );
}

/// Suspicion (boundaries): chunked and Content-Length bodies of exactly 64 KiB and one byte
/// more, in one write and split; and Expect: 100-continue on a body over the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_at_the_hold_limit_reach_finhub_whole() {
    let (_world, _emu, sc) = World::start(|c| c).await;
    for size in [65535usize, 65536, 65537, 131072] {
        for chunked in [true, false] {
            for split in [false, true] {
                let mut s = TcpStream::connect(sc.proxy).await.unwrap();
                let head = if chunked {
                    "POST /api/v2/documents HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_string()
                } else {
                    format!("POST /api/v2/documents HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n")
                };
                let mut body = Vec::new();
                if chunked {
                    // Two chunks: size-1 and 1.
                    body.extend_from_slice(format!("{:x}\r\n", size - 1).as_bytes());
                    body.extend_from_slice(&vec![b'x'; size - 1]);
                    body.extend_from_slice(b"\r\n1\r\ny\r\n0\r\n\r\n");
                } else {
                    body.extend_from_slice(&vec![b'x'; size]);
                }
                let mut all = head.into_bytes();
                if split {
                    s.write_all(&all).await.unwrap();
                    let (a, b) = body.split_at(body.len() / 2);
                    s.write_all(a).await.unwrap();
                    s.flush().await.unwrap();
                    s.write_all(b).await.unwrap();
                } else {
                    all.extend_from_slice(&body);
                    s.write_all(&all).await.unwrap();
                }
                let r = read_response(&mut s).await.expect("an answer");
                assert_eq!(r.status, 200, "{size} chunked={chunked} split={split}");
                assert_eq!(
                    r.json()["body_len"],
                    size as u64,
                    "{size} chunked={chunked} split={split}"
                );
            }
        }
    }
    // Expect on a body over the limit: FinHub's 100 Continue (or the sidecar's) lets it flow.
    let mut s = TcpStream::connect(sc.proxy).await.unwrap();
    let size = 100 * 1024;
    s.write_all(format!("POST /api/v2/documents HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let r = read_response(&mut s).await.expect("a 100 Continue");
    assert_eq!(r.status, 100);
    s.write_all(&vec![b'x'; size]).await.unwrap();
    let r = read_response(&mut s).await.expect("an answer");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], size as u64);
}
