//! One tenant's view of the shared store inside its renewal task ([`FleetState`]) and the
//! bookkeeping of a fleet member: lease and source changes (metrics, `/status`), adoption of a
//! record, sharing a renewed session, the lease heartbeat during a renewal, leaving.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tracing::Instrument;

use super::metrics::Origin;
use super::record::{sanitize_id, session_of, Backoff, Marker, RawRecord, RenewRequest};
use super::role::{adoptable, fence_kept, Role, Source};
use super::status::FleetStatus;
use super::store::FleetStore;
use crate::auth::clock::OffsetBounds;
use crate::auth::plan::Planned;
use crate::auth::renewer::Renewer;
use crate::redis_pool::Failure;
use crate::sealing::OpenError;
use crate::time::{unix_secs, Local};

/// A refused write (the lease or record belongs to another owner) is logged at most this often.
const REFUSED_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// Lease changes logged at info per minute (more are logged at debug).
const LEASE_LINES_PER_MINUTE: u32 = 6;

/// The lease extension running while an owner renews ([`FleetState::heartbeat`]).
pub(in crate::auth) struct Heartbeat {
    task: tokio::task::JoinHandle<()>,
    lost: Arc<AtomicBool>,
}

/// One tenant's view of the shared store (inside its renewal task).
pub(in crate::auth) struct FleetState {
    pub(super) store: Arc<FleetStore>,
    /// Fence of the lease this replica holds.
    fence: Option<u64>,
    /// Highest record generation seen or written.
    pub(super) last_generation: u64,
    /// `(generation, fence)` of the record whose session is published here.
    pub(super) adopted: Option<(u64, u64)>,
    pub(super) source: Source,
    pub(super) role: Option<Role>,
    pub(super) store_up: bool,
    /// Key id of a live record this replica cannot decrypt (and the generation logged).
    pub(super) unreadable: Option<(String, u64)>,
    /// When this replica asked the owner to renew a refused session, and which generation.
    pub(super) asked: Option<(Instant, u64)>,
    /// When to look at the store next.
    pub(super) next_look: Local,
    /// The slot's generation before the renewal step in progress.
    generation_before: u64,
    /// After giving the lease up (repeated failures), not taking it again before this.
    pub(super) yielded_until: Option<Instant>,
    /// Since when this replica has had no usable session (and no newer record came).
    pub(super) stale_since: Option<Instant>,
    /// `obtained` of the newest shared session adopted or written: an older record
    /// (replayed, or restored by a failover that lost the last write) is not adopted while
    /// the current session is usable.
    newest_obtained: Local,
    /// Whether the fallback (or a corrupt lease) was logged since the last normal look.
    fallback_logged: bool,
    /// The highest fence of an authenticated record seen or written: a lease of this
    /// replica's with a lower one is replaced by a fresh fence
    /// ([`super::store::ACQUIRE_SCRIPT`]).
    pub(super) max_fence: u64,
    /// Not renewing before this: the fleet's backoff as of the last look (re-derived at
    /// every look, the epoch for none).
    pub(super) hold_until: Local,
    /// The last renewal request honoured (each is honoured once).
    pub(super) honoured: Option<RenewRequest>,
    /// Writes refused since the last log line about them, and when that was.
    refused: u32,
    refused_logged: Option<Instant>,
    /// The generation whose session this follower renewed on its own: logged once, and from
    /// then on it follows the plan of its own attempt's answer (no new attempt per look).
    pub(super) renewed_alone: Option<u64>,
    /// The writer's estimate of FinHub's token clock in the adopted record: the owner planned
    /// its renewal with it, so a follower works out that plan with it too (its own estimate
    /// may be narrower or wider and would put the owner's renewal elsewhere).
    pub(super) writer_offset: Option<OffsetBounds>,
    /// Lease changes logged in the current minute: since when, how many.
    lease_lines: (Instant, u32),
}

impl FleetState {
    /// A follower of `store` for one tenant.
    pub(in crate::auth) fn new(store: Arc<FleetStore>) -> FleetState {
        FleetState {
            store,
            fence: None,
            last_generation: 0,
            adopted: None,
            source: Source::None,
            role: None,
            store_up: true,
            unreadable: None,
            asked: None,
            next_look: Local::from_micros(0),
            generation_before: 0,
            yielded_until: None,
            stale_since: None,
            newest_obtained: Local::from_micros(0),
            fallback_logged: false,
            max_fence: 0,
            hold_until: Local::from_micros(0),
            honoured: None,
            refused: 0,
            refused_logged: None,
            renewed_alone: None,
            writer_offset: None,
            lease_lines: (Instant::now(), 0),
        }
    }

