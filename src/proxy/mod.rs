//! The data path: Pingora's `ProxyHttp` hooks, each a one-line contract delegating to a small
//! function: admission (`admission.rs`), the 401 replay (`replay.rs`), the header rules
//! (`policy/headers.rs`), the refusal format (`error.rs`), the audit line (`audit.rs`).
//!
//! ```text
//! request_filter           client allowed? -> method (CONNECT, TRACE) -> no upgrade ->
//!                          header size/format -> target allowed? -> canonical, unreserved path
//!                          -> tenant -> X-Forwarded-For -> FinHub 429 hold -> usable session?
//!                          -> rate limit (last: a refused request consumes no token)
//! upstream_peer            resolved FinHub address + SNI + current client cert + CA
//! upstream_request_filter  strip app credentials, set session + compliance headers, Host, path
//! upstream_response_filter a 401 from FinHub renews the session (single flight) and replays once
//! error_while_proxy        only that replay, or a safe retry on a reused connection, retries
//! response_filter          echo X-Request-ID to the app; drop any header carrying a credential
//! logging                  metrics and the audit line
//! fail_to_proxy            map the failure to one JSON error (502 TLS / 504 timeout / ...)
//! ```

pub mod admission;
pub mod replay;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpUpstreamRequestPolicy;
use pingora::{Error, ErrorSource, ErrorType};
use prometheus::IntCounter;

use crate::audit::AuditRecord;
use crate::error::{self, ProxyError};
use crate::lifecycle::InFlight;
use crate::metrics::{Outcome, RequestSeries};
use crate::policy::headers::{self, names};
use crate::policy::ratelimit::{self, Check, Decision};
use crate::shared::Shared;
use crate::tenant::Tenant;
use admission::{session_retry_after, Admission, Admitted};

/// The data path: the shared state and a few series resolved once.
pub struct FinHubProxy {
    shared: Arc<Shared>,
    /// The series of requests refused before a tenant was chosen (`tenant="-"`).
    no_tenant: RequestSeries,
    /// `upstream_connections_total{reused}`: `[new, reused]`.
    connections: [IntCounter; 2],
}

/// Headers the rewrite may add to the app's (session, ids, compliance, host, content type).
const REWRITE_HEADERS: usize = 16;

/// Error type that asks Pingora to send the request again (after a 401 and a renewal).
const REPLAY: ErrorType = ErrorType::Custom("finhub_401_replay");

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
}

