//! The seam between the renewal loop ([`super::renew`]) and other replicas: a tenant renews
//! alone ([`Coordination::Solo`]) or as one of a fleet sharing its session over Redis
//! ([`Coordination::Fleet`], `auth.session_store = "redis"`). The loop does the renewals; the
//! coordination is asked at its few points: at start, before sleeping (when to wake), after
//! waking ([`Coordination::look`]: renew now or wait), around a renewal, and at the end.

use std::sync::Arc;

use super::fleet::{FleetState, FleetStore, Heartbeat};
use super::plan::Planned;
use super::renewer::Renewer;
use crate::time::Local;

/// What the renewal loop does after a look at the other replicas.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Turn {
    /// Nothing to renew now: sleep until the next look (or the plan).
    Wait,
    /// Renew now (the plan is due, or a renewal was forced).
    Renew,
}

/// How a tenant's renewals are coordinated with other replicas.
pub(super) enum Coordination {
    /// No shared store: this replica renews its own session at its plan.
    Solo,
    /// A fleet sharing one session per tenant through the store (lease, record, followers).
    Fleet(Box<FleetState>),
}

impl Coordination {
    /// Solo without a store, else the fleet's view of `store` for one tenant.
    pub(super) fn new(store: Option<Arc<FleetStore>>) -> Coordination {
        match store {
            Some(store) => Coordination::Fleet(Box::new(FleetState::new(store))),
            None => Coordination::Solo,
        }
    }

    /// Before the first renewal (a fleet waits, bounded, for the store's first connection).
    pub(super) async fn start(&mut self, r: &mut Renewer) {
        if let Coordination::Fleet(f) = self {
            f.start(r).await;
        }
    }

    /// When the loop wakes next for a plan due at `at` (a fleet also wakes to look).
    pub(super) fn wake(&self, at: Local) -> Local {
        match self {
            Coordination::Solo => at,
            Coordination::Fleet(f) => f.wake(at),
        }
    }

    /// After waking: whether this replica renews now. `next` is the renewal plan, which a
    /// fleet may move (its role changed, a shared session was adopted).
    pub(super) async fn look(&mut self, r: &mut Renewer, next: &mut Planned) -> Turn {
        match self {
            Coordination::Solo => Turn::Renew,
            Coordination::Fleet(f) => f.look(r, next).await,
        }
    }

    /// A renewal starts (the flight lock is held): a lease owner keeps its lease alive.
    pub(super) fn before_renewal(&mut self, r: &mut Renewer) -> Option<Heartbeat> {
        match self {
            Coordination::Solo => None,
            Coordination::Fleet(f) => {
                f.before_renewal(r);
                f.heartbeat(r)
            }
        }
    }

    /// The renewal call returned (the flight lock is still held): stop the heartbeat.
    pub(super) fn renewed(&mut self, r: &mut Renewer, beat: Option<Heartbeat>) {
        if let Coordination::Fleet(f) = self {
            f.heartbeat_done(r, beat);
        }
    }

    /// After a renewal step, with the plan it produced: a lease owner shares the new session
    /// (or the fleet's backoff).
    pub(super) async fn after_renewal(&mut self, r: &mut Renewer, next: &Planned) {
        if let Coordination::Fleet(f) = self {
            f.after_renewal(r, next).await;
        }
    }

    /// The end (shutdown): a lease owner gives its lease up.
    pub(super) async fn leave(&mut self, r: &mut Renewer) {
        if let Coordination::Fleet(f) = self {
            f.leave(r).await;
        }
    }
}
