//! The app's side of a request: admission (then the rate limit, asked last), the body read
//! whole before anything goes upstream, the refusal answered as JSON; and the answer's headers
//! the app gets back (its ids echoed, no credential).

use std::time::{Duration, SystemTime};

use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorType};

use crate::error::{self, ProxyError};
use crate::names;
use crate::policy::headers;
use crate::policy::ratelimit::{Check, Decision};
use crate::proxy::admission::Admission;
use crate::proxy::body::{Body, BodyError};
use crate::proxy::ctx::RequestCtx;
use crate::proxy::hooks::FinHubProxy;
use crate::telemetry;

impl FinHubProxy {
    /// Admits the request or answers its refusal (true: answered, nothing goes upstream):
    /// the rate limit is asked last and may await Redis; then the body is read whole (up to
    /// the hold limit), so FinHub gets a request whole or not at all.
    pub(super) async fn filter_request(
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

    /// A streamed body's next chunk, after what was read while deciding; refused once the
    /// body is later than `listener.body_timeout` after the request's start.
    pub(super) fn next_body_chunk(
        &self,
        body: &mut Option<bytes::Bytes>,
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

    /// The answer's headers for the app: no header carrying the sidecar's session, the
    /// request id (and the idempotency key) echoed.
    pub(super) fn answer_headers(
        &self,
        upstream_response: &mut ResponseHeader,
        ctx: &RequestCtx,
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

    /// Admits the request (recording it in `ctx`) and returns its rate-limit check.
    fn admit(&self, session: &Session, ctx: &mut RequestCtx) -> Result<Check, ProxyError> {
        let req = session.req_header();
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let admission = Admission {
            config: &self.state.config,
            tenants: &self.tenants,
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

/// How long a failed request's unread body is drained before the connection closes.
const LINGER_MAX: Duration = Duration::from_secs(2);

/// Drains the rest of the request body (at most `LINGER_MAX` or `body_timeout`), as nginx's
/// lingering close does: closing a socket with unread bytes sends a reset, and the app may
/// lose the answer it was about to read.
pub(super) async fn linger(session: &mut Session, body_timeout: Duration) {
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
