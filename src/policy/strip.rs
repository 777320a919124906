//! What never crosses the boundary in either direction: the headers an app must not send
//! FinHub (credentials, client-IP and identity claims, method and URL overrides, other
//! spellings of the headers the sidecar sets), and the response headers that carry the
//! sidecar's credentials back.

use http::header::HeaderName;
use pingora::http::{RequestHeader, ResponseHeader};

use crate::names;

/// Request headers an app must never get through to FinHub, lower case with `-`: the sidecar
/// owns authentication, the client-IP claim, and the method and URL FinHub acts on.
pub const APP_CREDENTIAL_HEADERS: &[&str] = &[
    // Credentials: the sidecar's session is the only one FinHub sees.
    "authorization",
    "proxy-authorization",
    "x-user-session-token",
    "x-session-active",
    "cookie",
    // Client-IP and origin claims the sidecar does not vouch for (X-Forwarded-For is policy).
    "forwarded",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
    "client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
    "x-forwarded-host",
    "x-forwarded-server",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    // Client-certificate identity claims of TLS-terminating proxies: the mTLS identity FinHub
    // sees is the sidecar's own.
    "x-forwarded-client-cert",
    "x-ssl-client-cert",
    "x-ssl-client-verify",
    "x-ssl-client-s-dn",
    "x-ssl-client-dn",
    "x-client-cert",
    "x-client-certificate",
    "x-envoy-external-address",
    "x-envoy-original-path",
    "x-envoy-original-url",
    // Method and URL overrides: FinHub (or a framework in front of it) would act on another
    // method or path than the one the sidecar admitted, rate-limited and may replay.
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-override-url",
];

/// Headers the sidecar sets itself; an app's copy under another spelling (`x_tenant_id`) would
/// reach FinHub beside the sidecar's and is removed too.
const SIDECAR_SET_HEADERS: &[&str] = &[
    "x-forwarded-for",
    "x-tenant-id",
    "x-session-id",
    "x-request-id",
    "x-correlation-id",
    "x-activity-id",
    "x-idempotency-key",
    "sec-ch-ua-platform",
    "host",
    "user-agent",
    "content-type",
    "x-forwarded-from",
    "platform",
    "deviceid",
    "x-device-id",
    "device-id",
];

/// Whether the app's header `name` (lower case, as parsed) must not reach FinHub. Names are
/// compared with `_` and `-` folded, as many servers and frameworks fold them.
pub fn is_stripped(name: &str) -> bool {
    if APP_CREDENTIAL_HEADERS.contains(&name) {
        return true;
    }
    if !name.contains('_') {
        return false;
    }
    let folded = |h: &&str| {
        h.len() == name.len()
            && h.bytes()
                .zip(name.bytes())
                .all(|(a, b)| a == b || (a == b'-' && b == b'_'))
    };
    APP_CREDENTIAL_HEADERS.iter().any(folded) || SIDECAR_SET_HEADERS.iter().any(folded)
}

/// The upstream request: `req`'s method, version and headers minus every one [`is_stripped`]
/// names, for `path`, in a header map sized for `extra` more. Header-name case is not kept
/// (HTTP/1.1 names are case-insensitive); values are shared, not copied.
pub fn without_app_credentials(
    req: &RequestHeader,
    path: &[u8],
    extra: usize,
) -> pingora::Result<RequestHeader> {
    let mut out =
        RequestHeader::build_no_case(req.method.clone(), path, Some(req.headers.len() + extra))?;
    out.set_version(req.version);
    for (name, value) in req.headers.iter() {
        if !is_stripped(name.as_str()) {
            out.append_header(name.clone(), value.clone())?;
        }
    }
    Ok(out)
}

/// Response headers that carry a credential by name; removed before the app sees the answer.
/// `Set-Cookie` too: the sidecar never sends a cookie to FinHub, so a cookie FinHub sets can only
/// be a session credential of the sidecar's.
static RESPONSE_CREDENTIAL_HEADERS: [HeaderName; 4] = [
    http::header::AUTHORIZATION,
    http::header::PROXY_AUTHORIZATION,
    http::header::SET_COOKIE,
    names::X_USER_SESSION_TOKEN,
];

