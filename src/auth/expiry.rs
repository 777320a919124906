//! What a token's claims and FinHub's `expires_in` say about its expiry and its issuer's
//! clock (issues 14, 22.1, 28.3): pure readings, used by [`super::FinHubSession::from_grant`].

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use super::clock::{self, OffsetBounds};

use super::grant::{self, Claims};
use crate::time::{us, FinHubTime, Local};

/// Lifetime assumed when FinHub states none (neither `exp` nor `expires_in`).
const FALLBACK_LIFETIME: Duration = Duration::from_secs(300);

/// When a session expires, on the clock that states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expiry {
    /// A JWT `exp` that was believed: on FinHub's token clock.
    FinHub(FinHubTime),
    /// FinHub's count (`expires_in`, a fallback) from when the request was sent: on our clock.
    Local(Local),
}

impl Expiry {
    /// The expiry as stored (a shared session's record, an atomic): its clock's µs and
    /// whether that clock is FinHub's.
    pub(super) fn from_parts(us: i64, on_finhub_clock: bool) -> Expiry {
        if on_finhub_clock {
            Expiry::FinHub(FinHubTime::from_micros(us))
        } else {
            Expiry::Local(Local::from_micros(us))
        }
    }

    /// µs since the epoch on its own clock (for storage; see [`Expiry::from_parts`]).
    pub(super) fn micros(self) -> i64 {
        match self {
            Expiry::FinHub(t) => t.micros(),
            Expiry::Local(t) => t.micros(),
        }
    }

    /// Whether it is FinHub's `exp`.
    pub(super) fn on_finhub_clock(self) -> bool {
        matches!(self, Expiry::FinHub(_))
    }

    /// `us` earlier on its own clock, saturating.
    pub(super) fn minus_us(self, us: i64) -> Expiry {
        match self {
            Expiry::FinHub(t) => Expiry::FinHub(t.minus_us(us)),
            Expiry::Local(t) => Expiry::Local(t.minus_us(us)),
        }
    }

    /// On our clock, at the earliest FinHub's offset `offset` allows (as is, if ours).
    pub(super) fn earliest_local(self, offset: OffsetBounds) -> Local {
        match self {
            Expiry::FinHub(t) => offset.earliest_local(t),
            Expiry::Local(t) => t,
        }
    }

    /// On our clock, at the latest FinHub's offset `offset` allows (as is, if ours).
    pub(super) fn latest_local(self, offset: OffsetBounds) -> Local {
        match self {
            Expiry::FinHub(t) => offset.latest_local(t),
            Expiry::Local(t) => t,
        }
    }
}

/// A session's [`Expiry`], updated in place: one on our clock moves with FinHub's counts, one
/// on FinHub's clock never moves (its clock never changes).
#[derive(Debug)]
pub(super) struct AtomicExpiry {
    us: AtomicI64,
    on_finhub_clock: bool,
}

impl AtomicExpiry {
    /// Holds `e`.
    pub(super) fn new(e: Expiry) -> AtomicExpiry {
        AtomicExpiry {
            us: AtomicI64::new(e.micros()),
            on_finhub_clock: e.on_finhub_clock(),
        }
    }

    /// The expiry held.
    pub(super) fn load(&self) -> Expiry {
        Expiry::from_parts(self.us.load(Ordering::SeqCst), self.on_finhub_clock)
    }

    /// Moves an expiry on our clock to `t`; one on FinHub's clock is left as it is.
    pub(super) fn move_local(&self, t: Local) {
        if !self.on_finhub_clock {
            self.us.store(t.micros(), Ordering::SeqCst);
        }
    }
}

/// The expiry a token's answer gives ([`choose_expiry`]; [`super::FinHubSession::from_grant`]
/// keeps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Chosen {
    /// The expiry, on FinHub's token clock (JWT `exp`) or ours (`expires_in`).
    pub(super) at: Expiry,
    /// FinHub's validity (`exp - iat`, else `expires_in`), µs.
    pub(super) validity_us: i64,
    /// `iat` and `exp` agree with each other and with `expires_in`: FinHub's refresh window
    /// (the last tenth of `exp - iat`) is known on its token clock.
    pub(super) window_known: bool,
    /// The claims contradicted `expires_in` (or each other) and were not believed.
    pub(super) distrusted: bool,
}

/// What a token's claims say about its issuer's clock, read against when the answer that
/// carried it was sent and received (our clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reading {
    /// No `exp`: nothing about the issuer's clock.
    Silent,
    /// The offset of the issuer's clock lies in these bounds: `exp` minus `expires_in` (whole
    /// seconds left when FinHub answered, floored) and, for a fresh token, `iat` (the second
    /// it was issued), intersected.
    Sample(OffsetBounds),
    /// The claims contradict `expires_in` or each other (`iat` after `exp`, `exp` ten years
    /// past `iat + expires_in`, claims beyond a year from our clock): not believed.
    Contradicts,
}

