//! Fleet-wide rate limits on a real Redis (`redis-server`, started by each test on a free
//! loopback port and killed at the end): two sidecars share one limit, and a Redis that dies or
//! hangs is handled by `on_redis_error` within the timeout, with automatic recovery.

use std::time::{Duration, Instant};

use crate::common::*;
use finhub_testkit::emulator::Emulator;
use serde_json::Value;

/// `config` deciding through the Redis at `url` (a fresh key prefix): the tenant bucket
/// `(rate, burst)`, the Redis `timeout` and `on_redis_error` mode.
fn through_redis(
    config: SidecarConfig,
    url: &str,
    (rate, burst): (i64, i64),
    timeout: &str,
    on_redis_error: &str,
) -> SidecarConfig {
    config
        .rate_limit(rate, burst)
        .set("policy.rate_limit.backend", "redis")
        .set("policy.rate_limit.redis.url", url)
        .set(
            "policy.rate_limit.redis.key_prefix",
            format!("test-{}:", uuid::Uuid::new_v4().simple()),
        )
        .set("policy.rate_limit.redis.timeout", timeout)
        .set("policy.rate_limit.redis.on_redis_error", on_redis_error)
}

/// Waits until the sidecar reports `n` usable Redis connections.
async fn connected(sc: &SidecarProcess, n: f64) {
    let ok = eventually(Duration::from_secs(15), || async {
        (sc.metric("finhub_sidecar_redis_connections").await? == n).then_some(())
    })
    .await;
    assert!(ok.is_some(), "redis connections != {n}:\n{}", sc.log());
}

/// Status, JSON error code and how long the request took.
async fn get(client: &reqwest::Client, sc: &SidecarProcess) -> (u16, String, Duration) {
    let started = Instant::now();
    let r = client
        .get(sc.url("/api/v2/accounts"))
        .send()
        .await
        .expect("the sidecar answers");
    let status = r.status().as_u16();
    let code = r
        .json::<Value>()
        .await
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (status, code, started.elapsed())
}

fn client() -> reqwest::Client {
    client_with_timeout(Duration::from_secs(20))
}

/// Redis, the emulator and one sidecar deciding through Redis (rate 1000/s, burst 1000) with
/// this `timeout` and `on_redis_error`, with both pooled connections up.
async fn one_sidecar(
    timeout: &str,
    on_redis_error: &str,
) -> (Redis, World, Emulator, SidecarProcess) {
    let redis = Redis::start().await;
    let world = World::new();
    let emu = world.emulator().await;
    let cfg = through_redis(
        world.config(emu.addr().port()),
        &redis.url(),
        (1000, 1000),
        timeout,
        on_redis_error,
    );
    let sc = world.sidecar(cfg).await;
    connected(&sc, 2.0).await;
    (redis, world, emu, sc)
}

const REDIS_ALLOW: &str =
    r#"finhub_sidecar_rate_limit_decisions_total{backend="redis",decision="allow"}"#;
const FALLBACK_ALLOW: &str =
    r#"finhub_sidecar_rate_limit_decisions_total{backend="fallback",decision="allow"}"#;
const FALLBACK_DENY: &str =
    r#"finhub_sidecar_rate_limit_decisions_total{backend="fallback",decision="deny"}"#;
