//! One tenant's session slot (the published session, renewal requests from the request path,
//! the outcome for `/status`) and the table of all slots with FinHub's clock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::sync::{watch, Notify};

use super::clock::ClockOffset;

use super::fleet::FleetStatus;
use super::metrics::AuthResult;
use super::session::FinHubSession;
use crate::config::{Config, TenantConfig};
use crate::time::{AtomicLocal, Local};

/// A request FinHub answered 401 is held for a renewal only if one can start within this;
/// otherwise (forced renewals are spaced, or a backoff runs) the 401 goes to the app at once.
const FORCED_HOLD: Duration = Duration::from_millis(1500);

/// One tenant's session slot.
pub struct SessionSlot {
    /// The tenant.
    pub tenant: TenantConfig,
    current: ArcSwapOption<FinHubSession>,
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
    /// When the session task next calls FinHub (the epoch: unknown).
    next_attempt: AtomicLocal,
    /// The earliest a forced renewal may start (the epoch: now), set by the session task:
    /// forced renewals are spaced and wait for a running backoff.
    forced_earliest: AtomicLocal,
    /// Whether a login or refresh is in flight (its session will be published, or it failed).
    renewing: AtomicBool,
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
    /// The shared store's view (`auth.session_store = "redis"` only).
    pub fleet: Option<FleetStatus>,
}

impl SessionSlot {
    pub(super) fn new(tenant: TenantConfig) -> Self {
        SessionSlot {
            tenant,
            current: ArcSwapOption::empty(),
            renew_now: Notify::new(),
            forced: AtomicU64::new(0),
            published: watch::Sender::new(0),
            status: Mutex::new(TenantStatus::default()),
            ending: watch::Sender::new(false),
            flight: tokio::sync::Mutex::new(()),
            next_attempt: AtomicLocal::new(Local::from_micros(0)),
            forced_earliest: AtomicLocal::new(Local::from_micros(0)),
            renewing: AtomicBool::new(false),
        }
    }

    /// The current session if it may be sent now.
    pub fn usable(&self, now: SystemTime) -> Option<Arc<FinHubSession>> {
        self.current.load_full().filter(|s| s.is_usable(now))
    }

    /// The current session, usable or not.
    pub fn current(&self) -> Option<Arc<FinHubSession>> {
        self.current.load_full()
    }

    /// FinHub refused `refused`: ask the background task to renew now, unless a newer session
    /// is already published (then the caller should just use it). Many refusals of the same
    /// session coalesce into one renewal (single flight).
    pub fn request_renewal(&self, refused: &Arc<FinHubSession>) {
        if refused.generation == self.generation() {
            self.forced.store(refused.generation, Ordering::SeqCst);
            self.renew_now.notify_one();
        }
    }

    /// Generation of the current session (0 before the first).
    pub(super) fn generation(&self) -> u64 {
        *self.published.borrow()
    }

    /// Whether a renewal request for the current session is pending (stale ones are dropped).
    pub(super) fn forced_pending(&self) -> bool {
        let g = self.forced.load(Ordering::SeqCst);
        if g != 0 && g != self.generation() {
            self.forced.store(0, Ordering::SeqCst);
            return false;
        }
        g != 0
    }

