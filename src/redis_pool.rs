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

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use prometheus::{Counter, IntCounter, IntGauge};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, Pipeline, RedisError,
    RedisFuture, RedisResult, Script, TlsCertificates, Value,
};
use tokio::sync::Notify;

use crate::config::{RedisTopology, SentinelTopology};
use crate::metrics::Metrics;
use crate::secret::SecretSource;

/// A connection that times out this many calls in a row is discarded and re-established.
pub const BREAK_AFTER_TIMEOUTS: u32 = 3;

/// First reconnect delay after a failed connect; doubles up to [`MAX_RECONNECT`].
pub const MIN_RECONNECT: Duration = Duration::from_millis(50);

/// Longest delay between reconnect attempts (so recovery takes at most about this long).
pub const MAX_RECONNECT: Duration = Duration::from_secs(1);

/// How often each pooled connection is checked with `PING` (`ROLE` with Sentinel), bounded
/// by `connect_timeout`.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Tries of one cluster call (redirections and retries included) before it fails.
pub const CLUSTER_RETRIES: u32 = 3;

/// Resolution of `finhub_sidecar_redis_fallback_seconds_total`.
const FALLBACK_TICK: Duration = Duration::from_millis(100);

/// Why a Redis call gave no answer (the `kind` label of the users' error counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No usable connection: failed at once, without waiting.
    Unavailable,
    /// No answer within the timeout.
    Timeout,
    /// The connection broke.
    Connection,
    /// Redis answered with an error (script, auth, OOM, …) or something unexpected.
    Response,
}

impl Failure {
    /// The metric label of this failure.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Unavailable => "unavailable",
            Failure::Timeout => "timeout",
            Failure::Connection => "connection",
            Failure::Response => "response",
        }
    }
}

/// A connection handed to [`Pool::call`]: one server's multiplexed connection (single or
/// Sentinel mode) or the cluster client. Cheap to clone; use it as any
/// `redis::aio::ConnectionLike`.
#[derive(Clone)]
pub enum Conn {
    /// One server (the resolved primary with Sentinel).
    Single(MultiplexedConnection),
    /// Redis Cluster: routes each command by its keys' slot, follows `MOVED` and `ASK`.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// What one pool shows on `/status`: its mode, the primary in use and its role.
pub struct PoolView {
    /// `rate_limit` or `session_store`.
    pub pool: &'static str,
    /// `single`, `sentinel` or `cluster`.
    pub mode: &'static str,
    state: Mutex<ViewState>,
    connected: AtomicUsize,
}

#[derive(Default, Clone)]
struct ViewState {
    primary: Option<String>,
    role: Option<String>,
    failovers: u64,
}

impl PoolView {
    /// The `/status` entry: mode, primary address, its role as last checked, connections,
    /// failovers followed. Addresses and roles only, never a credential.
    pub fn report(&self) -> serde_json::Value {
        let st = match self.state.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        };
        serde_json::json!({
            "pool": self.pool,
            "mode": self.mode,
            "primary": st.primary,
            "role": st.role,
            "connections": self.connected.load(Ordering::Relaxed),
            "failovers_followed": st.failovers,
        })
    }
}

/// Every pool's view, for `/status` (held by [`Metrics`]).
#[derive(Default)]
pub struct PoolViews(Mutex<Vec<Arc<PoolView>>>);

impl PoolViews {
    /// Every pool's `/status` entry.
    pub fn report(&self) -> Vec<serde_json::Value> {
        match self.0.lock() {
            Ok(v) => v.iter().map(|p| p.report()).collect(),
            Err(p) => p.into_inner().iter().map(|p| p.report()).collect(),
        }
    }

    fn add(&self, view: Arc<PoolView>) {
        match self.0.lock() {
            Ok(mut v) => v.push(view),
            Err(p) => p.into_inner().push(view),
        }
    }
}