impl FinHubProxy {
    /// The proxy over the shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        let no_tenant = shared.metrics.request_series("-");
        let connections = ["false", "true"].map(|reused| {
            shared
                .metrics
                .upstream_connections
                .with_label_values(&[reused])
        });
        FinHubProxy {
            shared,
            no_tenant,
            connections,
        }
    }

    /// Admits the request (recording it in `ctx`) and returns its rate-limit check.
    fn admit(&self, session: &Session, ctx: &mut RequestCtx) -> Result<Check, ProxyError> {
        let req = session.req_header();
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let admission = Admission {
            config: &self.shared.config,
            tenants: &self.shared.tenants,
        };
        match admission.admit(req, peer, SystemTime::now()) {
            Ok((admitted, path)) => {
                let check = admitted.tenant.limits.check(&req.method, &path);
                ctx.tenant = Some(admitted.tenant.clone());
                ctx.admitted = Some(admitted);
                Ok(check)
            }
            Err(refused) => {
                ctx.tenant = refused.tenant;
                ctx.refused_forwarded_for = refused.forwarded_for;
                ctx.refused_uri = refused.upstream_uri;
                Err(refused.error)
            }
        }
    }

    /// The peer for FinHub with the current certificate snapshot, at the address the upstream
    /// table prefers now (its circuit breakers skip addresses that failed; `upstream.rs`).
    fn peer(&self) -> Result<HttpPeer, ProxyError> {
        let addr = self
            .shared
            .upstream
            .pick()
            .ok_or(ProxyError::UpstreamUnresolved)?;
        let u = &self.shared.config.upstream;
        let tls = self.shared.tls.current();
        let mut peer = match &tls.cert_key {
            Some(ck) => HttpPeer::new_mtls(addr, u.host.clone(), ck.clone()),
            None => HttpPeer::new(addr, true, u.host.clone()),
        };
        peer.options.connection_timeout = Some(u.connect_timeout);
        // The TLS handshake too: an address that accepts and never answers must not hang.
        peer.options.total_connection_timeout = Some(u.connect_timeout.saturating_mul(2));
        peer.options.read_timeout = Some(u.read_timeout);
        peer.options.write_timeout = Some(u.write_timeout);
        peer.options.idle_timeout = Some(u.idle_timeout);
        peer.options.ca = tls.ca.clone();
        // Through the egress proxy: a CONNECT tunnel to FinHub, TLS inside it.
        peer.options.custom_l4 = self.shared.upstream.tunnel().cloned();
        // Second line behind admission's refusal: no upgrade handshake ever goes upstream.
        peer.options.http_upstream_request_policy = HttpUpstreamRequestPolicy::deny_upgrades();
        // A new certificate set means new connections: old pooled ones idle out (idle_timeout).
        peer.group_key = tls.fingerprint;
        Ok(peer)
    }

    /// Rewrites the request FinHub receives (protocol notes §3 header policy).
    fn rewrite(&self, req: &mut RequestHeader, a: &mut Admitted) -> Result<(), ProxyError> {
        // Connecting may have taken a while (or this is a retry): take the tenant's session as
        // it is now, and never send one that has expired meanwhile.
        let now = SystemTime::now();
        a.session =
            a.tenant
                .sessions
                .usable(now)
                .ok_or_else(|| ProxyError::SessionUnavailable {
                    retry_after_secs: session_retry_after(
                        &a.tenant.sessions,
                        now,
                        self.shared.config.auth.recovery_interval,
                    ),
                })?;
        // One fresh header, sized for everything the sidecar adds: the app's headers minus the
        // stripped ones, in one pass (no map growth while ours are inserted).
        let path = a.upstream_uri.as_ref().and_then(|u| u.path_and_query());
        let path = path.map_or(req.raw_path(), |p| p.as_str().as_bytes());
        *req = headers::without_app_credentials(req, path, REWRITE_HEADERS)
            .map_err(|_| ProxyError::Internal)?;
        let h = &self.shared.config.headers;
        let set = |req: &mut RequestHeader| -> pingora::Result<()> {
            headers::apply_session(req, &a.session, &a.tenant.sessions.tenant.id_header)?;
            req.insert_header(
                http::header::HOST,
                self.shared.config.upstream.host_header.clone(),
            )?;
            req.insert_header(names::X_REQUEST_ID, a.request_id.clone())?;
            let correlation =
                headers::correlation_id(req.headers.get(&names::X_CORRELATION_ID), &a.request_id);
            req.insert_header(names::X_CORRELATION_ID, correlation)?;
            req.insert_header(names::X_ACTIVITY_ID, a.activity_id.clone())?;
            if let Some(key) = &a.idempotency_key {
                req.insert_header(names::X_IDEMPOTENCY_KEY, key.clone())?;
            }
            let ua = headers::user_agent(req.headers.get(http::header::USER_AGENT), &h.user_agent);
            req.insert_header(http::header::USER_AGENT, ua)?;
            req.insert_header(names::SEC_CH_UA_PLATFORM, h.sec_ch_ua_platform.clone())?;
            req.insert_header(names::X_FORWARDED_FOR, a.forwarded_for.clone())?;
            if h.v21_headers {
                headers::apply_request_source(req, &h.forwarded_from, &h.platform, &h.device_id)?;
            }
            if headers::needs_default_content_type(req) {
                req.insert_header(http::header::CONTENT_TYPE, "application/json")?;
            }
            Ok(())
        };
        set(req).map_err(|_| ProxyError::Internal)
    }

    /// FinHub answered 429: pass it on, and if it said when to come back, hold the tenant's
    /// requests locally until then so the fleet stops hammering.
    fn hold_after_429(&self, resp: &ResponseHeader, tenant: &Tenant) {
        let retry_after = resp
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| ratelimit::parse_retry_after(v, SystemTime::now()));
        if let Some(d) = retry_after {
            tenant.hold.hold_for(d);
            tracing::warn!(
                tenant = %tenant.id(),
                retry_after_ms = d.as_millis() as u64,
                "FinHub answered 429; holding this tenant's requests"
            );
        }
    }

    /// A 401 for the session `a` carried: renew (single flight) and, if the request can be sent
    /// again, wait for the new session. True when the request should be replayed.
    async fn renew_after_401(&self, a: &mut Admitted, body_truncated: bool) -> bool {
        a.tenant.sessions.request_renewal(&a.session);
        if !a.replay.wants_replay(body_truncated) {
            return false;
        }
        // A forced renewal may refresh and then log in (after a follower's wait for the owner).
        let wait = self.shared.config.auth.replay_wait();
        let Some(renewed) = a.tenant.sessions.newer_than(&a.session, wait).await else {
            return false;
        };
        a.session = renewed;
        a.replay.start();
        a.tenant.series.replays.inc();
        true
    }

    /// The metric series of a request's tenant (`-` before one was chosen).
    fn series_of<'a>(&'a self, ctx: &'a RequestCtx) -> &'a RequestSeries {
        ctx.tenant.as_ref().map_or(&self.no_tenant, |t| &t.series)
    }
}

