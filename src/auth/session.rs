//! A FinHub session token and what the sidecar derives from it: its expiry (the JWT `exp` on
//! FinHub's clock, `expires_in` as fallback and bound), the header values built once.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderValue;

use super::clock::{ClockOffset, OffsetBounds};

use super::expiry::{choose_expiry, read_claims, AtomicExpiry, Expiry, Reading};
use super::grant::{Claims, Grant};
use crate::secret::Secret;
use crate::time::{us, AtomicLocal, FinHubTime, Local};

/// A token with less than this left (or 2 % of its lifetime, if smaller) is treated as expired,
/// so that it does not expire while a request is on the way.
const EXPIRY_MARGIN: Duration = Duration::from_millis(500);

/// One FinHub session token and what the sidecar derived from it.
pub struct FinHubSession {
    /// The token itself.
    pub token: Secret,
    /// `Bearer <token>`, built once, marked sensitive.
    pub authorization: HeaderValue,
    /// The token as a header value (`X-User-Session-Token`), marked sensitive.
    pub session_token: HeaderValue,
    /// `X-Session-ID` for this session: the login's `sessionId`, else a UUID per login (A14).
    pub session_id: HeaderValue,
    /// When the request that obtained it was sent (our clock).
    pub obtained_at: SystemTime,
    /// When its answer arrived (our clock).
    pub received_at: SystemTime,
    /// The validity FinHub granted: the JWT's `exp - iat`, else `expires_in`. FinHub's refresh
    /// window is the last tenth of it.
    pub validity: Duration,
    /// Every spelling of its credentials no response header may carry (built once).
    pub reflections: crate::policy::headers::Reflections,
    /// `internalTokenKey` claim, needed to refresh (A3).
    pub internal_token_key: Option<Secret>,
    /// `refreshToken` from the login, kept but unused (A2).
    pub refresh_token: Option<Secret>,
    /// Publication number within its tenant (1 for the first session), set when published.
    pub generation: u64,
    /// Expiry: FinHub's `exp` (JWT) on its clock, or `expires_in` from ours.
    pub(super) expiry: AtomicExpiry,
    /// Whether the JWT has both `iat` and `exp`, so FinHub's window is known exactly.
    pub(super) window_known: bool,
    /// Valid at least until here, our clock, whatever FinHub's clock says: FinHub's own count
    /// of what was left (`expires_in`, a "not refreshed" answer) from before it answered
    /// ([`Local::MIN`]: no count).
    pub(super) valid_until_at_least: AtomicLocal,
    /// Valid at most until here, our clock: that count (floored to whole seconds) plus a
    /// second from when its answer arrived ([`Local::MAX`]: no count).
    pub(super) valid_until_at_most: AtomicLocal,
    pub(super) clock: Arc<ClockOffset>,
}

impl std::fmt::Debug for FinHubSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FinHubSession")
            .field("session_id", &self.session_id)
            .field("expires_at", &self.expires_at())
            .field("refreshable", &self.internal_token_key.is_some())
            .finish_non_exhaustive()
    }
}

/// Logs a warning about FinHub's token timing at most once per [`ANOMALY_LOG_EVERY`] (then at
/// debug): a FinHub that keeps sending odd claims must not fill the log, one line per renewal.
fn warn_rarely(last_us: &AtomicI64, message: &'static str) {
    let now = Local::now().micros();
    let last = last_us.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= us(ANOMALY_LOG_EVERY)
        && last_us
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!("{message}");
    } else {
        tracing::debug!("{message}");
    }
}

/// How often one kind of token-timing anomaly is logged as a warning.
const ANOMALY_LOG_EVERY: Duration = Duration::from_secs(600);
static CLAIMS_DISTRUSTED: AtomicI64 = AtomicI64::new(i64::MIN);
static COUNT_DISAGREES: AtomicI64 = AtomicI64::new(i64::MIN);

