//! A small pool of multiplexed Redis connections, shared by the Redis users (the fleet-wide
//! rate limit, `policy::redis_limit`, and the fleet-shared session store, `auth::shared`).
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

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus::IntGauge;
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionInfo, RedisError, RedisResult, Script, TlsCertificates,
};
use tokio::sync::Notify;

use crate::secret::SecretSource;

/// A connection that times out this many calls in a row is discarded and re-established.
pub const BREAK_AFTER_TIMEOUTS: u32 = 3;

/// First reconnect delay after a failed connect; doubles up to [`MAX_RECONNECT`].
pub const MIN_RECONNECT: Duration = Duration::from_millis(50);

/// Longest delay between reconnect attempts (so recovery takes at most about this long).
pub const MAX_RECONNECT: Duration = Duration::from_secs(1);

/// How often each pooled connection is checked with `PING` (bounded by `connect_timeout`).
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

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
    /// Address, TLS, database and user name (never a password).
    pub connection: ConnectionInfo,
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
}

struct Slot {
    conn: ArcSwapOption<MultiplexedConnection>,
    broken: Notify,
    timeouts: AtomicU32,
    /// Whether the current connection has answered a call or a `PING` (reset at each connect).
    served: AtomicBool,
    /// Whether a Redis error answer was logged for the current connection.
    error_logged: AtomicBool,
}

struct Connector {
    connection: ConnectionInfo,
    password: Option<SecretSource>,
    ca_pem: Option<Vec<u8>>,
    connect_timeout: Duration,
    options: AsyncConnectionConfig,
}

impl Pool {
    /// A pool for `spec`, with no connection yet.
    pub fn new(spec: PoolSpec) -> Pool {
        let slots = (0..spec.connections.max(1))
            .map(|_| Slot {
                conn: ArcSwapOption::empty(),
                broken: Notify::new(),
                timeouts: AtomicU32::new(0),
                served: AtomicBool::new(false),
                error_logged: AtomicBool::new(false),
            })
            .collect();
        Pool {
            slots,
            next: AtomicUsize::new(0),
            timeout: spec.timeout,
            connector: Connector {
                // Calls are tiny and latency-bound: no Nagle delay behind an unacknowledged one.
                connection: spec
                    .connection
                    .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true)),
                password: spec.password,
                ca_pem: spec.ca_pem,
                connect_timeout: spec.connect_timeout,
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

    /// Keeps every pooled connection established, forever (run it as a background task).
    pub async fn keep_connected(self: Arc<Self>) {
        let mut tasks = tokio::task::JoinSet::new();
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

    /// One call on the next usable connection, bounded by the pool's timeout; `f` gets a handle
    /// of that connection. Fails at once without a connection.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, Failure>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (index, conn) = self.pick().ok_or(Failure::Unavailable)?;
        let slot = &self.slots[index];
        let handle = MultiplexedConnection::clone(&conn);
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
                // READONLY: the address now leads to a replica (failover); a new connection
                // reaches the new primary.
                let readonly = is_readonly(&e);
                if e.is_unrecoverable_error() || readonly {
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

    fn timed_out(&self, index: usize, conn: &Arc<MultiplexedConnection>) -> Failure {
        if self.slots[index].timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= BREAK_AFTER_TIMEOUTS {
            self.discard(index, conn);
        }
        Failure::Timeout
    }

    /// The next connected slot, round robin; `None` when none is connected.
    fn pick(&self) -> Option<(usize, Arc<MultiplexedConnection>)> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).find_map(|i| {
            let index = (start + i) % n;
            self.slots[index].conn.load_full().map(|c| (index, c))
        })
    }

    /// Takes `conn` out of slot `index` (if it is still there) and wakes the slot's keeper.
    fn discard(&self, index: usize, conn: &Arc<MultiplexedConnection>) {
        let slot = &self.slots[index];
        let previous = slot.conn.compare_and_swap(&Some(conn.clone()), None);
        if previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, conn)) {
            self.gauge.dec();
            slot.broken.notify_one();
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
                Ok(mut conn) => {
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
                    self.gauge.inc();
                    slot.conn.store(Some(Arc::new(conn)));
                    down = false;
                }
                Err(e) => {
                    if !down {
                        tracing::warn!(
                            purpose = self.purpose,
                            connection = index,
                            kind = ?e.kind(),
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
            let mut handle = MultiplexedConnection::clone(&conn);
            let ping = tokio::time::timeout(
                self.connector.connect_timeout,
                redis::cmd("PING").query_async::<String>(&mut handle),
            )
            .await;
            if !matches!(ping, Ok(Ok(_))) {
                self.discard(index, &conn);
            } else if !logged_up {
                logged_up = true;
                slot.served.store(true, Ordering::Relaxed);
                tracing::info!(purpose = self.purpose, "redis answering");
            }
        }
    }
}

impl Connector {
    /// A fresh connection, with the password as it is now.
    async fn connect(&self) -> Result<MultiplexedConnection, RedisError> {
        let mut info = self.connection.clone();
        if let Some(p) = &self.password {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(p.current().expose());
            info = info.set_redis_settings(settings);
        }
        let client = match &self.ca_pem {
            Some(pem) => Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            )?,
            None => Client::open(info)?,
        };
        match tokio::time::timeout(
            self.connect_timeout,
            client.get_multiplexed_async_connection_with_config(&self.options),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            ))),
        }
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

    #[tokio::test]
    async fn without_a_connection_a_call_fails_at_once() {
        let pool = Pool::new(PoolSpec {
            connection: redis::IntoConnectionInfo::into_connection_info("redis://127.0.0.1:1/")
                .unwrap(),
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
