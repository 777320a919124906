//! FinHub sessions: one per tenant, obtained and renewed in the background.
//!
//! Each tenant has a [`TenantSessions`] slot holding the current [`Session`] as an immutable
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
pub mod grant;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
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

/// The spacing after `streak` forced renewals in quick succession: 5 s, doubling, at most 5 min.
fn forced_spacing(streak: u32) -> Duration {
    MIN_FORCED_INTERVAL
        .saturating_mul(1u32 << streak.min(8))
        .min(MAX_FORCED_INTERVAL)
}
/// A JWT `exp` later than `expires_in` allows (plus its whole-second rounding) by more than
/// this is not believed: the answer's `expires_in` bounds it.
const EXPIRY_SANITY_SLACK: Duration = Duration::from_secs(2);
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

/// One FinHub session token and what the sidecar derived from it.
pub struct Session {
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
    /// `internalTokenKey` claim, needed to refresh (A3).
    pub internal_token_key: Option<Secret>,
    /// `refreshToken` from the login, kept but unused (A2).
    pub refresh_token: Option<Secret>,
    /// Publication number within its tenant (1 for the first session), set when published.
    pub generation: u64,
    /// Expiry, µs since the epoch: on FinHub's clock if `on_finhub_clock`, else on ours.
    expiry_us: AtomicI64,
    /// Whether `expiry_us` is FinHub's `exp` (JWT) rather than `expires_in` from our clock.
    on_finhub_clock: bool,
    /// Whether the JWT has both `iat` and `exp`, so FinHub's window is known exactly.
    window_known: bool,
    clock: Arc<ClockOffset>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("session_id", &self.session_id)
            .field("expires_at", &self.expires_at())
            .field("refreshable", &self.internal_token_key.is_some())
            .finish_non_exhaustive()
    }
}

/// Where a session's expiry comes from (pure; [`Session::from_grant`] uses it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expiry {
    /// µs since the epoch.
    at_us: i64,
    /// On FinHub's clock (JWT `exp`) rather than ours (`expires_in`).
    on_finhub_clock: bool,
    /// FinHub's validity (`exp - iat`, else `expires_in`), µs.
    validity_us: i64,
    /// `exp` was later than `expires_in` allows and was capped.
    capped: bool,
}

/// The expiry rule (§4.3, issue 14): the JWT `exp` is the truth. `expires_in` is whole seconds
/// counted when FinHub answered, so the token lives up to a second longer than it says: it is
/// not a reason to expire early, only a sanity bound on an `exp` far beyond it. Without `exp`,
/// `expires_in` from the moment the request was sent; without either, a fallback lifetime.
fn choose_expiry(
    claims: &Claims,
    expires_in: Option<Duration>,
    sent: SystemTime,
    received: SystemTime,
    offset: OffsetBounds,
) -> Expiry {
    let (sent, received) = (unix_us(sent), unix_us(received));
    match (claims.exp.map(unix_us), expires_in.map(us)) {
        (Some(exp), expires_in) => {
            // Latest FinHub time of the answer, plus what it said was left.
            let bound = expires_in.map(|e| {
                received
                    .saturating_add(offset.hi_us)
                    .saturating_add(e)
                    .saturating_add(1_000_000 + us(EXPIRY_SANITY_SLACK))
            });
            let latest = received
                .saturating_add(offset.hi_us)
                .saturating_add(us(grant::MAX_LIFETIME));
            let cap = bound.unwrap_or(latest).min(latest);
            let at_us = exp.min(cap);
            let validity_us = match (claims.iat.map(unix_us), expires_in) {
                (Some(iat), _) if iat < exp => exp - iat,
                (_, Some(e)) => e,
                _ => exp - sent.saturating_add(offset.mid_us()),
            };
            Expiry {
                at_us,
                on_finhub_clock: true,
                // Like every lifetime believed from FinHub, at most a day.
                validity_us: validity_us.clamp(0, us(grant::MAX_LIFETIME)),
                capped: at_us < exp,
            }
        }
        (None, Some(e)) => Expiry {
            at_us: sent.saturating_add(e),
            on_finhub_clock: false,
            validity_us: e,
            capped: false,
        },
        (None, None) => Expiry {
            at_us: sent.saturating_add(us(FALLBACK_LIFETIME)),
            on_finhub_clock: false,
            validity_us: us(FALLBACK_LIFETIME),
            capped: false,
        },
    }
}

