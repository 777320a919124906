//! Reading FinHub's login and refresh answers, whatever shape they come in.
//!
//! The docs show five shapes (protocol notes §2.8, S1–S5): flat snake_case, flat camelCase,
//! `access_token`, and a `{code, message, data}` envelope. [`Grant::parse`] accepts all of them;
//! an answer with no usable token is an error to retry, never fatal.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value;

use crate::secret::Secret;
use crate::time::FinHubTime;

/// The longest session lifetime believed from FinHub's answers (docs say 1800–10000 s).
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The longest `sessionId` taken from FinHub (it is sent as `X-Session-ID` on every request);
/// a longer one is replaced by a UUID.
pub const MAX_SESSION_ID: usize = 256;

/// The largest JWT payload decoded for its claims.
const MAX_CLAIMS_BYTES: usize = 16 * 1024;

/// A NumericDate beyond this (the year 5138) is taken to be in milliseconds, a common issuer
/// bug; beyond it again, garbage.
const MAX_SECONDS_DATE: f64 = 1e11;

/// What a successful login or refresh handed us.
#[derive(Debug, Clone)]
pub struct Grant {
    /// The session token (`userSessionToken`, `token` or `access_token`).
    pub token: Secret,
    /// `expires_in` / `expiresIn`, if the answer had one.
    pub expires_in: Option<Duration>,
    /// `refreshToken`, kept but not sent (A2).
    pub refresh_token: Option<Secret>,
    /// `sessionId` from the body, if any.
    pub session_id: Option<String>,
}

/// Claims of the session JWT that the sidecar uses. Decoded without verifying the signature
/// (A3: FinHub signs with HS256 and the client has no key); only timing and the refresh key
/// are read, never trusted for authorization.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    /// `exp`, if present (FinHub's token clock).
    pub exp: Option<FinHubTime>,
    /// `iat`, if present (FinHub's token clock).
    pub iat: Option<FinHubTime>,
    /// `internalTokenKey`, needed for the refresh call.
    pub internal_token_key: Option<Secret>,
    /// `sessionId` claim, if present.
    pub session_id: Option<String>,
}

/// Why an answer could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// The body is not JSON.
    #[error("answer is not JSON")]
    NotJson,
    /// The envelope reports a failure.
    #[error("answer reports failure code {0}")]
    EnvelopeFailure(i64),
    /// No token field in any known shape.
    #[error("answer carries no session token")]
    NoToken,
    /// The token is already expired or lives less than a second (clock skew?).
    #[error("token is already expired on arrival (check the clock)")]
    AlreadyExpired,
}

impl Grant {
    /// Parses any documented login/refresh answer shape.
    pub fn parse(body: &[u8]) -> Result<Grant, GrantError> {
        let v: Value = serde_json::from_slice(body).map_err(|_| GrantError::NotJson)?;
        if let Some(code) = v.get("code").and_then(Value::as_i64) {
            if !(200..300).contains(&code) {
                return Err(GrantError::EnvelopeFailure(code));
            }
        }
        if v.get("success").and_then(Value::as_bool) == Some(false) {
            return Err(GrantError::EnvelopeFailure(0));
        }
        // S4/S5 wrap the fields in `data`; the flat shapes don't.
        let obj = match v.get("data") {
            Some(d) if d.is_object() => d,
            _ => &v,
        };
        let token = ["userSessionToken", "token", "access_token", "accessToken"]
            .iter()
            .find_map(|k| obj.get(*k).and_then(Value::as_str))
            .filter(|t| !t.is_empty())
            .ok_or(GrantError::NoToken)?;
        let expires_in = ["expires_in", "expiresIn"]
            .iter()
            .find_map(|k| obj.get(*k).and_then(number))
            .filter(|s| !s.is_nan())
            // Clamped: zero or less is FinHub saying the token is already over; a lifetime
            // beyond a day is treated as a day (and never panics on `inf` or values beyond u64
            // seconds).
            .map(|s| {
                Duration::try_from_secs_f64(s.clamp(0.0, MAX_LIFETIME.as_secs_f64()))
                    .unwrap_or(MAX_LIFETIME)
            });
        let refresh_token = ["refreshToken", "refresh_token"]
            .iter()
            .find_map(|k| obj.get(*k).and_then(Value::as_str))
            .map(Secret::new);
        let session_id = obj
            .get("sessionId")
            .and_then(Value::as_str)
            .filter(|s| s.len() <= MAX_SESSION_ID)
            .map(str::to_string);
        Ok(Grant {
            token: Secret::new(token),
            expires_in,
            refresh_token,
            session_id,
        })
    }
}

