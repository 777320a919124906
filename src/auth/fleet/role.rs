//! The fleet role decision, pure: what a look at the store found in, what this replica does
//! out ([`decide`]). [`super::look`] reads the store, calls these and applies the outcome.

use std::time::Duration;

use super::record::{Lease, RenewRequest};
use crate::auth::plan::{Planned, Step};
use crate::config::OnStoreError;
use crate::time::{us, Local};

/// The shortest grace a follower gives the owner's planned renewal ([`owner_grace_us`]).
const MIN_OWNER_GRACE: Duration = Duration::from_millis(50);
/// An owner without a session gives its lease to another replica after this many failed
/// attempts in a row (transient ones; rejected credentials are never rotated).
const YIELD_AFTER_FAILURES: u32 = 3;

/// What to do about the lease once the record was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LeaseStep {
    /// A live record this replica cannot read: never hold the lease (a lease held is given
    /// up, so the record is never overwritten), renew alone.
    Shun,
    /// Another replica's turn (this one gave the lease up after failing, or holds credentials
    /// FinHub rejected): follow; `give_way`: it holds the lease and must hand it over.
    StandBack { give_way: bool },
    /// Take or extend the lease.
    Acquire,
}

/// The lease step for a look that read the store: `readable` record (or none), credentials
/// `held_back` (rejected, not to be tried yet), `yielded` (the lease was given up after
/// failures, not taken again yet), `owns` the lease now.
pub(super) fn lease_step(readable: bool, held_back: bool, yielded: bool, owns: bool) -> LeaseStep {
    if !readable {
        LeaseStep::Shun
    } else if held_back || yielded {
        LeaseStep::StandBack {
            give_way: held_back && owns,
        }
    } else {
        LeaseStep::Acquire
    }
}

/// Whether an owner's renewal still holds the lease it started with, from what extending it
/// found (`None`: the store did not answer). Only this replica's lease with the same `fence`
/// keeps it; another replica's lease, a new fence (the lease was lost and taken again), a
/// corrupt lease or no answer is a fence loss: the renewal's result is kept here and never
/// written to the shared record (a write with a lost fence is what fencing refuses).
pub(super) fn fence_kept(extended: Option<Lease>, fence: u64) -> bool {
    matches!(extended, Some(Lease::Held(f)) if f == fence)
}

/// The role when the store cannot be read or the lease cannot be followed
/// (`auth.shared.on_store_error`).
pub(super) fn on_store_error(mode: OnStoreError) -> Role {
    match mode {
        OnStoreError::Wait => Role::Waiting,
        OnStoreError::Local => Role::Alone,
    }
}

/// Whether a follower is stranded: no usable session for `stale_for` (and no newer record),
/// longer than `patience` (the lease plus two polls), while no owner reports a backoff: the
/// lease holder is not renewing (stuck, or a lease written without a TTL).
pub(super) fn stranded(stale_for: Option<Duration>, patience: Duration, backoff: bool) -> bool {
    !backoff && stale_for.is_some_and(|t| t > patience)
}

/// When a follower holding the shared session renews it itself: `planned` is the owner's plan
/// as the follower works it out, `opens` where FinHub's window surely opens, `latest` the
/// follower's last moment to renew in time, `grace_us` the owner's grace, `backoff` the
/// fleet's backoff (the epoch: none). An owner whose plan is an early probe ("not refreshed"
/// answers are not shared) refreshes at the latest where the window surely opens: when that
/// is still in time here, it is the owner's renewal point. The fleet's backoff may delay the
/// takeover, never past `latest`.
pub(super) fn follower_takeover(
    planned: Planned,
    opens: Local,
    latest: Local,
    grace_us: i64,
    backoff: Local,
) -> Local {
    let owners_at = if planned.step == Step::Refresh && planned.at < opens && opens <= latest {
        opens
    } else {
        planned.at
    };
    takeover_at(owners_at, latest, grace_us)
        .max(backoff)
        .min(latest)
}

