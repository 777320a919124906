//! The pool: slots of connections kept by background tasks (connect, `PING`/`ROLE` health
//! checks, backoff), calls bounded by the timeout and never waiting for a connection, and the
//! primary each connection reaches (failovers followed).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use prometheus::IntGauge;
use redis::{AsyncConnectionConfig, ConnectionInfo, RedisResult, Script, Value};
use tokio::sync::Notify;

use super::connector::{role_of, switched_primary, Conn, Connected, Connector};
use super::metrics::{PoolName, PoolSeries, RedisPoolMetrics};
use super::view::{PoolView, ViewState};
use crate::config::{RedisTopology, SentinelTopology};
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

/// How to reach Redis and how large the pool is.
pub struct PoolSpec {
    /// Address, TLS, database and user name (never a password); with Sentinel or Cluster the
    /// template of every node's connection.
    pub connection: ConnectionInfo,
    /// One server, Sentinel or Cluster.
    pub topology: RedisTopology,
    /// Which pool: the `pool` label of its metrics.
    pub name: PoolName,
    /// Where the pool's primary, failover and fallback metrics and its `/status` view go.
    pub metrics: RedisPoolMetrics,
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
    series: PoolSeries,
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
            pool: spec.name.as_str(),
            mode: spec.topology.mode(),
            state: Mutex::new(ViewState::default()),
            connected: AtomicUsize::new(0),
        });
        let series = spec.metrics.pool(spec.name, view.clone());
        Pool {
            slots,
            next: AtomicUsize::new(0),
            timeout: spec.timeout,
            view,
            series,
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
        let old = st.primary.take();
        self.series
            .primary_changed(self.view.mode, old.as_deref(), primary);
        if let Some(old) = old {
            if self.view.mode == "sentinel" {
                st.failovers += 1;
                self.series.failover();
                tracing::warn!(
                    purpose = self.purpose,
                    from = %old,
                    to = %primary,
                    "redis primary changed (failover followed)"
                );
            }
        }
        st.primary = Some(primary.to_string());
    }

    /// Adds the time without any usable connection to the fallback counter, forever.
    async fn count_fallback(self: Arc<Self>) {
        let mut last = Instant::now();
        loop {
            tokio::time::sleep(FALLBACK_TICK).await;
            let now = Instant::now();
            if self.connected() == 0 {
                self.series.without_connection(now - last);
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
pub(super) async fn sleep_backoff(backoff: &mut Duration) {
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
            name: PoolName::RateLimit,
            metrics: RedisPoolMetrics::register(&prometheus::Registry::new()),
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
