//! The per-request context Pingora hands every hook: what admission decided, the body held,
//! the attempt under way, and the failure the app will be told about.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::error::ProxyError;
use crate::lifecycle::InFlight;
use crate::proxy::admission::Admitted;
use crate::proxy::body::Body;
use crate::telemetry::RequestTrace;
use crate::tenant::Tenant;

/// Per-request state shared between hooks.
pub struct RequestCtx {
    pub(crate) start: Instant,
    /// Counts the request as in flight until the context is dropped.
    _in_flight: InFlight,
    pub(crate) upstream_start: Option<Instant>,
    /// When the request went to FinHub (for FinHub's clock, from its `Date`).
    pub(crate) upstream_sent: Option<SystemTime>,
    /// Failed connection attempts; the next attempt uses the next resolved address.
    pub(crate) connect_failures: usize,
    /// This attempt's request header went to FinHub (it may have been executed).
    pub(crate) attempt_sent: bool,
    /// This attempt got FinHub's answer header (no retry after that).
    pub(crate) answered: bool,
    /// What the sidecar holds of the request body.
    pub(crate) body: Body,
    /// The tenant the request selected (also when it was refused afterwards).
    pub(crate) tenant: Option<Arc<Tenant>>,
    /// Set once the request is admitted.
    pub(crate) admitted: Option<Admitted>,
    /// For the audit line of a refused request: what admission learnt before refusing.
    pub(crate) refused_forwarded_for: Option<http::HeaderValue>,
    pub(crate) refused_uri: Option<http::Uri>,
    pub(crate) upstream_status: Option<u16>,
    /// A refusal decided by our own code (takes precedence over Pingora's error type).
    pub(crate) failure: Option<ProxyError>,
    /// The request's spans; `None` when tracing is off.
    pub(crate) trace: Option<Box<RequestTrace>>,
}

impl RequestCtx {
    /// A fresh context, counted as in flight (`in_flight`) until dropped.
    pub(crate) fn new(in_flight: InFlight) -> Self {
        RequestCtx {
            start: Instant::now(),
            _in_flight: in_flight,
            upstream_start: None,
            upstream_sent: None,
            connect_failures: 0,
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
