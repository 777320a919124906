//! Request paths as FinHub's servers would read them.
//!
//! Two rules depend on the path: the auth and session surface is the sidecar's own (reserved
//! paths, answered 403 locally), and per-route rate limits pick a bucket by path prefix. Both
//! must see the path the way a lenient backend does, or an app could write
//! `//api/v2/auth/…`, `/api/v2/./auth/…`, `/API/v2/auth/…` or `/api/v2/%61uth/…` and slip past.
//!
//! So a path is first required to be *canonical*: no dot segments, no empty segments, no
//! percent-encoding of a character that needs none (unreserved characters), no encoded or raw
//! `/`-lookalikes (`%2F`, `\`, `%5C`), no `;` (Java servers strip `;params` from segments, which
//! can leave empty or dot segments behind: `/;/api/…`, `/api/v2/..;/auth`), no `%25`, no control
//! or non-ASCII bytes. Anything else is refused with 400 `invalid_path`: a path that reads
//! differently to different servers is not forwarded at all (Spring's `StrictHttpFirewall`
//! refuses the same). A canonical path is then matched case-insensitively against prefixes that
//! end at a segment boundary.
//!
//! A leaf (no crate imports): `config` checks configured reserved prefixes with it, `proxy`
//! checks each request (`policy::path` names the same module).

use std::borrow::Cow;

/// A path that is not in canonical form: servers could read it differently, so it is not
/// forwarded (`ProxyError::InvalidPath` answers it with 400 `invalid_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request path is not in canonical form (dot or empty segments, encoded unreserved characters or separators)")]
pub struct PathError;

/// The FinHub auth and session surface (protocol notes §2, §4, §5), lower case, no trailing
/// slash: a request under one of these never goes upstream.
pub const RESERVED_PREFIXES: &[&str] = &[
    // v2 login (sandbox and token), refresh, logout.
    "/api/v2/auth",
    // v2 Session Controller: logout by session id, logoutAll.
    "/api/v2/session",
    // v2.1 admin and customer logins.
    "/api/v2.1/auth",
    // Other documented login endpoints (§2.4 BaaS OAuth, §2.7, legacy OAuth).
    "/api/auth",
    "/oauth",
    "/oauth2",
];

/// Segments that mark the auth and session surface under any API version
/// (`/api/{version}/…`): the first segment after the version being `auth` or `session`, or any
/// segment being `sessions` (the v2.1 session resources `…/users/{userId}/sessions[/{id}]`:
/// POST logs in, GET shows, PUT refreshes, DELETE logs out, §2.5, §2.6), `logout` or
/// `logoutall`.
const FIRST_SEGMENTS: &[&str] = &["auth", "session", "sessions"];
const ANY_SEGMENTS: &[&str] = &["sessions", "logout", "logoutall"];

/// Checks that `raw` (the path of an origin-form request target, query included or not) is
/// canonical and returns the form rules match against: lower case, matrix parameters removed.
pub fn canonical(raw: &[u8]) -> Result<Cow<'_, str>, PathError> {
    let path = match raw.iter().position(|&b| b == b'?') {
        Some(q) => &raw[..q],
        None => raw,
    };
    if path.first() != Some(&b'/') {
        return Err(PathError);
    }
    let mut needs_rewrite = false;
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        match b {
            b'%' => {
                let hex = path.get(i + 1..i + 3).ok_or(PathError)?;
                let decoded = hex_byte(hex).ok_or(PathError)?;
                if is_unreserved(decoded)
                    || matches!(decoded, b'/' | b'\\' | b';' | b'%')
                    || !(0x20..0x7f).contains(&decoded)
                {
                    return Err(PathError);
                }
                i += 3;
                continue;
            }
            b'\\' | b'#' | b';' => return Err(PathError),
            0..=0x20 | 0x7f.. => return Err(PathError),
            b'A'..=b'Z' => needs_rewrite = true,
            _ => {}
        }
        i += 1;
    }
    // Every byte is visible ASCII now.
    let text = std::str::from_utf8(path).map_err(|_| PathError)?;
    let segments = &text[1..];
    let mut rest = segments.split('/').peekable();
    while let Some(seg) = rest.next() {
        if (seg.is_empty() && rest.peek().is_some()) || seg == "." || seg == ".." {
            return Err(PathError);
        }
    }
    if !needs_rewrite {
        return Ok(Cow::Borrowed(text));
    }
    Ok(Cow::Owned(text.to_ascii_lowercase()))
}

