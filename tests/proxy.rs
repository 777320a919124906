//! The foundation data path, end to end: the real sidecar binary between a real HTTP client and
//! the real FinHub emulator (HTTPS + mTLS), all on loopback.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use finhub_testkit::emulator::{Emulator, MtlsMode};
use finhub_testkit::pki::{ClientCertOpts, Pki};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_and_absolute_form_reach_finhub_over_mtls() {
    let (world, emu, sc) = World::start(|c| c).await;

    // Origin-form GET: the sidecar as base URL; path and query unchanged.
    let (status, echo) = json(
        http_client()
            .get(sc.url("/api/v2/accounts?limit=5&q=a%20b"))
            .header("Authorization", "Bearer app-token-must-not-leak")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/api/v2/accounts");
    assert_eq!(echo["query"], "limit=5&q=a%20b");
    assert_eq!(
        echo["client_cert"]["serial_hex"],
        world.client.serial_hex.as_str()
    );
    assert_eq!(
        echo_header(&echo, "host"),
        Some(format!("localhost:{}", emu.addr().port()).as_str())
    );
    assert_eq!(echo_header(&echo, "x-tenant-id"), Some(TENANT));
    assert_eq!(
        echo_header(&echo, "authorization"),
        Some("<redacted>"),
        "the echo never hands the session back"
    );
    let seen = emu.controls().api_requests();
    let auth = seen[0].header("authorization").unwrap();
    assert!(
        auth.starts_with("Bearer ") && !auth.contains("app-token"),
        "{auth}"
    );

    // Origin-form POST with a body.
    let body = r#"{"amount":"10.00","currency":"EUR"}"#;
    let (status, echo) = json(
        http_client()
            .post(sc.url("/api/v2/payments"))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["body_len"], body.len());
    assert_eq!(
        echo["client_cert"]["serial_hex"],
        world.client.serial_hex.as_str()
    );

    // Absolute-form (HTTP_PROXY) GET and POST naming the FinHub host.
    let via_proxy = sc.proxy_client();
    let (status, echo) = json(
        via_proxy
            .get("http://api.finhub.cloud/api/v2/accounts?page=2")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["path"], "/api/v2/accounts");
    assert_eq!(echo["query"], "page=2");
    assert_eq!(
        echo_header(&echo, "host"),
        Some(format!("localhost:{}", emu.addr().port()).as_str())
    );
    assert_eq!(
        echo["client_cert"]["serial_hex"],
        world.client.serial_hex.as_str()
    );

    let (status, echo) = json(
        via_proxy
            .post("http://api.finhub.cloud/api/v2/payments")
            .header("X-User-Session-Token", "app-supplied")
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["body_len"], body.len());
    assert_ne!(
        echo_header(&echo, "x-user-session-token"),
        Some("app-supplied")
    );

    // Every request above reached FinHub with the client certificate.
    let seen = emu.controls().api_requests();
    assert_eq!(seen.len(), 4);
    assert!(seen
        .iter()
        .all(|r| r.client_cert.as_ref().map(|c| c.serial_hex.as_str())
            == Some(world.client.serial_hex.as_str())));
    // The request id is echoed back to the app.
    let r = http_client().get(sc.url("/api/v2/x")).send().await.unwrap();
    assert!(r.headers().get("x-request-id").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_absolute_form_host_is_refused_and_receives_nothing() {
    let (_world, emu, sc) = World::start(|c| c).await;
    let foreign = Tripwire::start().await;
    let before = emu.controls().total_requests();

    let (status, body) = json(
        sc.proxy_client()
            .post(format!("http://127.0.0.1:{}/steal", foreign.addr.port()))
            .body("secret payload")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "destination_not_allowed");
    let (status, body) = json(
        sc.proxy_client()
            .get("http://api.finhub.cloud.evil.example/api/v2/x")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(body["error"], "destination_not_allowed");

    assert_eq!(foreign.connections.load(Ordering::SeqCst), 0);
    assert_eq!(foreign.bytes.load(Ordering::SeqCst), 0);
    assert_eq!(
        emu.controls().total_requests(),
        before,
        "nothing went to FinHub either"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused() {
    let (_world, _emu, sc) = World::start(|c| c).await;
    let foreign = Tripwire::start().await;

    let mut s = tokio::net::TcpStream::connect(sc.proxy).await.unwrap();
    let target = foreign.addr;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("answer in time")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(
        head.contains("\"error\":\"connect_not_supported\""),
        "{head}"
    );
    // The connection is closed: nothing after the CONNECT is taken as HTTP.
    let rest = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(rest, 0, "connection closed after the refusal");
    assert_eq!(foreign.connections.load(Ordering::SeqCst), 0);
}

/// Starts the sidecar through a switchable forwarder so it logs in against the good emulator,
/// then steers its first data connection to `bad` and returns the JSON error it answers.
async fn error_through_bad_upstream(
    world: &World,
    good: &Emulator,
    bad: &Emulator,
) -> (u16, Value) {
    let switch = Switch::start(good.addr()).await;
    let sc = world.sidecar(world.config(switch.addr.port())).await;
    switch.point_to(bad.addr());
    let resp = http_client()
        .get(sc.url("/api/v2/accounts"))
        .send()
        .await
        .unwrap();
    let out = json(resp).await;
    assert!(
        bad.controls().api_requests().is_empty(),
        "the bad upstream must not receive the request"
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_upstream_certificate_gives_502_unknown_ca() {
    let world = World::new();
    let good = world.emulator().await;
    let other_ca = Pki::new("Untrusted CA").unwrap();
    let rogue = other_ca.server_cert(&["localhost"], &[]).unwrap();
    let bad = Emulator::start(world.emulator_config(&rogue))
        .await
        .unwrap();
    let (status, body) = error_through_bad_upstream(&world, &good, &bad).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"], "upstream_tls_unknown_ca", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_upstream_name_gives_502_name_mismatch() {
    let world = World::new();
    let good = world.emulator().await;
    let misnamed = world.pki.server_cert(&["not-finhub.example"], &[]).unwrap();
    let bad = Emulator::start(world.emulator_config(&misnamed))
        .await
        .unwrap();
    let (status, body) = error_through_bad_upstream(&world, &good, &bad).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"], "upstream_tls_name_mismatch", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_client_certificate_gives_502_client_cert_rejected() {
    let world = World::new();
    let good = world.emulator().await;
    // Same server identity, but it only trusts client certificates from another CA.
    let mut cfg = world.emulator_config(&world.server);
    cfg.client_ca_pem = Some(Pki::new("Other client CA").unwrap().ca_pem());
    cfg.mtls = MtlsMode::Required;
    let bad = Emulator::start(cfg).await.unwrap();
    let (status, body) = error_through_bad_upstream(&world, &good, &bad).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"], "upstream_tls_client_cert_rejected", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_gives_504() {
    let (_world, emu, sc) = World::start(|c| c).await;
    emu.controls().set_delay(Duration::from_secs(4)); // read_timeout is 2 s
    let (status, body) = json(
        http_client()
            .get(sc.url("/api/v2/slow"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"], "upstream_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_upload_streams_through_without_being_buffered() {
    const SIZE: usize = 50 * 1024 * 1024;
    const CHUNK: usize = 256 * 1024;
    let (_world, _emu, sc) = World::start(|c| c).await;
    // Warm up the upstream connection so the baseline includes the TLS state.
    let r = http_client()
        .get(sc.url("/api/v2/warmup"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let baseline = sc.peak_rss_kib();

    let chunks = futures_util::stream::iter(
        (0..SIZE / CHUNK).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; CHUNK]))),
    );
    let (status, echo) = json(
        http_client()
            .post(sc.url("/api/v2/documents"))
            .header("Content-Type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["body_len"], SIZE as u64);
    let growth_mib = sc.peak_rss_kib().saturating_sub(baseline) / 1024;
    assert!(
        growth_mib < 20,
        "peak RSS grew by {growth_mib} MiB while streaming 50 MiB: the body was buffered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_the_first_session_get_503_and_nothing_goes_upstream() {
    let world = World::new();
    let emu = world.emulator().await;
    emu.controls().fail_logins(true);
    let sc = world.spawn_sidecar(world.config(emu.addr().port())).await;
    // Wait until the sidecar tried (and failed) to log in, and the proxy port is open.
    let attempted = eventually(STARTUP, || async {
        let tried = emu.controls().stats().failed_logins > 0;
        let open = tokio::net::TcpStream::connect(sc.proxy).await.is_ok();
        (tried && open).then_some(())
    })
    .await;
    assert!(attempted.is_some(), "no login attempt seen\n{}", sc.log());
    let resp = http_client()
        .get(sc.url("/api/v2/accounts"))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("retry-after").is_some());
    let (status, body) = json(resp).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"], "session_unavailable");
    assert!(emu.controls().api_requests().is_empty());
    let ready = http_client()
        .get(format!("http://{}/ready", sc.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tenant_is_a_400() {
    let (_world, emu, sc) = World::start(|c| c).await;
    let (status, body) = json(
        http_client()
            .get(sc.url("/api/v2/accounts"))
            .header("X-Tenant-ID", "someone-else")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "unknown_tenant");
    assert!(emu.controls().api_requests().is_empty());
}

#[test]
fn invalid_config_is_reported_with_file_and_key() {
    let world = World::new();
    let bad = world.dir.path().join("bad.toml");
    world
        .config(3)
        .set("upstream.base_url", "http://localhost:3")
        .set("upstream.read_timeout", "soon")
        .write_to(&bad);
    for cmd in ["check", "run"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_finhub-sidecar"))
            .args([cmd, "--config"])
            .arg(&bad)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("bad.toml: upstream.base_url:"),
            "{cmd}: {text}"
        );
        assert!(
            text.contains("bad.toml: upstream.read_timeout:"),
            "{cmd}: {text}"
        );
    }

    // An unknown key is named too.
    let typo = world.dir.path().join("typo.toml");
    world.config(3).set("auth.enviroment", "x").write_to(&typo);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_finhub-sidecar"))
        .args(["check", "--config"])
        .arg(&typo)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("typo.toml: auth.enviroment:"));
}

#[test]
fn check_reports_the_certificate_and_refuses_a_mismatched_key() {
    let world = World::new();
    let good = world.dir.path().join("good.toml");
    world.config(3).write_to(&good);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_finhub-sidecar"))
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains(&world.client.serial_hex), "{stdout}");
    assert!(!stdout.contains("demo-password"));

    let other = world.pki.client_cert(&ClientCertOpts::default()).unwrap();
    let (_, other_key) = other.write_to(world.dir.path(), "other").unwrap();
    let mismatched = world.dir.path().join("mismatch.toml");
    world
        .config(3)
        .client_cert(&world.client_cert, &other_key)
        .write_to(&mismatched);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_finhub-sidecar"))
        .args(["check", "--config"])
        .arg(&mismatched)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout.contains("client_cert.key_file"), "{stdout}");
    assert!(stdout.contains("does not match"), "{stdout}");
}
