//! Every Prometheus metric the sidecar exports, named in one place (OpenMetrics naming: `_total`,
//! `_seconds`, `_timestamp_seconds`; low-cardinality labels only — never paths, ids or secrets).
//!
//! The README's metrics table lists the same names; keep them in step.

use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

/// Metric handles; cheap to clone (each is an `Arc` inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
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
    /// `finhub_sidecar_auth_requests_total{tenant,kind="login|refresh",result}`: calls to
    /// FinHub's auth endpoints by outcome (`ok`, `not_refreshed`, `rejected`, `rate_limited`,
    /// `error`).
    pub auth_requests: IntCounterVec,
    /// `finhub_sidecar_upstream_401_replays_total{tenant}`: requests replayed once with a
    /// renewed session after FinHub answered 401.
    pub upstream_401_replays: IntCounterVec,
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
        let upstream_401_replays = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_upstream_401_replays_total",
                "Requests replayed once with a renewed session after FinHub answered 401",
            ),
            &["tenant"],
        )
        .expect("static metric definition is valid");
        for c in [
            Box::new(cert_expiration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(cert_reloads.clone()),
            Box::new(cert_last_reload.clone()),
            Box::new(session_expiration.clone()),
            Box::new(auth_requests.clone()),
            Box::new(upstream_401_replays.clone()),
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
            registry,
            cert_expiration,
            cert_reloads,
            cert_last_reload,
            session_expiration,
            auth_requests,
            upstream_401_replays,
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

    #[test]
    fn renders_every_metric_name() {
        let m = Metrics::new();
        m.cert_reloads.with_label_values(&["published"]).inc();
        let text = String::from_utf8(m.render()).unwrap();
        for name in [
            "finhub_sidecar_client_cert_expiration_timestamp_seconds",
            "finhub_sidecar_cert_reloads_total",
            "finhub_sidecar_cert_last_reload_timestamp_seconds",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }
}
