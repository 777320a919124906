//! The shared record and the small steering values as they are stored: parsing of
//! [`super::store::FleetStore`]'s reads into a [`Snapshot`], authentication of the steering
//! values, and the encrypted [`Payload`] a session travels in.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use http::HeaderValue;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::auth::clock::{ClockOffset, OffsetBounds};
use crate::auth::expiry::{AtomicExpiry, Expiry};
use crate::auth::grant::{self, Claims};
use crate::auth::plan::{MAX_RETRY_AFTER, REJECTED_MAX};
use crate::auth::session::{sensitive, FinHubSession};
use crate::sealing::{KeyRing, Sealed};
use crate::secret::Secret;
use crate::time::{from_unix_us, unix_us, us, AtomicLocal, Local};

/// The longest fleet backoff a replica honours: the longest wait the sidecar itself ever
/// writes (FinHub's `Retry-After` is honoured up to 15 min; without one the backoff is at most
/// 30 s, or `auth.recovery_interval`).
const MAX_STORED_BACKOFF: Duration = MAX_RETRY_AFTER;
/// Failure and rejection counts read from the store are capped here (the waits they drive are
/// capped long before).
const MAX_STORED_COUNT: u32 = 16;
/// Slack for another replica's clock when a stored time is bounded.
const CLOCK_SLACK: Duration = Duration::from_secs(5);

/// A record as read from Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawRecord {
    pub(super) sealed: Sealed,
    pub(super) generation: u64,
    pub(super) fence: u64,
}

/// One read of a tenant's keys.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Snapshot {
    pub(super) record: Option<Result<RawRecord, String>>,
    /// Why the record key holds nothing this code writes (another type, too large, not
    /// text): an unreadable record, not a store outage.
    pub(super) malformed: Option<&'static str>,
    /// The small keys as read (`renew`, `rejected`, `backoff`), not yet authenticated.
    pub(super) raw: [Option<String>; 3],
    /// A follower's authenticated request to renew (`<prefix><tenant>:renew`).
    pub(super) renew_requested: Option<RenewRequest>,
    /// Credentials FinHub rejected (`<prefix><tenant>:rejected`), authenticated and bounded.
    pub(super) rejected: Option<Marker>,
    /// The fleet's auth backoff (`<prefix><tenant>:backoff`), authenticated and bounded.
    pub(super) backoff: Option<Backoff>,
}

/// `<prefix><tenant>:renew`: `<generation>:<asked at, unix ms>`, tagged ([`KeyRing::sign`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RenewRequest {
    pub(super) generation: u64,
    pub(super) at_ms: i64,
}

/// `<prefix><tenant>:rejected`: `<fingerprint>:<retry at, unix ms>:<rejections>`, tagged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Marker {
    pub(super) fingerprint: String,
    pub(super) until_us: i64,
    pub(super) rejections: u32,
}

/// `<prefix><tenant>:backoff`: `<next attempt, unix ms>:<failures in a row>:<generation>`,
/// tagged; written by an owner after a failed auth call, honoured by every owner after it
/// while no newer record than `generation` was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Backoff {
    pub(super) until_us: i64,
    pub(super) failures: u32,
    pub(super) generation: u64,
}

/// The lease as [`ACQUIRE_SCRIPT`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lease {
    /// This replica holds it, with this fence.
    Held(u64),
    /// Another replica does.
    Other,
    /// Not a lease this code writes (garbage, no TTL, another type, a fence beyond 2^53).
    Corrupt,
}

/// The encrypted part of a record.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
pub(super) struct Payload {
    pub(super) token: String,
    pub(super) refresh_token: Option<String>,
    pub(super) session_id: String,
    pub(super) obtained_us: i64,
    pub(super) received_us: i64,
    pub(super) validity_us: i64,
    pub(super) expiry_us: i64,
    pub(super) on_finhub_clock: bool,
    pub(super) window_known: bool,
    pub(super) at_least_us: i64,
    pub(super) at_most_us: i64,
    /// The writer's estimate of FinHub's clock offset.
    pub(super) offset_lo_us: Option<i64>,
    pub(super) offset_hi_us: Option<i64>,
}