/// How to reach Redis and how large the pool is.
pub struct PoolSpec {
    /// Address, TLS, database and user name (never a password); with Sentinel or Cluster the
    /// template of every node's connection.
    pub connection: ConnectionInfo,
    /// One server, Sentinel or Cluster.
    pub topology: RedisTopology,
    /// `rate_limit` or `session_store`: the `pool` label of the pool's metrics.
    pub name: &'static str,
    /// Where the pool's primary, failover and fallback metrics and its `/status` view go.
    pub metrics: Metrics,
    /// Password, re-read at each connect.
    pub password: Option<SecretSource>,
    /// PEM CA bundle for `rediss://` (system roots otherwise).
    pub ca_pem: Option<Vec<u8>>,
    /// Longest a (background) connect may take.
    pub connect_timeout: Duration,
    /// Longest one call may take.
    pub timeout: Duration,
    /// Pooled multiplexed connections.
    pub connections: usize,
    /// Scripts loaded on every new connection (so the first `EVALSHA` after a Redis restart
    /// needs one round trip).
    pub scripts: Vec<Script>,
    /// Counts the connections held.
    pub gauge: IntGauge,
    /// What the pool is for, in log lines (`rate limits`, `session store`).
    pub purpose: &'static str,
    /// What happens meanwhile while Redis cannot answer, in log lines.
    pub meanwhile: &'static str,
}

/// The pool. Cheap to share (`Arc`); [`Pool::keep_connected`] must run in the background for
/// it to ever reach Redis.
pub struct Pool {
    slots: Box<[Slot]>,
    next: AtomicUsize,
    timeout: Duration,
    connector: Connector,
    scripts: Vec<Script>,
    gauge: IntGauge,
    purpose: &'static str,
    meanwhile: &'static str,
    view: Arc<PoolView>,
    pool_metrics: PoolMetrics,
}

struct PoolMetrics {
    metrics: Metrics,
    name: &'static str,
    failovers: IntCounter,
    fallback_seconds: Counter,
}

struct Slot {
    conn: ArcSwapOption<Conn>,
    /// The address this slot's connection reaches (the primary it resolved).
    primary: ArcSwapOption<String>,
    broken: Notify,
    timeouts: AtomicU32,
    /// Whether the current connection has answered a call or a `PING` (reset at each connect).
    served: AtomicBool,
    /// Whether a Redis error answer was logged for the current connection.
    error_logged: AtomicBool,
}

struct Connector {
    topology: RedisTopology,
    /// The Sentinel that answered last (asked first next time).
    sentinel_next: AtomicUsize,
    connection: ConnectionInfo,
    password: Option<SecretSource>,
    ca_pem: Option<Vec<u8>>,
    connect_timeout: Duration,
    response_timeout: Duration,
    options: AsyncConnectionConfig,
}

