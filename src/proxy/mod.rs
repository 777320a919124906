//! The data path: Pingora's `ProxyHttp` hooks, each a one-line contract delegating to a small
//! function: admission (`admission.rs`), the body held whole (`body.rs`), every retry — the 401
//! replay and FinHub's blips — (`retry.rs`), the header rules
//! (`policy/headers.rs`), the refusal format (`error.rs`), the audit line (`audit.rs`).
//!
//! ```text
//! request_filter           client allowed? -> method (CONNECT, TRACE) -> no upgrade ->
//!                          header size/format -> target allowed? -> canonical, unreserved path
//!                          -> tenant -> X-Forwarded-For -> FinHub 429 hold -> usable session?
//!                          -> rate limit (last: a refused request consumes no token)
//!                          -> the body read whole (up to the hold limit) before going upstream
//! request_body_filter      a streamed body: what was read while deciding goes first
//! upstream_peer            the retry's backoff; resolved FinHub address + SNI + cert + CA
//! upstream_request_filter  strip app credentials, set session + compliance headers, Host, path
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

pub mod admission;
pub mod body;
pub mod retry;

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
use crate::error::{self, Outcome, ProxyError};
use crate::lifecycle::InFlight;
use crate::metrics::RequestSeries;
use crate::policy::headers::{self, names};
use crate::policy::ratelimit::{self, Check, Decision};
use crate::state::AppState;
use crate::telemetry::{self, RequestTrace};
use crate::tenant::Tenant;
use admission::{session_retry_after, Admission, Admitted};
use body::{Body, BodyError};
use retry::{Failure, Limits, Refusal};

/// The data path: the application state and a few series resolved once.
pub struct FinHubProxy {
    state: Arc<AppState>,
    /// The series of requests refused before a tenant was chosen (`tenant="-"`).
    no_tenant: RequestSeries,
    /// `upstream_connections_total{reused}`: `[new, reused]`.
    connections: [IntCounter; 2],
}

/// Headers the rewrite may add to the app's (session, ids, compliance, host, content type).
const REWRITE_HEADERS: usize = 16;

/// Error type that asks Pingora to send the request again (a decided retry: after a 401 and a
/// renewal, or after a gateway 502/503/504).
const RETRY: ErrorType = ErrorType::Custom("finhub_retry");

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