impl FinHubSession {
    /// Builds a session from a grant whose request was sent at `sent` and answered at
    /// `received` (our clock); `clock` is FinHub's clock as estimated so far (the answer's
    /// own `Date` already included).
    pub fn from_grant(
        grant: Grant,
        sent: SystemTime,
        received: SystemTime,
        clock: &Arc<ClockOffset>,
    ) -> FinHubSession {
        let claims = Claims::of(grant.token.expose());
        let reading = read_claims(&claims, grant.expires_in, sent, received);
        if let Reading::Sample(b) = reading {
            // The token's own reading of its issuer's clock: what FinHub says about the token
            // wins over any earlier estimate (never over this one).
            clock.measure(b, received);
        }
        let expiry = choose_expiry(
            &claims,
            grant.expires_in,
            reading,
            sent,
            received,
            clock.bounds_at(received),
        );
        if expiry.distrusted {
            warn_rarely(
                &CLAIMS_DISTRUSTED,
                "the token's iat/exp contradict the answer's expires_in (or each other); using expires_in",
            );
        }
        let session_id = grant
            .session_id
            .or(claims.session_id)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let reflections = crate::policy::headers::Reflections::of(
            grant.token.expose(),
            grant.refresh_token.as_ref().map(|r| r.expose()),
            claims.internal_token_key.as_ref().map(|k| k.expose()),
        );
        FinHubSession {
            reflections,
            authorization: sensitive(&format!("Bearer {}", grant.token.expose())),
            session_token: sensitive(grant.token.expose()),
            session_id: HeaderValue::from_str(&session_id)
                .unwrap_or_else(|_| HeaderValue::from_static("invalid-session-id")),
            token: grant.token,
            obtained_at: sent,
            received_at: received,
            validity: Duration::from_micros(expiry.validity_us.max(0) as u64),
            internal_token_key: claims.internal_token_key,
            refresh_token: grant.refresh_token,
            generation: 0,
            expiry: AtomicExpiry::new(expiry.at),
            window_known: expiry.window_known,
            valid_until_at_least: AtomicLocal::new(
                grant
                    .expires_in
                    .map_or(Local::MIN, |e| Local::from_system(sent) + e),
            ),
            valid_until_at_most: AtomicLocal::new(grant.expires_in.map_or(Local::MAX, |e| {
                Local::from_system(received) + e + COUNT_RESOLUTION
            })),
            clock: clock.clone(),
        }
    }

    /// The session's times, typed (one load of each atomic).
    pub(super) fn timing(&self) -> Timing {
        Timing {
            expiry: self.expiry.load(),
            validity_us: us(self.validity),
            at_least: self.valid_until_at_least.load(),
            at_most: self.valid_until_at_most.load(),
        }
    }

    /// Whether the token may still be sent at `now`: it is valid at FinHub for at least the
    /// expiry margin more, whatever FinHub's clock offset within its known bounds.
    pub fn is_usable(&self, now: SystemTime) -> bool {
        Local::from_system(now) < self.usable_until(now)
    }

    /// The last moment (our clock) the token may be sent, on the offset's bounds at `now`.
    pub(super) fn usable_until(&self, now: SystemTime) -> Local {
        self.timing().usable_until(self.clock.bounds_at(now))
    }

    /// When FinHub considers the token expired, on our clock (earliest estimate).
    pub fn expires_at(&self) -> SystemTime {
        self.timing()
            .expiry
            .earliest_local(self.clock.bounds())
            .to_system()
    }

    /// The JWT's `exp` (on FinHub's clock), if the expiry comes from it.
    pub fn finhub_expiry(&self) -> Option<FinHubTime> {
        match self.timing().expiry {
            Expiry::FinHub(t) => Some(t),
            Expiry::Local(_) => None,
        }
    }

    /// The validity FinHub granted (see [`FinHubSession::validity`]).
    pub fn lifetime(&self) -> Duration {
        self.validity
    }

    /// FinHub's refresh window opens here, on FinHub's clock, when that is known exactly.
    pub(super) fn window_opens(&self) -> Option<FinHubTime> {
        match self.timing().window_opens() {
            Expiry::FinHub(t) if self.window_known => Some(t),
            _ => None,
        }
    }

