//! The audit line: one JSON object per request, written in batches by a background thread (the
//! request path only appends the line to the batch; see [`Audit`]).
//!
//! Fields: `ts`, `request_id`, `activity_id`, `tenant`, `client_ip`, `forwarded_for`,
//! `user_agent`, `method`, `path` (query dropped unless `audit.include_query`), `status`,
//! `decision`, `reason`, `upstream_status`, `duration_ms`, `bytes_in`, `bytes_out`, `replayed`,
//! `attempts`, `retry_reason`, and with tracing on `trace_id` and `span_id` (the sidecar's
//! server span). Credential headers are never among them.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::ser::{CompactFormatter, Formatter};

use crate::config::AuditOutput;
use crate::telemetry::{SpanIdHex, TraceIdHex};

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
    /// Upstream attempts (connects included; 0 when it never went upstream).
    pub attempts: u32,
    /// Why it was last sent again (`reset`, `status_503`, `unauthorized`, ...), if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_reason: Option<&'static str>,
    /// The request's trace id (tracing on only; also when the trace is not sampled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<TraceIdHex>,
    /// The sidecar's server span id for the request (tracing on only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span_id: Option<SpanIdHex>,
}

impl AuditRecord<'_> {
    /// Appends the record as one JSON object: byte for byte what `serde_json::to_writer` writes
    /// for it (its `Serialize` is the reference; a unit test holds the two equal), without the
    /// escaping work fields we produce or validated cannot need. Written as they are: the keys,
    /// `kind`, `decision`, `reason`, `retry_reason` (our constants), `ts`, numbers, `client_ip`,
    /// `method` (an HTTP token), `request_id` and `activity_id` (UUIDs: the app's only if it
    /// parses as one), `forwarded_for` (an IP we formatted) and the trace ids (hex). Escaped as
    /// serde_json escapes them: `tenant` (config allows `"`, `\` and tabs in an id),
    /// `user_agent` and `path` (the app's bytes).
    pub fn write_json(&self, out: &mut Vec<u8>) -> std::io::Result<()> {
        out.extend_from_slice(b"{\"kind\":");
        raw(out, self.kind);
        out.extend_from_slice(b",\"ts\":\"");
        write!(out, "{}", humantime::format_rfc3339_millis(self.ts.0))?;
        out.extend_from_slice(b"\",\"request_id\":");
        or_null(out, self.request_id, raw);
        out.extend_from_slice(b",\"activity_id\":");
        or_null(out, self.activity_id, raw);
        out.extend_from_slice(b",\"tenant\":");
        or_null(out, self.tenant, escaped);
        out.extend_from_slice(b",\"client_ip\":");
        match self.client_ip {
            Some(ip) => write!(out, "\"{ip}\"")?,
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"forwarded_for\":");
        or_null(out, self.forwarded_for, raw);
        out.extend_from_slice(b",\"user_agent\":");
        or_null(out, self.user_agent, escaped);
        out.extend_from_slice(b",\"method\":");
        raw(out, self.method);
        out.extend_from_slice(b",\"path\":");
        escaped(out, self.path);
        out.extend_from_slice(b",\"status\":");
        CompactFormatter.write_u16(out, self.status)?;
        out.extend_from_slice(b",\"decision\":");
        raw(out, self.decision);
        out.extend_from_slice(b",\"reason\":");
        or_null(out, self.reason, raw);
        out.extend_from_slice(b",\"upstream_status\":");
        match self.upstream_status {
            Some(s) => CompactFormatter.write_u16(out, s)?,
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"duration_ms\":");
        if self.duration_ms.is_finite() {
            CompactFormatter.write_f64(out, self.duration_ms)?;
        } else {
            out.extend_from_slice(b"null");
        }
        out.extend_from_slice(b",\"bytes_in\":");
        CompactFormatter.write_u64(out, self.bytes_in as u64)?;
        out.extend_from_slice(b",\"bytes_out\":");
        CompactFormatter.write_u64(out, self.bytes_out as u64)?;
        out.extend_from_slice(if self.replayed {
            b",\"replayed\":true,\"attempts\":"
        } else {
            b",\"replayed\":false,\"attempts\":"
        });
        CompactFormatter.write_u32(out, self.attempts)?;
        if let Some(r) = self.retry_reason {
            out.extend_from_slice(b",\"retry_reason\":");
            raw(out, r);
        }
        if let Some(t) = self.trace_id {
            write!(out, ",\"trace_id\":\"{}\"", t.0)?;
        }
        if let Some(s) = self.span_id {
            write!(out, ",\"span_id\":\"{}\"", s.0)?;
        }
        out.push(b'}');
        Ok(())
    }
}

