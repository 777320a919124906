//! The per-tenant renewal task ([`run_tenant`]): the loop that sleeps until the plan, asks
//! the tenant's [`Coordination`] whether to renew, and renews through its [`Renewer`].

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tracing::Instrument;

use super::client::AuthClient;
use super::coordination::{Coordination, Turn};
use super::fleet::FleetStore;
use super::grant;
use super::metrics::AuthMetrics;
use super::plan::{can_refresh, forced_spacing, Planned, Step};
use super::renewer::Renewer;
use super::slot::SessionSlot;
use crate::config::AuthConfig;
use crate::time::Local;

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
    metrics: AuthMetrics,
    store: Option<Arc<FleetStore>>,
) {
    // The task's span carries the tenant for every line it (and the tasks it spawns) logs. At
    // the error level so that it is enabled whatever the configured level: a `warn` line with
    // `log.level = "warn"` still names its tenant.
    let span = tracing::error_span!("renewal", tenant = %slot.tenant.id);
    run(
        Renewer::new(slot, client, auth, metrics),
        Coordination::new(store),
    )
    .instrument(span)
    .await
}

/// The renewal loop: sleeps until the plan (or a forced renewal, or the end), asks the
/// coordination whether to renew, renews, and tells the coordination how it went.
async fn run(mut r: Renewer, mut coord: Coordination) {
    let mut ending = r.slot.ending_watch();
    let mut next = Planned {
        step: Step::Login,
        at: Local::now(),
    };
    coord.start(&mut r).await;
    loop {
        r.slot.set_next_attempt(next.at);
        let backing_off = r.failures > 0 || r.rejected_now().is_some();
        r.slot.set_forced_earliest(if backing_off {
            // Forced renewals wait for the backoff.
            next.at
        } else {
            r.forced_earliest()
        });
        // With a shared store, also wake to look at it.
        let wake = coord.wake(next.at);
        if sleep_until(
            &r.slot,
            &mut ending,
            wake,
            backing_off,
            r.last_forced.map(|t| t + forced_spacing(r.forced_streak)),
        )
        .await
            == Wake::End
        {
            coord.leave(&mut r).await;
            return;
        }
        if coord.look(&mut r, &mut next).await == Turn::Wait {
            continue;
        }
        let forced = r.slot.take_forced();
        if forced {
            let now = Instant::now();
            r.forced_streak = match r.last_forced {
                Some(t) if now - t < forced_spacing(r.forced_streak) * 4 => {
                    r.forced_streak.saturating_add(1)
                }
                _ => 0,
            };
            r.last_forced = Some(now);
            // The next forced renewal is spaced from this one: requests refused on the
            // session it brings are answered at once (see `SessionSlot::newer_than`),
            // those refused before it wait for it (`renewing`).
            r.slot.set_renewing(true);
            r.slot.set_forced_earliest(r.forced_earliest());
        }
        let now = SystemTime::now();
        if let Some((fingerprint, until)) = r.rejected_now() {
            if Local::from_system(now) < until
                && r.client.credentials_fingerprint(&r.slot.tenant) == fingerprint
            {
                // Same credentials as the rejected ones: keep waiting (looking again
                // every recovery step for a rotated secret).
                next.at = until.min(Local::from_system(now) + r.auth.recovery_interval);
                r.slot.set_renewing(false);
                continue;
            }
        }
        let slot = r.slot.clone();
        let guard = slot.flight().await;
        if slot.is_ending() {
            drop(guard);
            coord.leave(&mut r).await;
            return;
        }
        let beat = coord.before_renewal(&mut r);
        r.slot.set_renewing(true);
        let current = r.slot.current();
        next = match current.as_deref() {
            Some(s)
                if can_refresh(r.client.rules().refresh_supported, s, now)
                    && (forced || next.step == Step::Refresh) =>
            {
                match r.refresh(s, forced).await {
                    Some(planned) => planned,
                    None => r.login(current.as_deref()).await,
                }
            }
            _ => r.login(current.as_deref()).await,
        };
        r.slot.set_renewing(false);
        coord.renewed(&mut r, beat);
        drop(guard);
        coord.after_renewal(&mut r, &next).await;
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

/// Sleeps until `at`, a forced renewal (unless `backing_off`: a backoff is
/// never shortened, so rejected credentials are not hammered; a forced renewal waits until
/// `forced_earliest`, see [`forced_spacing`]), or the end.
async fn sleep_until(
    slot: &SessionSlot,
    ending: &mut watch::Receiver<bool>,
    at: Local,
    backing_off: bool,
    forced_earliest: Option<Instant>,
) -> Wake {
    // Plans are at most a lifetime (a day) away; the cap only keeps `Instant` arithmetic sane.
    let wait =
        Duration::from_micros(at.since(Local::now()).max(0) as u64).min(2 * grant::MAX_LIFETIME);
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
