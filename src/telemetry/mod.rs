//! OpenTelemetry tracing: spans exported over OTLP/HTTP (protobuf) with W3C trace context.
//!
//! Off unless `[tracing]` or `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` names a collector: then
//! nothing is installed and the request path pays one `Option` check per hook.
//!
//! On: the SDK's batch span processor exports from its own thread through a blocking HTTP
//! client (no Pingora runtime involved). Its queue is bounded (`BoundedQueue`): a span that
//! finds `max_queue_size` spans waiting is dropped and counted
//! (`finhub_sidecar_trace_spans_dropped_total{reason="queue_full"}`), so a slow or dead
//! collector never adds latency to a request and never grows memory. Export failures are
//! counted (`reason="export_failed"`) and logged once per change of state, never per request.
//!
//! - `export.rs`: install ([`Telemetry`]), the bounded queue, the counting exporter, the
//!   collector's HTTP client;
//! - [`context`]: `traceparent` / `tracestate` parsing and formatting (pure functions);
//! - [`request`]: the spans of one app request ([`RequestTrace`]);
//! - `background.rs`: background spans for logins, refreshes, logouts and fleet-lease
//!   operations ([`BackgroundSpan`]);
//! - [`metrics`]: spans exported and dropped.

mod background;
pub mod context;
mod export;
pub mod metrics;
pub mod request;

pub use background::BackgroundSpan;
pub use export::{Telemetry, TelemetryError, Tracer};
pub use request::{end_wait, start_request, RequestTrace, SpanIdHex, TraceIdHex, TraceIds};
