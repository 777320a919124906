//! FinHub sessions: one per tenant, obtained and renewed in the background.
//!
//! Each tenant has a [`SessionSlot`] holding the current [`FinHubSession`] as an immutable
//! snapshot (`ArcSwapOption`). A background task per tenant ([`run_tenant`]) logs in, renews the
//! token inside FinHub's refresh window (refresh endpoint with the JWT's `internalTokenKey`, or
//! a fresh login when that is not possible or fails), and retries failures: quickly while the
//! tenant has no usable session, with exponential backoff while it still has one. At graceful
//! shutdown [`logout_all`] ends every session. The request path only loads the snapshot and
//! checks its expiry; it never waits on a lock and never sends a token it knows is expired.
//!
//! Times: a session's expiry is the JWT `exp`, on FinHub's clock; `expires_in` is only a
//! fallback (opaque tokens) and a sanity bound. FinHub's clock offset is estimated from its
//! `Date` headers ([`clock::ClockOffset`]) as an interval; the expiry check uses its upper
//! bound (never send a token FinHub may consider expired), the refresh plan both bounds
//! ([`plan`]).

pub mod client;
pub mod clock;
pub mod fleet;
pub mod grant;
mod plan;
mod renew;
mod session;
mod slot;

use plan::*;
pub use renew::{logout_all, run_tenant};
pub use session::FinHubSession;
use session::*;
pub use slot::{SessionSlot, SessionTable, TenantStatus};

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use rand::Rng;
use tokio::sync::{watch, Notify};

use crate::config::{AuthConfig, Config, TenantConfig};
use crate::metrics::Metrics;
use crate::secret::Secret;
use client::{AuthClient, AuthError, Refreshed};
use clock::{from_unix_us, unix_us, us, ClockOffset, OffsetBounds};
use grant::{Claims, Grant};

/// Lifetime assumed when FinHub states none (neither `exp` nor `expires_in`).
const FALLBACK_LIFETIME: Duration = Duration::from_secs(300);
/// The longest `Retry-After` from the auth endpoint that is honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);
/// Forced renewals (after a 401) happen at most this often per tenant.
const MIN_FORCED_INTERVAL: Duration = Duration::from_secs(5);
/// The longest spacing of forced renewals: when 401s keep coming after renewals, they are not
/// about the session (an endpoint that answers 401 for its own reasons), and an app must not be
/// able to drive a login every few seconds.
const MAX_FORCED_INTERVAL: Duration = Duration::from_secs(300);

/// The smallest spacing between two successful renewals of a tenant (issue 28.3; the floor
/// is otherwise a tenth of the granted validity).
const MIN_RENEWAL_SPACING: Duration = Duration::from_secs(1);
/// While a tenant has no usable session, retries wait `auth.recovery_interval` plus up to
/// this fraction of it (jitter above the floor, never below).
const RECOVERY_JITTER: f64 = 0.25;
/// A request FinHub answered 401 is held for a renewal only if one can start within this;
/// otherwise (forced renewals are spaced, or a backoff runs) the 401 goes to the app at once.
const FORCED_HOLD: Duration = Duration::from_millis(1500);
/// "Not refreshed, still valid" answers accepted for one session; then it is replaced by a
/// login before it becomes unusable (FinHub's window is not where the sidecar thinks).
const MAX_EARLY_REFRESHES: u32 = 8;
/// Backoff while a usable token is held: full jitter, exponential from 500 ms to 30 s.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A rejected login (bad credentials) is retried after 30 s, doubling to 5 min, unless the
/// credentials change meanwhile.
const REJECTED_MIN: Duration = Duration::from_secs(30);
const REJECTED_MAX: Duration = Duration::from_secs(300);

