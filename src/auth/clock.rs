//! A FinHub clock as seen from its answers.
//!
//! FinHub runs two clocks that need not agree (different hosts, a few hundred ms to seconds
//! apart, more when one is misconfigured): its API gateway's, read from `Date` headers, and
//! its token issuer's, on which a token's `iat`/`exp`, `expires_in` and the 10 % refresh window
//! are stated. Each is estimated by one [`ClockOffset`]: the gateway's for `/status` and the
//! metric, the token issuer's for everything about a token (its expiry, the refresh plan).
//! `Date` never moves the token clock: what FinHub says about a token wins.
//!
//! An estimate of an offset (`finhub = local + offset`) is kept as an interval that surely
//! holds the true offset:
//!
//! - A whole-second reading (a `Date` header, a token's `iat`, or `exp` minus a whole-second
//!   `expires_in`) says FinHub's clock read `D..D+1` at some moment between sending the request
//!   and receiving the answer, so the offset lies in `[D - received, D + 1 - sent]`. Samples
//!   are intersected: answers arriving at different points of a second narrow the interval
//!   towards the round-trip time.
//! - *Inferred* bounds come from what FinHub did, not from a clock reading (the refresh window
//!   opened or not, the whole seconds left in a "not refreshed" answer). They only narrow an
//!   interval they agree with and are ignored otherwise.
//! - Clocks drift: an interval widens by 100 ppm of its age on each side.
//! - A measured sample that contradicts the interval (a clock was stepped) replaces it.
//!
//! The midpoint is the estimate (the metric and `/status`); planning uses the bounds, so an
//! uncertain offset makes the sidecar careful, never wrong.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Mutex, OnceLock, TryLockError};
use std::time::SystemTime;

use http::HeaderValue;
use prometheus::Gauge;

use crate::time::{FinHubTime, Local};

/// How fast an interval widens with age: 100 ppm (µs per second, each side).
const DRIFT_US_PER_S: i64 = 100;
/// Offsets beyond a year are taken as garbage, not as a clock.
const MAX_OFFSET_US: i64 = 366 * 86_400 * 1_000_000;
/// A `Date` is whole seconds.
const DATE_RESOLUTION_US: i64 = 1_000_000;

/// What is known about FinHub's clock offset (`finhub = local + offset`), microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffsetBounds {
    /// The offset is at least this.
    pub lo_us: i64,
    /// The offset is at most this.
    pub hi_us: i64,
}

impl OffsetBounds {
    /// No knowledge at all: FinHub's clock is taken to be ours.
    pub const ZERO: OffsetBounds = OffsetBounds { lo_us: 0, hi_us: 0 };

    /// The estimate: the middle of the interval.
    pub fn mid_us(&self) -> i64 {
        self.lo_us + (self.hi_us - self.lo_us) / 2
    }

    /// Half the interval's width: the estimate's error bound.
    pub fn uncertainty_us(&self) -> i64 {
        (self.hi_us - self.lo_us) / 2
    }

    /// The interval both hold, if they overlap.
    pub fn intersect(&self, other: &OffsetBounds) -> Option<OffsetBounds> {
        let lo = self.lo_us.max(other.lo_us);
        let hi = self.hi_us.min(other.hi_us);
        (lo <= hi).then_some(OffsetBounds {
            lo_us: lo,
            hi_us: hi,
        })
    }

    /// FinHub's instant `t` on our clock at the earliest the offset allows (`t - hi`).
    pub fn earliest_local(&self, t: FinHubTime) -> Local {
        Local::from_micros(t.micros()).minus_us(self.hi_us)
    }

    /// FinHub's instant `t` on our clock at the latest the offset allows (`t - lo`).
    pub fn latest_local(&self, t: FinHubTime) -> Local {
        Local::from_micros(t.micros()).minus_us(self.lo_us)
    }

    /// FinHub's instant `t` on our clock by the estimate (`t - mid`).
    pub fn to_local(&self, t: FinHubTime) -> Local {
        Local::from_micros(t.micros()).minus_us(self.mid_us())
    }

    /// Our instant `t` on FinHub's clock at the latest the offset allows (`t + hi`).
    pub fn latest_finhub(&self, t: Local) -> FinHubTime {
        FinHubTime::from_micros(t.micros()).plus_us(self.hi_us)
    }

