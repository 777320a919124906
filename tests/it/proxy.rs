//! The foundation data path, end to end: the real sidecar binary between a real HTTP client and
//! the real FinHub emulator (HTTPS + mTLS), all on loopback.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::*;
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

/// One app request of the blip scenario and what came of it.
struct Outcome {
    post: bool,
    status: u16,
    /// The key FinHub saw (the app's or the sidecar's), from the answer.
    key: Option<String>,
    json: bool,
    /// The client's error when there was no answer.
    error: Option<String>,
}

async fn blip_request(client: reqwest::Client, sc_url: String, i: usize) -> Outcome {
    let post = i.is_multiple_of(2);
    let req = if post {
        let r = client
            .post(format!("{sc_url}/api/v2/transfers"))
            .header("Content-Type", "application/json")
            .body(format!("{{\"amount\":{i}}}"));
        if i.is_multiple_of(4) {
            r.header("X-Idempotency-Key", uuid::Uuid::new_v4().to_string())
        } else {
            r
        }
    } else {
        client.get(format!("{sc_url}/api/v2/accounts/{i}"))
    };
    match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let key = resp
                .headers()
                .get("x-idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = resp.bytes().await.unwrap_or_default();
            let json = serde_json::from_slice::<serde_json::Value>(&body).is_ok();
            Outcome {
                post,
                status,
                key,
                json,
                error: None,
            }
        }
        // A reset or an empty answer from the sidecar.
        Err(e) => Outcome {
            error: Some(format!("{e:?}")),
            post,
            status: 0,
            key: None,
            json: false,
        },
    }
}

/// Issue #23's scenario: 300 app requests (150 POSTs to /transfers, half with the app's own
/// key, and 150 GETs) while FinHub answers 5 % of calls with a gateway 503, resets 3 % before
/// processing and loses 5 % of answers after processing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finhub_blips_are_retried_exactly_once_per_key() {
    use finhub_testkit::emulator::ApiFaults;
    let (_world, emu, sc) = World::start(|c| c).await;
    emu.controls().set_api_faults(Some(ApiFaults {
        gateway_503: 0.05,
        reset_before: 0.03,
        lost_after: 0.05,
        ..ApiFaults::none(23)
    }));
    let client = http_client();
    let url = sc.url("");
    let url = url.trim_end_matches('/').to_string();
    let mut outcomes = Vec::new();
    for batch in (0..300).collect::<Vec<_>>().chunks(10) {
        let tasks: Vec<_> = batch
            .iter()
            .map(|&i| tokio::spawn(blip_request(client.clone(), url.clone(), i)))
            .collect();
        for t in tasks {
            outcomes.push(t.await.unwrap());
        }
    }
    let executions = emu.controls().executions();
    let ok = outcomes
        .iter()
        .filter(|o| (200..300).contains(&o.status))
        .count();
    let doubles = executions.values().filter(|&&n| n > 1).count();
    let failures: Vec<_> = outcomes
        .iter()
        .filter(|o| !(200..300).contains(&o.status))
        .map(|o| (o.status, o.json, o.key.is_some(), o.error.clone()))
        .collect();
    println!(
        "blip scenario: {ok}/300 answered 2xx, failures {failures:?}, keys executed twice: {doubles}, \
         retries: {:?}",
        sc.scrape().await.map(|m| m
            .lines()
            .filter(|l| l.starts_with("finhub_sidecar_upstream_retries_total"))
            .map(str::to_string)
            .collect::<Vec<_>>())
    );
    let lines = sc.wait_audit(300).await;
    for l in lines.iter().filter(|l| l["status"].as_u64() >= Some(500)) {
        println!("failed: {l}");
    }
    println!(
        "budget exhausted: {}",
        sc.counter("finhub_sidecar_upstream_retry_budget_exhausted_total{tenant=\"tenant-demo\"}")
            .await
    );
    assert!(
        ok >= 297,
        "at least 99 % answered 2xx: {ok}; failures {failures:?}"
    );
    assert_eq!(doubles, 0, "no mutation executed twice: {executions:?}");
    for o in outcomes.iter().filter(|o| o.post) {
        let key = o
            .key
            .as_ref()
            .expect("every answer to a POST carries its key");
        if (200..300).contains(&o.status) {
            assert_eq!(
                executions.get(&(TENANT.to_string(), key.clone())),
                Some(&1),
                "a 2xx POST was executed exactly once"
            );
        }
    }
    for o in outcomes.iter().filter(|o| !(200..300).contains(&o.status)) {
        assert!(
            [502, 503, 504].contains(&o.status) && o.json,
            "a failure is a JSON 502/503/504: {}",
            o.status
        );
        if o.post {
            assert!(o.key.is_some(), "a failed POST carries its key");
        }
    }
    // The audit line counts the attempts and names the last reason.
    let lines = sc.wait_audit(300).await;
    assert!(lines
        .iter()
        .any(|l| l["attempts"].as_u64() > Some(1) && l["retry_reason"].is_string()));
}

