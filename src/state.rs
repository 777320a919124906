//! The state every part of the sidecar shares, built once and handed to the proxy, the admin
//! listener and the control plane as one `Arc<AppState>`. All of it is immutable, atomic, or a
//! published snapshot: nothing here is locked on the request path.

use std::sync::Arc;
use std::time::Instant;

use crate::audit::Audit;
use crate::auth::SessionTable;
use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::tls::TlsStore;
use crate::upstream::UpstreamAddrs;

/// The application state: configuration, certificates, FinHub's addresses, tenants and their sessions,
/// metrics, drain state, audit writer.
pub struct AppState {
    /// Configuration.
    pub config: Arc<Config>,
    /// The published client TLS snapshot.
    pub tls: Arc<TlsStore>,
    /// FinHub's resolved addresses.
    pub upstream: Arc<UpstreamAddrs>,
    /// Session slots and FinHub's clock (the control plane renews them).
    pub sessions: Arc<SessionTable>,
    /// Metrics.
    pub metrics: Metrics,
    /// Readiness latch, in-flight count, drain.
    pub lifecycle: Arc<Lifecycle>,
    /// The audit writer.
    pub audit: Audit,
    /// Process start (uptime in `/status`).
    pub started: Instant,
    /// The tracer for request spans; `None` when tracing is off.
    pub tracer: Option<crate::telemetry::Tracer>,
}
