//! Keeping the pooled Redis connections: connect (with the password as it is now, TLS with
//! the configured CA), check each with `PING`, discard a broken or hung one and reconnect with
//! backoff. The request path never waits for any of this.

use super::*;

pub(super) struct Connector {
    pub(super) connection: ConnectionInfo,
    pub(super) password: Option<SecretSource>,
    pub(super) ca_pem: Option<Vec<u8>>,
    pub(super) connect_timeout: Duration,
    pub(super) options: AsyncConnectionConfig,
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

impl Inner {
    /// Takes `conn` out of `slot` (if it is still there) and wakes the slot's keeper.
    pub(super) fn discard(&self, slot: &Slot, conn: &Arc<MultiplexedConnection>) {
        let previous = slot.conn.compare_and_swap(&Some(conn.clone()), None);
        if previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, conn)) {
            self.metrics.connections.dec();
            slot.broken.notify_one();
        }
    }

    /// Connects slot `index`; checks it with `PING` every [`HEALTH_INTERVAL`] (an idle
    /// connection cut by Redis, a load balancer or a silent network is found without a request
    /// paying for it); reconnects whenever it is discarded. A connection that was discarded
    /// before it ever answered (Redis reachable but too slow) backs off like a failed connect.
    pub(super) async fn keep_slot(self: Arc<Self>, index: usize) {
        let slot = &self.slots[index];
        let mut backoff = MIN_RECONNECT;
        // Logged states: connects failing, and connections discarded before ever answering.
        let mut down = false;
        let mut slow_logged = false;
        loop {
            match self.connector.connect().await {
                Ok(mut conn) => {
                    // Load the script now, so the first request after a Redis restart needs one
                    // round trip (EVALSHA) instead of three (EVALSHA, NOSCRIPT, load, EVALSHA).
                    let _ = tokio::time::timeout(
                        self.connector.connect_timeout,
                        self.script.load_async(&mut conn),
                    )
                    .await;
                    slot.timeouts.store(0, Ordering::Relaxed);
                    slot.served.store(false, Ordering::Relaxed);
                    slot.error_logged.store(false, Ordering::Relaxed);
                    self.metrics.connections.inc();
                    slot.conn.store(Some(Arc::new(conn)));
                    down = false;
                }
                Err(e) => {
                    if !down {
                        tracing::warn!(connection = index, error = %e, "redis unreachable; rate-limit decisions follow on_redis_error until it returns");
                        down = true;
                    }
                    sleep_backoff(&mut backoff).await;
                    continue;
                }
            }
            self.watch(slot).await;
            if slot.served.load(Ordering::Relaxed) {
                tracing::warn!(
                    connection = index,
                    "redis connection lost (dropped, timing out or failing PING); reconnecting"
                );
                slow_logged = false;
                backoff = MIN_RECONNECT;
            } else {
                if !slow_logged {
                    tracing::warn!(
                        connection = index,
                        "redis connection discarded before it answered anything (Redis slower than policy.rate_limit.redis.timeout, or cut right after connecting); backing off"
                    );
                    slow_logged = true;
                }
                sleep_backoff(&mut backoff).await;
            }
        }
    }

    /// Returns once the slot's connection was discarded (by a request or a failed `PING`).
    async fn watch(&self, slot: &Slot) {
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
                self.discard(slot, &conn);
            } else if !logged_up {
                logged_up = true;
                slot.served.store(true, Ordering::Relaxed);
                tracing::info!("redis answering; rate limits are shared");
            }
        }
    }
}

/// Sleeps the current backoff (with jitter) and doubles it up to [`MAX_RECONNECT`].
async fn sleep_backoff(backoff: &mut Duration) {
    let jitter = rand::random_range(0.5..1.0);
    tokio::time::sleep(backoff.mul_f64(jitter)).await;
    *backoff = (*backoff * 2).min(MAX_RECONNECT);
}
