//! The export pipeline: the OTLP/HTTP exporter on a blocking client (our TLS roots, no Pingora
//! runtime), the bounded queue that drops and counts, and the counting exporter.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, Span, SpanData,
    SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus::IntCounter;

use super::background;
use super::metrics::{DropReason, TraceMetrics};
use crate::config::{ParentRoot, Sampler, TracingConfig};

/// The tracer the data path holds (cheap to clone).
pub type Tracer = SdkTracer;

/// The installed tracing pipeline; shut it down at exit to send what is queued.
pub struct Telemetry {
    provider: SdkTracerProvider,
    tracer: Tracer,
}

/// Why tracing could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The exporter or its HTTP client could not be built (the message names no secret).
    #[error("tracing: cannot build the OTLP exporter: {0}")]
    Exporter(String),
}

impl Telemetry {
    /// Builds the exporter, the bounded batch processor and the tracer provider.
    pub fn install(
        config: &TracingConfig,
        metrics: &TraceMetrics,
    ) -> Result<Telemetry, TelemetryError> {
        let client = collector_client(config)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_endpoint(config.endpoint.clone())
            .with_protocol(Protocol::HttpBinary)
            .with_timeout(config.timeout)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        let queued = Arc::new(AtomicUsize::new(0));
        let exporter = CountingExporter {
            inner: exporter,
            queued: queued.clone(),
            exported: metrics.exported(),
            failed: metrics.dropped(DropReason::ExportFailed),
            failing: AtomicBool::new(false),
        };
        // The SDK's own queue is larger than ours, so only `BoundedQueue` ever drops (and counts).
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(config.max_queue_size + config.max_export_batch_size)
            .with_max_export_batch_size(config.max_export_batch_size)
            .with_scheduled_delay(config.schedule_delay)
            .build();
        let processor = BoundedQueue {
            inner: BatchSpanProcessor::new(exporter, batch),
            queued,
            limit: config.max_queue_size,
            dropped: metrics.dropped(DropReason::QueueFull),
        };
        let resource = Resource::builder_empty()
            .with_service_name(config.service_name.clone())
            .with_attributes(
                config
                    .resource_attributes
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
                    .chain([KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))]),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler(config.sampler))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("finhub-sidecar");
        background::install(tracer.clone());
        tracing::info!(
            endpoint = %config.endpoint,
            sampler = ?config.sampler,
            max_queue_size = config.max_queue_size,
            "tracing: exporting spans over OTLP/HTTP"
        );
        Ok(Telemetry { provider, tracer })
    }

    /// The tracer for request spans.
    pub fn tracer(&self) -> Tracer {
        self.tracer.clone()
    }

    /// Exports what is queued and stops, waiting at most `within` (a dead collector cannot
    /// hold the exit up).
    pub fn shutdown(self, within: Duration) {
        if let Err(e) = self.provider.shutdown_with_timeout(within) {
            tracing::debug!(error = %e, "tracing: shutdown did not complete");
        }
    }
}

/// The SDK sampler for the configured one.
fn sampler(s: Sampler) -> opentelemetry_sdk::trace::Sampler {
    use opentelemetry_sdk::trace::Sampler as S;
    match s {
        Sampler::AlwaysOn => S::AlwaysOn,
        Sampler::AlwaysOff => S::AlwaysOff,
        Sampler::TraceIdRatio(r) => S::TraceIdRatioBased(r),
        Sampler::ParentBased(root) => S::ParentBased(Box::new(match root {
            ParentRoot::AlwaysOn => S::AlwaysOn,
            ParentRoot::AlwaysOff => S::AlwaysOff,
            ParentRoot::TraceIdRatio(r) => S::TraceIdRatioBased(r),
        })),
    }
}

/// The batch processor with a bounded queue that counts what it drops: at most `limit` spans
/// wait for export (counted from `on_end` until the exporter takes them).
struct BoundedQueue {
    inner: BatchSpanProcessor,
    queued: Arc<AtomicUsize>,
    limit: usize,
    dropped: IntCounter,
}

impl fmt::Debug for BoundedQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedQueue")
            .field("limit", &self.limit)
            .finish()
    }
}

impl SpanProcessor for BoundedQueue {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.limit {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.dropped.inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, counting exported and failed spans and logging failures once per change
/// of state.
struct CountingExporter<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
    exported: IntCounter,
    failed: IntCounter,
    failing: AtomicBool,
}

impl<E> fmt::Debug for CountingExporter<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CountingExporter")
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        self.queued.fetch_sub(n, Ordering::AcqRel);
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) => {
                self.exported.inc_by(n as u64);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("tracing: span export works again");
                }
            }
            Err(e) => {
                self.failed.inc_by(n as u64);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %summary(&e.to_string()),
                        "tracing: span export failed; spans are dropped and counted until the collector answers"
                    );
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// An exporter error on one line, at most 200 characters (it names the endpoint and the
/// collector's answer; never a header, which the HTTP client does not print).
fn summary(s: &str) -> String {
    let one: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    one
}

/// The HTTP client for the collector: a blocking client on the exporter's own thread (Pingora's
/// runtimes are not involved), TLS through rustls with ring and the system's roots, no
/// redirects, no environment proxy; the configured headers set on every export.
struct CollectorClient {
    client: reqwest::blocking::Client,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl fmt::Debug for CollectorClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CollectorClient")
    }
}

#[async_trait::async_trait]
impl HttpClient for CollectorClient {
    async fn send_bytes(&self, mut request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        // Last writer wins: the configured headers replace any the exporter took from the
        // environment, so the file's value wins here too.
        for (name, value) in &self.headers {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        self.client.send_bytes(request).await
    }
}

/// Builds the collector client (on a thread of its own: the blocking client must not be
/// created inside an async runtime).
fn collector_client(config: &TracingConfig) -> Result<CollectorClient, TelemetryError> {
    let timeout = config.timeout;
    let tls = tls_config()?;
    let client = std::thread::Builder::new()
        .name("otlp-client-init".into())
        .spawn(move || {
            reqwest::blocking::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(5)))
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .tls_backend_preconfigured(tls)
                .build()
        })
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?
        .join()
        .map_err(|_| TelemetryError::Exporter("the HTTP client could not be built".into()))?
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    Ok(CollectorClient {
        client,
        headers: config.headers.clone(),
    })
}

/// rustls (ring) with the system's root certificates, for an `https://` collector.
fn tls_config() -> Result<rustls::ClientConfig, TelemetryError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_errors_are_one_short_line() {
        let s = summary(&format!("a\nb\r{}", "x".repeat(500)));
        assert!(!s.contains('\n'));
        assert_eq!(s.chars().count(), 200);
    }
}
