//! The audit line: one JSON object per request, written through a non-blocking writer (a
//! background thread does the I/O; the request path only queues the line).
//!
//! Fields: `ts`, `request_id`, `activity_id`, `tenant`, `client_ip`, `forwarded_for`,
//! `user_agent`, `method`, `path` (query dropped unless `audit.include_query`), `status`,
//! `decision`, `reason`, `upstream_status`, `duration_ms`, `bytes_in`, `bytes_out`, `replayed`.
//! Credential headers are never among them.

use std::io::{BufWriter, Write};

use serde::Serialize;
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};

use crate::config::AuditOutput;
use crate::proxy::RequestCtx;

/// One request's audit record.
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    /// Always `"audit"`, to tell these lines from diagnostics.
    pub kind: &'static str,
    /// RFC 3339 UTC timestamp, milliseconds.
    pub ts: Timestamp,
    /// `X-Request-ID` sent to FinHub and echoed to the app.
    pub request_id: Option<&'a str>,
    /// `X-Activity-ID` sent to FinHub.
    pub activity_id: Option<&'a str>,
    /// Tenant id, if the request got that far.
    pub tenant: Option<&'a str>,
    /// TCP peer of the app.
    pub client_ip: Option<std::net::IpAddr>,
    /// `X-Forwarded-For` sent to FinHub.
    pub forwarded_for: Option<&'a str>,
    /// App's `User-Agent`.
    pub user_agent: Option<&'a str>,
    /// Method.
    pub method: &'a str,
    /// Path, without the query unless configured.
    pub path: &'a str,
    /// Status sent to the app (0 if none).
    pub status: u16,
    /// `allow` or why the sidecar answered itself.
    pub decision: &'static str,
    /// Stable error code of the sidecar's own answer, if any.
    pub reason: Option<&'static str>,
    /// Status FinHub answered, if it was asked.
    pub upstream_status: Option<u16>,
    /// Time to complete, in milliseconds.
    pub duration_ms: f64,
    /// Request body bytes read from the app.
    pub bytes_in: usize,
    /// Response body bytes sent to the app.
    pub bytes_out: usize,
    /// Whether the request was replayed after a 401.
    pub replayed: bool,
}

/// A point in time written as RFC 3339 UTC with milliseconds, formatted straight into the line
/// (no intermediate string).
#[derive(Debug, Clone, Copy)]
pub struct Timestamp(pub std::time::SystemTime);

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_rfc3339_millis(self.0))
    }
}

impl<'a> AuditRecord<'a> {
    /// The record of a finished request: what the app asked (`session`), what admission
    /// learnt and decided (`ctx`), the status sent and the decision label.
    pub fn of(
        session: &'a pingora::proxy::Session,
        ctx: &'a RequestCtx,
        audit: &Audit,
        status: u16,
        decision: &'static str,
    ) -> AuditRecord<'a> {
        let req = session.req_header();
        let a = ctx.admitted.as_ref();
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
            replayed: a.is_some_and(|a| a.replay.replayed()),
        }
    }
}

/// Room for a typical audit line, so serialising it does not regrow the buffer.
const AUDIT_LINE_CAPACITY: usize = 512;

/// Bytes of audit lines gathered into one write by the writer thread.
const AUDIT_WRITE_BUFFER: usize = 64 * 1024;

/// The audit writer. Cheap to clone.
#[derive(Clone)]
pub struct Audit {
    writer: Option<NonBlocking>,
    include_query: bool,
}

impl Audit {
    /// Opens the output; keep the guard alive for the life of the process (it flushes on drop).
    pub fn open(
        output: &AuditOutput,
        include_query: bool,
    ) -> std::io::Result<(Audit, Option<WorkerGuard>)> {
        // Lossy when 128k lines are queued (stdout blocked): the proxy must not stall on its
        // log. Dropped lines are counted (`dropped`) and exported as a metric.
        let builder = || NonBlockingBuilder::default().lossy(true);
        let (writer, guard) = match output {
            AuditOutput::Off => (None, None),
            // The writer thread flushes whenever its queue is empty, so a line waits only while
            // more are queued; under load many lines go out in one write(2) instead of one each.
            AuditOutput::Stdout => {
                let (w, g) = builder().finish(BufWriter::with_capacity(
                    AUDIT_WRITE_BUFFER,
                    std::io::stdout(),
                ));
                (Some(w), Some(g))
            }
            AuditOutput::File(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                let (w, g) = builder().finish(BufWriter::with_capacity(AUDIT_WRITE_BUFFER, file));
                (Some(w), Some(g))
            }
        };
        Ok((
            Audit {
                writer,
                include_query,
            },
            guard,
        ))
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.writer
            .as_ref()
            .map_or(0, |w| w.error_counter().dropped_lines() as u64)
    }

    /// The path as logged: without the query string unless configured.
    pub fn path<'a>(&self, path_and_query: &'a str) -> &'a str {
        if self.include_query {
            path_and_query
        } else {
            path_and_query.split('?').next().unwrap_or(path_and_query)
        }
    }

    /// Queues one line.
    pub fn write(&self, record: &AuditRecord<'_>) {
        let Some(w) = &self.writer else { return };
        let mut line = Vec::with_capacity(AUDIT_LINE_CAPACITY);
        if serde_json::to_writer(&mut line, record).is_err() {
            return;
        }
        line.push(b'\n');
        let mut w = w.clone();
        if let Err(e) = w.write_all(&line) {
            tracing::warn!(error = %e, "audit line could not be queued");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_dropped_by_default() {
        let (a, _g) = Audit::open(&AuditOutput::Off, false).unwrap();
        assert_eq!(a.path("/api/v2/x?iban=DE123"), "/api/v2/x");
        let (a, _g) = Audit::open(&AuditOutput::Off, true).unwrap();
        assert_eq!(a.path("/api/v2/x?iban=DE123"), "/api/v2/x?iban=DE123");
    }

    #[test]
    fn lines_reach_the_file_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.log");
        let (a, g) = Audit::open(&AuditOutput::File(file.clone()), false).unwrap();
        a.write(&AuditRecord {
            kind: "audit",
            ts: Timestamp(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_392_000_250),
            ),
            request_id: Some("r"),
            activity_id: None,
            tenant: Some("t"),
            client_ip: Some([127, 0, 0, 1].into()),
            forwarded_for: None,
            user_agent: None,
            method: "GET",
            path: "/x",
            status: 200,
            decision: "allow",
            reason: None,
            upstream_status: Some(200),
            duration_ms: 1.5,
            bytes_in: 0,
            bytes_out: 10,
            replayed: false,
        });
        drop(g);
        let text = std::fs::read_to_string(&file).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["decision"], "allow");
        assert_eq!(v["tenant"], "t");
        assert_eq!(v["ts"], "2026-11-23T00:00:00.250Z");
    }
}