const REDIS_DENY: &str =
    r#"finhub_sidecar_rate_limit_decisions_total{backend="redis",decision="deny"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sidecars_share_one_limit() {
    let redis = Redis::start().await;
    let world = World::new();
    let emu = world.emulator().await;
    // Burst 5 at 1/s for the tenant, shared. A generous timeout: this test is about sharing,
    // and `deny` makes any Redis failure visible as a 503 rather than extra admissions.
    let cfg = through_redis(
        world.config(emu.addr().port()),
        &redis.url(),
        (1, 5),
        "1s",
        "deny",
    );
    let a = world.sidecar(cfg.clone()).await;
    let b = world.sidecar(cfg).await;
    connected(&a, 2.0).await;
    connected(&b, 2.0).await;

    let client = client();
    let started = Instant::now();
    let mut statuses = Vec::new();
    for i in 0..20 {
        let sc = if i % 2 == 0 { &a } else { &b };
        let (status, code, _) = get(&client, sc).await;
        if status == 429 {
            assert_eq!(code, "rate_limited");
        }
        statuses.push(status);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(ok + limited, 20, "only 200 or 429 expected: {statuses:?}");
    // Together, at most burst + rate × elapsed (each pod alone would have admitted 5).
    let bound = 5 + elapsed.ceil() as usize;
    assert!(
        ok <= bound,
        "{ok} admitted across both sidecars in {elapsed:.2}s; shared limit allows {bound}: {statuses:?}"
    );
    assert!(ok >= 5, "the burst is available: {statuses:?}");
    // Both sidecars decided through Redis, and both saw refusals.
    for sc in [&a, &b] {
        assert!(sc.counter(REDIS_ALLOW).await >= 1.0, "{}", sc.log());
        assert!(sc.counter(REDIS_DENY).await >= 1.0, "{}", sc.log());
    }
    // Exactly the admitted requests reached FinHub.
    assert_eq!(emu.controls().stats().api_ok, ok as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_redis_means_deny_within_the_timeout_then_recovery() {
    let (mut redis, _world, _emu, sc) = one_sidecar("200ms", "deny").await;
    let client = client();
    assert_eq!(get(&client, &sc).await.0, 200);

    redis.kill();
    // Every request still gets an answer promptly; soon each one is the configured refusal.
    let mut slowest = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, code, took) = get(&client, &sc).await;
        slowest = slowest.max(took);
        if status == 503 {
            assert_eq!(code, "rate_limit_unavailable");
            break;
        }
        assert_eq!(status, 200);
        assert!(Instant::now() < deadline, "never denied:\n{}", sc.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = client.get(sc.url("/api/v2/accounts")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    // Bounded by Redis's timeout (200 ms) plus scheduling slack, never by Redis being gone.
    assert!(
        slowest < Duration::from_secs(2),
        "a request took {slowest:?}"
    );
    assert!(sc.counter(FALLBACK_DENY).await >= 1.0);

    redis.restart().await;
    let back = eventually(Duration::from_secs(10), || async {
        (get(&client, &sc).await.0 == 200).then_some(())
    })
    .await;
    assert!(back.is_some(), "never recovered:\n{}", sc.log());
    connected(&sc, 2.0).await;
    let before = sc.counter(REDIS_ALLOW).await;
    assert_eq!(get(&client, &sc).await.0, 200);
    assert!(sc.counter(REDIS_ALLOW).await > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_redis_costs_at_most_the_timeout() {
    let (redis, _world, _emu, sc) = one_sidecar("300ms", "allow").await;
    let client = client();
    assert_eq!(get(&client, &sc).await.0, 200);

    // A stopped Redis accepts nothing and answers nothing: only the timeout bounds the wait.
    redis.signal(libc::SIGSTOP);
    for _ in 0..8 {
        let (status, _, took) = get(&client, &sc).await;
        assert_eq!(status, 200, "on_redis_error = allow");
        assert!(took < Duration::from_secs(3), "a request took {took:?}");
    }
    assert!(
        sc.counter(r#"finhub_sidecar_redis_errors_total{kind="timeout"}"#)
            .await
            >= 1.0
    );
    // Connections that keep timing out are dropped: later requests do not wait at all.
    assert!(
        sc.counter(r#"finhub_sidecar_redis_errors_total{kind="unavailable"}"#)
            .await
            >= 1.0
    );
    assert!(sc.counter(FALLBACK_ALLOW).await >= 8.0);

    redis.signal(libc::SIGCONT);
    let before = sc.counter(REDIS_ALLOW).await;
    let back = eventually(Duration::from_secs(15), || async {
        get(&client, &sc).await;
        (sc.counter(REDIS_ALLOW).await > before).then_some(())
    })
    .await;
    assert!(back.is_some(), "never recovered:\n{}", sc.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_fallback_uses_the_pod_share_until_redis_appears() {
    let world = World::new();
    let emu = world.emulator().await;
    // Nothing listens on this port yet: the sidecar must start and be ready anyway.
    let mut redis = Redis::unstarted();
    let cfg = through_redis(
        world.config(emu.addr().port()),
        &redis.url(),
        (1, 4),
        "200ms",
        "local",
    )
    .set("policy.rate_limit.redis.replicas", 2);
    let sc = world.sidecar(cfg).await;
    let client = client();
    let started = Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(get(&client, &sc).await.0);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    // This pod's share: burst 4 / 2 replicas = 2, at 1/s.
    assert!(ok >= 2, "{statuses:?}");
    assert!(
        ok <= 2 + elapsed.ceil() as usize,
        "{ok} admitted in {elapsed:.2}s with a local share of burst 2: {statuses:?}"
    );
    assert!(sc.counter(FALLBACK_DENY).await >= 1.0);
    assert!(
        sc.counter(r#"finhub_sidecar_redis_errors_total{kind="unavailable"}"#)
            .await
            >= 6.0
    );

    // Redis appears: the shared bucket (burst 4, untouched) decides from then on.
    redis.restart().await;
    connected(&sc, 2.0).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(get(&client, &sc).await.0);
    }
    assert!(
        statuses.iter().filter(|s| **s == 200).count() >= 3,
        "shared bucket starts full: {statuses:?}"
    );
    assert!(sc.counter(REDIS_ALLOW).await >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_password_from_a_file() {
    let world = World::new();
    let emu = world.emulator().await;
    // Redis over TLS only, with a certificate from the test CA, and a password.
    let server = world
        .pki
        .server_cert(&["localhost"], &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let (cert, key) = server.write_to(world.dir.path(), "redis").unwrap();
    let mut redis = Redis::unstarted();
    redis.tls = true;
    redis.args = [
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
        "--tls-ca-cert-file",
        world.ca_file.to_str().unwrap(),
        "--tls-auth-clients",
        "no",
        "--requirepass",
        "redis-s3cret-pw",
    ]
    .map(String::from)
    .to_vec();
    let redis = Redis::start_with(redis).await;
    std::fs::write(world.dir.path().join("redis-pw"), "redis-s3cret-pw\n").unwrap();
    std::fs::write(world.dir.path().join("redis-wrong-pw"), "not-the-pw\n").unwrap();
    let cfg = |pw_file: &str| {
        through_redis(
            world.config(emu.addr().port()),
            &format!("rediss://127.0.0.1:{}/", redis.port),
            (1, 2),
            "1s",
            "deny",
        )
        .set("policy.rate_limit.redis.ca_file", path(&world.ca_file))
        .set("policy.rate_limit.redis.password_file", pw_file)
    };
    let sc = world.sidecar(cfg("redis-pw")).await;
    connected(&sc, 2.0).await;
    let client = client();
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(get(&client, &sc).await.0);
        }
        v
    };
    assert_eq!(statuses[..2], [200, 200], "{statuses:?}");
    assert_eq!(
        statuses[2], 429,
        "the shared bucket (burst 2) decided: {statuses:?}"
    );
    assert!(sc.counter(REDIS_DENY).await >= 1.0);

    // A wrong password never connects: the failure mode decides, and no password is logged.
    let wrong = world.sidecar(cfg("redis-wrong-pw")).await;
    let refused = eventually(Duration::from_secs(10), || async {
        wrong.log().contains("redis unreachable").then_some(())
    })
    .await;
    assert!(
        refused.is_some(),
        "connect attempt not logged:\n{}",
        wrong.log()
    );
    let (status, code, _) = get(&client, &wrong).await;
    assert_eq!((status, code.as_str()), (503, "rate_limit_unavailable"));
    assert_eq!(wrong.counter("finhub_sidecar_redis_connections").await, 0.0);
    for log in [sc.log(), wrong.log()] {
        assert!(
            !log.contains("redis-s3cret-pw") && !log.contains("not-the-pw"),
            "{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_while_idle_are_replaced_before_a_request_needs_them() {
    let (redis, _world, _emu, sc) = one_sidecar("500ms", "deny").await;
    let client = client();
    // Two requests: one on each pooled connection (round robin).
    for _ in 0..2 {
        assert_eq!(get(&client, &sc).await.0, 200);
    }

    // Redis drops every client connection (as its idle `timeout`, a restart or a NAT would).
    let admin = redis::Client::open(format!("redis://127.0.0.1:{}/", redis.port)).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    let killed: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(killed >= 2, "the sidecar's two connections were killed");

    // Without any request, the health check notices and reconnects both.
    let replaced = eventually(Duration::from_secs(10), || async {
        (sc.log().matches("redis connection lost").count() >= 2).then_some(())
    })
    .await;
    assert!(replaced.is_some(), "{}", sc.log());
    connected(&sc, 2.0).await;
    // So the next requests are decided by Redis, none by the failure mode.
    for _ in 0..3 {
        assert_eq!(get(&client, &sc).await.0, 200);
    }
    assert_eq!(sc.counter(FALLBACK_DENY).await, 0.0);
    assert!(sc.counter(REDIS_ALLOW).await >= 5.0);
}

/// Hostile or wrong Redis HA endpoints: a Sentinel that knows no such master, one answering
/// garbage, one naming a replica as the primary, and a cluster node answering `MOVED` to itself
/// forever. Each sidecar starts, decides by `on_redis_error` (`deny`: 503
/// `rate_limit_unavailable`) without hanging, says why in its log, and never writes to the
/// replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sentinels_and_cluster_nodes_give_a_bounded_fallback() {
    let primary = Redis::start().await;
    let mut replica = Redis::unstarted();
    replica.args = vec![
        "--replicaof".into(),
        "127.0.0.1".into(),
        primary.port.to_string(),
    ];
    let replica = Redis::start_with(replica).await;
    let sentinel = Sentinel::start(primary.port).await;
    let garbage = FakeRedis::start(|_, _| b"\x00\xff%%not resp at all\r\n:x\r\n".to_vec()).await;
    let replica_port = replica.port;
    let names_replica = FakeRedis::start(move |args, _| {
        if args
            .first()
            .is_some_and(|a| a.eq_ignore_ascii_case("SENTINEL"))
        {
            let port = replica_port.to_string();
            format!("*2\r\n$9\r\n127.0.0.1\r\n${}\r\n{port}\r\n", port.len()).into_bytes()
        } else {
            b"+OK\r\n".to_vec()
        }
    })
    .await;
    let moved_loop = FakeRedis::start(|args, port| {
        let upper: Vec<String> = args.iter().map(|a| a.to_ascii_uppercase()).collect();
        match upper
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            ["CLUSTER", "SLOTS", ..] => {
                format!("*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:{port}\r\n")
                    .into_bytes()
            }
            ["CLIENT", ..] | ["READONLY"] => b"+OK\r\n".to_vec(),
            _ => format!("-MOVED 866 127.0.0.1:{port}\r\n").into_bytes(),
        }
    })
    .await;

    let world = World::new();
    let emu = world.emulator().await;
    let cases = [
        (
            format!("redis+sentinel://127.0.0.1:{}/nosuchmaster", sentinel.port),
            "knows no master",
        ),
        (
            format!("redis+sentinel://127.0.0.1:{}/mymaster", garbage.port),
            "sentinel 127.0.0.1",
        ),
        (
            format!("redis+sentinel://127.0.0.1:{}/mymaster", names_replica.port),
            "is not a primary",
        ),
        (
            format!("redis+cluster://127.0.0.1:{}", moved_loop.port),
            "finhub_sidecar::redis_pool",
        ),
    ];
    let client = client();
    for (url, why) in cases {
        let cfg = through_redis(
            world.config(emu.addr().port()),
            &url,
            (1000, 1000),
            "50ms",
            "deny",
        );
        let sc = world.sidecar(cfg).await;
        // Several requests: none hangs, each decided by the failure mode.
        for _ in 0..5 {
            let (status, code, took) = get(&client, &sc).await;
            assert_eq!(
                (status, code.as_str()),
                (503, "rate_limit_unavailable"),
                "{url}"
            );
            assert!(took < Duration::from_secs(5), "{url}: took {took:?}");
        }
        if !why.is_empty() {
            let logged = eventually(Duration::from_secs(10), || async {
                sc.log().contains(why).then_some(())
            })
            .await;
            assert!(
                logged.is_some(),
                "{url}: no log line saying {why:?}:\n{}",
                sc.log()
            );
        }
        assert_eq!(
            sc.counter(REDIS_ALLOW).await + sc.counter(REDIS_DENY).await,
            0.0,
            "{url}"
        );
        for l in sc
            .log()
            .lines()
            .filter(|l| l.contains("finhub_sidecar::redis_pool"))
        {
            eprintln!("{url}: {l}");
        }
    }
    // The replica was never used for a decision (nor asked to run a script).
    let mut conn = redis_conn(replica.port);
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut conn)
        .unwrap();
    assert!(!stats.contains("cmdstat_evalsha"), "{stats}");
    assert!(!stats.contains("cmdstat_script"), "{stats}");
}
