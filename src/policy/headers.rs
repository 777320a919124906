//! The headers FinHub gets: app credentials removed, the tenant's session and the compliance
//! headers set (protocol notes §3 "sidecar header policy"). One function per rule.

use http::header::HeaderName;
use http::HeaderValue;
use pingora::http::RequestHeader;

use crate::names;
pub use crate::policy::strip::{
    is_stripped, strip_response_credentials, token_fingerprint, without_app_credentials,
    Reflections, APP_CREDENTIAL_HEADERS,
};

/// Refuses methods the sidecar never forwards: `CONNECT` (a tunnel, 405
/// `connect_not_supported`) and `TRACE` / `TRACK`, which reflect the request's headers, the
/// sidecar's credentials included, back to the app (RFC 9110 §9.3.8).
pub fn method_allowed(method: &http::Method) -> Result<(), crate::error::ProxyError> {
    use crate::error::ProxyError;
    match method.as_str() {
        "CONNECT" => Err(ProxyError::ConnectNotSupported),
        m if m.eq_ignore_ascii_case("TRACE") || m.eq_ignore_ascii_case("TRACK") => {
            Err(ProxyError::MethodNotAllowed)
        }
        _ => Ok(()),
    }
}

/// The app's value if it is a UUID, else a fresh v4 (`X-Request-ID`, A13; `X-Activity-ID`, A15).
pub fn uuid_or_new(app: Option<&HeaderValue>) -> HeaderValue {
    if let Some(v) = app {
        if v.to_str()
            .ok()
            .and_then(|s| uuid::Uuid::try_parse(s).ok())
            .is_some()
        {
            return v.clone();
        }
    }
    new_uuid()
}

/// A fresh UUID v4 as a header value.
pub fn new_uuid() -> HeaderValue {
    let mut buf = uuid::Uuid::encode_buffer();
    let s = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    // A hyphenated UUID is 36 ASCII characters, always a valid header value.
    HeaderValue::from_str(s)
        .unwrap_or_else(|_| HeaderValue::from_static("00000000-0000-4000-8000-000000000000"))
}

/// `X-Idempotency-Key` for unsafe methods: the app's if present, else a fresh UUID v4 generated
/// once per request, so the sidecar's own replay cannot double-execute (§7, A21).
pub fn idempotency_key(method: &http::Method, app: Option<&HeaderValue>) -> Option<HeaderValue> {
    use http::Method;
    if let Some(v) = app.filter(|v| !v.is_empty()) {
        return Some(v.clone());
    }
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
    .then(new_uuid)
}

/// Which single IP goes in `X-Forwarded-For` (§8, A25): a trusted forwarder's single valid IP
/// (the real end user), else the configured origin IP. An untrusted peer's header is ignored.
///
/// A trusted forwarder's header is read over all its field lines: more than one address in
/// total, anything that is not an IP, or an address that cannot be an end user's (unspecified,
/// loopback, multicast, broadcast) is refused.
pub fn forwarded_for<'a>(
    peer: std::net::IpAddr,
    trusted: &[ipnet::IpNet],
    app: impl IntoIterator<Item = &'a HeaderValue>,
    origin: std::net::IpAddr,
) -> Result<std::net::IpAddr, crate::error::ProxyError> {
    use crate::error::ProxyError::InvalidForwardedFor;
    let mut lines = app.into_iter().peekable();
    if lines.peek().is_none() || !crate::policy::allow::client_allowed(trusted, peer) {
        return Ok(origin);
    }
    let mut found = None;
    for line in lines {
        let text = line.to_str().map_err(|_| InvalidForwardedFor)?;
        for item in text.split(',') {
            let ip = item
                .trim()
                .parse::<std::net::IpAddr>()
                .map_err(|_| InvalidForwardedFor)?;
            if found.replace(ip).is_some() {
                return Err(InvalidForwardedFor);
            }
        }
    }
    let ip = found.ok_or(InvalidForwardedFor)?;
    // IPv4 inside IPv6 (mapped `::ffff:a.b.c.d`, compatible `::a.b.c.d`, NAT64
    // `64:ff9b::a.b.c.d`) must also pass as the IPv4 address it carries.
    let v4_impossible = |v4: std::net::Ipv4Addr| {
        v4.is_unspecified()
            || v4.is_loopback()
            || v4.is_multicast()
            || v4.is_broadcast()
            || v4.octets()[0] == 0
    };
    let impossible = match ip {
        std::net::IpAddr::V4(v4) => v4_impossible(v4),
        std::net::IpAddr::V6(v6) => {
            let o = v6.octets();
            let embedded = if o[..12] == [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0] {
                Some(std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]))
            } else {
                v6.to_ipv4()
            };
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || embedded.is_some_and(v4_impossible)
        }
    };
    if impossible {
        return Err(InvalidForwardedFor);
    }
    Ok(ip)
}

