//! `[upstream]`: the FinHub API, resolved from `upstream.base_url`, and its connection settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderValue;
use serde::Deserialize;

use super::convert::{secs, Convert};
use crate::secret::SecretSource;

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
    /// Addresses to connect to instead of resolving `host` (curl's `--connect-to`): SNI,
    /// certificate verification and `Host` stay `host`'s. Empty: resolve `host`.
    pub connect_to: Vec<SocketAddr>,
    /// The HTTP CONNECT proxy every FinHub connection goes through, if any.
    pub egress_proxy: Option<EgressProxy>,
}

/// An HTTP CONNECT egress proxy (`upstream.egress_proxy`): each FinHub connection is a tunnel
/// to `upstream.host:port` through it, with TLS end to end inside.
#[derive(Debug, Clone)]
pub struct EgressProxy {
    /// Proxy host name or IP literal, lower case (resolved in the background like FinHub's).
    pub host: String,
    /// Proxy port.
    pub port: u16,
    /// `Proxy-Authorization: Basic` credentials sent on the CONNECT only.
    pub auth: Option<ProxyAuth>,
}

/// User and password for the egress proxy. The password is re-read from its file for each
/// new tunnel, so a rotation needs no restart.
#[derive(Debug, Clone)]
pub struct ProxyAuth {
    /// User name (not secret; logged nowhere either).
    pub username: String,
    /// Password, from `egress_proxy_password_file` or `${ENV}`.
    pub password: SecretSource,
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
    /// `IP:port` addresses to connect to instead of resolving the base URL's host (like curl's
    /// `--connect-to`); SNI, certificate check and `Host` stay the base URL's. Tried in order on
    /// connect failures. Not combinable with `egress_proxy`.
    #[serde(default)]
    connect_to: Vec<String>,
    /// HTTP CONNECT proxy for every FinHub connection, `http://host:port` (TLS to FinHub runs end
    /// to end inside the tunnel).
    egress_proxy: Option<String>,
    /// User for the egress proxy (`Proxy-Authorization: Basic`, sent on the CONNECT only).
    egress_proxy_username: Option<String>,
    /// Password for the egress proxy as `${ENV_VAR}`; or use `egress_proxy_password_file`.
    egress_proxy_password: Option<String>,
    /// File holding the egress proxy password (re-read for each new tunnel).
    egress_proxy_password_file: Option<PathBuf>,
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
        let mut connect_to = Vec::new();
        for (i, a) in u.connect_to.iter().enumerate() {
            match a.trim().parse::<SocketAddr>() {
                Ok(addr) if addr.port() == 0 => self.err(
                    format!("upstream.connect_to[{i}]"),
                    format!("`{a}` names port 0; give FinHub's port, e.g. 10.0.0.5:443"),
                ),
                Ok(addr) => connect_to.push(addr),
                Err(_) => self.err(
                    format!("upstream.connect_to[{i}]"),
                    format!("`{a}` is not an IP:port address (connect_to uses no DNS)"),
                ),
            }
        }
        let password = self.secret(
            "upstream",
            "egress_proxy_password",
            u.egress_proxy_password,
            u.egress_proxy_password_file,
            false,
        );
        let egress_proxy = match u.egress_proxy {
            None => {
                if u.egress_proxy_username.is_some() || password.is_some() {
                    self.err(
                        "upstream.egress_proxy_username",
                        "proxy credentials are set but upstream.egress_proxy is not",
                    );
                }
                None
            }
            Some(url) => match parse_proxy_url(&url) {
                Err(m) => {
                    self.err("upstream.egress_proxy", m);
                    None
                }
                Ok((host, port)) => {
                    let auth = match (u.egress_proxy_username, password) {
                        (None, None) => None,
                        (Some(username), Some(password)) if valid_proxy_user(&username) => {
                            Some(ProxyAuth { username, password })
                        }
                        (Some(_), Some(_)) => {
                            self.err(
                                "upstream.egress_proxy_username",
                                "must be non-empty, without `:` or control characters",
                            );
                            None
                        }
                        (Some(_), None) => {
                            self.err(
                                "upstream.egress_proxy_password",
                                "missing: set egress_proxy_password = \"${ENV_VAR}\" or egress_proxy_password_file",
                            );
                            None
                        }
                        (None, Some(_)) => {
                            self.err(
                                "upstream.egress_proxy_username",
                                "missing: a proxy password needs a user",
                            );
                            None
                        }
                    };
                    Some(EgressProxy { host, port, auth })
                }
            },
        };
        if egress_proxy.is_some() && !connect_to.is_empty() {
            self.err(
                "upstream.connect_to",
                "cannot be combined with upstream.egress_proxy (the proxy resolves FinHub's host; point the proxy at the private address instead)",
            );
        }
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
            connect_to,
            egress_proxy,
        })
    }
}

