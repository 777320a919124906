//! When an attempt fails: which failures are sent again (a failed connect on the next
//! address, a reset or timeout before FinHub's answer, a decided retry), within the retry
//! policy's limits (`retry.rs`); and the one JSON error the app gets when nothing more is tried.

use std::time::SystemTime;

use pingora::http::ResponseHeader;
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, Session};
use pingora::{Error, ErrorSource, ErrorType};

use crate::error::{self, ProxyError};
use crate::policy::ratelimit;
use crate::proxy::ctx::RequestCtx;
use crate::proxy::hooks::FinHubProxy;
use crate::proxy::inbound::linger;
use crate::proxy::retry::{self, Failure, Limits, Refusal};

/// Error type that asks Pingora to send the request again (a decided retry: after a 401 and a
/// renewal, or after a gateway 502/503/504).
pub(super) const RETRY: ErrorType = ErrorType::Custom("finhub_retry");

impl FinHubProxy {
    /// A failed connect: that address's breaker opens; retried on the next address, once per
    /// address, then as the retry policy decides.
    pub(super) fn connect_failed(
        &self,
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

    /// A failure while proxying: a decided retry is sent again, a reset or timeout before
    /// FinHub's answer goes to the retry policy, anything else is final.
    pub(super) fn proxy_failed(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
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

    /// The final failure as one JSON error with a stable code (nothing when the app is gone).
    pub(super) async fn answer_failure(
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

    /// FinHub answered a gateway `status`: whether to send the request again (after the
    /// backoff, which `upstream_peer` waits).
    pub(super) fn retry_after_status(&self, resp: &ResponseHeader, ctx: &mut RequestCtx) -> bool {
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
