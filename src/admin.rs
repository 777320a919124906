//! Admin listener (its own port; never proxies anything).
//!
//! | Endpoint    | Meaning                                                                 |
//! |-------------|-------------------------------------------------------------------------|
//! | `GET /live` | 200 while the process is up.                                            |
//! | `GET /ready`| 200 when a client certificate is loaded (if configured) and every tenant |
//! |             | has a usable session; 503 with the reason otherwise.                     |
//! | `GET /metrics` | Prometheus text exposition of every metric in `metrics.rs`.          |
//!
//! Any other path is 404, any other method 405, each with a JSON body.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::auth::SessionTable;
use crate::tls::TlsStore;

/// What the admin endpoints look at.
pub struct AdminState {
    /// Session slots (readiness).
    pub sessions: Arc<SessionTable>,
    /// TLS snapshot (readiness).
    pub tls: Arc<TlsStore>,
    /// Whether a client certificate is required to be loaded.
    pub cert_required: bool,
    /// Metrics to expose.
    pub metrics: crate::metrics::Metrics,
}

impl AdminState {
    /// `None` when ready, else why not.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.cert_required && self.tls.current().cert_key.is_none() {
            return Some("client certificate not loaded".into());
        }
        let now = SystemTime::now();
        let missing: Vec<&str> = self
            .sessions
            .tenants()
            .iter()
            .filter(|t| t.usable(now).is_none())
            .map(|t| t.tenant.id.as_str())
            .collect();
        (!missing.is_empty())
            .then(|| format!("no valid session for tenant(s): {}", missing.join(", ")))
    }
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Answers one admin request.
pub fn handle(state: &AdminState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    match (path, method) {
        ("/live", &Method::GET) => json(StatusCode::OK, serde_json::json!({"status": "live"})),
        ("/ready", &Method::GET) => match state.not_ready_reason() {
            None => json(StatusCode::OK, serde_json::json!({"status": "ready"})),
            Some(reason) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "not_ready", "reason": reason}),
            ),
        },
        ("/metrics", &Method::GET) => {
            let mut r = Response::new(Full::new(Bytes::from(state.metrics.render())));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        ("/live" | "/ready" | "/metrics", _) => json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "method_not_allowed", "message": "use GET"}),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found", "message": "unknown admin endpoint"}),
        ),
    }
}

/// Serves the admin endpoints on `listener` until the task is dropped.
pub async fn serve(listener: std::net::TcpListener, state: Arc<AdminState>) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin listener unusable");
            return;
        }
    };
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = handle(&state, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