impl Session {
    /// Builds a session from a grant whose request was sent at `sent` and answered at
    /// `received` (our clock); `clock` is FinHub's clock as estimated so far (the answer's
    /// own `Date` already included).
    pub fn from_grant(
        grant: Grant,
        sent: SystemTime,
        received: SystemTime,
        clock: &Arc<ClockOffset>,
    ) -> Session {
        let claims = Claims::of(grant.token.expose());
        let expiry = choose_expiry(
            &claims,
            grant.expires_in,
            sent,
            received,
            clock.bounds_at(received),
        );
        if expiry.capped {
            tracing::warn!(
                "the token's exp is later than the answer's expires_in allows; using expires_in"
            );
        }
        let session_id = grant
            .session_id
            .or(claims.session_id)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        Session {
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
            expiry_us: AtomicI64::new(expiry.at_us),
            on_finhub_clock: expiry.on_finhub_clock,
            window_known: expiry.on_finhub_clock && claims.iat.is_some() && !expiry.capped,
            clock: clock.clone(),
        }
    }

    fn timing(&self) -> Timing {
        Timing {
            expiry_us: self.expiry_us.load(Ordering::SeqCst),
            on_finhub_clock: self.on_finhub_clock,
            validity_us: us(self.validity),
        }
    }

    /// Whether the token may still be sent at `now`: it is valid at FinHub for at least the
    /// expiry margin more, whatever FinHub's clock offset within its known bounds.
    pub fn is_usable(&self, now: SystemTime) -> bool {
        let t = self.timing();
        unix_us(now) < t.usable_until_us(self.clock.hi_us(now))
    }

    /// When FinHub considers the token expired, on our clock (earliest estimate).
    pub fn expires_at(&self) -> SystemTime {
        let t = self.timing();
        let hi = if t.on_finhub_clock {
            self.clock.hi_us(SystemTime::now())
        } else {
            0
        };
        from_unix_us(t.expiry_us.saturating_sub(hi))
    }

    /// The JWT's `exp` (on FinHub's clock), if the expiry comes from it.
    pub fn finhub_expiry(&self) -> Option<SystemTime> {
        self.on_finhub_clock
            .then(|| from_unix_us(self.expiry_us.load(Ordering::SeqCst)))
    }

    /// The validity FinHub granted (see [`Session::validity`]).
    pub fn lifetime(&self) -> Duration {
        self.validity
    }

    /// FinHub's refresh window opens here, on FinHub's clock (µs), when that is known exactly.
    fn window_opens_us(&self) -> Option<i64> {
        self.window_known.then(|| self.timing().window_opens_us())
    }

    /// Whether FinHub may still consider the token valid at `now` (something to log out).
    fn may_be_valid(&self, now: SystemTime) -> bool {
        let t = self.timing();
        let lo = if t.on_finhub_clock {
            self.clock.bounds_at(now).lo_us
        } else {
            0
        };
        unix_us(now) < t.expiry_us.saturating_sub(lo)
    }

    /// A "not refreshed, still valid" answer said `remaining` (whole seconds, floored) was
    /// left when FinHub answered a request sent at `sent` and received at `received`. For an
    /// opaque token that is its new expiry; for a JWT, whose `exp` stays the truth, a bound:
    /// an `exp` beyond what FinHub now says is capped, as at login.
    fn note_remaining(&self, remaining: Duration, sent: SystemTime, received: SystemTime) {
        let r = us(remaining);
        if self.on_finhub_clock {
            let bound = unix_us(received)
                .saturating_add(self.clock.hi_us(received))
                .saturating_add(r)
                .saturating_add(1_000_000 + us(EXPIRY_SANITY_SLACK));
            if self.expiry_us.fetch_min(bound, Ordering::SeqCst) > bound {
                tracing::warn!(
                    "FinHub reports less validity left than the token's exp; using its answer"
                );
            }
        } else {
            self.expiry_us
                .store(unix_us(sent).saturating_add(r), Ordering::SeqCst);
        }
    }
}

fn sensitive(v: &str) -> HeaderValue {
    // A token with bytes that are not valid in a header cannot be sent; an empty value makes
    // FinHub answer 401, which is the right failure.
    let mut h = HeaderValue::from_str(v).unwrap_or_else(|_| HeaderValue::from_static(""));
    h.set_sensitive(true);
    h
}

/// A session's times, for the planning arithmetic (µs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timing {
    expiry_us: i64,
    on_finhub_clock: bool,
    validity_us: i64,
}

impl Timing {
    fn margin_us(&self) -> i64 {
        us(EXPIRY_MARGIN).min(self.validity_us / 50)
    }

    /// The last moment (our clock) the token may be sent, given the offset's upper bound.
    fn usable_until_us(&self, hi_us: i64) -> i64 {
        let hi = if self.on_finhub_clock { hi_us } else { 0 };
        self.expiry_us
            .saturating_sub(hi)
            .saturating_sub(self.margin_us())
    }

    /// FinHub's 10 % window opens here (on the expiry's clock).
    fn window_opens_us(&self) -> i64 {
        self.expiry_us - self.validity_us / 10
    }
}

/// What the next renewal does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Login,
    Refresh,
}

