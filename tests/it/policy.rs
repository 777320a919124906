//! Request policy end to end: client allowlist by TCP peer (clients bound to 127.0.0.2/3/4),
//! X-Forwarded-For from trusted forwarders only, rate limits and FinHub 429 holds, the FinHub
//! header rules as the emulator sees them, and the audit line for each case.

use crate::common::*;
use finhub_testkit::emulator::Emulator;
use serde_json::Value;

const APP: &str = "127.0.0.2";
const FORWARDER: &str = "127.0.0.3";
const STRANGER: &str = "127.0.0.4";
const ORIGIN_IP: &str = "192.0.2.10";

/// The app and the forwarder may connect, the forwarder's X-Forwarded-For is trusted, and the
/// tenant's bucket holds 5 at 1/s.
async fn start() -> (World, Emulator, SidecarProcess) {
    World::start(|c| {
        c.allowed_clients(&["127.0.0.2/32", "127.0.0.3/32"])
            .trusted_forwarders(&["127.0.0.3/32"])
            .rate_limit(1, 5)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_allowlist_and_forwarded_for() {
    let (_world, emu, sc) = start().await;
    let url = sc.url("/api/v2/accounts");

    // An allowed app: its spoofed X-Forwarded-For is ignored; FinHub gets the origin IP.
    let (status, echo) = json(
        client_from(APP)
            .get(&url)
            .header("X-Forwarded-For", "203.0.113.9")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["x-forwarded-for"], ORIGIN_IP);

    // A stranger is refused, even when it claims to be the app: closed at accept, before a
    // byte of its request is read, and counted.
    let refusals = "finhub_sidecar_listener_refusals_total{reason=\"client_not_allowed\"}";
    let refused_before = sc.counter(refusals).await;
    let refused = client_from(STRANGER)
        .get(&url)
        .header("X-Forwarded-For", APP)
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(sc.metric(refusals).await, Some(refused_before + 1.0));

    // A trusted forwarder's single end-user IP is kept...
    let (status, echo) = json(
        client_from(FORWARDER)
            .get(&url)
            .header("X-Forwarded-For", "2001:db8::7")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["x-forwarded-for"], "2001:db8::7");
    // ...and an invalid one is refused.
    let (status, body) = json(
        client_from(FORWARDER)
            .get(&url)
            .header("X-Forwarded-For", "203.0.113.9, 10.0.0.1")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_forwarded_for");

    assert_eq!(
        emu.controls().api_requests().len(),
        2,
        "only the two allowed requests reached FinHub"
    );
    let audit = sc.wait_audit(3).await;
    let decisions: Vec<&str> = audit
        .iter()
        .filter_map(|a| a["decision"].as_str())
        .collect();
    assert_eq!(
        decisions,
        ["allow", "allow", "invalid_forwarded_for"],
        "{audit:?}"
    );
    assert!(audit.iter().all(|a| a["client_ip"] != STRANGER));
    assert_eq!(audit[1]["forwarded_for"], "2001:db8::7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_above_the_limit_gets_exactly_the_expected_429s() {
    let (_world, emu, sc) = start().await;
    let client = client_from(APP);
    let mut statuses = Vec::new();
    let mut retry_afters = Vec::new();
    for _ in 0..8 {
        let r = client.get(sc.url("/api/v2/accounts")).send().await.unwrap();
        if r.status() == 429 {
            retry_afters.push(
                r.headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok()),
            );
            assert!(r.headers().get("connection").is_none_or(|v| v != "close"));
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"], "rate_limited");
            statuses.push(429);
        } else {
            statuses.push(r.status().as_u16());
        }
    }
    // Burst 5 at 1/s: the 8 requests take well under a second, so exactly 3 are refused.
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        3,
        "{statuses:?}"
    );
    assert!(
        retry_afters.iter().all(|r| *r == Some(1)),
        "{retry_afters:?}"
    );
    assert_eq!(
        emu.controls().api_requests().len(),
        5,
        "refused requests never went upstream"
    );
    // Counted when the request is logged, just after the response: wait for the audit lines.
    let audit = sc.wait_audit(8).await;
    assert_eq!(
        sc.metric("finhub_sidecar_rate_limited_total{tenant=\"tenant-demo\"}")
            .await,
        Some(3.0)
    );
    assert_eq!(
        audit
            .iter()
            .filter(|a| a["decision"] == "rate_limited")
            .count(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finhub_429_with_retry_after_holds_the_tenant() {
    let (_world, emu, sc) = World::start(|c| c.allowed_clients(&["127.0.0.0/8"])).await;
    let client = http_client();
    emu.controls().answer_429(1, Some(30));
    let r = client.get(sc.url("/api/v2/accounts")).send().await.unwrap();
    assert_eq!(r.status(), 429, "FinHub's 429 is passed on");
    assert_eq!(r.headers().get("retry-after").unwrap(), "30");
    let before = emu.controls().total_requests();
    let r = client.get(sc.url("/api/v2/accounts")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r
        .headers()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((25..=30).contains(&retry), "remaining hold {retry}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(
        emu.controls().total_requests(),
        before,
        "held requests do not reach FinHub"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finhub_header_rules_as_seen_by_finhub() {
    let (_world, emu, sc) = start().await;
    let client = client_from(APP);
    let app_rid = "9b2f3c1e-7a4d-4e8f-9c0b-1d2e3f4a5b6c";

    // GET with the app's own ids and UA, and credentials it must not pass on.
    let r = client
        .get(sc.url("/api/v2/accounts"))
        .header("X-Request-ID", app_rid)
        .header("X-Activity-ID", "not-a-uuid")
        .header("User-Agent", "legacy-app/3.2")
        .header("Authorization", "Bearer app-secret-token")
        .header("X-User-Session-Token", "app-session")
        .header("Proxy-Authorization", "Basic Zm9vOmJhcg==")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers().get("x-request-id").unwrap(),
        app_rid,
        "request id echoed"
    );
    let (status, get) = json(r).await;
    assert_eq!(status, 200, "{get}");
    let h = &get["headers"];
    assert_eq!(h["x-request-id"], app_rid, "a UUID from the app is kept");
    let activity = h["x-activity-id"].as_str().unwrap();
    assert!(uuid::Uuid::try_parse(activity).is_ok() && activity != "not-a-uuid");
    assert_eq!(
        h["x-correlation-id"], app_rid,
        "correlation id defaults to the request id"
    );
    assert_eq!(h["user-agent"], "legacy-app/3.2");
    assert_eq!(h["sec-ch-ua-platform"], "Linux");
    assert_eq!(h["x-forwarded-from"], "finhub-sidecar");
    assert_eq!(h["platform"], "server");
    assert_eq!(h["deviceid"], "finhub-sidecar");
    assert_eq!(h["x-session-active"], "true");
    assert!(h["x-session-id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(
        h.get("x-idempotency-key").is_none(),
        "no idempotency key on GET"
    );
    assert!(h.get("proxy-authorization").is_none());
    assert_eq!(h["authorization"], "<redacted>");
    let seen = emu.controls().api_requests();
    let sent = |name: &str| seen[0].header(name).unwrap();
    assert!(!sent("authorization").contains("app-secret-token"));
    assert_ne!(sent("x-user-session-token"), "app-session");

    // POST with a body and no Content-Type, no User-Agent, no ids.
    let (status, post) = json(
        client
            .post(sc.url("/api/v2/payments"))
            .body(r#"{"amount":"1.00"}"#)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{post}");
    let h = &post["headers"];
    assert_eq!(h["content-type"], "application/json");
    assert!(h["user-agent"]
        .as_str()
        .unwrap()
        .starts_with("finhub-sidecar/"));
    assert!(h["user-agent"].as_str().unwrap().contains(" rust/"));
    let key = h["x-idempotency-key"].as_str().unwrap();
    assert!(uuid::Uuid::try_parse(key).is_ok());
    let rid = h["x-request-id"].as_str().unwrap();
    assert!(uuid::Uuid::try_parse(rid).is_ok());

    // The app's Authorization never reached FinHub, on any request; nor did it reach the log.
    assert!(emu.controls().api_requests().iter().all(|r| r
        .headers
        .iter()
        .all(|(_, v)| !v.contains("app-secret-token"))));
    // Audit lines are written by a background thread: wait for both.
    let audit = sc.wait_audit(2).await;
    let log = sc.log();
    for secret in [
        "app-secret-token",
        "Zm9vOmJhcg==",
        "demo-password",
        "demo-secret",
    ] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
    assert_eq!(audit.len(), 2);
    assert_eq!(audit[0]["request_id"], app_rid);
    assert_eq!(audit[0]["path"], "/api/v2/accounts");
    assert_eq!(audit[0]["upstream_status"], 200);
    assert_eq!(audit[1]["method"], "POST");
    assert_eq!(audit[1]["bytes_in"], 17);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_headers_are_refused_with_their_name() {
    let (_world, emu, sc) = start().await;
    let client = client_from(APP);
    let (status, body) = json(
        client
            .get(sc.url("/api/v2/accounts"))
            .header("X-Padding", "a".repeat(40 * 1024))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 431);
    assert_eq!(body["error"], "request_headers_too_large");
    let (status, body) = json(
        client
            .get(sc.url("/api/v2/accounts"))
            .header(
                "X-Request-ID",
                reqwest::header::HeaderValue::from_bytes(b"r\xe9q").unwrap(),
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_header");
    assert!(body["message"].as_str().unwrap().contains("x-request-id"));
    assert!(emu.controls().api_requests().is_empty());
}
