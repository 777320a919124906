//! Session lifecycle against the emulator with token lifetimes of a few seconds: background
//! refresh, fallback to login, outage and recovery, 401 replay, several tenants, no secret in
//! the logs.

mod common;

use std::time::Duration;

use common::*;
use finhub_testkit::emulator::{Emulator, EmulatorUser};
use serde_json::Value;

async fn emulator_with_lifetime(world: &World, secs: u64) -> Emulator {
    let mut cfg = world.emulator_config(&world.server);
    cfg.token_lifetime = Duration::from_secs(secs);
    Emulator::start(cfg).await.unwrap()
}

/// Lifetime of the tokens in the continuity tests: a few seconds, whole-second claims.
const LIFETIME_S: u64 = 4;
/// Renewals each continuity test waits for.
const RENEWALS: u64 = 10;
/// Pause between one traffic worker's requests.
const PAUSE: Duration = Duration::from_millis(10);

/// Continuous load across `RENEWALS` lifetimes against an emulator whose clock is
/// `offset_ms` off: no app request fails, refreshes (not logins) do every renewal, no
/// expired token reaches FinHub, and the sidecar's estimate of FinHub's clock is right.
async fn renewals_under_load(offset_ms: i64) {
    let world = World::new();
    let mut cfg = world.emulator_config(&world.server);
    cfg.token_lifetime = Duration::from_secs(LIFETIME_S);
    cfg.include_internal_token_key = true;
    cfg.clock_offset_ms = offset_ms;
    let emu = Emulator::start(cfg).await.unwrap();
    let sc = world.sidecar(integration(&world, &emu)).await;
    let started = std::time::Instant::now();
    let traffic = Traffic::start(&sc, 2, PAUSE);
    let refreshed = eventually(Duration::from_secs(LIFETIME_S * (RENEWALS + 6)), || async {
        (emu.controls().stats().refreshes >= RENEWALS).then_some(())
    })
    .await;
    let report = traffic.stop().await;
    let (ok, failed) = (report.answers.len(), report.failures);
    let stats = emu.controls().stats();
    eprintln!(
        "clock offset {offset_ms} ms: {ok} requests ok, {failed} failed over {} renewals in {:?}: {stats:?}",
        stats.refreshes,
        started.elapsed()
    );
    assert!(refreshed.is_some(), "{stats:?}\n{}", sc.log());
    assert_eq!(failed, 0, "every app request succeeds\n{}", sc.log());
    assert!(ok > 100, "traffic flowed ({ok})");
    assert_eq!(stats.logins, 1, "one login for the whole run: {stats:?}");
    assert_eq!(
        stats.expired_token_seen, 0,
        "no expired token reached FinHub"
    );
    // Until the offset is pinned down (the first lifetimes) a refresh may come before FinHub's
    // window opens; then every one lands in it.
    assert!(
        stats.refreshes_not_needed <= RENEWALS,
        "early refreshes stop once FinHub's clock is known: {stats:?}"
    );
    let counted = eventually(Duration::from_secs(5), || async {
        sc.metric("finhub_sidecar_auth_requests_total{kind=\"refresh\",result=\"ok\",tenant=\"tenant-demo\"}")
            .await
            .filter(|v| *v >= RENEWALS as f64)
    })
    .await;
    assert!(counted.is_some(), "refreshes counted in the metrics");
    // The estimate of FinHub's clock, in the metric and in /status.
    let offset = offset_ms as f64 / 1000.0;
    let metric = sc
        .metric("finhub_sidecar_finhub_clock_offset_seconds")
        .await
        .expect("clock offset metric");
    assert!(
        (metric - offset).abs() < 0.6,
        "metric {metric} for {offset}"
    );
    let status = sc.status().await.expect("/status");
    let clock = &status["finhub_clock"];
    let (est, err) = (
        clock["offset_seconds"].as_f64().unwrap(),
        clock["uncertainty_seconds"].as_f64().unwrap(),
    );
    assert!(
        (est - offset).abs() <= err + 0.05 && err < 0.6,
        "status {clock} for {offset}"
    );
    assert!(status["tenants"][0]["finhub_exp_unix"].as_u64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_traffic_across_ten_lifetimes_is_served_by_refreshes() {
    renewals_under_load(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fin_hub_clock_three_seconds_ahead_changes_nothing() {
    renewals_under_load(3_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fin_hub_clock_three_seconds_behind_changes_nothing() {
    renewals_under_load(-3_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn still_valid_answer_after_a_fin_hub_clock_step_reschedules_and_is_not_a_failure() {
    let world = World::new();
    let emu = emulator_with_lifetime(&world, LIFETIME_S).await;
    let sc = world.sidecar(integration(&world, &emu)).await;
    let traffic = Traffic::start(&sc, 1, PAUSE);
    let learnt = eventually(Duration::from_secs(LIFETIME_S * 8), || async {
        (emu.controls().stats().refreshes >= 3).then_some(())
    })
    .await;
    assert!(learnt.is_some(), "{:?}", emu.controls().stats());
    // FinHub's clock is stepped back: the next planned refresh reaches it before its window
    // opens and gets "not refreshed, still valid".
    let before = emu.controls().stats();
    emu.controls().set_clock_offset_ms(-1_500);
    let done = eventually(Duration::from_secs(LIFETIME_S * 8), || async {
        let s = emu.controls().stats();
        (s.refreshes >= before.refreshes + 3).then_some(())
    })
    .await;
    let failed = traffic.stop().await.failures;
    let stats = emu.controls().stats();
    assert!(done.is_some(), "{stats:?}\n{}", sc.log());
    assert!(
        stats.refreshes_not_needed > before.refreshes_not_needed,
        "the step made a refresh early: {before:?} {stats:?}"
    );
    assert_eq!(failed, 0);
    assert_eq!(
        stats.logins, 1,
        "a 'not refreshed' answer never causes a login"
    );
    assert_eq!(stats.expired_token_seen, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_without_refresh_key_is_renewed_by_login_before_expiry() {
    let world = World::new();
    let mut cfg = world.emulator_config(&world.server);
    cfg.token_lifetime = Duration::from_secs(3);
    cfg.include_internal_token_key = false;
    let emu = Emulator::start(cfg).await.unwrap();
    let sc = world.sidecar(integration(&world, &emu)).await;
    let traffic = Traffic::start(&sc, 1, PAUSE);
    let relogged = eventually(Duration::from_secs(20), || async {
        (emu.controls().stats().logins >= 3).then_some(())
    })
    .await;
    let failed = traffic.stop().await.failures;
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
async fn auth_outage_longer_than_a_lifetime_gives_503_then_recovers_within_one_step() {
    const RECOVERY_S: u64 = 2;
    let world = World::new();
    let emu = emulator_with_lifetime(&world, 3).await;
    let config = integration(&world, &emu).set("auth.recovery_interval", format!("{RECOVERY_S}s"));
    let sc = world.sidecar(config).await;
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

    // Stay down well past the point where an exponential backoff would reach many seconds,
    // counting the attempts: one per recovery step (jittered within its second half), not a
    // tight loop.
    let before = emu.controls().stats().auth_requests;
    let window = Duration::from_secs(8);
    let until = std::time::Instant::now() + window;
    eventually(window + Duration::from_secs(2), || async {
        (std::time::Instant::now() >= until).then_some(())
    })
    .await;
    let attempts = emu.controls().stats().auth_requests - before;
    let most = window.as_secs() * 2 / RECOVERY_S + 1;
    assert!(
        (2..=most).contains(&attempts),
        "{attempts} auth attempts in {window:?} (recovery step {RECOVERY_S} s)"
    );

    emu.controls().set_auth_down(false);
    let back = std::time::Instant::now();
    let recovered = eventually(Duration::from_secs(45), || async {
        let r = client.get(&url).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let took = back.elapsed();
    eprintln!("recovered {took:?} after auth came back ({attempts} attempts in {window:?})");
    assert!(recovered.is_some(), "recovered on its own\n{}", sc.log());
    assert!(
        took < Duration::from_secs(RECOVERY_S + 2),
        "apps recover within one recovery step of FinHub's return, not {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_session_is_renewed_and_the_request_replayed_once() {
    let world = World::new();
    let emu = world.emulator().await;
    let sc = world
        .sidecar(integration(&world, &emu).set("auth.replay_body_limit", 1024))
        .await;
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
    let h = |i: usize, name: &str| seen[i].header(name).map(str::to_string);
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
    let world = World::new();
    let emu = Emulator::start(two_tenants(&world)).await.unwrap();
    let sc = world
        .sidecar(with_tenant_b(integration(&world, &emu)))
        .await;
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
            r.header("authorization")
                .map(|v| v.trim_start_matches("Bearer ").to_string())
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

/// An emulator config with a second user (tenant `tenant-b`, see [`with_tenant_b`]).
fn two_tenants(world: &World) -> finhub_testkit::emulator::EmulatorConfig {
    std::fs::write(world.dir.path().join("password-b"), "b-password-7f3a").unwrap();
    let mut cfg = world.emulator_config(&world.server);
    cfg.users.push(EmulatorUser {
        username: "svc-b".into(),
        password: "b-password-7f3a".into(),
        customer_id: "cust-b".into(),
        customer_secret: "b-secret-91c2".into(),
        tenant_id: "tenant-b".into(),
    });
    cfg
}

/// The sidecar's second tenant, the emulator's user of [`two_tenants`].
fn with_tenant_b(config: SidecarConfig) -> SidecarConfig {
    config.tenant("tenant-b", "svc-b", "password-b")
}

/// The default config against `emu` in the `integration` environment (refresh by key).
fn integration(world: &World, emu: &Emulator) -> SidecarConfig {
    world.config(emu.addr().port()).environment("integration")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_logs_each_tenant_out_after_the_last_request_then_exits_zero() {
    let world = World::new();
    let emu = Emulator::start(two_tenants(&world)).await.unwrap();
    let config = with_tenant_b(integration(&world, &emu)).shutdown("500ms", "10s");
    let sc = world.sidecar(config).await;
    let client = http_client();
    for tenant in [TENANT, "tenant-b"] {
        let r = client
            .get(sc.url("/api/v2/accounts"))
            .header("X-Tenant-ID", tenant)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{tenant}");
    }

    // A slow request is in flight when SIGTERM arrives; it must finish before any logout.
    let slow = slow_request_in_flight(&sc, &emu, Duration::from_millis(1500)).await;
    emu.controls().set_delay(Duration::ZERO);
    let signalled = std::time::Instant::now();
    sc.signal(libc::SIGTERM);
    assert_eq!(slow.await.unwrap().unwrap(), 200);
    let code = sc.exit_code(Duration::from_secs(20)).await;
    let took = signalled.elapsed();
    eprintln!("SIGTERM to exit with logout: {took:?}");
    assert_eq!(code, Some(0), "{}", sc.log());

    let logouts = emu.controls().logouts();
    let mut tenants: Vec<_> = logouts.iter().filter_map(|l| l.tenant.clone()).collect();
    tenants.sort();
    assert_eq!(
        tenants,
        vec!["tenant-b".to_string(), TENANT.to_string()],
        "{logouts:?}"
    );
    assert!(
        logouts.iter().all(|l| l.cleared),
        "each logout ended a live session"
    );
    let last_answer = emu
        .controls()
        .api_requests()
        .iter()
        .map(|r| r.answered_at)
        .max()
        .unwrap();
    assert!(
        logouts.iter().all(|l| l.at > last_answer),
        "logout only after the last in-flight request"
    );
    let stats = emu.controls().stats();
    assert_eq!(stats.logouts, 2);
    assert_eq!(stats.logins, 2, "no login after logout: {stats:?}");
    assert!(sc.log().contains("session logged out"));
}

/// SIGTERM while FinHub's auth endpoints are down (`hang`: answers take 30 s; else 503): the
/// process still exits 0 within the logout bound.
async fn logout_is_bounded(hang: bool) -> Duration {
    let world = World::new();
    let emu = world.emulator().await;
    // The auth client's own timeout is longer than the bound: only the bound can end it.
    let config = integration(&world, &emu)
        .set("auth.request_timeout", "20s")
        .set("auth.logout_timeout", "1s")
        .shutdown("0s", "5s");
    let sc = world.sidecar(config).await;
    if hang {
        emu.controls().set_delay(Duration::from_secs(30));
    } else {
        emu.controls().set_auth_down(true);
    }
    let signalled = std::time::Instant::now();
    sc.signal(libc::SIGTERM);
    let code = sc.exit_code(Duration::from_secs(25)).await;
    let took = signalled.elapsed();
    assert_eq!(code, Some(0), "{}", sc.log());
    let log = sc.log();
    if hang {
        assert!(log.contains("logout did not finish"), "{log}");
    } else {
        assert!(log.contains("logout failed"), "{log}");
    }
    assert_eq!(emu.controls().stats().logouts, 0);
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_never_holds_the_exit_beyond_its_bound() {
    let (down, hanging) = (
        logout_is_bounded(false).await,
        logout_is_bounded(true).await,
    );
    eprintln!("SIGTERM to exit: auth down {down:?}, auth hanging {hanging:?}");
    // 1 s logout bound, plus Pingora's own graceful stop; far below the 20 s auth timeout.
    for took in [down, hanging] {
        assert!(took < Duration::from_secs(8), "{took:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_logout_when_turned_off_or_on_sigint() {
    for (setting, signal) in [(Some(false), libc::SIGTERM), (None, libc::SIGINT)] {
        let world = World::new();
        let emu = world.emulator().await;
        let mut config = integration(&world, &emu).shutdown("0s", "5s");
        if let Some(logout) = setting {
            config = config.set("auth.logout_on_shutdown", logout);
        }
        let sc = world.sidecar(config).await;
        let signalled = std::time::Instant::now();
        sc.signal(signal);
        let code = sc.exit_code(Duration::from_secs(20)).await;
        eprintln!(
            "signal {signal} ({setting:?}) to exit without logout: {:?}",
            signalled.elapsed()
        );
        assert!(code.is_some(), "{}", sc.log());
        if signal == libc::SIGTERM {
            assert_eq!(code, Some(0));
        }
        assert!(emu.controls().logouts().is_empty(), "{setting:?} {signal}");
        assert_eq!(emu.controls().stats().auth_requests, 1, "the login only");
    }
}
