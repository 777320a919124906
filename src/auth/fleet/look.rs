//! A look at the store, the fleet's side of the renewal loop: read a snapshot (I/O), adopt a
//! newer record, take the lease when [`lease_step`] says so, then [`decide`] (pure) and apply
//! the decision (I/O, metrics, plan edits).

use std::time::{Duration, Instant, SystemTime};

use super::record::Lease;
use super::role::{
    decide, follower_takeover, lease_step, owner_grace_us, Decision, LeaseStep, Look, Role, Source,
};
use super::state::FleetState;
use crate::auth::coordination::Turn;
use crate::auth::plan::{window_surely_open, Planned, Step};
use crate::auth::renewer::Renewer;
use crate::time::{us, Local};

/// While waiting for the owner's renewal after a 401, the record is read this often.
const FOLLOW_POLL: Duration = Duration::from_millis(50);

impl FleetState {
    /// Looks at the store (at start, every poll interval, before a due renewal): adopts a newer
    /// shared session, takes or extends the lease when it may, and says whether this replica
    /// renews now. `next` is the renewal plan, replanned when the role changes.
    pub(in crate::auth) async fn look(&mut self, r: &mut Renewer, next: &mut Planned) -> Turn {
        if r.slot.is_ending() {
            // Shutting down: no new lease (the loop sees the end next).
            return Turn::Wait;
        }
        let tenant = r.tenant_id.clone();
        let store = self.store.clone();
        self.next_look = Local::now() + store.settings.poll_interval;
        self.hold_until = Local::from_micros(0);
        let mut renew_requested = None;
        let mut backoff = None;
        let role = match store.snapshot(&tenant).await {
            // An authenticated rejected-credentials hold from the last look stays until its
            // retry time (at most 5 min): the store cannot say it is over.
            Err(failure) => self.store_failed(r, failure),
            Ok(snap) => {
                if !self.store_up {
                    tracing::info!("session store answering again");
                }
                self.store_up = true;
                renew_requested = snap.renew_requested;
                let readable = match snap.record {
                    None => {
                        self.unreadable = None;
                        true
                    }
                    Some(record) => self.consider(r, record, next),
                };
                // A backoff written before the newest record is over (a replay).
                backoff = snap
                    .backoff
                    .filter(|b| b.generation >= self.last_generation);
                self.note_staleness(r);
                self.apply_marker(r, snap.rejected.as_ref());
                let yielded = self.yielded_until.is_some_and(|t| Instant::now() < t);
                match lease_step(readable, r.held_back(), yielded, self.owns_lease()) {
                    LeaseStep::Shun => {
                        if self.owns_lease() {
                            store.release(&tenant).await;
                            self.set_owner(r, None);
                        }
                        Role::Alone
                    }
                    LeaseStep::StandBack { give_way } => {
                        // Gave the lease up after failing, or holding credentials FinHub
                        // rejected: another replica's turn.
                        if give_way {
                            self.give_way_rejected(r).await;
                        }
                        Role::Follower
                    }
                    LeaseStep::Acquire => match store.acquire(&tenant, self.max_fence).await {
                        Ok(Lease::Held(fence)) => {
                            self.set_owner(r, Some(fence));
                            Role::Owner
                        }
                        Ok(Lease::Other) => {
                            self.set_owner(r, None);
                            if self.stranded(backoff.is_some()) {
                                self.fallback("no usable session and no newer shared record for longer than auth.shared.lease_ttl; the lease holder is not renewing")
                            } else {
                                Role::Follower
                            }
                        }
                        Ok(Lease::Corrupt) => {
                            self.set_owner(r, None);
                            self.fallback("the renewal lease or fence in Redis is not one a sidecar writes (garbage, no TTL, another type, or a fence beyond 2^53)")
                        }
                        Err(failure) => self.store_failed(r, failure),
                    },
                }
            }
        };
        let now = SystemTime::now();
        let now_local = Local::from_system(now);
        let usable = r.slot.usable(now);
        let previous = self.role;
        self.role = Some(role);
        if role == Role::Owner {
            // Extend the lease well before it ends.
            let extend = now_local.plus_us(us(store.settings.lease_ttl) / 3);
            self.next_look = self.next_look.min(extend);
        }
        self.show(r);
        let acts = matches!(role, Role::Owner | Role::Alone);
        if acts
            && previous != Some(role)
            && matches!(previous, Some(Role::Follower | Role::Waiting))
        {
            // Taking over: plan from the session as it is.
            *next = match &usable {
                Some(s) => r.plan_for(s, now_local),
                None => Planned {
                    step: Step::Login,
                    at: now_local,
                },
            };
        }
        if role == Role::Owner
            && !matches!(previous, Some(Role::Owner | Role::Follower | Role::Waiting))
            && r.failures == 0
        {
            // Taking the lease with a session renewed alone (a store outage, the first look):
            // its plan left the followers no grace ([`Renewer::plan_for`]); an earlier one
            // does (a backoff is not shortened: no failures).
            if let Some(s) = &usable {
                let p = r.plan_for(s, now_local);
                if p.step == next.step && p.at < next.at {
                    *next = p;
                }
            }
        }
        if let (Role::Owner, Some(b)) = (role, backoff) {
            // The fleet's backoff (an earlier owner's failures): FinHub asked the fleet, not
            // one replica, to slow down. Held for this look only, and never past the moment
            // this replica's own session must be renewed.
            let mut until = Local::from_micros(b.until_us);
            if let Some(left) = r.usable_for(usable.as_deref(), now) {
                until = until.min(now_local + left);
            }
            r.failures = r.failures.max(b.failures);
            self.hold_until = until;
        }
        let forced = r.slot.forced_pending();
        if role == Role::Owner && usable.is_some() && self.source == Source::Local {
            // Ours, not yet shared (after a store outage or a lost write): share it (an owner
            // with a usable session never yields, so this comes before the decision, which
            // then sees the generation written).
            self.share_current(r).await;
        }
        if role == Role::Follower && !forced {
            self.asked = None;
        }
        // A follower with the shared session: the owner renews it at its plan. When that has
        // passed with no newer record (an owner that is stuck, a lease held by no sidecar, an
        // old record restored), this replica renews on its own, before its token becomes
        // unusable. The plan as the owner made it (not moved to now: a refresh planned inside
        // FinHub's window stays a refresh): on the writer's estimate of FinHub's clock, with
        // the shortest lead a sidecar plans with (so never sooner than the owner's plan).
        let owners = usable
            .as_deref()
            .filter(|_| role == Role::Follower)
            .map(|s| {
                let planned = r.owner_plan(s, self.writer_offset);
                let latest = r
                    .usable_for(Some(s), now)
                    .map_or(now_local, |l| now_local + l);
                let opens = window_surely_open(
                    s.timing(),
                    self.writer_offset.unwrap_or_else(|| s.clock.bounds()),
                );
                let at = follower_takeover(
                    planned,
                    opens,
                    latest,
                    owner_grace_us(s.validity),
                    backoff.map_or(Local::from_micros(0), |b| Local::from_micros(b.until_us)),
                );
                (planned, at)
            });
        let look = Look {
            role,
            usable: usable.is_some(),
            forced,
            renew_requested,
            next_at: next.at,
            takeover: owners.map_or(Local::MAX, |o| o.1),
            now: now_local,
            ..self.facts(r)
        };
        match decide(&look) {
            Decision::Renew => Turn::Renew,
            Decision::Wait { plan_at } => {
                if let Some(at) = plan_at {
                    next.at = at;
                }
                Turn::Wait
            }
            Decision::Yield => {
                // This replica cannot reach FinHub (connect, TLS, egress: its own path): give
                // the lease to another replica for a turn.
                tracing::warn!(failures = r.failures, "no session after repeated failures; giving the renewal lease to another replica");
                store.release(&tenant).await;
                self.set_owner(r, None);
                r.failures = 0;
                self.role = Some(Role::Follower);
                self.yielded_until = Some(Instant::now() + store.settings.poll_interval * 3);
                next.at = self.next_look;
                self.show(r);
                Turn::Wait
            }
            Decision::Honour(request) => {
                tracing::info!(
                    generation = request.generation,
                    "another replica's request was refused by FinHub: renewing the shared session"
                );
                self.honoured = Some(request);
                r.slot.force_renewal();
                Turn::Renew
            }
            Decision::OwnerSilent { generation } => {
                tracing::warn!(generation, "the owner did not renew the refused shared session within auth.shared.follow_timeout; renewing on our own");
                self.asked = None;
                Turn::Renew
            }
            Decision::AskOwner { generation } => {
                tracing::info!(
                    generation,
                    "FinHub refused the shared session here; asking the owner to renew it"
                );
                let ok = store.ask_renewal(&tenant, generation).await.is_ok();
                self.asked = Some((Instant::now(), generation));
                if !ok {
                    return Turn::Renew;
                }
                self.await_owner(next, now_local)
            }
            Decision::AwaitOwner => self.await_owner(next, now_local),
            Decision::TakeOver => {
                let generation = self.adopted.map(|a| a.0);
                self.renewed_alone = generation;
                tracing::warn!(generation = generation.unwrap_or(0), "no newer shared session after its refresh point; renewing on our own before the token becomes unusable");
                if let Some((planned, _)) = owners {
                    *next = planned;
                }
                Turn::Renew
            }
        }
    }

    /// Looks again shortly for the owner's renewal of a refused session.
    fn await_owner(&mut self, next: &mut Planned, now: Local) -> Turn {
        self.next_look = now + FOLLOW_POLL;
        next.at = self.next_look;
        Turn::Wait
    }

    /// The facts [`decide`] reads that this state and the renewer hold (the look's own —
    /// role, session, plan, request, now — are filled in by [`FleetState::look`]).
    fn facts(&self, r: &Renewer) -> Look {
        let generation = self.adopted.map(|(g, _)| g);
        Look {
            role: Role::Waiting,
            usable: false,
            source: self.source,
            forced: false,
            failures: r.failures,
            last_failure_local: r.last_failure_local,
            renew_requested: None,
            honoured: self.honoured,
            adopted: generation,
            forced_allowed: r.forced_allowed(),
            held_back: r.held_back(),
            next_at: Local::from_micros(0),
            hold_until: self.hold_until,
            next_look: self.next_look,
            asked: self
                .asked
                .map(|(since, g)| (g, since.elapsed() >= self.store.settings.follow_timeout)),
            renewed_alone: self.renewed_alone.is_some() && self.renewed_alone == generation,
            takeover: Local::MAX,
            now: Local::from_micros(0),
        }
    }
}
