//! Allow-lists: which TCP peers may use the proxy, and which hosts a request may name.
//!
//! The sidecar is not an open proxy: whatever host an absolute-form (`HTTP_PROXY`) request names,
//! it is only ever forwarded to the configured FinHub upstream, and only if the named host is one
//! of the configured FinHub hosts. Anything else is refused before a byte leaves the sidecar.

use std::net::IpAddr;

use ipnet::IpNet;
use pingora::protocols::http::authority::{raw_target_authority, RawTargetAuthority};

use crate::error::ProxyError;

/// Whether `peer` may use the proxy. The TCP peer address is the only input: headers such as
/// `X-Forwarded-For` never influence it.
pub fn client_allowed(allowed: &[IpNet], peer: IpAddr) -> bool {
    let peer = match peer {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    allowed.iter().any(|net| net.contains(&peer))
}

/// Where a request is going, decided from its raw request target.
#[derive(Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// Origin-form (`GET /api/v2/x`): the sidecar is the app's base URL.
    Origin,
    /// Absolute-form (`GET http://api.finhub.cloud/api/v2/x`) naming an allowed FinHub host;
    /// carries the path and query to forward (`/` when empty).
    Absolute {
        /// Path and query bytes after the authority.
        path_and_query: &'a [u8],
    },
}

/// Classifies `raw_target`; an absolute-form target must name one of `allowed_hosts`
/// (lower-case, without port).
pub fn destination<'a>(
    raw_target: &'a [u8],
    allowed_hosts: &[String],
) -> Result<Target<'a>, ProxyError> {
    match raw_target_authority(raw_target) {
        RawTargetAuthority::None if raw_target.first() == Some(&b'/') => Ok(Target::Origin),
        RawTargetAuthority::None | RawTargetAuthority::AmbiguousAuthority => {
            Err(ProxyError::BadTarget)
        }
        RawTargetAuthority::Absolute {
            authority,
            path_and_query,
            ..
        } => {
            let host = host_of(authority).ok_or(ProxyError::BadTarget)?;
            if allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
                Ok(Target::Absolute { path_and_query })
            } else {
                Err(ProxyError::DestinationNotAllowed(printable(host)))
            }
        }
    }
}

/// The host part of an authority (`host`, `host:port`, `[v6]:port`), as text.
fn host_of(authority: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(authority).ok()?;
    if s.contains('@') || s.is_empty() {
        return None;
    }
    let host = if let Some(rest) = s.strip_prefix('[') {
        rest.split(']').next()?
    } else {
        s.rsplit_once(':').map_or(s, |(h, _)| h)
    };
    (!host.is_empty()).then_some(host)
}

fn printable(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(253).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_default_and_mapped_v4() {
        let allowed: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        assert!(client_allowed(&allowed, "127.0.0.2".parse().unwrap()));
        assert!(client_allowed(&allowed, "::1".parse().unwrap()));
        assert!(client_allowed(
            &allowed,
            "::ffff:127.0.0.1".parse().unwrap()
        ));
        assert!(!client_allowed(&allowed, "10.0.0.7".parse().unwrap()));
    }

    #[test]
    fn origin_and_allowed_absolute_forms() {
        let hosts = vec!["api.finhub.cloud".to_string(), "localhost".to_string()];
        assert_eq!(destination(b"/api/v2/x?a=1", &hosts), Ok(Target::Origin));
        assert_eq!(
            destination(b"http://API.finhub.cloud/api/v2/x?a=1", &hosts),
            Ok(Target::Absolute {
                path_and_query: b"/api/v2/x?a=1"
            })
        );
        assert_eq!(
            destination(b"http://localhost:8443", &hosts),
            Ok(Target::Absolute {
                path_and_query: b""
            })
        );
    }

    #[test]
    fn foreign_and_ambiguous_targets_are_refused() {
        let hosts = vec!["api.finhub.cloud".to_string()];
        assert_eq!(
            destination(b"http://evil.example/steal", &hosts),
            Err(ProxyError::DestinationNotAllowed("evil.example".into()))
        );
        assert_eq!(
            destination(b"http://api.finhub.cloud.evil.example/", &hosts),
            Err(ProxyError::DestinationNotAllowed(
                "api.finhub.cloud.evil.example".into()
            ))
        );
        assert_eq!(
            destination(b"http://[::1]:80/", &hosts),
            Err(ProxyError::DestinationNotAllowed("::1".into()))
        );
        assert_eq!(
            destination(b"http:/\\evil", &hosts),
            Err(ProxyError::BadTarget)
        );
        assert_eq!(destination(b"*", &hosts), Err(ProxyError::BadTarget));
    }
}
