//! The Redis pools' metrics: the primary each pool reaches, failovers followed, time without a
//! connection; and every pool's `/status` view. Built by [`RedisPoolMetrics::register`].

use std::sync::Arc;
use std::time::Duration;

use prometheus::{Counter, CounterVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::view::{PoolView, PoolViews};

/// Which pool: the `pool` label of its metrics and its name on `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolName {
    /// The fleet-wide rate limit (`policy::redis_limit`).
    RateLimit,
    /// The fleet-shared session store (`auth::fleet`).
    SessionStore,
}

impl PoolName {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolName::RateLimit => "rate_limit",
            PoolName::SessionStore => "session_store",
        }
    }
}

/// Metric handles shared by every pool; cheap to clone.
#[derive(Clone)]
pub struct RedisPoolMetrics {
    /// `finhub_sidecar_redis_primary{pool="rate_limit|session_store",mode="single|sentinel|cluster",address}`:
    /// 1 for the Redis server the pool last connected to (the resolved primary with Sentinel,
    /// `cluster` with Cluster).
    primary: IntGaugeVec,
    /// `finhub_sidecar_redis_failovers_total{pool}`: new primaries followed (Sentinel).
    failovers: IntCounterVec,
    /// `finhub_sidecar_redis_fallback_seconds_total{pool}`: time the pool had no usable
    /// connection (its users decided by their failure policy meanwhile).
    fallback_seconds: CounterVec,
    /// Every pool's `/status` view.
    views: Arc<PoolViews>,
}

impl RedisPoolMetrics {
    /// Creates the pool metrics in `registry` (series appear as pools are made).
    pub fn register(registry: &Registry) -> RedisPoolMetrics {
        // Each definition is static and each name is registered once per registry.
        let primary = IntGaugeVec::new(
            Opts::new(
                "finhub_sidecar_redis_primary",
                "1 for the Redis server each pool last connected to (the primary with Sentinel)",
            ),
            &["pool", "mode", "address"],
        )
        .expect("static metric definition is valid");
        let failovers = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_redis_failovers_total",
                "New Redis primaries followed after a failover, by pool",
            ),
            &["pool"],
        )
        .expect("static metric definition is valid");
        let fallback_seconds = CounterVec::new(
            Opts::new(
                "finhub_sidecar_redis_fallback_seconds_total",
                "Time each Redis pool had no usable connection (its users followed their failure policy)",
            ),
            &["pool"],
        )
        .expect("static metric definition is valid");
        crate::registry::register_all(
            registry,
            [
                Box::new(primary.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(failovers.clone()),
                Box::new(fallback_seconds.clone()),
            ],
        );
        RedisPoolMetrics {
            primary,
            failovers,
            fallback_seconds,
            views: Arc::new(PoolViews::default()),
        }
    }

    /// Every pool's `/status` view.
    pub fn views(&self) -> &PoolViews {
        &self.views
    }

    /// The series of the pool `name`, whose `/status` view is `view`.
    pub(super) fn pool(&self, name: PoolName, view: Arc<PoolView>) -> PoolSeries {
        self.views.add(view);
        PoolSeries {
            name,
            primary: self.primary.clone(),
            failovers: self.failovers.with_label_values(&[name.as_str()]),
            fallback_seconds: self.fallback_seconds.with_label_values(&[name.as_str()]),
        }
    }
}

/// One pool's series, resolved once.
pub(super) struct PoolSeries {
    name: PoolName,
    primary: IntGaugeVec,
    failovers: IntCounter,
    fallback_seconds: Counter,
}

impl PoolSeries {
    /// The pool (in `mode`) now reaches `new` instead of `old`: the info gauge moves.
    pub(super) fn primary_changed(&self, mode: &str, old: Option<&str>, new: &str) {
        let pool = self.name.as_str();
        if let Some(old) = old {
            let _ = self.primary.remove_label_values(&[pool, mode, old]);
        }
        self.primary.with_label_values(&[pool, mode, new]).set(1);
    }

    /// Counts one failover followed.
    pub(super) fn failover(&self) {
        self.failovers.inc();
    }

    /// Adds `elapsed` without any usable connection.
    pub(super) fn without_connection(&self, elapsed: Duration) {
        self.fallback_seconds.inc_by(elapsed.as_secs_f64());
    }
}