    /// Whether this replica holds the lease now (a fence from its last acquire).
    pub(super) fn owns_lease(&self) -> bool {
        self.fence.is_some()
    }

    /// When the renewal loop wakes next for a plan due at `at`: not before the fleet's
    /// backoff (as of the last look), and never after the next look.
    pub(in crate::auth) fn wake(&self, at: Local) -> Local {
        at.max(self.hold_until).min(self.next_look)
    }

    pub(super) fn set_source(&mut self, r: &Renewer, source: Source) {
        self.source = source;
        let origin = match source {
            Source::Shared => Some(Origin::Shared),
            Source::Local => Some(Origin::Local),
            Source::None => None,
        };
        self.store.metrics().source(&r.tenant_id, origin);
        self.show(r);
    }

    pub(super) fn set_owner(&mut self, r: &mut Renewer, fence: Option<u64>) {
        let tenant = r.tenant_id.clone();
        let was = self.fence.is_some();
        self.fence = fence;
        r.lease_held = fence.is_some();
        if fence.is_some() != was {
            // A lease that keeps changing hands (someone rewriting it) is not a log flood.
            let now = Instant::now();
            let (since, lines) = self.lease_lines;
            let (since, lines) = if now - since >= REFUSED_LOG_EVERY {
                (now, 0)
            } else {
                (since, lines)
            };
            self.lease_lines = (since, lines.saturating_add(1));
            let loud = lines < LEASE_LINES_PER_MINUTE;
            match (fence, loud) {
                (Some(n), true) => {
                    tracing::info!(
                        fence = n,
                        replica = self.store.replica(),
                        "took the tenant's renewal lease: this replica renews the shared session"
                    )
                }
                (Some(n), false) => {
                    tracing::debug!(fence = n, "took the tenant's renewal lease")
                }
                (None, true) => {
                    tracing::info!("gave up the tenant's renewal lease")
                }
                (None, false) => {
                    tracing::debug!("gave up the tenant's renewal lease")
                }
            }
        }
        self.store.metrics().lease_held(&tenant, fence.is_some());
    }

    /// Shows the fleet's view in the tenant's `/status`.
    pub(super) fn show(&self, r: &Renewer) {
        let status = FleetStatus {
            store: if self.store_up { "ok" } else { "unavailable" },
            lease_owner: self.fence.is_some(),
            source: self.source.label(),
            generation: self.last_generation,
            undecryptable_key_id: self.unreadable.as_ref().map(|(k, _)| k.clone()),
            replica: self.store.replica().to_string(),
        };
        r.slot.show_fleet(status);
    }

    /// The series of a tenant with a shared store, created at 0; waits for the store's first
    /// connection (bounded).
    pub(in crate::auth) async fn start(&mut self, r: &mut Renewer) {
        self.store.connected().await;
        self.store.metrics().tenant_started(&r.tenant_id);
        self.set_owner(r, None);
        self.set_source(r, Source::None);
    }

    /// Notes whether this replica has a usable session now (for [`FleetState::stranded`]).
    pub(super) fn note_staleness(&mut self, r: &Renewer) {
        let usable = r
            .slot
            .current()
            .is_some_and(|s| s.is_usable(SystemTime::now()));
        if usable {
            self.stale_since = None;
            self.fallback_logged = false;
        } else {
            self.stale_since.get_or_insert_with(Instant::now);
        }
    }

    /// A follower without a usable session that has seen no newer record for longer than the
    /// lease (plus two polls), while no owner reports a backoff: whoever holds the lease is not
    /// renewing (stuck, or a lease written without a TTL).
    pub(super) fn stranded(&self, backoff: bool) -> bool {
        let patience = self.store.settings.lease_ttl + self.store.settings.poll_interval * 2;
        super::role::stranded(self.stale_since.map(|t| t.elapsed()), patience, backoff)
    }

    /// The role when the lease cannot be followed: renew on its own (`on_store_error =
    /// "local"`) or wait; logged once per episode.
    pub(super) fn fallback(&mut self, why: &str) -> Role {
        let mode = self.store.settings.on_store_error;
        if !self.fallback_logged {
            tracing::warn!(on_store_error = ?mode, "{why}; renewing per auth.shared.on_store_error");
            self.fallback_logged = true;
        }
        super::role::on_store_error(mode)
    }

