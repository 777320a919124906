//! The per-request context Pingora hands every hook: what admission decided, the body held,
//! the attempt under way, and the failure the app will be told about.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::error::ProxyError;
use crate::lifecycle::InFlight;
use crate::proxy::admission::Admitted;
use crate::proxy::body::Body;
use crate::proxy::tenant::Tenant;
use crate::telemetry::RequestTrace;

/// Per-request state shared between hooks.
pub struct RequestCtx {
    /// When the request arrived.
    pub(super) start: Instant,
    /// Counts the request as in flight until the context is dropped.
    _in_flight: InFlight,
    /// When the current attempt chose FinHub (for `upstream_duration_seconds`).
    pub(super) upstream_start: Option<Instant>,
    /// When the request went to FinHub (for FinHub's clock, from its `Date`).
    pub(super) upstream_sent: Option<SystemTime>,
    /// Failed connection attempts; the next attempt uses the next resolved address.
    pub(super) connect_failures: usize,
    /// This attempt's upstream header was built from the app's, credentials stripped
    /// (`upstream_request_header`); nothing is sent upstream without it.
    pub(super) header_built: bool,
    /// This attempt's request header went to FinHub (it may have been executed).
    pub(super) attempt_sent: bool,
    /// This attempt got FinHub's answer header (no retry after that).
    pub(super) answered: bool,
    /// What the sidecar holds of the request body.
    pub(super) body: Body,
    /// The tenant the request selected (also when it was refused afterwards).
    pub(super) tenant: Option<Arc<Tenant>>,
    /// Set once the request is admitted.
    pub(super) admitted: Option<Admitted>,
    /// For the audit line of a refused request: what admission learnt before refusing.
    pub(super) refused_forwarded_for: Option<http::HeaderValue>,
    /// For the audit line of a refused request: the target admission derived, if any.
    pub(super) refused_uri: Option<http::Uri>,
    /// The status FinHub answered the last attempt with.
    pub(super) upstream_status: Option<u16>,
    /// A refusal decided by our own code (takes precedence over Pingora's error type).
    pub(super) failure: Option<ProxyError>,
    /// The request's spans; `None` when tracing is off.
    pub(super) trace: Option<Box<RequestTrace>>,
}

impl RequestCtx {
    /// A fresh context, counted as in flight (`in_flight`) until dropped.
    pub(super) fn new(in_flight: InFlight) -> Self {
        RequestCtx {
            start: Instant::now(),
            _in_flight: in_flight,
            upstream_start: None,
            upstream_sent: None,
            connect_failures: 0,
            header_built: false,
            attempt_sent: false,
            answered: false,
            body: Body::default(),
            tenant: None,
            admitted: None,
            refused_forwarded_for: None,
            refused_uri: None,
            upstream_status: None,
            failure: None,
            trace: None,
        }
    }
}