/// `X-Correlation-ID`: the app's if printable and non-empty, else the request id (A14).
pub fn correlation_id(app: Option<&HeaderValue>, request_id: &HeaderValue) -> HeaderValue {
    match app {
        Some(v) if !v.is_empty() && v.to_str().is_ok() => v.clone(),
        _ => request_id.clone(),
    }
}

/// Whether `Content-Type: application/json` should be added: a body is present and the app
/// sent no content type.
pub fn needs_default_content_type(req: &RequestHeader) -> bool {
    if req.headers.contains_key(http::header::CONTENT_TYPE) {
        return false;
    }
    req.headers.contains_key(http::header::TRANSFER_ENCODING)
        || req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
}

/// The field lines of one header name: the first (what `HeaderMap::get` returns) and how many.
#[derive(Debug, Default, Clone, Copy)]
pub struct Lines<'r> {
    /// The first field line, if any.
    pub first: Option<&'r HeaderValue>,
    /// How many field lines carry the name.
    pub count: usize,
}

impl<'r> Lines<'r> {
    fn add(&mut self, value: &'r HeaderValue) {
        if self.first.is_none() {
            self.first = Some(value);
        }
        self.count += 1;
    }

    /// The one value there is: `None` when absent, `Some(Err(()))` when repeated.
    fn single(&self) -> Option<Result<&'r HeaderValue, ()>> {
        match (self.first, self.count) {
            (None, _) => None,
            (Some(v), 1) => Some(Ok(v)),
            (Some(_), _) => Some(Err(())),
        }
    }
}

/// What admission reads from the app's headers, gathered in one pass over the header map
/// ([`scan`]) instead of one hashed lookup per name and rule. Names are matched exactly as the
/// map stores them (lowercase; no `_`/`-` folding, as `HeaderMap::get` did).
#[derive(Debug, Default)]
pub struct AppHeaders<'r> {
    /// Size of the header block (names, values and separators), for the 431 limit.
    pub bytes: usize,
    /// Whether `Upgrade` is present.
    pub upgrade: bool,
    /// Whether `Transfer-Encoding` is present.
    pub transfer_encoding: bool,
    /// `Content-Length`.
    pub content_length: Lines<'r>,
    /// `Expect`.
    pub expect: Lines<'r>,
    /// `X-Tenant-ID` (first line).
    pub tenant: Option<&'r HeaderValue>,
    /// `X-Forwarded-For` (read over all its lines).
    pub forwarded_for: Lines<'r>,
    /// `X-Request-ID` (first line).
    pub request_id: Option<&'r HeaderValue>,
    /// `X-Activity-ID` (first line).
    pub activity_id: Option<&'r HeaderValue>,
    /// `X-Idempotency-Key` (first line).
    pub idempotency_key: Option<&'r HeaderValue>,
    /// `X-Correlation-ID` (first line).
    pub correlation_id: Option<&'r HeaderValue>,
}

/// One pass over `req`'s headers collecting what admission reads ([`AppHeaders`]).
pub fn scan(req: &RequestHeader) -> AppHeaders<'_> {
    fn first<'r>(slot: &mut Option<&'r HeaderValue>, value: &'r HeaderValue) {
        if slot.is_none() {
            *slot = Some(value);
        }
    }
    use http::header::{CONTENT_LENGTH, EXPECT, TRANSFER_ENCODING};
    let mut h = AppHeaders::default();
    for (name, value) in &req.headers {
        h.bytes += name.as_str().len() + value.len() + 4;
        // Standard names compare as enum tags, the others as bytes (length first).
        if *name == CONTENT_LENGTH {
            h.content_length.add(value);
        } else if *name == TRANSFER_ENCODING {
            h.transfer_encoding = true;
        } else if *name == EXPECT {
            h.expect.add(value);
        } else if *name == names::UPGRADE {
            h.upgrade = true;
        } else if *name == names::X_TENANT_ID {
            first(&mut h.tenant, value);
        } else if *name == names::X_FORWARDED_FOR {
            h.forwarded_for.add(value);
        } else if *name == names::X_REQUEST_ID {
            first(&mut h.request_id, value);
        } else if *name == names::X_ACTIVITY_ID {
            first(&mut h.activity_id, value);
        } else if *name == names::X_IDEMPOTENCY_KEY {
            first(&mut h.idempotency_key, value);
        } else if *name == names::X_CORRELATION_ID {
            first(&mut h.correlation_id, value);
        }
    }
    h
}

