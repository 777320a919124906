//! The sidecar's Prometheus registry and [`Metrics`], which holds every component's metrics
//! (OpenMetrics naming: `_total`, `_seconds`, `_timestamp_seconds`; low-cardinality labels only
//! — never paths, ids or secrets).
//!
//! A component owns its metrics in its own `metrics` module or file (`tls::metrics`,
//! `redis_pool::metrics`, `listener::metrics`, `telemetry::metrics`, rate limiting in
//! `policy::ratelimit`): typed label enums with `as_str`, and a `register(&Registry)`
//! constructor called from [`Metrics::new`]. The fields still defined here are the proxy's,
//! auth's, egress's and the audit's.
//!
//! The README's metrics table lists the same names; keep them in step.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::error::Outcome;
use crate::listener::metrics::ListenerMetrics;
use crate::policy::ratelimit::RateLimitMetrics;
use crate::redis_pool::RedisPoolMetrics;
use crate::telemetry::metrics::TraceMetrics;
use crate::tls::metrics::TlsMetrics;

/// Every `status_class` label value, in [`Metrics::status_class`] order of index.
const STATUS_CLASSES: [&str; 6] = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];

/// One tenant's per-request series (or the `-` pseudo-tenant's), resolved once: the request path
/// does no label lookup. A `requests_total` series is created on first use, as before.
pub struct RequestSeries {
    tenant: String,
    requests: IntCounterVec,
    /// `[outcome][status class index]`.
    cells: [[OnceLock<IntCounter>; 6]; Outcome::ALL.len()],
    /// `request_duration_seconds{tenant}`.
    pub duration: Histogram,
    /// `rate_limited_total{tenant}`.
    pub rate_limited: IntCounter,
    /// `upstream_401_replays_total{tenant}`.
    pub replays: IntCounter,
    /// `upstream_retry_budget_exhausted_total{tenant}`.
    pub budget_exhausted: IntCounter,
}

impl RequestSeries {
    /// Counts one request in `requests_total{tenant, decision, status_class}` for a response
    /// `status` (0: none).
    pub fn count_request(&self, outcome: Outcome, status: u16) {
        let class = match status {
            100..=599 => usize::from(status / 100),
            _ => 0,
        };
        self.cells[outcome as usize][class]
            .get_or_init(|| {
                self.requests.with_label_values(&[
                    self.tenant.as_str(),
                    outcome.label(),
                    STATUS_CLASSES[class],
                ])
            })
            .inc();
    }
}

