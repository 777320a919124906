//! The sidecar's Prometheus registry and [`Metrics`], which holds every component's metrics
//! (OpenMetrics naming: `_total`, `_seconds`, `_timestamp_seconds`; low-cardinality labels only
//! — never paths, ids or secrets).
//!
//! A component owns its metrics in its own `metrics` module or file (`tls::metrics`,
//! `redis_pool::metrics`, `listener::metrics`, `telemetry::metrics`, rate limiting in
//! `policy::ratelimit`): typed label enums with `as_str`, and a `register(&Registry)`
//! constructor called from [`Metrics::new`]. The fields still defined here are auth's, the
//! session store's and the audit's.
//!
//! The README's metrics table lists the same names; keep them in step.

use prometheus::{
    Encoder, Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::egress::EgressMetrics;
use crate::listener::metrics::ListenerMetrics;
use crate::policy::ratelimit::RateLimitMetrics;
use crate::redis_pool::RedisPoolMetrics;
use crate::telemetry::metrics::TraceMetrics;
use crate::tls::metrics::TlsMetrics;

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
    /// The egress proxy's metrics (`egress.rs`).
    pub egress: EgressMetrics,
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
        let egress = EgressMetrics::register(&registry);
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
            Box::new(requests_in_flight.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(build_info.clone()),
            Box::new(audit_dropped.clone()),
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
            egress,
            session_expiration,
            auth_requests,
            finhub_clock_offset,
            requests_in_flight,
            build_info,
            audit_dropped,
            session_store_up,
            session_store_errors,
            session_store_connections,
            session_lease_owner,
            session_source,
            session_adopted,
            session_decrypt_errors,
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
    }

    /// The registry, for a component that registers its own metrics after start-up wiring
    /// (the data path's: `proxy::metrics::ProxyMetrics::register`).
    pub fn registry(&self) -> &Registry {
        &self.registry
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
    fn renders_every_metric_name() {
        let m = Metrics::new();
        // The data path registers its own families (`proxy::metrics`) in the same registry.
        let _proxy = crate::proxy::metrics::ProxyMetrics::register(m.registry());
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
