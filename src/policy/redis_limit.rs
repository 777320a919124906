//! Fleet-wide rate limits on Redis: every sidecar of a deployment that points at the same Redis
//! and key prefix shares one bucket per tenant (and per route).
//!
//! - **Algorithm.** GCRA in one Lua script ([`GCRA_SCRIPT`]): one `EVALSHA` round trip per
//!   decision, atomic on the Redis side, Redis's own clock (`TIME`) so replicas with skewed
//!   clocks agree. Keys expire when their bucket is full again, so idle tenants cost nothing.
//! - **Connections.** A small fixed pool of multiplexed connections (each pipelines any number of
//!   concurrent calls), kept by one background task per connection. A request never connects and
//!   never takes a lock: it loads a connection from an `ArcSwapOption`, or finds none and falls
//!   back at once.
//! - **Failure mode.** Every call has a timeout of a few milliseconds. A timeout, a dropped
//!   connection or a missing connection decides by `on_redis_error`: `allow`, `deny` (503
//!   `rate_limit_unavailable`) or `local` (an in-process bucket with this pod's share of the
//!   limit). A connection that drops, or times out [`BREAK_AFTER_TIMEOUTS`] times in a row, is
//!   discarded and re-established in the background (backoff up to [`MAX_RECONNECT`]); until
//!   then requests decide by the failure mode without waiting. Each connection is also checked
//!   with `PING` every [`HEALTH_INTERVAL`], so one cut while idle is replaced before a request
//!   finds it. Recovery is automatic. A call that timed out may still have used a token in Redis.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use prometheus::{Histogram, IntCounter};
use redis::Script;

use super::ratelimit::{
    Check, DecidedBy, Decision, DecisionCounters, Limiter, LocalBuckets, LocalLimiter,
    RateLimitMetrics, TenantLimiter,
};
use crate::config::{Backend, Limit, OnRedisError, RateLimitConfig, RedisSettings, RouteLimit};
use crate::redis_pool::{Failure, Pool, PoolName, PoolSpec, RedisPoolMetrics};
pub use crate::redis_pool::{BREAK_AFTER_TIMEOUTS, HEALTH_INTERVAL, MAX_RECONNECT, MIN_RECONNECT};

/// GCRA (the generic cell rate algorithm, a token bucket stored as one timestamp).
///
/// `KEYS[1]`: the bucket. `ARGV[1]`: emission interval in µs (1 s / rate). `ARGV[2]`: burst.
/// Returns `{1, 0}` when allowed (and records it), or `{0, µs until a request would be allowed}`.
/// The stored value is the "theoretical arrival time" in µs of Redis time; it expires once it
/// is in the past (the bucket is full again then).
pub const GCRA_SCRIPT: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0}
"#;

/// This pod's share of `limit` when `replicas` share it (rounded up, at least 1).
pub fn share(limit: Limit, replicas: NonZeroU32) -> Limit {
    let part = |n: NonZeroU32| {
        // n ≥ 1 and replicas ≥ 1, so the rounded-up quotient is at least 1.
        NonZeroU32::new(n.get().div_ceil(replicas.get())).unwrap_or(NonZeroU32::MIN)
    };
    Limit {
        per_second: part(limit.per_second),
        burst: part(limit.burst),
    }
}

/// The shared limiter. Cheap to clone; [`RedisLimiter::keep_connected`] must run in the
/// background for it to ever reach Redis.
#[derive(Clone)]
pub struct RedisLimiter {
    inner: Arc<Inner>,
}

struct Inner {
    config: RateLimitConfig,
    key_prefix: String,
    pool: Arc<Pool>,
    fallback: Fallback,
    script: Script,
    metrics: RedisMetrics,
}

struct Bucket {
    key: String,
    interval_us: u64,
    burst: u32,
}

/// One tenant's buckets in Redis (keyed by tenant id and route) and, with
/// `on_redis_error = "local"`, its in-process share to fall back on.
struct TenantBuckets {
    /// `[route]`, numbered as [`RateLimitConfig::route_of`]; `None`: no limit.
    buckets: Vec<Option<Bucket>>,
    local: Option<LocalBuckets>,
}

