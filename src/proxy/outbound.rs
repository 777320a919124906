//! Toward FinHub: each attempt's peer (resolved address, SNI, client certificate, CA, the
//! egress tunnel), the request FinHub receives (app credentials out; session, ids and the
//! compliance headers in, protocol notes §3), and what FinHub's answer header decides (a 401
//! renews and replays once, a gateway 502/503/504 is retried, a 429 holds the tenant).

use std::time::{Instant, SystemTime};

use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::Session;
use pingora::upstreams::peer::HttpUpstreamRequestPolicy;
use pingora::{Error, ErrorType};

use crate::auth::FinHubSession;
use crate::error::ProxyError;
use crate::names;
use crate::policy::headers;
use crate::policy::ratelimit;
use crate::proxy::admission::{session_retry_after, Admitted};
use crate::proxy::ctx::RequestCtx;
use crate::proxy::failure::RETRY;
use crate::proxy::hooks::FinHubProxy;
use crate::proxy::tenant::Tenant;
use crate::telemetry;

/// Headers the rewrite may add to the app's (session, ids, compliance, host, content type).
const REWRITE_HEADERS: usize = 16;

impl FinHubProxy {
    /// Starts an attempt: a retry first waits its backoff; then the peer for FinHub.
    pub(super) async fn start_attempt(
        &self,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        if let Some(a) = ctx.admitted.as_mut() {
            if let Some(delay) = a.retry.take_delay() {
                tokio::time::sleep(delay).await;
            }
            a.retry.start_attempt();
        }
        ctx.header_built = false;
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

    /// The header FinHub receives, before the session and ids go in: one fresh header, sized
    /// for everything the sidecar adds, with the app's headers minus the stripped ones, in one
    /// pass (no copy of the app's header first, no map growth while ours are inserted).
    /// `None` for a request that was not admitted (`send_request` refuses it, as it refuses an
    /// attempt whose header was not built here).
    pub(super) fn upstream_header(
        &self,
        app_request: &RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Option<pingora::Result<RequestHeader>> {
        let a = ctx.admitted.as_ref()?;
        let path = a.upstream_uri.as_ref().and_then(|u| u.path_and_query());
        let path = path.map_or(app_request.raw_path(), |p| p.as_str().as_bytes());
        match headers::without_app_credentials(app_request, path, REWRITE_HEADERS) {
            Ok(built) => {
                ctx.header_built = true;
                Some(Ok(built))
            }
            Err(_) => {
                // Our own failure, the same on every attempt: not retried, a 500.
                ctx.failure = Some(ProxyError::Internal);
                Some(Error::e_explain(
                    ErrorType::InternalError,
                    "upstream request not built",
                ))
            }
        }
    }

    /// Rewrites the request FinHub receives and marks the attempt as sent.
    pub(super) fn send_request(
        &self,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let Some(a) = ctx.admitted.as_mut() else {
            return Error::e_explain(ErrorType::InternalError, "request was not admitted");
        };
        if !ctx.header_built {
            // Pingora started from a copy of the app's header (a path that skipped
            // `upstream_request_header`): it still carries what must never reach FinHub.
            ctx.failure = Some(ProxyError::Internal);
            return Error::e_explain(ErrorType::InternalError, "upstream header not built");
        }
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

    /// FinHub's answer header: timing and FinHub's clock recorded; a 401 renews and asks for
    /// a replay, a gateway status for a retry (both as the `RETRY` error), a 429 holds.
    pub(super) async fn on_answer(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if let Some(t) = ctx.upstream_start.take() {
            self.metrics.observe_upstream(t.elapsed().as_secs_f64());
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
        // Connect timeouts and the egress tunnel: how FinHub is dialled (`upstream.rs`).
        self.state.upstream.dial_options(&mut peer.options);
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
        if body_read {
            // The app got its `100 Continue` from the sidecar; FinHub gets the body whole.
            req.remove_header(&http::header::EXPECT);
        }
        let set = |req: &mut RequestHeader| -> pingora::Result<()> {
            apply_session(req, &a.session, &a.tenant.slot.tenant.id_header)?;
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
            self.compliance.apply(req, &a.forwarded_for)?;
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
}

/// Sets the session headers for `session` (A12: `Authorization`, `X-User-Session-Token`,
/// `X-Session-Active` carry the same token) and the tenant and session ids.
fn apply_session(
    req: &mut RequestHeader,
    session: &FinHubSession,
    tenant_id: &HeaderValue,
) -> pingora::Result<()> {
    req.insert_header(http::header::AUTHORIZATION, session.authorization.clone())?;
    req.insert_header(names::X_USER_SESSION_TOKEN, session.session_token.clone())?;
    req.insert_header(names::X_SESSION_ACTIVE, HeaderValue::from_static("true"))?;
    req.insert_header(names::X_TENANT_ID, tenant_id.clone())?;
    req.insert_header(names::X_SESSION_ID, session.session_id.clone())?;
    Ok(())
}
