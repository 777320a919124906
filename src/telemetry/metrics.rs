//! Tracing's own metrics: spans the collector accepted and spans dropped, by reason. Built by
//! [`TraceMetrics::register`].

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

/// The `reason` label of `finhub_sidecar_trace_spans_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The export queue was full.
    QueueFull,
    /// The export failed.
    ExportFailed,
}

impl DropReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::ExportFailed => "export_failed",
        }
    }
}

/// Tracing metric handles; cheap to clone.
#[derive(Clone)]
pub struct TraceMetrics {
    /// `finhub_sidecar_trace_spans_dropped_total{reason="queue_full|export_failed"}`: spans
    /// not delivered to the collector (the export queue was full, or the export failed).
    dropped: IntCounterVec,
    /// `finhub_sidecar_trace_spans_exported_total`: spans the collector accepted.
    exported: IntCounter,
}

impl TraceMetrics {
    /// Creates the tracing metrics in `registry` (the `dropped` series appear once tracing is
    /// installed).
    pub fn register(registry: &Registry) -> TraceMetrics {
        // Each definition is static and each name is registered once per registry.
        let dropped = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_trace_spans_dropped_total",
                "Spans not delivered to the OTLP collector: export queue full, or export failed",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        let exported = IntCounter::new(
            "finhub_sidecar_trace_spans_exported_total",
            "Spans the OTLP collector accepted",
        )
        .expect("static metric definition is valid");
        crate::registry::register_all(
            registry,
            [
                Box::new(dropped.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(exported.clone()),
            ],
        );
        TraceMetrics { dropped, exported }
    }

    /// The counter of spans dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> IntCounter {
        self.dropped.with_label_values(&[reason.as_str()])
    }

    /// The counter of spans exported.
    pub fn exported(&self) -> IntCounter {
        self.exported.clone()
    }
}
