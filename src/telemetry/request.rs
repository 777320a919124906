//! One request's trace: the server span (app request to response), one client span per
//! upstream attempt (each 401 replay and each retry is its own), child spans for waits, and the
//! `traceparent` FinHub receives. Kept in `RequestCtx::trace`, `None` when tracing is off.
//!
//! Attributes are the OpenTelemetry HTTP semantic conventions, plus `finhub.tenant`. Nothing
//! here reads a credential, a body, a query or a header value other than the trace context.

use std::borrow::Cow;

use http::{HeaderValue, Method};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{SdkTracer, Span};
use pingora::http::RequestHeader;
use serde::Serialize;

use super::context::{
    format_traceparent, parse_traceparent, sanitize_tracestate, TRACEPARENT, TRACESTATE,
};

/// The trace state of one app request.
pub struct RequestTrace {
    tracer: SdkTracer,
    /// Holds the server span; the parent of every other span of the request.
    server: Context,
    /// The app's `tracestate` to pass on (only with a valid app `traceparent`).
    tracestate: Option<HeaderValue>,
    /// The client span of the attempt in progress.
    client: Option<Span>,
    /// Upstream attempts so far.
    attempts: u32,
    method: &'static str,
}

impl RequestTrace {
    /// Starts the server span for `req`: a child of the app's span when its `traceparent` is
    /// valid, else the root of a new trace.
    pub fn start(tracer: &SdkTracer, req: &RequestHeader) -> RequestTrace {
        let parent = match parse_traceparent(req.headers.get_all(&TRACEPARENT)) {
            Some(p) => {
                let tracestate = sanitize_tracestate(req.headers.get_all(&TRACESTATE));
                let state = tracestate
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.parse::<TraceState>().ok())
                    .unwrap_or_default();
                let sc = SpanContext::new(
                    TraceId::from_bytes(p.trace_id),
                    SpanId::from_bytes(p.parent_id),
                    TraceFlags::new(p.flags & 1),
                    true,
                    state,
                );
                (Context::new().with_remote_span_context(sc), tracestate)
            }
            None => (Context::new(), None),
        };
        let method = method_name(&req.method);
        // Attributes only for a span that is recorded: an unsampled request pays for its ids
        // (FinHub still gets a traceparent), not for strings nobody exports.
        let mut span = tracer
            .span_builder(method)
            .with_kind(SpanKind::Server)
            .start_with_context(tracer, &parent.0);
        if span.is_recording() {
            span.set_attributes([
                KeyValue::new("http.request.method", method),
                KeyValue::new("url.path", req.uri.path().to_string()),
                KeyValue::new("url.scheme", "http"),
            ]);
        }
        RequestTrace {
            tracer: tracer.clone(),
            server: Context::new().with_span(span),
            tracestate: parent.1,
            client: None,
            attempts: 0,
            method,
        }
    }

    /// The trace id and the server span's id (audit line, log lines).
    pub fn ids(&self) -> TraceIds {
        let sc = self.server.span().span_context().clone();
        TraceIds {
            trace_id: sc.trace_id(),
            span_id: sc.span_id(),
        }
    }

    /// Starts the client span of the next upstream attempt (ending one left open).
    pub fn start_attempt(&mut self, host: &str, port: u16) {
        self.end_attempt_error("aborted");
        self.attempts += 1;
        let mut span = self
            .tracer
            .span_builder(self.method)
            .with_kind(SpanKind::Client)
            .start_with_context(&self.tracer, &self.server);
        if span.is_recording() {
            span.set_attributes([
                KeyValue::new("http.request.method", self.method),
                KeyValue::new("server.address", host.to_string()),
                KeyValue::new("server.port", i64::from(port)),
            ]);
            if self.attempts > 1 {
                span.set_attribute(KeyValue::new(
                    "http.request.resend_count",
                    i64::from(self.attempts - 1),
                ));
            }
        }
        self.client = Some(span);
    }

    /// Sets FinHub's `traceparent` (the client span's, replacing any the app sent) and passes
    /// the app's `tracestate` on only when it continues the app's trace.
    pub fn propagate(&self, req: &mut RequestHeader) {
        let sc = match &self.client {
            Some(c) => c.span_context().clone(),
            None => self.server.span().span_context().clone(),
        };
        let tp = format_traceparent(
            sc.trace_id().to_bytes(),
            sc.span_id().to_bytes(),
            sc.is_sampled(),
        );
        // Inserting replaces every app line of the header; a failure leaves the request as is.
        let _ = req.insert_header(TRACEPARENT, tp);
        match &self.tracestate {
            Some(v) => {
                let _ = req.insert_header(TRACESTATE, v.clone());
            }
            None => {
                req.remove_header(&TRACESTATE);
            }
        }
    }

    /// Ends the attempt's client span with FinHub's status (4xx and 5xx are errors).
    pub fn end_attempt(&mut self, status: u16) {
        let Some(mut span) = self.client.take() else {
            return;
        };
        if span.is_recording() {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            if status >= 400 {
                span.set_attribute(KeyValue::new("error.type", status_text(status)));
                span.set_status(Status::error(""));
            }
        }
        span.end();
    }

    /// Ends the attempt's client span with an error (`code`: the sidecar's error code).
    pub fn end_attempt_error(&mut self, code: &'static str) {
        let Some(mut span) = self.client.take() else {
            return;
        };
        span.set_attribute(KeyValue::new("error.type", code));
        span.set_status(Status::error(""));
        span.end();
    }

    /// A child span for time spent waiting (a session renewal, a rate-limit decision); end it
    /// with [`end_wait`].
    pub fn wait(&self, name: &'static str) -> Span {
        self.tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .start_with_context(&self.tracer, &self.server)
    }

    /// Ends the server span: the status sent to the app (0: none), the tenant, the refusal
    /// code. An attempt still open is ended as aborted.
    pub fn finish(mut self, status: u16, tenant: Option<&str>, error: Option<&'static str>) {
        self.end_attempt_error("aborted");
        let span = self.server.span();
        if span.is_recording() {
            if status != 0 {
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
            }
            if let Some(t) = tenant {
                span.set_attribute(KeyValue::new("finhub.tenant", t.to_string()));
            }
            if let Some(code) = error {
                span.set_attribute(KeyValue::new("error.type", code));
            }
            if status >= 500 || status == 0 {
                span.set_status(Status::error(""));
            }
        }
        span.end();
    }
}