impl AppHeaders<'_> {
    /// The first header among those the sidecar interprets whose value is not visible ASCII
    /// (in this order; the first field line of each).
    pub fn malformed(&self) -> Option<&'static str> {
        static INTERPRETED: [HeaderName; 6] = [
            names::X_TENANT_ID,
            names::X_FORWARDED_FOR,
            names::X_REQUEST_ID,
            names::X_ACTIVITY_ID,
            names::X_IDEMPOTENCY_KEY,
            names::X_CORRELATION_ID,
        ];
        let values = [
            self.tenant,
            self.forwarded_for.first,
            self.request_id,
            self.activity_id,
            self.idempotency_key,
            self.correlation_id,
        ];
        INTERPRETED
            .iter()
            .zip(values)
            .find(|(_, v)| v.is_some_and(|v| v.to_str().is_err()))
            .map(|(name, _)| name.as_str())
    }

    /// Whether `Content-Length` is absent or exactly one value of digits. Pingora accepts
    /// repeated equal values (`5, 5`) and forwards them as sent, which FinHub may read
    /// differently.
    pub fn content_length_ok(&self) -> bool {
        match self.content_length.single() {
            None => true,
            Some(Ok(v)) => !v.is_empty() && v.as_bytes().iter().all(u8::is_ascii_digit),
            Some(Err(())) => false,
        }
    }

    /// Whether the request's `Expect` (if any) is the one expectation the sidecar meets:
    /// a single `100-continue` (RFC 9110 §10.1.1; anything else is answered 417).
    pub fn expectation_ok(&self) -> bool {
        match self.expect.single() {
            None => true,
            Some(Ok(v)) => v.as_bytes().eq_ignore_ascii_case(b"100-continue"),
            Some(Err(())) => false,
        }
    }

    /// Whether the request body is absent or declared no larger than `limit` bytes, so it can
    /// be kept for a replay. Chunked bodies of unknown length are not replayed.
    pub fn body_fits(&self, limit: usize) -> bool {
        if self.transfer_encoding {
            return false;
        }
        match self.content_length.first {
            None => true,
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .is_some_and(|n| n <= limit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_track_and_connect_never_go_upstream() {
        use crate::error::ProxyError;
        for (m, want) in [
            ("TRACE", Err(ProxyError::MethodNotAllowed)),
            ("TRACK", Err(ProxyError::MethodNotAllowed)),
            ("CONNECT", Err(ProxyError::ConnectNotSupported)),
            ("GET", Ok(())),
            ("PATCH", Ok(())),
        ] {
            let method = http::Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(method_allowed(&method), want, "{m}");
        }
    }

    #[test]
    fn only_a_single_100_continue_is_an_expectation_met() {
        let with = |values: &[&str]| {
            let mut req = RequestHeader::build("POST", b"/", None).unwrap();
            for v in values {
                req.append_header("Expect", *v).unwrap();
            }
            scan(&req).expectation_ok()
        };
        assert!(with(&[]));
        assert!(with(&["100-continue"]));
        assert!(with(&["100-Continue"]));
        assert!(!with(&["100-continue, x"]));
        assert!(!with(&["x-custom"]));
        assert!(!with(&["100-continue", "100-continue"]));
    }

    #[test]
    fn uuids_are_kept_and_junk_replaced() {
        let good = HeaderValue::from_static("4f0c5b9e-8d5a-4c1e-9a53-2f6f3a1d2b7c");
        assert_eq!(uuid_or_new(Some(&good)), good);
        let junk = HeaderValue::from_static("not-a-uuid");
        let replaced = uuid_or_new(Some(&junk));
        assert_ne!(replaced, junk);
        assert!(uuid::Uuid::try_parse(replaced.to_str().unwrap()).is_ok());
        assert_ne!(uuid_or_new(None), uuid_or_new(None));
    }

    #[test]
    fn fresh_uuids_are_distinct_lowercase_v4() {
        let ids: Vec<HeaderValue> = (0..100).map(|_| new_uuid()).collect();
        let mut seen = std::collections::HashSet::new();
        for id in &ids {
            let text = id.to_str().unwrap();
            assert_eq!(text.len(), 36);
            let parsed = uuid::Uuid::try_parse(text).unwrap();
            assert_eq!(parsed.get_version_num(), 4);
            assert_eq!(
                parsed.hyphenated().to_string(),
                text,
                "lowercase, hyphenated"
            );
            assert!(seen.insert(text.to_owned()), "{text} repeated");
        }
    }

    #[test]
    fn idempotency_keys_for_unsafe_methods_only() {
        assert!(idempotency_key(&http::Method::GET, None).is_none());
        assert!(idempotency_key(&http::Method::POST, None).is_some());
        let app = HeaderValue::from_static("k-1");
        assert_eq!(
            idempotency_key(&http::Method::DELETE, Some(&app)),
            Some(app)
        );
    }

    #[test]
    fn small_and_absent_bodies_fit() {
        let mut req = RequestHeader::build("POST", b"/x", None).unwrap();
        assert!(scan(&req).body_fits(65_536));
        req.insert_header("Content-Length", "65536").unwrap();
        assert!(scan(&req).body_fits(65_536));
        req.insert_header("Content-Length", "65537").unwrap();
        assert!(!scan(&req).body_fits(65_536));
        req.remove_header("Content-Length");
        req.insert_header("Transfer-Encoding", "chunked").unwrap();
        assert!(!scan(&req).body_fits(65_536));
    }

    #[test]
    fn forwarded_for_trusts_only_trusted_peers() {
        let trusted: Vec<ipnet::IpNet> = vec!["127.0.0.3/32".parse().unwrap()];
        let origin: std::net::IpAddr = "192.0.2.10".parse().unwrap();
        let spoofed = HeaderValue::from_static("203.0.113.9");
        let untrusted = "127.0.0.2".parse().unwrap();
        let forwarder = "127.0.0.3".parse().unwrap();
        assert_eq!(
            forwarded_for(untrusted, &trusted, Some(&spoofed), origin),
            Ok(origin)
        );
        assert_eq!(
            forwarded_for(forwarder, &trusted, Some(&spoofed), origin),
            Ok("203.0.113.9".parse().unwrap())
        );
        assert_eq!(
            forwarded_for(forwarder, &trusted, None::<&HeaderValue>, origin),
            Ok(origin)
        );
        for bad in ["1.2.3.4, 5.6.7.8", "not-an-ip", ""] {
            assert_eq!(
                forwarded_for(
                    forwarder,
                    &trusted,
                    Some(&HeaderValue::from_str(bad).unwrap()),
                    origin
                ),
                Err(crate::error::ProxyError::InvalidForwardedFor),
                "{bad}"
            );
        }
    }

    #[test]
    fn forwarded_for_is_read_over_every_field_line() {
        let trusted: Vec<ipnet::IpNet> = vec!["127.0.0.3/32".parse().unwrap()];
        let origin: std::net::IpAddr = "192.0.2.10".parse().unwrap();
        let forwarder = "127.0.0.3".parse().unwrap();
        let first = HeaderValue::from_static("203.0.113.9");
        let second = HeaderValue::from_static("198.51.100.7");
        assert_eq!(
            forwarded_for(forwarder, &trusted, [&first, &second], origin),
            Err(crate::error::ProxyError::InvalidForwardedFor)
        );
        for impossible in [
            "0.0.0.0",
            "127.0.0.1",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
        ] {
            let v = HeaderValue::from_static(impossible);
            assert_eq!(
                forwarded_for(forwarder, &trusted, [&v], origin),
                Err(crate::error::ProxyError::InvalidForwardedFor),
                "{impossible}"
            );
        }
        // An untrusted peer's lines are ignored whatever they say.
        assert_eq!(
            forwarded_for(
                "10.0.0.1".parse().unwrap(),
                &trusted,
                [&first, &second],
                origin
            ),
            Ok(origin)
        );
    }

    #[test]
    fn correlation_id_defaults_to_request_id() {
        let rid = HeaderValue::from_static("rid");
        assert_eq!(correlation_id(None, &rid), rid);
        let app = HeaderValue::from_static("corr-1");
        assert_eq!(correlation_id(Some(&app), &rid), app);
    }

    #[test]
    fn content_type_defaults_only_with_a_body() {
        let mut req = RequestHeader::build("POST", b"/x", None).unwrap();
        assert!(!needs_default_content_type(&req));
        req.insert_header("Content-Length", "5").unwrap();
        assert!(needs_default_content_type(&req));
        req.insert_header("Content-Type", "text/plain").unwrap();
        assert!(!needs_default_content_type(&req));
    }

    #[test]
    fn malformed_interpreted_headers_are_named() {
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        assert_eq!(scan(&req).malformed(), None);
        req.insert_header(
            "X-Request-ID",
            HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
        )
        .unwrap();
        assert_eq!(scan(&req).malformed(), Some("x-request-id"));
        // The list's order decides, not the request's; only the first line of a name counts.
        req.append_header("X-Tenant-ID", HeaderValue::from_bytes(b"t\x80").unwrap())
            .unwrap();
        assert_eq!(scan(&req).malformed(), Some("x-tenant-id"));
        let mut later = RequestHeader::build("GET", b"/x", None).unwrap();
        later.append_header("X-Tenant-ID", "t1").unwrap();
        later
            .append_header("X-Tenant-ID", HeaderValue::from_bytes(b"\xff").unwrap())
            .unwrap();
        assert_eq!(scan(&later).malformed(), None);
        // Spellings with `_` are other headers: not interpreted, not checked.
        later
            .append_header("X_Request_ID", HeaderValue::from_bytes(b"\xff").unwrap())
            .unwrap();
        assert_eq!(scan(&later).malformed(), None);
        assert_eq!(scan(&later).tenant.unwrap(), "t1");
    }

    #[test]
    fn the_scan_sees_what_per_name_lookups_saw() {
        let mut req = RequestHeader::build("POST", b"/x", None).unwrap();
        let pairs = [
            ("Host", "h"),
            ("X-Forwarded-For", "203.0.113.9"),
            ("x-request-id", "r1"),
            ("X-Forwarded-For", "198.51.100.7"),
            ("X-Request-ID", "r2"),
            ("X-Activity-ID", "a"),
            ("X-Idempotency-Key", "k"),
            ("X-Correlation-ID", "c"),
            ("Upgrade", "h2c"),
            ("Expect", "100-continue"),
            ("Content-Length", "5"),
        ];
        for (k, v) in pairs {
            req.append_header(k, v).unwrap();
        }
        let h = scan(&req);
        let want: usize = req
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        assert_eq!(h.bytes, want);
        assert!(h.upgrade && !h.transfer_encoding);
        assert_eq!(h.request_id, req.headers.get("x-request-id"));
        assert_eq!(h.request_id.unwrap(), "r1");
        assert_eq!(h.forwarded_for.count, 2);
        assert_eq!(h.forwarded_for.first.unwrap(), "203.0.113.9");
        assert_eq!(h.activity_id.unwrap(), "a");
        assert_eq!(h.idempotency_key.unwrap(), "k");
        assert_eq!(h.correlation_id.unwrap(), "c");
        assert!(h.tenant.is_none());
        assert!(h.expectation_ok() && h.content_length_ok() && h.body_fits(5));
        assert!(!h.body_fits(4));
        req.insert_header("Transfer-Encoding", "chunked").unwrap();
        assert!(scan(&req).transfer_encoding && !scan(&req).body_fits(5));
    }

    #[test]
    fn content_length_is_one_run_of_digits() {
        let mut req = RequestHeader::build("POST", b"/x", None).unwrap();
        assert!(scan(&req).content_length_ok());
        req.insert_header("Content-Length", "42").unwrap();
        assert!(scan(&req).content_length_ok());
        for bad in ["5, 5", "+5", " 5", "0x5", ""] {
            req.insert_header("Content-Length", bad).unwrap();
            assert!(!scan(&req).content_length_ok(), "{bad:?}");
        }
        req.insert_header("Content-Length", "5").unwrap();
        req.append_header("Content-Length", "5").unwrap();
        assert!(!scan(&req).content_length_ok(), "two field lines");
    }
}
