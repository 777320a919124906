//! OpenTelemetry tracing, black box: the real sidecar exports to a real OTLP/HTTP receiver
//! (protobuf decoded with the `opentelemetry-proto` types) while the FinHub emulator records
//! the `traceparent` it receives.

use std::time::Duration;

use crate::common::*;
use finhub_testkit::otlp::{BlackHole, Collector, ReceivedSpan, SpanKind};

/// An app span: trace `4bf9…4736`, span `00f0…02b7`, sampled.
const APP_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APP_SPAN: &str = "00f067aa0ba902b7";

fn app_traceparent(trace: &str, flags: &str) -> String {
    format!("00-{trace}-{APP_SPAN}-{flags}")
}

/// The default test config exporting to `endpoint` every 50 ms.
fn traced(config: SidecarConfig, endpoint: &str) -> SidecarConfig {
    config
        .set("tracing.endpoint", endpoint)
        .set("tracing.schedule_delay", "50ms")
}

/// Waits until the collector holds spans matching `pred` (at least `n`).
async fn spans_where(
    collector: &Collector,
    n: usize,
    pred: impl Fn(&ReceivedSpan) -> bool,
) -> Vec<ReceivedSpan> {
    eventually(Duration::from_secs(10), || async {
        let s: Vec<_> = collector.spans().into_iter().filter(|s| pred(s)).collect();
        (s.len() >= n).then_some(s)
    })
    .await
    .unwrap_or_else(|| panic!("{n} spans expected; got {:#?}", collector.spans()))
}

/// The `traceparent` lines of the emulator's recorded request `i`.
fn finhub_traceparents(emu: &finhub_testkit::emulator::Emulator, i: usize) -> Vec<String> {
    emu.controls().api_requests()[i]
        .headers
        .iter()
        .filter(|(k, _)| k == "traceparent")
        .map(|(_, v)| v.clone())
        .collect()
}