/// A renewal step and when to take it (our clock, µs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Planned {
    step: Step,
    at_us: i64,
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
fn plan(
    t: Timing,
    offset: OffsetBounds,
    refresh_at: f64,
    lead_us: i64,
    refreshable: bool,
    not_before_us: i64,
) -> Planned {
    let (lo, hi) = if t.on_finhub_clock {
        (offset.lo_us, offset.hi_us)
    } else {
        (0, 0)
    };
    let mid = lo + (hi - lo) / 2;
    let l = t.validity_us.max(1);
    let margin = t.margin_us();
    let lead = lead_us.clamp(0, l / 20);
    let unusable = t.usable_until_us(hi);
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

/// One tenant's session slot.
pub struct TenantSessions {
    /// The tenant.
    pub tenant: TenantConfig,
    /// Position in the configuration (index for per-tenant tables such as rate limits).
    pub index: usize,
    current: ArcSwapOption<Session>,
    renew_now: Notify,
    /// Generation of the session FinHub refused (0: none), set by the request path.
    forced: AtomicU64,
    /// Bumped on every publish; request paths waiting for a renewal watch it.
    published: watch::Sender<u64>,
    status: Mutex<TenantStatus>,
    /// Set once logout begins: the session task stops renewing.
    ending: watch::Sender<bool>,
    /// Held for each login/refresh call and by logout (so logout ends what was renewed last).
    flight: tokio::sync::Mutex<()>,
    /// When the session task next calls FinHub (µs since the epoch, our clock; 0: unknown).
    next_attempt_us: AtomicI64,
}

/// What `/status` shows about a tenant (no secrets).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TenantStatus {
    /// Result of the last login or refresh (`ok`, `not_refreshed`, `rejected`, ...).
    pub last_result: Option<&'static str>,
    /// When that happened, Unix seconds.
    pub last_attempt_unix: Option<u64>,
    /// Consecutive failures.
    pub failures: u32,
}

impl TenantSessions {
    fn new(tenant: TenantConfig, index: usize) -> Self {
        TenantSessions {
            tenant,
            index,
            current: ArcSwapOption::empty(),
            renew_now: Notify::new(),
            forced: AtomicU64::new(0),
            published: watch::Sender::new(0),
            status: Mutex::new(TenantStatus::default()),
            ending: watch::Sender::new(false),
            flight: tokio::sync::Mutex::new(()),
            next_attempt_us: AtomicI64::new(0),
        }
    }

    /// The current session if it may be sent now.
    pub fn usable(&self, now: SystemTime) -> Option<Arc<Session>> {
        self.current.load_full().filter(|s| s.is_usable(now))
    }

    /// The current session, usable or not.
    pub fn current(&self) -> Option<Arc<Session>> {
        self.current.load_full()
    }

    /// FinHub refused `refused`: ask the background task to renew now, unless a newer session
    /// is already published (then the caller should just use it). Many refusals of the same
    /// session coalesce into one renewal (single flight).
    pub fn request_renewal(&self, refused: &Arc<Session>) {
        if refused.generation == self.generation() {
            self.forced.store(refused.generation, Ordering::SeqCst);
            self.renew_now.notify_one();
        }
    }

    /// Generation of the current session (0 before the first).
    fn generation(&self) -> u64 {
        *self.published.borrow()
    }

    /// Whether a renewal request for the current session is pending (stale ones are dropped).
    fn forced_pending(&self) -> bool {
        let g = self.forced.load(Ordering::SeqCst);
        if g != 0 && g != self.generation() {
            self.forced.store(0, Ordering::SeqCst);
            return false;
        }
        g != 0
    }