fn number(v: &Value) -> Option<f64> {
    v.as_f64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

impl Claims {
    /// Reads the claims of `token` if it is a JWT; an opaque token gives empty claims. The
    /// payload is decoded whatever the header's `alg` says (`none` included: the signature is
    /// never checked, A3), and `iat`/`exp` are NumericDates: seconds, fractions allowed; a value
    /// beyond the year 5138 is read as milliseconds (an issuer bug), negative or absurd ones
    /// are ignored.
    pub fn of(token: &str) -> Claims {
        let Some(c) = payload(token) else {
            return Claims::default();
        };
        let time = |k: &str| c.get(k).and_then(numeric_date);
        let secret = |k: &str| {
            c.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(Secret::new)
        };
        Claims {
            exp: time("exp"),
            iat: time("iat"),
            internal_token_key: secret("internalTokenKey"),
            session_id: c
                .get("sessionId")
                .and_then(Value::as_str)
                .filter(|s| s.len() <= MAX_SESSION_ID)
                .map(str::to_string),
        }
    }
}

/// The JSON object in a JWT's payload part, if `token` has one.
fn payload(token: &str) -> Option<serde_json::Map<String, Value>> {
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    use base64::engine::DecodePaddingMode;
    use base64::Engine;
    const URL_SAFE_ANY_PADDING: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let mut parts = token.split('.');
    let (_header, body) = (parts.next()?, parts.next()?);
    if body.len() > MAX_CLAIMS_BYTES {
        return None;
    }
    let bytes = URL_SAFE_ANY_PADDING.decode(body).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

/// A NumericDate (RFC 7519: seconds, fractions allowed) as an instant on FinHub's clock;
/// milliseconds tolerated.
fn numeric_date(v: &Value) -> Option<FinHubTime> {
    let mut s = v.as_f64().filter(|s| s.is_finite() && *s >= 0.0)?;
    if s > MAX_SECONDS_DATE {
        s /= 1000.0;
    }
    if s > MAX_SECONDS_DATE {
        return None;
    }
    UNIX_EPOCH
        .checked_add(Duration::try_from_secs_f64(s).ok()?)
        .map(FinHubTime::from_system)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_shape_yields_the_token() {
        let s1 = br#"{"expires_in":1800,"token_type":"Bearer","userSessionToken":"t1","refreshToken":"r"}"#;
        let s2 = br#"{"access_token":"t2","token_type":"Bearer","expires_in":10000}"#;
        let s3 = br#"{"userSessionToken":"t3","expiresIn":3600,"tokenType":"Bearer","sessionId":"sess-1"}"#;
        let s4 = br#"{"code":200,"message":"Success","data":{"userSessionToken":"t4","expiresIn":"3600"}}"#;
        let s5 = br#"{"code":200,"message":"Success","data":{"token":"t5","refreshToken":"x","success":true}}"#;
        for (body, tok, exp) in [
            (&s1[..], "t1", Some(1800)),
            (&s2[..], "t2", Some(10000)),
            (&s3[..], "t3", Some(3600)),
            (&s4[..], "t4", Some(3600)),
            (&s5[..], "t5", None),
        ] {
            let g = Grant::parse(body).unwrap();
            assert_eq!(g.token.expose(), tok);
            assert_eq!(g.expires_in.map(|d| d.as_secs()), exp);
        }
        assert_eq!(
            Grant::parse(s3).unwrap().session_id.as_deref(),
            Some("sess-1")
        );
    }

    #[test]
    fn absurd_numbers_never_panic() {
        for body in [
            &br#"{"userSessionToken":"t","expires_in":"inf"}"#[..],
            br#"{"userSessionToken":"t","expires_in":1e300}"#,
            br#"{"userSessionToken":"t","expiresIn":"NaN"}"#,
        ] {
            let g = Grant::parse(body).unwrap();
            assert!(g.expires_in.is_none_or(|d| d <= MAX_LIFETIME));
        }
        let claims = serde_json::json!({"exp": u64::MAX, "iat": u64::MAX});
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        let _ = Claims::of(&token);
    }

    #[test]
    fn answers_without_a_token_are_errors() {
        assert_eq!(Grant::parse(b"<html>").unwrap_err(), GrantError::NotJson);
        assert_eq!(
            Grant::parse(br#"{"code":401,"message":"Authentication failed","data":{}}"#)
                .unwrap_err(),
            GrantError::EnvelopeFailure(401)
        );
        assert_eq!(
            Grant::parse(br#"{"token_type":"Bearer"}"#).unwrap_err(),
            GrantError::NoToken
        );
    }

    #[test]
    fn claims_are_read_from_an_unverified_jwt() {
        let claims = serde_json::json!({"exp": 2_000_000_000u64, "iat": 1_999_996_400u64, "internalTokenKey": "k-1"});
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"server-only"),
        )
        .unwrap();
        let c = Claims::of(&token);
        assert_eq!(
            c.exp.map(FinHubTime::to_system),
            Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000))
        );
        assert_eq!(c.internal_token_key.unwrap().expose(), "k-1");
        assert!(Claims::of("opaque").exp.is_none());
    }
}
