//! FinHub sessions: one per tenant, obtained and renewed in the background.
//!
//! Each tenant has a [`TenantSessions`] slot holding the current [`Session`] as an immutable
//! snapshot (`ArcSwapOption`). A background task per tenant ([`run_tenant`]) logs in, renews the
//! token near the end of its lifetime (refresh endpoint with the JWT's `internalTokenKey`, or a
//! fresh login when that is not possible or fails) and backs off with full jitter on errors.
//! The request path only loads the snapshot and checks its expiry; it never waits on a lock
//! and never sends a token it knows is expired.

pub mod client;
pub mod grant;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use rand::Rng;
use tokio::sync::{watch, Notify};

use crate::config::{AuthConfig, Config, Environment, TenantConfig};
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::secret::Secret;
use client::{AuthClient, AuthError, Refreshed};
use grant::{Claims, Grant};

/// Lifetime assumed when FinHub states none (neither `exp` nor `expires_in`).
const FALLBACK_LIFETIME: Duration = Duration::from_secs(300);
/// The longest `Retry-After` from the auth endpoint that is honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);
/// Forced renewals (after a 401) happen at most this often per tenant.
const MIN_FORCED_INTERVAL: Duration = Duration::from_secs(5);

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
    /// When the request that obtained it was sent.
    pub obtained_at: SystemTime,
    /// When it stops being valid (earlier of JWT `exp` and `expires_in`, §4.3).
    pub expires_at: SystemTime,
    /// `internalTokenKey` claim, needed to refresh (A3).
    pub internal_token_key: Option<Secret>,
    /// `refreshToken` from the login, kept but unused (A2).
    pub refresh_token: Option<Secret>,
    /// Publication number within its tenant (1 for the first session), set when published.
    pub generation: u64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("session_id", &self.session_id)
            .field("expires_at", &self.expires_at)
            .field("refreshable", &self.internal_token_key.is_some())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Builds a session from a grant whose request was sent at `sent`.
    pub fn from_grant(grant: Grant, sent: SystemTime) -> Session {
        let claims = Claims::of(grant.token.expose());
        let by_body = grant.expires_in.and_then(|d| sent.checked_add(d));
        let latest = sent + grant::MAX_LIFETIME;
        let expires_at = match (claims.exp, by_body) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => sent + FALLBACK_LIFETIME,
        }
        .min(latest);
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
            expires_at,
            internal_token_key: claims.internal_token_key,
            refresh_token: grant.refresh_token,
            generation: 0,
        }
    }

    /// Whether the token may still be sent at `now`.
    pub fn is_usable(&self, now: SystemTime) -> bool {
        now + EXPIRY_MARGIN.min(self.lifetime() / 50) < self.expires_at
    }

    /// Total lifetime as seen by the sidecar.
    pub fn lifetime(&self) -> Duration {
        self.expires_at
            .duration_since(self.obtained_at)
            .unwrap_or_default()
    }

    /// When to renew: `refresh_at` of the lifetime, and always at least 3 % before expiry (A4).
    pub fn renew_at(&self, refresh_at: f64) -> SystemTime {
        let l = self.lifetime();
        let planned = self.obtained_at + l.mul_f64(refresh_at);
        let latest = self.expires_at - l.mul_f64(0.03);
        planned.min(latest)
    }
}

