//! Every Prometheus metric the sidecar exports, named in one place (OpenMetrics naming: `_total`,
//! `_seconds`, `_timestamp_seconds`; low-cardinality labels only — never paths, ids or secrets).
//!
//! The README's metrics table lists the same names; keep them in step.

use std::sync::Arc;

use prometheus::{
    CounterVec, Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::egress::EgressMetrics;
use crate::proxy::metrics::ProxyMetrics;
use crate::redis_pool::PoolViews;

/// The `decision` label of `finhub_sidecar_requests_total` and the audit line: `allow`, or why
/// the sidecar answered itself. Each refusal maps to one ([`crate::error::ProxyError::meta`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded to FinHub.
    Allow,
    /// The TCP peer is not allowed.
    DenyClient,
    /// An absolute-form target named a foreign host.
    DenyDestination,
    /// The auth and session surface.
    DenyReserved,
    /// A malformed or refused request (method, upgrade, path, header, body).
    BadRequest,
    /// A trusted forwarder's `X-Forwarded-For` is unusable.
    InvalidForwardedFor,
    /// A bucket or FinHub's 429 hold refused it.
    RateLimited,
    /// The shared limiter could not decide.
    RateLimitUnavailable,
    /// `X-Tenant-ID` names no tenant.
    UnknownTenant,
    /// No usable session.
    SessionUnavailable,
    /// FinHub could not be reached or broke the exchange.
    UpstreamError,
    /// FinHub did not answer in time.
    UpstreamTimeout,
    /// A sidecar bug.
    InternalError,
    /// The connection cap refused it.
    TooManyConnections,
}

impl Outcome {
    /// Every outcome, in label order (the index of each is its metric cell).
    pub const ALL: [Outcome; 14] = [
        Outcome::Allow,
        Outcome::DenyClient,
        Outcome::DenyDestination,
        Outcome::DenyReserved,
        Outcome::BadRequest,
        Outcome::InvalidForwardedFor,
        Outcome::RateLimited,
        Outcome::RateLimitUnavailable,
        Outcome::UnknownTenant,
        Outcome::SessionUnavailable,
        Outcome::UpstreamError,
        Outcome::UpstreamTimeout,
        Outcome::InternalError,
        Outcome::TooManyConnections,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::DenyClient => "deny_client",
            Outcome::DenyDestination => "deny_destination",
            Outcome::DenyReserved => "deny_reserved",
            Outcome::BadRequest => "bad_request",
            Outcome::InvalidForwardedFor => "invalid_forwarded_for",
            Outcome::RateLimited => "rate_limited",
            Outcome::RateLimitUnavailable => "rate_limit_unavailable",
            Outcome::UnknownTenant => "unknown_tenant",
            Outcome::SessionUnavailable => "session_unavailable",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::InternalError => "internal_error",
            Outcome::TooManyConnections => "too_many_connections",
        }
    }
}

/// Buckets (seconds) for Redis round trips: sub-millisecond on a healthy network.
const REDIS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];

