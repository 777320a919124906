//! The per-tenant renewal task ([`run_tenant`]): login, refresh, recovery; other replicas are
//! met through its [`Coordination`].

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use tokio::sync::watch;
use tracing::Instrument;

use super::client::{AuthClient, AuthError, Refreshed};
use super::clock::{offset_between, OffsetBounds};
use super::coordination::{Coordination, Turn};
use super::fleet::{owner_grace_us, FleetStore};
use super::grant;
use super::plan::{
    can_refresh, forced_spacing, plan, rejected_wait, renewal_not_before, retry_wait, Planned, Step,
};
use super::session::FinHubSession;
use super::slot::SessionSlot;
use super::time::{unix_secs, unix_us, us, Local};
use crate::config::AuthConfig;
use crate::metrics::Metrics;
use crate::telemetry::BackgroundSpan;

/// "Not refreshed, still valid" answers accepted for one session; then it is replaced by a
/// login before it becomes unusable (FinHub's window is not where the sidecar thinks).
pub(super) const MAX_EARLY_REFRESHES: u32 = 8;

/// Label value of an auth outcome for metrics and `/status`.
fn result_label<T>(r: &Result<T, AuthError>, not_yet: bool) -> &'static str {
    match r {
        Ok(_) if not_yet => "not_refreshed",
        Ok(_) => "ok",
        Err(e) => error_label(e),
    }
}

