//! When and how to renew: the refresh window on FinHub's clock, retry and backoff waits, the
//! spacing of forced renewals. Pure functions of times and counts.

use std::time::{Duration, SystemTime};

use super::client::AuthError;
use super::clock::OffsetBounds;
use super::expiry::Expiry;
use super::grant;
use super::session::{FinHubSession, Timing};
use crate::time::{us, Local};

/// The longest `Retry-After` from the auth endpoint that is honoured.
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);
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
/// Backoff while a usable token is held: full jitter, exponential from 500 ms to 30 s.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A rejected login (bad credentials) is retried after 30 s, doubling to 5 min, unless the
/// credentials change meanwhile.
const REJECTED_MIN: Duration = Duration::from_secs(30);
pub(super) const REJECTED_MAX: Duration = Duration::from_secs(300);

/// What the next renewal does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    Login,
    Refresh,
}

/// A renewal step and when to take it (on our clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Planned {
    pub(super) step: Step,
    pub(super) at: Local,
}

/// Plans the renewal of a session with times `t`, given FinHub's clock offset `offset`:
///
/// - `lead_us` is how long before the token becomes unusable a renewal must start to land in
///   time (a few auth round trips; capped at 5 % of the validity);
/// - with `refreshable`, a refresh inside FinHub's window: the window (the last 10 % of the
///   validity before `exp`, on FinHub's clock) surely open at `opens - lo` on our clock, the
///   token usable until `exp - hi - margin`. If the window surely opens in time, the refresh
///   goes at `refresh_at` of the validity (offset midpoint), clamped into that span. If the
///   offset is too uncertain for that, a probe goes early enough that a "not refreshed"
///   answer (which narrows the offset: FinHub's window had not opened yet) still leaves time
///   for the next step, and so on until the window surely opens;
/// - when no refresh can land before the token becomes unusable (or without `refreshable`),
///   a login, timed to land before then;
/// - never before `not_before`.
pub(super) fn plan(
    t: Timing,
    offset: OffsetBounds,
    refresh_at: f64,
    lead_us: i64,
    refreshable: bool,
    not_before: Local,
) -> Planned {
    let end = End::of(&t, offset);
    let l = t.validity_us.max(1);
    let margin = t.margin_us();
    let lead = lead_us.clamp(0, l / 20);
    let unusable = t.usable_until(offset);
    let latest = unusable.minus_us(lead);
    let tail = ((1.0 - refresh_at) * l as f64).round() as i64;
    let login = |at: Local| Planned {
        step: Step::Login,
        at: at.max(not_before),
    };
    if !refreshable {
        // At `refresh_at` on the earliest reading of FinHub's clock, and at least 3 % of the
        // validity before the token becomes unusable.
        return login(
            end.earliest
                .minus_us(tail)
                .min(unusable.minus_us(l * 3 / 100))
                .min(latest),
        );
    }
    let window = l / 10;
    let surely_open = end.latest.minus_us(t.validity_us / 10);
    let at = if surely_open <= latest {
        end.mid.minus_us(tail).clamp(surely_open, latest)
    } else {
        // A "not refreshed" answer to a request sent at `p` proves the offset is below
        // `opens - p`, which moves `latest` to `p + step`: probes `step` apart end where the
        // window surely opens.
        let step = window - margin - lead;
        if step <= 0 {
            return login(latest);
        }
        let n = (surely_open.since(latest) + step - 1) / step;
        surely_open.minus_us(n * step)
    };
    let at = at.max(not_before);
    if at > latest {
        login(latest)
    } else {
        Planned {
            step: Step::Refresh,
            at,
        }
    }
}

/// A session's expiry carried onto our clock: through FinHub's offset for its `exp`, through
/// FinHub's own count of what was left for an expiry on our clock.
struct End {
    earliest: Local,
    mid: Local,
    latest: Local,
}