/// A token with less than this left (or 2 % of its lifetime, if smaller) is treated as expired,
/// so that it does not expire while a request is on the way.
const EXPIRY_MARGIN: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::renew::next_rtt;
    use super::*;
    use crate::config::Environment;

    #[test]
    fn forced_renewals_that_keep_coming_are_spaced_out() {
        assert_eq!(forced_spacing(0), Duration::from_secs(5));
        assert_eq!(forced_spacing(1), Duration::from_secs(10));
        assert_eq!(forced_spacing(3), Duration::from_secs(40));
        assert_eq!(forced_spacing(6), MAX_FORCED_INTERVAL);
        assert_eq!(forced_spacing(u32::MAX), MAX_FORCED_INTERVAL);
    }

    const S: i64 = 1_000_000;
    /// A whole second, far from the epoch.
    const BASE: i64 = 1_700_000_000 * S;

    fn at(us: i64) -> SystemTime {
        from_unix_us(BASE + us)
    }

    fn jwt(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"finhub-only"),
        )
        .unwrap()
    }

    fn grant(token: String, expires_in: Option<u64>) -> Grant {
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
    fn issued(
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

    fn claims_of(exp: Option<i64>, iat: Option<i64>) -> Claims {
        Claims {
            exp: exp.map(|s| from_unix_us(BASE + s)),
            iat: iat.map(|s| from_unix_us(BASE + s)),
            internal_token_key: None,
            session_id: None,
        }
    }

    /// `choose_expiry` after `read_claims`, as `FinHubSession::from_grant` runs them.
    fn expiry_of(
        claims: &Claims,
        expires_in: Option<u64>,
        sent: i64,
        received: i64,
        offset: OffsetBounds,
    ) -> Expiry {
        let e = expires_in.map(Duration::from_secs);
        let reading = read_claims(claims, e, at(sent), at(received));
        choose_expiry(claims, e, reading, at(sent), at(received), offset)
    }

    #[test]
    fn exp_agreeing_with_expires_in_is_the_truth_else_expires_in_wins() {
        let zero = OffsetBounds::ZERO;
        // exp 6 s after iat; expires_in floored to 5 while 5.7 s were left: exp wins.
        let e = expiry_of(
            &claims_of(Some(6 * S), Some(0)),
            Some(5),
            300_000,
            310_000,
            zero,
        );
        assert_eq!(e.at_us, BASE + 6 * S);
        assert!(e.on_finhub_clock && e.window_known && !e.distrusted);
        assert_eq!(e.validity_us, 6 * S);
        // exp far beyond what iat + expires_in allow (a 10-year exp): expires_in wins, from
        // when the request was sent, on our clock.
        let e = expiry_of(
            &claims_of(Some(10 * 365 * 86_400 * S), Some(0)),
            Some(60),
            0,
            1_000,
            zero,
        );
        assert!(e.distrusted && !e.on_finhub_clock && !e.window_known);
        assert_eq!((e.at_us, e.validity_us), (BASE + 60 * S, 60 * S));
        // exp before iat (already past when issued): expires_in wins.
        let e = expiry_of(&claims_of(Some(-8 * S), Some(0)), Some(8), 0, 1_000, zero);
        assert!(e.distrusted);
        assert_eq!(e.at_us, BASE + 8 * S);
        // Without exp: expires_in from when the request was sent, on our clock.
        let e = expiry_of(&claims_of(None, None), Some(60), 5, 9, zero);
        assert_eq!((e.at_us, e.on_finhub_clock), (BASE + 5 + 60 * S, false));
        // Neither: the fallback.
        let e = expiry_of(&claims_of(None, None), None, 0, 0, zero);
        assert_eq!(e.validity_us, us(FALLBACK_LIFETIME));
        // exp without iat or expires_in: validity counted from the request on FinHub's clock.
        let skew = OffsetBounds {
            lo_us: 2 * S,
            hi_us: 2 * S,
        };
        let e = expiry_of(&claims_of(Some(10 * S), None), None, 0, 0, skew);
        assert_eq!(e.validity_us, 8 * S);
    }

    #[test]
    fn a_tokens_claims_are_a_reading_of_its_issuers_clock() {
        // Issued an hour behind our clock: iat and exp - expires_in agree on -3600 s.
        let claims = claims_of(Some(-3600 * S + 8 * S), Some(-3600 * S));
        let r = read_claims(
            &claims,
            Some(Duration::from_secs(7)),
            at(300_000),
            at(310_000),
        );
        let Reading::Sample(b) = r else {
            panic!("{r:?}")
        };
        assert!(
            b.lo_us <= -3600 * S + 1 && b.hi_us >= -3600 * S - 300_000,
            "{b:?}"
        );
        assert!(b.hi_us - b.lo_us <= S + 10_000, "{b:?}");
        // A token handed out again long after its iat: the two readings disagree.
        let old = claims_of(Some(600 * S), Some(-1200 * S));
        assert_eq!(
            read_claims(&old, Some(Duration::from_secs(600)), at(0), at(1_000)),
            Reading::Contradicts
        );
        // Claims beyond a year from our clock are not a clock.
        let far = claims_of(Some(400 * 86_400 * S + 8 * S), Some(400 * 86_400 * S));
        assert_eq!(read_claims(&far, None, at(0), at(0)), Reading::Contradicts);
        assert_eq!(
            read_claims(&claims_of(None, Some(0)), None, at(0), at(0)),
            Reading::Silent
        );
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
    fn tokens_unusable_on_arrival_are_retried_slowly() {
        let e = AuthError::Answer(grant::GrantError::AlreadyExpired);
        for failures in 1..6 {
            assert!(
                retry_wait(failures, &e, None, Duration::from_secs(3), 0.0)
                    >= Duration::from_secs(30)
            );
        }
    }

    #[test]
    fn usable_judges_fin_hubs_expiry_with_the_offsets_upper_bound() {
        let clock = Arc::new(ClockOffset::new());
        // FinHub 3.5 s ahead.
        let s = issued(&clock, 3_500_000, 0, 10_000, 6);
        let hi = clock.bounds_at(at(0)).hi_us;
        let exp = s.finhub_expiry().map(unix_us).unwrap();
        let last = exp - hi - s.timing().margin_us();
        // (The bounds widen by 100 ppm of their age: 0.6 ms after 6 s.)
        assert!(s.is_usable(from_unix_us(last - 1_000)));
        assert!(!s.is_usable(from_unix_us(last + 1_000)));
        // The upper bound is within a second above the true 3.5 s.
        assert!((3_500_000..=4_510_000).contains(&hi), "{hi}");
        assert!(!format!("{s:?}").contains("finhub-only"));
    }

    fn timing(exp_s: i64, validity_s: i64) -> Timing {
        Timing {
            expiry_us: BASE + exp_s * S,
            on_finhub_clock: true,
            validity_us: validity_s * S,
            at_least_us: i64::MIN,
            at_most_us: i64::MAX,
        }
    }

    #[test]
    fn a_known_offset_plans_the_refresh_at_refresh_at_of_fin_hubs_clock() {
        // 1800 s token, FinHub exactly 5 s behind.
        let t = timing(1800, 1800);
        let off = OffsetBounds {
            lo_us: -5 * S,
            hi_us: -5 * S,
        };
        let p = plan(t, off, 0.92, 50_000, true, 0);
        assert_eq!(p.step, Step::Refresh);
        // 92 % of 1800 s on FinHub's clock = 1656 s; 5 s later on ours.
        assert_eq!(p.at_us, BASE + 1656 * S + 5 * S);
        // Without the key: a login at the same point.
        let p = plan(t, off, 0.92, 50_000, false, 0);
        assert_eq!((p.step, p.at_us), (Step::Login, BASE + 1661 * S));
    }

    #[test]
    fn refresh_at_is_clamped_into_the_window_fin_hub_surely_has_open() {
        // 6 s token; offset within ±50 ms; refresh_at 0.5 would be far too early.
        let t = timing(6, 6);
        let off = OffsetBounds {
            lo_us: -50_000,
            hi_us: 50_000,
        };
        let p = plan(t, off, 0.5, 30_000, true, 0);
        assert_eq!(p.step, Step::Refresh);
        // The window opens at 5.4 s on FinHub's clock; surely open at 5.45 s on ours.
        assert_eq!(p.at_us, BASE + 5_450_000);
        // And 0.99 is clamped to the last moment a refresh still lands in time.
        let p = plan(t, off, 0.99, 30_000, true, 0);
        let latest = BASE + 6 * S - 50_000 - 120_000 - 30_000;
        assert_eq!(p.at_us, latest);
    }

    #[test]
    fn an_uncertain_offset_probes_early_enough_to_recover_from_not_yet() {
        // 6 s token, one Date sample: offset within a second.
        let t = timing(6, 6);
        let off = OffsetBounds { lo_us: 0, hi_us: S };
        let lead = 30_000;
        let p = plan(t, off, 0.92, lead, true, 0);
        assert_eq!(p.step, Step::Refresh);
        let step = 600_000 - 120_000 - lead;
        let surely_open = BASE + 5_400_000;
        assert_eq!((surely_open - p.at_us) % step, 0);
        // "Not refreshed" at p: the offset is below opens - p; the next plan is feasible.
        let hi = BASE + 5_400_000 - p.at_us;
        let next = plan(
            t,
            OffsetBounds {
                lo_us: 0,
                hi_us: hi,
            },
            0.92,
            lead,
            true,
            p.at_us + 20_000,
        );
        assert_eq!(next.step, Step::Refresh);
        assert!(next.at_us > p.at_us);
        assert!(next.at_us <= BASE + 6 * S - hi - 120_000 - lead);
    }

    #[test]
    fn when_no_refresh_can_land_in_time_a_login_does() {
        let t = timing(6, 6);
        let off = OffsetBounds {
            lo_us: 0,
            hi_us: 100_000,
        };
        // Asked not before the last moment a renewal lands in time: login at once.
        let late = BASE + 6 * S;
        let p = plan(t, off, 0.92, 30_000, true, late);
        assert_eq!((p.step, p.at_us), (Step::Login, late));
        // Opaque token on our clock, no key: login at refresh_at.
        let t = Timing {
            expiry_us: BASE + 100 * S,
            on_finhub_clock: false,
            validity_us: 100 * S,
            at_least_us: i64::MIN,
            at_most_us: i64::MAX,
        };
        let p = plan(t, off, 0.92, 30_000, false, 0);
        assert_eq!((p.step, p.at_us), (Step::Login, BASE + 92 * S));
    }

    /// FinHub (clock `offset` ahead, 10 % rule, whole-second times) against the plan and the
    /// clock estimate, as the session task drives them: for `lifetimes` renewals, the new token
    /// always arrives while the old one is usable and before FinHub's exp, logins never
    /// happen after the first, and early "not refreshed" answers stop once the offset is
    /// learnt.
    fn simulate(offset: i64, life_s: i64, rtt: i64, lifetimes: usize) -> Vec<u32> {
        let clock = Arc::new(ClockOffset::new());
        let mut s = issued(&clock, offset, 0, rtt, life_s);
        let mut rtt_us = rtt;
        let mut not_yets = Vec::new();
        for _ in 0..lifetimes {
            let mut early = 0u32;
            let mut not_before = unix_us(s.received_at) - BASE;
            loop {
                let lead = 3 * rtt_us + 20_000;
                let p = plan(
                    s.timing(),
                    clock.bounds_at(at(not_before)),
                    0.92,
                    lead,
                    true,
                    BASE + not_before,
                );
                assert_eq!(
                    p.step,
                    Step::Refresh,
                    "offset {offset}: logged in after {early} early answers"
                );
                let sent = p.at_us - BASE;
                let finhub = BASE + sent + rtt / 2 + offset;
                let exp = s.finhub_expiry().map(unix_us).unwrap();
                assert!(finhub < exp, "the refresh reached FinHub after exp");
                let date = HeaderValue::from_str(&httpdate::fmt_http_date(from_unix_us(
                    finhub.div_euclid(S) * S,
                )))
                .unwrap();
                clock.observe(Some(&date), at(sent), at(sent + rtt));
                let opens = s.window_opens_us().unwrap();
                if exp - finhub > us(s.validity) / 10 {
                    early += 1;
                    assert!(
                        early < MAX_EARLY_REFRESHES,
                        "offset {offset}: never in the window"
                    );
                    clock.infer(None, Some(opens - unix_us(at(sent))), at(sent + rtt));
                    s.note_remaining(
                        Duration::from_secs(((exp - finhub) / S) as u64),
                        at(sent),
                        at(sent + rtt),
                    );
                    not_before = sent + 20_000;
                    rtt_us = next_rtt(rtt_us, at(sent), at(sent + rtt));
                    continue;
                }
                let new = issued(&clock, offset, sent, rtt, life_s);
                clock.infer(
                    Some(opens - unix_us(new.received_at)),
                    None,
                    new.received_at,
                );
                assert!(
                    s.is_usable(new.received_at),
                    "offset {offset}: the old token became unusable before the new one arrived"
                );
                s = new;
                break;
            }
            not_yets.push(early);
        }
        not_yets
    }

    #[test]
    fn renewals_converge_into_fin_hubs_window_whatever_the_offset() {
        for offset in [0, 3_000_000, -3_000_000, 437_000, -2_999_999, 61_250_000] {
            for life_s in [3, 6, 1800] {
                let early = simulate(offset, life_s, 4_000, 20);
                let total: u32 = early.iter().sum();
                assert!(total <= 8, "offset {offset}, {life_s} s: {early:?}");
                assert!(
                    early[10..].iter().all(|n| *n == 0),
                    "offset {offset}, {life_s} s: still early after 10 lifetimes: {early:?}"
                );
            }
        }
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
                    i64::MAX,
                );
                let _ = plan(s.timing(), clock.bounds(), 0.5, 0, refreshable, i64::MIN);
            }
            s.note_remaining(Duration::from_secs(u64::MAX / 2), now, now);
        }
    }

    #[test]
    fn refresh_only_with_key_outside_sandbox() {
        let clock = Arc::new(ClockOffset::new());
        let now = SystemTime::now();
        let sent = unix_us(now) - BASE;
        let s = issued(&clock, 0, sent, 1_000, 100);
        let production = Environment::Production.rules().refresh_supported;
        assert!(can_refresh(production, &s, now));
        assert!(!can_refresh(
            Environment::Sandbox.rules().refresh_supported,
            &s,
            now
        ));
        let opaque = FinHubSession::from_grant(grant("opaque".into(), Some(100)), now, now, &clock);
        assert!(!can_refresh(production, &opaque, now));
        assert!(!can_refresh(production, &s, now + Duration::from_secs(200)));
    }

    #[test]
    fn the_recovery_interval_is_a_floor_with_jitter_above_it() {
        let recovery = Duration::from_secs(3);
        let err = AuthError::Status(503, None);
        for failures in 1..20 {
            for jitter in [0.0, 0.5, 0.999] {
                // No usable token: one attempt per interval, never sooner, at most a quarter
                // later (recovery within one interval of FinHub's return, ≤ 3.75 s).
                let w = retry_wait(failures, &err, None, recovery, jitter);
                assert!(
                    w >= recovery && w <= recovery.mul_f64(1.25),
                    "{failures} {jitter}: {w:?}"
                );
                // A usable token: exponential, capped at 30 s, never below the floor either.
                for left in [3600, 2, 0] {
                    let w = retry_wait(
                        failures,
                        &err,
                        Some(Duration::from_secs(left)),
                        recovery,
                        jitter,
                    );
                    assert!(w <= BACKOFF_CAP && w >= recovery, "{left}: {w:?}");
                }
            }
        }
        // At the default, at most 20 attempts a minute whatever the jitter.
        let minute: Duration = (1..=20)
            .map(|n| retry_wait(n, &err, None, recovery, 0.0))
            .sum();
        assert!(minute >= Duration::from_secs(60));
        assert_eq!(
            retry_wait(12, &err, Some(Duration::from_secs(3600)), recovery, 0.999).as_secs(),
            29
        );
        // Retry-After is honoured either way.
        for asked in [
            AuthError::RateLimited {
                retry_after: Some(Duration::from_secs(7)),
            },
            AuthError::Status(503, Some(Duration::from_secs(7))),
        ] {
            assert!(retry_wait(1, &asked, None, recovery, 0.0) >= Duration::from_secs(7));
            assert!(
                retry_wait(1, &asked, Some(Duration::ZERO), recovery, 0.0)
                    >= Duration::from_secs(7)
            );
        }
        let absurd = AuthError::RateLimited {
            retry_after: Some(Duration::from_secs(86_400)),
        };
        assert_eq!(retry_wait(1, &absurd, None, recovery, 0.0), MAX_RETRY_AFTER);
    }

    #[test]
    fn successful_renewals_are_spaced_by_a_tenth_of_the_lifetime() {
        let v = Duration::from_secs(8);
        // A tenth of the lifetime (at least a second), doubling while tokens arrive due, but
        // not past the last moment a renewal lands in time; the floor itself always holds.
        assert_eq!(renewal_not_before(0, v, 0, 100 * S), S);
        assert_eq!(
            renewal_not_before(0, Duration::from_secs(1800), 0, 3600 * S),
            180 * S
        );
        assert_eq!(renewal_not_before(0, v, 2, 100 * S), 4 * S);
        assert_eq!(renewal_not_before(0, v, 20, 100 * S), 64 * S);
        assert_eq!(renewal_not_before(0, v, 3, 5 * S), 5 * S);
        assert_eq!(renewal_not_before(0, v, 3, 0), S);
    }

    #[test]
    fn a_count_only_token_is_planned_within_fin_hubs_count() {
        // No trusted exp: FinHub said 7 s (floored) for a request sent at 0, answered 10 ms
        // later. The end lies in [7 s, 8.01 s]; the plan probes from where the window may
        // open and never goes past 7 s.
        let clock = Arc::new(ClockOffset::new());
        let s =
            FinHubSession::from_grant(grant("opaque".into(), Some(7)), at(0), at(10_000), &clock);
        let t = s.timing();
        assert_eq!(
            t.count_bounds(),
            OffsetBounds {
                lo_us: -S - 10_000,
                hi_us: 0
            }
        );
        let p = plan(t, clock.bounds(), 0.92, 30_000, true, 0);
        assert_eq!(p.step, Step::Refresh);
        assert!(p.at_us < BASE + 7 * S - 140_000 - 30_000, "{p:?}");
        // "Not refreshed": 1 s left at 7.2 s. The counts intersect: the end is within
        // [8.2 s, 8.01 s] ∩ … = it narrows, it does not move past the first count's end.
        s.note_remaining(Duration::from_secs(0), at(7_200_000), at(7_210_000));
        let t = s.timing();
        assert_eq!(t.at_least_us, BASE + 7_200_000);
        assert_eq!(t.at_most_us, BASE + 8_010_000);
        assert!(s.is_usable(at(7_000_000)));
        assert!(!s.is_usable(at(7_200_000)));
    }

    #[test]
    fn bad_credentials_back_off_slowly() {
        assert_eq!(rejected_wait(1), Duration::from_secs(30));
        assert_eq!(rejected_wait(2), Duration::from_secs(60));
        assert_eq!(rejected_wait(4), Duration::from_secs(240));
        assert_eq!(rejected_wait(5), REJECTED_MAX);
        assert_eq!(rejected_wait(u32::MAX), REJECTED_MAX);
        // Five rejections take more than 7 minutes: no lockout from a burst of retries.
        let five: Duration = (1..=4).map(rejected_wait).sum();
        assert!(five >= Duration::from_secs(7 * 60));
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