/// Whether the canonical path `path` is under `prefix` (lower case, no trailing slash) at a
/// segment boundary: `/api/v2/auth` covers `/api/v2/auth` and `/api/v2/auth/x`, not
/// `/api/v2/authors`.
pub fn under(path: &str, prefix: &str) -> bool {
    match path.len().cmp(&prefix.len()) {
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => path.eq_ignore_ascii_case(prefix),
        std::cmp::Ordering::Greater => {
            path.as_bytes()[prefix.len()] == b'/'
                && path[..prefix.len()].eq_ignore_ascii_case(prefix)
        }
    }
}

/// Whether the canonical path belongs to the sidecar's auth and session surface: a built-in
/// prefix, an operator's `extra` prefix, or an auth or session segment under any API version.
pub fn is_reserved(path: &str, extra: &[String]) -> bool {
    if RESERVED_PREFIXES.iter().any(|p| under(path, p)) || extra.iter().any(|p| under(path, p)) {
        return true;
    }
    let Some(rest) = path.strip_prefix("/api/") else {
        return false;
    };
    let mut segments = rest.split('/');
    if !segments.next().is_some_and(is_version) {
        return false;
    }
    let mut first = true;
    segments.any(|s| {
        let hit = (first && FIRST_SEGMENTS.contains(&s)) || ANY_SEGMENTS.contains(&s);
        first = false;
        hit
    })
}

