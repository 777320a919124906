//! The one dialler to FinHub (`upstream.rs`): the auth client and the API path dial the same
//! addresses the same way, each connect bounded by `upstream.connect_timeout` and connect plus
//! TLS handshake by twice that, per address.

use std::time::Duration;

use crate::common::*;
use finhub_testkit::emulator::Emulator;

/// A TCP listener that accepts every connection and never says a word (a TLS handshake to it
/// never ends), holding the connections open until dropped.
async fn silent_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

/// The emulator for a base URL whose host does not resolve (`https://finhub.invalid`), and a
/// config that dials `addrs` and then the emulator, with a 1 s `connect_timeout`.
async fn emulator_behind(
    world: &World,
    addrs: &[std::net::SocketAddr],
) -> (Emulator, SidecarConfig) {
    let server = world.pki.server_cert(&["finhub.invalid"], &[]).unwrap();
    let emu = Emulator::start(world.emulator_config(&server))
        .await
        .unwrap();
    let port = emu.addr().port();
    let mut connect_to: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    connect_to.push(format!("127.0.0.1:{port}"));
    let config = world
        .config(port)
        .set("upstream.base_url", "https://finhub.invalid")
        .set("upstream.connect_timeout", "1s")
        .set("upstream.connect_to", connect_to);
    (emu, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_address_that_never_finishes_the_tls_handshake_is_skipped_by_login_and_api() {
    let world = World::new();
    let (silent, task) = silent_server().await;
    let (emu, config) = emulator_behind(&world, &[silent]).await;
    // Ready means the login's handshake with the silent address was given up in time.
    let sc = world.sidecar(config).await;
    assert!(emu.controls().stats().logins >= 1);
    let r = client_with_timeout(Duration::from_secs(10))
        .get(sc.url("/api/v2/accounts"))
        .send()
        .await
        .unwrap();
    let (status, body) = json(r).await;
    assert_eq!(status, 200, "{body}\n{}", sc.log());
    task.abort();
}

/// Two addresses that accept and never finish a handshake, ahead of FinHub's, with the
/// handshake bound (twice `connect_timeout`) equal to the whole auth call's time
/// (`auth.request_timeout`): each login attempt is cut short on a silent address, and that
/// address is then tried last, so a later attempt reaches FinHub and the sidecar gets ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_cut_short_on_silent_addresses_move_on_to_finhubs() {
    let world = World::new();
    let (s1, t1) = silent_server().await;
    let (s2, t2) = silent_server().await;
    let (emu, config) = emulator_behind(&world, &[s1, s2]).await;
    let config = config.set("auth.request_timeout", "2s");
    let sc = world.sidecar(config).await;
    assert!(emu.controls().stats().logins >= 1, "{}", sc.log());
    t1.abort();
    t2.abort();
}
