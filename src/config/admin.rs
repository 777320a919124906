//! `[admin]`: the admin listener (health, readiness, metrics, status, opt-in shutdown).

use std::net::SocketAddr;

use serde::Deserialize;

use super::convert::Convert;

/// Admin listener options (`[admin]`).
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Whether `POST /shutdown` exists (from loopback peers only).
    pub shutdown_endpoint: bool,
}

/// `[admin]` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAdmin {
    /// Admin listen address; default `127.0.0.1:9901`.
    address: Option<String>,
    /// Serve `POST /shutdown` (loopback peers only); default false.
    #[serde(default)]
    shutdown_endpoint: bool,
}

impl Convert<'_> {
    /// `admin.address` (a top-level field of [`super::Config`]) and the rest of `[admin]`.
    pub(super) fn admin(&mut self, a: &FileAdmin) -> (Option<SocketAddr>, AdminConfig) {
        let admin_listen = self.addr("admin.address", a.address.as_deref(), "127.0.0.1:9901");
        let admin = AdminConfig {
            shutdown_endpoint: a.shutdown_endpoint,
        };
        (admin_listen, admin)
    }
}
