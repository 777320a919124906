//! Pingora's `ProxyHttp` hooks for the data path, in the order Pingora calls them: each a
//! one-line contract delegating to a function of `inbound.rs` (the app's side), `outbound.rs`
//! (toward FinHub), `failure.rs` (what is retried, the JSON error) or `record.rs` (metrics and
//! the audit line).
//!
//! ```text
//! request_filter           client allowed? -> method (CONNECT, TRACE) -> no upgrade ->
//!                          header size/format -> target allowed? -> canonical, unreserved path
//!                          -> tenant -> X-Forwarded-For -> FinHub 429 hold -> usable session?
//!                          -> rate limit (last: a refused request consumes no token)
//!                          -> the body read whole (up to the hold limit) before going upstream
//! request_body_filter      a streamed body: what was read while deciding goes first
//! upstream_peer            the retry's backoff; resolved FinHub address + SNI + cert + CA
//! upstream_request_header  the app's headers minus the stripped ones, in a fresh header
//! upstream_request_filter  set session + compliance headers, Host (refused unless the header
//!                          above was built)
//! upstream_response_filter a 401 renews the session (single flight) and replays once; a gateway
//!                          502/503/504 is retried (retry.rs: resendable, attempts, deadline,
//!                          the tenant's budget)
//! fail_to_connect          a failed connect tries the next address, then the retry policy
//! error_while_proxy        a decided retry, or a reset/timeout before FinHub's answer
//! response_filter          echo X-Request-ID (and the idempotency key) to the app; drop any
//!                          header carrying a credential
//! logging                  metrics and the audit line
//! fail_to_proxy            map the failure to one JSON error (502 TLS / 504 timeout / ...)
//! ```

use std::sync::Arc;

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::Error;
use prometheus::IntCounter;

use crate::error::{self, ProxyError};
use crate::policy::compliance::ComplianceHeaders;
use crate::proxy::ctx::RequestCtx;
use crate::proxy::metrics::{Connection, ProxyMetrics, RequestSeries};
use crate::proxy::tenant::Tenants;
use crate::state::AppState;

/// The data path: the application state and a few series resolved once.
pub struct FinHubProxy {
    pub(super) state: Arc<AppState>,
    /// The series of requests refused before a tenant was chosen (`tenant="-"`).
    pub(super) no_tenant: RequestSeries,
    /// `upstream_connections_total{reused}`: `[new, reused]`.
    pub(super) connections: [IntCounter; 2],
    /// The compliance headers every request to FinHub carries.
    pub(super) compliance: ComplianceHeaders,
    /// Every tenant as the data path sees it.
    pub(super) tenants: Tenants,
    /// The data path's metrics.
    pub(super) metrics: ProxyMetrics,
}

impl FinHubProxy {
    /// The proxy over the application state, serving `tenants`, counting into `metrics`.
    pub fn new(state: Arc<AppState>, tenants: Tenants, metrics: &ProxyMetrics) -> Self {
        let no_tenant = metrics.request_series("-");
        let connections = [Connection::Opened, Connection::Reused].map(|c| metrics.connections(c));
        FinHubProxy {
            compliance: ComplianceHeaders::new(&state.config.headers),
            state,
            no_tenant,
            connections,
            tenants,
            metrics: metrics.clone(),
        }
    }
}

#[async_trait]
impl ProxyHttp for FinHubProxy {
    type CTX = RequestCtx;

    /// Contract: no downstream modules. Pingora's default installs a disabled compression
    /// module that still runs boxed hooks per request; the sidecar never compresses (FinHub's
    /// answers pass through as sent).
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    /// Contract: a fresh context, counted as in flight until the request ends.
    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new(self.state.lifecycle.track())
    }

    /// Contract: refuse (with a JSON error) anything that must not go upstream; the rate limit
    /// is asked last and may await Redis; then the body is read whole (up to the hold limit),
    /// so FinHub gets a request whole or not at all.
    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        self.filter_request(session, ctx).await
    }

    /// Contract: a streamed body sends what was read while deciding first; the whole request
    /// body arrives within `listener.body_timeout` of the request's start.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        self.next_body_chunk(body, ctx)
    }

    /// Contract: a retry first waits its backoff; then FinHub's resolved address, its SNI, the
    /// current client cert and CA.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        self.start_attempt(ctx).await
    }

    /// Contract: the request FinHub sees starts from the app's headers minus every one that
    /// must not cross (credentials, identity claims, overrides), built once per attempt.
    fn upstream_request_header(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Option<pingora::Result<RequestHeader>> {
        self.upstream_header(session.req_header(), ctx)
    }

    /// Contract: the request FinHub sees carries the sidecar's session, never the app's.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        self.send_request(upstream_request, ctx)
    }

    /// Contract: a 401 renews the tenant's session (single flight) and, if the request can be
    /// sent again, replays it once with the new session; otherwise the 401 goes to the app.
    /// A gateway 502/503/504 is sent again within the retry limits, else passed on.
    /// A 429 with Retry-After holds the tenant's requests locally until then.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        self.on_answer(session, upstream_response, ctx).await
    }

    /// Contract: a failed connect opens that address's breaker and is retried on the next
    /// address, once per address; when every address failed, the retry policy decides (nothing
    /// was sent, so any request may go again).
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        e: Box<Error>,
    ) -> Box<Error> {
        self.connect_failed(peer, ctx, e)
    }

    /// Contract: a decided retry (401 replay, gateway status) is sent again; a reset or timeout
    /// before FinHub's answer goes to the retry policy; nothing is retried once FinHub's
    /// answer started or the app is gone.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        self.proxy_failed(peer, session, e, ctx)
    }

    /// Contract: Pingora never logs an error's text (it can quote request or response bytes);
    /// `logging` writes one line with the classified code instead.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        _error: &Error,
        _context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        true
    }

    /// Contract: as `suppress_proxy_warn_log`, for the final error of a request.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        true
    }

    /// Contract: a request Pingora cannot parse gets the documented JSON error.
    fn invalid_request_response(&self, _error: &Error) -> Option<(ResponseHeader, bytes::Bytes)> {
        error::response(&ProxyError::InvalidRequest).ok()
    }

    /// Contract: the app sees the request id it can quote to FinHub support, and never a
    /// header that carries the sidecar's session.
    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        self.answer_headers(upstream_response, ctx)
    }

    /// Contract: Pingora's own error lines name method and path only (the query may carry
    /// personal data, as for the audit line).
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let req = session.req_header();
        format!("{} {}", req.method, req.uri.path())
    }

    /// Contract: count each upstream connection as new or reused.
    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        _ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        self.connections[usize::from(reused)].inc();
        Ok(())
    }

    /// Contract: one metrics record and one audit line per request; a failure as one log line
    /// with its code, kind and side, never its text.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        self.record(session, e, ctx).await
    }

    /// Contract: every failure reaches the app as one JSON error with a stable code.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        self.answer_failure(session, e, ctx).await
    }
}