/// Reads `claims` and `expires_in` of an answer sent at `sent` and received at `received`
/// (issue 22.1, 28.3): `exp - expires_in` and `iat` are two readings of the token issuer's
/// clock; they must agree (within the whole-second rounding and the round trip).
pub(super) fn read_claims(
    claims: &Claims,
    expires_in: Option<Duration>,
    sent: SystemTime,
    received: SystemTime,
) -> Reading {
    let Some(exp) = claims.exp else {
        return Reading::Silent;
    };
    let iat = claims.iat;
    if iat.is_some_and(|iat| iat >= exp) {
        return Reading::Contradicts;
    }
    let (sent, received) = (Local::from_system(sent), Local::from_system(received));
    // FinHub's clock read `exp - e - 1 s .. exp - e` when it answered (e floored).
    let from_count = expires_in.map(|e| OffsetBounds::from_count(exp, us(e), sent, received));
    let from_iat = iat.and_then(|iat| clock::second_sample(iat, sent, received));
    let sample = match (from_count, from_iat, iat) {
        (Some(a), Some(b), _) => a.intersect(&b),
        (Some(a), None, None) => Some(a),
        // An `iat` beyond a year from our clock (milliseconds read as seconds, garbage).
        (Some(_), None, Some(_)) => None,
        (None, Some(b), _) => Some(b),
        (None, None, Some(_)) => None,
        (None, None, None) => return Reading::Silent,
    };
    let plausible = |b: &OffsetBounds| {
        b.lo_us.unsigned_abs() <= MAX_OFFSET.unsigned_abs()
            && b.hi_us.unsigned_abs() <= MAX_OFFSET.unsigned_abs()
    };
    match sample.filter(plausible) {
        Some(b) => Reading::Sample(b),
        None => Reading::Contradicts,
    }
}

/// Offsets of FinHub's token clock beyond this are taken as garbage, not as a clock.
const MAX_OFFSET: i64 = 366 * 86_400 * 1_000_000;

/// The expiry rule (§4.3, issues 14, 22.1, 28.3). A JWT `exp` whose claims agree with
/// `expires_in` ([`read_claims`]) is the truth, on FinHub's token clock (`offset`, the
/// estimate of that clock after this token's own reading). Claims that contradict `expires_in`
/// are not believed: `expires_in` is FinHub's own count and wins, from the moment the request
/// was sent. Without `exp`, `expires_in` from then; without either, a fallback lifetime.
pub(super) fn choose_expiry(
    claims: &Claims,
    expires_in: Option<Duration>,
    reading: Reading,
    sent: SystemTime,
    received: SystemTime,
    offset: OffsetBounds,
) -> Chosen {
    let (sent, received) = (Local::from_system(sent), Local::from_system(received));
    let counted = |e: i64, distrusted: bool| Chosen {
        at: Expiry::Local(sent.plus_us(e)),
        validity_us: e,
        window_known: false,
        distrusted,
    };
    let fallback = |distrusted: bool| Chosen {
        validity_us: us(FALLBACK_LIFETIME),
        ..counted(us(FALLBACK_LIFETIME), distrusted)
    };
    match (claims.exp, expires_in.map(us), reading) {
        (Some(_), Some(e), Reading::Contradicts) => counted(e, true),
        (Some(_), None, Reading::Contradicts) => fallback(true),
        (Some(exp), e, _) => {
            // Like every lifetime believed from FinHub, at most a day from now.
            let latest = offset.latest_finhub(received) + grant::MAX_LIFETIME;
            let at = exp.min(latest);
            let validity_us = match (claims.iat, e) {
                (Some(iat), _) if iat < exp => exp.since(iat),
                (_, Some(e)) => e,
                _ => exp.since(offset.to_finhub(sent)),
            };
            Chosen {
                at: Expiry::FinHub(at),
                validity_us: validity_us.clamp(0, us(grant::MAX_LIFETIME)),
                window_known: claims.iat.is_some()
                    && matches!(reading, Reading::Sample(_))
                    && at == exp,
                distrusted: false,
            }
        }
        (None, Some(e), _) => counted(e, false),
        (None, None, _) => fallback(false),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::auth::clock::OffsetBounds;
    use crate::auth::session::tests::{at, BASE, S};
    use crate::time::{FinHubTime, Local};

    fn claims_of(exp: Option<i64>, iat: Option<i64>) -> Claims {
        Claims {
            exp: exp.map(|s| FinHubTime::from_micros(BASE + s)),
            iat: iat.map(|s| FinHubTime::from_micros(BASE + s)),
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
    ) -> Chosen {
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
        assert_eq!(e.at, Expiry::FinHub(FinHubTime::from_micros(BASE + 6 * S)));
        assert!(e.at.on_finhub_clock() && e.window_known && !e.distrusted);
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
        assert!(e.distrusted && !e.at.on_finhub_clock() && !e.window_known);
        assert_eq!(
            (e.at, e.validity_us),
            (Expiry::Local(Local::from_micros(BASE + 60 * S)), 60 * S)
        );
        // exp before iat (already past when issued): expires_in wins.
        let e = expiry_of(&claims_of(Some(-8 * S), Some(0)), Some(8), 0, 1_000, zero);
        assert!(e.distrusted);
        assert_eq!(e.at, Expiry::Local(Local::from_micros(BASE + 8 * S)));
        // Without exp: expires_in from when the request was sent, on our clock.
        let e = expiry_of(&claims_of(None, None), Some(60), 5, 9, zero);
        assert_eq!(
            (e.at.micros(), e.at.on_finhub_clock()),
            (BASE + 5 + 60 * S, false)
        );
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
}
