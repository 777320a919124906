//! What a finished request leaves behind: its metrics, its retry counts, one audit line
//! (built here from the context, so `audit.rs` knows nothing of the proxy) and a failure as one
//! log line with its code, never its text.

use pingora::proxy::Session;
use pingora::Error;

use crate::audit::{Audit, AuditRecord, Timestamp};
use crate::error::Outcome;
use crate::error::ProxyError;
use crate::proxy::ctx::RequestCtx;
use crate::proxy::hooks::FinHubProxy;
use crate::proxy::metrics::{GiveUp, RequestSeries, RetryOutcome};
use crate::telemetry::{SpanIdHex, TraceIdHex};

impl FinHubProxy {
    /// One metrics record and one audit line per request; a failure as one log line.
    pub(super) async fn record(
        &self,
        session: &mut Session,
        e: Option<&Error>,
        ctx: &mut RequestCtx,
    ) {
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
        let record = audit_record(session, ctx, &self.state.audit, status, outcome.label());
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
        let finhub_gateway = ctx.upstream_status.and_then(GiveUp::finhub_gateway);
        let upstream_failure = ctx
            .failure
            .as_ref()
            .filter(|f| f.status() >= 500)
            .map(|f| GiveUp::Failed(f.code()));
        let gave_up = upstream_failure.or(if ctx.failure.is_none() {
            finhub_gateway
        } else {
            None
        });
        let m = &self.metrics;
        let outcome = if gave_up.is_some() {
            RetryOutcome::GaveUp
        } else {
            RetryOutcome::Answered
        };
        for (reason, n) in r.made() {
            m.count_retries(reason, outcome, n);
        }
        if let Some(code) = gave_up {
            m.count_give_up(code);
        }
    }

    /// The metric series of a request's tenant (`-` before one was chosen).
    fn series_of<'a>(&'a self, ctx: &'a RequestCtx) -> &'a RequestSeries {
        ctx.tenant.as_ref().map_or(&self.no_tenant, |t| &t.series)
    }
}

/// The audit record of a finished request: what the app asked (`session`), what admission
/// learnt and decided (`ctx`), the status sent and the decision label.
fn audit_record<'a>(
    session: &'a Session,
    ctx: &'a RequestCtx,
    audit: &Audit,
    status: u16,
    decision: &'static str,
) -> AuditRecord<'a> {
    let req = session.req_header();
    let a = ctx.admitted.as_ref();
    let ids = ctx.trace.as_ref().map(|t| t.ids());
    let path_and_query = a
        .map_or(ctx.refused_uri.as_ref(), |a| a.upstream_uri.as_ref())
        .and_then(|u| u.path_and_query())
        .or(req.uri.path_and_query())
        .map_or("/", |p| p.as_str());
    AuditRecord {
        kind: "audit",
        ts: Timestamp(std::time::SystemTime::now()),
        request_id: a.and_then(|a| a.request_id.to_str().ok()),
        activity_id: a.and_then(|a| a.activity_id.to_str().ok()),
        tenant: ctx.tenant.as_ref().map(|t| t.id()),
        client_ip: session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip()),
        forwarded_for: a
            .map_or(ctx.refused_forwarded_for.as_ref(), |a| {
                Some(&a.forwarded_for)
            })
            .and_then(|v| v.to_str().ok()),
        user_agent: req
            .headers
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok()),
        method: req.method.as_str(),
        path: audit.path(path_and_query),
        status,
        decision,
        reason: ctx.failure.as_ref().map(crate::error::ProxyError::code),
        upstream_status: ctx.upstream_status,
        duration_ms: ctx.start.elapsed().as_secs_f64() * 1000.0,
        bytes_in: session.body_bytes_read(),
        bytes_out: session.body_bytes_sent(),
        replayed: a.is_some_and(|a| a.retry.replayed()),
        attempts: a.map_or(0, |a| a.retry.attempts()),
        retry_reason: a.and_then(|a| a.retry.last_reason()).map(|r| r.label()),
        trace_id: ids.map(|i| TraceIdHex(i.trace_id)),
        span_id: ids.map(|i| SpanIdHex(i.span_id)),
    }
}