/// What a look found, as plain values (times on our clock): the input of [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Look {
    /// This replica's role after the lease step.
    pub(super) role: Role,
    /// Whether this replica has a usable session.
    pub(super) usable: bool,
    /// Where that session came from.
    pub(super) source: Source,
    /// FinHub refused the current session here (a renewal request from the request path).
    pub(super) forced: bool,
    /// Failed auth calls in a row, and whether the last failed on this replica's own path.
    pub(super) failures: u32,
    pub(super) last_failure_local: bool,
    /// Another replica's authenticated request to renew, and the last one honoured here.
    pub(super) renew_requested: Option<RenewRequest>,
    pub(super) honoured: Option<RenewRequest>,
    /// Generation of the shared record whose session is published here.
    pub(super) adopted: Option<u64>,
    /// Whether a forced renewal may go now (spacing of forced renewals).
    pub(super) forced_allowed: bool,
    /// Credentials FinHub rejected, not to be tried yet.
    pub(super) held_back: bool,
    /// The renewal plan, the fleet's backoff (the epoch: none) and the next look.
    pub(super) next_at: Local,
    pub(super) hold_until: Local,
    pub(super) next_look: Local,
    /// A follower's request to the owner: the generation asked for, and whether
    /// `follow_timeout` has passed since.
    pub(super) asked: Option<(u64, bool)>,
    /// A follower renewed the adopted generation on its own already.
    pub(super) renewed_alone: bool,
    /// When a follower with a usable shared session takes its renewal over
    /// ([`follower_takeover`]).
    pub(super) takeover: Local,
    pub(super) now: Local,
}

/// What this replica does after a look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    /// Renew now (the plan is due, or a renewal was forced).
    Renew,
    /// Nothing to do now; `plan_at`: the plan moves there (`None`: it stays).
    Wait { plan_at: Option<Local> },
    /// Owner without a session after repeated failures on its own path (connect, TLS,
    /// egress): give the lease to another replica for a turn.
    Yield,
    /// Owner: another replica's request for the shared generation: renew it, forced.
    Honour(RenewRequest),
    /// Follower refused by FinHub: ask the owner to renew `generation`.
    AskOwner { generation: u64 },
    /// Follower: asked the owner, waiting for the newer record (look again shortly).
    AwaitOwner,
    /// Follower: the owner did not renew `generation` within `follow_timeout`: renew alone.
    OwnerSilent { generation: u64 },
    /// Follower: the owner's renewal point passed with no newer record: renew alone before the
    /// token becomes unusable (takeover).
    TakeOver,
}

/// The role's decision for a look (the linkerd2-proxy `certify.rs` shape: the loop does the
/// I/O, this decides). Owner: yield after local failures, honour another replica's request
/// once, renew when due and not held by the fleet's backoff. Alone: renew when due. Waiting:
/// nothing until the next look. Follower: on a refusal ask the owner and wait for it up to
/// `follow_timeout`; with its own session (from an outage) renew when due; with the shared
/// session take over once the owner is late ([`follower_takeover`]); else wait.
pub(super) fn decide(l: &Look) -> Decision {
    let now = l.now;
    match l.role {
        Role::Owner => {
            if !l.usable && l.failures >= YIELD_AFTER_FAILURES && l.last_failure_local {
                // FinHub's own answers (429, 5xx) are never a reason: the next owner would
                // only ask again sooner.
                return Decision::Yield;
            }
            if let (Some(r), Some(mine)) = (l.renew_requested, l.adopted) {
                if r.generation == mine && l.honoured != Some(r) && !l.forced && l.forced_allowed {
                    return Decision::Honour(r);
                }
            }
            if l.forced || now >= l.next_at.max(l.hold_until) {
                Decision::Renew
            } else {
                Decision::Wait { plan_at: None }
            }
        }
        Role::Alone => {
            if l.forced || now >= l.next_at {
                Decision::Renew
            } else {
                Decision::Wait { plan_at: None }
            }
        }
        Role::Waiting => Decision::Wait {
            plan_at: Some(l.next_look),
        },
        Role::Follower => {
            if l.forced {
                let generation = l.adopted.unwrap_or(0);
                return match l.asked {
                    Some((g, true)) if g == generation => Decision::OwnerSilent { generation },
                    Some((g, false)) if g == generation => Decision::AwaitOwner,
                    _ => Decision::AskOwner { generation },
                };
            }
            if l.source == Source::Local && l.usable {
                // Our own session (from an outage), no shared one yet: keep it renewed.
                return if now >= l.next_at {
                    Decision::Renew
                } else {
                    Decision::Wait { plan_at: None }
                };
            }
            if !l.usable {
                return Decision::Wait {
                    plan_at: Some(l.next_look),
                };
            }
            if l.renewed_alone {
                // Renewed on its own already and got no new token ("not refreshed" or a
                // failure): its own plan from that answer, as for one replica.
                return if now >= l.next_at && !l.held_back {
                    Decision::Renew
                } else {
                    Decision::Wait { plan_at: None }
                };
            }
            if now >= l.takeover && !l.held_back {
                Decision::TakeOver
            } else {
                Decision::Wait {
                    plan_at: Some(l.takeover.min(l.next_look)),
                }
            }
        }
    }
}

