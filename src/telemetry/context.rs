//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>) as small pure functions: read the
//! app's `traceparent` / `tracestate`, write the sidecar's `traceparent`.
//!
//! Anything invalid is treated as absent (the request starts a new trace, and an app
//! `tracestate` without a valid `traceparent` is not passed on): version `ff`, uppercase hex,
//! all-zero ids, a wrong length, more than one `traceparent` line. `tracestate` keeps at most
//! 32 members and 512 bytes; a malformed member or a duplicate key discards the whole header.

use http::header::{GetAll, HeaderName};
use http::HeaderValue;

/// `traceparent`.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `tracestate`.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Members of a `tracestate` list at most (W3C §3.3.1).
pub const TRACESTATE_MAX_MEMBERS: usize = 32;
/// Bytes of a combined `tracestate` the sidecar passes on at most (W3C §3.3.1.1).
pub const TRACESTATE_MAX_BYTES: usize = 512;
/// Members longer than this are dropped first when a `tracestate` must be shortened.
const TRACESTATE_LONG_MEMBER: usize = 128;

/// A parsed `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id (never all zero).
    pub trace_id: [u8; 16],
    /// The caller's span id (never all zero).
    pub parent_id: [u8; 8],
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceParent {
    /// Whether the caller sampled the trace.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// The app's `traceparent`, if there is exactly one field line and it is valid.
pub fn parse_traceparent(values: GetAll<'_, HeaderValue>) -> Option<TraceParent> {
    let mut it = values.iter();
    let value = it.next()?;
    if it.next().is_some() {
        return None;
    }
    traceparent(value.as_bytes())
}

/// One `traceparent` value: `version-traceid-parentid-flags`, lowercase hex.
pub fn traceparent(v: &[u8]) -> Option<TraceParent> {
    if v.len() < 55 {
        return None;
    }
    let version = hex_byte(&v[0..2])?;
    if version == 0xff || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    // Version 00 is exactly 55 bytes; a later version may append `-…` fields we ignore.
    if (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let mut trace_id = [0u8; 16];
    for (i, b) in trace_id.iter_mut().enumerate() {
        *b = hex_byte(&v[3 + 2 * i..5 + 2 * i])?;
    }
    let mut parent_id = [0u8; 8];
    for (i, b) in parent_id.iter_mut().enumerate() {
        *b = hex_byte(&v[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = hex_byte(&v[53..55])?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some(TraceParent {
        trace_id,
        parent_id,
        flags,
    })
}

/// The sidecar's `traceparent` (version 00) for a span.
pub fn format_traceparent(trace_id: [u8; 16], span_id: [u8; 8], sampled: bool) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 55];
    out[..3].copy_from_slice(b"00-");
    for (i, b) in trace_id.iter().enumerate() {
        out[3 + 2 * i] = HEX[usize::from(b >> 4)];
        out[4 + 2 * i] = HEX[usize::from(b & 0xf)];
    }
    out[35] = b'-';
    for (i, b) in span_id.iter().enumerate() {
        out[36 + 2 * i] = HEX[usize::from(b >> 4)];
        out[37 + 2 * i] = HEX[usize::from(b & 0xf)];
    }
    out[52] = b'-';
    out[53] = b'0';
    out[54] = if sampled { b'1' } else { b'0' };
    // Only ASCII hex digits and dashes: always a valid header value.
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The app's `tracestate` (all field lines, combined) as the sidecar passes it on: `None` when
/// absent, empty, malformed (a bad member, a duplicate key, more than 32 members); longer than
/// 512 bytes, members over 128 bytes are dropped first, then members from the end.
pub fn sanitize_tracestate(values: GetAll<'_, HeaderValue>) -> Option<HeaderValue> {
    let mut members: Vec<&str> = Vec::new();
    for value in values.iter() {
        let s = value.to_str().ok()?;
        for m in s.split(',') {
            let m = m.trim_matches([' ', '\t']);
            if m.is_empty() {
                continue;
            }
            members.push(m);
            if members.len() > TRACESTATE_MAX_MEMBERS {
                return None;
            }
        }
    }
    let mut keys: Vec<&str> = Vec::with_capacity(members.len());
    for m in &members {
        let (k, v) = m.split_once('=')?;
        if !valid_key(k) || !valid_value(v) || keys.contains(&k) {
            return None;
        }
        keys.push(k);
    }
    let joined_len =
        |ms: &[&str]| ms.iter().map(|m| m.len()).sum::<usize>() + ms.len().saturating_sub(1);
    if joined_len(&members) > TRACESTATE_MAX_BYTES {
        members.retain(|m| m.len() <= TRACESTATE_LONG_MEMBER);
        while joined_len(&members) > TRACESTATE_MAX_BYTES {
            members.pop();
        }
    }
    if members.is_empty() {
        return None;
    }
    HeaderValue::from_str(&members.join(",")).ok()
}

/// A `tracestate` key: `simple-key` or `tenant-id@system-id` (W3C §3.3.1.3.1).
fn valid_key(k: &str) -> bool {
    let rest = |s: &str, max: usize| {
        s.len() <= max
            && s.bytes().all(|c| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || matches!(c, b'_' | b'-' | b'*' | b'/')
            })
    };
    match k.split_once('@') {
        None => {
            let mut b = k.bytes();
            b.next().is_some_and(|c| c.is_ascii_lowercase()) && rest(&k[1..], 255)
        }
        Some((tenant, system)) => {
            let t_ok = tenant
                .bytes()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && rest(&tenant[1..], 240);
            let s_ok = system
                .bytes()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase())
                && rest(&system[1..], 13);
            t_ok && s_ok
        }
    }
}

/// A `tracestate` value: 1 to 256 printable ASCII characters except `,` and `=`, not ending
/// in a space.
fn valid_value(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 256
        && !v.ends_with(' ')
        && v.bytes()
            .all(|c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
}

/// Two lowercase hex digits as a byte.
fn hex_byte(b: &[u8]) -> Option<u8> {
    let d = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(d(b[0])? << 4 | d(b[1])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn tp(v: &str) -> Option<TraceParent> {
        traceparent(v.as_bytes())
    }

    fn headers(name: &HeaderName, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_valid_traceparent_is_read() {
        let p = tp(VALID).unwrap();
        assert_eq!(p.trace_id[0], 0x4b);
        assert_eq!(p.trace_id[15], 0x36);
        assert_eq!(
            p.parent_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert!(p.sampled());
        assert!(!tp(&VALID.replace("-01", "-00")).unwrap().sampled());
        // A later version may carry more fields after a dash.
        assert!(tp(&format!("{}-extra", VALID.replacen("00", "01", 1))).is_some());
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        let cases = [
            String::new(),
            VALID.replacen("00", "ff", 1), // version ff
            VALID.to_uppercase(),          // uppercase hex
            VALID.replace("4bf92f3577b34da6a3ce929d0e0e4736", &"0".repeat(32)), // zero trace id
            VALID.replace("00f067aa0ba902b7", &"0".repeat(16)), // zero parent id
            VALID[..54].to_string(),       // short
            format!("{VALID}-"),           // version 00 with more
            format!("{VALID}x"),
            VALID.replacen("00-", "00_", 1),
            VALID.replace("-01", "-0g"),
            VALID.replacen("00", "0x", 1),
            VALID.replacen('4', "\u{e9}", 1).chars().take(55).collect(), // non-ASCII
            format!(" {VALID}"),
            format!("{}x", VALID.replacen("00", "01", 1)), // later version, no dash
        ];
        for c in &cases {
            assert_eq!(tp(c), None, "{c:?}");
        }
    }

    #[test]
    fn two_traceparent_lines_are_invalid() {
        let h = headers(&TRACEPARENT, &[VALID, VALID]);
        assert_eq!(parse_traceparent(h.get_all(&TRACEPARENT)), None);
        let h = headers(&TRACEPARENT, &[VALID]);
        assert!(parse_traceparent(h.get_all(&TRACEPARENT)).is_some());
        let h = HeaderMap::new();
        assert_eq!(parse_traceparent(h.get_all(&TRACEPARENT)), None);
    }

    #[test]
    fn traceparent_round_trips_in_lowercase() {
        let p = tp(VALID).unwrap();
        let v = format_traceparent(p.trace_id, p.parent_id, true);
        assert_eq!(v, VALID);
        let v = format_traceparent([0xab; 16], [0xcd; 8], false);
        assert_eq!(v, format!("00-{}-{}-00", "ab".repeat(16), "cd".repeat(8)));
    }

    fn ts(values: &[&str]) -> Option<String> {
        let h = headers(&TRACESTATE, values);
        sanitize_tracestate(h.get_all(&TRACESTATE)).map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn tracestate_is_combined_and_trimmed() {
        assert_eq!(
            ts(&["congo=t61rcWkgMzE"]).as_deref(),
            Some("congo=t61rcWkgMzE")
        );
        assert_eq!(
            ts(&[
                "rojo=00f067aa0ba902b7 , ,",
                "congo=t61rcWkgMzE",
                "t@sys=a b"
            ])
            .as_deref(),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE,t@sys=a b")
        );
        assert_eq!(ts(&[]), None);
        assert_eq!(ts(&[" , "]), None);
    }

    #[test]
    fn malformed_tracestate_is_discarded() {
        for bad in [
            "Congo=x",   // uppercase key
            "1abc=x",    // simple key must start with a letter
            "congo",     // no value
            "congo=",    // empty value
            "congo=a=b", // '=' in value
            "congo=x ",  // trailing space is trimmed, then fine...
            "a=1,a=2",   // duplicate key
            "t@Sys=x",   // system id uppercase
            "t@=x",
            "congo=a\tb",
        ] {
            if bad == "congo=x " {
                assert_eq!(
                    ts(&[bad]).as_deref(),
                    Some("congo=x"),
                    "OWS around members is trimmed"
                );
                continue;
            }
            assert_eq!(ts(&[bad]), None, "{bad:?}");
        }
    }

    #[test]
    fn tracestate_keeps_at_most_32_members() {
        let m: Vec<String> = (0..32).map(|i| format!("k{i}=v")).collect();
        assert_eq!(ts(&[&m.join(",")]).unwrap().split(',').count(), 32);
        let m: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(ts(&[&m.join(",")]), None, "more than 32 members: discarded");
    }

    #[test]
    fn tracestate_is_cut_to_512_bytes_long_members_first() {
        let long = format!("long={}", "x".repeat(200));
        let small: Vec<String> = (0..20)
            .map(|i| format!("k{i:02}={}", "y".repeat(20)))
            .collect();
        // 20 × 24 + 19 commas = 499 bytes without the long member.
        let all = format!("{},{long}", small.join(","));
        let out = ts(&[&all]).unwrap();
        assert!(!out.contains("long="), "the long member goes first");
        assert_eq!(out.split(',').count(), 20);
        assert!(out.len() <= TRACESTATE_MAX_BYTES);
        let many: Vec<String> = (0..30)
            .map(|i| format!("k{i:02}={}", "y".repeat(20)))
            .collect();
        let out = ts(&[&many.join(",")]).unwrap();
        assert!(out.len() <= TRACESTATE_MAX_BYTES);
        assert!(out.starts_with("k00="), "members are dropped from the end");
        assert!(!out.contains("k29="));
    }
}