/// Latency buckets (seconds) for request and upstream durations.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Metric handles; cheap to clone (each is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// The client certificate and its PKCS#11 token.
    pub tls: TlsMetrics,
    /// The Redis pools (primary, failovers, time without a connection, `/status` views).
    pub redis: RedisPoolMetrics,
    /// Tracing's export (spans exported and dropped).
    pub trace: TraceMetrics,
    /// The app listener (refusals at accept, evictions, connections open).
    pub listener: ListenerMetrics,
    /// Rate limiting (decisions by backend, the Redis limiter's calls and connections).
    pub rate_limit: RateLimitMetrics,
    /// `finhub_sidecar_session_expiration_timestamp_seconds{tenant}`: expiry of the tenant's
    /// current FinHub session.
    pub session_expiration: IntGaugeVec,
    /// `finhub_sidecar_auth_requests_total{tenant,kind="login|refresh|logout",result}`: calls
    /// to FinHub's auth endpoints by outcome (`ok`, `not_refreshed`, `rejected`,
    /// `rate_limited`, `error`; logout also `timeout`).
    pub auth_requests: IntCounterVec,
    /// `finhub_sidecar_finhub_clock_offset_seconds`: estimated offset of FinHub's clock from
    /// ours (positive: FinHub ahead), from its `Date` headers; 0 until the first answer.
    pub finhub_clock_offset: Gauge,
    /// `finhub_sidecar_upstream_401_replays_total{tenant}`: requests replayed once with a
    /// renewed session after FinHub answered 401.
    pub upstream_401_replays: IntCounterVec,
    /// `finhub_sidecar_upstream_retries_total{reason,outcome}`: attempts sent again, by why
    /// (`connect`, `reset`, `status_502`/`503`/`504`, `timeout`, `unauthorized`) and how the
    /// request ended (`answered`: FinHub's answer reached the app; `gave_up`: it did not).
    pub upstream_retries: IntCounterVec,
    /// `finhub_sidecar_upstream_retry_budget_exhausted_total{tenant}`: retries not made because
    /// the tenant's retry budget was spent.
    pub upstream_retry_budget_exhausted: IntCounterVec,
    /// `finhub_sidecar_upstream_give_ups_total{code}`: requests that ended in an upstream
    /// failure although a retry was wanted or made, by the code the app got (FinHub's own
    /// gateway answers as `finhub_502`/`finhub_503`/`finhub_504`).
    pub upstream_give_ups: IntCounterVec,
    /// `finhub_sidecar_requests_total{tenant,decision,status_class}`: every request the proxy
    /// handled; `decision` is `allow` or why the sidecar answered itself, `tenant` is `-` when
    /// the request never got that far.
    pub requests: IntCounterVec,
    /// `finhub_sidecar_request_duration_seconds{tenant}`: time from request to the end of the
    /// response, as the app sees it.
    pub request_duration: HistogramVec,
    /// `finhub_sidecar_upstream_duration_seconds`: time from choosing FinHub to its response
    /// header (one observation per attempt).
    pub upstream_duration: Histogram,
    /// `finhub_sidecar_requests_in_flight`: requests being handled now.
    pub requests_in_flight: IntGauge,
    /// `finhub_sidecar_upstream_connections_total{reused}`: upstream connections used, new
    /// (`false`) or reused from the keep-alive pool (`true`).
    pub upstream_connections: IntCounterVec,
    /// `finhub_sidecar_build_info{version}`: always 1.
    pub build_info: IntGaugeVec,
    /// `finhub_sidecar_rate_limited_total{tenant}`: requests refused with 429 by the rate limit
    /// (local or Redis bucket) or by a hold after FinHub's own 429.
    pub rate_limited: IntCounterVec,
    /// `finhub_sidecar_audit_lines_dropped`: audit lines dropped since start because the audit
    /// output could not keep up (the proxy never waits on it).
    pub audit_dropped: IntGauge,
    /// `finhub_sidecar_session_store_up`: 1 while the shared session store answered its last
    /// call, 0 when it did not (or no shared store is configured).
    pub session_store_up: IntGauge,
    /// `finhub_sidecar_session_store_errors_total{kind="timeout|connection|unavailable|response"}`:
    /// shared session store calls that failed.
    pub session_store_errors: IntCounterVec,
    /// `finhub_sidecar_session_store_connections`: pooled connections to the session store.
    pub session_store_connections: IntGauge,
    /// `finhub_sidecar_session_lease_owner{tenant}`: 1 while this replica holds the tenant's
    /// renewal lease.
    pub session_lease_owner: IntGaugeVec,
    /// `finhub_sidecar_session_source{tenant,source="shared|local"}`: 1 for where the tenant's
    /// current session came from.
    pub session_source: IntGaugeVec,
    /// `finhub_sidecar_session_adopted_total{tenant}`: sessions taken from the shared store.
    pub session_adopted: IntCounterVec,
    /// `finhub_sidecar_session_decrypt_errors_total{key_id}`: shared records this replica could
    /// not decrypt, by the key id the record names.
    pub session_decrypt_errors: IntCounterVec,
    /// `finhub_sidecar_egress_proxy_errors_total{path="api|auth", reason="unreachable|refused|malformed|timeout"}`:
    /// CONNECT tunnels through `upstream.egress_proxy` that could not be opened, for the API
    /// pool or for login/refresh/logout.
    pub egress_proxy_errors: IntCounterVec,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let tls = TlsMetrics::register(&registry);
        let redis = RedisPoolMetrics::register(&registry);
        let trace = TraceMetrics::register(&registry);
        let listener = ListenerMetrics::register(&registry);
        let rate_limit = RateLimitMetrics::register(&registry);
        let session_expiration = IntGaugeVec::new(
            Opts::new(
                "finhub_sidecar_session_expiration_timestamp_seconds",
                "Expiry of the tenant's current FinHub session, Unix seconds",
            ),
            &["tenant"],
        )
        .expect("static metric definition is valid");
        let auth_requests = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_auth_requests_total",
                "Calls to FinHub's login and refresh endpoints by outcome",
            ),
            &["tenant", "kind", "result"],
        )
        .expect("static metric definition is valid");
        let finhub_clock_offset = Gauge::new(
            "finhub_sidecar_finhub_clock_offset_seconds",
            "Estimated offset of FinHub's clock from the sidecar's (positive: FinHub ahead), from its Date headers",
        )
        .expect("static metric definition is valid");
        let upstream_401_replays = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_upstream_401_replays_total",
                "Requests replayed once with a renewed session after FinHub answered 401",
            ),
            &["tenant"],
        )
        .expect("static metric definition is valid");
        let upstream_retries = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_upstream_retries_total",
                "Attempts sent to FinHub again, by reason and by how the request ended",
            ),
            &["reason", "outcome"],
        )
        .expect("static metric definition is valid");
        let upstream_retry_budget_exhausted = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_upstream_retry_budget_exhausted_total",
                "Retries not made because the tenant's retry budget was spent",
            ),
            &["tenant"],
        )
        .expect("static metric definition is valid");
        let upstream_give_ups = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_upstream_give_ups_total",
                "Requests that ended in an upstream failure although a retry was wanted or made, by the code the app got",
            ),
            &["code"],
        )
        .expect("static metric definition is valid");
        let requests = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_requests_total",
                "Requests handled by the proxy, by tenant, decision and status class",
            ),
            &["tenant", "decision", "status_class"],
        )
        .expect("static metric definition is valid");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "finhub_sidecar_request_duration_seconds",
                "Time from request to the end of the response",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["tenant"],
        )
        .expect("static metric definition is valid");
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "finhub_sidecar_upstream_duration_seconds",
                "Time from choosing FinHub to its response header, per attempt",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("static metric definition is valid");
        let requests_in_flight = IntGauge::new(
            "finhub_sidecar_requests_in_flight",
            "Requests being handled now",
        )
        .expect("static metric definition is valid");
        let upstream_connections = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_upstream_connections_total",
                "Upstream connections used, new (reused=false) or from the pool (reused=true)",
            ),
            &["reused"],
        )
        .expect("static metric definition is valid");
        let build_info = IntGaugeVec::new(
            Opts::new("finhub_sidecar_build_info", "Build information; always 1"),
            &["version"],
        )
        .expect("static metric definition is valid");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_rate_limited_total",
                "Requests refused with 429 by the rate limit (local or Redis bucket) or a FinHub 429 hold",
            ),
            &["tenant"],
        )
        .expect("static metric definition is valid");
        let audit_dropped = IntGauge::new(
            "finhub_sidecar_audit_lines_dropped",
            "Audit lines dropped since start because the audit output could not keep up",
        )
        .expect("static metric definition is valid");
        for reused in ["true", "false"] {
            upstream_connections.with_label_values(&[reused]);
        }
        let egress_proxy_errors = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_egress_proxy_errors_total",
                "CONNECT tunnels through the egress proxy that could not be opened, by path and reason",
            ),
            &["path", "reason"],
        )
        .expect("static metric definition is valid");
        for path in ["api", "auth"] {
            for reason in crate::egress::EgressError::REASONS {
                egress_proxy_errors.with_label_values(&[path, reason]);
            }
        }
        let session_store_up = IntGauge::new(
            "finhub_sidecar_session_store_up",
            "1 while the shared session store answered its last call",
        )
        .expect("static metric definition is valid");
        let session_store_errors = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_session_store_errors_total",
                "Shared session store calls that failed, by kind",
            ),
            &["kind"],
        )
        .expect("static metric definition is valid");
        let session_store_connections = IntGauge::new(
            "finhub_sidecar_session_store_connections",
            "Pooled connections to the shared session store",
        )
        .expect("static metric definition is valid");
        let session_lease_owner = IntGaugeVec::new(
            Opts::new(
                "finhub_sidecar_session_lease_owner",
                "1 while this replica holds the tenant's renewal lease in the shared store",
            ),
            &["tenant"],
        )
        .expect("static metric definition is valid");
        let session_source = IntGaugeVec::new(
            Opts::new(
                "finhub_sidecar_session_source",
                "1 for where the tenant's current session came from (shared store or this replica's own login)",
            ),
            &["tenant", "source"],
        )
        .expect("static metric definition is valid");
        let session_adopted = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_session_adopted_total",
                "Sessions taken from the shared store",
            ),
            &["tenant"],
        )
        .expect("static metric definition is valid");
        let session_decrypt_errors = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_session_decrypt_errors_total",
                "Shared session records this replica could not decrypt, by the record's key id",
            ),
            &["key_id"],
        )
        .expect("static metric definition is valid");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(requests_in_flight.clone()),
            Box::new(upstream_connections.clone()),
            Box::new(build_info.clone()),
            Box::new(rate_limited.clone()),
            Box::new(audit_dropped.clone()),
            Box::new(session_expiration.clone()),
            Box::new(auth_requests.clone()),
            Box::new(finhub_clock_offset.clone()),
            Box::new(upstream_401_replays.clone()),
            Box::new(upstream_retries.clone()),
            Box::new(upstream_retry_budget_exhausted.clone()),
            Box::new(upstream_give_ups.clone()),
            Box::new(session_store_up.clone()),
            Box::new(session_store_errors.clone()),
            Box::new(session_store_connections.clone()),
            Box::new(session_lease_owner.clone()),
            Box::new(session_source.clone()),
            Box::new(session_adopted.clone()),
            Box::new(session_decrypt_errors.clone()),
            Box::new(egress_proxy_errors.clone()),
        ] {
            registry
                .register(c)
                .expect("each metric is registered once in a fresh registry");
        }
        Metrics {
            registry,
            tls,
            redis,
            trace,
            listener,
            rate_limit,
            session_expiration,
            auth_requests,
            finhub_clock_offset,
            upstream_401_replays,
            upstream_retries,
            upstream_retry_budget_exhausted,
            upstream_give_ups,
            requests,
            request_duration,
            upstream_duration,
            requests_in_flight,
            upstream_connections,
            build_info,
            rate_limited,
            audit_dropped,
            session_store_up,
            session_store_errors,
            session_store_connections,
            session_lease_owner,
            session_source,
            session_adopted,
            session_decrypt_errors,
            egress_proxy_errors,
        }
    }

    /// Creates every per-tenant series at 0, so a first failure is visible to `increase()`.
    pub fn init_tenant(&self, tenant: &str) {
        for kind in ["login", "refresh"] {
            for result in ["ok", "not_refreshed", "rejected", "rate_limited", "error"] {
                self.auth_requests
                    .with_label_values(&[tenant, kind, result]);
            }
        }
        for result in ["ok", "rejected", "rate_limited", "error", "timeout"] {
            self.auth_requests
                .with_label_values(&[tenant, "logout", result]);
        }
        self.upstream_401_replays.with_label_values(&[tenant]);
        self.upstream_retry_budget_exhausted
            .with_label_values(&[tenant]);
        self.rate_limited.with_label_values(&[tenant]);
    }

    /// The per-request series of `tenant` (`-` for requests refused before a tenant was chosen).
    pub fn request_series(&self, tenant: &str) -> RequestSeries {
        RequestSeries {
            tenant: tenant.to_string(),
            requests: self.requests.clone(),
            cells: Default::default(),
            duration: self.request_duration.with_label_values(&[tenant]),
            rate_limited: self.rate_limited.with_label_values(&[tenant]),
            replays: self.upstream_401_replays.with_label_values(&[tenant]),
            budget_exhausted: self
                .upstream_retry_budget_exhausted
                .with_label_values(&[tenant]),
        }
    }

    /// `2xx`..`5xx` for a status code; `none` when no response was sent.
    pub fn status_class(status: u16) -> &'static str {
        match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "none",
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::metrics::ReloadResult;

    #[test]
    fn request_series_count_into_the_labelled_series() {
        let m = Metrics::new();
        let s = m.request_series("t1");
        s.count_request(Outcome::Allow, 204);
        s.count_request(Outcome::Allow, 200);
        s.count_request(Outcome::RateLimited, 429);
        s.count_request(Outcome::InternalError, 0);
        s.duration.observe(0.01);
        let text = String::from_utf8(m.render()).unwrap();
        for line in [
            r#"finhub_sidecar_requests_total{decision="allow",status_class="2xx",tenant="t1"} 2"#,
            r#"finhub_sidecar_requests_total{decision="rate_limited",status_class="4xx",tenant="t1"} 1"#,
            r#"finhub_sidecar_requests_total{decision="internal_error",status_class="none",tenant="t1"} 1"#,
            r#"finhub_sidecar_request_duration_seconds_count{tenant="t1"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        for status in [0, 99, 100, 199, 200, 599, 600, 1000] {
            assert_eq!(
                STATUS_CLASSES[match status {
                    100..=599 => usize::from(status / 100),
                    _ => 0,
                }],
                Metrics::status_class(status)
            );
        }
    }

    #[test]
    fn renders_every_metric_name() {
        let m = Metrics::new();
        m.tls.reload(ReloadResult::Published);
        let text = String::from_utf8(m.render()).unwrap();
        for name in [
            "finhub_sidecar_build_info",
            "finhub_sidecar_requests_in_flight",
            "finhub_sidecar_upstream_connections_total",
            "finhub_sidecar_client_cert_expiration_timestamp_seconds",
            "finhub_sidecar_cert_reloads_total",
            "finhub_sidecar_cert_last_reload_timestamp_seconds",
            "finhub_sidecar_finhub_clock_offset_seconds",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }
}