/// A tenant's view of the shared limiter (see [`Limiter::tenant`]).
struct RedisBuckets {
    inner: Arc<Inner>,
    tenant: Arc<TenantBuckets>,
}

enum Fallback {
    Allow,
    Deny,
    Local(LocalLimiter),
}

struct RedisMetrics {
    redis: DecisionCounters,
    fallback: DecisionCounters,
    unavailable: IntCounter,
    timeout: IntCounter,
    connection: IntCounter,
    response: IntCounter,
    duration: Histogram,
}

impl RedisMetrics {
    fn failure(&self, f: Failure) -> &IntCounter {
        match f {
            Failure::Unavailable => &self.unavailable,
            Failure::Timeout => &self.timeout,
            Failure::Connection => &self.connection,
            Failure::Response => &self.response,
        }
    }
}

impl RedisLimiter {
    /// The shared limiter for `config`'s limits. Connections are made by
    /// [`RedisLimiter::keep_connected`]; until then every decision is the failure mode's.
    pub fn new(
        config: &RateLimitConfig,
        settings: &RedisSettings,
        metrics: &RateLimitMetrics,
        pools: &RedisPoolMetrics,
    ) -> Self {
        let fallback = match settings.on_error {
            OnRedisError::Allow => Fallback::Allow,
            OnRedisError::Deny => Fallback::Deny,
            OnRedisError::Local { replicas } => {
                let shared = RateLimitConfig {
                    default: config.default.map(|l| share(l, replicas)),
                    routes: config
                        .routes
                        .iter()
                        .map(|r| RouteLimit {
                            limit: share(r.limit, replicas),
                            ..r.clone()
                        })
                        .collect(),
                    backend: Backend::Local,
                };
                Fallback::Local(LocalLimiter::new(shared))
            }
        };
        let inner = Inner {
            config: config.clone(),
            key_prefix: settings.key_prefix.clone(),
            pool: Arc::new(Pool::new(PoolSpec {
                connection: settings.connection.clone(),
                topology: settings.topology.clone(),
                name: PoolName::RateLimit,
                metrics: pools.clone(),
                password: settings.password.clone(),
                ca_pem: settings.ca_pem.clone(),
                connect_timeout: settings.connect_timeout,
                timeout: settings.timeout,
                connections: settings.connections.get(),
                scripts: vec![Script::new(GCRA_SCRIPT)],
                gauge: metrics.redis_connections(),
                purpose: "rate limits",
                meanwhile: "rate-limit decisions follow on_redis_error",
            })),
            fallback,
            script: Script::new(GCRA_SCRIPT),
            metrics: RedisMetrics {
                redis: metrics.decisions(DecidedBy::Redis),
                fallback: metrics.decisions(DecidedBy::Fallback),
                unavailable: metrics.redis_errors(Failure::Unavailable),
                timeout: metrics.redis_errors(Failure::Timeout),
                connection: metrics.redis_errors(Failure::Connection),
                response: metrics.redis_errors(Failure::Response),
                duration: metrics.redis_call_duration(),
            },
        };
        RedisLimiter {
            inner: Arc::new(inner),
        }
    }

    /// Keeps every pooled connection established, forever (run it as a background task).
    pub async fn keep_connected(self) {
        self.inner.pool.clone().keep_connected().await
    }

    /// Connections usable right now.
    pub fn connected(&self) -> usize {
        self.inner.pool.connected()
    }
}

impl Limiter for RedisLimiter {
    fn tenant(&self, tenant: &str) -> Box<dyn TenantLimiter> {
        let config = &self.inner.config;
        let buckets = (0..=config.routes.len())
            .map(|route| {
                config.limit_of(route).map(|limit| Bucket {
                    key: bucket_key(
                        &self.inner.pool,
                        &self.inner.key_prefix,
                        tenant,
                        config,
                        route,
                    ),
                    interval_us: (1_000_000 / u64::from(limit.per_second.get())).max(1),
                    burst: limit.burst.get(),
                })
            })
            .collect();
        let local = match &self.inner.fallback {
            Fallback::Local(l) => Some(l.buckets()),
            Fallback::Allow | Fallback::Deny => None,
        };
        Box::new(RedisBuckets {
            inner: self.inner.clone(),
            tenant: Arc::new(TenantBuckets { buckets, local }),
        })
    }
}

