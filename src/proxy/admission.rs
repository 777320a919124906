//! Admission: whether a request may go to FinHub, decided once, and everything the later hooks
//! need as one value ([`Admitted`]). A pure function of the parsed request, the TCP peer, the
//! shared state and the clock; the rate-limit check (which may await Redis) is left to the hook
//! and comes last, so a request refused for any other reason consumes no token.
//!
//! The steps, in order (README "Request policy"):
//!
//! 1. the TCP peer is allowed (also enforced at accept, `listener/accept.rs`);
//! 2. the method: no `CONNECT`, `TRACE`, `TRACK`;
//! 3. no protocol upgrade;
//! 4. the header block within `policy.max_header_bytes` (also enforced while it is read), the
//!    headers the sidecar interprets well-formed, `Content-Length` one value of digits;
//! 5. an absolute-form target names a FinHub host;
//! 6. the path is canonical and outside the auth and session surface;
//! 7. the tenant;
//! 8. `X-Forwarded-For` from a trusted forwarder;
//! 9. no hold after FinHub's own 429;
//! 10. a usable session.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Uri};
use pingora::http::RequestHeader;

use super::retry::Retry;
use crate::auth::{FinHubSession, SessionSlot};
use crate::config::Config;
use crate::error::ProxyError;
use crate::names;
use crate::policy::headers;
use crate::policy::ratelimit::Decision;
use crate::policy::{allow, path};
use crate::proxy::tenant::{Tenant, Tenants};

/// Seconds an app is told to wait when its tenant has no session and no attempt is planned.
pub const SESSION_RETRY_AFTER_SECS: u64 = 1;

/// A request that may be forwarded, with what the later hooks need.
pub struct Admitted {
    /// The tenant whose session is used.
    pub tenant: Arc<Tenant>,
    /// The session to send (refreshed again just before sending).
    pub session: Arc<FinHubSession>,
    /// `X-Request-ID` (the app's UUID or a new one); echoed to the app.
    pub request_id: HeaderValue,
    /// `X-Activity-ID`.
    pub activity_id: HeaderValue,
    /// `X-Idempotency-Key`, if any (kept on the 401 replay).
    pub idempotency_key: Option<HeaderValue>,
    /// The single IP FinHub gets in `X-Forwarded-For`.
    pub forwarded_for: HeaderValue,
    /// Origin-form path and query to send when the app used absolute-form.
    pub upstream_uri: Option<Uri>,
    /// Its attempts at FinHub: whether it may be sent again (401 replay, blips), and how often
    /// it was. Resendable here if its declared body fits the hold limit; settled once the body
    /// is read.
    pub retry: Retry,
}

/// A refusal, with what was learnt before it (for its metric series and audit line).
pub struct Refused {
    /// Why.
    pub error: ProxyError,
    /// The tenant, if the request got that far.
    pub tenant: Option<Arc<Tenant>>,
    /// The end user's IP, if the request got that far.
    pub forwarded_for: Option<HeaderValue>,
    /// The origin-form path and query of an absolute-form request, if it got that far.
    pub upstream_uri: Option<Uri>,
}

impl From<ProxyError> for Box<Refused> {
    fn from(error: ProxyError) -> Self {
        Box::new(Refused {
            error,
            tenant: None,
            forwarded_for: None,
            upstream_uri: None,
        })
    }
}

/// What admission reads: the configuration and the tenants.
pub struct Admission<'a> {
    /// Configuration.
    pub config: &'a Config,
    /// The tenants (sessions, holds).
    pub tenants: &'a Tenants,
}