    /// Our instant `t` on FinHub's clock by the estimate (`t + mid`).
    pub fn to_finhub(&self, t: Local) -> FinHubTime {
        FinHubTime::from_micros(t.micros()).plus_us(self.mid_us())
    }

    /// The offset from FinHub's count of whole seconds (floored) `left_us` remaining until its
    /// instant `end`, answered between `sent` and `received` on our clock: FinHub's clock read
    /// `end - left - 1 s ..= end - left` at some moment in between.
    pub fn from_count(end: FinHubTime, left_us: i64, sent: Local, received: Local) -> OffsetBounds {
        let at = end.minus_us(left_us);
        OffsetBounds {
            lo_us: at
                .minus_us(DATE_RESOLUTION_US)
                .micros()
                .saturating_sub(received.micros()),
            hi_us: at.micros().saturating_sub(sent.micros()),
        }
    }

    fn widened(&self, by_us: i64) -> OffsetBounds {
        OffsetBounds {
            lo_us: self.lo_us.saturating_sub(by_us),
            hi_us: self.hi_us.saturating_add(by_us),
        }
    }
}

/// A snapshot for `/status`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct OffsetReport {
    /// Midpoint estimate, seconds (positive: FinHub's clock is ahead of ours).
    pub offset_seconds: f64,
    /// Half-width of the interval that holds the true offset, seconds.
    pub uncertainty_seconds: f64,
    /// `Date` samples taken.
    pub samples: u64,
    /// Times a `Date` contradicted the estimate and replaced it (a clock was stepped).
    pub resets: u64,
}

#[derive(Default)]
struct State {
    bounds: Option<OffsetBounds>,
    /// Our time of the last change (for drift).
    updated: Local,
    samples: u64,
    resets: u64,
}

impl State {
    /// The current interval, widened for the drift since it was last narrowed.
    fn current(&self, now: Local) -> Option<OffsetBounds> {
        let age_s = now.since(self.updated).max(0) / 1_000_000;
        self.bounds
            .map(|b| b.widened(age_s.saturating_mul(DRIFT_US_PER_S)))
    }
}

/// The estimator, shared by every tenant (they all talk to the same FinHub) and the proxy.
pub struct ClockOffset {
    state: Mutex<State>,
    /// Published bounds for lock-free readers (the request path's expiry check), and when
    /// they were last narrowed (readers widen them for the drift since).
    lo_us: AtomicI64,
    hi_us: AtomicI64,
    updated_us: AtomicI64,
    known: AtomicBool,
    gauge: OnceLock<Gauge>,
}

impl Default for ClockOffset {
    fn default() -> Self {
        ClockOffset::new()
    }
}

impl std::fmt::Debug for ClockOffset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClockOffset")
            .field("bounds", &self.bounds())
            .finish_non_exhaustive()
    }
}

impl ClockOffset {
    /// Nothing known yet: FinHub's clock is taken to be ours until its first answer.
    pub fn new() -> Self {
        ClockOffset {
            state: Mutex::new(State::default()),
            lo_us: AtomicI64::new(0),
            hi_us: AtomicI64::new(0),
            updated_us: AtomicI64::new(0),
            known: AtomicBool::new(false),
            gauge: OnceLock::new(),
        }
    }

    /// Exposes the estimate as this gauge from now on (set once; later calls are ignored).
    pub fn set_gauge(&self, gauge: Gauge) {
        if let Some(b) = self.bounds_if_known(SystemTime::now()) {
            gauge.set(b.mid_us() as f64 / 1e6);
        }
        let _ = self.gauge.set(gauge);
    }

    /// Takes one FinHub answer's `Date` header into account: the request was sent at `sent`
    /// and the answer's header arrived at `received` (both our clock). Cheap (a parse and an
    /// uncontended lock; skipped, not waited for, if another thread holds the lock), so it can
    /// run on every proxied answer. Returns whether the sample was used.
    pub fn observe(
        &self,
        date: Option<&HeaderValue>,
        sent: SystemTime,
        received: SystemTime,
    ) -> bool {
        self.take_date(date, sent, received, true)
    }