    /// Whether FinHub may still consider the token valid at `now` (something to log out).
    pub(super) fn may_be_valid(&self, now: SystemTime) -> bool {
        Local::from_system(now) < self.timing().expiry.latest_local(self.clock.bounds_at(now))
    }

    /// A "not refreshed, still valid" answer said `remaining` (whole seconds, floored) was
    /// left when FinHub answered a request sent at `sent` and received at `received`. That
    /// count narrows what is known of the token's end on our clock (or, when it contradicts it
    /// — FinHub's clock was stepped — replaces it); for a JWT it is also a reading of FinHub's
    /// token clock.
    pub(super) fn note_remaining(
        &self,
        remaining: Duration,
        sent: SystemTime,
        received: SystemTime,
    ) {
        let (sent, received) = (Local::from_system(sent), Local::from_system(received));
        let (lo, hi) = (sent + remaining, received + remaining + COUNT_RESOLUTION);
        let t = self.timing();
        let (old_lo, old_hi) = (t.at_least, t.at_most);
        let (lo, hi) = if lo.max(old_lo) <= hi.min(old_hi) {
            (lo.max(old_lo), hi.min(old_hi))
        } else {
            warn_rarely(
                &COUNT_DISAGREES,
                "FinHub's count of the token's validity changed (its clock was stepped?); using its latest answer",
            );
            (lo, hi)
        };
        self.valid_until_at_least.store(lo);
        self.valid_until_at_most.store(hi);
        match t.expiry {
            Expiry::FinHub(exp) => {
                // FinHub's token clock read `exp - r - 1 s .. exp - r` when it answered: a
                // reading like the `expires_in` at login, which wins over an older estimate (a
                // clock step).
                self.clock.measure(
                    OffsetBounds::from_count(exp, us(remaining), sent, received),
                    received.to_system(),
                );
            }
            Expiry::Local(_) => self.expiry.move_local(lo),
        }
    }
}

pub(super) fn sensitive(v: &str) -> HeaderValue {
    // A token with bytes that are not valid in a header cannot be sent; an empty value makes
    // FinHub answer 401, which is the right failure.
    let mut h = HeaderValue::from_str(v).unwrap_or_else(|_| HeaderValue::from_static(""));
    h.set_sensitive(true);
    h
}

/// FinHub counts what is left of a token in whole seconds, floored.
const COUNT_RESOLUTION: Duration = Duration::from_secs(1);

/// A session's times, for the planning arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Timing {
    /// When the token expires, on the clock that states it.
    pub(super) expiry: Expiry,
    /// The validity FinHub granted, µs.
    pub(super) validity_us: i64,
    /// Valid at least until here by FinHub's own counts, our clock ([`Local::MIN`]: none).
    pub(super) at_least: Local,
    /// Valid at most until here by FinHub's own counts, our clock ([`Local::MAX`]: none).
    pub(super) at_most: Local,
}

impl Timing {
    /// How long before its end a token is no longer sent, µs: [`EXPIRY_MARGIN`] or 2 % of
    /// its validity, the smaller.
    pub(super) fn margin_us(&self) -> i64 {
        us(EXPIRY_MARGIN).min(self.validity_us / 50)
    }

    /// The last moment (our clock) the token may be sent, given FinHub's offset `offset`
    /// (its upper bound), kept within what FinHub's own count of the remaining validity
    /// guarantees: a `Date` far off (a stepped clock, a cached answer) can neither expire a
    /// token FinHub said has time left nor keep one past what it said.
    pub(super) fn usable_until(&self, offset: OffsetBounds) -> Local {
        self.expiry
            .earliest_local(offset)
            .max(self.at_least)
            .min(self.at_most)
            .minus_us(self.margin_us())
    }

    /// The offset bounds to plan a token whose expiry is on our clock with: that expiry is
    /// the earliest end FinHub's count allows and the latest is `at_most`, so the true end lies
    /// `[0, at_most - at_least]` after it (zero width without a count, or for FinHub's `exp`).
    pub(super) fn count_bounds(&self) -> OffsetBounds {
        match self.expiry {
            Expiry::Local(e) if self.at_least != Local::MIN && self.at_most != Local::MAX => {
                OffsetBounds {
                    lo_us: e.since(self.at_most).min(0),
                    hi_us: e.since(self.at_least).max(0),
                }
            }
            _ => OffsetBounds::ZERO,
        }
    }

