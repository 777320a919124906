//! Where FinHub is: the upstream host resolved once, refreshed in the background.
//!
//! `HttpPeer::new` with a host name would resolve DNS on every request; instead the request path
//! reads the last good address list from an `ArcSwap`. A failed refresh keeps the previous list.
//!
//! What is dialled depends on `[upstream]`: FinHub's host (resolved), the fixed
//! `upstream.connect_to` addresses (no DNS), or the egress proxy's host (resolved), in which
//! case every connection is a CONNECT tunnel to FinHub's host and port ([`crate::egress`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::connectors::L4Connect;
use prometheus::IntCounterVec;

use crate::config::UpstreamConfig;
use crate::egress::{EgressError, Tunnel};

/// The addresses dialled for FinHub, as last resolved, and the tunnel through the egress
/// proxy when there is one.
pub struct UpstreamAddrs {
    host: String,
    port: u16,
    addrs: ArcSwap<Vec<SocketAddr>>,
    /// The addresses are fixed (`upstream.connect_to`): never resolved.
    fixed: bool,
    tunnel: Option<Arc<dyn L4Connect + Send + Sync>>,
    /// The auth client's tunnel (failures counted under `path="auth"`).
    auth_tunnel: Option<Arc<Tunnel>>,
    /// Why the last auth call could not open a tunnel (`None` once one opened), for `/ready`.
    auth_egress: Mutex<Option<EgressError>>,
}

impl UpstreamAddrs {
    /// An empty table for `host:port`; an IP literal host is "resolved" at once.
    pub fn new(host: &str, port: u16) -> Self {
        let initial = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => Vec::new(),
        };
        UpstreamAddrs {
            host: host.to_string(),
            port,
            addrs: ArcSwap::from_pointee(initial),
            fixed: false,
            tunnel: None,
            auth_tunnel: None,
            auth_egress: Mutex::new(None),
        }
    }

    /// What `u` says to dial: the egress proxy (tunnels to FinHub, failures counted in
    /// `egress_errors`), the fixed `connect_to` addresses, or FinHub's host.
    pub fn for_config(u: &UpstreamConfig, egress_errors: IntCounterVec) -> Self {
        if let Some(p) = &u.egress_proxy {
            let tunnel = Tunnel::new(
                &u.host,
                u.port,
                p.auth.clone(),
                u.connect_timeout,
                egress_errors.clone(),
            );
            let auth = Tunnel::new(
                &u.host,
                u.port,
                p.auth.clone(),
                u.connect_timeout,
                egress_errors,
            )
            .for_path("auth");
            let mut a = UpstreamAddrs::new(&p.host, p.port);
            a.tunnel = Some(Arc::new(tunnel));
            a.auth_tunnel = Some(Arc::new(auth));
            return a;
        }
        if !u.connect_to.is_empty() {
            let mut a = UpstreamAddrs::new(&u.host, u.port);
            a.addrs = ArcSwap::from_pointee(u.connect_to.clone());
            a.fixed = true;
            return a;
        }
        UpstreamAddrs::new(&u.host, u.port)
    }

    /// The connector Pingora opens new connections with (`PeerOptions::custom_l4`): the
    /// CONNECT tunnel when an egress proxy is configured.
    pub fn tunnel(&self) -> Option<&Arc<dyn L4Connect + Send + Sync>> {
        self.tunnel.as_ref()
    }

    /// The tunnel login, refresh and logout open through the egress proxy, if there is one.
    pub fn auth_tunnel(&self) -> Option<&Arc<Tunnel>> {
        self.auth_tunnel.as_ref()
    }

    /// Records how the auth client's last tunnel went (`None`: it opened).
    pub fn note_auth_egress(&self, failure: Option<EgressError>) {
        if let Ok(mut slot) = self.auth_egress.lock() {
            *slot = failure;
        }
    }

    /// Why the auth client's last tunnel could not be opened, if it could not.
    pub fn auth_egress_failure(&self) -> Option<EgressError> {
        self.auth_egress.lock().ok().and_then(|s| s.clone())
    }

    /// The host whose addresses are dialled (the egress proxy's, with one), for logs.
    pub fn dialled_host(&self) -> &str {
        &self.host
    }

    /// The `n`-th known address (wrapping): 0 for new connections (the first of the resolved
    /// list, so pooled connections keep being reused), the next one after a failed connect.
    pub fn pick_nth(&self, n: usize) -> Option<SocketAddr> {
        let addrs = self.addrs.load();
        (!addrs.is_empty()).then(|| addrs[n % addrs.len()])
    }

    /// How many addresses are known.
    pub fn count(&self) -> usize {
        self.addrs.load().len()
    }

    /// Resolves now; on success publishes the new list (IPv4 first) and returns how many.
    pub async fn resolve(&self) -> std::io::Result<usize> {
        if self.fixed || self.host.parse::<IpAddr>().is_ok() {
            return Ok(self.addrs.load().len());
        }
        let mut list: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect();
        if list.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no addresses",
            ));
        }
        list.sort_by_key(|a| (a.is_ipv6(), *a));
        list.dedup();
        let n = list.len();
        if **self.addrs.load() != list {
            tracing::info!(host = %self.host, addrs = ?list, "upstream DNS updated");
            self.addrs.store(Arc::new(list));
        }
        Ok(n)
    }

    /// Re-resolves every `interval` forever (a failure is logged and retried sooner); returns
    /// at once for fixed addresses.
    pub async fn refresh_forever(self: Arc<Self>, interval: Duration) {
        if self.fixed {
            return;
        }
        loop {
            let wait = match self.resolve().await {
                Ok(_) => interval,
                Err(e) => {
                    tracing::warn!(host = %self.host, error = %e, "upstream DNS resolution failed; keeping last addresses");
                    interval.min(Duration::from_secs(2))
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ip_literal_needs_no_lookup_and_localhost_resolves() {
        let a = UpstreamAddrs::new("127.0.0.1", 9443);
        assert_eq!(a.pick_nth(0), Some("127.0.0.1:9443".parse().unwrap()));
        let b = UpstreamAddrs::new("localhost", 9443);
        assert_eq!(b.pick_nth(0), None);
        assert!(b.resolve().await.unwrap() >= 1);
        assert_eq!(b.pick_nth(0).unwrap().port(), 9443);
        assert_eq!(b.pick_nth(b.count()), b.pick_nth(0), "wraps around");
    }
}
