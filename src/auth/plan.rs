//! When and how to renew: the refresh window on FinHub's clock, retry and backoff waits, the
//! spacing of forced renewals. Pure functions of times and counts.

use super::*;

/// What the next renewal does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    Login,
    Refresh,
}

/// A renewal step and when to take it (our clock, µs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Planned {
    pub(super) step: Step,
    pub(super) at_us: i64,
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
/// - never before `not_before_us`.
pub(super) fn plan(
    t: Timing,
    offset: OffsetBounds,
    refresh_at: f64,
    lead_us: i64,
    refreshable: bool,
    not_before_us: i64,
) -> Planned {
    let own = t.count_bounds();
    let (lo, hi) = if t.on_finhub_clock {
        (offset.lo_us, offset.hi_us)
    } else {
        (own.lo_us, own.hi_us)
    };
    let mid = lo + (hi - lo) / 2;
    let l = t.validity_us.max(1);
    let margin = t.margin_us();
    let lead = lead_us.clamp(0, l / 20);
    let unusable = t.usable_until_us(if t.on_finhub_clock { hi } else { 0 });
    let latest = unusable - lead;
    let tail = ((1.0 - refresh_at) * l as f64).round() as i64;
    let login = |at: i64| Planned {
        step: Step::Login,
        at_us: at.max(not_before_us),
    };
    if !refreshable {
        // At `refresh_at` on the earliest reading of FinHub's clock, and at least 3 % of the
        // validity before the token becomes unusable.
        return login(
            (t.expiry_us - hi - tail)
                .min(unusable - l * 3 / 100)
                .min(latest),
        );
    }
    let window = l / 10;
    let surely_open = t.window_opens_us() - lo;
    let at = if surely_open <= latest {
        (t.expiry_us - mid - tail).clamp(surely_open, latest)
    } else {
        // A "not refreshed" answer to a request sent at `p` proves the offset is below
        // `opens - p`, which moves `latest` to `p + step`: probes `step` apart end where the
        // window surely opens.
        let step = window - margin - lead;
        if step <= 0 {
            return login(latest);
        }
        let n = (surely_open - latest + step - 1) / step;
        surely_open - n * step
    };
    let at = at.max(not_before_us);
    if at > latest {
        login(latest)
    } else {
        Planned {
            step: Step::Refresh,
            at_us: at,
        }
    }
}

/// When FinHub's refresh window of a token with times `t` is surely open (our clock, µs)
/// given the offset `offset` of FinHub's clock ([`plan`]'s early probes end there).
pub(super) fn window_surely_open_us(t: Timing, offset: OffsetBounds) -> i64 {
    let lo = if t.on_finhub_clock {
        offset.lo_us
    } else {
        t.count_bounds().lo_us
    };
    t.window_opens_us() - lo
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

/// The earliest next renewal after a successful one at `now_us` (issue 28.3): at least a tenth
/// of the granted validity (and [`MIN_RENEWAL_SPACING`]) later, so FinHub's token timing can
/// never drive a renewal storm. When tokens keep arriving with their renewal already due
/// (`hot` in a row), the spacing doubles each time, but only up to the last moment a renewal
/// still lands in time (`latest_us`): the floor itself is never undercut.
pub(super) fn renewal_not_before(now_us: i64, validity: Duration, hot: u32, latest_us: i64) -> i64 {
    let floor = us((validity / 10).max(MIN_RENEWAL_SPACING));
    let backed_off = floor.saturating_mul(1i64 << hot.min(6));
    let backed_off = backed_off.min(latest_us.saturating_sub(now_us));
    now_us.saturating_add(backed_off.max(floor))
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