/// A string that cannot need escaping, quoted as it is.
fn raw(out: &mut Vec<u8>, s: &str) {
    debug_assert!(json_safe(s), "audit field needs escaping: {s:?}");
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// A string from the app, quoted and escaped exactly as serde_json does (it is serde_json).
fn escaped(out: &mut Vec<u8>, s: &str) {
    // Writing to a Vec cannot fail, and a `str` always serialises.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// `null`, or the value written by `write`.
fn or_null(out: &mut Vec<u8>, v: Option<&str>, write: fn(&mut Vec<u8>, &str)) {
    match v {
        Some(s) => write(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Whether serde_json would write `s` unchanged: no control byte, quote or backslash.
fn json_safe(s: &str) -> bool {
    s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')
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

/// Room for a typical audit line, so serialising it does not regrow the buffer.
const AUDIT_LINE_CAPACITY: usize = 512;

/// A thread's line buffer larger than this (after a huge line) is freed, not kept.
const AUDIT_LINE_KEEP: usize = 16 * 1024;

/// Queued bytes that wake the writer before its interval (one `write(2)` of about this size).
const AUDIT_WRITE_BATCH: usize = 64 * 1024;

/// Queued bytes beyond which lines are dropped (and counted) instead of queued: the proxy never
/// waits on its log, and a blocked output cannot take the memory.
const AUDIT_QUEUE_LIMIT: usize = 8 * 1024 * 1024;

/// The audit writer. Cheap to clone.
///
/// Lines are appended to one in-memory batch; a writer thread takes the batch every
/// `flush_interval` (or as soon as it holds [`AUDIT_WRITE_BATCH`] bytes) and writes it in one
/// go, like nginx's `access_log … buffer= flush=`. The request path takes an uncontended lock
/// and copies its line: no wake-up, no syscall per line.
#[derive(Clone)]
pub struct Audit {
    queue: Option<Arc<Queue>>,
    include_query: bool,
}

/// The batch shared by the request path and the writer thread.
struct Queue {
    batch: Mutex<Batch>,
    /// Signalled when the batch is large enough to write early, and at shutdown.
    ready: Condvar,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    closed: bool,
}

/// Keeps the writer thread; dropping it writes every queued line and stops the thread.
pub struct AuditGuard {
    queue: Arc<Queue>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        lock(&self.queue.batch).closed = true;
        self.queue.ready.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The batch lock; a panic while holding it cannot leave the bytes inconsistent (appends and
/// swaps only), so a poisoned lock is used as is.
fn lock(m: &Mutex<Batch>) -> std::sync::MutexGuard<'_, Batch> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Audit {
    /// Opens the output and starts its writer thread; keep the guard alive for the life of the
    /// process (dropping it writes what is queued).
    pub fn open(
        output: &AuditOutput,
        include_query: bool,
        flush_interval: Duration,
    ) -> std::io::Result<(Audit, Option<AuditGuard>)> {
        let out: Box<dyn Write + Send> = match output {
            AuditOutput::Off => {
                return Ok((
                    Audit {
                        queue: None,
                        include_query,
                    },
                    None,
                ))
            }
            AuditOutput::Stdout => Box::new(std::io::stdout()),
            AuditOutput::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let queue = Arc::new(Queue {
            batch: Mutex::new(Batch::default()),
            ready: Condvar::new(),
            dropped: AtomicU64::new(0),
        });
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn({
                let queue = queue.clone();
                move || write_batches(&queue, out, flush_interval)
            })?;
        Ok((
            Audit {
                queue: Some(queue.clone()),
                include_query,
            },
            Some(AuditGuard {
                queue,
                thread: Some(thread),
            }),
        ))
    }

    /// Lines dropped because the output could not keep up.
    pub fn dropped(&self) -> u64 {
        self.queue
            .as_ref()
            .map_or(0, |q| q.dropped.load(Ordering::Relaxed))
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
        let Some(q) = &self.queue else { return };
        thread_local! {
            /// The line being built, kept per thread so no request allocates one.
            static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let queued = LINE.try_with(|line| match line.try_borrow_mut() {
            Ok(mut line) => q.push(&mut line, record),
            Err(_) => q.push(&mut Vec::new(), record),
        });
        if queued.is_err() {
            // The thread is exiting: build the line in its own buffer.
            q.push(&mut Vec::new(), record);
        }
    }
}

impl Queue {
    /// Writes `record` into `line` (emptied first) and appends it to the batch.
    fn push(&self, line: &mut Vec<u8>, record: &AuditRecord<'_>) {
        line.clear();
        if line.capacity() > AUDIT_LINE_KEEP {
            // A huge line must not stay pinned in every thread.
            *line = Vec::new();
        }
        line.reserve(AUDIT_LINE_CAPACITY);
        if record.write_json(line).is_err() {
            return;
        }
        line.push(b'\n');
        let mut batch = lock(&self.batch);
        if batch.bytes.len() + line.len() > AUDIT_QUEUE_LIMIT {
            drop(batch);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let before = batch.bytes.len();
        batch.bytes.extend_from_slice(line);
        let crossed = before < AUDIT_WRITE_BATCH && batch.bytes.len() >= AUDIT_WRITE_BATCH;
        drop(batch);
        if crossed {
            self.ready.notify_one();
        }
    }
}

/// The writer thread: every `interval` (or when woken for a full batch) it takes the queued
/// bytes and writes them in one go; at shutdown it writes the rest and returns.
fn write_batches(queue: &Queue, mut out: Box<dyn Write + Send>, interval: Duration) {
    let mut spare = Vec::new();
    loop {
        let closed = {
            let mut batch = lock(&queue.batch);
            if !batch.closed && batch.bytes.len() < AUDIT_WRITE_BATCH {
                batch = queue
                    .ready
                    .wait_timeout(batch, interval)
                    .map(|(b, _)| b)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            std::mem::swap(&mut batch.bytes, &mut spare);
            batch.closed
        };
        if !spare.is_empty() {
            if let Err(e) = out.write_all(&spare).and_then(|()| out.flush()) {
                tracing::warn!(error = %e, "audit lines could not be written");
            }
            spare.clear();
            // A burst must not pin a large buffer for the life of the process.
            spare.shrink_to(AUDIT_WRITE_BATCH * 2);
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_dropped_by_default() {
        let (a, _g) = Audit::open(&AuditOutput::Off, false, Duration::from_millis(100)).unwrap();
        assert_eq!(a.path("/api/v2/x?iban=DE123"), "/api/v2/x");
        let (a, _g) = Audit::open(&AuditOutput::Off, true, Duration::from_millis(100)).unwrap();
        assert_eq!(a.path("/api/v2/x?iban=DE123"), "/api/v2/x?iban=DE123");
    }

    fn record(request_id: &str) -> AuditRecord<'_> {
        AuditRecord {
            kind: "audit",
            ts: Timestamp(std::time::UNIX_EPOCH + Duration::from_millis(1_795_392_000_250)),
            request_id: Some(request_id),
            activity_id: None,
            tenant: Some("t"),
            client_ip: Some([127, 0, 0, 1].into()),
            forwarded_for: None,
            user_agent: Some("app \"quoted\"\n"),
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
            attempts: 1,
            retry_reason: None,
            trace_id: None,
            span_id: None,
        }
    }

    /// Every byte value an app can put in a `&str` field, and then some.
    fn hostile() -> Vec<String> {
        let mut all: String = (0u8..0x80).map(char::from).collect();
        all.push_str("é€😀\u{2028}\u{2029}\u{fffd}\u{7f}\u{80}\u{9f}");
        vec![
            String::new(),
            all,
            "\"".into(),
            "\\".into(),
            "\\\"".into(),
            "a\"b\\c\nd\re\tf\u{8}g\u{c}h\u{0}i\u{1f}j".into(),
            "/api/v2/x?q=\"};{\"admin\":true".into(),
            "</script>\u{1b}[31m".into(),
            "ünïcödé/日本".into(),
        ]
    }

    #[test]
    fn the_line_is_what_serde_json_writes() {
        let trace = TraceIdHex(opentelemetry::trace::TraceId::from_bytes([0xab; 16]));
        let span = SpanIdHex(opentelemetry::trace::SpanId::from_bytes([0x0c; 8]));
        let mut cases = Vec::new();
        let hostile = hostile();
        for h in &hostile {
            let mut r = record("4f0c5b9e-8d5a-4c1e-9a53-2f6f3a1d2b7c");
            r.user_agent = Some(h);
            r.path = h;
            r.tenant = Some(h);
            cases.push(r);
        }
        let mut full = record("urn:uuid:4f0c5b9e-8d5a-4c1e-9a53-2f6f3a1d2b7c");
        full.activity_id = Some("{4f0c5b9e-8d5a-4c1e-9a53-2f6f3a1d2b7c}");
        full.client_ip = Some("2001:db8::1".parse().unwrap());
        full.forwarded_for = Some("203.0.113.9");
        full.method = "M-SEARCH";
        full.status = 503;
        full.decision = "refuse";
        full.reason = Some("session_unavailable");
        full.upstream_status = None;
        full.bytes_in = usize::MAX;
        full.replayed = true;
        full.attempts = u32::MAX;
        full.retry_reason = Some("status_503");
        full.trace_id = Some(trace);
        full.span_id = Some(span);
        cases.push(full);
        let mut empty = record("r");
        empty.request_id = None;
        empty.tenant = None;
        empty.client_ip = None;
        empty.user_agent = None;
        empty.status = 0;
        cases.push(empty);
        for ms in [
            0.0,
            1.5,
            0.1 + 0.2,
            1e-7,
            123_456_789.123,
            1e21,
            f64::NAN,
            f64::INFINITY,
        ] {
            let mut r = record("r");
            r.duration_ms = ms;
            cases.push(r);
        }
        for r in &cases {
            let mut ours = Vec::new();
            r.write_json(&mut ours).unwrap();
            let reference = serde_json::to_vec(r).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&reference)
            );
            assert_eq!(ours, reference);
        }
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "needs escaping")]
    fn a_raw_field_that_needs_escaping_is_caught_in_tests() {
        let r = record("not \"a\" uuid");
        let _ = r.write_json(&mut Vec::new());
    }

    fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn lines_reach_the_file_as_json_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.log");
        // An interval far longer than the test: only the guard's drop can write the lines.
        let (a, g) = Audit::open(
            &AuditOutput::File(file.clone()),
            false,
            Duration::from_secs(3600),
        )
        .unwrap();
        for i in 0..3 {
            a.write(&record(&format!("r{i}")));
        }
        drop(g);
        let v = lines(&file);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0]["decision"], "allow");
        assert_eq!(v[2]["request_id"], "r2");
        assert_eq!(v[0]["tenant"], "t");
        assert_eq!(v[0]["user_agent"], "app \"quoted\"\n");
        assert_eq!(v[0]["ts"], "2026-11-23T00:00:00.250Z");
        assert_eq!(a.dropped(), 0);
    }

    #[test]
    fn trace_ids_are_lowercase_hex_and_absent_when_tracing_is_off() {
        let mut r = record("r");
        let line = serde_json::to_value(&r).unwrap();
        assert!(line.get("trace_id").is_none() && line.get("span_id").is_none());
        r.trace_id = Some(TraceIdHex(opentelemetry::trace::TraceId::from_bytes(
            [0xab; 16],
        )));
        r.span_id = Some(SpanIdHex(opentelemetry::trace::SpanId::from_bytes(
            [0x0c; 8],
        )));
        let line = serde_json::to_value(&r).unwrap();
        assert_eq!(line["trace_id"], "ab".repeat(16));
        assert_eq!(line["span_id"], "0c".repeat(8));
    }

    #[test]
    fn lines_are_written_within_the_flush_interval_while_running() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.log");
        let (a, _g) = Audit::open(
            &AuditOutput::File(file.clone()),
            false,
            Duration::from_millis(20),
        )
        .unwrap();
        a.write(&record("early"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while lines(&file).is_empty() {
            assert!(std::time::Instant::now() < deadline, "line never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(lines(&file)[0]["request_id"], "early");
    }

    #[test]
    fn a_full_batch_is_written_before_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("audit.log");
        let (a, _g) = Audit::open(
            &AuditOutput::File(file.clone()),
            false,
            Duration::from_secs(3600),
        )
        .unwrap();
        let n = AUDIT_WRITE_BATCH / 200 + 1; // each line is more than 200 bytes
        for i in 0..n {
            a.write(&record(&format!("r{i}")));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        // The lines that filled the batch go out at once; the rest wait for the interval.
        while lines(&file).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "full batch not written early"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
