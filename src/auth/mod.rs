//! FinHub sessions: one per tenant, obtained and renewed in the background.
//!
//! Each tenant has a [`SessionSlot`] holding the current [`FinHubSession`] as an immutable
//! snapshot (`ArcSwapOption`). A background task per tenant ([`run_tenant`]) logs in, renews the
//! token inside FinHub's refresh window (refresh endpoint with the JWT's `internalTokenKey`, or
//! a fresh login when that is not possible or fails), and retries failures: quickly while the
//! tenant has no usable session, with exponential backoff while it still has one. At graceful
//! shutdown [`end_all`] ends every session (a logout, or, in a fleet, giving the leases up).
//! The request path only loads the snapshot and checks its expiry; it never waits on a lock
//! and never sends a token it knows is expired.
//!
//! Times: a session's expiry is the JWT `exp`, on FinHub's clock; `expires_in` is only a
//! fallback (opaque tokens) and a sanity bound. FinHub's clock offset is estimated from its
//! `Date` headers ([`clock::ClockOffset`]) as an interval; the expiry check uses its upper
//! bound (never send a token FinHub may consider expired), the refresh plan both bounds
//! (`plan.rs`).
//!
//! The renewal loop (`renew.rs`) holds two things: the tenant's renewal state and calls
//! (`renewer.rs`: login, refresh, publish, plan) and its seam to other replicas,
//! `coordination.rs`: `Solo`, or `Fleet` over the Redis store ([`fleet`]), whose role decision
//! is a pure function (`fleet/role.rs`). The seam edits the state; the state does not know the
//! seam. Auth's metrics are in `metrics.rs` ([`metrics::AuthMetrics`]), the fleet's in
//! `fleet/metrics.rs`.

pub mod client;
pub mod clock;
mod coordination;
mod expiry;
pub mod fleet;
pub mod grant;
pub mod metrics;
mod plan;
mod renew;
mod renewer;
mod session;
mod shutdown;
mod slot;

pub use renew::run_tenant;
pub use session::FinHubSession;
pub use shutdown::{end_all, Ending};
pub use slot::{SessionSlot, SessionTable, TenantStatus};