/// Every spelling of a session's credentials that a response header must not carry, built once
/// per session: the JWT's signature part (or the whole opaque token), its `header.payload`
/// part, the token in base64 and base64url at each of the three alignments it can have inside
/// an encoded value, the refresh token and the `internalTokenKey`. A token split over two
/// headers is caught by its parts. `Debug` never shows them.
pub struct Reflections(Box<[Box<[u8]>]>);

impl Reflections {
    /// The spellings of `token`, `refresh_token` and `internal_token_key`.
    pub fn of(token: &str, refresh_token: Option<&str>, internal_token_key: Option<&str>) -> Self {
        use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
        use base64::Engine;
        let mut all: Vec<Box<[u8]>> = vec![token_fingerprint(token).into()];
        if let Some((header_payload, _)) = token.rsplit_once('.') {
            all.push(header_payload.as_bytes().into());
        }
        let raw = token.as_bytes();
        for skip in 0..3.min(raw.len()) {
            // Whole 3-byte groups only: their encoding is the same wherever the token sits.
            let part = &raw[skip..];
            let part = &part[..part.len() - part.len() % 3];
            for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
                all.push(engine.encode(part).into_bytes().into());
            }
        }
        all.extend(
            [refresh_token, internal_token_key]
                .into_iter()
                .flatten()
                .map(|s| s.as_bytes().into()),
        );
        // Too short to be told apart from ordinary header values.
        all.retain(|s| s.len() >= 8);
        all.dedup();
        Reflections(all.into_boxed_slice())
    }

    /// The needles.
    pub fn needles(&self) -> &[Box<[u8]>] {
        &self.0
    }
}

impl std::fmt::Debug for Reflections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reflections({} redacted)", self.0.len())
    }
}

/// Removes from a response every header that names a credential or whose value contains one of
/// `secrets` ([`Reflections`]: the session token in any of its spellings, the refresh token,
/// the internal key): FinHub's answer never hands the app the sidecar's session.
pub fn strip_response_credentials(resp: &mut ResponseHeader, secrets: &[Box<[u8]>]) {
    let carries = |v: &[u8]| {
        secrets
            .iter()
            // Shorter values cannot contain the secret: most headers are skipped at once.
            .filter(|s| v.len() >= s.len())
            .any(|s| memchr::memmem::find(v, s).is_some())
    };
    // Allocates only when something is to be removed.
    let doomed: Vec<HeaderName> = resp
        .headers
        .iter()
        .filter(|(k, v)| RESPONSE_CREDENTIAL_HEADERS.contains(k) || carries(v.as_bytes()))
        .map(|(k, _)| k.clone())
        .collect();
    for name in doomed {
        resp.remove_header(&name);
    }
}