/// How long a record of `s` written at `now` lives: as long as FinHub may still take the token
/// (its expiry at the offset's lower bound, within FinHub's own count) plus a second. Readers
/// judge usability themselves; the record must not vanish while its token is still good (an
/// estimate narrowed later extends the usable time).
pub(super) fn record_ttl_us(s: &FinHubSession, now: SystemTime) -> i64 {
    let t = s.timing();
    t.expiry
        .latest_local(s.clock.bounds_at(now))
        .min(t.at_most)
        .since(Local::from_system(now))
        .saturating_add(1_000_000)
}

/// The associated data of a record: its Redis key, tenant, generation and fence.
pub(super) fn aad(record_key: &str, tenant: &str, generation: u64, fence: u64) -> String {
    format!("finhub-sidecar/session/v1\n{record_key}\n{tenant}\n{generation}\n{fence}")
}

/// A record's fields; `Err(key id)` when they are malformed (the key id as far as it can be
/// told, sanitized).
pub(super) fn parse_record(fields: &HashMap<String, String>) -> Result<RawRecord, String> {
    let key_id = fields
        .get("kid")
        .map(|k| sanitize_id(k))
        .unwrap_or_default();
    let b64 = base64::engine::general_purpose::STANDARD;
    let parsed = (|| {
        if fields.get("v").map(String::as_str) != Some("1") {
            return None;
        }
        let nonce: [u8; 12] = b64.decode(fields.get("nonce")?).ok()?.try_into().ok()?;
        let ciphertext = b64.decode(fields.get("ct")?).ok()?;
        Some(RawRecord {
            sealed: Sealed {
                key_id: fields.get("kid")?.clone(),
                nonce,
                ciphertext,
            },
            generation: fields.get("gen")?.parse().ok()?,
            fence: fields.get("fence")?.parse().ok()?,
        })
    })();
    parsed.ok_or(key_id)
}

/// [`READ_SCRIPT`]'s answer as a snapshot. Anything unexpected in the record (another type,
/// too large, a field that is not text) is an unreadable record; anything unexpected in the
/// small keys is ignored.
pub(super) fn parse_snapshot(v: redis::Value) -> Snapshot {
    use redis::Value;
    let text = |v: &Value| -> Option<String> {
        match v {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    };
    let Value::Array(items) = v else {
        return Snapshot {
            malformed: Some("answer"),
            ..Snapshot::default()
        };
    };
    let mut snap = Snapshot::default();
    match (items.first(), items.get(1)) {
        (Some(Value::Int(1)), Some(Value::Array(flat))) => {
            let mut fields = HashMap::new();
            let mut utf8 = true;
            for pair in flat.chunks(2) {
                match (pair.first().and_then(text), pair.get(1).and_then(text)) {
                    (Some(k), Some(v)) => {
                        fields.insert(k, v);
                    }
                    _ => utf8 = false,
                }
            }
            if !utf8 {
                snap.malformed = Some("not_text");
                snap.record = Some(Err("invalid".to_string()));
            } else if !fields.is_empty() {
                snap.record = Some(parse_record(&fields));
            }
        }
        (Some(Value::Int(0)), _) => {}
        (Some(Value::Int(3)), _) => {
            snap.malformed = Some("too_large");
            snap.record = Some(Err("invalid".to_string()));
        }
        _ => {
            snap.malformed = Some("wrong_type");
            snap.record = Some(Err("invalid".to_string()));
        }
    }
    let small = |i: usize| items.get(i).and_then(text);
    snap.raw = [small(2), small(3), small(4)];
    snap
}

/// A renewal request read from `key`, if it authenticates and was asked within `window` (plus
/// [`CLOCK_SLACK`]) of `now_us`: a replayed or forged one forces nothing.
pub(super) fn verified_renew(
    keys: &KeyRing,
    key: &str,
    raw: &str,
    now_us: i64,
    window: Duration,
) -> Option<RenewRequest> {
    let (generation, at_ms) = keys.verify(key, raw)?.split_once(':')?;
    let r = RenewRequest {
        generation: generation.parse().ok()?,
        at_ms: at_ms.parse().ok()?,
    };
    let at_us = r.at_ms.checked_mul(1000)?;
    let slack = us(CLOCK_SLACK);
    (at_us <= now_us.saturating_add(slack)
        && at_us >= now_us.saturating_sub(us(window)).saturating_sub(slack))
    .then_some(r)
}

/// A rejected-credentials marker read from `key`, if it authenticates and its retry time is
/// ahead but no further than the longest wait for rejected credentials (5 min).
pub(super) fn verified_marker(keys: &KeyRing, key: &str, raw: &str, now_us: i64) -> Option<Marker> {
    let mut it = keys.verify(key, raw)?.splitn(3, ':');
    let fingerprint = it.next()?.to_string();
    let until_us = it.next()?.parse::<i64>().ok()?.checked_mul(1000)?;
    let rejections: u32 = it.next()?.parse().ok()?;
    let latest = now_us.saturating_add(us(REJECTED_MAX + CLOCK_SLACK));
    (fingerprint.len() == 32 && until_us > now_us && until_us <= latest).then(|| Marker {
        fingerprint,
        until_us,
        rejections: rejections.min(MAX_STORED_COUNT),
    })
}

/// The fleet's backoff read from `key`, if it authenticates and its next attempt is no further
/// ahead than the longest wait the sidecar writes ([`MAX_STORED_BACKOFF`]) and no longer ago
/// than the key lives after it (`lease_ttl`): an owner between two attempts still reports one
/// (it holds nothing back once its time has passed).
pub(super) fn verified_backoff(
    keys: &KeyRing,
    key: &str,
    raw: &str,
    now_us: i64,
    lease_ttl: Duration,
) -> Option<Backoff> {
    let mut it = keys.verify(key, raw)?.splitn(3, ':');
    let until_us = it.next()?.parse::<i64>().ok()?.checked_mul(1000)?;
    let failures: u32 = it.next()?.parse().ok()?;
    let generation = it.next()?.parse().ok()?;
    let latest = now_us.saturating_add(us(MAX_STORED_BACKOFF + CLOCK_SLACK));
    let earliest = now_us.saturating_sub(us(lease_ttl + CLOCK_SLACK));
    (until_us > earliest && until_us <= latest).then_some(Backoff {
        until_us,
        failures: failures.min(MAX_STORED_COUNT),
        generation,
    })
}

/// A key id or replica id fit for a log line and a metric label: at most 32 characters of
/// `[A-Za-z0-9._-]`, else `invalid`.
pub(super) fn sanitize_id(id: &str) -> String {
    if !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        id.to_string()
    } else {
        "invalid".to_string()
    }
}