impl Admission<'_> {
    /// Admits `req` from `peer` at `now`, or says why not. On success also returns the
    /// canonical path the rate-limit routes match against.
    pub fn admit<'r>(
        &self,
        req: &'r RequestHeader,
        peer: Option<IpAddr>,
        now: SystemTime,
    ) -> Result<(Admitted, Cow<'r, str>), Box<Refused>> {
        let policy = &self.config.policy;
        let peer = peer.ok_or(ProxyError::ClientNotAllowed)?;
        if !allow::client_allowed(&policy.allowed_clients, peer) {
            return Err(ProxyError::ClientNotAllowed.into());
        }
        headers::method_allowed(&req.method)?;
        // Every header admission reads, in one pass over the map.
        let app = headers::scan(req);
        if app.upgrade {
            return Err(ProxyError::UpgradeNotSupported.into());
        }
        if app.bytes > policy.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge.into());
        }
        if let Some(name) = app.malformed() {
            return Err(ProxyError::InvalidHeader(name).into());
        }
        if !app.content_length_ok() {
            return Err(ProxyError::InvalidRequest.into());
        }
        if !app.expectation_ok() {
            return Err(ProxyError::ExpectationFailed.into());
        }
        let (raw_path, upstream_uri) =
            match allow::destination(req.raw_path(), &self.config.upstream.allowed_hosts)? {
                allow::Target::Origin => (req.raw_path(), None),
                allow::Target::Absolute { path_and_query } => {
                    (path_and_query, Some(origin_uri(path_and_query)?))
                }
            };
        let refused = |error, tenant: Option<&Arc<Tenant>>, xff: Option<&HeaderValue>| {
            Box::new(Refused {
                error,
                tenant: tenant.cloned(),
                forwarded_for: xff.cloned(),
                upstream_uri: upstream_uri.clone(),
            })
        };
        let path = path::canonical(if raw_path.is_empty() { b"/" } else { raw_path })
            .map_err(|e| refused(e.into(), None, None))?;
        if path::is_reserved(&path, &policy.reserved_paths) {
            return Err(refused(ProxyError::ReservedPath, None, None));
        }
        let tenant = self
            .tenants
            .select(app.tenant)
            .map_err(|e| refused(e, None, None))?;
        let refuse = |error| refused(error, Some(tenant), None);
        let origin_ip = self.config.headers.origin_ip;
        let xff = if app.forwarded_for.count > 1 {
            // Rare (and refused from a trusted forwarder): read every line.
            let lines = req.headers.get_all(&names::X_FORWARDED_FOR);
            headers::forwarded_for(peer, &policy.trusted_forwarders, lines, origin_ip)
        } else {
            let line = app.forwarded_for.first;
            headers::forwarded_for(peer, &policy.trusted_forwarders, line, origin_ip)
        }
        .map_err(refuse)?;
        let forwarded_for = if xff == self.config.headers.origin_ip {
            self.config.headers.origin_ip_header.clone()
        } else {
            ip_header(xff).ok_or_else(|| refuse(ProxyError::InvalidForwardedFor))?
        };
        let refuse = |error| refused(error, Some(tenant), Some(&forwarded_for));
        if let Some(left) = tenant.hold.remaining() {
            let retry_after_secs = Decision::Deny { retry_after: left }
                .retry_after_secs()
                .unwrap_or(1);
            return Err(refuse(ProxyError::RateLimited { retry_after_secs }));
        }
        let session = tenant.slot.usable(now).ok_or_else(|| {
            refuse(ProxyError::SessionUnavailable {
                retry_after_secs: session_retry_after(
                    &tenant.slot,
                    now,
                    self.config.auth.recovery_interval,
                ),
            })
        })?;
        let idempotency_key = if self.config.headers.idempotency_keys {
            headers::idempotency_key(&req.method, app.idempotency_key)
        } else {
            app.idempotency_key.cloned()
        };
        let retry = Retry::new(
            &req.method,
            idempotency_key.is_some(),
            app.body_fits(self.config.auth.replay_body_limit),
        );
        let admitted = Admitted {
            tenant: tenant.clone(),
            session,
            request_id: headers::uuid_or_new(app.request_id),
            activity_id: headers::uuid_or_new(app.activity_id),
            idempotency_key,
            forwarded_for,
            upstream_uri,
            retry,
        };
        Ok((admitted, path))
    }
}

/// `Retry-After` for a tenant without a usable session: when its next login or refresh attempt
/// is due (rounded up), between 1 s and the recovery interval.
pub fn session_retry_after(tenant: &SessionSlot, now: SystemTime, recovery: Duration) -> u64 {
    let max = recovery.as_secs().max(1);
    tenant
        .next_attempt_in(now)
        .map_or(SESSION_RETRY_AFTER_SECS, |d| d.as_secs_f64().ceil() as u64)
        .clamp(1, max)
}

/// An IP address as a header value, formatted without an intermediate `String`.
pub fn ip_header(ip: IpAddr) -> Option<HeaderValue> {
    use std::io::Write;
    // The longest form is an IPv4-embedded IPv6 address: 45 bytes.
    let mut buf = [0u8; 48];
    let mut out = std::io::Cursor::new(&mut buf[..]);
    write!(out, "{ip}").ok()?;
    let len = usize::try_from(out.position()).ok()?;
    HeaderValue::from_bytes(buf.get(..len)?).ok()
}

