//! Micro-benchmarks of the per-request policy functions (the work `request_filter` and
//! `upstream_request_filter` do before anything goes upstream). Run: `cargo bench --bench policy`.

use std::hint::black_box;
use std::net::IpAddr;
use std::num::NonZeroU32;

use criterion::{criterion_group, criterion_main, Criterion};
use finhub_sidecar::auth::grant::Grant;
use finhub_sidecar::config::{Backend, Limit, RateLimitConfig};
use finhub_sidecar::policy::ratelimit::{Limiter, LocalLimiter};
use finhub_sidecar::policy::{allow, headers, path};
use http::{HeaderValue, Method};
use ipnet::IpNet;
use pingora::http::{RequestHeader, ResponseHeader};

/// A typical app request: 15 headers, plus `extra`.
fn app_request(extra: &[(&str, &str)]) -> RequestHeader {
    let mut r = RequestHeader::build("POST", b"/api/v2/payments", None).unwrap();
    for (k, v) in [
        ("Host", "127.0.0.1:8080"),
        ("User-Agent", "legacy-app/3.2"),
        ("Accept", "application/json"),
        ("Accept-Encoding", "gzip"),
        ("Content-Type", "application/json"),
        ("Content-Length", "64"),
        ("X-Tenant-ID", "tenant-a"),
        ("X-Request-ID", "9b2f3c1e-7a4d-4e8f-9c0b-1d2e3f4a5b6c"),
        ("X-Activity-ID", "1b2f3c1e-7a4d-4e8f-9c0b-1d2e3f4a5b6c"),
        ("X-Correlation-ID", "corr-1"),
        ("X-Idempotency-Key", "2b2f3c1e-7a4d-4e8f-9c0b-1d2e3f4a5b6c"),
        (
            "Traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("X-App-Version", "3.2.1"),
        ("X-Forwarded-From", "legacy-app"),
        ("Connection", "keep-alive"),
    ]
    .iter()
    .chain(extra)
    {
        r.append_header(k.to_string(), *v).unwrap();
    }
    r
}

fn policy(c: &mut Criterion) {
    let allowed: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
    let peer: IpAddr = "127.0.0.1".parse().unwrap();
    let hosts = vec![
        "api.finhub.cloud".to_string(),
        "gateway.finhub.cloud".to_string(),
    ];
    c.bench_function("client_allowed", |b| {
        b.iter(|| allow::client_allowed(black_box(&allowed), black_box(peer)))
    });
    c.bench_function("destination/origin_form", |b| {
        b.iter(|| allow::destination(black_box(b"/api/v2/accounts?limit=5"), black_box(&hosts)))
    });
    c.bench_function("destination/absolute_form", |b| {
        b.iter(|| {
            allow::destination(
                black_box(b"http://api.finhub.cloud/api/v2/accounts?limit=5"),
                black_box(&hosts),
            )
        })
    });
    let app_id = HeaderValue::from_static("9b2f3c1e-7a4d-4e8f-9c0b-1d2e3f4a5b6c");
    c.bench_function("uuid_or_new/keep", |b| {
        b.iter(|| headers::uuid_or_new(black_box(Some(&app_id))))
    });
    c.bench_function("uuid_or_new/generate", |b| {
        b.iter(|| headers::uuid_or_new(black_box(None)))
    });
    let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
    let xff = HeaderValue::from_static("203.0.113.9");
    let origin: IpAddr = "192.0.2.10".parse().unwrap();
    c.bench_function("forwarded_for/trusted", |b| {
        b.iter(|| {
            headers::forwarded_for(
                black_box("10.1.2.3".parse().unwrap()),
                &trusted,
                [&xff],
                origin,
            )
        })
    });
    let limiter = LocalLimiter::new(RateLimitConfig {
        default: Some(Limit {
            per_second: NonZeroU32::new(1_000_000_000).unwrap(),
            burst: NonZeroU32::new(1_000_000_000).unwrap(),
        }),
        routes: vec![],
        backend: Backend::Local,
    })
    .tenant("tenant-a");
    c.bench_function("rate_limit/check", |b| {
        b.iter(|| limiter.check(&Method::GET, black_box("/api/v2/accounts")))
    });
    c.bench_function("path/canonical", |b| {
        b.iter(|| path::canonical(black_box(b"/api/v2/accounts/4711/transactions?limit=5")))
    });
    c.bench_function("path/canonical_and_reserved", |b| {
        b.iter(|| {
            let p = path::canonical(black_box(b"/api/v2/accounts/4711/transactions")).unwrap();
            path::is_reserved(&p, &[])
        })
    });
    // The header rewrite's first pass (a fresh, sized upstream header without what is stripped)
    // over a typical app request (15 headers, nothing to strip) and one with credentials.
    let clean = app_request(&[]);
    c.bench_function("headers/without_app_credentials/clean", |b| {
        b.iter(|| headers::without_app_credentials(black_box(&clean), clean.raw_path(), 16))
    });
    let dirty = app_request(&[
        ("Authorization", "Bearer app"),
        ("X_User_Session_Token", "app"),
        ("X-HTTP-Method-Override", "DELETE"),
    ]);
    c.bench_function("headers/without_app_credentials/dirty", |b| {
        b.iter(|| headers::without_app_credentials(black_box(&dirty), dirty.raw_path(), 16))
    });
    let token = "eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjE4MDAwMDAwMDB9.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg";
    let mut resp = ResponseHeader::build(200, None).unwrap();
    for (k, v) in [
        ("Content-Type", "application/json"),
        ("Content-Length", "512"),
        ("Date", "Tue, 01 Dec 2026 09:00:00 GMT"),
        ("X-Request-ID", "9b2f3c1e-7a4d-4e8f-9c0b-1d2e3f4a5b6c"),
        ("Cache-Control", "no-store"),
    ] {
        resp.append_header(k, v).unwrap();
    }
    let reflections = headers::Reflections::of(token, Some("rt-12345678"), None);
    c.bench_function("headers/strip_response_credentials", |b| {
        b.iter_batched(
            || resp.clone(),
            |mut r| headers::strip_response_credentials(&mut r, reflections.needles()),
            criterion::BatchSize::SmallInput,
        )
    });
    let body = br#"{"expires_in":1800,"token_type":"Bearer","userSessionToken":"eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjE4MDAwMDAwMDB9.sig","refreshToken":"r"}"#;
    c.bench_function("grant_parse", |b| b.iter(|| Grant::parse(black_box(body))));
}

criterion_group!(benches, policy);
criterion_main!(benches);