impl Pool {
    /// A pool for `spec`, with no connection yet.
    pub fn new(spec: PoolSpec) -> Pool {
        let slots = (0..spec.connections.max(1))
            .map(|_| Slot {
                conn: ArcSwapOption::empty(),
                primary: ArcSwapOption::empty(),
                broken: Notify::new(),
                timeouts: AtomicU32::new(0),
                served: AtomicBool::new(false),
                error_logged: AtomicBool::new(false),
            })
            .collect();
        let view = Arc::new(PoolView {
            pool: spec.name,
            mode: spec.topology.mode(),
            state: Mutex::new(ViewState::default()),
            connected: AtomicUsize::new(0),
        });
        spec.metrics.redis_pools.add(view.clone());
        let pool_metrics = PoolMetrics {
            failovers: spec.metrics.redis_failovers.with_label_values(&[spec.name]),
            fallback_seconds: spec
                .metrics
                .redis_fallback_seconds
                .with_label_values(&[spec.name]),
            metrics: spec.metrics,
            name: spec.name,
        };
        Pool {
            slots,
            next: AtomicUsize::new(0),
            timeout: spec.timeout,
            view,
            pool_metrics,
            connector: Connector {
                topology: spec.topology,
                sentinel_next: AtomicUsize::new(0),
                // Calls are tiny and latency-bound: no Nagle delay behind an unacknowledged one.
                connection: spec
                    .connection
                    .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true)),
                password: spec.password,
                ca_pem: spec.ca_pem,
                connect_timeout: spec.connect_timeout,
                response_timeout: spec.timeout,
                options: AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(spec.connect_timeout))
                    .set_response_timeout(Some(spec.timeout)),
            },
            scripts: spec.scripts,
            gauge: spec.gauge,
            purpose: spec.purpose,
            meanwhile: spec.meanwhile,
        }
    }

    /// Keeps every pooled connection established, forever (run it as a background task);
    /// with Sentinel also listens for `+switch-master`; counts the time without a connection.
    pub async fn keep_connected(self: Arc<Self>) {
        let mut tasks = tokio::task::JoinSet::new();
        if let RedisTopology::Sentinel(s) = &self.connector.topology {
            let pool = self.clone();
            let sentinel = s.clone();
            tasks.spawn(crate::supervise::supervise(
                "redis sentinel listener",
                MAX_RECONNECT,
                move || pool.clone().listen_switch_master(sentinel.clone()),
            ));
        }
        tasks.spawn(self.clone().count_fallback());
        for index in 0..self.slots.len() {
            let pool = self.clone();
            // Supervised: a panic in the connect path must not end this slot for good. A
            // panicked keeper may have left a connection behind: the next one discards it.
            tasks.spawn(crate::supervise::supervise(
                "redis connection keeper",
                MAX_RECONNECT,
                move || {
                    let pool = pool.clone();
                    async move {
                        if let Some(conn) = pool.slots[index].conn.load_full() {
                            pool.discard(index, &conn);
                        }
                        pool.keep_slot(index).await;
                    }
                },
            ));
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Connections usable right now.
    pub fn connected(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.conn.load().is_some())
            .count()
    }

    /// The Redis mode: `single`, `sentinel` or `cluster`.
    pub fn mode(&self) -> &'static str {
        self.view.mode
    }

    /// The key `<prefix><tenant>:<what>`; with Redis Cluster `<prefix>{<tenant>}:<what>`, so
    /// every key of one tenant hashes to one slot (see [`tenant_key`]).
    pub fn tenant_key(&self, prefix: &str, tenant: &str, what: &str) -> String {
        tenant_key(
            prefix,
            tenant,
            what,
            matches!(self.connector.topology, RedisTopology::Cluster { .. }),
        )
    }

    /// One call on the next usable connection, bounded by the pool's timeout; `f` gets a handle
    /// of that connection. Fails at once without a connection.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, Failure>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (index, conn) = self.pick().ok_or(Failure::Unavailable)?;
        let slot = &self.slots[index];
        let handle = Conn::clone(&conn);
        match tokio::time::timeout(self.timeout, f(handle)).await {
            Ok(Ok(v)) => {
                slot.timeouts.store(0, Ordering::Relaxed);
                slot.served.store(true, Ordering::Relaxed);
                Ok(v)
            }
            Ok(Err(e)) if e.is_timeout() => Err(self.timed_out(index, &conn)),
            Ok(Err(e)) if e.is_io_error() || e.is_connection_dropped() => {
                self.discard(index, &conn);
                Err(Failure::Connection)
            }
            Ok(Err(e)) => {
                // READONLY or MASTERDOWN: the address now leads to a replica, or a primary
                // cut off from its Sentinels (failover); a new connection resolves the primary
                // again.
                let readonly = is_readonly(&e);
                if e.is_unrecoverable_error() || readonly || e.code() == Some("MASTERDOWN") {
                    self.discard(index, &conn);
                }
                if !slot.error_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        purpose = self.purpose,
                        kind = ?e.kind(),
                        code = e.code().unwrap_or(""),
                        // Redis's text: the command's error, never its arguments or a password.
                        error = %e,
                        "redis answered with an error; {}", self.meanwhile
                    );
                }
                Err(Failure::Response)
            }
            Err(_) => Err(self.timed_out(index, &conn)),
        }
    }

    fn timed_out(&self, index: usize, conn: &Arc<Conn>) -> Failure {
        if self.slots[index].timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= BREAK_AFTER_TIMEOUTS {
            self.discard(index, conn);
        }
        Failure::Timeout
    }

    /// The next connected slot, round robin; `None` when none is connected.
    fn pick(&self) -> Option<(usize, Arc<Conn>)> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).find_map(|i| {
            let index = (start + i) % n;
            self.slots[index].conn.load_full().map(|c| (index, c))
        })
    }

    /// Takes `conn` out of slot `index` (if it is still there) and wakes the slot's keeper.
    fn discard(&self, index: usize, conn: &Arc<Conn>) {
        let slot = &self.slots[index];
        let previous = slot.conn.compare_and_swap(&Some(conn.clone()), None);
        if previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, conn)) {
            self.gauge.dec();
            self.view.connected.fetch_sub(1, Ordering::Relaxed);
            slot.broken.notify_one();
        }
    }

    /// Discards every connection that does not reach `primary` (after `+switch-master`).
    fn discard_all_but(&self, primary: &str) {
        for (index, slot) in self.slots.iter().enumerate() {
            let stale = slot
                .primary
                .load()
                .as_deref()
                .is_none_or(|p| p.as_str() != primary);
            if let (true, Some(conn)) = (stale, slot.conn.load_full()) {
                self.discard(index, &conn);
            }
        }
    }

    /// Records the primary a new connection reaches: the info metric, `/status`, and a
    /// failover followed when it differs from the one before.
    fn note_primary(&self, primary: &str, role: Option<&str>) {
        let mut st = match self.view.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        st.role = role.map(str::to_string);
        if st.primary.as_deref() == Some(primary) {
            return;
        }
        let gauge = &self.pool_metrics.metrics.redis_primary;
        if let Some(old) = st.primary.take() {
            let _ = gauge.remove_label_values(&[self.pool_metrics.name, self.view.mode, &old]);
            if self.view.mode == "sentinel" {
                st.failovers += 1;
                self.pool_metrics.failovers.inc();
                tracing::warn!(
                    purpose = self.purpose,
                    from = %old,
                    to = %primary,
                    "redis primary changed (failover followed)"
                );
            }
        }
        gauge
            .with_label_values(&[self.pool_metrics.name, self.view.mode, primary])
            .set(1);
        st.primary = Some(primary.to_string());
    }

    /// Adds the time without any usable connection to the fallback counter, forever.
    async fn count_fallback(self: Arc<Self>) {
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(FALLBACK_TICK).await;
            let now = Instant::now();
            if self.connected() == 0 {
                self.pool_metrics
                    .fallback_seconds
                    .inc_by((now - last).as_secs_f64());
            }
            last = now;
        }
    }

    /// Subscribes to `+switch-master` on one Sentinel after another, forever: a switch of
    /// this pool's master discards every connection not to the new primary (each then
    /// resolves again through the Sentinels and checks `ROLE`).
    async fn listen_switch_master(self: Arc<Self>, sentinel: SentinelTopology) {
        let mut backoff = MIN_RECONNECT;
        let mut logged = false;
        loop {
            let index = self.connector.sentinel_next.load(Ordering::Relaxed);
            let addr = &sentinel.sentinels[index % sentinel.sentinels.len()];
            match self.connector.subscribe(addr, &sentinel).await {
                Ok(mut pubsub) => {
                    backoff = MIN_RECONNECT;
                    logged = false;
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        let Ok(payload) = msg.get_payload::<String>() else {
                            continue;
                        };
                        if let Some(new) = switched_primary(&payload, &sentinel.master_name) {
                            tracing::info!(
                                purpose = self.purpose,
                                to = %new,
                                "sentinel announced a new primary (+switch-master)"
                            );
                            self.discard_all_but(&new);
                        }
                    }
                }
                Err(e) => {
                    if !logged {
                        tracing::warn!(
                            purpose = self.purpose,
                            sentinel = %format!("{}:{}", addr.0, addr.1),
                            kind = ?e.kind(),
                            "cannot subscribe to +switch-master on a sentinel; failovers are still followed on connection errors and READONLY"
                        );
                        logged = true;
                    }
                }
            }
            self.connector.sentinel_next.fetch_add(1, Ordering::Relaxed);
            sleep_backoff(&mut backoff).await;
        }
    }

    /// Connects slot `index`; checks it with `PING` every [`HEALTH_INTERVAL`] (an idle
    /// connection cut by Redis, a load balancer or a silent network is found without a caller
    /// paying for it); reconnects whenever it is discarded. A connection that was discarded
    /// before it ever answered (Redis reachable but too slow) backs off like a failed connect.
    async fn keep_slot(&self, index: usize) {
        let slot = &self.slots[index];
        let mut backoff = MIN_RECONNECT;
        // Logged states: connects failing, and connections discarded before ever answering.
        let mut down = false;
        let mut slow_logged = false;
        loop {
            match self.connector.connect().await {
                Ok(Connected {
                    mut conn,
                    primary,
                    role,
                }) => {
                    for script in &self.scripts {
                        let _ = tokio::time::timeout(
                            self.connector.connect_timeout,
                            script.load_async(&mut conn),
                        )
                        .await;
                    }
                    slot.timeouts.store(0, Ordering::Relaxed);
                    slot.served.store(false, Ordering::Relaxed);
                    slot.error_logged.store(false, Ordering::Relaxed);
                    self.note_primary(&primary, role.as_deref());
                    slot.primary.store(Some(Arc::new(primary)));
                    self.gauge.inc();
                    self.view.connected.fetch_add(1, Ordering::Relaxed);
                    slot.conn.store(Some(Arc::new(conn)));
                    down = false;
                }
                Err(e) => {
                    if !down {
                        tracing::warn!(
                            purpose = self.purpose,
                            connection = index,
                            mode = self.view.mode,
                            error = %e,
                            "redis unreachable; {} until it returns", self.meanwhile
                        );
                        down = true;
                    }
                    sleep_backoff(&mut backoff).await;
                    continue;
                }
            }
            self.watch(index).await;
            if slot.served.load(Ordering::Relaxed) {
                tracing::warn!(
                    purpose = self.purpose,
                    connection = index,
                    "redis connection lost (dropped, timing out or failing PING); reconnecting"
                );
                slow_logged = false;
                backoff = MIN_RECONNECT;
            } else {
                if !slow_logged {
                    tracing::warn!(
                        purpose = self.purpose,
                        connection = index,
                        "redis connection discarded before it answered anything (Redis slower than the configured timeout, or cut right after connecting); backing off"
                    );
                    slow_logged = true;
                }
                sleep_backoff(&mut backoff).await;
            }
        }
    }

    /// Returns once the slot's connection was discarded (by a caller or a failed `PING`).
    async fn watch(&self, index: usize) {
        let slot = &self.slots[index];
        let mut logged_up = false;
        loop {
            tokio::select! {
                _ = slot.broken.notified() => return,
                _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
            }
            let Some(conn) = slot.conn.load_full() else {
                return;
            };
            let mut handle = Conn::clone(&conn);
            let healthy = if matches!(self.connector.topology, RedisTopology::Sentinel(_)) {
                // A primary demoted without cutting its clients answers PING but is now a
                // replica: check its role instead.
                let role = tokio::time::timeout(
                    self.connector.connect_timeout,
                    redis::cmd("ROLE").query_async::<Value>(&mut handle),
                )
                .await;
                matches!(role, Ok(Ok(v)) if role_of(&v).as_deref() == Some("master"))
            } else {
                let ping = tokio::time::timeout(
                    self.connector.connect_timeout,
                    redis::cmd("PING").query_async::<String>(&mut handle),
                )
                .await;
                matches!(ping, Ok(Ok(_)))
            };
            if !healthy {
                self.discard(index, &conn);
            } else if !logged_up {
                logged_up = true;
                slot.served.store(true, Ordering::Relaxed);
                tracing::info!(purpose = self.purpose, "redis answering");
            }
        }
    }
}

