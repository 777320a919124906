//! HTTP clients (direct, from a given loopback address, with a timeout) and JSON helpers.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;

/// Installs ring as the process-wide rustls provider (reqwest is built without one).
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A plain client (direct, no proxy).
pub fn http_client() -> reqwest::Client {
    init_crypto();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A direct client whose requests give up after `timeout`.
pub fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    init_crypto();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .unwrap()
}

/// A direct client whose connections come from the loopback address `ip` (e.g. `127.0.0.2`).
pub fn client_from(ip: &str) -> reqwest::Client {
    init_crypto();
    reqwest::Client::builder()
        .no_proxy()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

/// Status and JSON body of a response; panics (showing the body) if it is not JSON.
pub async fn json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    let v = serde_json::from_slice(&body).unwrap_or_else(|_| {
        panic!(
            "status {status}: body is not JSON: {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, v)
}

/// A header of the emulator's echo answer (what FinHub received), names lowercase.
pub fn echo_header<'a>(echo: &'a Value, name: &str) -> Option<&'a str> {
    echo["headers"][name].as_str()
}
