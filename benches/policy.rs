//! Micro-benchmarks of the per-request policy functions (the work `request_filter` and
//! `upstream_request_filter` do before anything goes upstream). Run: `cargo bench --bench policy`.

use std::hint::black_box;
use std::net::IpAddr;
use std::num::NonZeroU32;

use criterion::{criterion_group, criterion_main, Criterion};
use finhub_sidecar::auth::grant::Grant;
use finhub_sidecar::policy::ratelimit::{Backend, Limit, Limiter, LocalLimiter, RateLimitConfig};
use finhub_sidecar::policy::{allow, headers};
use http::{HeaderValue, Method};
use ipnet::IpNet;

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
                Some(&xff),
                origin,
            )
        })
    });
    let limiter = LocalLimiter::new(
        RateLimitConfig {
            default: Some(Limit {
                per_second: NonZeroU32::new(1_000_000_000).unwrap(),
                burst: NonZeroU32::new(1_000_000_000).unwrap(),
            }),
            routes: vec![],
            backend: Backend::Local,
        },
        4,
    );
    c.bench_function("rate_limit/check", |b| {
        b.iter(|| limiter.check(black_box(1), &Method::GET, black_box("/api/v2/accounts")))
    });
    let body = br#"{"expires_in":1800,"token_type":"Bearer","userSessionToken":"eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjE4MDAwMDAwMDB9.sig","refreshToken":"r"}"#;
    c.bench_function("grant_parse", |b| b.iter(|| Grant::parse(black_box(body))));
}

criterion_group!(benches, policy);
criterion_main!(benches);
