//! Session lifecycle against the emulator with token lifetimes of a few seconds: background
//! refresh, fallback to login, outage and recovery, 401 replay, several tenants, no secret in
//! the logs.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use finhub_sidecar::emulator::{Emulator, EmulatorUser};
use serde_json::Value;

/// Requests in a loop until stopped; counts non-200 answers.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(sc: &SidecarProcess, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                let url = sc.url("/api/v2/accounts");
                tokio::spawn(async move {
                    let client = http_client();
                    while !stop.load(Ordering::SeqCst) {
                        match client.get(&url).send().await {
                            Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::SeqCst),
                            Ok(r) => {
                                eprintln!(
                                    "load: {} {}",
                                    r.status(),
                                    r.text().await.unwrap_or_default()
                                );
                                failed.fetch_add(1, Ordering::SeqCst)
                            }
                            Err(e) => {
                                eprintln!("load: {e}");
                                failed.fetch_add(1, Ordering::SeqCst)
                            }
                        };
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

async fn emulator_with_lifetime(world: &World, secs: u64) -> Emulator {
    let mut cfg = world.emulator_config(&world.server);
    cfg.token_lifetime = Duration::from_secs(secs);
    Emulator::start(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_traffic_across_four_lifetimes_is_served_by_refreshes() {
    let mut world = World::new();
    world.environment = "integration";
    let emu = emulator_with_lifetime(&world, 3).await;
    let sc = world.sidecar(emu.addr().port(), "").await;
    let load = Load::start(&sc, 2);
    let refreshed = eventually(Duration::from_secs(40), || async {
        (emu.controls().stats().refreshes >= 4).then_some(())
    })
    .await;
    let (ok, failed) = load.stop().await;
    let stats = emu.controls().stats();
    assert!(refreshed.is_some(), "{stats:?}\n{}", sc.log());
    assert_eq!(failed, 0, "every app request succeeds");
    assert!(ok > 50, "traffic flowed ({ok})");
    assert_eq!(stats.logins, 1, "one login for the whole run: {stats:?}");
    assert_eq!(
        stats.expired_token_seen, 0,
        "no expired token reached FinHub"
    );
    assert_eq!(
        stats.refreshes_not_needed, 0,
        "every refresh landed in FinHub's 10 % window"
    );
    let counted = eventually(Duration::from_secs(5), || async {
        sc.metric("finhub_sidecar_auth_requests_total{kind=\"refresh\",result=\"ok\",tenant=\"tenant-demo\"}")
            .await
            .filter(|v| *v >= 4.0)
    })
    .await;
    assert!(counted.is_some(), "refreshes counted in the metrics");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn still_valid_answer_reschedules_and_is_not_a_failure() {
    let mut world = World::new();
    world.environment = "integration";
    world.auth_extra = "refresh_at = 0.5".into();
    let emu = emulator_with_lifetime(&world, 3).await;
    let sc = world.sidecar(emu.addr().port(), "").await;
    let load = Load::start(&sc, 1);
    let done = eventually(Duration::from_secs(20), || async {
        let s = emu.controls().stats();
        (s.refreshes >= 1 && s.refreshes_not_needed >= 1).then_some(())
    })
    .await;
    let (_, failed) = load.stop().await;
    assert!(done.is_some(), "{:?}\n{}", emu.controls().stats(), sc.log());
    assert_eq!(failed, 0);
    assert_eq!(
        emu.controls().stats().logins,
        1,
        "a 'not refreshed' answer never causes a login"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_without_refresh_key_is_renewed_by_login_before_expiry() {
    let mut world = World::new();
    world.environment = "integration";
    let mut cfg = world.emulator_config(&world.server);
    cfg.token_lifetime = Duration::from_secs(3);
    cfg.include_internal_token_key = false;
    let emu = Emulator::start(cfg).await.unwrap();
    let sc = world.sidecar(emu.addr().port(), "").await;
    let load = Load::start(&sc, 1);
    let relogged = eventually(Duration::from_secs(20), || async {
        (emu.controls().stats().logins >= 3).then_some(())
    })
    .await;
    let (_, failed) = load.stop().await;
    assert!(relogged.is_some(), "{:?}", emu.controls().stats());
    assert_eq!(failed, 0);
    let stats = emu.controls().stats();
    assert_eq!(
        stats.refreshes + stats.refreshes_not_needed,
        0,
        "no refresh without the key"
    );
    assert_eq!(stats.expired_token_seen, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_outage_longer_than_a_lifetime_gives_503_then_recovers_with_backoff() {
    let mut world = World::new();
    world.environment = "integration";
    let emu = emulator_with_lifetime(&world, 3).await;
    let sc = world.sidecar(emu.addr().port(), "").await;
    emu.controls().set_auth_down(true);
    let client = http_client();
    let url = sc.url("/api/v2/accounts");

    // Requests succeed until the session expires, then get 503 with Retry-After.
    let first = client.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let unavailable = eventually(Duration::from_secs(10), || async {
        let r = client.get(&url).send().await.ok()?;
        (r.status() == 503).then_some(r)
    })
    .await
    .expect("503 once the session expired");
    assert!(unavailable.headers().get("retry-after").is_some());
    let body: Value = unavailable.json().await.unwrap();
    assert_eq!(body["error"], "session_unavailable");
    assert_eq!(
        emu.controls().stats().expired_token_seen,
        0,
        "the expired token was never sent"
    );

    // Stay down a while longer and count the attempts: backoff, not a tight loop.
    let before = emu.controls().total_requests();
    let until = std::time::Instant::now() + Duration::from_secs(4);
    eventually(Duration::from_secs(10), || async {
        (std::time::Instant::now() >= until).then_some(())
    })
    .await;
    let attempts = emu.controls().total_requests() - before;
    assert!(
        attempts <= 12,
        "{attempts} auth attempts in 4 s is a tight loop"
    );

    emu.controls().set_auth_down(false);
    let recovered = eventually(Duration::from_secs(45), || async {
        let r = client.get(&url).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(recovered.is_some(), "recovered on its own\n{}", sc.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_session_is_renewed_and_the_request_replayed_once() {
    let mut world = World::new();
    world.environment = "integration";
    world.auth_extra = "replay_body_limit = 1024".into();
    let emu = world.emulator().await;
    let sc = world.sidecar(emu.addr().port(), "").await;
    let client = http_client();

    emu.controls().revoke_all_sessions();
    let r = client
        .post(sc.url("/api/v2/payments"))
        .header("X-Idempotency-Key", "c0ffee00-0000-4000-8000-000000000001")
        .body(r#"{"amount":"1.00"}"#)
        .send()
        .await
        .unwrap();
    let request_id = r.headers().get("x-request-id").cloned();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(
        sc.metric("finhub_sidecar_upstream_401_replays_total{tenant=\"tenant-demo\"}")
            .await,
        Some(1.0)
    );
    // The original and the replay carry the same request id and idempotency key.
    let seen = emu.controls().api_requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].status, 401);
    assert_eq!(seen[1].status, 200);
    let h = |i: usize, name: &str| {
        seen[i]
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(h(0, "x-request-id"), h(1, "x-request-id"));
    assert_eq!(
        h(0, "x-request-id").as_deref(),
        request_id.as_ref().and_then(|v| v.to_str().ok())
    );
    assert_eq!(
        h(1, "x-idempotency-key").as_deref(),
        Some("c0ffee00-0000-4000-8000-000000000001")
    );
    assert_ne!(h(0, "authorization"), h(1, "authorization"));

    // A body above the replay limit is streamed, not kept: the 401 goes back to the app.
    emu.controls().revoke_all_sessions();
    let big = vec![b'x'; 4096];
    let r = client
        .post(sc.url("/api/v2/documents"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        sc.metric("finhub_sidecar_upstream_401_replays_total{tenant=\"tenant-demo\"}")
            .await,
        Some(1.0),
        "the large request was not replayed"
    );
    // ...and the session is renewed, so the next request succeeds.
    let ok = eventually(Duration::from_secs(10), || async {
        let r = client.get(sc.url("/api/v2/accounts")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert!(ok.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_gets_its_own_session_and_no_secret_reaches_the_log() {
    let mut world = World::new();
    world.environment = "integration";
    std::fs::write(world.dir.path().join("password-b"), "b-password-7f3a").unwrap();
    let mut cfg = world.emulator_config(&world.server);
    cfg.users.push(EmulatorUser {
        username: "svc-b".into(),
        password: "b-password-7f3a".into(),
        customer_id: "cust-b".into(),
        customer_secret: "b-secret-91c2".into(),
        tenant_id: "tenant-b".into(),
    });
    let emu = Emulator::start(cfg).await.unwrap();
    let extra =
        "[[tenants]]\nid = \"tenant-b\"\nusername = \"svc-b\"\npassword_file = \"password-b\"\n";
    let sc = world.sidecar(emu.addr().port(), extra).await;
    let client = http_client();

    for (tenant, header) in [
        (TENANT, None),
        (TENANT, Some(TENANT)),
        ("tenant-b", Some("tenant-b")),
    ] {
        let mut req = client.get(sc.url("/api/v2/accounts"));
        if let Some(h) = header {
            req = req.header("X-Tenant-ID", h);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200, "{tenant}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["tenant"], tenant,
            "the token's tenant matches the request's"
        );
        assert_eq!(v["headers"]["x-tenant-id"], tenant);
    }
    let tokens: Vec<String> = emu
        .controls()
        .api_requests()
        .iter()
        .filter_map(|r| {
            r.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                .map(|(_, v)| v.trim_start_matches("Bearer ").to_string())
        })
        .collect();
    assert_eq!(tokens.len(), 3);
    assert_eq!(tokens[0], tokens[1]);
    assert_ne!(tokens[0], tokens[2], "tenants never share a session");

    let log = sc.log();
    assert!(
        log.contains("session renewed"),
        "the log was captured:\n{log}"
    );
    for secret in [
        "demo-password",
        "demo-secret",
        "b-password-7f3a",
        "b-secret-91c2",
    ] {
        assert!(!log.contains(secret), "{secret} leaked into the log");
    }
    for t in &tokens {
        // Any long piece of a token would be a leak; check its signature part.
        let sig = t.rsplit('.').next().unwrap();
        assert!(!log.contains(sig), "a session token leaked into the log");
    }
}