/// `v2`, `v2.1`, `v10.0.3`: an API version segment.
fn is_version(s: &str) -> bool {
    s.strip_prefix('v').is_some_and(|n| {
        !n.is_empty()
            && n.split('.')
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// A configured reserved prefix in the form [`under`] compares with: lower case, one leading
/// slash, no trailing slash. `None` when it is not a canonical absolute path.
pub fn normalise_prefix(p: &str) -> Option<String> {
    let c = canonical(p.as_bytes()).ok()?;
    let trimmed = c.trim_end_matches('/');
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

fn hex_byte(h: &[u8]) -> Option<u8> {
    let d = |c: u8| (c as char).to_digit(16);
    Some((d(h[0])? * 16 + d(h[1])?) as u8)
}

/// RFC 3986 §2.3 unreserved characters: never need percent-encoding.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths_pass_and_are_folded_for_matching() {
        assert_eq!(
            canonical(b"/api/v2/accounts?x=1").unwrap(),
            "/api/v2/accounts"
        );
        assert_eq!(canonical(b"/").unwrap(), "/");
        assert_eq!(canonical(b"/api/v2/x/").unwrap(), "/api/v2/x/");
        assert_eq!(
            canonical(b"/API/V2/Auth/token").unwrap(),
            "/api/v2/auth/token"
        );
        // Encoded reserved characters that are not path separators stay as they are.
        assert_eq!(canonical(b"/api/v2/a%20b%3A").unwrap(), "/api/v2/a%20b%3A");
        assert_eq!(canonical(b"/api/v2/a%3a").unwrap(), "/api/v2/a%3a");
    }

    #[test]
    fn non_canonical_paths_are_refused() {
        for bad in [
            &b"//api/v2/auth/token"[..],
            b"/api//v2/auth",
            b"/api/v2/./auth/logout",
            b"/api/v2/x/../auth/logout",
            b"/api/v2/..;/auth/logout",
            b"/;/api/v2/auth/logout",
            b"/api/;/v2/auth/logout",
            b"/api/v2/;x/auth/logout",
            b"/api/v2/auth;jsessionid=1/logout",
            b"/api/v2/a%3Bb",
            b"/api/v2/a%25b",
            b"/api/v2/%61uth/token",
            b"/api/v2/auth%2Ftoken",
            b"/api/v2/auth%2ftoken",
            b"/api/v2%5Cauth",
            b"/api/v2\\auth",
            b"/api/v2/%2E%2E/auth",
            b"/api/v2/%00",
            b"/api/v2/%zz",
            b"/api/v2/%4",
            b"/api/v2/\xc3\xa4",
            b"/api/v2/a b",
            b"/api/v2/a#frag",
            b"api/v2/x",
            b"",
        ] {
            assert_eq!(canonical(bad), Err(PathError), "{}", bad.escape_ascii());
        }
    }

    #[test]
    fn the_auth_and_session_surface_is_reserved() {
        let none: Vec<String> = vec![];
        for p in [
            "/api/v2/auth",
            "/api/v2/auth/sandbox/token",
            "/api/v2/auth/token/refresh",
            "/api/v2/auth/logout",
            "/api/v2/session/logoutall",
            "/api/v2.1/auth/admin/login",
            "/api/v2.1/admin/organization/o-1/users/u-1/sessions",
            "/api/v2.1/customer/individual/c-1/users/u-1/sessions/s-1",
            "/api/v2.1/customer/organization/o-1/users/u-1/sessions",
            "/api/auth/login",
            "/oauth/token",
            "/oauth2/token",
            "/api/v1/auth/token",
            "/api/v2.0/auth/token",
            "/api/v3/session/logout",
            "/api/v2/customers/c-1/logout",
            "/api/v2/devices/d-1/logoutall",
            "/api/v2/customer/individual/c-1/users/u-1/sessions",
        ] {
            assert!(is_reserved(p, &none), "{p}");
        }
        for p in [
            "/api/v2/accounts",
            "/api/v2/authors",
            "/api/v2/sessionsx",
            "/api/v2.1/fintrans/balance",
            "/api/v2.1/customer/individual/c-1/users/u-1/consents",
            "/oauthx",
            "/api/v2/accounts/auth",
            "/api/vx/auth",
            "/api/v/auth",
            "/api/v2./auth",
            "/api/v2/sessionsx",
        ] {
            assert!(!is_reserved(p, &none), "{p}");
        }
        let extra = vec![normalise_prefix("/API/v3/Login/").unwrap()];
        assert!(is_reserved("/api/v3/login/x", &extra));
        assert!(!is_reserved("/api/v3/loginx", &extra));
    }

    #[test]
    fn every_disguise_of_a_reserved_path_is_refused_or_reserved() {
        let none: Vec<String> = vec![];
        for raw in [
            &b"/api/v2/auth/logout"[..],
            b"/API/v2/auth/logout",
            b"/api/V2/AUTH/LOGOUT",
            b"/api/v2/auth;x=1/logout",
            b"/;/api/v2/auth/logout",
            b"/;/api/v2.1/admin/organization/o/users/u/sessions",
            b"//api/v2/auth/logout",
            b"/api/v2/./auth/logout",
            b"/api/v2/%61uth/logout",
            b"/api/v2/auth%2Flogout",
        ] {
            let refused = match canonical(raw) {
                Err(_) => true,
                Ok(p) => is_reserved(&p, &none),
            };
            assert!(refused, "{}", raw.escape_ascii());
        }
    }

    #[test]
    fn prefixes_match_at_segment_boundaries() {
        assert!(under("/api/v2/auth", "/api/v2/auth"));
        assert!(under("/api/v2/auth/", "/api/v2/auth"));
        assert!(!under("/api/v2/authx", "/api/v2/auth"));
        assert!(!under("/api/v2", "/api/v2/auth"));
        assert_eq!(normalise_prefix("/"), None);
        assert_eq!(normalise_prefix("relative"), None);
    }
}