    /// Waits up to `within` for a usable session other than `old`.
    pub async fn newer_than(&self, old: &Arc<Session>, within: Duration) -> Option<Arc<Session>> {
        let mut rx = self.published.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(cur) = self.usable(SystemTime::now()) {
                if !Arc::ptr_eq(&cur, old) {
                    return Some(cur);
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// How long until the session task next calls FinHub (for an app's `Retry-After` while
    /// the tenant has no usable session); `None` when not known or ending.
    pub fn next_attempt_in(&self, now: SystemTime) -> Option<Duration> {
        let at = self.next_attempt_us.load(Ordering::SeqCst);
        (at != 0 && !self.is_ending())
            .then(|| Duration::from_micros((at - unix_us(now)).max(0) as u64))
    }

    /// Whether logout has begun (no renewal from then on).
    pub fn is_ending(&self) -> bool {
        *self.ending.borrow()
    }

    /// Last login/refresh outcome, for `/status`.
    pub fn status(&self) -> TenantStatus {
        match self.status.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn record(&self, result: &'static str, ok: bool) {
        let mut s = match self.status.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        s.last_result = Some(result);
        s.last_attempt_unix = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        s.failures = if ok { 0 } else { s.failures.saturating_add(1) };
    }

    /// Publishes `s` as the current session (unit tests of the request path).
    #[cfg(test)]
    pub(crate) fn publish_for_test(&self, s: Session) {
        self.publish(s);
    }

    fn publish(&self, mut s: Session) {
        s.generation = self.generation() + 1;
        let generation = s.generation;
        self.current.store(Some(Arc::new(s)));
        self.published.send_modify(|g| *g = generation);
    }
}

/// All tenants' session slots (configuration order) and FinHub's clock. Requests find their
/// tenant through `tenant::Tenants`.
pub struct SessionTable {
    all: Vec<Arc<TenantSessions>>,
    clock: Arc<ClockOffset>,
}

impl SessionTable {
    /// One empty slot per configured tenant.
    pub fn new(config: &Config) -> Self {
        let all: Vec<_> = config
            .tenants
            .iter()
            .enumerate()
            .map(|(i, t)| Arc::new(TenantSessions::new(t.clone(), i)))
            .collect();
        SessionTable {
            all,
            clock: Arc::new(ClockOffset::new()),
        }
    }

    /// Every tenant, in configuration order.
    pub fn tenants(&self) -> &[Arc<TenantSessions>] {
        &self.all
    }

    /// FinHub's clock as estimated from its `Date` headers. The proxy may feed it from API
    /// answers too ([`ClockOffset::observe`]).
    pub fn clock(&self) -> &Arc<ClockOffset> {
        &self.clock
    }
}

/// Whether `session` can be refreshed (A3, A6): it carries the key, the environment has
/// refresh (`refresh_supported`, from [`crate::config::EnvRules`]), and FinHub still accepts
/// the token.
fn can_refresh(refresh_supported: bool, session: &Session, now: SystemTime) -> bool {
    session.internal_token_key.is_some() && refresh_supported && session.is_usable(now)
}

/// Wait before retrying a failed login or refresh (not a rejected login: [`rejected_wait`]),
/// `failures` (≥ 1) in a row. `usable_for`: how long the tenant's token can still be renewed
/// in time, `None` when it has no usable token. `jitter` is uniform in `[0, 1)`.
///
/// - No usable token (apps are failing now): one attempt per recovery step, jittered within
///   its second half, so apps recover within one step of FinHub's return.
/// - A usable token: exponential backoff with full jitter (500 ms to 30 s), but awake in time
///   to renew before the token becomes unusable.
/// - `Retry-After` (429, 503) is honoured either way, up to 15 minutes.
fn retry_wait(
    failures: u32,
    err: &AuthError,
    usable_for: Option<Duration>,
    recovery: Duration,
    jitter: f64,
) -> Duration {
    let asked = err
        .retry_after()
        .map(|r| r.min(MAX_RETRY_AFTER))
        .unwrap_or_default();
    let base = match usable_for {
        None => recovery.mul_f64(0.5 + 0.5 * jitter),
        Some(left) => BACKOFF_MIN
            .saturating_mul(1u32 << failures.saturating_sub(1).min(10))
            .min(BACKOFF_CAP)
            .mul_f64(jitter)
            .min(left)
            .max(Duration::from_millis(100)),
    };
    base.max(asked)
}

/// Wait after the `rejections`-th rejected login in a row: 30 s doubling to 5 min. FinHub locks
/// a user out after 5 failed logins (30 min), so bad credentials must not be hammered; the
/// session task still retries at once when the credential files change (see [`run_tenant`]).
fn rejected_wait(rejections: u32) -> Duration {
    REJECTED_MIN
        .saturating_mul(1u32 << rejections.saturating_sub(1).min(10))
        .min(REJECTED_MAX)
}

/// Label value of an auth outcome for metrics and `/status`.
fn result_label<T>(r: &Result<T, AuthError>, not_yet: bool) -> &'static str {
    match r {
        Ok(_) if not_yet => "not_refreshed",
        Ok(_) => "ok",
        Err(e) => error_label(e),
    }
}

fn error_label(e: &AuthError) -> &'static str {
    match e {
        AuthError::Rejected(_) => "rejected",
        AuthError::RateLimited { .. } => "rate_limited",
        _ => "error",
    }
}

/// Resolves once `ending` is set (or its sender is gone).
async fn ended(ending: &mut watch::Receiver<bool>) {
    // The guard returned by `wait_for` is not `Send`; drop it right here.
    let _ = ending.wait_for(|e| *e).await.map(|_| ());
}

/// Why the session task woke up.
#[derive(Debug, PartialEq, Eq)]
enum Wake {
    Due,
    End,
}

/// Sleeps until `at_us` (our clock), a forced renewal (unless `backing_off`: a backoff is
/// never shortened, so rejected credentials are not hammered; a forced renewal waits until
/// `forced_earliest`, see [`forced_spacing`]), or the end.
async fn sleep_until(
    slot: &TenantSessions,
    ending: &mut watch::Receiver<bool>,
    at_us: i64,
    backing_off: bool,
    forced_earliest: Option<Instant>,
) -> Wake {
    // Plans are at most a lifetime (a day) away; the cap only keeps `Instant` arithmetic sane.
    let wait =
        Duration::from_micros(at_us.saturating_sub(unix_us(SystemTime::now())).max(0) as u64)
            .min(2 * grant::MAX_LIFETIME);
    let mut deadline = Instant::now() + wait;
    loop {
        tokio::select! {
            _ = ended(ending) => return Wake::End,
            _ = tokio::time::sleep_until(deadline.into()) => return Wake::Due,
            _ = slot.renew_now.notified() => {
                if backing_off || !slot.forced_pending() {
                    continue;
                }
                match forced_earliest {
                    Some(earliest) if earliest > Instant::now() => {
                        deadline = deadline.min(earliest);
                    }
                    _ => return Wake::Due,
                }
            }
        }
    }
}

/// Smoothed auth round trip: rises at once, decays slowly.
fn next_rtt(rtt_us: i64, sent: SystemTime, received: SystemTime) -> i64 {
    let last = unix_us(received) - unix_us(sent);
    if last >= rtt_us {
        last
    } else {
        (rtt_us * 7 + last * 3) / 10
    }
}

/// The per-tenant renewal loop's state.
struct Renewer {
    slot: Arc<TenantSessions>,
    client: Arc<AuthClient>,
    auth: AuthConfig,
    metrics: Metrics,
    tenant_id: String,
    /// Transient failures in a row.
    failures: u32,
    /// Rejected logins in a row.
    rejections: u32,
    /// After a rejected login: the credentials' fingerprint and the earliest retry (µs).
    rejected: Option<(u64, i64)>,
    /// "Not refreshed" answers for the current session.
    early: u32,
    /// Smoothed auth round trip, µs.
    rtt_us: i64,
    last_forced: Option<Instant>,
    /// Forced renewals in quick succession (each within 4 spacings of the one before).
    forced_streak: u32,
}

impl Renewer {
    fn count(&self, kind: &str, result: &str) {
        self.metrics
            .auth_requests
            .with_label_values(&[self.tenant_id.as_str(), kind, result])
            .inc();
    }

    fn lead_us(&self) -> i64 {
        3 * self.rtt_us + 20_000
    }

    /// When to renew `s` (and how), not before `not_before_us`.
    fn plan_for(&self, s: &Session, not_before_us: i64) -> Planned {
        let refreshable = can_refresh(self.client.rules().refresh_supported, s, SystemTime::now());
        let p = plan(
            s.timing(),
            self.client.clock().bounds(),
            self.auth.refresh_at,
            self.lead_us(),
            refreshable,
            not_before_us,
        );
        if p.step == Step::Refresh && self.early >= MAX_EARLY_REFRESHES {
            // FinHub keeps saying "not yet": log in before the token becomes unusable.
            return plan(
                s.timing(),
                self.client.clock().bounds(),
                self.auth.refresh_at,
                self.lead_us(),
                false,
                not_before_us,
            );
        }
        p
    }

    /// How long the current token can still be renewed in time, if it is usable.
    fn usable_for(&self, current: Option<&Session>, now: SystemTime) -> Option<Duration> {
        let s = current.filter(|s| s.is_usable(now))?;
        let latest = s.timing().usable_until_us(self.client.clock().hi_us(now)) - self.lead_us();
        Some(Duration::from_micros((latest - unix_us(now)).max(0) as u64))
    }

    fn jitter() -> f64 {
        rand::rng().random_range(0.0..1.0)
    }

    async fn run(mut self) {
        let mut ending = self.slot.ending.subscribe();
        let mut next = Planned {
            step: Step::Login,
            at_us: unix_us(SystemTime::now()),
        };
        loop {
            self.slot
                .next_attempt_us
                .store(next.at_us, Ordering::SeqCst);
            let backing_off = self.failures > 0 || self.rejected.is_some();
            if sleep_until(
                &self.slot,
                &mut ending,
                next.at_us,
                backing_off,
                self.last_forced
                    .map(|t| t + forced_spacing(self.forced_streak)),
            )
            .await
                == Wake::End
            {
                return;
            }
            let forced = self.slot.forced_pending();
            self.slot.forced.store(0, Ordering::SeqCst);
            if forced {
                let now = Instant::now();
                self.forced_streak = match self.last_forced {
                    Some(t) if now - t < forced_spacing(self.forced_streak) * 4 => {
                        self.forced_streak.saturating_add(1)
                    }
                    _ => 0,
                };
                self.last_forced = Some(now);
            }
            let now = SystemTime::now();
            if let Some((fingerprint, until)) = self.rejected {
                if unix_us(now) < until
                    && self.client.credentials_fingerprint(&self.slot.tenant) == fingerprint
                {
                    // Same credentials as the rejected ones: keep waiting (looking again
                    // every recovery step for a rotated secret).
                    next.at_us = until.min(unix_us(now) + us(self.auth.recovery_interval));
                    continue;
                }
            }
            let slot = self.slot.clone();
            let guard = slot.flight.lock().await;
            if slot.is_ending() {
                return;
            }
            let current = self.slot.current();
            next = match current.as_deref() {
                Some(s)
                    if can_refresh(self.client.rules().refresh_supported, s, now)
                        && (forced || next.step == Step::Refresh) =>
                {
                    match self.refresh(s, forced).await {
                        Some(planned) => planned,
                        None => self.login(current.as_deref()).await,
                    }
                }
                _ => self.login(current.as_deref()).await,
            };
            drop(guard);
        }
    }

    /// One refresh call; `None` when a login should follow at once.
    async fn refresh(&mut self, s: &Session, forced: bool) -> Option<Planned> {
        let r = self.client.refresh(&self.slot.tenant, s).await;
        let not_yet = matches!(r, Ok(Refreshed::NotYet { .. }));
        let label = result_label(&r, not_yet);
        self.count("refresh", label);
        let now = SystemTime::now();
        match r {
            Ok(Refreshed::NotYet { .. }) if forced => {
                // FinHub refused the token on an API call but the refresh endpoint still
                // considers it current: only a fresh login helps.
                tracing::warn!(tenant = %self.tenant_id, "FinHub refused the session but would not refresh it; logging in again");
                None
            }
            Ok(Refreshed::NotYet {
                remaining,
                sent,
                received,
            }) => {
                self.rtt_us = next_rtt(self.rtt_us, sent, received);
                if let Some(opens) = s.window_opens_us() {
                    // FinHub's window had not opened when it answered.
                    self.client
                        .clock()
                        .infer(None, Some(opens - unix_us(sent)), received);
                }
                if let Some(r) = remaining {
                    s.note_remaining(r, sent, received);
                }
                self.early += 1;
                self.failures = 0;
                self.slot.record(label, true);
                let min_step = (us(s.validity) / 200).max(20_000);
                let p = self.plan_for(s, unix_us(now) + min_step);
                tracing::debug!(
                    tenant = %self.tenant_id,
                    next = ?p.step,
                    in_ms = (p.at_us - unix_us(now)) / 1000,
                    "FinHub kept the current token (its refresh window had not opened)"
                );
                Some(p)
            }
            Ok(Refreshed::New(new)) => {
                if let Some(opens) = s.window_opens_us() {
                    // FinHub's window was open when it answered.
                    self.client.clock().infer(
                        Some(opens - unix_us(new.received_at)),
                        None,
                        new.received_at,
                    );
                }
                Some(self.publish(*new, Step::Refresh))
            }
            Err(e @ AuthError::Rejected(_)) => {
                tracing::warn!(tenant = %self.tenant_id, error = %e, "refresh refused; logging in again");
                None
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                self.slot.record(label, false);
                let usable_for = self.usable_for(Some(s), now);
                let wait = retry_wait(
                    self.failures,
                    &e,
                    usable_for,
                    self.auth.recovery_interval,
                    Self::jitter(),
                );
                tracing::warn!(
                    tenant = %self.tenant_id,
                    error = %e,
                    attempt = self.failures,
                    retry_in_ms = wait.as_millis() as u64,
                    "refresh failed; retrying"
                );
                let at = unix_us(now) + us(wait);
                Some(match usable_for {
                    Some(left) if wait <= left => Planned {
                        step: Step::Refresh,
                        at_us: at,
                    },
                    // No refresh can land in time any more: log in instead.
                    _ => Planned {
                        step: Step::Login,
                        at_us: at,
                    },
                })
            }
        }
    }

    /// One login call.
    async fn login(&mut self, current: Option<&Session>) -> Planned {
        let r = self.client.login(&self.slot.tenant).await;
        let now = SystemTime::now();
        // A token that is already (nearly) expired on arrival (clock trouble, absurd lifetime)
        // is a failure to back off from, not a reason to log in again at once.
        let r = r.and_then(|s| {
            if !s.is_usable(now) || s.lifetime() < Duration::from_secs(1) {
                Err(AuthError::Answer(grant::GrantError::AlreadyExpired))
            } else {
                Ok(s)
            }
        });
        let label = result_label(&r, false);
        self.count("login", label);
        match r {
            Ok(s) => {
                self.rtt_us = next_rtt(self.rtt_us, s.obtained_at, s.received_at);
                self.publish(s, Step::Login)
            }
            Err(e @ AuthError::Rejected(_)) => {
                self.slot.record(label, false);
                self.rejections = self.rejections.saturating_add(1);
                let wait = rejected_wait(self.rejections);
                let until = unix_us(now) + us(wait);
                self.rejected = Some((
                    self.client.credentials_fingerprint(&self.slot.tenant),
                    until,
                ));
                tracing::error!(
                    tenant = %self.tenant_id,
                    error = %e,
                    retry_in_ms = wait.as_millis() as u64,
                    "FinHub rejected the login: check this tenant's credentials (retried sooner if they change)"
                );
                Planned {
                    step: Step::Login,
                    at_us: until.min(unix_us(now) + us(self.auth.recovery_interval)),
                }
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                self.slot.record(label, false);
                let wait = retry_wait(
                    self.failures,
                    &e,
                    self.usable_for(current, now),
                    self.auth.recovery_interval,
                    Self::jitter(),
                );
                tracing::warn!(
                    tenant = %self.tenant_id,
                    error = %e,
                    attempt = self.failures,
                    retry_in_ms = wait.as_millis() as u64,
                    "login failed; retrying"
                );
                Planned {
                    step: Step::Login,
                    at_us: unix_us(now) + us(wait),
                }
            }
        }
    }

    /// Publishes a new session (the old one served until this moment) and plans its renewal.
    fn publish(&mut self, s: Session, via: Step) -> Planned {
        self.failures = 0;
        self.rejections = 0;
        self.rejected = None;
        self.early = 0;
        self.slot.record("ok", true);
        let offset = self.client.clock().bounds();
        tracing::info!(
            tenant = %self.tenant_id,
            via = ?via,
            lifetime_ms = s.lifetime().as_millis() as u64,
            refreshable = s.internal_token_key.is_some(),
            finhub_clock_offset_ms = offset.mid_us() / 1000,
            finhub_clock_uncertainty_ms = offset.uncertainty_us() / 1000,
            "session renewed"
        );
        self.metrics
            .session_expiration
            .with_label_values(&[self.tenant_id.as_str()])
            .set(unix_secs(s.expires_at()));
        self.slot.publish(s);
        match self.slot.current() {
            Some(s) => self.plan_for(&s, unix_us(SystemTime::now())),
            None => Planned {
                step: Step::Login,
                at_us: unix_us(SystemTime::now()),
            },
        }
    }
}

/// Keeps `slot`'s session alive until the process ends or logout begins. This task is the
/// only place a tenant's login or refresh happens, so they are single-flight by construction.
///
/// Rejected logins and recovery: while the tenant has no usable session, transient failures
/// are retried every `auth.recovery_interval`; a *rejected* login (bad credentials) is not —
/// FinHub locks a user after 5 failed logins — but waits 30 s doubling to 5 min, except that
/// the credential files are looked at every recovery step and a changed secret is tried at
/// once (a rotated password recovers within one step, an unchanged bad one is never
/// hammered).
pub async fn run_tenant(
    slot: Arc<TenantSessions>,
    client: Arc<AuthClient>,
    auth: AuthConfig,
    metrics: Metrics,
) {
    let tenant_id = slot.tenant.id.clone();
    Renewer {
        slot,
        client,
        auth,
        metrics,
        tenant_id,
        failures: 0,
        rejections: 0,
        rejected: None,
        early: 0,
        rtt_us: 0,
        last_forced: None,
        forced_streak: 0,
    }
    .run()
    .await
}

/// Ends every tenant's session at FinHub (graceful shutdown, after the drain): stops the
/// renewals, waits for a renewal in flight, unpublishes the session (requests arriving from
/// now on get 503 `session_unavailable` rather than a token being revoked) and calls logout.
/// Best-effort and bounded: everything together gives up after `within`; each outcome is
/// logged and counted (`auth_requests_total{kind="logout"}`).
pub async fn logout_all(
    table: Arc<SessionTable>,
    client: Arc<AuthClient>,
    metrics: Metrics,
    within: Duration,
) {
    let deadline = tokio::time::Instant::now() + within;
    let mut tasks = tokio::task::JoinSet::new();
    for slot in table.tenants().iter().cloned() {
        let (client, metrics) = (client.clone(), metrics.clone());
        tasks.spawn(async move {
            slot.ending.send_replace(true);
            let started = Instant::now();
            let tenant = slot.tenant.id.as_str();
            let ended = tokio::time::timeout_at(deadline, async {
                let _flight = slot.flight.lock().await;
                let session = slot.current.swap(None)?;
                if !session.may_be_valid(SystemTime::now()) {
                    return None;
                }
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                Some(client.logout(&slot.tenant, &session, left).await)
            })
            .await;
            let took_ms = started.elapsed().as_millis() as u64;
            let result = match &ended {
                Ok(None) => {
                    tracing::info!(tenant, "no valid session to log out");
                    return;
                }
                Ok(Some(Ok(cleared))) => {
                    tracing::info!(tenant, took_ms, cleared = ?cleared, "session logged out");
                    "ok"
                }
                Ok(Some(Err(e))) if !matches!(e, AuthError::Timeout) => {
                    tracing::warn!(tenant, took_ms, error = %e, "logout failed; stopping anyway");
                    error_label(e)
                }
                _ => {
                    tracing::warn!(
                        tenant,
                        took_ms,
                        "logout did not finish within auth.logout_timeout; stopping anyway"
                    );
                    "timeout"
                }
            };
            metrics
                .auth_requests
                .with_label_values(&[tenant, "logout", result])
                .inc();
        });
    }
    while tasks.join_next().await.is_some() {}
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
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
    fn issued(clock: &Arc<ClockOffset>, offset: i64, sent: i64, rtt: i64, life_s: i64) -> Session {
        let finhub_now = BASE + sent + rtt / 2 + offset;
        let iat = finhub_now.div_euclid(S);
        let exp = iat + life_s;
        let date = HeaderValue::from_str(&httpdate::fmt_http_date(from_unix_us(iat * S))).unwrap();
        clock.observe(Some(&date), at(sent), at(sent + rtt));
        let token = jwt(serde_json::json!({"iat": iat, "exp": exp, "internalTokenKey": "k"}));
        let left = (exp * S - finhub_now) / S;
        Session::from_grant(
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

    #[test]
    fn exp_is_the_truth_and_expires_in_only_a_fallback_and_bound() {
        let zero = OffsetBounds::ZERO;
        // exp 6 s after iat; expires_in floored to 5 while 5.7 s were left: exp wins.
        let e = choose_expiry(
            &claims_of(Some(6 * S), Some(0)),
            Some(Duration::from_secs(5)),
            at(300_000),
            at(310_000),
            zero,
        );
        assert_eq!(e.at_us, BASE + 6 * S);
        assert!(e.on_finhub_clock && !e.capped);
        assert_eq!(e.validity_us, 6 * S);
        // exp far beyond what expires_in allows: capped by it (plus rounding and slack).
        let e = choose_expiry(
            &claims_of(Some(86_000 * S), Some(0)),
            Some(Duration::from_secs(60)),
            at(0),
            at(0),
            zero,
        );
        assert!(e.capped);
        assert_eq!(e.at_us, BASE + 63 * S);
        // Without exp: expires_in from when the request was sent, on our clock.
        let e = choose_expiry(
            &claims_of(None, None),
            Some(Duration::from_secs(60)),
            at(5),
            at(9),
            zero,
        );
        assert_eq!((e.at_us, e.on_finhub_clock), (BASE + 5 + 60 * S, false));
        // Neither: the fallback.
        let e = choose_expiry(&claims_of(None, None), None, at(0), at(0), zero);
        assert_eq!(e.validity_us, us(FALLBACK_LIFETIME));
        // exp without iat or expires_in: validity counted from the request on FinHub's clock.
        let skew = OffsetBounds {
            lo_us: 2 * S,
            hi_us: 2 * S,
        };
        let e = choose_expiry(&claims_of(Some(10 * S), None), None, at(0), at(0), skew);
        assert_eq!(e.validity_us, 8 * S);
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
            let s = Session::from_grant(g, now, now, &clock);
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
        let opaque = Session::from_grant(grant("opaque".into(), Some(100)), now, now, &clock);
        assert!(!can_refresh(production, &opaque, now));
        assert!(!can_refresh(production, &s, now + Duration::from_secs(200)));
    }

    #[test]
    fn recovery_is_fast_without_a_session_and_backs_off_with_one() {
        let recovery = Duration::from_secs(3);
        let err = AuthError::Status(503, None);
        for failures in 1..20 {
            for jitter in [0.0, 0.5, 0.999] {
                // No usable token: within the second half of a recovery step, every time.
                let w = retry_wait(failures, &err, None, recovery, jitter);
                assert!(
                    w >= recovery / 2 && w <= recovery,
                    "{failures} {jitter}: {w:?}"
                );
                // A usable token: exponential, capped at 30 s, never past the renewal point.
                let w = retry_wait(
                    failures,
                    &err,
                    Some(Duration::from_secs(3600)),
                    recovery,
                    jitter,
                );
                assert!(w <= BACKOFF_CAP && w >= Duration::from_millis(100));
                let w = retry_wait(
                    failures,
                    &err,
                    Some(Duration::from_secs(2)),
                    recovery,
                    jitter,
                );
                assert!(w <= Duration::from_secs(2));
            }
        }
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
        let s = Session::from_grant(g, SystemTime::now(), SystemTime::now(), &clock);
        assert!(s.authorization.is_sensitive());
        assert!(!format!("{s:?}").contains("zzz"));
        assert_eq!(s.lifetime().as_secs(), 60);
        assert!(s.finhub_expiry().is_none());
    }

    #[test]
    fn not_yet_updates_an_opaque_tokens_validity() {
        let clock = Arc::new(ClockOffset::new());
        let s = Session::from_grant(grant("opaque".into(), Some(60)), at(0), at(0), &clock);
        s.note_remaining(Duration::from_secs(100), at(10 * S), at(10 * S + 5));
        assert_eq!(unix_us(s.expires_at()), BASE + 110 * S);
    }
}
