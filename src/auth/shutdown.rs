//! The end of every tenant's session at graceful shutdown, after the drain: one path
//! ([`end_all`]) whose [`Ending`] the configuration chooses. Alone, the sessions are logged out
//! at FinHub (`auth.logout_on_shutdown`); in a fleet (`auth.session_store = "redis"`) they are
//! the fleet's, and this replica only gives its renewal leases up.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::Instrument;

use super::client::{AuthClient, AuthError};
use super::fleet::FleetStore;
use super::metrics::{AuthCall, AuthMetrics, AuthResult};
use super::slot::SessionTable;
use crate::config::AuthConfig;
use crate::telemetry::BackgroundSpan;

/// How the sessions end at graceful shutdown.
pub enum Ending {
    /// Shared with other replicas: stop renewing and give the leases up; never log out (one
    /// replica stopping must not end the session for the others).
    Leave(Arc<FleetStore>),
    /// Alone: stop renewing and log every session out at FinHub, bounded by `within`.
    Logout {
        /// The budget for all logouts together (`auth.logout_timeout`).
        within: Duration,
    },
    /// Alone, `auth.logout_on_shutdown = false`: the sessions simply expire.
    Keep,
}

impl Ending {
    /// The ending `auth` asks for, with the shared store if there is one.
    pub fn of(auth: &AuthConfig, store: Option<Arc<FleetStore>>) -> Ending {
        match store {
            Some(store) => Ending::Leave(store),
            None if auth.logout_on_shutdown => Ending::Logout {
                within: auth.logout_timeout,
            },
            None => Ending::Keep,
        }
    }

    /// How long the drain waits for it (`None`: nothing to wait for).
    pub fn budget(&self) -> Option<Duration> {
        match self {
            Ending::Leave(_) => Some(Duration::from_secs(1)),
            Ending::Logout { within } => Some(*within + Duration::from_millis(250)),
            Ending::Keep => None,
        }
    }
}

/// Ends every tenant's session as `ending` says (graceful shutdown, after the drain).
pub async fn end_all(
    table: Arc<SessionTable>,
    client: Arc<AuthClient>,
    metrics: AuthMetrics,
    ending: Ending,
) {
    match ending {
        Ending::Leave(store) => leave_all(table, store).await,
        Ending::Logout { within } => logout_all(table, client, metrics, within).await,
        Ending::Keep => {}
    }
}

/// Ends every tenant's session at FinHub (graceful shutdown, after the drain): stops the
/// renewals, waits for a renewal in flight, unpublishes the session (requests arriving from
/// now on get 503 `session_unavailable` rather than a token being revoked) and calls logout.
/// Best-effort and bounded: everything together gives up after `within`; each outcome is
/// logged and counted (`auth_requests_total{kind="logout"}`).
async fn logout_all(
    table: Arc<SessionTable>,
    client: Arc<AuthClient>,
    metrics: AuthMetrics,
    within: Duration,
) {
    let deadline = tokio::time::Instant::now() + within;
    let mut tasks = tokio::task::JoinSet::new();
    for slot in table.tenants().iter().cloned() {
        let (client, metrics) = (client.clone(), metrics.clone());
        // Enabled at every level, as the renewal task's (`run_tenant`): it names the tenant.
        let span = tracing::error_span!("logout", tenant = %slot.tenant.id);
        tasks.spawn(
            async move {
                slot.begin_ending();
                let started = Instant::now();
                let tenant = slot.tenant.id.as_str();
                let span = BackgroundSpan::start("finhub.auth.logout", tenant);
                let ended = tokio::time::timeout_at(deadline, async {
                    let _flight = slot.flight().await;
                    let session = slot.take_current()?;
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
                        tracing::info!("no valid session to log out");
                        span.end("no_session");
                        return;
                    }
                    Ok(Some(Ok(cleared))) => {
                        tracing::info!(took_ms, cleared = ?cleared, "session logged out");
                        AuthResult::Ok
                    }
                    Ok(Some(Err(e))) if !matches!(e, AuthError::Timeout) => {
                        tracing::warn!(took_ms, error = %e, "logout failed; stopping anyway");
                        AuthResult::of_error(e)
                    }
                    _ => {
                        tracing::warn!(
                            took_ms,
                            "logout did not finish within auth.logout_timeout; stopping anyway"
                        );
                        AuthResult::Timeout
                    }
                };
                span.end(result.as_str());
                metrics.called(tenant, AuthCall::Logout, result);
            }
            .instrument(span),
        );
    }
    while tasks.join_next().await.is_some() {}
}

/// At graceful shutdown (after the drain): stops every tenant's renewals and gives up the
/// leases this replica holds, so another replica takes over at once instead of after
/// `lease_ttl`. The sessions stay published until the process exits and are not logged out:
/// they are the fleet's.
async fn leave_all(table: Arc<SessionTable>, store: Arc<FleetStore>) {
    for slot in table.tenants() {
        slot.begin_ending();
    }
    let mut releases = tokio::task::JoinSet::new();
    for slot in table.tenants() {
        let (store, tenant) = (store.clone(), slot.tenant.id.clone());
        releases.spawn(async move { store.release(&tenant).await });
    }
    while releases.join_next().await.is_some() {}
    tracing::info!("renewal leases given up; the shared sessions live on for the other replicas");
}
