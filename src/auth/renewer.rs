//! One tenant's renewal state ([`Renewer`]) and its calls: login, refresh, publishing a new
//! session, the plan of the next renewal, the backoff after a failure. The loop that drives it
//! (`renew.rs`) holds it beside the tenant's coordination; this file does not know the
//! coordination, which reads and edits the state through its fields and methods.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;

use super::client::{AuthClient, AuthError, Refreshed};
use super::clock::{offset_between, OffsetBounds};
use super::fleet::owner_grace_us;
use super::grant;
use super::metrics::{AuthCall, AuthMetrics, AuthResult};
use super::plan::{
    can_refresh, forced_spacing, plan, rejected_wait, renewal_not_before, retry_wait, Planned, Step,
};
use super::session::FinHubSession;
use super::slot::SessionSlot;
use crate::config::AuthConfig;
use crate::telemetry::BackgroundSpan;
use crate::time::{unix_secs, us, Local};

/// "Not refreshed, still valid" answers accepted for one session; then it is replaced by a
/// login before it becomes unusable (FinHub's window is not where the sidecar thinks).
pub(super) const MAX_EARLY_REFRESHES: u32 = 8;

/// Label value of an auth outcome for metrics and `/status`.
fn result_of<T>(r: &Result<T, AuthError>, not_yet: bool) -> AuthResult {
    match r {
        Ok(_) if not_yet => AuthResult::NotRefreshed,
        Ok(_) => AuthResult::Ok,
        Err(e) => AuthResult::of_error(e),
    }
}

/// How long before a token becomes unusable a renewal starts, for a smoothed auth round trip
/// of `rtt_us`: three round trips (a refresh, then a login if FinHub refuses it) and 20 ms.
fn lead_for(rtt_us: i64) -> i64 {
    rtt_us.saturating_mul(3).saturating_add(20_000)
}

/// Smoothed auth round trip: rises at once, decays slowly.
pub(super) fn next_rtt(rtt_us: i64, sent: SystemTime, received: SystemTime) -> i64 {
    let last = Local::from_system(received).since(Local::from_system(sent));
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
    pub(super) metrics: AuthMetrics,
    pub(super) tenant_id: String,
    /// Transient failures in a row.
    pub(super) failures: u32,
    /// Rejected logins in a row.
    pub(super) rejections: u32,
    /// After a rejected login: the credentials' fingerprint and the earliest retry.
    pub(super) rejected: Option<(u64, Local)>,
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
    pub(super) fleet_rejected: Option<(u64, Local)>,
    /// Whether the last failed auth call failed on this replica's own path (connect, TLS,
    /// egress, no answer) rather than with an answer from FinHub.
    pub(super) last_failure_local: bool,
    /// Successful renewals in a row whose new token arrived with its renewal already due
    /// (issue 28.3: the spacing after them doubles).
    pub(super) hot: u32,
}

