//! What one rate-limit decision costs, local buckets vs the shared Redis backend (a real
//! `redis-server` on a free loopback port, started and stopped here). Both go through the same
//! `Limiter::check` + await the proxy uses, so the difference is the latency Redis adds per
//! request. Run: `cargo bench --bench ratelimit` (needs the Debian package `redis-server`).

use std::num::{NonZeroU32, NonZeroUsize};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use finhub_sidecar::config::{Backend, Limit, OnRedisError, RateLimitConfig, RedisSettings};
use finhub_sidecar::metrics::Metrics;
use finhub_sidecar::policy::ratelimit::{Check, Decision, Limiter, LocalLimiter, TenantLimiter};
use finhub_sidecar::policy::redis_limit::RedisLimiter;
use http::Method;

fn config() -> RateLimitConfig {
    // High enough that every decision is "allow": the cost measured is the decision itself.
    let high = NonZeroU32::new(1_000_000_000).expect("non-zero");
    RateLimitConfig {
        default: Some(Limit {
            per_second: high,
            burst: high,
        }),
        routes: vec![],
        backend: Backend::Local,
    }
}

async fn decide(limiter: &dyn TenantLimiter) -> Decision {
    match limiter.check(&Method::GET, "/api/v2/accounts") {
        Check::Ready(d) => d,
        Check::Wait(pending) => pending.await,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("ephemeral port")
}

fn ratelimit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let local = LocalLimiter::new(config()).tenant("bench-tenant");
    c.bench_function("rate_limit_decision/local", |b| {
        b.iter(|| rt.block_on(decide(&*local)))
    });

    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(["--appendonly", "no", "--loglevel", "warning"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .spawn();
    let Ok(redis) = redis else {
        eprintln!("redis-server not found: skipping rate_limit_decision/redis");
        return;
    };
    // Stopped even if a measurement panics.
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _redis = Stop(redis);
    let settings = RedisSettings {
        connection: redis::IntoConnectionInfo::into_connection_info(
            format!("redis://127.0.0.1:{port}/").as_str(),
        )
        .expect("url"),
        topology: finhub_sidecar::config::RedisTopology::Single,
        password: None,
        ca_pem: None,
        key_prefix: "bench:".into(),
        timeout: Duration::from_millis(50),
        connect_timeout: Duration::from_secs(1),
        connections: NonZeroUsize::new(2).expect("non-zero"),
        on_error: OnRedisError::Deny,
    };
    let metrics = Metrics::new();
    let shared = RedisLimiter::new(&config(), &settings, &metrics.rate_limit, &metrics.redis);
    let tenant: std::sync::Arc<dyn TenantLimiter> = shared.tenant("bench-tenant").into();
    rt.spawn(shared.clone().keep_connected());
    let deadline = Instant::now() + Duration::from_secs(10);
    while shared.connected() < 2 {
        assert!(Instant::now() < deadline, "redis-server did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(rt.block_on(decide(&*tenant)), Decision::Allow);
    c.bench_function("rate_limit_decision/redis", |b| {
        b.iter(|| rt.block_on(decide(&*tenant)))
    });
    // 32 decisions in flight at once (as with 32 busy app connections), per decision.
    c.bench_function("rate_limit_decision/redis_32_concurrent", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let started = Instant::now();
                let mut left = iters;
                while left > 0 {
                    let n = left.min(32);
                    let batch: Vec<_> = (0..n)
                        .map(|_| {
                            let l = tenant.clone();
                            tokio::spawn(async move { decide(&*l).await })
                        })
                        .collect();
                    for t in batch {
                        let _ = t.await;
                    }
                    left -= n;
                }
                started.elapsed()
            })
        })
    });
    // Every measured decision must have been Redis's, not the failure mode's.
    let text = String::from_utf8(metrics.render()).unwrap_or_default();
    let fallback: f64 = text
        .lines()
        .filter(|l| l.starts_with("finhub_sidecar_rate_limit_decisions_total{backend=\"fallback\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(fallback, 0.0, "some decisions fell back:\n{text}");
}

criterion_group!(benches, ratelimit);
criterion_main!(benches);