    /// FinHub's 10 % window opens here (on the expiry's clock).
    pub(super) fn window_opens(&self) -> Expiry {
        self.expiry.minus_us(self.validity_us / 10)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use http::HeaderValue;

    use super::*;
    use crate::auth::clock::ClockOffset;
    use crate::auth::grant::{self, Grant};
    use crate::auth::plan::plan;
    use crate::secret::Secret;
    use crate::time::{from_unix_us, unix_us, FinHubTime, Local};

    pub(crate) const S: i64 = 1_000_000;
    /// A whole second, far from the epoch.
    pub(crate) const BASE: i64 = 1_700_000_000 * S;

    pub(crate) fn at(us: i64) -> SystemTime {
        from_unix_us(BASE + us)
    }

    pub(crate) fn jwt(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"finhub-only"),
        )
        .unwrap()
    }

    pub(crate) fn grant(token: String, expires_in: Option<u64>) -> Grant {
        Grant {
            token: Secret::new(token),
            expires_in: expires_in.map(Duration::from_secs),
            refresh_token: None,
            session_id: None,
        }
    }

    /// A session as FinHub (clock `offset` µs ahead) would issue it for a request sent at
    /// local `sent` and answered `rtt` later (FinHub answering halfway), with the answer's
    /// `Date` observed into `clock` first.
    pub(crate) fn issued(
        clock: &Arc<ClockOffset>,
        offset: i64,
        sent: i64,
        rtt: i64,
        life_s: i64,
    ) -> FinHubSession {
        let finhub_now = BASE + sent + rtt / 2 + offset;
        let iat = finhub_now.div_euclid(S);
        let exp = iat + life_s;
        let date = HeaderValue::from_str(&httpdate::fmt_http_date(from_unix_us(iat * S))).unwrap();
        clock.observe(Some(&date), at(sent), at(sent + rtt));
        let token = jwt(serde_json::json!({"iat": iat, "exp": exp, "internalTokenKey": "k"}));
        let left = (exp * S - finhub_now) / S;
        FinHubSession::from_grant(
            grant(token, Some(left as u64)),
            at(sent),
            at(sent + rtt),
            clock,
        )
    }

    #[test]
    fn a_token_clock_ahead_of_date_is_read_from_the_token_not_from_date() {
        // Issue 22.1: the gateway's Date agrees with our clock, the issuer runs 2 s ahead.
        let clock = Arc::new(ClockOffset::new());
        let s = issued(&clock, 2_000_000, 0, 10_000, 8);
        let b = clock.bounds_at(at(0));
        assert!(b.lo_us <= 2_005_000 && 2_005_000 <= b.hi_us, "{b:?}");
        // iat is FinHub's second 2 (our 0 + 2.005 s, floored), exp its second 10: our 8 s.
        // The sidecar never sends it past then, and uses it until shortly before.
        assert!(!s.is_usable(at(8 * S)));
        assert!(s.is_usable(at(6_800_000)));
    }

    #[test]
    fn a_far_off_date_never_expires_a_token_finhub_said_has_time_left() {
        // The session is issued with FinHub's clock agreeing with ours; then one answer's Date
        // (an API answer, or a cached one) is 30 days ahead or behind.
        for skew_s in [30 * 86_400_i64, -30 * 86_400] {
            let clock = Arc::new(ClockOffset::new());
            let s = issued(&clock, 0, 0, 10_000, 3600);
            let date = HeaderValue::from_str(&httpdate::fmt_http_date(from_unix_us(
                BASE + 20 * S + skew_s * S,
            )))
            .unwrap();
            // An API answer only narrows: it cannot move the estimate; a cached one (with
            // `Age`) is not read at all.
            let before = clock.bounds_at(at(20 * S));
            let now_date = HeaderValue::from_str(&httpdate::fmt_http_date(at(20 * S))).unwrap();
            assert!(!clock.observe_api(Some(&now_date), true, at(20 * S), at(20 * S + 1000)));
            assert!(!clock.observe_api(Some(&date), false, at(20 * S), at(20 * S + 1000)));
            assert_eq!(clock.bounds_at(at(20 * S)), before);
            // Even an auth answer that starts the estimate over cannot expire it early, nor keep
            // it past what FinHub counted (3599 s left, floored, when it answered).
            clock.observe(Some(&date), at(20 * S), at(20 * S + 1000));
            assert!(s.is_usable(at(30 * S)), "skew {skew_s}");
            assert!(s.is_usable(at(3598 * S)), "skew {skew_s}");
            assert!(!s.is_usable(at(3601 * S)), "skew {skew_s}");
        }
    }

    #[test]
    fn usable_judges_fin_hubs_expiry_with_the_offsets_upper_bound() {
        let clock = Arc::new(ClockOffset::new());
        // FinHub 3.5 s ahead.
        let s = issued(&clock, 3_500_000, 0, 10_000, 6);
        let hi = clock.bounds_at(at(0)).hi_us;
        let exp = s.finhub_expiry().map(FinHubTime::micros).unwrap();
        let last = exp - hi - s.timing().margin_us();
        // (The bounds widen by 100 ppm of their age: 0.6 ms after 6 s.)
        assert!(s.is_usable(from_unix_us(last - 1_000)));
        assert!(!s.is_usable(from_unix_us(last + 1_000)));
        // The upper bound is within a second above the true 3.5 s.
        assert!((3_500_000..=4_510_000).contains(&hi), "{hi}");
        assert!(!format!("{s:?}").contains("finhub-only"));
    }

    #[test]
    fn absurd_times_from_fin_hub_never_panic() {
        let clock = Arc::new(ClockOffset::new());
        let now = SystemTime::now();
        for (claims, expires_in) in [
            (
                serde_json::json!({"exp": u64::MAX, "iat": 0, "internalTokenKey": "k"}),
                Some(u64::MAX),
            ),
            (
                serde_json::json!({"exp": 0, "iat": u64::MAX, "internalTokenKey": "k"}),
                Some(0),
            ),
            (serde_json::json!({"exp": 1, "internalTokenKey": "k"}), None),
            (serde_json::json!({"exp": i64::MAX as u64 / 1000}), Some(1)),
        ] {
            let g = Grant::parse(
                serde_json::json!({"userSessionToken": jwt(claims), "expires_in": expires_in})
                    .to_string()
                    .as_bytes(),
            )
            .unwrap();
            let s = FinHubSession::from_grant(g, now, now, &clock);
            let _ = s.is_usable(now);
            let _ = s.expires_at();
            assert!(s.lifetime() <= grant::MAX_LIFETIME);
            for refreshable in [true, false] {
                let _ = plan(
                    s.timing(),
                    clock.bounds(),
                    0.97,
                    i64::MAX,
                    refreshable,
                    Local::MAX,
                );
                let _ = plan(s.timing(), clock.bounds(), 0.5, 0, refreshable, Local::MIN);
            }
            s.note_remaining(Duration::from_secs(u64::MAX / 2), now, now);
        }
    }

    #[test]
    fn session_header_values_are_sensitive() {
        let clock = Arc::new(ClockOffset::new());
        let g = grant("tok-zzz-never-in-a-uuid".into(), Some(60));
        let s = FinHubSession::from_grant(g, SystemTime::now(), SystemTime::now(), &clock);
        assert!(s.authorization.is_sensitive());
        assert!(!format!("{s:?}").contains("zzz"));
        assert_eq!(s.lifetime().as_secs(), 60);
        assert!(s.finhub_expiry().is_none());
    }

    #[test]
    fn not_yet_updates_an_opaque_tokens_validity() {
        let clock = Arc::new(ClockOffset::new());
        let s = FinHubSession::from_grant(grant("opaque".into(), Some(60)), at(0), at(0), &clock);
        s.note_remaining(Duration::from_secs(100), at(10 * S), at(10 * S + 5));
        assert_eq!(unix_us(s.expires_at()), BASE + 110 * S);
    }
}