/// A new connection and what it reaches.
struct Connected {
    conn: Conn,
    /// `host:port` of the server (the resolved primary with Sentinel; `cluster` with Cluster).
    primary: String,
    /// Its `ROLE` as checked at connect (`None` when it could not be asked).
    role: Option<String>,
}

/// Why a connect failed, for a log line: never a password, never wire bytes.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{}", describe(.0))]
    Redis(RedisError),
    #[error("{0}")]
    Sentinel(String),
}

fn describe(e: &RedisError) -> String {
    if e.kind() == redis::ErrorKind::Parse {
        return "answered bytes that are not the Redis protocol".into();
    }
    format!(
        "{:?}{}",
        e.kind(),
        e.code().map(|c| format!(" ({c})")).unwrap_or_default()
    )
}

impl From<RedisError> for ConnectError {
    fn from(e: RedisError) -> Self {
        ConnectError::Redis(e)
    }
}

impl Connector {
    /// A fresh connection, with the password as it is now: to the server, to the primary the
    /// Sentinels name (checked with `ROLE`), or to the cluster.
    async fn connect(&self) -> Result<Connected, ConnectError> {
        match &self.topology {
            RedisTopology::Single => {
                let mut conn = self.connect_node(self.connection.clone()).await?;
                let primary = address_of(self.connection.addr());
                // Shown on /status only: an ACL may forbid ROLE.
                let role = tokio::time::timeout(
                    self.connect_timeout,
                    redis::cmd("ROLE").query_async::<Value>(&mut conn),
                )
                .await
                .ok()
                .and_then(Result::ok)
                .and_then(|v| role_of(&v));
                Ok(Connected {
                    conn: Conn::Single(conn),
                    primary,
                    role,
                })
            }
            RedisTopology::Sentinel(s) => self.connect_via_sentinels(s).await,
            RedisTopology::Cluster { seeds } => self.connect_cluster(seeds).await,
        }
    }