/// `http://host:port[/]` -> (lower-case host, port). Only plain-HTTP proxies: the tunnel's
/// content is TLS to FinHub already.
pub(super) fn parse_proxy_url(url: &str) -> Result<(String, u16), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| "not a URL like http://proxy:3128".to_string())?;
    if uri.scheme_str() != Some("http") {
        return Err(
            "must be http://host:port (an HTTP CONNECT proxy; https:// proxies are not supported)"
                .into(),
        );
    }
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err("must not have a path or query".into());
    }
    let authority = uri.authority().ok_or("has no host")?;
    if authority.as_str().contains('@') {
        // Not echoed: the user info may be a credential.
        return Err(
            "must not contain user info; use egress_proxy_username and egress_proxy_password_file"
                .into(),
        );
    }
    let port = authority
        .port_u16()
        .filter(|p| *p != 0)
        .ok_or("must name the proxy's port (not 0), e.g. http://proxy:3128")?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if host.is_empty() {
        return Err("has no host".into());
    }
    Ok((host, port))
}

/// A user name that fits `user:password` in Basic credentials.
fn valid_proxy_user(u: &str) -> bool {
    !u.is_empty() && !u.contains(':') && !u.chars().any(char::is_control)
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

    #[test]
    fn proxy_url_forms() {
        assert_eq!(
            parse_proxy_url("http://Egress.Infra:3128").unwrap(),
            ("egress.infra".into(), 3128)
        );
        assert_eq!(
            parse_proxy_url("http://[::1]:8080/").unwrap(),
            ("::1".into(), 8080)
        );
        for bad in [
            "https://proxy:3128",
            "http://proxy",
            "http://proxy:3128/path",
            "socks5://proxy:1080",
            "proxy:3128",
        ] {
            assert!(parse_proxy_url(bad).is_err(), "{bad}");
        }
        let e = parse_proxy_url("http://user:hunter2@proxy:3128").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    use super::super::testing::*;

    fn with(extra: &str) -> String {
        MINIMAL.replace(
            "base_url = \"https://api.finhub.cloud\"",
            &format!("base_url = \"https://api.finhub.cloud\"\n{extra}"),
        )
    }

    #[test]
    fn egress_proxy_and_connect_to_keys() {
        let c = load(&with(
            "egress_proxy = \"http://egress.infra:3128\"\negress_proxy_username = \"svc\"\negress_proxy_password = \"${PW}\"",
        ))
        .unwrap();
        let p = c.upstream.egress_proxy.unwrap();
        assert_eq!((p.host.as_str(), p.port), ("egress.infra", 3128));
        let auth = p.auth.unwrap();
        assert_eq!(auth.username, "svc");
        assert_eq!(auth.password.current().expose(), "s3cret-value");
        assert!(c.upstream.connect_to.is_empty());

        let c = load(&with("connect_to = [\"10.0.0.5:443\", \"[fd00::5]:8443\"]")).unwrap();
        assert_eq!(c.upstream.connect_to.len(), 2);
        assert!(c.upstream.egress_proxy.is_none());
    }

    #[test]
    fn egress_mistakes_name_their_key() {
        assert_eq!(
            keys(&with("connect_to = [\"finhub.internal:443\"]")),
            ["upstream.connect_to[0]"]
        );
        assert_eq!(
            keys(&with("connect_to = [\"10.0.0.5:443\", \"10.0.0.6:0\"]")),
            ["upstream.connect_to[1]"]
        );
        assert_eq!(
            keys(&with("egress_proxy = \"http://p:0\"")),
            ["upstream.egress_proxy"]
        );
        assert_eq!(
            keys(&with("egress_proxy = \"https://p:3128\"")),
            ["upstream.egress_proxy"]
        );
        assert_eq!(
            keys(&with(
                "egress_proxy = \"http://p:3128\"\negress_proxy_username = \"svc\""
            )),
            ["upstream.egress_proxy_password"]
        );
        assert_eq!(
            keys(&with(
                "egress_proxy = \"http://p:3128\"\negress_proxy_password = \"${PW}\""
            )),
            ["upstream.egress_proxy_username"]
        );
        assert_eq!(
            keys(&with(
                "egress_proxy_username = \"svc\"\negress_proxy_password = \"${PW}\""
            )),
            ["upstream.egress_proxy_username"]
        );
        assert_eq!(
            keys(&with(
                "egress_proxy = \"http://p:3128\"\nconnect_to = [\"10.0.0.5:443\"]"
            )),
            ["upstream.connect_to"]
        );
        // An inline password is refused and never echoed.
        let e = load(&with(
            "egress_proxy = \"http://p:3128\"\negress_proxy_username = \"svc\"\negress_proxy_password = \"hunter2\"",
        ))
        .unwrap_err();
        assert_eq!(e.0[0].key, "upstream.egress_proxy_password");
        assert!(!e.to_string().contains("hunter2"));
    }
}