/// Ends a wait span with its outcome.
pub fn end_wait(span: Option<Span>, outcome: &'static str) {
    if let Some(mut s) = span {
        s.set_attribute(KeyValue::new("finhub.outcome", outcome));
        s.end();
    }
}

/// A trace id and span id, written as lowercase hex (audit line, log fields).
#[derive(Debug, Clone, Copy)]
pub struct TraceIds {
    /// The trace id.
    pub trace_id: opentelemetry::trace::TraceId,
    /// The server span's id.
    pub span_id: opentelemetry::trace::SpanId,
}

/// The span name and `http.request.method` value: the method if standard, else `_OTHER`
/// (semantic conventions; an app cannot create unbounded names).
fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

/// A status code as `error.type` text.
fn status_text(status: u16) -> Cow<'static, str> {
    match status {
        400 => "400".into(),
        401 => "401".into(),
        403 => "403".into(),
        404 => "404".into(),
        429 => "429".into(),
        500 => "500".into(),
        502 => "502".into(),
        503 => "503".into(),
        504 => "504".into(),
        s => s.to_string().into(),
    }
}

/// The span state of a new app request, when tracing is on.
pub fn start_request(
    tracer: Option<&SdkTracer>,
    req: &pingora::http::RequestHeader,
) -> Option<Box<RequestTrace>> {
    tracer.map(|t| Box::new(RequestTrace::start(t, req)))
}

#[derive(Debug, Clone, Copy)]
pub struct TraceIdHex(pub opentelemetry::trace::TraceId);

impl Serialize for TraceIdHex {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// A span id written as 16 lowercase hex digits (the audit line's `span_id`).
#[derive(Debug, Clone, Copy)]
pub struct SpanIdHex(pub opentelemetry::trace::SpanId);

impl Serialize for SpanIdHex {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_do_not_become_span_names() {
        assert_eq!(method_name(&Method::GET), "GET");
        let odd = Method::from_bytes(b"PROPFIND-x").unwrap();
        assert_eq!(method_name(&odd), "_OTHER");
    }
}