fn sensitive(v: &str) -> HeaderValue {
    // A token with bytes that are not valid in a header cannot be sent; an empty value makes
    // FinHub answer 401, which is the right failure.
    let mut h = HeaderValue::from_str(v).unwrap_or_else(|_| HeaderValue::from_static(""));
    h.set_sensitive(true);
    h
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

/// All tenants' session slots, looked up by `X-Tenant-ID`.
pub struct SessionTable {
    by_id: HashMap<String, Arc<TenantSessions>>,
    default: Arc<TenantSessions>,
    all: Vec<Arc<TenantSessions>>,
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
        let by_id = all
            .iter()
            .map(|t| (t.tenant.id.clone(), t.clone()))
            .collect();
        let default = all[config.default_tenant].clone();
        SessionTable {
            by_id,
            default,
            all,
        }
    }

    /// The tenant a request selects with `X-Tenant-ID` (byte-exact, A16), or the default.
    pub fn select(&self, header: Option<&HeaderValue>) -> Result<&Arc<TenantSessions>, ProxyError> {
        match header {
            None => Ok(&self.default),
            Some(h) => {
                let id = h
                    .to_str()
                    .map_err(|_| ProxyError::UnknownTenant("(non-ASCII)".into()))?;
                self.by_id
                    .get(id)
                    .ok_or_else(|| ProxyError::UnknownTenant(truncate(id, 64)))
            }
        }
    }

    /// Every tenant, in configuration order.
    pub fn tenants(&self) -> &[Arc<TenantSessions>] {
        &self.all
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// What the next renewal does.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Login,
    Refresh,
}

/// Picks refresh when this environment and token support it (A3, A6), else login.
fn next_step(env: Environment, session: Option<&Session>, now: SystemTime) -> Step {
    match session {
        Some(s)
            if s.internal_token_key.is_some() && !env.is_sandbox_flavour() && s.is_usable(now) =>
        {
            Step::Refresh
        }
        _ => Step::Login,
    }
}

/// Backoff before retry `attempt` (1-based): full jitter, exponential from 500 ms to 30 s; a
/// rejected login waits at least 30 s (never a tight loop on bad credentials); `Retry-After`
/// from a 429 is honoured.
fn backoff(attempt: u32, err: &AuthError) -> Duration {
    let cap = Duration::from_secs(30);
    let exp = Duration::from_millis(500)
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(10))
        .min(cap);
    let jittered = exp.mul_f64(rand::rng().random_range(0.0..=1.0));
    match err {
        AuthError::Rejected(_) => jittered.max(cap),
        AuthError::RateLimited {
            retry_after: Some(r),
        } => jittered.max((*r).min(MAX_RETRY_AFTER)),
        _ => jittered.max(Duration::from_millis(100)),
    }
}

/// Label value of an auth outcome for metrics and `/status`.
fn result_label(r: &Result<Refreshed, AuthError>) -> &'static str {
    match r {
        Ok(Refreshed::New(_)) => "ok",
        Ok(Refreshed::NotYet(_)) => "not_refreshed",
        Err(AuthError::Rejected(_)) => "rejected",
        Err(AuthError::RateLimited { .. }) => "rate_limited",
        Err(_) => "error",
    }
}