impl TenantLimiter for RedisBuckets {
    fn check(&self, method: &Method, path: &str) -> Check {
        let route = self.inner.config.route_of(method, path);
        if !self.tenant.buckets.get(route).is_some_and(Option::is_some) {
            return Check::Ready(Decision::Allow);
        }
        // Fail fast without boxing a future when no connection is up.
        if self.inner.pool.connected() == 0 {
            return Check::Ready(
                self.inner
                    .fall_back(&self.tenant, route, Failure::Unavailable),
            );
        }
        Check::Wait(Box::pin(
            self.inner.clone().decide(self.tenant.clone(), route),
        ))
    }
}

impl Inner {
    async fn decide(self: Arc<Self>, tenant: Arc<TenantBuckets>, route: usize) -> Decision {
        let Some(Some(bucket)) = tenant.buckets.get(route) else {
            return Decision::Allow;
        };
        let started = Instant::now();
        let outcome = self.call(bucket).await;
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(decision) => {
                self.metrics.redis.count(&decision);
                decision
            }
            Err(f) => self.fall_back(&tenant, route, f),
        }
    }

    fn fall_back(&self, tenant: &TenantBuckets, route: usize, failure: Failure) -> Decision {
        self.metrics.failure(failure).inc();
        let decision = match (&self.fallback, &tenant.local) {
            (Fallback::Allow, _) => Decision::Allow,
            (Fallback::Deny, _) => Decision::Unavailable,
            (Fallback::Local(_), Some(local)) => local.check_route(route),
            // Every tenant of a `local` fallback gets its buckets (`Limiter::tenant`).
            (Fallback::Local(_), None) => Decision::Allow,
        };
        self.metrics.fallback.count(&decision);
        decision
    }

    /// One script call on the next usable connection, bounded by the timeout.
    async fn call(&self, bucket: &Bucket) -> Result<Decision, Failure> {
        let mut invocation = self.script.key(&bucket.key);
        invocation.arg(bucket.interval_us).arg(bucket.burst);
        let (allowed, wait_us) =
            self.pool
                .call(|mut handle| async move {
                    invocation.invoke_async::<(i64, i64)>(&mut handle).await
                })
                .await?;
        Ok(if allowed == 1 {
            Decision::Allow
        } else {
            Decision::Deny {
                retry_after: Duration::from_micros(wait_us.max(0).unsigned_abs()),
            }
        })
    }
}

