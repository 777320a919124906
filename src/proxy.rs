//! The data path: Pingora's `ProxyHttp` hooks, each a one-line contract delegating to a small
//! function in `policy`, `auth`, `tls` or `error`.
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

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use http::{HeaderValue, Uri};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpUpstreamRequestPolicy;
use pingora::{Error, ErrorSource, ErrorType};

use crate::audit::{Audit, AuditRecord};
use crate::auth::{Session as FinHubSession, SessionTable, TenantSessions};
use crate::config::Config;
use crate::error::{self, ProxyError};
use crate::lifecycle::{InFlight, Lifecycle};
use crate::metrics::{Metrics, RequestSeries};
use crate::policy::headers::names;
use crate::policy::ratelimit::{self, Check, Decision, Limiter, UpstreamHold};
use crate::policy::{allow, headers, path};
use crate::tls::TlsStore;
use crate::upstream::UpstreamAddrs;
use prometheus::IntCounter;

/// Seconds an app is told to wait when its tenant has no session yet.
const SESSION_RETRY_AFTER_SECS: u64 = 1;

/// Everything the data path reads; all of it is immutable, atomic, or a published snapshot.
pub struct FinHubProxy {
    config: Arc<Config>,
    tls: Arc<TlsStore>,
    upstream: Arc<UpstreamAddrs>,
    sessions: Arc<SessionTable>,
    metrics: Metrics,
    lifecycle: Arc<Lifecycle>,
    limiter: Box<dyn Limiter>,
    /// Per-tenant hold after FinHub answered 429 with Retry-After.
    holds: Vec<UpstreamHold>,
    audit: Audit,
    /// Per-tenant metric series by tenant index, resolved once.
    series: Vec<RequestSeries>,
    /// The series of requests refused before a tenant was chosen (`tenant="-"`).
    no_tenant: RequestSeries,
    /// `upstream_connections_total{reused}`: `[new, reused]`.
    connections: [IntCounter; 2],
}

/// The shared parts a [`FinHubProxy`] is built from.
pub struct ProxyParts {
    /// Configuration.
    pub config: Arc<Config>,
    /// Client TLS snapshot.
    pub tls: Arc<TlsStore>,
    /// Resolved upstream addresses.
    pub upstream: Arc<UpstreamAddrs>,
    /// Session slots.
    pub sessions: Arc<SessionTable>,
    /// Metrics.
    pub metrics: Metrics,
    /// Drain state.
    pub lifecycle: Arc<Lifecycle>,
    /// Rate-limit backend.
    pub limiter: Box<dyn Limiter>,
    /// Audit writer.
    pub audit: Audit,
}

/// Error type that asks Pingora to send the request again (after a 401 and a renewal).
const REPLAY: ErrorType = ErrorType::Custom("finhub_401_replay");

/// Per-request state shared between hooks.
pub struct RequestCtx {
    start: Instant,
    /// Counts the request as in flight until the context is dropped.
    _in_flight: InFlight,
    upstream_start: Option<Instant>,
    /// Failed connection attempts; the next attempt uses the next resolved address.
    connect_failures: usize,
    tenant: Option<Arc<TenantSessions>>,
    session: Option<Arc<FinHubSession>>,
    /// Path and query to send upstream when the app used absolute-form.
    upstream_uri: Option<Uri>,
    request_id: Option<HeaderValue>,
    activity_id: Option<HeaderValue>,
    idempotency_key: Option<HeaderValue>,
    forwarded_for: Option<HeaderValue>,
    upstream_status: Option<u16>,
    /// The request body is small enough (or absent) to be sent again after a 401.
    replayable: bool,
    /// The request was already replayed once.
    replayed: bool,
    /// The last upstream error is our replay request.
    replay_pending: bool,
    /// A refusal decided by our own code (takes precedence over Pingora's error type).
    failure: Option<ProxyError>,
}