impl FinHubProxy {
    /// The proxy over the application state.
    pub fn new(state: Arc<AppState>) -> Self {
        let no_tenant = state.metrics.request_series("-");
        let connections = ["false", "true"].map(|reused| {
            state
                .metrics
                .upstream_connections
                .with_label_values(&[reused])
        });
        FinHubProxy {
            state,
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
            config: &self.state.config,
            tenants: &self.state.tenants,
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
            .state
            .upstream
            .pick()
            .ok_or(ProxyError::UpstreamUnresolved)?;
        let u = &self.state.config.upstream;
        let tls = self.state.tls.current();
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
        peer.options.custom_l4 = self.state.upstream.tunnel().cloned();
        // Second line behind admission's refusal: no upgrade handshake ever goes upstream.
        peer.options.http_upstream_request_policy = HttpUpstreamRequestPolicy::deny_upgrades();
        // A new certificate set means new connections: old pooled ones idle out (idle_timeout).
        peer.group_key = tls.fingerprint;
        Ok(peer)
    }

    /// Rewrites the request FinHub receives (protocol notes §3 header policy).
    fn rewrite(
        &self,
        req: &mut RequestHeader,
        a: &mut Admitted,
        body_read: bool,
    ) -> Result<(), ProxyError> {
        // Connecting may have taken a while (or this is a retry): take the tenant's session as
        // it is now, and never send one that has expired meanwhile.
        let now = SystemTime::now();
        a.session = a
            .tenant
            .slot
            .usable(now)
            .ok_or_else(|| ProxyError::SessionUnavailable {
                retry_after_secs: session_retry_after(
                    &a.tenant.slot,
                    now,
                    self.state.config.auth.recovery_interval,
                ),
            })?;
        // One fresh header, sized for everything the sidecar adds: the app's headers minus the
        // stripped ones, in one pass (no map growth while ours are inserted).
        let path = a.upstream_uri.as_ref().and_then(|u| u.path_and_query());
        let path = path.map_or(req.raw_path(), |p| p.as_str().as_bytes());
        *req = headers::without_app_credentials(req, path, REWRITE_HEADERS)
            .map_err(|_| ProxyError::Internal)?;
        if body_read {
            // The app got its `100 Continue` from the sidecar; FinHub gets the body whole.
            req.remove_header(&http::header::EXPECT);
        }
        let h = &self.state.config.headers;
        let set = |req: &mut RequestHeader| -> pingora::Result<()> {
            headers::apply_session(req, &a.session, &a.tenant.slot.tenant.id_header)?;
            req.insert_header(
                http::header::HOST,
                self.state.config.upstream.host_header.clone(),
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
    async fn renew_after_401(&self, a: &mut Admitted) -> bool {
        a.tenant.slot.request_renewal(&a.session);
        if !a.retry.wants_replay() {
            return false;
        }
        // A forced renewal may refresh and then log in (after a follower's wait for the owner).
        let wait = self.state.config.auth.replay_wait();
        let Some(renewed) = a.tenant.slot.newer_than(&a.session, wait).await else {
            return false;
        };
        a.session = renewed;
        a.retry.replay();
        a.tenant.series.replays.inc();
        true
    }

    /// Reads the body (up to the hold limit) before anything goes upstream; a broken or slow
    /// body is refused here, whole or not at all at FinHub.
    async fn hold_body(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<(), BodyError> {
        let limit = self.state.config.auth.replay_body_limit;
        let deadline = ctx.start + self.state.config.listener.body_timeout;
        let body = Body::read(session, deadline).await?;
        if let Some(a) = ctx.admitted.as_mut() {
            a.retry.set_body_whole(body.resendable_within(limit));
            // Only a request that goes upstream earns retries: refusals fund no retry storm.
            a.tenant.retry_budget.deposit(ctx.start);
        }
        ctx.body = body;
        Ok(())
    }

    /// FinHub answered a gateway `status`: whether to send the request again (after the
    /// backoff, which `upstream_peer` waits).
    fn retry_after_status(&self, resp: &ResponseHeader, ctx: &mut RequestCtx) -> bool {
        let retry_after = resp
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| ratelimit::parse_retry_after(v, SystemTime::now()));
        let status = resp.status.as_u16();
        self.decide_retry(ctx, |retry, limits| {
            retry.after_status(status, retry_after, limits).is_some()
        })
    }

    /// An attempt failed with `failure` before FinHub's answer: whether to send it again.
    fn retry_after_failure(&self, failure: Failure, ctx: &mut RequestCtx) -> bool {
        let sent = ctx.attempt_sent;
        self.decide_retry(ctx, |retry, limits| {
            retry.after_failure(failure, sent, limits)
        })
    }

    /// Runs a retry decision against the request's limits as of now; counts a retry the
    /// tenant's budget refused.
    fn decide_retry(
        &self,
        ctx: &mut RequestCtx,
        decide: impl FnOnce(&mut retry::Retry, &Limits<'_>) -> bool,
    ) -> bool {
        let Some(a) = ctx.admitted.as_mut() else {
            return false;
        };
        let tenant = a.tenant.clone();
        let limits = Limits::now(&self.state.config.retry, &tenant.retry_budget, ctx.start);
        let retried = decide(&mut a.retry, &limits);
        if a.retry.refused() == Some(Refusal::Budget) {
            tenant.series.budget_exhausted.inc();
        }
        retried
    }

    /// The retry metrics of a finished request: its retries by reason and how it ended, and a
    /// give-up by the code the app got. Nothing for a request that was not retried and needed
    /// no retry (the common case costs one branch).
    fn count_retries(&self, ctx: &RequestCtx) {
        let Some(a) = &ctx.admitted else {
            return;
        };
        let r = &a.retry;
        if !r.retried() && r.refused().is_none() {
            return;
        }
        let finhub_gateway = match ctx.upstream_status {
            Some(502) => Some("finhub_502"),
            Some(503) => Some("finhub_503"),
            Some(504) => Some("finhub_504"),
            _ => None,
        };
        let upstream_failure = ctx
            .failure
            .as_ref()
            .filter(|f| f.status() >= 500)
            .map(ProxyError::code);
        let gave_up = upstream_failure.or(if ctx.failure.is_none() {
            finhub_gateway
        } else {
            None
        });
        let m = &self.state.metrics;
        let outcome = if gave_up.is_some() {
            "gave_up"
        } else {
            "answered"
        };
        for (reason, n) in r.made() {
            m.upstream_retries
                .with_label_values(&[reason.label(), outcome])
                .inc_by(u64::from(n));
        }
        if let Some(code) = gave_up {
            m.upstream_give_ups.with_label_values(&[code]).inc();
        }
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
            _in_flight: self.state.lifecycle.track(),
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

    /// Contract: refuse (with a JSON error) anything that must not go upstream; the rate limit
    /// is asked last and may await Redis; then the body is read whole (up to the hold limit),
    /// so FinHub gets a request whole or not at all.
    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        ctx.trace = telemetry::start_request(self.state.tracer.as_ref(), session.req_header());
        let verdict = match self.admit(session, ctx) {
            Ok(Check::Ready(decision)) => rate_limit_verdict(decision),
            Ok(Check::Wait(pending)) => {
                let wait = ctx.trace.as_ref().map(|t| t.wait("rate limit decision"));
                let verdict = rate_limit_verdict(pending.await);
                telemetry::end_wait(wait, verdict.as_ref().map_or("refused", |()| "allowed"));
                verdict
            }
            Err(e) => Err(e),
        };
        let e = match verdict {
            Ok(()) => {
                // A body that trickles in holds an app slot (and, streamed, a FinHub
                // connection): each read waits at most body_timeout, and the whole body must
                // arrive within body_timeout of the request's start.
                let body_timeout = self.state.config.listener.body_timeout;
                session
                    .as_downstream_mut()
                    .set_read_timeout(Some(body_timeout));
                match self.hold_body(session, ctx).await {
                    Ok(()) => return Ok(false),
                    // The app went away mid-body: nothing to answer, nothing sent upstream.
                    Err(BodyError::Gone(e)) => return Err(e),
                    Err(BodyError::Refuse(e)) => {
                        // The body's framing is broken or unfinished: the connection cannot
                        // carry another request.
                        session.set_keepalive(None);
                        e
                    }
                }
            }
            Err(e) => e,
        };
        if closes_connection(&e) {
            session.set_keepalive(None);
        }
        error::respond(session, &e).await?;
        ctx.failure = Some(e);
        Ok(true)
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
        ctx.body.next_chunk(body);
        // A held body arrived in time already (a retry resends it from memory).
        if ctx.body.is_streamed() && ctx.start.elapsed() > self.state.config.listener.body_timeout {
            ctx.failure = Some(ProxyError::BodyTimeout);
            return Error::e_explain(ErrorType::ReadTimedout, "request body too slow");
        }
        Ok(())
    }

    /// Contract: a retry first waits its backoff; then FinHub's resolved address, its SNI, the
    /// current client cert and CA.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        if let Some(a) = ctx.admitted.as_mut() {
            if let Some(delay) = a.retry.take_delay() {
                tokio::time::sleep(delay).await;
            }
            a.retry.start_attempt();
        }
        ctx.attempt_sent = false;
        ctx.answered = false;
        ctx.upstream_start = Some(Instant::now());
        if let Some(t) = ctx.trace.as_mut() {
            let u = &self.state.config.upstream;
            t.start_attempt(&u.host, u.port);
        }
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
        if let Err(e) = self.rewrite(upstream_request, a, ctx.body.was_read()) {
            ctx.failure = Some(e);
            return Error::e_explain(ErrorType::InternalError, "request not sent");
        }
        ctx.attempt_sent = true;
        if let Some(t) = &ctx.trace {
            t.propagate(upstream_request);
        }
        ctx.upstream_sent = Some(SystemTime::now());
        Ok(())
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
        if let Some(t) = ctx.upstream_start.take() {
            self.state
                .metrics
                .upstream_duration
                .observe(t.elapsed().as_secs_f64());
        }
        let status = upstream_response.status.as_u16();
        ctx.upstream_status = Some(status);
        ctx.answered = true;
        if let Some(t) = ctx.trace.as_mut() {
            t.end_attempt(status);
        }
        if let Some(sent) = ctx.upstream_sent {
            // An answer's Date may narrow the estimate of FinHub's clock, never reset it
            // (auth/clock.rs): the auth endpoints' answers are the reference.
            let h = &upstream_response.headers;
            let cached = h.contains_key(http::header::AGE);
            let date = h.get(http::header::DATE);
            self.state
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
                let wait = ctx.trace.as_ref().map(|t| t.wait("session renewal wait"));
                let replay = self.renew_after_401(a).await;
                telemetry::end_wait(wait, if replay { "renewed" } else { "not_replayed" });
                if replay {
                    return Error::e_explain(RETRY, "FinHub answered 401; replaying once");
                }
            }
            502..=504 if session.response_written().is_none() => {
                if self.retry_after_status(upstream_response, ctx) {
                    return Error::e_explain(RETRY, "FinHub's gateway failed; retrying");
                }
                if ctx
                    .admitted
                    .as_ref()
                    .is_some_and(|a| a.retry.outcome_unknown())
                {
                    // An earlier attempt may have run: FinHub's "not now" must not read as
                    // "not executed".
                    ctx.failure = Some(ProxyError::UpstreamOutcomeUnknown { timed_out: false });
                    return Error::e_explain(
                        ErrorType::HTTPStatus(status),
                        "FinHub's gateway failed after an attempt whose answer was lost",
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Contract: a failed connect opens that address's breaker and is retried on the next
    /// address, once per address; when every address failed, the retry policy decides (nothing
    /// was sent, so any request may go again).
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.connect_failures += 1;
        if let Some(t) = ctx.trace.as_mut() {
            t.end_attempt_error(ProxyError::from_upstream(&e).code());
        }
        // A proxy that refused the tunnel refuses it again from its other addresses.
        let refused = matches!(
            ProxyError::from_upstream(&e),
            ProxyError::EgressProxyRefused(_)
        );
        if let (false, Some(addr)) = (refused, peer._address.as_inet()) {
            self.state.upstream.connect_failed(*addr);
        }
        let retry = !refused
            && (!ctx
                .connect_failures
                .is_multiple_of(self.state.upstream.count().max(1))
                || self.retry_after_failure(Failure::Connect, ctx));
        e.set_retry(retry);
        e
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
        let mut e = e.more_context(format!("Peer: {peer}"));
        if let Some(t) = ctx.trace.as_mut() {
            t.end_attempt_error(ProxyError::from_upstream(&e).code());
        }
        // Only our own signal carries a decided retry; anything else is judged on its own.
        let pending = e.etype() == &RETRY
            && ctx
                .admitted
                .as_mut()
                .is_some_and(|a| a.retry.take_pending());
        let retry = if pending {
            true
        } else if ctx.failure.is_some()
            || ctx.answered
            || session.response_written().is_some()
            || e.esource() == &ErrorSource::Downstream
        {
            false
        } else {
            self.retry_after_failure(failure_of(&e), ctx)
        };
        e.set_retry(retry);
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
        headers::strip_response_credentials(upstream_response, a.session.reflections.needles());
        if let Some(key) = &a.idempotency_key {
            // The app can send the request again with this key and never execute it twice.
            upstream_response.insert_header(names::X_IDEMPOTENCY_KEY, key.clone())?;
        }
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
                trace_id = ctx
                    .trace
                    .as_ref()
                    .map(|t| t.ids().trace_id)
                    .map(tracing::field::display),
                "request failed"
            );
        }
        self.count_retries(ctx);
        let record = AuditRecord::of(session, ctx, &self.state.audit, status, outcome.label());
        self.state.audit.write(&record);
        if let Some(t) = ctx.trace.take() {
            let code = ctx.failure.as_ref().map(ProxyError::code);
            t.finish(status, ctx.tenant.as_ref().map(|t| t.id()), code);
        }
        self.state
            .metrics
            .audit_dropped
            .set(i64::try_from(self.state.audit.dropped()).unwrap_or(i64::MAX));
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
        let outcome_unknown = ctx
            .admitted
            .as_ref()
            .is_some_and(|a| a.retry.outcome_unknown());
        let err = ctx
            .failure
            .clone()
            .unwrap_or_else(|| ProxyError::from_upstream(e))
            .with_outcome(outcome_unknown);
        let code = err.status();
        if session.response_written().is_none() {
            // The connection closes after this answer: say so in it, or an app's keep-alive
            // pool may send its next request into the closing socket and see a reset.
            session.set_keepalive(None);
            let key = ctx
                .admitted
                .as_ref()
                .and_then(|a| a.idempotency_key.as_ref());
            if let Err(write_err) = error::respond_keyed(session, &err, key).await {
                tracing::debug!(error = %write_err, "could not send error response to app");
            }
            // Read what is left of a streamed body (bounded), so closing the connection does
            // not reset it before the app has read the answer.
            linger(session, self.state.config.listener.body_timeout).await;
        }
        ctx.failure = Some(err);
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}

/// How long a failed request's unread body is drained before the connection closes.
const LINGER_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// Drains the rest of the request body (at most `LINGER_MAX` or `body_timeout`), as nginx's
/// lingering close does: closing a socket with unread bytes sends a reset, and the app may
/// lose the answer it was about to read.
async fn linger(session: &mut Session, body_timeout: std::time::Duration) {
    let downstream = session.as_downstream_mut();
    if downstream.is_body_done() {
        return;
    }
    let _ = tokio::time::timeout(
        LINGER_MAX.min(body_timeout),
        downstream.drain_request_body(),
    )
    .await;
}

/// How an upstream error before FinHub's answer header failed, for the retry policy.
fn failure_of(e: &Error) -> Failure {
    match e.etype() {
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => Failure::Timeout,
        _ => Failure::Reset,
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
