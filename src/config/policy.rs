//! `[policy]`: who may use the proxy, which forwarders are trusted, header size, reserved
//! paths; its `[policy.rate_limit]` table is converted in [`super::rate_limit`].

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use super::convert::{one_line, Convert};
use super::rate_limit::{FileRateLimit, RateLimitConfig};

/// Request policy.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// TCP peers allowed to use the proxy.
    pub allowed_clients: Vec<IpNet>,
    /// TCP peers whose single-IP `X-Forwarded-For` is trusted as the end user's IP.
    pub trusted_forwarders: Vec<IpNet>,
    /// Requests whose header block is larger get 431.
    pub max_header_bytes: usize,
    /// Operator-added reserved path prefixes (normalised: lower case, no trailing slash),
    /// refused like the built-in auth and session surface.
    pub reserved_paths: Vec<String>,
    /// Rate limits.
    pub rate_limit: RateLimitConfig,
}

/// `[policy]` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePolicy {
    /// CIDRs allowed to use the proxy (TCP peer address); default loopback only.
    allowed_clients: Option<Vec<String>>,
    /// CIDRs of proxies/ingresses whose single-IP `X-Forwarded-For` names the real end user.
    #[serde(default)]
    trusted_forwarders: Vec<String>,
    /// Largest accepted request header block in bytes; default 32768 (larger gets 431).
    max_header_bytes: Option<usize>,
    /// Path prefixes refused with 403 `reserved_path` besides FinHub's auth and session surface.
    #[serde(default)]
    reserved_paths: Vec<String>,
    /// `[policy.rate_limit]`: token buckets per tenant.
    #[serde(default)]
    rate_limit: FileRateLimit,
}

impl Convert<'_> {
    /// `[policy]`, its rate limits included.
    pub(super) fn policy(&mut self, p: FilePolicy) -> Option<PolicyConfig> {
        let raw = p
            .allowed_clients
            .unwrap_or_else(|| vec!["127.0.0.0/8".into(), "::1/128".into()]);
        let allowed_clients = self.nets("policy.allowed_clients", &raw);
        let trusted_forwarders = self.nets("policy.trusted_forwarders", &p.trusted_forwarders);
        let max_header_bytes = p.max_header_bytes.unwrap_or(32 * 1024);
        if max_header_bytes < 1024 {
            self.err("policy.max_header_bytes", "must be at least 1024");
        }
        let mut reserved_paths = Vec::new();
        for (i, raw) in p.reserved_paths.iter().enumerate() {
            match crate::request_path::normalise_prefix(raw) {
                Some(prefix) => reserved_paths.push(prefix),
                None => self.err(
                    format!("policy.reserved_paths[{i}]"),
                    format!(
                        "`{}` is not a canonical absolute path like \"/api/v2/admin\"",
                        one_line(raw)
                    ),
                ),
            }
        }
        let rate_limit = self.rate_limit(p.rate_limit);
        Some(PolicyConfig {
            allowed_clients,
            trusted_forwarders,
            max_header_bytes,
            reserved_paths,
            rate_limit,
        })
    }

    /// A list of CIDRs or bare IP addresses (`key[i]` names a wrong one).
    fn nets(&mut self, key: &str, raw: &[String]) -> Vec<IpNet> {
        let mut nets = Vec::new();
        for (i, c) in raw.iter().enumerate() {
            match c
                .parse::<IpNet>()
                .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
            {
                Ok(n) => nets.push(n),
                Err(_) => self.err(
                    format!("{key}[{i}]"),
                    format!("`{c}` is not a CIDR or IP address"),
                ),
            }
        }
        nets
    }
}