    /// Takes the fleet's rejected-credentials marker as of this look (`None`: none, or not
    /// authenticated, or not about this replica's credentials): re-derived at every look,
    /// never kept once the marker is gone.
    pub(super) fn apply_marker(&mut self, r: &mut Renewer, marker: Option<&Marker>) {
        let now = Local::now();
        let hold = marker.filter(|m| {
            Local::from_micros(m.until_us) > now
                && m.fingerprint == self.store.credentials_fingerprint(&r.slot.tenant)
        });
        let fingerprint = r.client.credentials_fingerprint(&r.slot.tenant);
        let own_until = r.rejected.map_or(Local::from_micros(0), |(_, until)| until);
        let was = r.fleet_rejected;
        r.fleet_rejected = hold.map(|m| (fingerprint, Local::from_micros(m.until_us)));
        if let Some(m) = hold {
            if was.is_none() && Local::from_micros(m.until_us) > own_until {
                tracing::warn!(
                    retry_in_ms = Local::from_micros(m.until_us).since(now) / 1000,
                    "FinHub rejected another replica's login with the credentials this replica holds; not trying them before then (retried sooner if they change)"
                );
            }
            r.rejections = r.rejections.max(m.rejections);
        }
    }

    /// The owner's login was rejected: tell the fleet (the credentials' fingerprint, so
    /// replicas with the same ones hold back) and give the lease to a replica with other
    /// credentials (e.g. one a rotation reached first).
    pub(super) async fn give_way_rejected(&mut self, r: &mut Renewer) {
        let store = self.store.clone();
        let tenant = r.tenant_id.clone();
        if let Some((_, until)) = r.rejected_now() {
            let marker = Marker {
                fingerprint: store.credentials_fingerprint(&r.slot.tenant),
                until_us: until.micros(),
                rejections: r.rejections,
            };
            let _ = store.mark_rejected(&tenant, &marker).await;
        }
        tracing::warn!("FinHub rejected this replica's credentials; giving the renewal lease to a replica with other credentials (replicas with the same ones hold back until the retry)");
        store.release(&tenant).await;
        self.set_owner(r, None);
    }