    /// Takes an API answer's `Date` into account, as [`Self::observe`] but only to narrow the
    /// estimate: an answer the upstream controls (or a cache in between replays: one with
    /// `Age`) never starts the estimate over, so one far-off `Date` cannot move it.
    pub fn observe_api(
        &self,
        date: Option<&HeaderValue>,
        cached: bool,
        sent: SystemTime,
        received: SystemTime,
    ) -> bool {
        !cached && self.take_date(date, sent, received, false)
    }

    /// One `Date` reading, applied as a measurement (which may start the estimate over) or
    /// only to narrow it; skipped, not waited for, when another thread holds the lock.
    fn take_date(
        &self,
        date: Option<&HeaderValue>,
        sent: SystemTime,
        received: SystemTime,
        measured: bool,
    ) -> bool {
        let Some(sample) = date
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
            .and_then(|date| {
                second_sample(
                    FinHubTime::from_system(date),
                    Local::from_system(sent),
                    Local::from_system(received),
                )
            })
        else {
            return false;
        };
        let at = Local::from_system(received);
        match self.state.try_lock() {
            Ok(mut s) => self.apply(&mut s, sample, at, measured),
            Err(TryLockError::WouldBlock) => false,
            Err(TryLockError::Poisoned(p)) => self.apply(&mut p.into_inner(), sample, at, measured),
        }
    }

    /// A measured interval (e.g. a token's own whole-second claims read against when its answer
    /// was sent and received, [`second_sample`]): narrows the estimate, or replaces it when they
    /// disagree (the clock was stepped). Offsets beyond a year are ignored. Returns whether used.
    pub fn measure(&self, sample: OffsetBounds, at: SystemTime) -> bool {
        if sample.lo_us > sample.hi_us
            || sample.lo_us.unsigned_abs() > MAX_OFFSET_US.unsigned_abs()
            || sample.hi_us.unsigned_abs() > MAX_OFFSET_US.unsigned_abs()
        {
            return false;
        }
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        self.apply(&mut s, sample, Local::from_system(at), true)
    }

    /// A bound inferred from FinHub's behaviour rather than read from its clock: narrows the
    /// interval if it agrees with it, else is ignored. `at` is when it was learnt.
    pub fn infer(&self, lo_us: Option<i64>, hi_us: Option<i64>, at: SystemTime) -> bool {
        let sample = OffsetBounds {
            lo_us: lo_us.unwrap_or(i64::MIN),
            hi_us: hi_us.unwrap_or(i64::MAX),
        };
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        self.apply(&mut s, sample, Local::from_system(at), false)
    }

    fn apply(&self, s: &mut State, sample: OffsetBounds, at: Local, measured: bool) -> bool {
        if measured {
            s.samples = s.samples.saturating_add(1);
        }
        let next = match s.current(at) {
            None if measured => sample,
            // Nothing to narrow yet: an inferred bound alone is one-sided.
            None => return false,
            Some(cur) => match cur.intersect(&sample) {
                Some(b) => b,
                None if measured => {
                    s.resets = s.resets.saturating_add(1);
                    tracing::info!(
                        previous_offset_ms = cur.mid_us() / 1000,
                        new_offset_ms = sample.mid_us() / 1000,
                        "a reading of FinHub's clock contradicts the offset estimate (a clock was stepped?); starting over"
                    );
                    sample
                }
                None => return false,
            },
        };
        if s.bounds == Some(next) {
            return false;
        }
        s.bounds = Some(next);
        s.updated = at;
        self.lo_us.store(next.lo_us, Ordering::SeqCst);
        self.hi_us.store(next.hi_us, Ordering::SeqCst);
        self.updated_us.store(at.micros(), Ordering::SeqCst);
        self.known.store(true, Ordering::SeqCst);
        if let Some(g) = self.gauge.get() {
            g.set(next.mid_us() as f64 / 1e6);
        }
        true
    }

    /// Takes another replica's estimate `b` (a shared session's writer's): as a measurement
    /// when this replica has none of its own yet, else only to narrow its own where they agree
    /// (a follower that never logs in learns what the owner learnt). Returns whether used.
    pub fn adopt(&self, b: OffsetBounds, at: SystemTime) -> bool {
        if b.lo_us > b.hi_us {
            return false;
        }
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let measured = s.bounds.is_none();
        self.apply(&mut s, b, Local::from_system(at), measured)
    }