/// Keeps `slot`'s session alive until the process ends. This task is the only place a
/// tenant's login or refresh happens, so they are single-flight by construction.
pub async fn run_tenant(
    slot: Arc<TenantSessions>,
    client: Arc<AuthClient>,
    auth: AuthConfig,
    metrics: Metrics,
) {
    let tenant_id = slot.tenant.id.clone();
    let count = |kind: &str, result: &str| {
        metrics
            .auth_requests
            .with_label_values(&[tenant_id.as_str(), kind, result])
            .inc();
    };
    let mut failures: u32 = 0;
    let mut last_forced: Option<Instant> = None;
    loop {
        let forced = slot.forced_pending();
        slot.forced.store(0, Ordering::SeqCst);
        if forced {
            last_forced = Some(Instant::now());
        }
        let now = SystemTime::now();
        let current = slot.current();
        let step = next_step(auth.environment, current.as_deref(), now);
        let mut result = match (&step, current.as_deref()) {
            (Step::Refresh, Some(s)) => {
                let r = client.refresh(&slot.tenant, s).await;
                count("refresh", result_label(&r));
                match r {
                    // FinHub refused the token on an API call but the refresh endpoint still
                    // considers it current: only a fresh login helps.
                    Ok(Refreshed::NotYet(_)) if forced => Err(AuthError::Rejected(401)),
                    other => other,
                }
            }
            _ => Err(AuthError::Rejected(0)),
        };
        if step == Step::Login || result.is_err() {
            if step == Step::Refresh {
                if let Err(e) = &result {
                    tracing::warn!(tenant = %tenant_id, error = %e, "refresh did not renew the session; logging in again");
                }
            }
            result = client
                .login(&slot.tenant)
                .await
                .map(|s| Refreshed::New(Box::new(s)));
            count("login", result_label(&result));
        }
        // A token that is already (nearly) expired on arrival (clock skew, absurd lifetime)
        // is a failure to back off from, not a reason to log in again at once.
        if let Ok(Refreshed::New(s)) = &result {
            if !s.is_usable(SystemTime::now()) || s.lifetime() < Duration::from_secs(1) {
                result = Err(AuthError::Answer(grant::GrantError::AlreadyExpired));
            }
        }
        slot.record(result_label(&result), result.is_ok());
        let failed = result.is_err();
        let wait = match result {
            Ok(Refreshed::New(session)) => {
                failures = 0;
                let renew_at = session.renew_at(auth.refresh_at);
                tracing::info!(
                    tenant = %tenant_id,
                    via = ?step,
                    lifetime_ms = session.lifetime().as_millis() as u64,
                    refreshable = session.internal_token_key.is_some(),
                    "session renewed"
                );
                metrics
                    .session_expiration
                    .with_label_values(&[tenant_id.as_str()])
                    .set(unix_secs(session.expires_at));
                slot.publish(*session);
                renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
            }
            Ok(Refreshed::NotYet(_)) => {
                // "Not refreshed, still valid": not a failure; try again halfway to expiry.
                failures = 0;
                tracing::debug!(tenant = %tenant_id, "FinHub kept the current token");
                current
                    .map(|s| {
                        s.expires_at
                            .duration_since(SystemTime::now())
                            .unwrap_or_default()
                            / 2
                    })
                    .unwrap_or_default()
                    .max(Duration::from_millis(100))
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = backoff(failures, &e);
                match &e {
                    AuthError::Rejected(_) => tracing::error!(
                        tenant = %tenant_id,
                        error = %e,
                        retry_in_ms = wait.as_millis() as u64,
                        "FinHub rejected the login: check this tenant's credentials"
                    ),
                    _ => tracing::warn!(
                        tenant = %tenant_id,
                        error = %e,
                        attempt = failures,
                        retry_in_ms = wait.as_millis() as u64,
                        "login failed; backing off"
                    ),
                }
                wait
            }
        };
        let mut deadline = Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.into()) => break,
                _ = slot.renew_now.notified() => {
                    // A backoff is never shortened (no login storm on rejected credentials),
                    // stale requests are dropped, and forced renewals are spaced out.
                    if failed || !slot.forced_pending() {
                        continue;
                    }
                    match last_forced.map(|t| t + MIN_FORCED_INTERVAL) {
                        Some(earliest) if earliest > Instant::now() => {
                            deadline = deadline.min(earliest);
                        }
                        _ => break,
                    }
                }
            }
        }
    }
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(lifetime_s: u64, key: bool) -> Session {
        let now = SystemTime::now();
        Session {
            token: Secret::new("t"),
            authorization: sensitive("Bearer t"),
            session_token: sensitive("t"),
            session_id: HeaderValue::from_static("s"),
            obtained_at: now,
            expires_at: now + Duration::from_secs(lifetime_s),
            internal_token_key: key.then(|| Secret::new("k")),
            refresh_token: None,
            generation: 0,
        }
    }

    #[test]
    fn renewal_is_planned_inside_the_last_ten_percent() {
        let s = session(1000, true);
        let at = s.renew_at(0.92).duration_since(s.obtained_at).unwrap();
        assert_eq!(at.as_secs(), 920);
        let late = s.renew_at(0.99).duration_since(s.obtained_at).unwrap();
        assert_eq!(late.as_secs(), 970);
    }

    #[test]
    fn refresh_only_with_key_outside_sandbox() {
        let now = SystemTime::now();
        assert_eq!(
            next_step(Environment::Production, Some(&session(100, true)), now),
            Step::Refresh
        );
        assert_eq!(
            next_step(Environment::Production, Some(&session(100, false)), now),
            Step::Login
        );
        assert_eq!(
            next_step(Environment::Sandbox, Some(&session(100, true)), now),
            Step::Login
        );
        assert_eq!(next_step(Environment::Production, None, now), Step::Login);
    }

    #[test]
    fn expired_sessions_are_not_usable() {
        let mut s = session(10, false);
        assert!(s.is_usable(SystemTime::now()));
        s.expires_at = SystemTime::now();
        assert!(!s.is_usable(SystemTime::now()));
    }

    #[test]
    fn bad_credentials_back_off_slowly() {
        for attempt in 1..5 {
            assert!(backoff(attempt, &AuthError::Rejected(401)) >= Duration::from_secs(30));
            assert!(backoff(attempt, &AuthError::Status(500)) <= Duration::from_secs(30));
        }
        let r = AuthError::RateLimited {
            retry_after: Some(Duration::from_secs(7)),
        };
        assert!(backoff(1, &r) >= Duration::from_secs(7));
    }

    #[test]
    fn session_header_values_are_sensitive() {
        let g = Grant {
            token: Secret::new("tok-zzz-never-in-a-uuid"),
            expires_in: Some(Duration::from_secs(60)),
            refresh_token: None,
            session_id: None,
        };
        let s = Session::from_grant(g, SystemTime::now());
        assert!(s.authorization.is_sensitive());
        assert!(!format!("{s:?}").contains("zzz"));
        assert_eq!(s.lifetime().as_secs(), 60);
    }
}
