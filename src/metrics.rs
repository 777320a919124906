//! The sidecar's Prometheus registry and [`Metrics`], which holds every component's metrics
//! (OpenMetrics naming: `_total`, `_seconds`, `_timestamp_seconds`; low-cardinality labels only
//! — never paths, ids or secrets).
//!
//! A component owns its metrics in its own `metrics` module or file (`tls::metrics`,
//! `redis_pool::metrics`, `listener::metrics`, `telemetry::metrics`, `auth::metrics`,
//! `auth::fleet::metrics`, rate limiting in `policy::ratelimit`): typed label enums with
//! `as_str`, and a `register(&Registry)` constructor called from [`Metrics::new`]. The fields
//! still defined here are the process's own (build info, requests in flight, the audit's
//! dropped lines).
//!
//! The README's metrics table lists the same names; keep them in step.

use prometheus::{IntGauge, IntGaugeVec, Opts, Registry};

use crate::auth::fleet::FleetMetrics;
use crate::auth::metrics::AuthMetrics;
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
    /// Auth's (calls to FinHub's auth endpoints, session expiry, FinHub's clock offset).
    pub auth: AuthMetrics,
    /// The fleet's (the shared session store, leases, adoptions).
    pub fleet: FleetMetrics,
    /// `finhub_sidecar_requests_in_flight`: requests being handled now.
    pub requests_in_flight: IntGauge,
    /// `finhub_sidecar_build_info{version}`: always 1.
    pub build_info: IntGaugeVec,
    /// `finhub_sidecar_audit_lines_dropped`: audit lines dropped since start because the audit
    /// output could not keep up (the proxy never waits on it).
    pub audit_dropped: IntGauge,
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
        let auth = AuthMetrics::register(&registry);
        let fleet = FleetMetrics::register(&registry);
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
        crate::registry::register_all(
            &registry,
            [
                Box::new(requests_in_flight.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(build_info.clone()),
                Box::new(audit_dropped.clone()),
            ],
        );
        Metrics {
            registry,
            tls,
            redis,
            trace,
            listener,
            rate_limit,
            egress,
            auth,
            fleet,
            requests_in_flight,
            build_info,
            audit_dropped,
        }
    }

    /// The registry, for a component that registers its own metrics after start-up wiring
    /// (the data path's: `proxy::metrics::ProxyMetrics::register`).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        crate::registry::text(&self.registry)
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
