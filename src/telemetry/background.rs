//! Spans of background operations (logins, refreshes, logouts, fleet-lease operations): root
//! spans on the tracer installed at start, nothing without tracing.

use std::sync::OnceLock;

use opentelemetry::trace::{Span as _, SpanKind, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, Span};

/// The tracer for background spans (set once when tracing is installed).
static BACKGROUND: OnceLock<SdkTracer> = OnceLock::new();

/// Makes `tracer` the one background spans start on (the first call wins).
pub(super) fn install(tracer: SdkTracer) {
    let _ = BACKGROUND.set(tracer);
}

/// A background operation's span (login, refresh, logout, a fleet-lease operation): a root
/// span named `operation` with the tenant, ended with its outcome. Without tracing it holds
/// nothing. Dropped without [`BackgroundSpan::end`] it ends as `cancelled`.
pub struct BackgroundSpan(Option<Span>);

impl BackgroundSpan {
    /// Starts `operation` (a static name such as `finhub.auth.login`) for `tenant`.
    pub fn start(operation: &'static str, tenant: &str) -> BackgroundSpan {
        BackgroundSpan(BACKGROUND.get().map(|t| {
            t.span_builder(operation)
                .with_kind(SpanKind::Internal)
                .with_attributes([KeyValue::new("finhub.tenant", tenant.to_string())])
                .start_with_context(t, &Context::new())
        }))
    }

    /// Ends the span with `outcome` (a result label such as `ok`, `rejected`, `error`; never a
    /// message that could quote a credential).
    pub fn end(mut self, outcome: &str) {
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: &str) {
        if let Some(mut s) = self.0.take() {
            s.set_attribute(KeyValue::new("finhub.outcome", outcome.to_string()));
            if !matches!(
                outcome,
                "ok" | "not_refreshed" | "held" | "other" | "written"
            ) {
                s.set_status(opentelemetry::trace::Status::error(""));
            }
            s.end();
        }
    }
}

impl Drop for BackgroundSpan {
    fn drop(&mut self) {
        self.finish("cancelled");
    }
}
