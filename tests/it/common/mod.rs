//! Test harness shared by every integration test, split by role:
//!
//! - [`world`]: certificates, the FinHub emulator's config, TCP fixtures (a switchable upstream,
//!   a foreign host that counts what reaches it);
//! - [`config`]: the sidecar's config file as a typed builder;
//! - [`sidecar`]: the real sidecar binary as a child process: readiness, scrape, metric, log;
//! - [`http`]: HTTP clients and JSON helpers;
//! - [`raw`]: responses read off a raw socket;
//! - [`traffic`]: continuous traffic through the sidecar.
//!
//! No fixed sleeps: everything waits by polling with a deadline ([`eventually`]).

#![allow(dead_code, unused_imports)]

pub mod config;
pub mod egress;
pub mod hsm;
pub mod http;
pub mod raw;
pub mod redis_server;
pub mod sidecar;
pub mod traffic;
pub mod world;

use std::time::{Duration, Instant};

pub use config::*;
pub use egress::*;
pub use hsm::*;
pub use http::*;
pub use raw::*;
pub use redis_server::*;
pub use sidecar::*;
pub use traffic::*;
pub use world::*;

/// The tenant every test world configures (the emulator's default user).
pub const TENANT: &str = "tenant-demo";
/// How long a sidecar may take to start and become ready.
pub const STARTUP: Duration = Duration::from_secs(30);

/// Polls `f` every 20 ms until it returns `Some` or `within` passes.
pub async fn eventually<T, F, Fut>(within: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
