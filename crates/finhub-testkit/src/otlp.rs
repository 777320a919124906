//! An OTLP/HTTP trace receiver, as an OpenTelemetry Collector's `otlphttp` receiver behaves:
//! `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`, decoded with the
//! `opentelemetry-proto` types, answered 200 with an empty `ExportTraceServiceResponse`.
//! It keeps every request's raw bytes (to search for secrets) and headers, and every span.
//!
//! [`BlackHole`] is the collector that never answers: it accepts connections and reads nothing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
pub use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
pub use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use prost::Message;
use tokio::net::TcpListener;

/// One span as received, with its service name.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// `service.name` of the resource it came with.
    pub service: String,
    /// The span.
    pub span: Span,
}

impl ReceivedSpan {
    /// The string, int or bool value of attribute `key`, as text.
    pub fn attr(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref())
            .map(|v| match v {
                any_value::Value::StringValue(s) => s.clone(),
                any_value::Value::IntValue(i) => i.to_string(),
                any_value::Value::BoolValue(b) => b.to_string(),
                any_value::Value::DoubleValue(d) => d.to_string(),
                other => format!("{other:?}"),
            })
    }

    /// The trace id as lowercase hex.
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    /// The span id as lowercase hex.
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// The parent span id as lowercase hex (empty for a root span).
    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// The span's kind.
    pub fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap_or(SpanKind::Unspecified)
    }
}

/// Bytes as lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Default)]
struct Received {
    raw: Vec<u8>,
    headers: Vec<(String, String)>,
    spans: Vec<ReceivedSpan>,
    requests: u64,
    undecodable: u64,
}

/// The receiver; stops when dropped.
pub struct Collector {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Listens on a free loopback port.
    pub async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let received = Arc::new(Mutex::new(Received::default()));
        let r = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let r = r.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let r = r.clone();
                        async move { Ok::<_, Infallible>(handle(req, &r).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Collector {
            addr,
            received,
            task,
        }
    }

    /// `http://127.0.0.1:<port>` (the `OTEL_EXPORTER_OTLP_ENDPOINT` form).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.lock().unwrap().spans.clone()
    }

    /// Every request body received so far, concatenated (protobuf bytes).
    pub fn raw(&self) -> Vec<u8> {
        self.received.lock().unwrap().raw.clone()
    }

    /// The headers of every export request, names lowercase.
    pub fn headers(&self) -> Vec<(String, String)> {
        self.received.lock().unwrap().headers.clone()
    }

    /// Export requests received.
    pub fn requests(&self) -> u64 {
        self.received.lock().unwrap().requests
    }

    /// Export requests whose body was not a valid `ExportTraceServiceRequest`.
    pub fn undecodable(&self) -> u64 {
        self.received.lock().unwrap().undecodable
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(req: Request<hyper::body::Incoming>, r: &Mutex<Received>) -> Response<Full<Bytes>> {
    let ok_path = req.method() == hyper::Method::POST && req.uri().path() == "/v1/traces";
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into(),
            )
        })
        .collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let mut g = r.lock().unwrap();
    g.requests += 1;
    g.headers.extend(headers);
    g.raw.extend_from_slice(&body);
    if !ok_path {
        return status(404, Bytes::new());
    }
    match ExportTraceServiceRequest::decode(body) {
        Ok(export) => {
            for rs in export.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|res| res.attributes.iter().find(|kv| kv.key == "service.name"))
                    .and_then(|kv| kv.value.as_ref())
                    .and_then(|v| match &v.value {
                        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        g.spans.push(ReceivedSpan {
                            service: service.clone(),
                            span,
                        });
                    }
                }
            }
            let answer = ExportTraceServiceResponse::default().encode_to_vec();
            status(200, Bytes::from(answer))
        }
        Err(_) => {
            g.undecodable += 1;
            status(400, Bytes::new())
        }
    }
}

fn status(code: u16, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/x-protobuf")
        .body(Full::new(body))
        .expect("static response parts are valid")
}

/// A collector that accepts connections and never reads or answers (a hung collector).
pub struct BlackHole {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    /// Listens on a free loopback port.
    pub async fn start() -> BlackHole {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                held.push(tcp);
            }
        });
        BlackHole { addr, task }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}