    /// The bounds now (lock-free): [`OffsetBounds::ZERO`] before FinHub's first `Date`.
    pub fn bounds(&self) -> OffsetBounds {
        self.bounds_at(SystemTime::now())
    }

    /// The bounds at `now` (lock-free, widened for the drift since they were last narrowed).
    pub fn bounds_at(&self, now: SystemTime) -> OffsetBounds {
        self.bounds_if_known(now).unwrap_or(OffsetBounds::ZERO)
    }

    fn bounds_if_known(&self, now: SystemTime) -> Option<OffsetBounds> {
        if !self.known.load(Ordering::SeqCst) {
            return None;
        }
        let b = OffsetBounds {
            lo_us: self.lo_us.load(Ordering::SeqCst),
            hi_us: self.hi_us.load(Ordering::SeqCst),
        };
        let updated = Local::from_micros(self.updated_us.load(Ordering::SeqCst));
        let age_s = Local::from_system(now).since(updated).max(0) / 1_000_000;
        Some(b.widened(age_s.saturating_mul(DRIFT_US_PER_S)))
    }

    /// For `/status`: `None` before the first `Date`.
    pub fn report(&self) -> Option<OffsetReport> {
        let s = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let b = s.current(Local::now())?;
        Some(OffsetReport {
            offset_seconds: b.mid_us() as f64 / 1e6,
            uncertainty_seconds: b.uncertainty_us() as f64 / 1e6,
            samples: s.samples,
            resets: s.resets,
        })
    }
}

/// The offset (`finhub - local`) at which FinHub's clock reads `finhub` when ours reads
/// `local`: a bound of the offset when one is known to be before or after the other.
pub fn offset_between(finhub: FinHubTime, local: Local) -> i64 {
    finhub.micros().saturating_sub(local.micros())
}

