//! The listener's metrics: app connections refused before a request was read (by reason),
//! idle connections evicted for a new one, connections open. Built by
//! [`ListenerMetrics::register`]; each series is resolved once (no label lookup per accept).

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The `reason` label of `finhub_sidecar_listener_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The peer is not in `policy.allowed_clients`.
    ClientNotAllowed,
    /// Every connection slot was taken and none was idle.
    TooManyConnections,
    /// The header block did not arrive whole in time.
    HeaderTimeout,
    /// The header block was larger than `policy.max_header_bytes`.
    HeaderTooLarge,
}

impl Refusal {
    /// Every value, to create the series at 0.
    pub const ALL: [Refusal; 4] = [
        Refusal::ClientNotAllowed,
        Refusal::TooManyConnections,
        Refusal::HeaderTimeout,
        Refusal::HeaderTooLarge,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::ClientNotAllowed => "client_not_allowed",
            Refusal::TooManyConnections => "too_many_connections",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::HeaderTooLarge => "header_too_large",
        }
    }
}

/// Listener metric handles; cheap to clone.
#[derive(Clone)]
pub struct ListenerMetrics {
    /// `finhub_sidecar_listener_refusals_total{reason}`, one counter per [`Refusal`] (in
    /// [`Refusal::ALL`] order).
    refusals: [IntCounter; 4],
    /// `finhub_sidecar_listener_idle_evictions_total`: idle keep-alive app connections closed
    /// to make room for a new one when every slot was taken.
    evictions: IntCounter,
    /// `finhub_sidecar_app_connections`: app connections open now.
    open: IntGauge,
}

impl ListenerMetrics {
    /// Creates the listener metrics in `registry`, every refusal reason at 0.
    pub fn register(registry: &Registry) -> ListenerMetrics {
        // Each definition is static and each name is registered once per registry.
        let refusals = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_listener_refusals_total",
                "App connections refused by the listener before a request was read, by reason",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        let evictions = IntCounter::new(
            "finhub_sidecar_listener_idle_evictions_total",
            "Idle keep-alive app connections closed to make room for a new connection",
        )
        .expect("static metric definition is valid");
        let open = IntGauge::new("finhub_sidecar_app_connections", "App connections open now")
            .expect("static metric definition is valid");
        crate::registry::register_all(
            registry,
            [
                Box::new(refusals.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(evictions.clone()),
                Box::new(open.clone()),
            ],
        );
        ListenerMetrics {
            refusals: Refusal::ALL.map(|r| refusals.with_label_values(&[r.as_str()])),
            evictions,
            open,
        }
    }

    /// Counts one connection refused for `reason`.
    pub fn refused(&self, reason: Refusal) {
        self.refusals[reason as usize].inc();
    }

    /// Counts one idle connection evicted for a new one.
    pub fn evicted(&self) {
        self.evictions.inc();
    }

    /// The gauge of app connections open now.
    pub fn open(&self) -> &IntGauge {
        &self.open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_counts_under_its_own_label() {
        let registry = Registry::new();
        let m = ListenerMetrics::register(&registry);
        m.refused(Refusal::HeaderTooLarge);
        let text = String::from_utf8(crate::registry::text(&registry)).unwrap();
        for line in [
            r#"finhub_sidecar_listener_refusals_total{reason="header_too_large"} 1"#,
            r#"finhub_sidecar_listener_refusals_total{reason="client_not_allowed"} 0"#,
            r#"finhub_sidecar_listener_refusals_total{reason="too_many_connections"} 0"#,
            r#"finhub_sidecar_listener_refusals_total{reason="header_timeout"} 0"#,
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }
}