    /// Asks each Sentinel in turn (the last one that answered first) for the primary, connects
    /// to it and checks its role; the first primary confirmed wins.
    async fn connect_via_sentinels(&self, s: &SentinelTopology) -> Result<Connected, ConnectError> {
        let n = s.sentinels.len();
        let first = self.sentinel_next.load(Ordering::Relaxed);
        let mut why = Vec::new();
        for i in 0..n {
            let index = (first + i) % n;
            let sentinel = &s.sentinels[index];
            let name = format!("{}:{}", sentinel.0, sentinel.1);
            let (host, port) = match self.ask_sentinel(sentinel, s).await {
                Ok(addr) => addr,
                Err(e) => {
                    why.push(format!("sentinel {name}: {e}"));
                    continue;
                }
            };
            let primary = format!("{host}:{port}");
            let info = self.connection.clone().set_addr(self.node_addr(host, port));
            let mut conn = match self.connect_node(info).await {
                Ok(c) => c,
                Err(e) => {
                    why.push(format!(
                        "primary {primary} (named by {name}): {}",
                        describe(&e)
                    ));
                    continue;
                }
            };
            let role = tokio::time::timeout(
                self.connect_timeout,
                redis::cmd("ROLE").query_async::<Value>(&mut conn),
            )
            .await;
            match role {
                Ok(Ok(v)) if role_of(&v).as_deref() == Some("master") => {
                    self.sentinel_next.store(index, Ordering::Relaxed);
                    return Ok(Connected {
                        conn: Conn::Single(conn),
                        primary,
                        role: Some("master".into()),
                    });
                }
                Ok(Ok(v)) => why.push(format!(
                    "{primary} (named by {name}) is not a primary (ROLE {}); not used",
                    role_of(&v).unwrap_or_else(|| "unreadable".into())
                )),
                Ok(Err(e)) => why.push(format!("{primary}: ROLE failed: {}", describe(&e))),
                Err(_) => why.push(format!("{primary}: ROLE timed out")),
            }
        }
        Err(ConnectError::Sentinel(format!(
            "no primary for master {:?} through {n} sentinel(s): {}",
            s.master_name,
            why.join("; ")
        )))
    }