impl End {
    fn of(t: &Timing, offset: OffsetBounds) -> End {
        match t.expiry {
            Expiry::FinHub(e) => End {
                earliest: offset.earliest_local(e),
                mid: offset.to_local(e),
                latest: offset.latest_local(e),
            },
            Expiry::Local(e) => {
                let own = t.count_bounds();
                End {
                    earliest: e.minus_us(own.hi_us),
                    mid: e.minus_us(own.mid_us()),
                    latest: e.minus_us(own.lo_us),
                }
            }
        }
    }
}

/// When FinHub's refresh window of a token with times `t` is surely open (our clock)
/// given the offset `offset` of FinHub's clock ([`plan`]'s early probes end there).
pub(super) fn window_surely_open(t: Timing, offset: OffsetBounds) -> Local {
    End::of(&t, offset).latest.minus_us(t.validity_us / 10)
}

/// Whether `session` can be refreshed (A3, A6): it carries the key, the environment has
/// refresh (`refresh_supported`, from [`crate::config::EnvRules`]), and FinHub still accepts
/// the token.
pub(super) fn can_refresh(
    refresh_supported: bool,
    session: &FinHubSession,
    now: SystemTime,
) -> bool {
    session.internal_token_key.is_some() && refresh_supported && session.is_usable(now)
}

/// Wait before retrying a failed login or refresh (not a rejected login: [`rejected_wait`]),
/// `failures` (≥ 1) in a row. `usable_for`: how long the tenant's token can still be renewed
/// in time, `None` when it has no usable token. `jitter` is uniform in `[0, 1)`.
///
/// `recovery` (`auth.recovery_interval`) is a floor, never undercut: FinHub sees at most one
/// attempt per interval from a tenant after a failure, refreshes and logins together (at the
/// default 3 s, at most 20 a minute).
/// - No usable token (apps are failing now): one attempt per interval, jittered above it by
///   up to a quarter, so apps recover within 1.25 intervals of FinHub's return.
/// - A usable token: exponential backoff with full jitter (500 ms to 30 s) above the floor,
///   awake in time to renew before the token becomes unusable where the floor allows.
/// - `Retry-After` (429, 503) is honoured either way, up to 15 minutes.
pub(super) fn retry_wait(
    failures: u32,
    err: &AuthError,
    usable_for: Option<Duration>,
    recovery: Duration,
    jitter: f64,
) -> Duration {
    if matches!(err, AuthError::Answer(grant::GrantError::AlreadyExpired)) {
        // FinHub keeps handing out tokens that are unusable on arrival (its clock or ours is
        // far off): logging in again at once would only repeat it, many times an hour.
        return rejected_wait(failures);
    }
    let asked = err
        .retry_after()
        .map(|r| r.min(MAX_RETRY_AFTER))
        .unwrap_or_default();
    let jitter = jitter.clamp(0.0, 1.0);
    let base = match usable_for {
        None => recovery.mul_f64(1.0 + RECOVERY_JITTER * jitter),
        Some(left) => BACKOFF_MIN
            .saturating_mul(1u32 << failures.saturating_sub(1).min(10))
            .min(BACKOFF_CAP)
            .mul_f64(jitter)
            .min(left),
    };
    base.max(recovery).max(asked)
}

/// The earliest next renewal after a successful one at `now` (issue 28.3): at least a tenth
/// of the granted validity (and [`MIN_RENEWAL_SPACING`]) later, so FinHub's token timing can
/// never drive a renewal storm. When tokens keep arriving with their renewal already due
/// (`hot` in a row), the spacing doubles each time, but only up to the last moment a renewal
/// still lands in time (`latest`): the floor itself is never undercut.
pub(super) fn renewal_not_before(now: Local, validity: Duration, hot: u32, latest: Local) -> Local {
    let floor = us((validity / 10).max(MIN_RENEWAL_SPACING));
    let backed_off = floor.saturating_mul(1i64 << hot.min(6));
    let backed_off = backed_off.min(latest.since(now));
    now.plus_us(backed_off.max(floor))
}