/// The part of a token that identifies it: a JWT's signature (unique per token, while header
/// and claims prefixes repeat), else the whole token.
pub fn token_fingerprint(token: &str) -> &[u8] {
    match token.rsplit_once('.') {
        Some((_, sig)) if sig.len() >= 16 => sig.as_bytes(),
        _ => token.as_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_request_keeps_everything_but_what_is_stripped() {
        let mut req = RequestHeader::build("POST", b"/api/v2/x?a=%20b", None).unwrap();
        req.set_version(http::Version::HTTP_10);
        req.append_header("X-Keep", "1").unwrap();
        req.append_header("X-Keep", "2").unwrap();
        req.append_header("Authorization", "Bearer app").unwrap();
        req.append_header("X_User_Session_Token", "app").unwrap();
        req.append_header("Content-Type", "application/json")
            .unwrap();
        let out = without_app_credentials(&req, req.raw_path(), 16).unwrap();
        assert_eq!(out.method, http::Method::POST);
        assert_eq!(out.version, http::Version::HTTP_10);
        assert_eq!(out.raw_path(), b"/api/v2/x?a=%20b");
        assert_eq!(out.headers.get_all("x-keep").iter().count(), 2);
        assert_eq!(out.headers["content-type"], "application/json");
        assert!(out.headers.get("authorization").is_none());
        assert_eq!(out.headers.len(), 3);
        let moved = without_app_credentials(&req, b"/other", 0).unwrap();
        assert_eq!(moved.raw_path(), b"/other");
    }

    #[test]
    fn app_credentials_are_removed() {
        let mut req = RequestHeader::build("GET", b"/api/v2/x", None).unwrap();
        req.insert_header("Authorization", "Bearer app-token")
            .unwrap();
        req.insert_header("X-User-Session-Token", "app").unwrap();
        req.insert_header("X-Other", "kept").unwrap();
        let req = without_app_credentials(&req, req.raw_path(), 0).unwrap();
        assert!(req.headers.get("authorization").is_none());
        assert!(req.headers.get("x-user-session-token").is_none());
        assert_eq!(req.headers.get("x-other").unwrap(), "kept");
    }

    #[test]
    fn stripping_folds_case_and_underscores() {
        for name in [
            "authorization",
            "x-user-session-token",
            "x_user_session_token",
            "x-user_session-token",
            "x_session_active",
            "proxy_authorization",
            "x-http-method-override",
            "x_http_method_override",
            "x-original-url",
            "x-rewrite-url",
            "true-client-ip",
            "x-client-ip",
            "x_real_ip",
            "x-forwarded-host",
            "x_forwarded_for",
            "x_tenant_id",
            "x_request_id",
            "x-forwarded-client-cert",
            "x-envoy-external-address",
            "x_forwarded_from",
            "x_device_id",
        ] {
            assert!(is_stripped(name), "{name}");
        }
        for name in [
            "x-other",
            "x_custom_app",
            "accept",
            "x-tenant-id",
            "x-forwarded-for",
        ] {
            assert!(!is_stripped(name), "{name}");
        }
        let mut req = RequestHeader::build("GET", b"/api/v2/x", None).unwrap();
        req.append_header("X-User_Session-Token", "app").unwrap();
        req.append_header("X-HTTP-Method-Override", "DELETE")
            .unwrap();
        req.append_header("X-Keep", "1").unwrap();
        let req = without_app_credentials(&req, req.raw_path(), 0).unwrap();
        assert_eq!(req.headers.len(), 1);
        assert!(req.headers.contains_key("x-keep"));
    }

    #[test]
    fn responses_lose_every_header_that_carries_a_credential() {
        let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg";
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("Authorization", "Bearer x").unwrap();
        resp.append_header("X-User-Session-Token", "x").unwrap();
        resp.append_header("X-Echo", format!("Bearer {token}"))
            .unwrap();
        resp.append_header("Set-Cookie", "s=c2lnbmF0dXJlLW9mLXRoZS10b2tlbg; Path=/")
            .unwrap();
        resp.append_header("X-Refresh", "rt-12345678-abcdef")
            .unwrap();
        resp.append_header("Set-Cookie", "JSESSIONID=abc; Path=/; HttpOnly")
            .unwrap();
        resp.append_header("Content-Type", "application/json")
            .unwrap();
        let r = Reflections::of(token, Some("rt-12345678-abcdef"), None);
        strip_response_credentials(&mut resp, r.needles());
        assert_eq!(resp.headers.len(), 1, "{:?}", resp.headers);
        assert!(resp.headers.contains_key("content-type"));
        assert_eq!(token_fingerprint("opaque-token"), b"opaque-token");
    }

    #[test]
    fn other_spellings_of_the_token_are_caught_too() {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        use base64::Engine;
        let token =
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1IiwiaXRrIjoiazEifQ.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg";
        let (header_payload, sig) = token.rsplit_once('.').unwrap();
        let r = Reflections::of(token, None, Some("internal-key-0123"));
        let mut hostile = vec![
            ("X-A", format!("{header_payload}.")),
            ("X-B", sig.to_string()),
            ("X-Key", "k=internal-key-0123".to_string()),
        ];
        // Base64 of the token inside a larger value, at every offset modulo 3, both alphabets.
        for prefix in ["", "a", "ab", "abc:"] {
            hostile.push(("X-B64", STANDARD.encode(format!("{prefix}{token}"))));
            hostile.push((
                "X-B64url",
                URL_SAFE_NO_PAD.encode(format!("{prefix}{token};x")),
            ));
        }
        for (name, value) in hostile {
            let mut resp = ResponseHeader::build(200, None).unwrap();
            resp.append_header(name, value.as_str()).unwrap();
            resp.append_header("X-Fine", "an ordinary value").unwrap();
            strip_response_credentials(&mut resp, r.needles());
            assert!(!resp.headers.contains_key(name), "{name}: {value}");
            assert!(resp.headers.contains_key("x-fine"));
        }
        assert!(!format!("{r:?}").contains("c2ln"), "Debug shows no needle");
    }
}