/// FinHub fully down (every call a gateway 503): the retries stay within the tenant's budget,
/// not attempts x requests, and apps get FinHub's 503 (JSON) rather than a stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finhub_down_keeps_retries_within_the_budget() {
    use finhub_testkit::emulator::ApiFaults;
    let (_world, emu, sc) = World::start(|c| {
        c.set("retry.budget_min_per_second", 1)
            .set("retry.budget_ratio", 0.2)
            .set("retry.budget_window", "10s")
    })
    .await;
    let before = emu.controls().total_requests() - emu.controls().stats().auth_requests;
    emu.controls().set_api_faults(Some(ApiFaults {
        gateway_503: 1.0,
        ..ApiFaults::none(1)
    }));
    let client = http_client();
    let requests = 200u64;
    let mut statuses = Vec::new();
    let started = std::time::Instant::now();
    for batch in 0..requests / 10 {
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let c = client.clone();
                let u = sc.url(&format!("/api/v2/accounts/{batch}-{i}"));
                tokio::spawn(async move { c.get(u).send().await.map(|r| r.status().as_u16()) })
            })
            .collect();
        for t in tasks {
            statuses.push(t.await.unwrap().unwrap_or(0));
        }
    }
    let elapsed = started.elapsed();
    let calls = emu.controls().total_requests() - emu.controls().stats().auth_requests - before;
    // Budget: 1/s x 10 s floor plus 20 % of the requests (the window may roll once).
    let budget = 2 * (10 + requests / 5);
    println!(
        "FinHub down: {requests} app requests made {calls} upstream calls ({:.2} per request) in {elapsed:?}; \
         budget exhausted {}",
        calls as f64 / requests as f64,
        sc.counter("finhub_sidecar_upstream_retry_budget_exhausted_total{tenant=\"tenant-demo\"}").await
    );
    assert!(statuses.iter().all(|&s| s == 503), "{statuses:?}");
    assert!(
        calls <= requests + budget,
        "{calls} upstream calls for {requests} requests: retries beyond the budget"
    );
    assert!(calls > requests, "some retries were made");
    assert!(
        sc.counter("finhub_sidecar_upstream_retry_budget_exhausted_total{tenant=\"tenant-demo\"}")
            .await
            > 0.0
    );
    assert!(
        sc.counter("finhub_sidecar_upstream_give_ups_total{code=\"finhub_503\"}")
            .await
            > 0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_retried_and_what_passes_through() {
    use finhub_testkit::emulator::ApiFaults;
    let (_world, emu, sc) = World::start(|c| {
        c.set("retry.max_attempts", 10)
            .set("retry.backoff", "300ms")
            .set("retry.backoff_max", "300ms")
    })
    .await;
    let api_calls = || emu.controls().total_requests() - emu.controls().stats().auth_requests;

    // A GET is retried: FinHub resets it until it comes back.
    emu.controls().set_api_faults(Some(ApiFaults {
        reset_before: 1.0,
        ..ApiFaults::none(1)
    }));
    let before = api_calls();
    let get = tokio::spawn(http_client().get(sc.url("/api/v2/accounts")).send());
    assert!(
        eventually(Duration::from_secs(10), || async {
            (api_calls() >= before + 2).then_some(())
        })
        .await
        .is_some(),
        "the GET was sent again"
    );
    emu.controls().set_api_faults(None);
    let resp = get.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);

    // A body over the hold limit is sent once: FinHub's 503 reaches the app.
    emu.controls().set_api_faults(Some(ApiFaults {
        gateway_503: 1.0,
        ..ApiFaults::none(2)
    }));
    let before = api_calls();
    let resp = http_client()
        .put(sc.url("/api/v2/documents/1"))
        .body(vec![b'x'; 100 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("x-idempotency-key").is_some());
    assert_eq!(api_calls() - before, 1, "a streamed body is never resent");

    // A 503 with a Retry-After beyond the deadline goes to the app with it, at once.
    emu.controls().set_api_faults(Some(ApiFaults {
        gateway_503: 1.0,
        retry_after: Some(120),
        ..ApiFaults::none(3)
    }));
    let before = api_calls();
    let resp = http_client()
        .get(sc.url("/api/v2/accounts"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "120");
    assert_eq!(api_calls() - before, 1);

    // A 409 (a key reused for a different request) goes to the app unchanged.
    emu.controls().set_api_faults(None);
    let key = uuid::Uuid::new_v4().to_string();
    for (amount, want) in [(1, 200), (2, 409)] {
        let resp = http_client()
            .post(sc.url("/api/v2/transfers"))
            .header("X-Idempotency-Key", &key)
            .body(format!("{{\"amount\":{amount}}}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), want);
    }
    // And a repeat of the first is FinHub's replay, marked as such.
    let resp = http_client()
        .post(sc.url("/api/v2/transfers"))
        .header("X-Idempotency-Key", &key)
        .body("{\"amount\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-idempotent-replay"], "true");
    assert_eq!(emu.controls().executions()[&(TENANT.to_string(), key)], 1);
}

/// The listener reads the first bytes of each request before Pingora does (issue 26.4) and
/// must hand every byte on, none twice: a request longer than that first read, and one whose
/// header arrives in two writes, are each answered on the same keep-alive connection and
/// reach FinHub once. Requests written back to back (pipelined, which Pingora does not serve):
/// the first is answered, the connection is closed, and the second never reaches FinHub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_read_ahead_reach_finhub_whole_and_once() {
    let (_world, emu, sc) = World::start(|c| c).await;
    let proxy = sc.url("").trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&proxy).await.unwrap();
    let filler = "f".repeat(1500);
    conn.write_all(
        format!("GET /api/v2/long HTTP/1.1\r\nHost: a\r\nX-Filler: {filler}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let answer = read_response(&mut conn).await.expect("an answer");
    assert!(kept_open(&answer), "{answer:?}\n{}", sc.log());
    conn.write_all(b"GET /api/v2/split HTTP/1.1\r\nHo")
        .await
        .unwrap();
    conn.flush().await.unwrap();
    tokio::task::yield_now().await;
    conn.write_all(b"st: a\r\n\r\n").await.unwrap();
    let answer = read_response(&mut conn).await.expect("an answer");
    assert!(kept_open(&answer), "{answer:?}\n{}", sc.log());

    let mut piped = tokio::net::TcpStream::connect(&proxy).await.unwrap();
    piped
        .write_all(
            b"GET /api/v2/piped-1 HTTP/1.1\r\nHost: a\r\n\r\n\
              GET /api/v2/piped-2 HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await
        .unwrap();
    let first = read_response(&mut piped).await.expect("an answer");
    assert_eq!(first.status, 200, "{first:?}");
    assert!(
        !String::from_utf8_lossy(&first.body).contains("HTTP/1.1"),
        "one answer only: {first:?}"
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), piped.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(_))) && !String::from_utf8_lossy(&rest).contains("HTTP/1.1"),
        "one answer, then the connection closes: {:?}",
        String::from_utf8_lossy(&rest)
    );

    let paths: Vec<String> = emu
        .controls()
        .api_requests()
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    for (path, times) in [
        ("/api/v2/long", 1),
        ("/api/v2/split", 1),
        ("/api/v2/piped-1", 1),
        ("/api/v2/piped-2", 0),
    ] {
        let seen = paths.iter().filter(|p| *p == path).count();
        assert_eq!(seen, times, "{path} reached FinHub {seen} times: {paths:?}");
    }
}

/// Whether `answer` is a 200 that leaves the connection open (no `Connection: close`).
fn kept_open(answer: &Raw) -> bool {
    answer.status == 200
        && !answer
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
}
