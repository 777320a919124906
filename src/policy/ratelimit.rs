//! Rate limits: a token bucket per tenant (`governor`), with optional per-route buckets chosen by
//! method and path prefix, plus a per-tenant hold set when FinHub itself answers 429 with
//! `Retry-After`, so the whole sidecar stops hammering until then.
//!
//! The buckets sit behind the [`Limiter`] trait: [`LocalLimiter`] here decides in-process
//! without waiting; [`super::redis_limit::RedisLimiter`] shares one limit across replicas.
//! Their settings ([`RateLimitConfig`], [`Limit`], ...) are typed in [`crate::config`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::Method;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::config::{Limit, RateLimitConfig};
use crate::redis_pool::Failure;

/// The outcome of a rate-limit check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Refuse; the client may retry after this long.
    Deny {
        /// Time until a request would be allowed.
        retry_after: Duration,
    },
    /// Refuse because the shared limiter cannot decide (`on_redis_error = "deny"`).
    Unavailable,
}

impl Decision {
    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Decision::Allow => None,
            Decision::Unavailable => Some(1),
            Decision::Deny { retry_after } => {
                Some(retry_after.as_secs_f64().ceil().max(1.0) as u64)
            }
        }
    }
}

/// A decision still being made (a network round trip); owns everything it needs.
pub type PendingDecision = Pin<Box<dyn Future<Output = Decision> + Send>>;

/// What [`TenantLimiter::check`] returns: a decision now, or one to await.
pub enum Check {
    /// Decided without waiting (local buckets, no bucket configured).
    Ready(Decision),
    /// Await this for the decision; it never takes longer than the backend's timeout.
    Wait(PendingDecision),
}

/// One tenant's buckets (owned by its `proxy::tenant::Tenant`): decides for one of its requests.
pub trait TenantLimiter: Send + Sync {
    /// Checks and, if allowed, consumes one token of the bucket of the request's route.
    fn check(&self, method: &Method, path: &str) -> Check;
}

/// A rate-limit backend: builds each tenant's buckets once, at start.
pub trait Limiter: Send + Sync {
    /// The buckets of the tenant with id `tenant`.
    fn tenant(&self, tenant: &str) -> Box<dyn TenantLimiter>;
}

/// Decision counters of one backend, resolved once (no label lookup per request).
#[derive(Clone)]
pub struct DecisionCounters {
    allow: IntCounter,
    deny: IntCounter,
}

impl DecisionCounters {
    /// Counts one decision.
    pub fn count(&self, decision: &Decision) {
        match decision {
            Decision::Allow => self.allow.inc(),
            Decision::Deny { .. } | Decision::Unavailable => self.deny.inc(),
        }
    }
}

/// Who made a rate-limit decision: the `backend` label of
/// `finhub_sidecar_rate_limit_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecidedBy {
    /// The in-process buckets.
    Local,
    /// The shared buckets in Redis.
    Redis,
    /// `on_redis_error` while Redis failed.
    Fallback,
}

impl DecidedBy {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DecidedBy::Local => "local",
            DecidedBy::Redis => "redis",
            DecidedBy::Fallback => "fallback",
        }
    }
}

/// Buckets (seconds) for Redis round trips: sub-millisecond on a healthy network.
const REDIS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];

/// Rate-limiting metric handles; cheap to clone. Series appear as the limiters are built.
#[derive(Clone)]
pub struct RateLimitMetrics {
    /// `finhub_sidecar_rate_limit_decisions_total{backend="local|redis|fallback",decision="allow|deny"}`:
    /// rate-limit decisions by who made them (`fallback`: `on_redis_error` while Redis failed).
    decisions: IntCounterVec,
    /// `finhub_sidecar_redis_errors_total{kind="timeout|connection|unavailable|response"}`:
    /// Redis rate-limit calls that failed (`unavailable`: no connection, decided without waiting).
    redis_errors: IntCounterVec,
    /// `finhub_sidecar_redis_call_duration_seconds`: time of each Redis rate-limit call,
    /// including failed ones.
    redis_call_duration: Histogram,
    /// `finhub_sidecar_redis_connections`: pooled Redis connections held (each checked with
    /// `PING` every second).
    redis_connections: IntGauge,
}