/// `/path?query` bytes (empty means `/`) as an origin-form URI.
pub fn origin_uri(path_and_query: &[u8]) -> Result<Uri, ProxyError> {
    let pq = if path_and_query.is_empty() {
        &b"/"[..]
    } else {
        path_and_query
    };
    if pq.first() != Some(&b'/') {
        // `http://host?x` style: the query without a path.
        let mut v = b"/".to_vec();
        v.extend_from_slice(pq);
        return Uri::try_from(v).map_err(|_| ProxyError::BadTarget);
    }
    Uri::try_from(pq).map_err(|_| ProxyError::BadTarget)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::grant::Grant;
    use crate::proxy::metrics::ProxyMetrics;
    use crate::secret::Secret;

    const TOML: &str = r#"
[upstream]
base_url = "https://api.finhub.cloud"
[auth]
environment = "integration"
[policy]
allowed_clients = ["127.0.0.0/8"]
trusted_forwarders = ["127.0.0.3/32"]
reserved_paths = ["/api/v9/admin"]
[headers]
origin_ip = "192.0.2.10"
[[tenants]]
id = "t1"
username = "u"
password = "${PW}"
[[tenants]]
id = "t2"
username = "u2"
password = "${PW}"
"#;

    struct World {
        config: Config,
        sessions: crate::auth::SessionTable,
        tenants: Tenants,
    }

    impl World {
        fn new() -> World {
            let config = Config::from_toml(std::path::Path::new("/x/proxy.toml"), TOML, &|_| {
                Some("pw".into())
            })
            .unwrap();
            let sessions = crate::auth::SessionTable::new(&config);
            let metrics = ProxyMetrics::register(&prometheus::Registry::new());
            let limiter =
                crate::policy::ratelimit::LocalLimiter::new(config.policy.rate_limit.clone());
            let tenants = Tenants::new(
                &sessions,
                config.default_tenant,
                &metrics,
                &limiter,
                &config.retry,
            )
            .unwrap();
            World {
                config,
                sessions,
                tenants,
            }
        }

        fn with_sessions(self) -> World {
            let now = SystemTime::now();
            for t in self.sessions.tenants() {
                t.publish_for_test(FinHubSession::from_grant(
                    Grant {
                        token: Secret::new("tok"),
                        expires_in: Some(Duration::from_secs(600)),
                        refresh_token: None,
                        session_id: None,
                    },
                    now,
                    now,
                    self.sessions.clock(),
                ));
            }
            self
        }

        fn admit(&self, req: &RequestHeader, peer: &str) -> Result<Admitted, ProxyError> {
            Admission {
                config: &self.config,
                tenants: &self.tenants,
            }
            .admit(req, Some(peer.parse().unwrap()), SystemTime::now())
            .map(|(a, _)| a)
            .map_err(|r| r.error)
        }
    }

    fn req(method: &str, target: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, target.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    const APP: &str = "127.0.0.1";

    #[test]
    fn a_plain_request_is_admitted_with_everything_the_hooks_need() {
        let w = World::new().with_sessions();
        let a = w.admit(&req("GET", "/api/v2/accounts", &[]), APP).unwrap();
        assert_eq!(a.tenant.id(), "t1", "default tenant");
        assert_eq!(a.forwarded_for, "192.0.2.10");
        assert!(a.upstream_uri.is_none());
        assert!(a.retry.resendable());
        assert!(a.idempotency_key.is_none());
        let post = w.admit(&req("POST", "/api/v2/payments", &[]), APP).unwrap();
        assert!(post.idempotency_key.is_some(), "generated for POST");
        assert!(post.retry.resendable(), "idempotent by its key");
    }

    #[test]
    fn each_step_refuses_with_its_own_error() {
        let w = World::new().with_sessions();
        let cases: Vec<(RequestHeader, &str, ProxyError)> = vec![
            (
                req("GET", "/api/v2/x", &[]),
                "10.0.0.1",
                ProxyError::ClientNotAllowed,
            ),
            (
                req("TRACE", "/api/v2/x", &[]),
                APP,
                ProxyError::MethodNotAllowed,
            ),
            (
                req("CONNECT", "api.finhub.cloud:443", &[]),
                APP,
                ProxyError::ConnectNotSupported,
            ),
            (
                req("GET", "/api/v2/x", &[("Upgrade", "websocket")]),
                APP,
                ProxyError::UpgradeNotSupported,
            ),
            (
                req("GET", "http://evil.example/api/v2/x", &[]),
                APP,
                ProxyError::DestinationNotAllowed("evil.example".into()),
            ),
            (
                req("GET", "/api/v2/./x", &[]),
                APP,
                ProxyError::InvalidPath(path::PathError),
            ),
            (
                req("POST", "/api/v2/auth/logout", &[]),
                APP,
                ProxyError::ReservedPath,
            ),
            (
                req("GET", "/API/V9/Admin/users", &[]),
                APP,
                ProxyError::ReservedPath,
            ),
            (
                req("GET", "http://api.finhub.cloud/api/v2/auth/token", &[]),
                APP,
                ProxyError::ReservedPath,
            ),
            (
                req("GET", "/api/v2/x", &[("X-Tenant-ID", "nope")]),
                APP,
                ProxyError::UnknownTenant("nope".into()),
            ),
            (
                req("GET", "/api/v2/x", &[("X-Forwarded-For", "127.0.0.1")]),
                "127.0.0.3",
                ProxyError::InvalidForwardedFor,
            ),
        ];
        for (r, peer, want) in cases {
            let got = w.admit(&r, peer).err();
            assert_eq!(got, Some(want.clone()), "{} {}", r.method, r.uri);
        }
    }

    #[test]
    fn refusals_after_the_tenant_name_it() {
        let w = World::new();
        let r = req("GET", "/api/v2/x", &[("X-Tenant-ID", "t2")]);
        let refused = Admission {
            config: &w.config,
            tenants: &w.tenants,
        }
        .admit(&r, Some(APP.parse().unwrap()), SystemTime::now())
        .err()
        .unwrap();
        assert_eq!(
            refused.error,
            ProxyError::SessionUnavailable {
                retry_after_secs: SESSION_RETRY_AFTER_SECS
            }
        );
        assert_eq!(refused.tenant.unwrap().id(), "t2");
        // What admission learnt before refusing goes on the audit line.
        assert_eq!(refused.forwarded_for.unwrap(), "192.0.2.10");
        let absolute = req(
            "POST",
            "http://api.finhub.cloud/api/v2/auth/logout?x=1",
            &[],
        );
        let refused = Admission {
            config: &w.config,
            tenants: &w.tenants,
        }
        .admit(&absolute, Some(APP.parse().unwrap()), SystemTime::now())
        .err()
        .unwrap();
        assert_eq!(refused.error, ProxyError::ReservedPath);
        assert_eq!(refused.upstream_uri.unwrap(), "/api/v2/auth/logout?x=1");
    }

    #[test]
    fn a_finhub_429_hold_refuses_before_the_session_is_looked_at() {
        let w = World::new().with_sessions();
        w.tenants.all()[0].hold.hold_for(Duration::from_secs(30));
        let got = w.admit(&req("GET", "/api/v2/x", &[]), APP).err();
        assert!(
            matches!(got, Some(ProxyError::RateLimited { retry_after_secs }) if (29..=30).contains(&retry_after_secs)),
            "{got:?}"
        );
        let other = w.admit(&req("GET", "/api/v2/x", &[("X-Tenant-ID", "t2")]), APP);
        assert!(other.is_ok(), "the hold is per tenant");
    }

    #[test]
    fn absolute_form_becomes_origin_form_and_a_forwarder_names_the_user() {
        let w = World::new().with_sessions();
        let a = w
            .admit(
                &req(
                    "GET",
                    "http://api.finhub.cloud/api/v2/x?a=1",
                    &[("X-Forwarded-For", "203.0.113.9")],
                ),
                "127.0.0.3",
            )
            .unwrap();
        assert_eq!(a.upstream_uri.unwrap(), "/api/v2/x?a=1");
        assert_eq!(a.forwarded_for, "203.0.113.9");
    }

    #[test]
    fn large_bodies_are_not_resendable() {
        let w = World::new().with_sessions();
        let big = w
            .admit(
                &req("PUT", "/api/v2/x", &[("Content-Length", "10000000")]),
                APP,
            )
            .unwrap();
        assert!(!big.retry.resendable());
    }

    #[test]
    fn ip_headers_are_the_address_text() {
        for ip in [
            "203.0.113.9",
            "2001:db8::1",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_header(ip).unwrap(), ip.to_string().as_str());
        }
    }

    #[test]
    fn absolute_form_paths_become_origin_form() {
        assert_eq!(
            origin_uri(b"/api/v2/x?a=1&b=%20").unwrap(),
            "/api/v2/x?a=1&b=%20"
        );
        assert_eq!(origin_uri(b"").unwrap(), "/");
        assert_eq!(origin_uri(b"?q=1").unwrap(), "/?q=1");
    }
}