impl FinHubProxy {
    /// The proxy over the shared control-plane state.
    pub fn new(parts: ProxyParts) -> Self {
        let holds = (0..parts.sessions.tenants().len())
            .map(|_| UpstreamHold::default())
            .collect();
        let series = parts
            .sessions
            .tenants()
            .iter()
            .map(|t| parts.metrics.request_series(&t.tenant.id))
            .collect();
        let no_tenant = parts.metrics.request_series("-");
        let connections = ["false", "true"].map(|reused| {
            parts
                .metrics
                .upstream_connections
                .with_label_values(&[reused])
        });
        FinHubProxy {
            series,
            no_tenant,
            connections,
            config: parts.config,
            tls: parts.tls,
            upstream: parts.upstream,
            sessions: parts.sessions,
            metrics: parts.metrics,
            lifecycle: parts.lifecycle,
            limiter: parts.limiter,
            holds,
            audit: parts.audit,
        }
    }

    /// Decides whether the request may be forwarded and for which tenant; fills `ctx`.
    fn admit(&self, session: &Session, ctx: &mut RequestCtx) -> Result<Check, ProxyError> {
        let policy = &self.config.policy;
        let peer_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
            .ok_or(ProxyError::ClientNotAllowed)?;
        if !allow::client_allowed(&policy.allowed_clients, peer_ip) {
            return Err(ProxyError::ClientNotAllowed);
        }
        let req = session.req_header();
        headers::method_allowed(&req.method)?;
        if req.headers.contains_key(&names::UPGRADE) {
            return Err(ProxyError::UpgradeNotSupported);
        }
        if headers::header_bytes(req) > policy.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge);
        }
        if let Some(name) = headers::malformed_header(req) {
            return Err(ProxyError::InvalidHeader(name));
        }
        let raw_path =
            match allow::destination(req.raw_path(), &self.config.upstream.allowed_hosts)? {
                allow::Target::Origin => req.raw_path(),
                allow::Target::Absolute { path_and_query } => {
                    ctx.upstream_uri = Some(origin_uri(path_and_query)?);
                    path_and_query
                }
            };
        let path = path::canonical(if raw_path.is_empty() { b"/" } else { raw_path })?;
        if path::is_reserved(&path, &policy.reserved_paths) {
            return Err(ProxyError::ReservedPath);
        }
        let tenant = self.sessions.select(req.headers.get(&names::X_TENANT_ID))?;
        ctx.tenant = Some(tenant.clone());
        let xff = headers::forwarded_for(
            peer_ip,
            &policy.trusted_forwarders,
            req.headers.get_all(&names::X_FORWARDED_FOR),
            self.config.headers.origin_ip,
        )?;
        ctx.forwarded_for = if xff == self.config.headers.origin_ip {
            Some(self.config.headers.origin_ip_header.clone())
        } else {
            HeaderValue::from_str(&xff.to_string()).ok()
        };
        if let Some(left) = self
            .holds
            .get(tenant.index)
            .and_then(UpstreamHold::remaining)
        {
            let retry_after_secs = Decision::Deny { retry_after: left }
                .retry_after_secs()
                .unwrap_or(1);
            return Err(ProxyError::RateLimited { retry_after_secs });
        }
        let usable = tenant
            .usable(SystemTime::now())
            .ok_or(ProxyError::SessionUnavailable {
                retry_after_secs: SESSION_RETRY_AFTER_SECS,
            })?;
        ctx.session = Some(usable);
        ctx.request_id = Some(headers::uuid_or_new(req.headers.get(&names::X_REQUEST_ID)));
        ctx.activity_id = Some(headers::uuid_or_new(req.headers.get(&names::X_ACTIVITY_ID)));
        ctx.idempotency_key = if self.config.headers.idempotency_keys {
            headers::idempotency_key(&req.method, req.headers.get(&names::X_IDEMPOTENCY_KEY))
        } else {
            req.headers.get(&names::X_IDEMPOTENCY_KEY).cloned()
        };
        ctx.replayable = headers::body_fits(req, self.config.auth.replay_body_limit);
        // Last, so that a request refused for any other reason consumes no token.
        Ok(self.limiter.check(tenant.index, &req.method, &path))
    }

    /// The peer for FinHub with the current certificate snapshot.
    fn peer(&self, attempt: usize) -> Result<HttpPeer, ProxyError> {
        let addr = self
            .upstream
            .pick_nth(attempt)
            .ok_or(ProxyError::UpstreamUnresolved)?;
        let u = &self.config.upstream;
        let tls = self.tls.current();
        let mut peer = match &tls.cert_key {
            Some(ck) => HttpPeer::new_mtls(addr, u.host.clone(), ck.clone()),
            None => HttpPeer::new(addr, true, u.host.clone()),
        };
        peer.options.connection_timeout = Some(u.connect_timeout);
        peer.options.read_timeout = Some(u.read_timeout);
        peer.options.write_timeout = Some(u.write_timeout);
        peer.options.idle_timeout = Some(u.idle_timeout);
        peer.options.ca = tls.ca.clone();
        // Second line behind admission's refusal: no upgrade handshake ever goes upstream.
        peer.options.http_upstream_request_policy = HttpUpstreamRequestPolicy::deny_upgrades();
        // A new certificate set means new connections: old pooled ones idle out (idle_timeout).
        peer.group_key = tls.fingerprint;
        Ok(peer)
    }

    /// Rewrites the request FinHub receives (protocol notes §3 header policy).
    fn rewrite(&self, req: &mut RequestHeader, ctx: &mut RequestCtx) -> pingora::Result<()> {
        if let Some(uri) = &ctx.upstream_uri {
            req.set_uri(uri.clone());
        }
        // Connecting may have taken a while (or this is a retry): take the tenant's session as
        // it is now, and never send one that has expired meanwhile.
        if let Some(tenant) = &ctx.tenant {
            match tenant.usable(SystemTime::now()) {
                Some(current) => ctx.session = Some(current),
                None => {
                    ctx.failure = Some(ProxyError::SessionUnavailable {
                        retry_after_secs: SESSION_RETRY_AFTER_SECS,
                    });
                    return Error::e_explain(
                        ErrorType::InternalError,
                        "session expired before sending",
                    );
                }
            }
        }
        headers::strip_app_credentials(req);
        let (Some(tenant), Some(session), Some(request_id)) =
            (&ctx.tenant, &ctx.session, &ctx.request_id)
        else {
            return Error::e_explain(
                ErrorType::InternalError,
                "request admitted without a session",
            );
        };
        headers::apply_session(req, session, &tenant.tenant.id_header)?;
        let h = &self.config.headers;
        req.insert_header(http::header::HOST, self.config.upstream.host_header.clone())?;
        req.insert_header("x-request-id", request_id.clone())?;
        let correlation =
            headers::correlation_id(req.headers.get(&names::X_CORRELATION_ID), request_id);
        req.insert_header("x-correlation-id", correlation)?;
        if let Some(id) = &ctx.activity_id {
            req.insert_header("x-activity-id", id.clone())?;
        }
        if let Some(key) = &ctx.idempotency_key {
            req.insert_header("x-idempotency-key", key.clone())?;
        }
        let ua = headers::user_agent(req.headers.get(http::header::USER_AGENT), &h.user_agent);
        req.insert_header(http::header::USER_AGENT, ua)?;
        req.insert_header("sec-ch-ua-platform", h.sec_ch_ua_platform.clone())?;
        if let Some(xff) = &ctx.forwarded_for {
            req.insert_header("x-forwarded-for", xff.clone())?;
        }
        if h.v21_headers {
            // Set unless the app sent its own (under any documented alias, §2.6).
            for (name, aliases, value) in [
                (names::X_FORWARDED_FROM, &[][..], &h.forwarded_from),
                (names::PLATFORM, &[][..], &h.platform),
                (
                    names::DEVICE_ID,
                    &[names::X_DEVICE_ID, names::DEVICE_ID_DASHED][..],
                    &h.device_id,
                ),
            ] {
                let app_sent = req.headers.contains_key(&name)
                    || aliases.iter().any(|a| req.headers.contains_key(a));
                if !app_sent {
                    req.insert_header(name, value.clone())?;
                }
            }
        }
        if headers::needs_default_content_type(req) {
            req.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        }
        Ok(())
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

/// A header value as text for the audit line (no allocation).
fn text(v: &Option<HeaderValue>) -> Option<&str> {
    v.as_ref().and_then(|v| v.to_str().ok())
}

impl FinHubProxy {
    /// FinHub answered 429: pass it on, and if it said when to come back, hold the tenant's
    /// requests locally until then so the fleet stops hammering.
    fn hold_after_429(&self, resp: &ResponseHeader, ctx: &RequestCtx) {
        let Some(tenant) = &ctx.tenant else { return };
        let retry_after = resp
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| ratelimit::parse_retry_after(v, SystemTime::now()));
        if let (Some(d), Some(hold)) = (retry_after, self.holds.get(tenant.index)) {
            hold.hold_for(d);
            tracing::warn!(
                tenant = %tenant.tenant.id,
                retry_after_ms = d.as_millis() as u64,
                "FinHub answered 429; holding this tenant's requests"
            );
        }
    }
}