/// Whether a readable, usable shared session obtained at `obtained` may replace the current
/// one: it must be newer than every shared session seen (`newest`), unless the current one is
/// unusable anyway.
pub(super) fn adoptable(obtained: Local, newest: Local, current_usable: bool) -> bool {
    obtained > newest || !current_usable
}

/// When a follower whose session came from the store renews it on its own: the owner's
/// renewal was planned at `planned` and the token can be renewed in time until `latest`;
/// half of the time between is the owner's (its renewal and a poll to see it),
/// the rest the follower's, so that it still renews before its token becomes unusable.
fn own_renewal_at(planned: Local, latest: Local) -> Local {
    planned.plus_us(latest.since(planned).max(0) / 2)
}

/// When a follower takes the renewal of the shared session over ([`own_renewal_at`]), but
/// never sooner than `grace_us` after the owner's planned renewal (the owner's call, its
/// write and the follower's read of the record: with short tokens half of the span can be a
/// few ms, and a follower renewing the same token as the owner is a second refresh), and
/// never after `latest`, its own last moment.
pub(super) fn takeover_at(planned: Local, latest: Local, grace_us: i64) -> Local {
    own_renewal_at(planned, latest)
        .max(planned.plus_us(grace_us))
        .min(latest.max(planned))
}

/// The owner's grace before a follower takes a renewal over ([`takeover_at`]): a fiftieth
/// of the token's validity (80 ms for 4 s tokens), at least [`MIN_OWNER_GRACE`].
pub(in crate::auth) fn owner_grace_us(validity: Duration) -> i64 {
    us(validity / 50).max(us(MIN_OWNER_GRACE))
}

/// Where the tenant's current session came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    None,
    Shared,
    Local,
}

impl Source {
    pub(super) fn label(self) -> &'static str {
        match self {
            Source::None => "none",
            Source::Shared => "shared",
            Source::Local => "local",
        }
    }
}