/// Metric handles; cheap to clone (each is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// The data path's metrics (requests, retries, connections; `proxy/metrics.rs`).
    pub proxy: ProxyMetrics,
    /// The egress proxy's metrics (`egress.rs`).
    pub egress: EgressMetrics,
    /// `finhub_sidecar_client_cert_expiration_timestamp_seconds`: `notAfter` of the published
    /// client certificate (0 when none).
    pub cert_expiration: IntGauge,
    /// `finhub_sidecar_cert_reloads_total{result="published|rejected"}`: certificate sets
    /// published or rejected by the reloader (unchanged polls are not counted).
    pub cert_reloads: IntCounterVec,
    /// `finhub_sidecar_cert_last_reload_timestamp_seconds`: when a set was last published.
    pub cert_last_reload: IntGauge,
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
    /// `finhub_sidecar_requests_in_flight`: requests being handled now.
    pub requests_in_flight: IntGauge,
    /// `finhub_sidecar_build_info{version}`: always 1.
    pub build_info: IntGaugeVec,
    /// `finhub_sidecar_audit_lines_dropped`: audit lines dropped since start because the audit
    /// output could not keep up (the proxy never waits on it).
    pub audit_dropped: IntGauge,
    /// `finhub_sidecar_rate_limit_decisions_total{backend="local|redis|fallback",decision="allow|deny"}`:
    /// rate-limit decisions by who made them (`fallback`: `on_redis_error` while Redis failed).
    pub rate_limit_decisions: IntCounterVec,
    /// `finhub_sidecar_redis_errors_total{kind="timeout|connection|unavailable|response"}`:
    /// Redis rate-limit calls that failed (`unavailable`: no connection, decided without waiting).
    pub redis_errors: IntCounterVec,
    /// `finhub_sidecar_redis_call_duration_seconds`: time of each Redis rate-limit call,
    /// including failed ones.
    pub redis_call_duration: Histogram,
    /// `finhub_sidecar_redis_connections`: pooled Redis connections held (each checked with
    /// `PING` every second).
    pub redis_connections: IntGauge,
    /// `finhub_sidecar_redis_primary{pool="rate_limit|session_store",mode="single|sentinel|cluster",address}`:
    /// 1 for the Redis server the pool last connected to (the resolved primary with Sentinel,
    /// `cluster` with Cluster).
    pub redis_primary: IntGaugeVec,
    /// `finhub_sidecar_redis_failovers_total{pool}`: new primaries followed (Sentinel).
    pub redis_failovers: IntCounterVec,
    /// `finhub_sidecar_redis_fallback_seconds_total{pool}`: time the pool had no usable
    /// connection (its users decided by their failure policy meanwhile).
    pub redis_fallback_seconds: CounterVec,
    /// Every Redis pool's `/status` view.
    pub redis_pools: Arc<PoolViews>,
    /// `finhub_sidecar_listener_refusals_total{reason}`: app connections the listener refused
    /// before Pingora read a request (`client_not_allowed`, `too_many_connections`,
    /// `header_timeout`, `header_too_large`).
    pub listener_refusals: IntCounterVec,
    /// `finhub_sidecar_listener_idle_evictions_total`: idle keep-alive app connections closed
    /// to make room for a new one when every slot was taken.
    pub listener_evictions: IntCounter,
    /// `finhub_sidecar_app_connections`: app connections open now.
    pub app_connections: IntGauge,
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
    /// `finhub_sidecar_pkcs11_errors_total{kind="timeout|busy|skipped|login|not_found|error"}`: calls
    /// into the PKCS#11 token holding the client key that failed (signatures, probes, loads).
    pub pkcs11_errors: IntCounterVec,
    /// `finhub_sidecar_trace_spans_dropped_total{reason="queue_full|export_failed"}`: spans
    /// not delivered to the collector (the export queue was full, or the export failed).
    pub trace_spans_dropped: IntCounterVec,
    /// `finhub_sidecar_trace_spans_exported_total`: spans the collector accepted.
    pub trace_spans_exported: IntCounter,
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let cert_expiration = IntGauge::new(
            "finhub_sidecar_client_cert_expiration_timestamp_seconds",
            "notAfter of the client certificate in use, Unix seconds",
        )
        .expect("static metric definition is valid");
        let cert_reloads = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_cert_reloads_total",
                "Client certificate sets published or rejected by the reloader",
            ),
            &["result"],
        )
        .expect("static metric definition is valid");
        let cert_last_reload = IntGauge::new(
            "finhub_sidecar_cert_last_reload_timestamp_seconds",
            "When a client certificate set was last published, Unix seconds",
        )
        .expect("static metric definition is valid");
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
        let requests_in_flight = IntGauge::new(
            "finhub_sidecar_requests_in_flight",
            "Requests being handled now",
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
        let audit_dropped = IntGauge::new(
            "finhub_sidecar_audit_lines_dropped",
            "Audit lines dropped since start because the audit output could not keep up",
        )
        .expect("static metric definition is valid");
        let rate_limit_decisions = IntCounterVec::new(
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
        let redis_primary = IntGaugeVec::new(
            Opts::new(
                "finhub_sidecar_redis_primary",
                "1 for the Redis server each pool last connected to (the primary with Sentinel)",
            ),
            &["pool", "mode", "address"],
        )
        .expect("static metric definition is valid");
        let redis_failovers = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_redis_failovers_total",
                "New Redis primaries followed after a failover, by pool",
            ),
            &["pool"],
        )
        .expect("static metric definition is valid");
        let redis_fallback_seconds = CounterVec::new(
            Opts::new(
                "finhub_sidecar_redis_fallback_seconds_total",
                "Time each Redis pool had no usable connection (its users followed their failure policy)",
            ),
            &["pool"],
        )
        .expect("static metric definition is valid");
        let listener_refusals = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_listener_refusals_total",
                "App connections refused by the listener before a request was read, by reason",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        for reason in [
            "client_not_allowed",
            "too_many_connections",
            "header_timeout",
            "header_too_large",
        ] {
            listener_refusals.with_label_values(&[reason]);
        }
        let listener_evictions = IntCounter::new(
            "finhub_sidecar_listener_idle_evictions_total",
            "Idle keep-alive app connections closed to make room for a new connection",
        )
        .expect("static metric definition is valid");
        let app_connections =
            IntGauge::new("finhub_sidecar_app_connections", "App connections open now")
                .expect("static metric definition is valid");
        let pkcs11_errors = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_pkcs11_errors_total",
                "Calls into the PKCS#11 token holding the client key that failed, by kind",
            ),
            &["kind"],
        )
        .expect("static metric definition is valid");
        for kind in crate::tls::pkcs11::TokenError::KINDS {
            pkcs11_errors.with_label_values(&[kind]);
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
        let trace_spans_dropped = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_trace_spans_dropped_total",
                "Spans not delivered to the OTLP collector: export queue full, or export failed",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        let trace_spans_exported = IntCounter::new(
            "finhub_sidecar_trace_spans_exported_total",
            "Spans the OTLP collector accepted",
        )
        .expect("static metric definition is valid");
        for c in [
            Box::new(trace_spans_dropped.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(trace_spans_exported.clone()),
            Box::new(requests_in_flight.clone()),
            Box::new(build_info.clone()),
            Box::new(audit_dropped.clone()),
            Box::new(rate_limit_decisions.clone()),
            Box::new(redis_errors.clone()),
            Box::new(redis_call_duration.clone()),
            Box::new(redis_connections.clone()),
            Box::new(redis_primary.clone()),
            Box::new(redis_failovers.clone()),
            Box::new(redis_fallback_seconds.clone()),
            Box::new(listener_refusals.clone()),
            Box::new(listener_evictions.clone()),
            Box::new(app_connections.clone()),
            Box::new(cert_expiration.clone()),
            Box::new(cert_reloads.clone()),
            Box::new(cert_last_reload.clone()),
            Box::new(session_expiration.clone()),
            Box::new(auth_requests.clone()),
            Box::new(finhub_clock_offset.clone()),
            Box::new(session_store_up.clone()),
            Box::new(session_store_errors.clone()),
            Box::new(session_store_connections.clone()),
            Box::new(session_lease_owner.clone()),
            Box::new(session_source.clone()),
            Box::new(session_adopted.clone()),
            Box::new(session_decrypt_errors.clone()),
            Box::new(pkcs11_errors.clone()),
        ] {
            registry
                .register(c)
                .expect("each metric is registered once in a fresh registry");
        }
        // Expose both results from the start, so a scrape shows 0 rather than nothing.
        for result in ["published", "rejected"] {
            cert_reloads.with_label_values(&[result]);
        }
        Metrics {
            proxy: ProxyMetrics::register(&registry),
            egress: EgressMetrics::register(&registry),
            registry,
            cert_expiration,
            cert_reloads,
            cert_last_reload,
            session_expiration,
            auth_requests,
            finhub_clock_offset,
            requests_in_flight,
            build_info,
            audit_dropped,
            rate_limit_decisions,
            redis_errors,
            redis_call_duration,
            redis_connections,
            redis_primary,
            redis_failovers,
            redis_fallback_seconds,
            redis_pools: Arc::new(PoolViews::default()),
            session_store_up,
            session_store_errors,
            session_store_connections,
            session_lease_owner,
            session_source,
            session_adopted,
            session_decrypt_errors,
            listener_refusals,
            listener_evictions,
            app_connections,
            pkcs11_errors,
            trace_spans_dropped,
            trace_spans_exported,
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
        self.proxy.init_tenant(tenant);
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

    #[test]
    fn renders_every_metric_name() {
        let m = Metrics::new();
        m.cert_reloads.with_label_values(&["published"]).inc();
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
