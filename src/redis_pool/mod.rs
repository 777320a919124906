//! A small pool of multiplexed Redis connections, shared by the Redis users (the fleet-wide
//! rate limit, `policy::redis_limit`, and the fleet-shared session store, `auth::fleet`).
//!
//! - Each pooled connection lives in an `ArcSwapOption` slot kept by one background task
//!   ([`Pool::keep_connected`]): connect with a timeout (the password as it is now, TLS with the
//!   configured CA), load the pool's scripts, check the connection with `PING` every
//!   [`HEALTH_INTERVAL`], discard a broken or hung one and reconnect with backoff and jitter
//!   ([`MIN_RECONNECT`] to [`MAX_RECONNECT`]).
//! - A caller never connects and never takes a lock: [`Pool::call`] picks a connected slot
//!   round robin, or fails at once with [`Failure::Unavailable`]. Every call is bounded by the
//!   pool's timeout; a connection that drops, or times out [`BREAK_AFTER_TIMEOUTS`] calls in a
//!   row, is discarded and re-established in the background.
//! - **High availability** is owned here, for every user at once (`RedisTopology`):
//!   - *Sentinel*: each connect asks the Sentinels in turn (`SENTINEL get-master-addr-by-name`),
//!     connects to the address named and checks with `ROLE` that it is a primary before any
//!     call uses it (a replica is never written to). A connection is discarded, and the next
//!     connect resolves again, on a dropped connection, `READONLY`, `MASTERDOWN`, a health
//!     check whose `ROLE` is no longer `master`, and on Sentinel's `+switch-master` (one
//!     subscribed Sentinel connection per pool, [`Pool::keep_connected`]). The `redis` crate's
//!     `SentinelClient` is not used: it does not follow a failover (redis-rs #1438).
//!   - *Cluster*: the crate's cluster client (`MOVED`/`ASK`, slot refresh); the users put
//!     every key of one tenant under one hash tag ([`Pool::tenant_key`]) so each script
//!     touches one slot.

mod connector;
mod metrics;
mod pool;
mod view;

pub use connector::{Conn, CLUSTER_RETRIES};
pub use metrics::{PoolName, RedisPoolMetrics};
pub use pool::{
    tenant_key, Failure, Pool, PoolSpec, BREAK_AFTER_TIMEOUTS, HEALTH_INTERVAL, MAX_RECONNECT,
    MIN_RECONNECT,
};
pub use view::{PoolView, PoolViews};
