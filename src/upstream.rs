//! Where FinHub is: the upstream host resolved once, refreshed in the background.
//!
//! `HttpPeer::new` with a host name would resolve DNS on every request; instead the request path
//! reads the last good address list from an `ArcSwap`. A failed refresh keeps the previous list.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

/// The upstream's addresses, as last resolved.
pub struct UpstreamAddrs {
    host: String,
    port: u16,
    addrs: ArcSwap<Vec<SocketAddr>>,
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
        }
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
        if self.host.parse::<IpAddr>().is_ok() {
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

    /// Re-resolves every `interval` forever (a failure is logged and retried sooner).
    pub async fn refresh_forever(self: Arc<Self>, interval: Duration) {
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