/// What this replica is for a tenant after a look at the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// Holds the lease: renews and writes.
    Owner,
    /// Another replica renews.
    Follower,
    /// Renews on its own (store unavailable with `on_store_error = "local"`, or a record it
    /// cannot read).
    Alone,
    /// Store unavailable with `on_store_error = "wait"`: serves what it has, renews nothing.
    Waiting,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The instant `us` µs after the epoch.
    fn t(us: i64) -> Local {
        Local::from_micros(us)
    }

    #[test]
    fn an_owner_that_lost_its_fence_mid_renewal_keeps_the_result_to_itself() {
        assert!(
            fence_kept(Some(Lease::Held(7)), 7),
            "still ours, same fence"
        );
        for (extended, why) in [
            (Some(Lease::Held(8)), "ours again, but under a new fence"),
            (Some(Lease::Other), "another replica's lease"),
            (Some(Lease::Corrupt), "a lease no sidecar writes"),
            (None, "the store did not answer"),
        ] {
            assert!(!fence_kept(extended, 7), "{why}");
        }
    }

    #[test]
    fn an_older_record_is_adopted_only_when_the_current_session_is_unusable() {
        // A replayed record, or one a failover restored: older than what was seen.
        assert!(!adoptable(t(1_000), t(2_000), true));
        assert!(!adoptable(t(2_000), t(2_000), true));
        assert!(adoptable(t(3_000), t(2_000), true));
        // Nothing usable here: an older but usable session beats none.
        assert!(adoptable(t(1_000), t(2_000), false));
    }

    #[test]
    fn a_follower_renews_on_its_own_halfway_between_the_owners_plan_and_its_last_moment() {
        assert_eq!(own_renewal_at(t(1_000), t(2_000)), t(1_500));
        assert_eq!(own_renewal_at(t(1_000), t(1_000)), t(1_000));
        // Already past the last moment: at once.
        assert_eq!(own_renewal_at(t(1_000), t(500)), t(1_000));
    }

    #[test]
    fn a_follower_gives_the_owners_plan_a_grace_before_taking_over_but_never_past_its_last_moment()
    {
        // A wide span: halfway, as before.
        assert_eq!(
            takeover_at(t(1_000_000), t(3_000_000), 80_000),
            t(2_000_000)
        );
        // A narrow one (4 s tokens, a 0.4 s window): the grace, not a few ms after the plan.
        assert_eq!(
            takeover_at(t(1_000_000), t(1_100_000), 80_000),
            t(1_080_000)
        );
        // Never after its own last moment...
        assert_eq!(
            takeover_at(t(1_000_000), t(1_030_000), 80_000),
            t(1_030_000)
        );
        // ...and a plan already past it stays the plan (the caller caps it).
        assert_eq!(takeover_at(t(1_000_000), t(900_000), 80_000), t(1_000_000));
        assert_eq!(owner_grace_us(Duration::from_secs(4)), 80_000);
        assert_eq!(owner_grace_us(Duration::from_secs(1)), 50_000);
        assert_eq!(owner_grace_us(Duration::from_secs(3600)), 72_000_000);
    }

    /// A follower at 10 s holding a usable shared session of generation 4, nothing pending.
    fn follower() -> Look {
        Look {
            role: Role::Follower,
            usable: true,
            source: Source::Shared,
            forced: false,
            failures: 0,
            last_failure_local: false,
            renew_requested: None,
            honoured: None,
            adopted: Some(4),
            forced_allowed: true,
            held_back: false,
            next_at: t(12_000_000),
            hold_until: t(0),
            next_look: t(11_000_000),
            asked: None,
            renewed_alone: false,
            takeover: t(13_000_000),
            now: t(10_000_000),
        }
    }

    fn owner() -> Look {
        Look {
            role: Role::Owner,
            ..follower()
        }
    }

    #[test]
    fn a_follower_takes_the_renewal_over_once_the_owner_is_late() {
        // Before the takeover point: wait for it (or the next look, if sooner).
        assert_eq!(
            decide(&follower()),
            Decision::Wait {
                plan_at: Some(t(11_000_000))
            }
        );
        let soon = Look {
            takeover: t(10_500_000),
            ..follower()
        };
        assert_eq!(
            decide(&soon),
            Decision::Wait {
                plan_at: Some(t(10_500_000))
            }
        );
        // Past it: take over, unless this replica's credentials are held back.
        let late = Look {
            now: t(13_000_000),
            ..follower()
        };
        assert_eq!(decide(&late), Decision::TakeOver);
        assert_eq!(
            decide(&Look {
                held_back: true,
                ..late
            }),
            Decision::Wait {
                plan_at: Some(t(11_000_000))
            }
        );
        // Renewed alone already: its own plan from then on, not a takeover per look.
        let tried = Look {
            renewed_alone: true,
            ..late
        };
        assert_eq!(decide(&tried), Decision::Renew);
        assert_eq!(
            decide(&Look {
                now: t(11_500_000),
                ..tried
            }),
            Decision::Wait { plan_at: None }
        );
        // No usable session: only the next look.
        assert_eq!(
            decide(&Look {
                usable: false,
                ..late
            }),
            Decision::Wait {
                plan_at: Some(t(11_000_000))
            }
        );
        // Its own session (from an outage), not a shared one: renewed at its plan.
        let local = Look {
            source: Source::Local,
            now: t(12_000_000),
            ..follower()
        };
        assert_eq!(decide(&local), Decision::Renew);
    }

    #[test]
    fn the_takeover_point_gives_the_owner_its_grace_and_the_fleets_backoff_within_the_last_moment()
    {
        let refresh = |at| Planned {
            step: Step::Refresh,
            at: t(at),
        };
        // The owner's plan at 1 s, the follower's last moment 1.1 s: the grace (80 ms).
        assert_eq!(
            follower_takeover(refresh(1_000_000), t(0), t(1_100_000), 80_000, t(0)),
            t(1_080_000)
        );
        // The fleet's backoff delays it, never past the last moment.
        assert_eq!(
            follower_takeover(refresh(1_000_000), t(0), t(1_100_000), 80_000, t(5_000_000)),
            t(1_100_000)
        );
        // An owner's early probe: its renewal point is where the window surely opens.
        assert_eq!(
            follower_takeover(refresh(500_000), t(900_000), t(3_000_000), 80_000, t(0)),
            t(1_950_000)
        );
        // A login plan is taken as it is.
        let login = Planned {
            step: Step::Login,
            at: t(500_000),
        };
        assert_eq!(
            follower_takeover(login, t(900_000), t(3_000_000), 80_000, t(0)),
            t(1_750_000)
        );
    }

    #[test]
    fn an_owner_hands_the_lease_over_only_after_failures_on_its_own_path() {
        let stuck = Look {
            usable: false,
            failures: 3,
            last_failure_local: true,
            ..owner()
        };
        assert_eq!(decide(&stuck), Decision::Yield);
        // FinHub's own answers (429, 5xx) are no reason: the next owner would ask sooner.
        assert_eq!(
            decide(&Look {
                last_failure_local: false,
                ..stuck
            }),
            Decision::Wait { plan_at: None }
        );
        assert_eq!(
            decide(&Look {
                failures: 2,
                ..stuck
            }),
            Decision::Wait { plan_at: None }
        );
        // With a usable session it keeps the lease.
        assert_eq!(
            decide(&Look {
                usable: true,
                ..stuck
            }),
            Decision::Wait { plan_at: None }
        );
    }

    #[test]
    fn an_owner_honours_another_replicas_request_once_and_holds_for_the_fleets_backoff() {
        let request = RenewRequest {
            generation: 4,
            at_ms: 9_000,
        };
        let asked = Look {
            renew_requested: Some(request),
            ..owner()
        };
        assert_eq!(decide(&asked), Decision::Honour(request));
        for not in [
            Look {
                honoured: Some(request),
                ..asked
            },
            Look {
                forced_allowed: false,
                ..asked
            },
            Look {
                adopted: Some(5),
                ..asked
            },
        ] {
            assert_eq!(decide(&not), Decision::Wait { plan_at: None }, "{not:?}");
        }
        // Due, but the fleet's backoff holds until 14 s; a forced renewal does not wait.
        let due = Look {
            now: t(12_500_000),
            hold_until: t(14_000_000),
            ..owner()
        };
        assert_eq!(decide(&due), Decision::Wait { plan_at: None });
        assert_eq!(
            decide(&Look {
                forced: true,
                ..due
            }),
            Decision::Renew
        );
        assert_eq!(
            decide(&Look {
                hold_until: t(0),
                ..due
            }),
            Decision::Renew
        );
    }

    #[test]
    fn a_refused_follower_asks_the_owner_then_renews_alone_after_follow_timeout() {
        let refused = Look {
            forced: true,
            ..follower()
        };
        assert_eq!(decide(&refused), Decision::AskOwner { generation: 4 });
        assert_eq!(
            decide(&Look {
                asked: Some((4, false)),
                ..refused
            }),
            Decision::AwaitOwner
        );
        assert_eq!(
            decide(&Look {
                asked: Some((4, true)),
                ..refused
            }),
            Decision::OwnerSilent { generation: 4 }
        );
        // A request about an older generation is not this one: ask again.
        assert_eq!(
            decide(&Look {
                asked: Some((3, true)),
                ..refused
            }),
            Decision::AskOwner { generation: 4 }
        );
    }

    #[test]
    fn store_errors_and_stale_leases_fall_back_per_on_store_error() {
        assert_eq!(on_store_error(OnStoreError::Wait), Role::Waiting);
        assert_eq!(on_store_error(OnStoreError::Local), Role::Alone);
        // Waiting renews nothing, even when due or forced: it looks again.
        let waiting = Look {
            role: Role::Waiting,
            forced: true,
            now: t(20_000_000),
            ..follower()
        };
        assert_eq!(
            decide(&waiting),
            Decision::Wait {
                plan_at: Some(t(11_000_000))
            }
        );
        // Alone renews at its own plan, or when forced.
        let alone = Look {
            role: Role::Alone,
            ..follower()
        };
        assert_eq!(decide(&alone), Decision::Wait { plan_at: None });
        assert_eq!(
            decide(&Look {
                forced: true,
                ..alone
            }),
            Decision::Renew
        );
        // A stale lease: no usable session for longer than the patience, no backoff reported.
        let patience = Duration::from_secs(3);
        assert!(stranded(Some(Duration::from_secs(4)), patience, false));
        assert!(!stranded(Some(Duration::from_secs(4)), patience, true));
        assert!(!stranded(Some(Duration::from_secs(2)), patience, false));
        assert!(!stranded(None, patience, false));
    }

    #[test]
    fn the_lease_is_shunned_for_an_unreadable_record_and_given_way_for_rejected_credentials() {
        // A record this replica cannot read: never hold the lease over it.
        assert_eq!(lease_step(false, false, false, true), LeaseStep::Shun);
        assert_eq!(lease_step(false, true, true, false), LeaseStep::Shun);
        // Rejected credentials: a held lease is handed over; otherwise stand back.
        assert_eq!(
            lease_step(true, true, false, true),
            LeaseStep::StandBack { give_way: true }
        );
        assert_eq!(
            lease_step(true, true, false, false),
            LeaseStep::StandBack { give_way: false }
        );
        // Gave the lease up after failing: not taken again for a while.
        assert_eq!(
            lease_step(true, false, true, true),
            LeaseStep::StandBack { give_way: false }
        );
        assert_eq!(lease_step(true, false, false, false), LeaseStep::Acquire);
    }
}