/// Wait after the `rejections`-th rejected login in a row: 30 s doubling to 5 min. FinHub locks
/// a user out after 5 failed logins (30 min), so bad credentials must not be hammered; the
/// session task still retries at once when the credential files change (see [`run_tenant`]).
pub(super) fn rejected_wait(rejections: u32) -> Duration {
    REJECTED_MIN
        .saturating_mul(1u32 << rejections.saturating_sub(1).min(10))
        .min(REJECTED_MAX)
}

/// The spacing after `streak` forced renewals in quick succession: 5 s, doubling, at most 5 min.
pub(super) fn forced_spacing(streak: u32) -> Duration {
    MIN_FORCED_INTERVAL
        .saturating_mul(1u32 << streak.min(8))
        .min(MAX_FORCED_INTERVAL)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::auth::client::AuthError;
    use crate::auth::clock::{ClockOffset, OffsetBounds};
    use crate::auth::expiry::Expiry;
    use crate::auth::grant;
    use crate::auth::renewer::{next_rtt, MAX_EARLY_REFRESHES};
    use crate::auth::session::tests::{at, grant, issued, BASE, S};
    use crate::auth::session::{FinHubSession, Timing};
    use crate::config::Environment;
    use crate::time::{from_unix_us, unix_us, us, FinHubTime, Local};
    use http::HeaderValue;

    #[test]
    fn forced_renewals_that_keep_coming_are_spaced_out() {
        assert_eq!(forced_spacing(0), Duration::from_secs(5));
        assert_eq!(forced_spacing(1), Duration::from_secs(10));
        assert_eq!(forced_spacing(3), Duration::from_secs(40));
        assert_eq!(forced_spacing(6), MAX_FORCED_INTERVAL);
        assert_eq!(forced_spacing(u32::MAX), MAX_FORCED_INTERVAL);
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

    fn timing(exp_s: i64, validity_s: i64) -> Timing {
        Timing {
            expiry: Expiry::FinHub(FinHubTime::from_micros(BASE + exp_s * S)),
            validity_us: validity_s * S,
            at_least: Local::MIN,
            at_most: Local::MAX,
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
        let p = plan(t, off, 0.92, 50_000, true, Local::from_micros(0));
        assert_eq!(p.step, Step::Refresh);
        // 92 % of 1800 s on FinHub's clock = 1656 s; 5 s later on ours.
        assert_eq!(p.at.micros(), BASE + 1656 * S + 5 * S);
        // Without the key: a login at the same point.
        let p = plan(t, off, 0.92, 50_000, false, Local::from_micros(0));
        assert_eq!((p.step, p.at.micros()), (Step::Login, BASE + 1661 * S));
    }

    #[test]
    fn refresh_at_is_clamped_into_the_window_fin_hub_surely_has_open() {
        // 6 s token; offset within ±50 ms; refresh_at 0.5 would be far too early.
        let t = timing(6, 6);
        let off = OffsetBounds {
            lo_us: -50_000,
            hi_us: 50_000,
        };
        let p = plan(t, off, 0.5, 30_000, true, Local::from_micros(0));
        assert_eq!(p.step, Step::Refresh);
        // The window opens at 5.4 s on FinHub's clock; surely open at 5.45 s on ours.
        assert_eq!(p.at.micros(), BASE + 5_450_000);
        // And 0.99 is clamped to the last moment a refresh still lands in time.
        let p = plan(t, off, 0.99, 30_000, true, Local::from_micros(0));
        let latest = BASE + 6 * S - 50_000 - 120_000 - 30_000;
        assert_eq!(p.at.micros(), latest);
    }

    #[test]
    fn an_uncertain_offset_probes_early_enough_to_recover_from_not_yet() {
        // 6 s token, one Date sample: offset within a second.
        let t = timing(6, 6);
        let off = OffsetBounds { lo_us: 0, hi_us: S };
        let lead = 30_000;
        let p = plan(t, off, 0.92, lead, true, Local::from_micros(0));
        assert_eq!(p.step, Step::Refresh);
        let step = 600_000 - 120_000 - lead;
        let surely_open = BASE + 5_400_000;
        assert_eq!((surely_open - p.at.micros()) % step, 0);
        // "Not refreshed" at p: the offset is below opens - p; the next plan is feasible.
        let hi = BASE + 5_400_000 - p.at.micros();
        let next = plan(
            t,
            OffsetBounds {
                lo_us: 0,
                hi_us: hi,
            },
            0.92,
            lead,
            true,
            Local::from_micros(p.at.micros() + 20_000),
        );
        assert_eq!(next.step, Step::Refresh);
        assert!(next.at.micros() > p.at.micros());
        assert!(next.at.micros() <= BASE + 6 * S - hi - 120_000 - lead);
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
        let p = plan(t, off, 0.92, 30_000, true, Local::from_micros(late));
        assert_eq!((p.step, p.at.micros()), (Step::Login, late));
        // Opaque token on our clock, no key: login at refresh_at.
        let t = Timing {
            expiry: Expiry::Local(Local::from_micros(BASE + 100 * S)),
            validity_us: 100 * S,
            at_least: Local::MIN,
            at_most: Local::MAX,
        };
        let p = plan(t, off, 0.92, 30_000, false, Local::from_micros(0));
        assert_eq!((p.step, p.at.micros()), (Step::Login, BASE + 92 * S));
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
        assert_eq!(
            renewal_not_before(Local::from_micros(0), v, 0, Local::from_micros(100 * S)).micros(),
            S
        );
        assert_eq!(
            renewal_not_before(
                Local::from_micros(0),
                Duration::from_secs(1800),
                0,
                Local::from_micros(3600 * S)
            )
            .micros(),
            180 * S
        );
        assert_eq!(
            renewal_not_before(Local::from_micros(0), v, 2, Local::from_micros(100 * S)).micros(),
            4 * S
        );
        assert_eq!(
            renewal_not_before(Local::from_micros(0), v, 20, Local::from_micros(100 * S)).micros(),
            64 * S
        );
        assert_eq!(
            renewal_not_before(Local::from_micros(0), v, 3, Local::from_micros(5 * S)).micros(),
            5 * S
        );
        assert_eq!(
            renewal_not_before(Local::from_micros(0), v, 3, Local::from_micros(0)).micros(),
            S
        );
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
        let p = plan(t, clock.bounds(), 0.92, 30_000, true, Local::from_micros(0));
        assert_eq!(p.step, Step::Refresh);
        assert!(p.at.micros() < BASE + 7 * S - 140_000 - 30_000, "{p:?}");
        // "Not refreshed": 1 s left at 7.2 s. The counts intersect: the end is within
        // [8.2 s, 8.01 s] ∩ … = it narrows, it does not move past the first count's end.
        s.note_remaining(Duration::from_secs(0), at(7_200_000), at(7_210_000));
        let t = s.timing();
        assert_eq!(t.at_least, Local::from_micros(BASE + 7_200_000));
        assert_eq!(t.at_most, Local::from_micros(BASE + 8_010_000));
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
                    Local::from_micros(BASE + not_before),
                );
                assert_eq!(
                    p.step,
                    Step::Refresh,
                    "offset {offset}: logged in after {early} early answers"
                );
                let sent = p.at.micros() - BASE;
                let finhub = BASE + sent + rtt / 2 + offset;
                let exp = s.finhub_expiry().map(FinHubTime::micros).unwrap();
                assert!(finhub < exp, "the refresh reached FinHub after exp");
                let date = HeaderValue::from_str(&httpdate::fmt_http_date(from_unix_us(
                    finhub.div_euclid(S) * S,
                )))
                .unwrap();
                clock.observe(Some(&date), at(sent), at(sent + rtt));
                let opens = s.window_opens().map(FinHubTime::micros).unwrap();
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
}