/// A rate-limit decision as the refusal it means, if any.
fn rate_limit_verdict(decision: Decision) -> Result<(), ProxyError> {
    match decision {
        Decision::Allow => Ok(()),
        Decision::Unavailable => Err(ProxyError::RateLimitUnavailable),
        deny @ Decision::Deny { .. } => Err(ProxyError::RateLimited {
            retry_after_secs: deny.retry_after_secs().unwrap_or(1),
        }),
    }
}

/// Whether a refusal also ends the connection: what follows a CONNECT or an upgrade request is
/// tunnel bytes, not HTTP; a peer outside the allowlist gets nothing more.
fn closes_connection(e: &ProxyError) -> bool {
    matches!(
        e,
        ProxyError::ConnectNotSupported
            | ProxyError::UpgradeNotSupported
            | ProxyError::ClientNotAllowed
    )
}

/// The secrets no response header may carry: the session token (a JWT's signature part) and
/// the refresh token.
fn response_secrets(a: &Admitted) -> [Option<&[u8]>; 2] {
    [
        Some(headers::token_fingerprint(a.session.token.expose())),
        a.session
            .refresh_token
            .as_ref()
            .map(|r| r.expose().as_bytes()),
    ]
}

#[async_trait]
impl ProxyHttp for FinHubProxy {
    type CTX = RequestCtx;

