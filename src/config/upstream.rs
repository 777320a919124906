//! `[upstream]`: the FinHub API, resolved from `upstream.base_url`, and its connection settings.

use std::path::PathBuf;
use std::time::Duration;

use http::HeaderValue;
use serde::Deserialize;

use super::convert::{secs, Convert};

/// The FinHub upstream, resolved from `upstream.base_url`.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Host name (or IP literal) of the base URL, lower case.
    pub host: String,
    /// TCP port of the base URL (443 unless given).
    pub port: u16,
    /// `Host` header value sent upstream (`host` or `host:port`).
    pub host_header: HeaderValue,
    /// Optional CA bundle that verifies FinHub's server certificate (system roots otherwise).
    pub ca_file: Option<PathBuf>,
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Timeout waiting for each read from FinHub.
    pub read_timeout: Duration,
    /// Timeout for each write to FinHub.
    pub write_timeout: Duration,
    /// Idle pooled connections are closed after this long.
    pub idle_timeout: Duration,
    /// Keep-alive pool size (connections kept per worker).
    pub pool_size: usize,
    /// How often DNS for `host` is re-resolved in the background.
    pub dns_refresh: Duration,
    /// Host names an absolute-form (`HTTP_PROXY`) request may name, lower case, no port.
    pub allowed_hosts: Vec<String>,
}

/// `[upstream]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileUpstream {
    /// FinHub base URL, `https://host[:port]`, no path.
    base_url: String,
    /// PEM CA bundle that signs FinHub's server certificate; system roots when absent.
    ca_file: Option<PathBuf>,
    /// TCP+TLS connect timeout, e.g. `"5s"`; default 5 s.
    connect_timeout: Option<String>,
    /// Per-read timeout; default 30 s. Expiry gives the app a 504.
    read_timeout: Option<String>,
    /// Per-write timeout; default 30 s.
    write_timeout: Option<String>,
    /// Idle keep-alive connections close after this; default 60 s.
    idle_timeout: Option<String>,
    /// Keep-alive pool size (idle FinHub connections kept for reuse); default 512.
    pool_size: Option<usize>,
    /// DNS re-resolution interval; default 30 s.
    dns_refresh: Option<String>,
    /// Extra host names apps may name in absolute-form requests (the base URL host is always allowed).
    #[serde(default)]
    extra_hosts: Vec<String>,
}

impl Convert<'_> {
    /// `[upstream]`.
    pub(super) fn upstream(&mut self, u: FileUpstream) -> Option<UpstreamConfig> {
        let parsed = parse_base_url(&u.base_url).map_err(|m| self.err("upstream.base_url", m));
        let connect_timeout = self.duration(
            "upstream.connect_timeout",
            u.connect_timeout.as_deref(),
            secs(5),
        );
        let read_timeout =
            self.duration("upstream.read_timeout", u.read_timeout.as_deref(), secs(30));
        let write_timeout = self.duration(
            "upstream.write_timeout",
            u.write_timeout.as_deref(),
            secs(30),
        );
        let idle_timeout =
            self.duration("upstream.idle_timeout", u.idle_timeout.as_deref(), secs(60));
        let dns_refresh = self.duration("upstream.dns_refresh", u.dns_refresh.as_deref(), secs(30));
        let pool_size = u.pool_size.unwrap_or(512);
        if pool_size == 0 {
            self.err("upstream.pool_size", "must be at least 1");
        }
        let mut extra = Vec::new();
        for (i, h) in u.extra_hosts.iter().enumerate() {
            let h = h.trim().to_ascii_lowercase();
            if h.is_empty() || h.contains(['/', ':', '@', ' ']) {
                self.err(
                    format!("upstream.extra_hosts[{i}]"),
                    format!("`{h}` is not a bare host name"),
                );
            } else {
                extra.push(h);
            }
        }
        let ca_file = u.ca_file.map(|p| self.path(p));
        let (host, port) = parsed.ok()?;
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let host_header = if port == 443 {
            bracketed
        } else {
            format!("{bracketed}:{port}")
        };
        let host_header = HeaderValue::from_str(&host_header).ok()?;
        let mut allowed_hosts = vec![host.clone()];
        allowed_hosts.extend(extra);
        Some(UpstreamConfig {
            host,
            port,
            host_header,
            ca_file,
            connect_timeout,
            read_timeout,
            write_timeout,
            idle_timeout,
            pool_size,
            dns_refresh,
            allowed_hosts,
        })
    }
}

/// `https://host[:port][/]` -> (lower-case host, port).
pub(super) fn parse_base_url(url: &str) -> Result<(String, u16), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!(
            "`{url}` must use https:// (FinHub is only reached over TLS)"
        ));
    }
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(format!("`{url}` must not have a path or query"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{url}` has no host"))?;
    if authority.as_str().contains('@') {
        // Not echoed: the user info may be a credential.
        return Err("the base URL must not contain user info (`user:password@`)".into());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    Ok((host, authority.port_u16().unwrap_or(443)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_forms() {
        assert_eq!(
            parse_base_url("https://localhost:8443").unwrap(),
            ("localhost".into(), 8443)
        );
        assert_eq!(
            parse_base_url("https://API.finhub.cloud/").unwrap().0,
            "api.finhub.cloud"
        );
        assert!(parse_base_url("https://api.finhub.cloud/api").is_err());
        assert!(parse_base_url("ftp://x").is_err());
    }
}
