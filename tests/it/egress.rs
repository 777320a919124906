//! Egress through a real HTTP CONNECT proxy (Debian's tinyproxy, started by each test) and the
//! connect-address override, against the mTLS emulator.

use std::time::Duration;

use crate::common::*;
use base64::Engine;
use finhub_testkit::emulator::{Emulator, EmulatorConfig};

/// `Proxy-Authorization: Basic` as it goes on the wire for `user:password`: no log line may
/// contain it either.
fn basic(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// `/ready`'s status and body.
async fn ready(sc: &SidecarProcess) -> (u16, String) {
    match client_with_timeout(Duration::from_secs(5))
        .get(format!("http://{}/ready", sc.admin))
        .send()
        .await
    {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// A TCP port nothing answers on in time: a listener whose accept queue (backlog 0) is full,
/// so the kernel drops further SYNs, like a firewall that blackholes. Keep it alive.
struct Blackhole {
    addr: std::net::SocketAddr,
    _listener: socket2::Socket,
    _fill: Vec<socket2::Socket>,
}

impl Blackhole {
    fn new() -> Blackhole {
        use socket2::{Domain, Socket, Type};
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        listener.bind(&any.into()).unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let mut fill = Vec::new();
        for _ in 0..3 {
            let c = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            c.set_nonblocking(true).unwrap();
            let _ = c.connect(&addr.into());
            fill.push(c);
        }
        Blackhole {
            addr,
            _listener: listener,
            _fill: fill,
        }
    }
}

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
    assert!(!sc.log().contains(&basic("svc", "proxy-pw-1")));
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
        sc.counter("finhub_sidecar_egress_proxy_errors_total{path=\"api\",reason=\"refused\"}")
            .await
            >= 1.0
    );
    // The new password reaches the sidecar's file: the next tunnel uses it, no restart.
    std::fs::write(world.dir.path().join("proxy_password"), "new-proxy-pw").unwrap();
    let (status, body) = get(&sc).await;
    assert_eq!(status, 200, "{body}");
    let log = sc.log();
    assert!(!log.contains("old-proxy-pw") && !log.contains("new-proxy-pw"));
    for pw in ["old-proxy-pw", "new-proxy-pw"] {
        assert!(!log.contains(&basic("svc", pw)), "{log}");
    }
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
        sc.counter("finhub_sidecar_egress_proxy_errors_total{path=\"api\",reason=\"unreachable\"}")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_port_is_dialled_by_login_refresh_and_api_whatever_the_base_urls_port() {
    let world = World::new();
    let server = world.pki.server_cert(&["finhub.invalid"], &[]).unwrap();
    let mut cfg = world.emulator_config(&server);
    cfg.token_lifetime = Duration::from_secs(4);
    let emu = Emulator::start(cfg).await.unwrap();
    // The base URL names a port nothing listens on: only connect_to's port reaches FinHub.
    let unused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = world
        .config(emu.addr().port())
        .environment("integration")
        .set(
            "upstream.base_url",
            format!("https://finhub.invalid:{unused}"),
        )
        .set(
            "upstream.connect_to",
            vec![format!("127.0.0.1:{}", emu.addr().port())],
        );
    let sc = world.sidecar(config).await;
    let (status, body) = get(&sc).await;
    assert_eq!(status, 200, "{body}\n{}", sc.log());
    let refreshed = eventually(Duration::from_secs(20), || async {
        (emu.controls().stats().refreshes >= 1).then_some(())
    })
    .await;
    assert!(
        refreshed.is_some(),
        "{:?}\n{}",
        emu.controls().stats(),
        sc.log()
    );
    let (status, body) = get(&sc).await;
    assert_eq!(status, 200, "{body}");
    // Host stays the base URL's authority, port included.
    let seen = emu.controls().api_requests();
    let r = seen.last().unwrap();
    assert_eq!(r.sni.as_deref(), Some("finhub.invalid"));
    assert_eq!(
        r.header("host"),
        Some(format!("finhub.invalid:{unused}").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_first_connect_to_address_is_skipped_by_the_login() {
    let world = World::new();
    let server = world.pki.server_cert(&["finhub.invalid"], &[]).unwrap();
    let emu = Emulator::start(world.emulator_config(&server))
        .await
        .unwrap();
    let port = emu.addr().port();
    let hole = Blackhole::new();
    // The hole really drops connection attempts (else this test proves nothing).
    assert!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(hole.addr)
        )
        .await
        .is_err(),
        "the blackhole accepted a connection"
    );
    // Port 443 in the base URL: only connect_to's ports are dialled.
    let config = world
        .config(port)
        .set("upstream.base_url", "https://finhub.invalid")
        .set("upstream.connect_timeout", "1s")
        .set(
            "upstream.connect_to",
            vec![hole.addr.to_string(), format!("127.0.0.1:{port}")],
        );
    // Ready means the login got past the blackholed address.
    let sc = world.sidecar(config).await;
    let (status, body) = get(&sc).await;
    assert_eq!(status, 200, "{body}");
    assert!(emu.controls().stats().logins >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_refusing_the_login_tunnel_is_counted_named_in_ready_and_logged() {
    let world = World::new();
    let emu = emulator(&world, 3600).await;
    // The proxy wants credentials the sidecar does not send: 407 on the login's CONNECT.
    let mut opts = TinyproxyOpts {
        connect_port: emu.addr().port(),
        basic_auth: Some(("svc", "proxy-pw")),
    };
    let mut proxy = Tinyproxy::start(world.dir.path(), &opts).await;
    let config = world
        .config(emu.addr().port())
        .set("upstream.egress_proxy", format!("http://{}", proxy.addr));
    let sc = world.spawn_sidecar(config).await;
    let named = eventually(Duration::from_secs(20), || async {
        let (status, body) = ready(&sc).await;
        (status == 503 && body.contains("egress_proxy") && body.contains("HTTP 407"))
            .then_some(body)
    })
    .await;
    assert!(named.is_some(), "{:?}\n{}", ready(&sc).await, sc.log());
    assert!(
        sc.counter("finhub_sidecar_egress_proxy_errors_total{path=\"auth\",reason=\"refused\"}")
            .await
            >= 1.0,
        "{}",
        sc.scrape().await.unwrap_or_default()
    );
    let log = sc.log();
    assert!(
        log.lines()
            .any(|l| l.contains("refused the tunnel (HTTP 407)") && l.contains("login")),
        "{log}"
    );
    // The proxy stops asking: the next login attempt gets through, the reason goes away.
    opts.basic_auth = None;
    proxy.reconfigure(&opts).await;
    sc.wait_ready(Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", sc.log()));
    assert_eq!(get(&sc).await.0, 200);
    assert!(!sc.log().contains("proxy-pw"));
}