/// `/path?query` bytes (empty means `/`) as an origin-form URI.
fn origin_uri(path_and_query: &[u8]) -> Result<Uri, ProxyError> {
    let pq = if path_and_query.is_empty() {
        &b"/"[..]
    } else {
        path_and_query
    };
    if pq.first() != Some(&b'/') {
        // `http://host?x` style: the query without a path.
        let mut v = b"/".to_vec();
        v.extend_from_slice(pq);
        return Uri::try_from(v).map_err(|_| ProxyError::BadTarget);
    }
    Uri::try_from(pq).map_err(|_| ProxyError::BadTarget)
}

#[async_trait]
impl ProxyHttp for FinHubProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            _in_flight: self.lifecycle.track(),
            upstream_start: None,
            connect_failures: 0,
            tenant: None,
            session: None,
            upstream_uri: None,
            request_id: None,
            activity_id: None,
            idempotency_key: None,
            forwarded_for: None,
            upstream_status: None,
            replayable: false,
            replayed: false,
            replay_pending: false,
            failure: None,
        }
    }

    /// Contract: refuse (with a JSON error, connection kept) anything that must not go upstream.
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
        match verdict {
            Ok(()) => Ok(false),
            Err(e) => {
                if closes_connection(&e) {
                    session.set_keepalive(None);
                }
                error::respond(session, &e).await?;
                ctx.failure = Some(e);
                Ok(true)
            }
        }
    }

    /// Contract: FinHub's resolved address, its SNI, the current client cert and CA.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        ctx.upstream_start = Some(Instant::now());
        match self.peer(ctx.connect_failures) {
            Ok(p) => Ok(Box::new(p)),
            Err(e) => {
                ctx.failure = Some(e);
                Error::e_explain(ErrorType::ConnectNoRoute, "upstream address not resolved")
            }
        }
    }

    /// Contract: the request FinHub sees carries the sidecar's session, never the app's.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        self.rewrite(upstream_request, ctx)
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
            self.metrics
                .upstream_duration
                .observe(t.elapsed().as_secs_f64());
        }
        let status = upstream_response.status.as_u16();
        ctx.upstream_status = Some(status);
        if status == 429 {
            self.hold_after_429(upstream_response, ctx);
        }
        if status != 401 {
            return Ok(());
        }
        let (Some(tenant), Some(refused)) = (ctx.tenant.clone(), ctx.session.clone()) else {
            return Ok(());
        };
        tenant.request_renewal(&refused);
        let method_ok = session.req_header().method.is_safe() || ctx.idempotency_key.is_some();
        let can_replay = ctx.replayable
            && method_ok
            && !ctx.replayed
            && !session.as_ref().retry_buffer_truncated();
        if !can_replay {
            return Ok(());
        }
        // A forced renewal may refresh and then log in: two auth calls.
        let wait = self.config.auth.request_timeout * 2 + std::time::Duration::from_secs(1);
        let Some(renewed) = tenant.newer_than(&refused, wait).await else {
            return Ok(());
        };
        ctx.session = Some(renewed);
        ctx.replayed = true;
        ctx.replay_pending = true;
        if let Some(series) = self.series.get(tenant.index) {
            series.replays.inc();
        }
        Error::e_explain(
            REPLAY,
            "FinHub answered 401; replaying once with a renewed session",
        )
    }

    /// Contract: a failed connect is retried on the next resolved address, once per address.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.connect_failures += 1;
        e.set_retry(ctx.connect_failures < self.upstream.count());
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
        if std::mem::take(&mut ctx.replay_pending) {
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

    /// Contract: the app sees the request id it can quote to FinHub support.
    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if let Some(session) = &ctx.session {
            let token = headers::token_fingerprint(session.token.expose());
            let refresh = session
                .refresh_token
                .as_ref()
                .map(|r| r.expose().as_bytes());
            let secrets = [Some(token), refresh];
            let secrets: Vec<&[u8]> = secrets.into_iter().flatten().collect();
            headers::strip_response_credentials(upstream_response, &secrets);
        }
        if let Some(id) = &ctx.request_id {
            upstream_response.insert_header("x-request-id", id.clone())?;
        }
        Ok(())
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

    /// Contract: one metrics record per request (tenant, decision, status class, duration).
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let decision = ctx.failure.as_ref().map_or("allow", ProxyError::decision);
        let series = ctx
            .tenant
            .as_ref()
            .and_then(|t| self.series.get(t.index))
            .unwrap_or(&self.no_tenant);
        if matches!(ctx.failure, Some(ProxyError::RateLimited { .. })) {
            series.rate_limited.inc();
        }
        series.count_request(decision, status);
        let elapsed = ctx.start.elapsed();
        series.duration.observe(elapsed.as_secs_f64());
        if let Some(e) = e {
            // Kind and side only: an error's text can quote header or body bytes.
            tracing::warn!(
                tenant = ctx.tenant.as_ref().map(|t| t.tenant.id.as_str()),
                request_id = text(&ctx.request_id),
                code = ctx.failure.as_ref().map_or("-", ProxyError::code),
                kind = e.etype().as_str(),
                side = e.esource().as_str(),
                "request failed"
            );
        }
        let req = session.req_header();
        let path_and_query = ctx
            .upstream_uri
            .as_ref()
            .and_then(|u| u.path_and_query())
            .or(req.uri.path_and_query())
            .map_or("/", |p| p.as_str());
        self.audit.write(&AuditRecord {
            kind: "audit",
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            request_id: text(&ctx.request_id),
            activity_id: text(&ctx.activity_id),
            tenant: ctx.tenant.as_ref().map(|t| t.tenant.id.as_str()),
            client_ip: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip()),
            forwarded_for: text(&ctx.forwarded_for),
            user_agent: req
                .headers
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok()),
            method: req.method.as_str(),
            path: self.audit.path(path_and_query),
            status,
            decision,
            reason: ctx.failure.as_ref().map(ProxyError::code),
            upstream_status: ctx.upstream_status,
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            bytes_in: session.body_bytes_read(),
            bytes_out: session.body_bytes_sent(),
            replayed: ctx.replayed,
        });
        self.metrics
            .audit_dropped
            .set(i64::try_from(self.audit.dropped()).unwrap_or(i64::MAX));
    }

    /// Contract: every failure reaches the app as one JSON error with a stable code.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let downstream_gone = e.esource() == &ErrorSource::Downstream
            && matches!(
                e.etype(),
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed
            );
        if downstream_gone {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_form_paths_become_origin_form() {
        assert_eq!(
            origin_uri(b"/api/v2/x?a=1&b=%20").unwrap(),
            "/api/v2/x?a=1&b=%20"
        );
        assert_eq!(origin_uri(b"").unwrap(), "/");
        assert_eq!(origin_uri(b"?q=1").unwrap(), "/?q=1");
    }

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