    /// `SENTINEL get-master-addr-by-name` on one Sentinel, bounded by the connect timeout.
    async fn ask_sentinel(
        &self,
        sentinel: &(String, u16),
        s: &SentinelTopology,
    ) -> Result<(String, u16), String> {
        let ask = async {
            let mut conn = self
                .connect_node_with(self.sentinel_info(sentinel, s), false)
                .await
                .map_err(|e| describe(&e))?;
            let v = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&s.master_name)
                .query_async::<Value>(&mut conn)
                .await
                .map_err(|e| describe(&e))?;
            master_addr(&v)
        };
        match tokio::time::timeout(self.connect_timeout, ask).await {
            Ok(r) => r,
            Err(_) => Err("no answer within connect_timeout".into()),
        }
    }

    /// A pub/sub connection to one Sentinel, subscribed to `+switch-master`.
    async fn subscribe(
        &self,
        sentinel: &(String, u16),
        s: &SentinelTopology,
    ) -> RedisResult<redis::aio::PubSub> {
        let client = self.client(self.sentinel_info(sentinel, s))?;
        let subscribe = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            Ok(pubsub)
        };
        match tokio::time::timeout(self.connect_timeout, subscribe).await {
            Ok(r) => r,
            Err(_) => Err(timed_out()),
        }
    }

    /// One Sentinel's connection: TLS and CA as the nodes', database 0, no user, the
    /// Sentinels' password as it is now.
    fn sentinel_info(&self, sentinel: &(String, u16), s: &SentinelTopology) -> ConnectionInfo {
        let mut settings = redis::RedisConnectionInfo::default();
        if let Some(p) = &s.password {
            settings = settings.set_password(p.current().expose());
        }
        self.connection
            .clone()
            .set_addr(self.node_addr(sentinel.0.clone(), sentinel.1))
            .set_redis_settings(settings)
    }

    /// `host:port` with the template's TLS.
    fn node_addr(&self, host: String, port: u16) -> ConnectionAddr {
        match self.connection.addr() {
            ConnectionAddr::TcpTls { .. } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                tls_params: None,
            },
            _ => ConnectionAddr::Tcp(host, port),
        }
    }

    /// The cluster client, from the seeds (each with the template's user and database).
    async fn connect_cluster(&self, seeds: &[(String, u16)]) -> Result<Connected, ConnectError> {
        let nodes: Vec<ConnectionInfo> = seeds
            .iter()
            .map(|(h, p)| {
                self.connection
                    .clone()
                    .set_addr(self.node_addr(h.clone(), *p))
            })
            .collect();
        let mut builder = ClusterClientBuilder::new(nodes)
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.response_timeout)
            // A node answering MOVED in a loop, or a slot without a primary, fails the call
            // after a few tries instead of waiting out the crate's default 16.
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(10)
            .max_retry_wait(100)
            .tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        if let Some(u) = self.connection.redis_settings().username() {
            builder = builder.username(u);
        }
        if let Some(p) = &self.password {
            builder = builder.password(p.current().expose());
        }
        let client = builder.build()?;
        match tokio::time::timeout(self.connect_timeout, client.get_async_connection()).await {
            Ok(Ok(conn)) => Ok(Connected {
                conn: Conn::Cluster(conn),
                primary: "cluster".into(),
                role: Some("cluster".into()),
            }),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(timed_out().into()),
        }
    }

    fn client(&self, info: ConnectionInfo) -> RedisResult<Client> {
        match &self.ca_pem {
            Some(pem) => Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
            None => Client::open(info),
        }
    }

    /// A node's connection with the nodes' password as it is now.
    async fn connect_node(&self, info: ConnectionInfo) -> RedisResult<MultiplexedConnection> {
        self.connect_node_with(info, true).await
    }

    async fn connect_node_with(
        &self,
        mut info: ConnectionInfo,
        node_password: bool,
    ) -> RedisResult<MultiplexedConnection> {
        if let (true, Some(p)) = (node_password, &self.password) {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(p.current().expose());
            info = info.set_redis_settings(settings);
        }
        let client = self.client(info)?;
        match tokio::time::timeout(
            self.connect_timeout,
            client.get_multiplexed_async_connection_with_config(&self.options),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(timed_out()),
        }
    }
}

fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "connect timed out",
    ))
}

/// `host:port` of a configured address (the metric label and `/status`).
fn address_of(addr: &ConnectionAddr) -> String {
    match addr {
        ConnectionAddr::Tcp(h, p)
        | ConnectionAddr::TcpTls {
            host: h, port: p, ..
        } => {
            format!("{h}:{p}")
        }
        ConnectionAddr::Unix(p) => p.display().to_string(),
        _ => "unknown".into(),
    }
}

/// The first element of a `ROLE` answer (`master`, `slave`, `sentinel`), if it is one.
fn role_of(v: &Value) -> Option<String> {
    match v {
        Value::Array(items) => match items.first() {
            Some(Value::BulkString(b)) if b.len() <= 16 => {
                std::str::from_utf8(b).ok().map(str::to_string)
            }
            Some(Value::SimpleString(s)) if s.len() <= 16 => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// The primary's address in a `SENTINEL get-master-addr-by-name` answer; a clear reason for
/// anything else (the bytes are not quoted).
fn master_addr(v: &Value) -> Result<(String, u16), String> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok().map(str::to_string),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    match v {
        Value::Nil => Err("knows no master by that name (check the master name in url)".into()),
        Value::Array(items) if items.len() == 2 => {
            let host = text(&items[0]).filter(|h| {
                !h.is_empty()
                    && h.len() <= 255
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-:_".contains(c))
            });
            let port = text(&items[1])
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p > 0);
            match (host, port) {
                (Some(h), Some(p)) => Ok((h, p)),
                _ => Err("answered a malformed address".into()),
            }
        }
        _ => Err("answered something other than an address".into()),
    }
}

/// The new primary `ip:port` in a `+switch-master` message
/// (`<master-name> <old-ip> <old-port> <new-ip> <new-port>`) for `master`; `None` for
/// another master or a malformed message.
fn switched_primary(payload: &str, master: &str) -> Option<String> {
    let parts: Vec<&str> = payload.split(' ').collect();
    match parts.as_slice() {
        [name, _, _, ip, port] if *name == master && port.parse::<u16>().is_ok() => {
            Some(format!("{ip}:{port}"))
        }
        _ => None,
    }
}

/// `<prefix><tenant>:<what>`, or with `cluster` `<prefix>{<tenant>}:<what>`: the hash tag puts
/// every key of one tenant in one slot (Lua scripts may only touch one slot). Only Cluster
/// needs it, so single and Sentinel deployments keep their keys across this change. The
/// prefix holds no brace in cluster mode (checked by the configuration).
pub fn tenant_key(prefix: &str, tenant: &str, what: &str, cluster: bool) -> String {
    if cluster {
        format!("{prefix}{{{tenant}}}:{what}")
    } else {
        format!("{prefix}{tenant}:{what}")
    }
}

/// Sleeps the current backoff (with jitter) and doubles it up to [`MAX_RECONNECT`].
async fn sleep_backoff(backoff: &mut Duration) {
    let jitter = rand::random_range(0.5..1.0);
    tokio::time::sleep(backoff.mul_f64(jitter)).await;
    *backoff = (*backoff * 2).min(MAX_RECONNECT);
}

/// Whether `e` says the server is a read-only replica: `READONLY` as the code, or inside the
/// detail of a script error (Redis 6 and earlier answer a script's write on a replica with
/// `ERR Error running script … -READONLY …`).
fn is_readonly(e: &redis::RedisError) -> bool {
    e.code() == Some("READONLY") || e.detail().is_some_and(|d| d.contains("READONLY"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(wire: &[u8]) -> redis::RedisError {
        match redis::parse_redis_value(wire) {
            Ok(v) => v.extract_error().expect_err("an error reply"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_readonly_replica_is_recognised_also_inside_a_script_error() {
        assert!(is_readonly(&server_error(
            b"-READONLY You can't write against a read only replica.\r\n"
        )));
        // Redis 6: a script's write on a replica.
        assert!(is_readonly(&server_error(
            b"-ERR Error running script (call to f_0a1b): @user_script:3: @user_script: 3: -READONLY You can't write against a read only replica.\r\n"
        )));
        assert!(!is_readonly(&server_error(b"-ERR unknown command\r\n")));
    }

    #[test]
    fn sentinel_answers_are_an_address_or_a_clear_reason() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(
            master_addr(&Value::Array(vec![bulk("10.0.0.7"), bulk("6379")])),
            Ok(("10.0.0.7".to_string(), 6379))
        );
        let unknown = master_addr(&Value::Nil).unwrap_err();
        assert!(unknown.contains("knows no master"), "{unknown}");
        for hostile in [
            Value::Array(vec![bulk("10.0.0.7"), bulk("0")]),
            Value::Array(vec![bulk("10.0.0.7"), bulk("99999")]),
            Value::Array(vec![bulk("evil host\r\n"), bulk("6379")]),
            Value::Array(vec![bulk(""), bulk("6379")]),
            Value::Array(vec![bulk("a"), bulk("1"), bulk("2")]),
            Value::Int(7),
            bulk("10.0.0.7:6379"),
        ] {
            let why = master_addr(&hostile).unwrap_err();
            assert!(!why.contains("evil"), "{why}");
        }
        assert_eq!(
            role_of(&Value::Array(vec![bulk("master"), Value::Int(0)])),
            Some("master".into())
        );
        assert_eq!(
            role_of(&Value::Array(vec![bulk("slave")])),
            Some("slave".into())
        );
        assert_eq!(role_of(&bulk("master")), None);
    }

    #[test]
    fn switch_master_names_the_new_primary_of_our_master_only() {
        assert_eq!(
            switched_primary("mymaster 127.0.0.1 7001 127.0.0.1 7002", "mymaster"),
            Some("127.0.0.1:7002".into())
        );
        assert_eq!(
            switched_primary("other 127.0.0.1 7001 127.0.0.1 7002", "mymaster"),
            None
        );
        assert_eq!(switched_primary("mymaster garbage", "mymaster"), None);
        assert_eq!(
            switched_primary("mymaster 1 2 3 notaport", "mymaster"),
            None
        );
    }

    #[test]
    fn cluster_keys_of_one_tenant_share_a_hash_tag() {
        assert_eq!(tenant_key("p:", "acme", "session", false), "p:acme:session");
        assert_eq!(
            tenant_key("p:", "acme", "session", true),
            "p:{acme}:session"
        );
        assert_eq!(tenant_key("p:", "acme", "lease", true), "p:{acme}:lease");
    }

    #[tokio::test]
    async fn without_a_connection_a_call_fails_at_once() {
        let pool = Pool::new(PoolSpec {
            connection: redis::IntoConnectionInfo::into_connection_info("redis://127.0.0.1:1/")
                .unwrap(),
            topology: RedisTopology::Single,
            name: "rate_limit",
            metrics: Metrics::new(),
            password: None,
            ca_pem: None,
            connect_timeout: Duration::from_millis(100),
            timeout: Duration::from_millis(5),
            connections: 2,
            scripts: Vec::new(),
            gauge: IntGauge::new("g", "g").unwrap(),
            purpose: "test",
            meanwhile: "nothing",
        });
        let r: Result<String, _> = pool
            .call(|mut c| async move { redis::cmd("PING").query_async(&mut c).await })
            .await;
        assert_eq!(r, Err(Failure::Unavailable));
        assert_eq!(pool.connected(), 0);
    }
}