    /// While this replica renews as the lease owner: extends the lease every third of its TTL,
    /// so a slow renewal (a refresh, then a login) never outlives it. `None` unless it owns.
    pub(in crate::auth) fn heartbeat(&self, r: &Renewer) -> Option<Heartbeat> {
        let fence = self.fence?;
        let (store, tenant) = (self.store.clone(), r.tenant_id.clone());
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        let period = store.settings.lease_ttl / 3;
        // In the renewal task's span (its tenant).
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                if !fence_kept(store.acquire(&tenant, fence).await.ok(), fence) {
                    flag.store(true, Ordering::SeqCst);
                    tracing::warn!("could not extend the renewal lease during a renewal: its result is kept here, not shared");
                    return;
                }
            }
        }.in_current_span());
        Some(Heartbeat { task, lost })
    }

    /// The renewal ended: stop the heartbeat; a lease it could not extend is given up (the new
    /// session is not written).
    pub(in crate::auth) fn heartbeat_done(&mut self, r: &mut Renewer, beat: Option<Heartbeat>) {
        if let Some(b) = beat {
            b.task.abort();
            if b.lost.load(Ordering::SeqCst) {
                self.set_owner(r, None);
            }
        }
    }

    /// The store failed: the role `on_store_error` gives.
    pub(super) fn store_failed(&mut self, r: &mut Renewer, failure: Failure) -> Role {
        let mode = Some(self.store.settings.on_store_error);
        if self.store_up {
            tracing::warn!(kind = failure.label(), on_store_error = ?mode, "session store unavailable; serving the last good session, renewing per auth.shared.on_store_error");
        }
        self.store_up = false;
        self.set_owner(r, None);
        super::role::on_store_error(self.store.settings.on_store_error)
    }

    /// A record was read: adopt it if it is readable, usable and not the one published here.
    /// Returns whether it was readable.
    pub(super) fn consider(
        &mut self,
        r: &mut Renewer,
        record: Result<RawRecord, String>,
        next: &mut Planned,
    ) -> bool {
        let tenant = r.tenant_id.clone();
        let store = self.store.clone();
        let opened = match &record {
            Ok(raw) => store
                .open(&tenant, raw)
                .map(|p| (raw.generation, raw.fence, p))
                .map_err(|e| (raw.sealed.key_id.clone(), raw.generation, e)),
            Err(kid) => Err((kid.clone(), 0, OpenError::Corrupt)),
        };
        match opened {
            Ok((generation, fence, payload)) => {
                self.unreadable = None;
                self.last_generation = self.last_generation.max(generation);
                self.max_fence = self.max_fence.max(fence);
                if self.adopted == Some((generation, fence)) {
                    return true;
                }
                let newest = self.newest_obtained;
                // The record's wire field (µs since the epoch on the writer's clock, taken as ours).
                let obtained = Local::from_micros(payload.obtained_us);
                let session = session_of(&payload, r.client.clock());
                let now = SystemTime::now();
                if !session.is_usable(now) {
                    return true;
                }
                let current_usable = r.slot.current().is_some_and(|c| c.is_usable(now));
                if !adoptable(obtained, newest, current_usable) {
                    // Older than a shared session already seen (a replayed record, or a
                    // failover that lost the last write): the current one serves on.
                    tracing::warn!(generation, "the shared record holds an older session than one already seen; not adopted");
                    return true;
                }
                self.adopted = Some((generation, fence));
                self.writer_offset = match (payload.offset_lo_us, payload.offset_hi_us) {
                    (Some(lo_us), Some(hi_us)) if lo_us <= hi_us => {
                        Some(OffsetBounds { lo_us, hi_us })
                    }
                    _ => None,
                };
                self.asked = None;
                self.newest_obtained = self.newest_obtained.max(obtained);
                tracing::info!(
                    generation,
                    lifetime_ms = session.lifetime().as_millis() as u64,
                    "adopted the shared session"
                );
                r.metrics.expires(&tenant, unix_secs(session.expires_at()));
                self.store.metrics().adopted(&tenant);
                r.early = 0;
                r.failures = 0;
                r.slot.publish(session);
                self.set_source(r, Source::Shared);
                if let Some(s) = r.slot.current() {
                    *next = r.plan_for(&s, Local::from_system(now));
                }
                true
            }
            Err((kid, generation, e)) => {
                let kid = sanitize_id(&kid);
                let logged = self.unreadable.as_ref() == Some(&(kid.clone(), generation));
                if !logged {
                    // Once per record (key id and generation), not per read.
                    store.metrics().decrypt_failed(&kid);
                    tracing::error!(
                        key_id = %kid,
                        generation,
                        this_replica_key_id = store.settings.keys.current_id(),
                        error = %e,
                        "cannot decrypt the shared session record (is auth.shared.encryption_key_file the fleet's key?); this replica logs in on its own and never overwrites the record"
                    );
                }
                self.unreadable = Some((kid, generation));
                false
            }
        }
    }

    /// Notes the generation published before a renewal step.
    pub(in crate::auth) fn before_renewal(&mut self, r: &Renewer) {
        self.generation_before = r.slot.generation();
    }

    /// After a renewal step: an owner shares a new session, or, when none came, tells the fleet
    /// when the next attempt may be made (`next`); anyone else now serves its own.
    pub(in crate::auth) async fn after_renewal(&mut self, r: &mut Renewer, next: &Planned) {
        let g = r.slot.generation();
        let owner = self.role == Some(Role::Owner) && self.fence.is_some();
        if g == self.generation_before {
            if owner && r.failures > 0 {
                let b = Backoff {
                    until_us: next.at.micros(),
                    failures: r.failures,
                    generation: self.last_generation,
                };
                let _ = self.store.set_backoff(&r.tenant_id, b).await;
            }
            return;
        }
        if owner {
            self.share_current(r).await;
        } else {
            self.set_source(r, Source::Local);
        }
    }

    /// Writes the current session as the next generation (owner only).
    pub(super) async fn share_current(&mut self, r: &mut Renewer) {
        let tenant = r.tenant_id.clone();
        let (Some(fence), Some(s)) = (self.fence, r.slot.current()) else {
            return;
        };
        let store = self.store.clone();
        let generation = self.last_generation + 1;
        match store.write(&tenant, fence, generation, &s).await {
            Ok(true) => {
                self.last_generation = generation;
                self.max_fence = self.max_fence.max(fence);
                self.refused = 0;
                self.adopted = Some((generation, fence));
                self.writer_offset = None;
                self.newest_obtained = self.newest_obtained.max(Local::from_system(s.obtained_at));
                self.set_source(r, Source::Shared);
                tracing::debug!(generation, "shared session written");
            }
            Ok(false) => {
                // Refused (the lease or the record belongs to another owner, or the lease's
                // fence is older than the record's): follow; the next look comes at the usual
                // pace (it takes a fresh fence if this replica still holds the lease), and the
                // line is logged at most once a minute.
                self.refused = self.refused.saturating_add(1);
                let now = Instant::now();
                if self
                    .refused_logged
                    .is_none_or(|t| now - t >= REFUSED_LOG_EVERY)
                {
                    tracing::info!(
                        refused = self.refused,
                        "the shared record belongs to a newer owner; not written, following it"
                    );
                    self.refused_logged = Some(now);
                    self.refused = 0;
                }
                self.set_owner(r, None);
                self.set_source(r, Source::Local);
            }
            Err(_) => {
                self.set_source(r, Source::Local);
            }
        }
    }

    /// At the end (shutdown): give the lease up so another replica takes over at once.
    pub(in crate::auth) async fn leave(&mut self, r: &mut Renewer) {
        if self.fence.is_some() {
            self.store.release(&r.tenant_id).await;
            self.set_owner(r, None);
        }
    }
}