#[tokio::test]
async fn the_app_span_parents_the_server_span_which_parents_the_client_span_finhub_sees() {
    let collector = Collector::start().await;
    let (_w, emu, sc) = World::start(|c| traced(c, &collector.endpoint())).await;
    let r = http_client()
        .get(sc.url("/api/v2/accounts?iban=DE89370400440532013000"))
        .header("traceparent", app_traceparent(APP_TRACE, "01"))
        .header("tracestate", "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7")
        .header("baggage", "userId=alice")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let server = spans_where(&collector, 1, |s| s.kind() == SpanKind::Server).await;
    let server = &server[0];
    assert_eq!(server.trace_id(), APP_TRACE, "the app's trace continues");
    assert_eq!(server.parent_id(), APP_SPAN, "the app's span is the parent");
    assert_eq!(server.span.name, "GET");
    assert_eq!(server.service, "finhub-sidecar");
    assert_eq!(server.attr("http.request.method").as_deref(), Some("GET"));
    assert_eq!(server.attr("url.path").as_deref(), Some("/api/v2/accounts"));
    assert_eq!(
        server.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(server.attr("finhub.tenant").as_deref(), Some(TENANT));
    assert_eq!(server.attr("error.type"), None);

    let client = spans_where(&collector, 1, |s| s.kind() == SpanKind::Client).await;
    let client = &client[0];
    assert_eq!(client.trace_id(), APP_TRACE);
    assert_eq!(client.parent_id(), server.span_id());
    assert_eq!(client.attr("server.address").as_deref(), Some("localhost"));
    assert_eq!(
        client.attr("server.port"),
        Some(emu.addr().port().to_string())
    );
    assert_eq!(
        client.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(client.attr("http.request.resend_count"), None);

    // FinHub saw exactly one traceparent: the client span's; the app's tracestate and baggage
    // pass on unchanged.
    let recorded = &emu.controls().api_requests()[0];
    assert_eq!(
        finhub_traceparents(&emu, 0),
        [format!("00-{APP_TRACE}-{}-01", client.span_id())]
    );
    assert_eq!(
        recorded.header("tracestate"),
        Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    );
    assert_eq!(recorded.header("baggage"), Some("userId=alice"));

    // The audit line carries the trace id and the server span's id.
    let audit = sc.wait_audit(1).await;
    assert_eq!(audit[0]["trace_id"], APP_TRACE);
    assert_eq!(audit[0]["span_id"], server.span_id());

    // The background login has its own span, with its outcome.
    let login = spans_where(&collector, 1, |s| s.span.name == "finhub.auth.login").await;
    assert_eq!(login[0].attr("finhub.outcome").as_deref(), Some("ok"));
    assert_eq!(login[0].attr("finhub.tenant").as_deref(), Some(TENANT));
    assert_eq!(collector.undecodable(), 0);
}

#[tokio::test]
async fn a_401_replay_is_a_second_client_span_after_a_renewal_wait() {
    let collector = Collector::start().await;
    let (_w, emu, sc) = World::start(|c| traced(c, &collector.endpoint())).await;
    emu.controls().revoke_all_sessions();
    let r = http_client()
        .post(sc.url("/api/v2/payments"))
        .header("traceparent", app_traceparent(APP_TRACE, "01"))
        .body(r#"{"amount":"1.00"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let server = spans_where(&collector, 1, |s| s.kind() == SpanKind::Server).await;
    let server = &server[0];
    let mut clients = spans_where(&collector, 2, |s| s.kind() == SpanKind::Client).await;
    clients.sort_by_key(|s| s.span.start_time_unix_nano);
    assert!(clients.iter().all(|c| c.parent_id() == server.span_id()));
    assert_eq!(
        clients[0].attr("http.response.status_code").as_deref(),
        Some("401")
    );
    assert_eq!(clients[0].attr("error.type").as_deref(), Some("401"));
    assert_eq!(
        clients[1].attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        clients[1].attr("http.request.resend_count").as_deref(),
        Some("1")
    );

    let wait = spans_where(&collector, 1, |s| s.span.name == "session renewal wait").await;
    assert_eq!(wait[0].parent_id(), server.span_id());
    assert_eq!(wait[0].attr("finhub.outcome").as_deref(), Some("renewed"));

    // Each attempt reached FinHub with its own client span as the parent.
    let requests = emu.controls().api_requests();
    assert_eq!(requests.len(), 2);
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(
            finhub_traceparents(&emu, i),
            [format!("00-{APP_TRACE}-{}-01", c.span_id())]
        );
    }
}

#[tokio::test]
async fn a_missing_or_invalid_traceparent_starts_a_new_trace() {
    let collector = Collector::start().await;
    let (_w, emu, sc) = World::start(|c| traced(c, &collector.endpoint())).await;
    let client = http_client();
    // No traceparent; then hostile ones: uppercase, version ff, zero ids, two lines.
    let hostile: [&[&str]; 5] = [
        &[],
        &["00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"],
        &["ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"],
        &["00-00000000000000000000000000000000-00f067aa0ba902b7-01"],
        &[
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b8-01",
        ],
    ];
    for (i, lines) in hostile.iter().enumerate() {
        let mut req = client
            .get(sc.url(&format!("/api/v2/accounts/{i}")))
            .header("tracestate", "congo=t61rcWkgMzE");
        for l in *lines {
            req = req.header("traceparent", *l);
        }
        assert_eq!(req.send().await.unwrap().status(), 200);
        let server = spans_where(&collector, 1, |s| {
            s.kind() == SpanKind::Server
                && s.attr("url.path") == Some(format!("/api/v2/accounts/{i}"))
        })
        .await;
        let server = &server[0];
        assert_eq!(server.parent_id(), "", "case {i}: a root span");
        assert_ne!(server.trace_id(), APP_TRACE, "case {i}");
        let seen = finhub_traceparents(&emu, i);
        assert_eq!(seen.len(), 1, "case {i}: exactly one traceparent: {seen:?}");
        assert!(
            seen[0].starts_with(&format!("00-{}-", server.trace_id())),
            "case {i}"
        );
        assert!(seen[0].ends_with("-01"), "case {i}");
        // The app's tracestate belongs to the trace that was not continued.
        assert_eq!(emu.controls().api_requests()[i].header("tracestate"), None);
    }

    // A failed request's log line carries the trace id.
    emu.shutdown();
    let r = client
        .get(sc.url("/api/v2/down"))
        .header("traceparent", app_traceparent(APP_TRACE, "01"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_server_error());
    let line = eventually(Duration::from_secs(5), || async {
        sc.log()
            .lines()
            .find(|l| l.contains("request failed"))
            .map(str::to_string)
    })
    .await
    .expect("a request failed line");
    assert!(line.contains(APP_TRACE), "{line}");
    let server = spans_where(&collector, 1, |s| {
        s.kind() == SpanKind::Server && s.attr("url.path").as_deref() == Some("/api/v2/down")
    })
    .await;
    let code = server[0].attr("error.type").expect("error.type");
    assert!(code.starts_with("upstream_"), "{code}");
}

#[tokio::test]
async fn traceidratio_sampling_decides_from_the_trace_id() {
    let collector = Collector::start().await;
    let (_w, emu, sc) = World::start(|c| {
        traced(c, &collector.endpoint())
            .set("tracing.sampler", "traceidratio")
            .set("tracing.sampler_arg", 0.5)
    })
    .await;
    let client = http_client();
    // The ratio sampler keeps a trace when its low 63 bits fall under ratio × 2^63: the app's
    // own sampled flag is not asked (not parent-based).
    let kept = "0000000000000000000000000000000a";
    let dropped = "0000000000000000fffffffffffffffe";
    for (path, trace, flags) in [
        ("/api/v2/dropped", dropped, "01"),
        ("/api/v2/kept", kept, "00"),
    ] {
        let r = client
            .get(sc.url(path))
            .header("traceparent", app_traceparent(trace, flags))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let seen0 = finhub_traceparents(&emu, 0);
    let seen1 = finhub_traceparents(&emu, 1);
    assert!(seen0[0].starts_with(&format!("00-{dropped}-")) && seen0[0].ends_with("-00"));
    assert!(seen1[0].starts_with(&format!("00-{kept}-")) && seen1[0].ends_with("-01"));
    // The kept trace arrives; the dropped one, ended before it, never does.
    spans_where(&collector, 2, |s| s.trace_id() == kept).await;
    assert!(collector.spans().iter().all(|s| s.trace_id() != dropped));
    let audit = sc.wait_audit(2).await;
    assert_eq!(
        audit[0]["trace_id"], dropped,
        "unsampled requests carry their id too"
    );
}

#[tokio::test]
async fn otel_variables_configure_it_and_no_secret_reaches_the_collector() {
    let collector = Collector::start().await;
    let mut world = World::new();
    world.sidecar_env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint()),
        ("OTEL_SERVICE_NAME", "payments-sidecar".into()),
        ("OTEL_BSP_SCHEDULE_DELAY", "50".into()),
        (
            "OTEL_EXPORTER_OTLP_HEADERS",
            "x-api-key=collector-api-key-s3cr3t".into(),
        ),
        ("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=pod-1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let emu = world.emulator().await;
    let sc = world.sidecar(world.config(emu.addr().port())).await;
    let client = http_client();
    emu.controls().revoke_all_sessions();
    for _ in 0..3 {
        let r = client
            .post(sc.url("/api/v2/payments?iban=DE89370400440532013000"))
            .header("authorization", "Bearer app-bearer-s3cr3t")
            .header("x-user-session-token", "app-session-s3cr3t")
            .header("cookie", "sid=app-cookie-s3cr3t")
            .header("baggage", "card=app-baggage-s3cr3t")
            .body(r#"{"pan":"4111111111111111"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    spans_where(&collector, 4, |s| s.kind() == SpanKind::Client).await;
    spans_where(&collector, 2, |s| s.span.name == "finhub.auth.login").await;
    let spans = collector.spans();
    assert!(spans.iter().all(|s| s.service == "payments-sidecar"));
    let raw = collector.raw();
    assert!(
        raw.windows(10).any(|w| w == b"k8s.pod.na"),
        "resource attributes exported"
    );
    let mut secrets = emu.controls().handed_out_secrets();
    secrets.extend(
        [
            "demo-password",
            "demo-secret",
            "app-bearer-s3cr3t",
            "app-session-s3cr3t",
            "app-cookie-s3cr3t",
            "app-baggage-s3cr3t",
            "4111111111111111",
            "DE89370400440532013000",
            "collector-api-key-s3cr3t",
        ]
        .map(String::from),
    );
    assert!(secrets.len() > 9, "the emulator handed out tokens");
    for s in &secrets {
        assert!(
            !raw.windows(s.len()).any(|w| w == s.as_bytes()),
            "a secret reached the collector"
        );
    }
    // The API key went to the collector as a header, and nowhere else.
    assert!(collector
        .headers()
        .iter()
        .any(|(k, v)| k == "x-api-key" && v == "collector-api-key-s3cr3t"));
    assert!(!sc.log().contains("collector-api-key-s3cr3t"));
}

/// Requests through `sc` in 8 concurrent loops; every answer must be a 200.
async fn load(sc: &SidecarProcess, n: usize) {
    let url = sc.url("/api/v2/accounts");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = http_client();
                for _ in 0..n / 8 {
                    let r = client.get(&url).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_dead_collector_drops_and_counts_spans_without_touching_requests() {
    // One that never answers, and a port nobody listens on.
    let hole = BlackHole::start().await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    for endpoint in [hole.endpoint(), closed] {
        let (_w, _emu, sc) = World::start(|c| {
            traced(c, &endpoint)
                .set("tracing.max_queue_size", 64)
                .set("tracing.max_export_batch_size", 32)
                .set("tracing.timeout", "500ms")
        })
        .await;
        load(&sc, 800).await;
        let before = rss_kib(sc.pid());
        let n = 4000;
        load(&sc, n).await;
        let after = rss_kib(sc.pid());
        eprintln!(
            "{endpoint}: RSS {before} KiB after warm-up, {after} KiB after {n} more requests"
        );
        assert!(
            after < before + 16 * 1024,
            "{endpoint}: RSS grew from {before} KiB to {after} KiB"
        );
        // Every span beyond the queue was dropped and counted: none piles up.
        let spans = 2.0 * (800 + n) as f64;
        let dropped = eventually(Duration::from_secs(10), || async {
            let d = sc
                .counter("finhub_sidecar_trace_spans_dropped_total{reason=\"queue_full\"}")
                .await
                + sc.counter("finhub_sidecar_trace_spans_dropped_total{reason=\"export_failed\"}")
                    .await;
            (d >= spans - 64.0 - 32.0).then_some(d)
        })
        .await;
        assert!(
            dropped.is_some(),
            "{endpoint}: spans not counted as dropped:\n{}",
            sc.scrape().await.unwrap_or_default()
        );
        assert_eq!(
            sc.counter("finhub_sidecar_trace_spans_exported_total")
                .await,
            0.0
        );
        // Logged once per change of state, never per request.
        let warnings = sc.log().matches("span export failed").count();
        assert!(warnings <= 1, "{endpoint}: {warnings} export warnings");
    }
}