pub(super) fn payload_of(s: &FinHubSession) -> Payload {
    let t = s.timing();
    let offset = s
        .clock
        .report()
        .map(|_| s.clock.bounds_at(SystemTime::now()));
    Payload {
        token: s.token.expose().to_string(),
        refresh_token: s.refresh_token.as_ref().map(|r| r.expose().to_string()),
        session_id: s.session_id.to_str().unwrap_or("").to_string(),
        obtained_us: unix_us(s.obtained_at),
        received_us: unix_us(s.received_at),
        validity_us: t.validity_us,
        expiry_us: t.expiry.micros(),
        on_finhub_clock: t.expiry.on_finhub_clock(),
        window_known: s.window_known,
        at_least_us: t.at_least.micros(),
        at_most_us: t.at_most.micros(),
        offset_lo_us: offset.map(|o| o.lo_us),
        offset_hi_us: offset.map(|o| o.hi_us),
    }
}

/// The session a record describes, on this replica's estimate of FinHub's clock (which takes
/// the writer's estimate if it has none of its own yet).
pub(super) fn session_of(p: &Payload, clock: &Arc<ClockOffset>) -> FinHubSession {
    if let (Some(lo_us), Some(hi_us)) = (p.offset_lo_us, p.offset_hi_us) {
        clock.adopt(OffsetBounds { lo_us, hi_us }, SystemTime::now());
    }
    let claims = Claims::of(&p.token);
    FinHubSession {
        reflections: crate::policy::headers::Reflections::of(
            &p.token,
            p.refresh_token.as_deref(),
            claims.internal_token_key.as_ref().map(|k| k.expose()),
        ),
        authorization: sensitive(&format!("Bearer {}", p.token)),
        session_token: sensitive(&p.token),
        session_id: HeaderValue::from_str(&p.session_id)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid-session-id")),
        token: Secret::new(p.token.clone()),
        obtained_at: from_unix_us(p.obtained_us),
        received_at: from_unix_us(p.received_us),
        validity: Duration::from_micros(p.validity_us.clamp(0, us(grant::MAX_LIFETIME)) as u64),
        internal_token_key: claims.internal_token_key,
        refresh_token: p.refresh_token.clone().map(Secret::new),
        generation: 0,
        expiry: AtomicExpiry::new(Expiry::from_parts(p.expiry_us, p.on_finhub_clock)),
        window_known: p.window_known,
        valid_until_at_least: AtomicLocal::new(Local::from_micros(p.at_least_us)),
        valid_until_at_most: AtomicLocal::new(Local::from_micros(p.at_most_us)),
        clock: clock.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::fleet::SessionKey;
    use crate::auth::grant::Grant;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn malformed_records_are_refused_naming_a_sanitized_key_id() {
        let ok = fields(&[
            ("v", "1"),
            ("kid", "kabc"),
            ("nonce", "AAAAAAAAAAAAAAAA"),
            ("ct", "AAAA"),
            ("gen", "3"),
            ("fence", "2"),
        ]);
        let r = parse_record(&ok).unwrap();
        assert_eq!((r.generation, r.fence), (3, 2));
        for (k, v) in [
            ("v", "2"),
            ("nonce", "AAAA"),
            ("gen", "-1"),
            ("fence", "x"),
            ("ct", "!!"),
        ] {
            let mut bad = ok.clone();
            bad.insert(k.into(), v.into());
            assert_eq!(parse_record(&bad), Err("kabc".to_string()), "{k}={v}");
        }
        let mut hostile = ok.clone();
        hostile.insert("kid".into(), "k\n{\"level\":\"fake\"}".into());
        hostile.insert("v".into(), "9".into());
        assert_eq!(parse_record(&hostile), Err("invalid".to_string()));
        assert_eq!(sanitize_id(&"a".repeat(33)), "invalid");
    }

    #[test]
    fn odd_store_values_are_an_unreadable_record_not_an_outage() {
        use redis::Value;
        let bulk = |s: &[u8]| Value::BulkString(s.to_vec());
        let answer = |state: i64, fields: Vec<Value>, small: [Value; 3]| {
            let [a, b, c] = small;
            Value::Array(vec![Value::Int(state), Value::Array(fields), a, b, c])
        };
        let none = || [Value::Nil, Value::Nil, Value::Nil];
        assert_eq!(
            parse_snapshot(answer(0, vec![], none())),
            Snapshot::default()
        );
        for state in [2, 3, 7] {
            let s = parse_snapshot(answer(state, vec![], none()));
            assert!(s.malformed.is_some(), "{state}");
            assert_eq!(s.record, Some(Err("invalid".to_string())));
        }
        let s = parse_snapshot(answer(1, vec![bulk(b"kid"), bulk(b"\xff\xfe")], none()));
        assert_eq!(s.malformed, Some("not_text"));
        assert!(parse_snapshot(Value::Okay).malformed.is_some());
        // The small keys are passed on as text (non-UTF-8 dropped), to be authenticated.
        let s = parse_snapshot(answer(
            0,
            vec![],
            [bulk(b"7"), bulk(b"\xff:1"), bulk(b"1700000000500:3")],
        ));
        assert_eq!(
            s.raw,
            [Some("7".into()), None, Some("1700000000500:3".into())]
        );
        assert_eq!(
            (s.renew_requested, s.rejected, s.backoff),
            (None, None, None)
        );
    }

    #[test]
    fn steering_values_count_only_authenticated_and_within_what_a_sidecar_writes() {
        let ring = KeyRing::new(vec![SessionKey::from_bytes(&[5; 32])]);
        let now_ms: i64 = 1_700_000_000_000;
        let now_us = now_ms * 1000;
        let fp = "0123456789abcdef0123456789abcdef";
        let sign = |key: &str, v: String| ring.sign(key, &v).unwrap();
        // The fleet's backoff: ahead, at most 15 min (+ slack), counts capped.
        let ttl = Duration::from_secs(2);
        let b = |until_ms: i64, failures: u64| {
            let v = sign("p:t:backoff", format!("{until_ms}:{failures}:4"));
            verified_backoff(&ring, "p:t:backoff", &v, now_us, ttl)
        };
        assert_eq!(
            b(now_ms + 2_000, 3),
            Some(Backoff {
                until_us: (now_ms + 2_000) * 1000,
                failures: 3,
                generation: 4
            })
        );
        assert_eq!(b(now_ms + 900_000, 99).map(|b| b.failures), Some(16));
        assert_eq!(
            b(now_ms + 3_600_000, 1),
            None,
            "beyond what a sidecar writes"
        );
        assert_eq!(b(4_102_444_800_000, 1), None);
        // Just over (an owner between attempts): still reported; long over: not.
        assert!(b(now_ms - 1, 1).is_some());
        assert_eq!(b(now_ms - 60_000, 1), None, "over");
        let unsigned = format!("{}:0:4", now_ms + 2_000);
        assert_eq!(
            verified_backoff(&ring, "p:t:backoff", &unsigned, now_us, ttl),
            None
        );
        // Altered after signing (the 28.2 replay): refused.
        let genuine = sign("p:t:rejected", format!("{fp}:{}:1", now_ms + 30_000));
        let m = verified_marker(&ring, "p:t:rejected", &genuine, now_us).unwrap();
        assert_eq!((m.fingerprint.as_str(), m.rejections), (fp, 1));
        let rewritten = genuine.replacen(&(now_ms + 30_000).to_string(), "4102444800000", 1);
        assert_eq!(
            verified_marker(&ring, "p:t:rejected", &rewritten, now_us),
            None
        );
        let far = sign("p:t:rejected", format!("{fp}:{}:1", now_ms + 400_000));
        assert_eq!(verified_marker(&ring, "p:t:rejected", &far, now_us), None);
        // Moved to another key: refused.
        assert_eq!(
            verified_marker(&ring, "p:u:rejected", &genuine, now_us),
            None
        );
        // Renewal requests: authenticated, asked within the window.
        let window = Duration::from_secs(10);
        let r = |at_ms: i64| {
            let v = sign("p:t:renew", format!("7:{at_ms}"));
            verified_renew(&ring, "p:t:renew", &v, now_us, window)
        };
        assert_eq!(
            r(now_ms - 1_000),
            Some(RenewRequest {
                generation: 7,
                at_ms: now_ms - 1_000
            })
        );
        assert_eq!(r(now_ms - 60_000), None, "a replay of an old request");
        assert_eq!(r(now_ms + 60_000), None);
        assert_eq!(
            verified_renew(&ring, "p:t:renew", "7", now_us, window),
            None
        );
    }

    #[test]
    fn a_session_survives_the_record_round_trip_without_its_bytes_in_the_ciphertext() {
        let clock = Arc::new(ClockOffset::new());
        let now = SystemTime::now();
        let iat = unix_us(now) / 1_000_000;
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({"iat": iat, "exp": iat + 600, "internalTokenKey": "itk-0f0f0f0f"}),
            &jsonwebtoken::EncodingKey::from_secret(b"finhub-only"),
        )
        .unwrap();
        let g = Grant {
            token: Secret::new(token.clone()),
            expires_in: Some(Duration::from_secs(600)),
            refresh_token: Some(Secret::new("rt-secret-9999")),
            session_id: Some("sess-1".into()),
        };
        let s = FinHubSession::from_grant(g, now, now, &clock);
        let ring = KeyRing::new(vec![SessionKey::from_bytes(&[3; 32])]);
        let mut plain = Vec::new();
        serde_json::to_writer(&mut plain, &payload_of(&s)).unwrap();
        let a = aad("p:t:session", "t", 1, 1);
        let sealed = ring.seal(a.as_bytes(), &plain).unwrap();
        for secret in [token.as_bytes(), b"rt-secret-9999", b"itk-0f0f0f0f"] {
            assert!(!sealed.ciphertext.windows(secret.len()).any(|w| w == secret));
        }
        let opened = ring.open(a.as_bytes(), &sealed).unwrap();
        let p: Payload = serde_json::from_slice(&opened).unwrap();
        let other_clock = Arc::new(ClockOffset::new());
        let back = session_of(&p, &other_clock);
        assert_eq!(back.token.expose(), token);
        assert_eq!(
            back.internal_token_key.as_ref().map(|k| k.expose()),
            Some("itk-0f0f0f0f")
        );
        assert_eq!(back.session_id, "sess-1");
        assert_eq!(back.timing(), s.timing());
        assert!(back.is_usable(now));
        assert_eq!(back.window_opens(), s.window_opens());
    }
}
