//! Fleet-shared sessions (`auth.session_store = "redis"`): one FinHub session per tenant for
//! every replica that uses the same Redis and key prefix.
//!
//! - **Lease.** One replica at a time owns a tenant's renewals: it holds
//!   `<prefix><tenant>:lease` (`<replica>:<fence>`, set `NX PX lease_ttl`, extended by its
//!   owner), where the fence comes from `INCR <prefix><tenant>:fence`, so every new owner has a
//!   higher one. The owner renews (refresh or login, the same plan as a single replica) and
//!   writes the session with [`WRITE_SCRIPT`], which refuses a writer that no longer holds the
//!   lease or whose fence or generation is not newer than the record's: a paused or
//!   partitioned former owner cannot overwrite a newer session.
//! - **Record.** `<prefix><tenant>:session`, a hash: `v`, `kid` (key id), `nonce`, `ct`
//!   (AES-256-GCM ciphertext of the token, refresh token, session id and expiry data, base64),
//!   `gen`, `fence`, `owner`; it expires with the session. Only ciphertext of a secret is ever
//!   in Redis; the associated data binds it to its key, tenant, generation and fence.
//! - **Followers** read the record (with the lease and renewal requests, one pipelined round
//!   trip) at start and every `poll_interval`, and publish a newer one into the tenant's slot:
//!   the data path is unchanged. A replica never logs in while a readable shared session is
//!   usable.
//! - **401 on a follower**: it asks the owner (`<prefix><tenant>:renew` = the generation FinHub
//!   refused) and waits up to `follow_timeout` for a newer generation, then renews on its own.
//! - **Steering values** (`:renew`, `:backoff`, `:rejected`) carry an HMAC tag under a key
//!   derived from the session key ([`KeyRing::sign`]) and are bounded by what a sidecar writes;
//!   they are re-read at every look and never kept, and none keeps a follower from renewing its
//!   own session before it becomes unusable (`role::own_renewal_at`).
//! - **Failures**: store unavailable → keep the last good session, renew on its own when due
//!   (`on_store_error = "local"`) or never (`"wait"`); a record this replica cannot decrypt →
//!   error metric and a log line naming the key id, own login, and it never takes the lease (so
//!   never overwrites a record the others can read) while that record lives.
//!
//! Layout: `store.rs` the Redis I/O ([`FleetStore`]), `record.rs` what is stored (parsing,
//! steering values, the encrypted payload), the keys in `crate::sealing`, `role.rs` the pure role
//! decision (`decide`), `state.rs` one tenant's [`FleetState`] and its bookkeeping, `status.rs` what
//! `/status` shows of it ([`FleetStatus`]), `look.rs`
//! a look at the store (read, decide, apply): the fleet side of
//! [`crate::auth::coordination`]'s seam; `metrics.rs` the store's and the fleet's metrics
//! ([`FleetMetrics`]).

mod look;
pub mod metrics;
mod record;
mod role;
mod state;
mod status;
mod store;

pub use crate::sealing::{KeyRing, OpenError, Sealed, SessionKey};
pub use metrics::FleetMetrics;
pub(in crate::auth) use role::owner_grace_us;
pub(in crate::auth) use state::{FleetState, Heartbeat};
pub use status::FleetStatus;
pub use store::{
    FleetStore, ACQUIRE_SCRIPT, MAX_FIELD_BYTES, READ_SCRIPT, RELEASE_SCRIPT, WRITE_SCRIPT,
};