impl RateLimitMetrics {
    /// Creates the rate-limiting metrics in `registry`.
    pub fn register(registry: &Registry) -> RateLimitMetrics {
        // Each definition is static and each name is registered once per registry.
        let decisions = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_rate_limit_decisions_total",
                "Rate-limit decisions by backend (local, redis, or the on_redis_error fallback)",
            ),
            &["backend", "decision"],
        )
        .expect("static metric definition is valid");
        let redis_errors = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_redis_errors_total",
                "Redis rate-limit calls that failed, by kind",
            ),
            &["kind"],
        )
        .expect("static metric definition is valid");
        let redis_call_duration = Histogram::with_opts(
            HistogramOpts::new(
                "finhub_sidecar_redis_call_duration_seconds",
                "Time of each Redis rate-limit call, failed ones included",
            )
            .buckets(REDIS_BUCKETS.to_vec()),
        )
        .expect("static metric definition is valid");
        let redis_connections = IntGauge::new(
            "finhub_sidecar_redis_connections",
            "Pooled Redis connections held (each checked with PING every second)",
        )
        .expect("static metric definition is valid");
        crate::registry::register_all(
            registry,
            [
                Box::new(decisions.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(redis_errors.clone()),
                Box::new(redis_call_duration.clone()),
                Box::new(redis_connections.clone()),
            ],
        );
        RateLimitMetrics {
            decisions,
            redis_errors,
            redis_call_duration,
            redis_connections,
        }
    }

    /// The decision counters of `by`, both decisions resolved.
    pub fn decisions(&self, by: DecidedBy) -> DecisionCounters {
        DecisionCounters {
            allow: self.decisions.with_label_values(&[by.as_str(), "allow"]),
            deny: self.decisions.with_label_values(&[by.as_str(), "deny"]),
        }
    }

    /// The counter of Redis rate-limit calls that failed with `failure`.
    pub fn redis_errors(&self, failure: Failure) -> IntCounter {
        self.redis_errors.with_label_values(&[failure.label()])
    }

    /// The histogram of Redis rate-limit call times.
    pub fn redis_call_duration(&self) -> Histogram {
        self.redis_call_duration.clone()
    }

    /// The gauge of the rate-limit pool's connections.
    pub fn redis_connections(&self) -> IntGauge {
        self.redis_connections.clone()
    }
}

/// The in-process backend: every tenant gets its own token buckets ([`LocalBuckets`]).
pub struct LocalLimiter {
    config: Arc<RateLimitConfig>,
    counters: Option<DecisionCounters>,
}

fn bucket(limit: &Limit) -> DefaultDirectRateLimiter {
    RateLimiter::direct(Quota::per_second(limit.per_second).allow_burst(limit.burst))
}

impl LocalLimiter {
    /// The backend for `config`'s limits.
    pub fn new(config: RateLimitConfig) -> Self {
        LocalLimiter {
            config: Arc::new(config),
            counters: None,
        }
    }

    /// Counts every decision into `counters`.
    pub fn counting(mut self, counters: DecisionCounters) -> Self {
        self.counters = Some(counters);
        self
    }

    /// A fresh set of buckets for one tenant: the default bucket and one per route.
    pub fn buckets(&self) -> LocalBuckets {
        let config = &self.config;
        LocalBuckets {
            buckets: std::iter::once(config.default.as_ref().map(bucket))
                .chain(config.routes.iter().map(|r| Some(bucket(&r.limit))))
                .collect(),
            config: self.config.clone(),
            clock: DefaultClock::default(),
            counters: self.counters.clone(),
        }
    }
}

impl Limiter for LocalLimiter {
    fn tenant(&self, _tenant: &str) -> Box<dyn TenantLimiter> {
        Box::new(self.buckets())
    }
}

/// One tenant's in-process token buckets.
pub struct LocalBuckets {
    config: Arc<RateLimitConfig>,
    /// `[0]` is the default bucket, `[1 + i]` route `i`'s (`None`: no limit).
    buckets: Vec<Option<DefaultDirectRateLimiter>>,
    clock: DefaultClock,
    counters: Option<DecisionCounters>,
}

impl LocalBuckets {
    /// Checks bucket `route` (as numbered by [`RateLimitConfig::route_of`]).
    pub fn check_route(&self, route: usize) -> Decision {
        let Some(Some(limiter)) = self.buckets.get(route) else {
            return Decision::Allow;
        };
        let decision = match limiter.check() {
            Ok(()) => Decision::Allow,
            Err(not_until) => Decision::Deny {
                retry_after: not_until.wait_time_from(self.clock.now()),
            },
        };
        if let Some(c) = &self.counters {
            c.count(&decision);
        }
        decision
    }
}

