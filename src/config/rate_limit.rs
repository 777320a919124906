//! `[policy.rate_limit]`: token buckets per tenant (and per route), kept in-process or in Redis
//! (the Redis table is converted in [`super::redis`]). The typed settings live here; the
//! limiters in `crate::policy` read them.

use std::num::NonZeroU32;

use http::Method;
use serde::Deserialize;

use super::convert::Convert;
use super::redis::{FileRedis, RedisSettings};

/// A bucket's rate and burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Sustained requests per second.
    pub per_second: NonZeroU32,
    /// Requests allowed at once above the rate.
    pub burst: NonZeroU32,
}

/// A per-route override: requests whose method matches (or any, if `None`) and whose path starts
/// with `path_prefix` use this bucket instead of the tenant's default one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteLimit {
    /// Method to match; `None` matches every method.
    pub method: Option<Method>,
    /// Path prefix to match.
    pub path_prefix: String,
    /// The bucket.
    pub limit: Limit,
}

/// The whole rate-limit configuration.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// Default bucket per tenant; `None` disables limiting (upstream holds still apply).
    pub default: Option<Limit>,
    /// Route overrides, first match wins.
    pub routes: Vec<RouteLimit>,
    /// Where the buckets live.
    pub backend: Backend,
}

/// Where the buckets live.
#[derive(Debug, Clone)]
pub enum Backend {
    /// In this process: each replica has the whole limit.
    Local,
    /// In Redis: every replica pointing at the same Redis and key prefix shares the limit.
    Redis(Box<RedisSettings>),
}

impl RateLimitConfig {
    /// Index of the bucket for a request: `1 + route` for the first matching route, else 0.
    pub fn route_of(&self, method: &Method, path: &str) -> usize {
        self.routes
            .iter()
            .position(|r| {
                // `path` is the canonical, lower-cased path (policy::path); prefixes are
                // compared without case so `/API/v2/auth` cannot escape a `/api/v2/auth` bucket.
                r.method.as_ref().is_none_or(|m| m == method)
                    && path
                        .get(..r.path_prefix.len())
                        .is_some_and(|p| p.eq_ignore_ascii_case(&r.path_prefix))
            })
            .map_or(0, |i| i + 1)
    }

    /// The limit of bucket `route` (as numbered by [`RateLimitConfig::route_of`]).
    pub fn limit_of(&self, route: usize) -> Option<Limit> {
        match route {
            0 => self.default,
            r => self.routes.get(r - 1).map(|r| r.limit),
        }
    }
}

/// `[policy.rate_limit]` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRateLimit {
    /// Sustained requests per second per tenant; unset disables local limiting.
    rate: Option<u32>,
    /// Burst above the rate; default equal to `rate`.
    burst: Option<u32>,
    /// `[[policy.rate_limit.routes]]`: stricter buckets by method and path prefix.
    #[serde(default)]
    routes: Vec<FileRouteLimit>,
    /// `local` (default: each replica has the whole limit) or `redis` (one limit shared by every
    /// replica using the same Redis and key prefix).
    backend: Option<FileBackend>,
    /// `[policy.rate_limit.redis]`: the shared backend; required with `backend = "redis"`.
    redis: Option<FileRedis>,
}

/// `policy.rate_limit.backend` as written.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum FileBackend {
    /// `local`: buckets in this process.
    Local,
    /// `redis`: buckets in Redis, shared by the fleet.
    Redis,
}

/// One `[[policy.rate_limit.routes]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRouteLimit {
    /// HTTP method to match (e.g. `POST`); unset matches every method.
    method: Option<String>,
    /// Path prefix to match, e.g. `/api/v2/auth`.
    path_prefix: String,
    /// Requests per second for this route, per tenant.
    rate: u32,
    /// Burst; default equal to `rate`.
    burst: Option<u32>,
}

impl Convert<'_> {
    /// A bucket from `rate` and `burst` (default `rate`), both at least 1.
    fn limit(&mut self, key: &str, rate: u32, burst: Option<u32>) -> Option<Limit> {
        let per_second = std::num::NonZeroU32::new(rate);
        let burst = std::num::NonZeroU32::new(burst.unwrap_or(rate));
        match (per_second, burst) {
            (Some(per_second), Some(burst)) => Some(Limit { per_second, burst }),
            _ => {
                self.err(key, "rate and burst must be at least 1");
                None
            }
        }
    }

    /// `[policy.rate_limit]`.
    pub(super) fn rate_limit(&mut self, r: FileRateLimit) -> RateLimitConfig {
        let default = match r.rate {
            Some(rate) => self.limit("policy.rate_limit.rate", rate, r.burst),
            None => {
                if r.burst.is_some() {
                    self.err("policy.rate_limit.burst", "burst needs rate");
                }
                None
            }
        };
        let mut routes = Vec::new();
        for (i, route) in r.routes.into_iter().enumerate() {
            let key = format!("policy.rate_limit.routes[{i}]");
            let method = match route.method.as_deref() {
                None => None,
                Some(m) => match http::Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
                {
                    Ok(m) => Some(m),
                    Err(_) => {
                        self.err(
                            format!("{key}.method"),
                            format!("`{m}` is not an HTTP method"),
                        );
                        continue;
                    }
                },
            };
            if !route.path_prefix.starts_with('/') {
                self.err(format!("{key}.path_prefix"), "must start with /");
                continue;
            }
            if let Some(limit) = self.limit(&format!("{key}.rate"), route.rate, route.burst) {
                routes.push(RouteLimit {
                    method,
                    path_prefix: route.path_prefix,
                    limit,
                });
            }
        }
        let enabled = default.is_some() || !routes.is_empty();
        let backend = match (r.backend.unwrap_or(FileBackend::Local), r.redis) {
            (FileBackend::Local, None) => Backend::Local,
            (FileBackend::Local, Some(_)) => {
                self.err(
                    "policy.rate_limit.redis",
                    "set policy.rate_limit.backend = \"redis\" to use it (or remove this table)",
                );
                Backend::Local
            }
            (FileBackend::Redis, None) => {
                self.err(
                    "policy.rate_limit.redis",
                    "missing: backend = \"redis\" needs [policy.rate_limit.redis] with a url",
                );
                Backend::Local
            }
            (FileBackend::Redis, Some(redis)) => {
                if !enabled {
                    self.err(
                        "policy.rate_limit.backend",
                        "redis shares limits, but neither rate nor routes is set",
                    );
                }
                self.redis(redis)
                    .map_or(Backend::Local, |s| Backend::Redis(Box::new(s)))
            }
        };
        RateLimitConfig {
            default,
            routes,
            backend,
        }
    }
}