/// The offset interval from one whole-second reading `second` of a FinHub clock, taken between
/// `sent` and `received` (our clock); `None` when out of order or beyond a year.
pub fn second_sample(second: FinHubTime, sent: Local, received: Local) -> Option<OffsetBounds> {
    if received < sent {
        return None;
    }
    let b = OffsetBounds {
        lo_us: second.micros().saturating_sub(received.micros()),
        hi_us: second
            .plus_us(DATE_RESOLUTION_US)
            .micros()
            .saturating_sub(sent.micros()),
    };
    (b.lo_us.unsigned_abs() <= MAX_OFFSET_US.unsigned_abs()
        && b.hi_us.unsigned_abs() <= MAX_OFFSET_US.unsigned_abs())
    .then_some(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::from_unix_us;

    fn t(us: i64) -> SystemTime {
        from_unix_us(1_700_000_000_000_000 + us)
    }

    fn date(secs_after: i64) -> HeaderValue {
        HeaderValue::from_str(&httpdate::fmt_http_date(t(secs_after * 1_000_000))).unwrap()
    }

    #[test]
    fn one_date_gives_a_one_second_interval_around_the_truth() {
        let c = ClockOffset::new();
        assert_eq!(c.bounds_at(t(0)), OffsetBounds::ZERO);
        assert!(c.report().is_none());
        // FinHub is 3.4 s ahead; the request took 10 ms, sent at local 0.3 s.
        // FinHub read 3.7..3.71 s → Date says 3.
        assert!(c.observe(Some(&date(3)), t(300_000), t(310_000)));
        let b = c.bounds_at(t(0));
        assert_eq!(b.lo_us, 3_000_000 - 310_000);
        assert_eq!(b.hi_us, 4_000_000 - 300_000);
        assert!(b.lo_us <= 3_400_000 && 3_400_000 <= b.hi_us);
        assert_eq!(c.report().unwrap().samples, 1);
    }

    #[test]
    fn samples_at_other_phases_narrow_the_interval() {
        let c = ClockOffset::new();
        let truth = -2_250_000i64; // FinHub 2.25 s behind
        let mut local = 0i64;
        for step in 0..40 {
            // Answers at varied points of FinHub's second.
            local += 1_000_000 + 618_034;
            let sent = local;
            let received = local + 5_000;
            // FinHub answers halfway.
            let finhub = sent + 2_500 + truth;
            let d = finhub.div_euclid(1_000_000);
            c.observe(Some(&date(d)), t(sent), t(received));
            let b = c.bounds_at(t(0));
            assert!(b.lo_us <= truth && truth <= b.hi_us, "step {step}: {b:?}");
        }
        let b = c.bounds_at(t(0));
        assert!(b.hi_us - b.lo_us < 50_000, "narrowed: {b:?}");
        assert!((b.mid_us() - truth).abs() < 25_000);
    }

    #[test]
    fn another_replicas_estimate_is_taken_without_one_of_our_own_and_else_only_narrows() {
        let c = ClockOffset::new();
        let theirs = OffsetBounds {
            lo_us: 2_000_000,
            hi_us: 2_400_000,
        };
        // Nonsense is refused; a sane estimate is taken while we know nothing.
        assert!(!c.adopt(OffsetBounds { lo_us: 5, hi_us: 1 }, t(0)));
        assert!(c.adopt(theirs, t(0)));
        assert_eq!(c.bounds_at(t(0)), theirs);
        // Once we have our own, theirs never replaces it.
        let ours = ClockOffset::new();
        ours.observe(Some(&date(0)), t(0), t(1_000));
        let before = ours.bounds_at(t(0));
        assert!(!ours.adopt(theirs, t(0)));
        assert_eq!(ours.bounds_at(t(0)), before);
        // One that agrees narrows ours (a follower learns what the owner learnt).
        let narrower = OffsetBounds {
            lo_us: before.lo_us + 100_000,
            hi_us: before.hi_us - 100_000,
        };
        assert!(ours.adopt(narrower, t(0)));
        assert_eq!(ours.bounds_at(t(0)), narrower);
    }

    #[test]
    fn a_contradicting_date_starts_over_and_an_inferred_bound_never_does() {
        let c = ClockOffset::new();
        c.observe(Some(&date(0)), t(0), t(1_000));
        // Inferred: agrees → narrows.
        assert!(c.infer(Some(500_000), None, t(2_000)));
        assert_eq!(c.bounds_at(t(0)).lo_us, 500_000);
        // Inferred: contradicts → ignored.
        assert!(!c.infer(None, Some(-5_000_000), t(3_000)));
        assert_eq!(c.bounds_at(t(0)).lo_us, 500_000);
        // Measured: contradicts (FinHub's clock stepped 60 s ahead) → replaces.
        assert!(c.observe(Some(&date(70)), t(10_000_000), t(10_001_000)));
        let b = c.bounds_at(t(0));
        assert!(b.lo_us > 59_000_000 && b.hi_us <= 61_000_000, "{b:?}");
        assert_eq!(c.report().unwrap().resets, 1);
    }

    #[test]
    fn intervals_widen_with_age() {
        let c = ClockOffset::new();
        c.observe(Some(&date(0)), t(0), t(0));
        c.infer(Some(0), Some(10), t(0));
        // An hour later the interval has widened by 0.36 s each side.
        let s = c.state.lock().unwrap();
        let b = s.current(Local::from_system(t(3_600_000_000))).unwrap();
        assert_eq!(b.lo_us, -360_000);
        assert_eq!(b.hi_us, 10 + 360_000);
    }

    #[test]
    fn junk_never_counts() {
        let c = ClockOffset::new();
        for v in ["", "yesterday", "Sun, 06 Nov 1994 08:49:37 GMT"] {
            let h = HeaderValue::from_str(v).unwrap();
            assert!(!c.observe(Some(&h), t(0), t(1)), "{v}");
        }
        assert!(!c.observe(None, t(0), t(1)));
        // received before sent
        assert!(!c.observe(Some(&date(0)), t(10), t(0)));
        assert!(c.report().is_none());
        assert!(!c.infer(Some(1), Some(2), t(0)), "nothing to narrow yet");
    }

    #[test]
    fn the_gauge_follows_the_estimate() {
        let c = ClockOffset::new();
        let g = Gauge::new("x", "x").unwrap();
        c.set_gauge(g.clone());
        c.observe(Some(&date(10)), t(0), t(0));
        assert!((g.get() - 10.5).abs() < 1e-6);
    }
}