impl TenantLimiter for LocalBuckets {
    fn check(&self, method: &Method, path: &str) -> Check {
        Check::Ready(self.check_route(self.config.route_of(method, path)))
    }
}

/// The longest hold a FinHub `Retry-After` can impose (a larger value is clamped).
pub const MAX_HOLD: Duration = Duration::from_secs(300);

/// A per-tenant "FinHub said 429, wait until" marker. Lock-free.
pub struct UpstreamHold {
    origin: Instant,
    until_ms: AtomicU64,
}

impl Default for UpstreamHold {
    fn default() -> Self {
        UpstreamHold {
            origin: Instant::now(),
            until_ms: AtomicU64::new(0),
        }
    }
}

impl UpstreamHold {
    /// Holds until `now + d` (never shortens an existing hold).
    pub fn hold_for(&self, d: Duration) {
        let d = d.min(MAX_HOLD);
        let until = self.origin.elapsed().saturating_add(d).as_millis();
        let until = u64::try_from(until).unwrap_or(u64::MAX);
        self.until_ms.fetch_max(until, Ordering::SeqCst);
    }

    /// Time left on the hold, if any.
    pub fn remaining(&self) -> Option<Duration> {
        let until = self.until_ms.load(Ordering::SeqCst);
        let now = self.origin.elapsed().as_millis() as u64;
        (until > now).then(|| Duration::from_millis(until - now))
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::config::{Backend, RouteLimit};

    impl Check {
        fn now(self) -> Decision {
            match self {
                Check::Ready(d) => d,
                Check::Wait(_) => panic!("the local limiter never waits"),
            }
        }
    }

    fn limit(per_second: u32, burst: u32) -> Limit {
        Limit {
            per_second: NonZeroU32::new(per_second).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    #[test]
    fn burst_then_deny_with_retry_after() {
        let l = LocalLimiter::new(RateLimitConfig {
            default: Some(limit(1, 3)),
            routes: vec![],
            backend: Backend::Local,
        });
        let (a, b) = (l.tenant("a"), l.tenant("b"));
        for _ in 0..3 {
            assert_eq!(a.check(&Method::GET, "/api/v2/x").now(), Decision::Allow);
        }
        let d = a.check(&Method::GET, "/api/v2/x").now();
        assert!(matches!(d, Decision::Deny { .. }));
        assert_eq!(d.retry_after_secs(), Some(1));
        // Another tenant has its own bucket.
        assert_eq!(b.check(&Method::GET, "/api/v2/x").now(), Decision::Allow);
    }

    #[test]
    fn route_overrides_match_method_and_prefix() {
        let l = LocalLimiter::new(RateLimitConfig {
            default: Some(limit(100, 100)),
            routes: vec![RouteLimit {
                method: Some(Method::POST),
                path_prefix: "/api/v2/auth".into(),
                limit: limit(1, 1),
            }],
            backend: Backend::Local,
        });
        let a = l.tenant("a");
        assert_eq!(l.config.route_of(&Method::POST, "/api/v2/auth/token"), 1);
        assert_eq!(l.config.route_of(&Method::GET, "/api/v2/auth/token"), 0);
        assert_eq!(
            a.check(&Method::POST, "/api/v2/auth/token").now(),
            Decision::Allow
        );
        assert!(matches!(
            a.check(&Method::POST, "/api/v2/auth/x").now(),
            Decision::Deny { .. }
        ));
        assert_eq!(
            a.check(&Method::GET, "/api/v2/auth/x").now(),
            Decision::Allow
        );
    }

    #[test]
    fn no_default_limit_allows_everything() {
        let l = LocalLimiter::new(RateLimitConfig {
            default: None,
            routes: vec![],
            backend: Backend::Local,
        });
        let a = l.tenant("a");
        for _ in 0..1000 {
            assert_eq!(a.check(&Method::GET, "/").now(), Decision::Allow);
        }
    }

    #[test]
    fn holds_extend_and_expire() {
        let h = UpstreamHold::default();
        assert!(h.remaining().is_none());
        h.hold_for(Duration::from_secs(5));
        h.hold_for(Duration::from_secs(1));
        assert!(h.remaining().unwrap() > Duration::from_secs(4));
        h.hold_for(Duration::MAX);
        assert!(h.remaining().unwrap() <= MAX_HOLD);
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