    /// Contract: no downstream modules. Pingora's default installs a disabled compression
    /// module that still runs boxed hooks per request; the sidecar never compresses (FinHub's
    /// answers pass through as sent).
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            _in_flight: self.shared.lifecycle.track(),
            upstream_start: None,
            upstream_sent: None,
            connect_failures: 0,
            tenant: None,
            admitted: None,
            refused_forwarded_for: None,
            refused_uri: None,
            upstream_status: None,
            failure: None,
        }
    }

    /// Contract: refuse (with a JSON error) anything that must not go upstream; the rate limit
    /// is asked last and may await Redis.
    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        let verdict = match self.admit(session, ctx) {
            Ok(Check::Ready(decision)) => rate_limit_verdict(decision),
            Ok(Check::Wait(pending)) => rate_limit_verdict(pending.await),
            Err(e) => Err(e),
        };
        let Err(e) = verdict else {
            // A body that trickles in holds an app slot and a FinHub connection: each read of it
            // waits at most body_timeout (request_body_filter bounds the total).
            let body_timeout = self.shared.config.listener.body_timeout;
            session
                .as_downstream_mut()
                .set_read_timeout(Some(body_timeout));
            return Ok(false);
        };
        if closes_connection(&e) {
            session.set_keepalive(None);
        }
        error::respond(session, &e).await?;
        ctx.failure = Some(e);
        Ok(true)
    }

    /// Contract: the whole request body arrives within `listener.body_timeout` of the request's
    /// start.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if ctx.start.elapsed() > self.shared.config.listener.body_timeout {
            ctx.failure = Some(ProxyError::BodyTimeout);
            return Error::e_explain(ErrorType::ReadTimedout, "request body too slow");
        }
        Ok(())
    }

    /// Contract: FinHub's resolved address, its SNI, the current client cert and CA.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        ctx.upstream_start = Some(Instant::now());
        self.peer().map(Box::new).or_else(|e| {
            ctx.failure = Some(e);
            Error::e_explain(ErrorType::ConnectNoRoute, "upstream address not resolved")
        })
    }

    /// Contract: the request FinHub sees carries the sidecar's session, never the app's.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let Some(a) = ctx.admitted.as_mut() else {
            return Error::e_explain(ErrorType::InternalError, "request was not admitted");
        };
        if let Err(e) = self.rewrite(upstream_request, a) {
            ctx.failure = Some(e);
            return Error::e_explain(ErrorType::InternalError, "request not sent");
        }
        ctx.upstream_sent = Some(SystemTime::now());
        Ok(())
    }

    /// Contract: a 401 renews the tenant's session (single flight) and, if the request can be
    /// sent again, replays it once with the new session; otherwise the 401 goes to the app.
    /// A 429 with Retry-After holds the tenant's requests locally until then.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if let Some(t) = ctx.upstream_start.take() {
            self.shared
                .metrics
                .upstream_duration
                .observe(t.elapsed().as_secs_f64());
        }
        let status = upstream_response.status.as_u16();
        ctx.upstream_status = Some(status);
        if let Some(sent) = ctx.upstream_sent {
            // An answer's Date may narrow the estimate of FinHub's clock, never reset it
            // (auth/clock.rs): the auth endpoints' answers are the reference.
            let h = &upstream_response.headers;
            let cached = h.contains_key(http::header::AGE);
            let date = h.get(http::header::DATE);
            self.shared
                .sessions
                .clock()
                .observe_api(date, cached, sent, SystemTime::now());
        }
        let Some(a) = ctx.admitted.as_mut() else {
            return Ok(());
        };
        match status {
            429 => self.hold_after_429(upstream_response, &a.tenant),
            401 => {
                let truncated = session.as_ref().retry_buffer_truncated();
                if self.renew_after_401(a, truncated).await {
                    return Error::e_explain(REPLAY, "FinHub answered 401; replaying once");
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Contract: a failed connect opens that address's breaker and is retried on the next
    /// address, once per address.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.connect_failures += 1;
        // A proxy that refused the tunnel refuses it again from its other addresses.
        let refused = matches!(
            ProxyError::from_upstream(&e),
            ProxyError::EgressProxyRefused(_)
        );
        if let (false, Some(addr)) = (refused, peer._address.as_inet()) {
            self.shared.upstream.connect_failed(*addr);
        }
        e.set_retry(!refused && ctx.connect_failures < self.shared.upstream.count());
        e
    }

    /// Contract: only our 401 replay, or an idempotent request on a reused connection, retries.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if ctx
            .admitted
            .as_mut()
            .is_some_and(|a| a.replay.take_pending())
        {
            e.set_retry(true);
        } else if !session.req_header().method.is_idempotent()
            || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        e
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
        let Some(a) = &ctx.admitted else {
            return Ok(());
        };
        headers::strip_response_credentials(upstream_response, &response_secrets(a));
        upstream_response.insert_header(names::X_REQUEST_ID, a.request_id.clone())
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
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let outcome = ctx
            .failure
            .as_ref()
            .map_or(Outcome::Allow, ProxyError::outcome);
        let series = self.series_of(ctx);
        if matches!(ctx.failure, Some(ProxyError::RateLimited { .. })) {
            series.rate_limited.inc();
        }
        series.count_request(outcome, status);
        series.duration.observe(ctx.start.elapsed().as_secs_f64());
        if let Some(e) = e {
            tracing::warn!(
                tenant = ctx.tenant.as_ref().map(|t| t.id()),
                request_id = ctx
                    .admitted
                    .as_ref()
                    .and_then(|a| a.request_id.to_str().ok()),
                code = ctx.failure.as_ref().map_or("-", ProxyError::code),
                kind = e.etype().as_str(),
                side = e.esource().as_str(),
                "request failed"
            );
        }
        let record = AuditRecord::of(session, ctx, &self.shared.audit, status, outcome.label());
        self.shared.audit.write(&record);
        self.shared
            .metrics
            .audit_dropped
            .set(i64::try_from(self.shared.audit.dropped()).unwrap_or(i64::MAX));
    }

    /// Contract: every failure reaches the app as one JSON error with a stable code.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if downstream_gone(e) {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let err = ctx
            .failure
            .clone()
            .unwrap_or_else(|| ProxyError::from_upstream(e));
        let code = err.status();
        if session.response_written().is_none() {
            if let Err(write_err) = error::respond(session, &err).await {
                tracing::debug!(error = %write_err, "could not send error response to app");
            }
        }
        ctx.failure = Some(err);
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}

/// Whether the app itself went away (nothing to answer).
fn downstream_gone(e: &Error) -> bool {
    e.esource() == &ErrorSource::Downstream
        && matches!(
            e.etype(),
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_decisions_map_to_refusals() {
        assert_eq!(rate_limit_verdict(Decision::Allow), Ok(()));
        assert_eq!(
            rate_limit_verdict(Decision::Deny {
                retry_after: std::time::Duration::from_millis(1500)
            }),
            Err(ProxyError::RateLimited {
                retry_after_secs: 2
            })
        );
        assert_eq!(
            rate_limit_verdict(Decision::Unavailable),
            Err(ProxyError::RateLimitUnavailable)
        );
    }
}