/// `<prefix><tenant>:<route>` where route is `default` or `<METHOD|*> <path prefix>`: stable
/// across replicas with the same configuration, whatever the order of other routes. With Redis
/// Cluster the tenant is the hash tag (`<prefix>{<tenant>}:<route>`, [`Pool::tenant_key`]).
fn bucket_key(
    pool: &Pool,
    prefix: &str,
    tenant: &str,
    config: &RateLimitConfig,
    route: usize,
) -> String {
    let route = match route.checked_sub(1).and_then(|r| config.routes.get(r)) {
        None => "default".to_string(),
        Some(r) => format!(
            "{} {}",
            r.method.as_ref().map_or("*", Method::as_str),
            r.path_prefix
        ),
    };
    pool.tenant_key(prefix, tenant, &route)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use super::*;
    use crate::metrics::Metrics;

    fn limit(per_second: u32, burst: u32) -> Limit {
        Limit {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    fn settings(on_error: OnRedisError) -> RedisSettings {
        RedisSettings {
            connection: redis::IntoConnectionInfo::into_connection_info("redis://127.0.0.1:1/")
                .unwrap(),
            topology: crate::config::RedisTopology::Single,
            password: None,
            ca_pem: None,
            key_prefix: "t:".into(),
            timeout: Duration::from_millis(5),
            connect_timeout: Duration::from_millis(100),
            connections: NonZeroUsize::new(2).unwrap(),
            on_error,
        }
    }

    fn config() -> RateLimitConfig {
        RateLimitConfig {
            default: Some(limit(10, 4)),
            routes: vec![RouteLimit {
                method: Some(Method::POST),
                path_prefix: "/api/v2/payments".into(),
                limit: limit(3, 3),
            }],
            backend: Backend::Local,
        }
    }

    fn ready(c: Check) -> Decision {
        match c {
            Check::Ready(d) => d,
            Check::Wait(_) => panic!("expected a decision without waiting"),
        }
    }

    #[test]
    fn pod_share_rounds_up_and_never_reaches_zero() {
        let r = NonZeroU32::new(20).unwrap();
        assert_eq!(share(limit(100, 200), r), limit(5, 10));
        assert_eq!(share(limit(1, 3), r), limit(1, 1));
        assert_eq!(share(limit(21, 21), r), limit(2, 2));
    }

    #[test]
    fn keys_name_tenant_and_route_stably() {
        let c = config();
        let m = Metrics::new();
        let single = RedisLimiter::new(&c, &settings(OnRedisError::Deny), &m.rate_limit, &m.redis);
        let pool = &single.inner.pool;
        assert_eq!(bucket_key(pool, "p:", "acme", &c, 0), "p:acme:default");
        assert_eq!(
            bucket_key(pool, "p:", "acme", &c, 1),
            "p:acme:POST /api/v2/payments"
        );
        // Cluster: the tenant is the hash tag, so all its buckets share one slot.
        let mut s = settings(OnRedisError::Deny);
        s.topology = crate::config::RedisTopology::Cluster {
            seeds: vec![("127.0.0.1".into(), 1)],
        };
        let cluster = RedisLimiter::new(&c, &s, &m.rate_limit, &m.redis);
        let pool = &cluster.inner.pool;
        assert_eq!(bucket_key(pool, "p:", "acme", &c, 0), "p:{acme}:default");
        assert_eq!(
            bucket_key(pool, "p:", "acme", &c, 1),
            "p:{acme}:POST /api/v2/payments"
        );
    }

    #[test]
    fn without_a_connection_the_failure_mode_decides_at_once() {
        let m = Metrics::new();
        let deny = RedisLimiter::new(
            &config(),
            &settings(OnRedisError::Deny),
            &m.rate_limit,
            &m.redis,
        );
        assert_eq!(
            ready(deny.tenant("a").check(&Method::GET, "/api/v2/x")),
            Decision::Unavailable
        );
        let allow = RedisLimiter::new(
            &config(),
            &settings(OnRedisError::Allow),
            &m.rate_limit,
            &m.redis,
        );
        let allow = allow.tenant("a");
        for _ in 0..10 {
            assert_eq!(
                ready(allow.check(&Method::GET, "/api/v2/x")),
                Decision::Allow
            );
        }
        let local = RedisLimiter::new(
            &config(),
            &settings(OnRedisError::Local {
                replicas: NonZeroU32::new(2).unwrap(),
            }),
            &m.rate_limit,
            &m.redis,
        );
        // Route bucket 3/3 shared by 2 replicas: 2 at once here.
        let a = local.tenant("a");
        let decisions: Vec<_> = (0..3)
            .map(|_| ready(a.check(&Method::POST, "/api/v2/payments/1")))
            .collect();
        assert_eq!(decisions[..2], [Decision::Allow, Decision::Allow]);
        assert!(matches!(decisions[2], Decision::Deny { .. }));
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(r#"finhub_sidecar_redis_errors_total{kind="unavailable"} 14"#));
    }

    #[test]
    fn requests_without_a_bucket_never_touch_redis() {
        let m = Metrics::new();
        let c = RateLimitConfig {
            default: None,
            ..config()
        };
        let l = RedisLimiter::new(&c, &settings(OnRedisError::Deny), &m.rate_limit, &m.redis);
        assert_eq!(
            ready(l.tenant("a").check(&Method::GET, "/api/v2/x")),
            Decision::Allow
        );
        assert_eq!(l.connected(), 0);
    }
}