impl Renewer {
    /// A tenant's state before its first login.
    pub(super) fn new(
        slot: Arc<SessionSlot>,
        client: Arc<AuthClient>,
        auth: AuthConfig,
        metrics: AuthMetrics,
    ) -> Renewer {
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
            lease_held: false,
            fleet_rejected: None,
            last_failure_local: false,
            hot: 0,
        }
    }

    pub(super) fn lead_us(&self) -> i64 {
        lead_for(self.rtt_us)
    }

    /// When to renew `s` (and how), not before `not_before`. A shared session's lease
    /// owner plans its renewal to land the owner's grace earlier than alone
    /// ([`owner_grace_us`]): the followers take a renewal over only after that
    /// grace, before their own last moment, so the owner must leave it to them.
    pub(super) fn plan_for(&self, s: &FinHubSession, not_before: Local) -> Planned {
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
            not_before,
        );
        if p.step == Step::Refresh && self.early >= MAX_EARLY_REFRESHES {
            // FinHub keeps saying "not yet": log in before the token becomes unusable.
            return plan(
                s.timing(),
                s.clock.bounds(),
                self.auth.refresh_at,
                lead,
                false,
                not_before,
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
        let latest = s.usable_until(now).minus_us(self.lead_us());
        Some(Duration::from_micros(
            latest.since(Local::from_system(now)).max(0) as u64,
        ))
    }

    /// When the next forced renewal may start: spaced from the last one (the epoch if there
    /// was none).
    pub(super) fn forced_earliest(&self) -> Local {
        self.last_forced.map_or(Local::from_micros(0), |t| {
            let wait =
                (t + forced_spacing(self.forced_streak)).saturating_duration_since(Instant::now());
            Local::now() + wait
        })
    }

    pub(super) fn jitter() -> f64 {
        rand::rng().random_range(0.0..1.0)
    }

    /// The credentials FinHub rejected and until when they are not tried again: this
    /// replica's own rejected login, or the fleet's marker as of the last look, whichever
    /// ends later.
    pub(super) fn rejected_now(&self) -> Option<(u64, Local)> {
        match (self.rejected, self.fleet_rejected) {
            (Some(own), Some(m)) => Some(if m.1 > own.1 { m } else { own }),
            (own, m) => own.or(m),
        }
    }

    /// Whether this replica holds credentials FinHub rejected ([`Renewer::rejected_now`]) and
    /// may not try them yet.
    pub(super) fn held_back(&self) -> bool {
        let now = Local::now();
        self.rejected_now().is_some_and(|(fingerprint, until)| {
            until > now && fingerprint == self.client.credentials_fingerprint(&self.slot.tenant)
        })
    }

    /// Whether a forced renewal asked for by another replica may go now (the same spacing as
    /// this replica's own).
    pub(super) fn forced_allowed(&self) -> bool {
        self.last_forced
            .is_none_or(|t| t.elapsed() >= forced_spacing(self.forced_streak))
    }

    /// One refresh call; `None` when a login should follow at once.
    pub(super) async fn refresh(&mut self, s: &FinHubSession, forced: bool) -> Option<Planned> {
        let span = BackgroundSpan::start("finhub.auth.refresh", &self.tenant_id);
        let r = self.client.refresh(&self.slot.tenant, s).await;
        let not_yet = matches!(r, Ok(Refreshed::NotYet { .. }));
        let result = result_of(&r, not_yet);
        span.end(result.as_str());
        self.metrics
            .called(&self.tenant_id, AuthCall::Refresh, result);
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
                self.slot.record(result, true);
                let min_step = (us(s.validity) / 200).max(20_000);
                let p = self.plan_for(s, Local::from_system(now).plus_us(min_step));
                tracing::debug!(
                    next = ?p.step,
                    in_ms = p.at.since(Local::from_system(now)) / 1000,
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
                let wait = self.failed(AuthCall::Refresh, result, &e, usable_for);
                let at = Local::from_system(now) + wait;
                Some(match usable_for {
                    Some(left) if wait <= left => Planned {
                        step: Step::Refresh,
                        at,
                    },
                    // No refresh can land in time any more: log in instead.
                    _ => Planned {
                        step: Step::Login,
                        at,
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
        let result = result_of(&r, false);
        span.end(result.as_str());
        self.metrics
            .called(&self.tenant_id, AuthCall::Login, result);
        match r {
            Ok(s) => {
                self.rtt_us = next_rtt(self.rtt_us, s.obtained_at, s.received_at);
                self.publish(s, Step::Login)
            }
            Err(e @ AuthError::Rejected(_)) => {
                self.slot.record(result, false);
                self.rejections = self.rejections.saturating_add(1);
                let wait = rejected_wait(self.rejections);
                let until = Local::from_system(now) + wait;
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
                    at: until.min(Local::from_system(now) + self.auth.recovery_interval),
                }
            }
            Err(e) => {
                let usable_for = self.usable_for(current, now);
                let wait = self.failed(AuthCall::Login, result, &e, usable_for);
                Planned {
                    step: Step::Login,
                    at: Local::from_system(now) + wait,
                }
            }
        }
    }

    /// Records a failed `call` (login or refresh) and returns how long to wait before the
    /// next attempt ([`retry_wait`]).
    pub(super) fn failed(
        &mut self,
        call: AuthCall,
        result: AuthResult,
        e: &AuthError,
        usable_for: Option<Duration>,
    ) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.last_failure_local = matches!(e, AuthError::Transport(_) | AuthError::Timeout);
        self.slot.record(result, false);
        let wait = retry_wait(
            self.failures,
            e,
            usable_for,
            self.auth.recovery_interval,
            Self::jitter(),
        );
        tracing::warn!(
            call = call.as_str(),
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
        self.slot.record(AuthResult::Ok, true);
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
            .expires(&self.tenant_id, unix_secs(s.expires_at()));
        // Requests refused on the new session no longer wait for this renewal.
        self.slot.set_renewing(false);
        self.slot.publish(s);
        let now = Local::now();
        match self.slot.current() {
            Some(s) => {
                let due = self.plan_for(&s, now);
                let latest = s.usable_until(SystemTime::now()).minus_us(self.lead_us());
                let floor = renewal_not_before(now, s.validity, 0, latest);
                // A token whose renewal is due on arrival (odd claims, a clock far off): space
                // the renewals out, more each time it happens again.
                self.hot = if due.at < floor {
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
                    renewal_not_before(now, s.validity, self.hot.saturating_sub(1), latest);
                self.plan_for(&s, not_before)
            }
            None => Planned {
                step: Step::Login,
                at: now,
            },
        }
    }
}