pub(super) fn error_label(e: &AuthError) -> &'static str {
    match e {
        AuthError::Rejected(_) | AuthError::NotRefreshable => "rejected",
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
    slot: &SessionSlot,
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
            _ = slot.renewal_requested() => {
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

/// How long before a token becomes unusable a renewal starts, for a smoothed auth round trip
/// of `rtt_us`: three round trips (a refresh, then a login if FinHub refuses it) and 20 ms.
fn lead_for(rtt_us: i64) -> i64 {
    rtt_us.saturating_mul(3).saturating_add(20_000)
}

/// Smoothed auth round trip: rises at once, decays slowly.
pub(super) fn next_rtt(rtt_us: i64, sent: SystemTime, received: SystemTime) -> i64 {
    let last = unix_us(received) - unix_us(sent);
    if last >= rtt_us {
        last
    } else {
        (rtt_us * 7 + last * 3) / 10
    }
}

/// The per-tenant renewal loop's state.
pub(super) struct Renewer {
    pub(super) slot: Arc<SessionSlot>,
    pub(super) client: Arc<AuthClient>,
    pub(super) auth: AuthConfig,
    pub(super) metrics: Metrics,
    pub(super) tenant_id: String,
    /// Transient failures in a row.
    pub(super) failures: u32,
    /// Rejected logins in a row.
    pub(super) rejections: u32,
    /// After a rejected login: the credentials' fingerprint and the earliest retry (µs).
    pub(super) rejected: Option<(u64, i64)>,
    /// "Not refreshed" answers for the current session.
    pub(super) early: u32,
    /// Smoothed auth round trip, µs.
    pub(super) rtt_us: i64,
    pub(super) last_forced: Option<Instant>,
    /// Forced renewals in quick succession (each within 4 spacings of the one before).
    pub(super) forced_streak: u32,
    /// Whether this replica holds the tenant's renewal lease (kept by the fleet coordination):
    /// a lease owner plans its renewals early ([`Renewer::plan_for`]).
    pub(super) lease_held: bool,
    /// The fleet's rejected-credentials marker as of the last look that read the store (kept
    /// by the fleet coordination): this replica's credentials' fingerprint and the retry time.
    pub(super) fleet_rejected: Option<(u64, i64)>,
    /// Whether the last failed auth call failed on this replica's own path (connect, TLS,
    /// egress, no answer) rather than with an answer from FinHub.
    pub(super) last_failure_local: bool,
    /// Successful renewals in a row whose new token arrived with its renewal already due
    /// (issue 28.3: the spacing after them doubles).
    pub(super) hot: u32,
}

impl Renewer {
    pub(super) fn count(&self, kind: &str, result: &str) {
        self.metrics
            .auth_requests
            .with_label_values(&[self.tenant_id.as_str(), kind, result])
            .inc();
    }

    pub(super) fn lead_us(&self) -> i64 {
        lead_for(self.rtt_us)
    }

    /// When to renew `s` (and how), not before `not_before_us`. A shared session's lease
    /// owner plans its renewal to land the owner's grace earlier than alone
    /// ([`owner_grace_us`]): the followers take a renewal over only after that
    /// grace, before their own last moment, so the owner must leave it to them.
    pub(super) fn plan_for(&self, s: &FinHubSession, not_before_us: i64) -> Planned {
        let refreshable = can_refresh(self.client.rules().refresh_supported, s, SystemTime::now());
        let lead = if self.lease_held {
            self.lead_us().saturating_add(owner_grace_us(s.validity))
        } else {
            self.lead_us()
        };
        let p = plan(
            s.timing(),
            s.clock.bounds(),
            self.auth.refresh_at,
            lead,
            refreshable,
            Local::from_micros(not_before_us),
        );
        if p.step == Step::Refresh && self.early >= MAX_EARLY_REFRESHES {
            // FinHub keeps saying "not yet": log in before the token becomes unusable.
            return plan(
                s.timing(),
                s.clock.bounds(),
                self.auth.refresh_at,
                lead,
                false,
                Local::from_micros(not_before_us),
            );
        }
        p
    }

    /// The renewal of `s` as a lease owner plans it, worked out by a follower: on `writer`'s
    /// estimate of FinHub's clock (the record's; this replica's own without one) and with the
    /// shortest lead an owner plans with (its grace on top of the lead for no round trip; an
    /// owner's own is at least as long, so its plan is no later than this).
    pub(super) fn owner_plan(&self, s: &FinHubSession, writer: Option<OffsetBounds>) -> Planned {
        let refreshable = can_refresh(self.client.rules().refresh_supported, s, SystemTime::now());
        plan(
            s.timing(),
            writer.unwrap_or_else(|| s.clock.bounds()),
            self.auth.refresh_at,
            lead_for(0).saturating_add(owner_grace_us(s.validity)),
            refreshable,
            Local::from_micros(0),
        )
    }

    /// How long the current token can still be renewed in time, if it is usable.
    pub(super) fn usable_for(
        &self,
        current: Option<&FinHubSession>,
        now: SystemTime,
    ) -> Option<Duration> {
        let s = current.filter(|s| s.is_usable(now))?;
        let latest = s.usable_until(now).micros() - self.lead_us();
        Some(Duration::from_micros((latest - unix_us(now)).max(0) as u64))
    }

    /// When the next forced renewal may start (µs, our clock): spaced from the last one.
    pub(super) fn forced_earliest_us(&self) -> i64 {
        self.last_forced.map_or(0, |t| {
            let wait =
                (t + forced_spacing(self.forced_streak)).saturating_duration_since(Instant::now());
            unix_us(SystemTime::now()).saturating_add(us(wait))
        })
    }

    pub(super) fn jitter() -> f64 {
        rand::rng().random_range(0.0..1.0)
    }

    /// The credentials FinHub rejected and until when they are not tried again: this
    /// replica's own rejected login, or the fleet's marker as of the last look, whichever
    /// ends later.
    pub(super) fn rejected_now(&self) -> Option<(u64, i64)> {
        match (self.rejected, self.fleet_rejected) {
            (Some(own), Some(m)) => Some(if m.1 > own.1 { m } else { own }),
            (own, m) => own.or(m),
        }
    }

    /// Whether this replica holds credentials FinHub rejected ([`Renewer::rejected_now`]) and
    /// may not try them yet.
    pub(super) fn held_back(&self) -> bool {
        let now_us = unix_us(SystemTime::now());
        self.rejected_now().is_some_and(|(fingerprint, until)| {
            until > now_us && fingerprint == self.client.credentials_fingerprint(&self.slot.tenant)
        })
    }

    /// Whether a forced renewal asked for by another replica may go now (the same spacing as
    /// this replica's own).
    pub(super) fn forced_allowed(&self) -> bool {
        self.last_forced
            .is_none_or(|t| t.elapsed() >= forced_spacing(self.forced_streak))
    }

    /// The renewal loop: sleeps until the plan (or a forced renewal, or the end), asks the
    /// coordination whether to renew, renews, and tells the coordination how it went.
    async fn run(mut self, mut coord: Coordination) {
        let mut ending = self.slot.ending_watch();
        let mut next = Planned {
            step: Step::Login,
            at_us: unix_us(SystemTime::now()),
        };
        coord.start(&mut self).await;
        loop {
            self.slot.set_next_attempt(next.at_us);
            let backing_off = self.failures > 0 || self.rejected_now().is_some();
            self.slot.set_forced_earliest(if backing_off {
                // Forced renewals wait for the backoff.
                next.at_us
            } else {
                self.forced_earliest_us()
            });
            // With a shared store, also wake to look at it.
            let wake_us = coord.wake_us(next.at_us);
            if sleep_until(
                &self.slot,
                &mut ending,
                wake_us,
                backing_off,
                self.last_forced
                    .map(|t| t + forced_spacing(self.forced_streak)),
            )
            .await
                == Wake::End
            {
                coord.leave(&mut self).await;
                return;
            }
            if coord.look(&mut self, &mut next).await == Turn::Wait {
                continue;
            }
            let forced = self.slot.take_forced();
            if forced {
                let now = Instant::now();
                self.forced_streak = match self.last_forced {
                    Some(t) if now - t < forced_spacing(self.forced_streak) * 4 => {
                        self.forced_streak.saturating_add(1)
                    }
                    _ => 0,
                };
                self.last_forced = Some(now);
                // The next forced renewal is spaced from this one: requests refused on the
                // session it brings are answered at once (see `SessionSlot::newer_than`),
                // those refused before it wait for it (`renewing`).
                self.slot.set_renewing(true);
                self.slot.set_forced_earliest(self.forced_earliest_us());
            }
            let now = SystemTime::now();
            if let Some((fingerprint, until)) = self.rejected_now() {
                if unix_us(now) < until
                    && self.client.credentials_fingerprint(&self.slot.tenant) == fingerprint
                {
                    // Same credentials as the rejected ones: keep waiting (looking again
                    // every recovery step for a rotated secret).
                    next.at_us = until.min(unix_us(now) + us(self.auth.recovery_interval));
                    self.slot.set_renewing(false);
                    continue;
                }
            }
            let slot = self.slot.clone();
            let guard = slot.flight().await;
            if slot.is_ending() {
                drop(guard);
                coord.leave(&mut self).await;
                return;
            }
            let beat = coord.before_renewal(&mut self);
            self.slot.set_renewing(true);
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
            self.slot.set_renewing(false);
            coord.renewed(&mut self, beat);
            drop(guard);
            coord.after_renewal(&mut self, &next).await;
        }
    }

    /// One refresh call; `None` when a login should follow at once.
    pub(super) async fn refresh(&mut self, s: &FinHubSession, forced: bool) -> Option<Planned> {
        let span = BackgroundSpan::start("finhub.auth.refresh", &self.tenant_id);
        let r = self.client.refresh(&self.slot.tenant, s).await;
        let not_yet = matches!(r, Ok(Refreshed::NotYet { .. }));
        let label = result_label(&r, not_yet);
        span.end(label);
        self.count("refresh", label);
        let now = SystemTime::now();
        match r {
            Ok(Refreshed::NotYet { .. }) if forced => {
                // FinHub refused the token on an API call but the refresh endpoint still
                // considers it current: only a fresh login helps.
                tracing::warn!(
                    "FinHub refused the session but would not refresh it; logging in again"
                );
                None
            }
            Ok(Refreshed::NotYet {
                remaining,
                sent,
                received,
            }) => {
                self.rtt_us = next_rtt(self.rtt_us, sent, received);
                if let Some(opens) = s.window_opens() {
                    // FinHub's window had not opened when it answered.
                    let hi = offset_between(opens, Local::from_system(sent));
                    s.clock.infer(None, Some(hi), received);
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
                    next = ?p.step,
                    in_ms = (p.at_us - unix_us(now)) / 1000,
                    "FinHub kept the current token (its refresh window had not opened)"
                );
                Some(p)
            }
            Ok(Refreshed::New(new))
                if !new.is_usable(now) || new.lifetime() < Duration::from_secs(1) =>
            {
                // As for a login: a token unusable on arrival is not published; the current one
                // serves on and a login follows (spaced, see `retry_wait`).
                tracing::warn!("the refreshed token is unusable on arrival; logging in instead");
                None
            }
            Ok(Refreshed::New(new)) => {
                if let Some(opens) = s.window_opens() {
                    // FinHub's window was open when it answered (on the token clock the old
                    // token was read on).
                    s.clock.infer(
                        Some(offset_between(opens, Local::from_system(new.received_at))),
                        None,
                        new.received_at,
                    );
                }
                Some(self.publish(*new, Step::Refresh))
            }
            Err(e @ (AuthError::Rejected(_) | AuthError::NotRefreshable)) => {
                tracing::warn!(error = %e, "refresh refused; logging in again");
                None
            }
            Err(e) => {
                let usable_for = self.usable_for(Some(s), now);
                let wait = self.failed("refresh", label, &e, usable_for);
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
    pub(super) async fn login(&mut self, current: Option<&FinHubSession>) -> Planned {
        let span = BackgroundSpan::start("finhub.auth.login", &self.tenant_id);
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
        span.end(label);
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
                let usable_for = self.usable_for(current, now);
                let wait = self.failed("login", label, &e, usable_for);
                Planned {
                    step: Step::Login,
                    at_us: unix_us(now) + us(wait),
                }
            }
        }
    }

    /// Records a failed `what` (login or refresh) and returns how long to wait before the
    /// next attempt ([`retry_wait`]).
    pub(super) fn failed(
        &mut self,
        what: &'static str,
        label: &'static str,
        e: &AuthError,
        usable_for: Option<Duration>,
    ) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.last_failure_local = matches!(e, AuthError::Transport(_) | AuthError::Timeout);
        self.slot.record(label, false);
        let wait = retry_wait(
            self.failures,
            e,
            usable_for,
            self.auth.recovery_interval,
            Self::jitter(),
        );
        tracing::warn!(
            call = what,
            error = %e,
            attempt = self.failures,
            retry_in_ms = wait.as_millis() as u64,
            "FinHub auth call failed; retrying"
        );
        wait
    }

    /// Publishes a new session (the old one served until this moment) and plans its renewal.
    pub(super) fn publish(&mut self, s: FinHubSession, via: Step) -> Planned {
        self.failures = 0;
        self.rejections = 0;
        self.rejected = None;
        self.early = 0;
        self.slot.record("ok", true);
        let offset = self.client.clock().bounds();
        tracing::info!(
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
        // Requests refused on the new session no longer wait for this renewal.
        self.slot.set_renewing(false);
        self.slot.publish(s);
        let now_us = unix_us(SystemTime::now());
        match self.slot.current() {
            Some(s) => {
                let due = self.plan_for(&s, now_us);
                let latest = s.usable_until(SystemTime::now()).minus_us(self.lead_us());
                let now = Local::from_micros(now_us);
                let floor = renewal_not_before(now, s.validity, 0, latest).micros();
                // A token whose renewal is due on arrival (odd claims, a clock far off): space
                // the renewals out, more each time it happens again.
                self.hot = if due.at_us < floor {
                    self.hot.saturating_add(1)
                } else {
                    0
                };
                if self.hot > 0 {
                    tracing::debug!(
                        in_a_row = self.hot,
                        "the new token's renewal was due on arrival; spacing renewals out"
                    );
                }
                let not_before =
                    renewal_not_before(now, s.validity, self.hot.saturating_sub(1), latest)
                        .micros();
                self.plan_for(&s, not_before)
            }
            None => Planned {
                step: Step::Login,
                at_us: now_us,
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
    slot: Arc<SessionSlot>,
    client: Arc<AuthClient>,
    auth: AuthConfig,
    metrics: Metrics,
    store: Option<Arc<FleetStore>>,
) {
    let tenant_id = slot.tenant.id.clone();
    // The task's span carries the tenant for every line it (and the tasks it spawns) logs. At
    // the error level so that it is enabled whatever the configured level: a `warn` line with
    // `log.level = "warn"` still names its tenant.
    let span = tracing::error_span!("renewal", tenant = %tenant_id);
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
        lease_held: false,
        fleet_rejected: None,
        last_failure_local: false,
        hot: 0,
    }
    .run(Coordination::new(store))
    .instrument(span)
    .await
}