    /// Waits up to `within` for a usable session other than `old` (after
    /// [`SessionSlot::request_renewal`]). A newer session already published is returned at
    /// once; when no renewal can start within a second or two (forced renewals are spaced, a
    /// backoff is running: issue 28.7) nothing is waited for and `None` comes back at once, so
    /// the caller answers with what it has instead of holding the app's connection.
    pub async fn newer_than(
        &self,
        old: &Arc<FinHubSession>,
        within: Duration,
    ) -> Option<Arc<FinHubSession>> {
        let mut rx = self.published.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        let mut first = true;
        loop {
            if let Some(cur) = self.usable(SystemTime::now()) {
                if !Arc::ptr_eq(&cur, old) {
                    return Some(cur);
                }
            }
            if first && !self.renewal_starts_within(FORCED_HOLD, SystemTime::now()) {
                return None;
            }
            first = false;
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// Whether a renewal is in flight, or a forced one may start within `within` of `now`.
    fn renewal_starts_within(&self, within: Duration, now: SystemTime) -> bool {
        self.renewing.load(Ordering::SeqCst)
            || self.forced_earliest.load() <= Local::from_system(now) + within
    }

    /// How long until the session task next calls FinHub (for an app's `Retry-After` while
    /// the tenant has no usable session); `None` when not known or ending.
    pub fn next_attempt_in(&self, now: SystemTime) -> Option<Duration> {
        let at = self.next_attempt.load();
        (at.micros() != 0 && !self.is_ending())
            .then(|| Duration::from_micros(at.since(Local::from_system(now)).max(0) as u64))
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

    /// Records the last login or refresh's `result` for `/status` (`ok`: the failures in a
    /// row start again at 0).
    pub(super) fn record(&self, result: AuthResult, ok: bool) {
        let mut s = match self.status.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        s.last_result = Some(result.as_str());
        s.last_attempt_unix = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        s.failures = if ok { 0 } else { s.failures.saturating_add(1) };
    }

    /// The renewal loop's watch on the end (set once logout begins, see
    /// [`SessionSlot::begin_ending`]).
    pub(super) fn ending_watch(&self) -> watch::Receiver<bool> {
        self.ending.subscribe()
    }

    /// Logout (or leaving the fleet) begins: the renewal loop stops renewing.
    pub(super) fn begin_ending(&self) {
        self.ending.send_replace(true);
    }

    /// Held for each login/refresh call and by logout (so logout ends what was renewed last).
    pub(super) async fn flight(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.flight.lock().await
    }

    /// Unpublishes the current session (logout): requests from now on find none.
    pub(super) fn take_current(&self) -> Option<Arc<FinHubSession>> {
        self.current.swap(None)
    }

    /// Resolves when the request path asks for a renewal ([`SessionSlot::request_renewal`]).
    pub(super) fn renewal_requested(&self) -> tokio::sync::futures::Notified<'_> {
        self.renew_now.notified()
    }

    /// Whether a renewal request for the current session is pending, clearing it (the renewal
    /// loop takes it up).
    pub(super) fn take_forced(&self) -> bool {
        let forced = self.forced_pending();
        self.forced.store(0, Ordering::SeqCst);
        forced
    }

    /// Whether a login or refresh is in flight (its session will be published, or it failed).
    pub(super) fn set_renewing(&self, renewing: bool) {
        self.renewing.store(renewing, Ordering::SeqCst);
    }

    /// When the renewal loop next calls FinHub.
    pub(super) fn set_next_attempt(&self, at: Local) {
        self.next_attempt.store(at);
    }

    /// The earliest a forced renewal may start (the epoch: now).
    pub(super) fn set_forced_earliest(&self, at: Local) {
        self.forced_earliest.store(at);
    }

    /// Shows the shared store's view of this tenant in `/status`.
    pub(super) fn show_fleet(&self, fleet: FleetStatus) {
        let mut s = match self.status.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        s.fleet = Some(fleet);
    }

    /// Forces a renewal of the current session (another replica's request, honoured by the
    /// lease owner): the renewal loop treats it as a refusal seen here.
    pub(super) fn force_renewal(&self) {
        self.forced.store(self.generation(), Ordering::SeqCst);
    }

    /// Publishes `s` as the current session (unit tests of the request path).
    #[cfg(test)]
    pub(crate) fn publish_for_test(&self, s: FinHubSession) {
        self.publish(s);
    }

    pub(super) fn publish(&self, mut s: FinHubSession) {
        s.generation = self.generation() + 1;
        let generation = s.generation;
        self.current.store(Some(Arc::new(s)));
        self.published.send_modify(|g| *g = generation);
    }
}

/// All tenants' session slots (configuration order) and FinHub's clock. Requests find their
/// tenant through `proxy::tenant::Tenants`.
pub struct SessionTable {
    pub(super) all: Vec<Arc<SessionSlot>>,
    pub(super) clock: Arc<ClockOffset>,
}

impl SessionTable {
    /// One empty slot per configured tenant.
    pub fn new(config: &Config) -> Self {
        let all: Vec<_> = config
            .tenants
            .iter()
            .map(|t| Arc::new(SessionSlot::new(t.clone())))
            .collect();
        SessionTable {
            all,
            clock: Arc::new(ClockOffset::new()),
        }
    }

    /// Every tenant, in configuration order.
    pub fn tenants(&self) -> &[Arc<SessionSlot>] {
        &self.all
    }

    /// FinHub's clock as estimated from its `Date` headers. The proxy may feed it from API
    /// answers too ([`ClockOffset::observe`]).
    pub fn clock(&self) -> &Arc<ClockOffset> {
        &self.clock
    }
}
