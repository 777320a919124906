//! Egress through a real HTTP CONNECT proxy (Debian's tinyproxy, started by each test) and the
//! connect-address override, against the mTLS emulator.

mod common;

use std::time::Duration;

use common::*;
use finhub_testkit::emulator::{Emulator, EmulatorConfig};

/// The emulator with `lifetime`-second tokens (integration: renewals are refreshes).
async fn emulator(world: &World, lifetime: u64) -> Emulator {
    let mut cfg: EmulatorConfig = world.emulator_config(&world.server);
    cfg.token_lifetime = Duration::from_secs(lifetime);
    Emulator::start(cfg).await.unwrap()
}

/// The world's config through `proxy` as `svc` with the password in the file `proxy_password`.
fn through(world: &World, emu: &Emulator, proxy: &Tinyproxy, password: &str) -> SidecarConfig {
    std::fs::write(world.dir.path().join("proxy_password"), password).unwrap();
    world
        .config(emu.addr().port())
        .environment("integration")
        .set("upstream.egress_proxy", format!("http://{}", proxy.addr))
        .set("upstream.egress_proxy_username", "svc")
        .set("upstream.egress_proxy_password_file", "proxy_password")
}

async fn get(sc: &SidecarProcess) -> (u16, serde_json::Value) {
    let r = client_with_timeout(Duration::from_secs(10))
        .get(sc.url("/api/v2/accounts"))
        .send()
        .await
        .unwrap();
    json(r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_login_and_refresh_go_through_the_proxy_as_connect_tunnels_only() {
    let world = World::new();
    let emu = emulator(&world, 4).await;
    let proxy = Tinyproxy::start(
        world.dir.path(),
        &TinyproxyOpts {
            connect_port: emu.addr().port(),
            basic_auth: Some(("svc", "proxy-pw-1")),
        },
    )
    .await;
    let sc = world
        .sidecar(through(&world, &emu, &proxy, "proxy-pw-1"))
        .await;
    for _ in 0..5 {
        let (status, body) = get(&sc).await;
        assert_eq!(status, 200, "{body}\n{}", sc.log());
    }
    // FinHub saw the client certificate end to end, under its own name.
    let seen = emu.controls().api_requests();
    assert_eq!(seen.len(), 5);
    for r in &seen {
        let cert = r
            .client_cert
            .as_ref()
            .expect("client certificate presented");
        assert_eq!(cert.serial_hex, world.client.serial_hex);
        assert_eq!(r.sni.as_deref(), Some("localhost"));
    }
    // Renewals go through the proxy too.
    let refreshed = eventually(Duration::from_secs(20), || async {
        (emu.controls().stats().refreshes >= 1).then_some(())
    })
    .await;
    assert!(refreshed.is_some(), "{:?}", emu.controls().stats());
    // Pooled tunnels are reused like direct connections.
    let reused = sc
        .counter("finhub_sidecar_upstream_connections_total{reused=\"true\"}")
        .await;
    assert!(reused >= 3.0, "reused {reused}");
    // The proxy saw nothing but CONNECTs to FinHub: the API's pooled tunnel and the auth
    // client's (login, then refreshes on the same kept-alive tunnel).
    let target = format!("CONNECT localhost:{} HTTP/1.1", emu.addr().port());
    let requests = proxy.requests();
    assert!(requests.len() >= 2, "{requests:?}");
    assert!(requests.iter().all(|r| *r == target), "{requests:?}");
    assert!(!sc.log().contains("proxy-pw-1"));
    assert!(!proxy.log().contains("/api/v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_refuses_gives_apps_egress_proxy_refused_and_a_rotated_password_recovers() {
    let world = World::new();
    let emu = emulator(&world, 3600).await;
    let mut opts = TinyproxyOpts {
        connect_port: emu.addr().port(),
        basic_auth: Some(("svc", "old-proxy-pw")),
    };
    let mut proxy = Tinyproxy::start(world.dir.path(), &opts).await;
    let sc = world
        .sidecar(through(&world, &emu, &proxy, "old-proxy-pw"))
        .await;
    assert_eq!(get(&sc).await.0, 200);
    // The proxy's credentials are rotated; the sidecar's file still holds the old password.
    opts.basic_auth = Some(("svc", "new-proxy-pw"));
    proxy.reconfigure(&opts).await;
    let (status, body) = get(&sc).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("egress_proxy_refused")),
        "{body}"
    );
    // tinyproxy answers wrong credentials with 401 (407 when none are sent, below).
    assert!(
        body["message"].as_str().unwrap().contains("HTTP 401"),
        "{body}"
    );
    assert!(
        sc.counter("finhub_sidecar_egress_proxy_errors_total{reason=\"refused\"}")
            .await
            >= 1.0
    );
    // The new password reaches the sidecar's file: the next tunnel uses it, no restart.
    std::fs::write(world.dir.path().join("proxy_password"), "new-proxy-pw").unwrap();
    let (status, body) = get(&sc).await;
    assert_eq!(status, 200, "{body}");
    let log = sc.log();
    assert!(!log.contains("old-proxy-pw") && !log.contains("new-proxy-pw"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_restart_is_survived() {
    let world = World::new();
    let emu = emulator(&world, 3600).await;
    let mut proxy = Tinyproxy::start(
        world.dir.path(),
        &TinyproxyOpts {
            connect_port: emu.addr().port(),
            basic_auth: None,
        },
    )
    .await;
    let config = world
        .config(emu.addr().port())
        .set("upstream.egress_proxy", format!("http://{}", proxy.addr));
    let sc = world.sidecar(config).await;
    assert_eq!(get(&sc).await.0, 200);
    proxy.stop();
    let (status, body) = get(&sc).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("egress_proxy_unreachable")),
        "{body}"
    );
    assert!(
        sc.counter("finhub_sidecar_egress_proxy_errors_total{reason=\"unreachable\"}")
            .await
            >= 1.0
    );
    // Back, but its policy no longer allows FinHub's port: 403.
    let mut opts = TinyproxyOpts {
        connect_port: emu.addr().port().wrapping_add(1),
        basic_auth: None,
    };
    proxy.reconfigure(&opts).await;
    let (status, body) = get(&sc).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("egress_proxy_refused")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("HTTP 403"),
        "{body}"
    );
    // Allowed again, but demanding credentials the sidecar does not have: 407.
    opts = TinyproxyOpts {
        connect_port: emu.addr().port(),
        basic_auth: Some(("svc", "pw")),
    };
    proxy.reconfigure(&opts).await;
    let (status, body) = get(&sc).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("egress_proxy_refused")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("HTTP 407"),
        "{body}"
    );
    opts.basic_auth = None;
    proxy.reconfigure(&opts).await;
    let back = eventually(Duration::from_secs(10), || async {
        (get(&sc).await.0 == 200).then_some(())
    })
    .await;
    assert!(back.is_some(), "{}", sc.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_needs_no_dns_tries_its_addresses_in_order_and_keeps_the_base_urls_name() {
    let world = World::new();
    // FinHub's certificate names only the host that does not resolve.
    let server = world.pki.server_cert(&["finhub.invalid"], &[]).unwrap();
    let emu = Emulator::start(world.emulator_config(&server))
        .await
        .unwrap();
    let port = emu.addr().port();
    // The first address refuses connections: the next one is tried.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = world
        .config(port)
        .set(
            "upstream.base_url",
            format!("https://finhub.invalid:{port}"),
        )
        .set(
            "upstream.connect_to",
            vec![dead.to_string(), format!("127.0.0.1:{port}")],
        );
    // Ready means the login (the auth client) got through as well.
    let sc = world.sidecar(config).await;
    let (status, body) = get(&sc).await;
    assert_eq!(status, 200, "{body}");
    let seen = emu.controls().api_requests();
    let r = seen.last().unwrap();
    assert_eq!(r.sni.as_deref(), Some("finhub.invalid"));
    assert_eq!(
        r.header("host"),
        Some(format!("finhub.invalid:{port}").as_str())
    );
    assert!(r.client_cert.is_some());
}
