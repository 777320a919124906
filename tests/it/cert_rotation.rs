//! Certificate lifecycle: the client certificate rotates on disk while traffic flows; the
//! sidecar picks up every valid new set without a restart and never publishes a broken one.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;
use finhub_testkit::pki::{CertPair, ClientCertOpts};
use serde_json::Value;

/// `client_cert.reload_interval` of these tests.
const RELOAD: &str = "200ms";

/// A client certificate from the world's CA that expired ten days ago.
fn expired_cert(world: &World) -> CertPair {
    world
        .pki
        .client_cert(&ClientCertOpts {
            not_before_offset_days: -40,
            validity_days: 30,
            ..ClientCertOpts::default()
        })
        .unwrap()
}

/// Kubernetes secret-volume layout: `<dir>/tls.crt -> ..data/tls.crt`, `..data -> ..<ts>`.
fn k8s_volume(dir: &Path, pair: &CertPair, stamp: &str) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    k8s_swap(dir, pair, stamp);
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    std::os::unix::fs::symlink("..data/tls.crt", &cert).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", &key).unwrap();
    (cert, key)
}

/// Writes a new timestamped directory and atomically swaps `..data` to it (as the kubelet does).
fn k8s_swap(dir: &Path, pair: &CertPair, stamp: &str) {
    let ts = dir.join(format!("..{stamp}"));
    std::fs::create_dir_all(&ts).unwrap();
    std::fs::write(ts.join("tls.crt"), &pair.cert_pem).unwrap();
    std::fs::write(ts.join("tls.key"), &pair.key_pem).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{stamp}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_data_swap_rotates_with_no_failed_request() {
    let world = World::new();
    let first = world.client.clone();
    let (cert, key) = k8s_volume(&world.dir.path().join("mtls"), &first, "2026_11_23_a");
    let emu = world.emulator().await;
    let config = world
        .config(emu.addr().port())
        .client_cert(&cert, &key)
        .cert_reload_interval(RELOAD)
        .set("upstream.idle_timeout", "1s");
    let sc = world.sidecar(config).await;

    let traffic = Traffic::start(&sc, 2, Duration::ZERO);
    assert!(
        traffic
            .wait_seen(&first.serial_hex, Duration::from_secs(10))
            .await,
        "traffic with the first certificate"
    );
    let second = world.another_client_cert();
    let rotated_at = Instant::now();
    k8s_swap(&world.dir.path().join("mtls"), &second, "2026_11_23_b");
    assert!(
        traffic
            .wait_seen(&second.serial_hex, Duration::from_secs(10))
            .await,
        "the new certificate reached FinHub\n{}",
        sc.log()
    );
    // Keep sending past the bound (reload interval + idle timeout) plus slack.
    let bound = Duration::from_millis(200 + 1000 + 500);
    let until = rotated_at + bound + Duration::from_millis(500);
    eventually(Duration::from_secs(10), || async {
        (Instant::now() >= until).then_some(())
    })
    .await;
    let TrafficReport {
        failures,
        answers: log,
    } = traffic.stop().await;

    assert_eq!(failures, 0, "no request failed during rotation");
    let late_old: Vec<_> = log
        .iter()
        .filter(|(sent, serial)| *sent > rotated_at + bound && *serial == first.serial_hex)
        .collect();
    assert!(
        late_old.is_empty(),
        "{} requests used the old certificate after the bound",
        late_old.len()
    );
    assert!(log
        .iter()
        .all(|(_, s)| *s == first.serial_hex || *s == second.serial_hex));
    assert_eq!(
        sc.metric("finhub_sidecar_cert_reloads_total{result=\"published\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_rewrite_cert_before_key_never_publishes_the_mismatch() {
    let world = World::new();
    let first = world.client.clone();
    let emu = world.emulator().await;
    let config = world.config(emu.addr().port()).cert_reload_interval(RELOAD);
    let sc = world.sidecar(config).await;
    let traffic = Traffic::start(&sc, 1, Duration::ZERO);

    let second = world.another_client_cert();
    std::fs::write(&world.client_cert, &second.cert_pem).unwrap();
    // The reloader sees the half-written rotation and rejects it (counted once).
    let rejected = eventually(Duration::from_secs(10), || async {
        sc.metric("finhub_sidecar_cert_reloads_total{result=\"rejected\"}")
            .await
            .filter(|v| *v >= 1.0)
    })
    .await;
    assert!(
        rejected.is_some(),
        "mismatched intermediate state was not rejected\n{}",
        sc.log()
    );
    // Traffic still flows with the old, complete set.
    let before = traffic.answered();
    assert!(eventually(Duration::from_secs(10), || async {
        (traffic.answered() > before + 3).then_some(())
    })
    .await
    .is_some());
    std::fs::write(&world.client_key, &second.key_pem).unwrap();
    assert!(
        traffic
            .wait_seen(&second.serial_hex, Duration::from_secs(10))
            .await,
        "completed rotation was not picked up\n{}",
        sc.log()
    );
    let TrafficReport {
        failures,
        answers: log,
    } = traffic.stop().await;
    assert_eq!(failures, 0);
    assert!(log
        .iter()
        .all(|(_, s)| *s == first.serial_hex || *s == second.serial_hex));
    assert_eq!(
        sc.metric("finhub_sidecar_cert_reloads_total{result=\"rejected\"}")
            .await,
        Some(1.0),
        "one distinct bad content is counted once"
    );
    assert!(
        sc.log().matches("does not match").count() == 1,
        "{}",
        sc.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_sets_are_rejected_with_their_reason_and_the_last_good_keeps_serving() {
    let world = World::new();
    let good = world.client.clone();
    let emu = world.emulator().await;
    let config = world
        .config(emu.addr().port())
        .environment("production")
        .cert_reload_interval(RELOAD);
    let sc = world.sidecar(config).await;

    let other = world.another_client_cert();
    let expired = expired_cert(&world);
    let no_eku = world
        .pki
        .client_cert(&ClientCertOpts {
            client_auth_eku: false,
            ..ClientCertOpts::default()
        })
        .unwrap();
    let truncated = &good.cert_pem[..good.cert_pem.len() / 2];
    let (weak_cert, weak_key) = {
        use rsa::pkcs1::EncodeRsaPublicKey;
        use rsa::pkcs8::EncodePrivateKey;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).unwrap();
        let pkcs1 = key.to_public_key().to_pkcs1_der().unwrap();
        let cert = world
            .pki
            .client_cert_for_rsa_key(&ClientCertOpts::default(), pkcs1.as_bytes())
            .unwrap();
        let pem = key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap();
        (cert, pem.to_string())
    };
    let cases: Vec<(&str, String, String, &str)> = vec![
        (
            "truncated PEM",
            truncated.to_string(),
            good.key_pem.clone(),
            "PEM",
        ),
        (
            "mismatched key",
            good.cert_pem.clone(),
            other.key_pem.clone(),
            "does not match",
        ),
        (
            "expired",
            expired.cert_pem.clone(),
            expired.key_pem.clone(),
            "expired",
        ),
        (
            "no clientAuth",
            no_eku.cert_pem.clone(),
            no_eku.key_pem.clone(),
            "clientAuth",
        ),
        ("1024-bit RSA", weak_cert, weak_key, "RSA key has 1024 bits"),
    ];
    for (i, (name, cert_pem, key_pem, reason)) in cases.into_iter().enumerate() {
        std::fs::write(&world.client_key, &key_pem).unwrap();
        std::fs::write(&world.client_cert, &cert_pem).unwrap();
        let want = (i + 1) as f64;
        let counted = eventually(Duration::from_secs(10), || async {
            sc.metric("finhub_sidecar_cert_reloads_total{result=\"rejected\"}")
                .await
                .filter(|v| *v >= want)
        })
        .await;
        assert!(counted.is_some(), "{name}: not rejected\n{}", sc.log());
        assert!(
            sc.log().contains(reason),
            "{name}: reason `{reason}` not logged\n{}",
            sc.log()
        );
        let r = http_client()
            .get(sc.url("/api/v2/accounts"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}: the last good set stopped serving");
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v["client_cert"]["serial_hex"],
            good.serial_hex.as_str(),
            "{name}"
        );
    }
    assert_eq!(
        sc.metric("finhub_sidecar_cert_reloads_total{result=\"published\"}")
            .await,
        Some(0.0),
        "no invalid set was published"
    );
    assert_eq!(
        sc.metric("finhub_sidecar_client_cert_expiration_timestamp_seconds")
            .await,
        Some(
            finhub_sidecar::tls::identity::cert_identity(
                &rustls::pki_types::pem::PemObject::from_pem_slice(good.cert_pem.as_bytes())
                    .map(|c: rustls::pki_types::CertificateDer<'static>| c.as_ref().to_vec())
                    .unwrap()
            )
            .unwrap()
            .not_after_unix as f64
        )
    );
}

#[test]
fn production_start_without_a_valid_certificate_exits_with_a_clear_error() {
    let world = World::new();
    let expired = expired_cert(&world);
    let (cert, key) = expired.write_to(world.dir.path(), "expired").unwrap();
    let config = world.dir.path().join("prod.toml");
    world
        .config(1)
        .environment("production")
        .client_cert(&cert, &key)
        .write_to(&config);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_finhub-sidecar"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expired"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_close_to_expiry_is_warned_about() {
    let world = World::new();
    let short = world
        .pki
        .client_cert(&ClientCertOpts {
            validity_days: 3,
            ..ClientCertOpts::default()
        })
        .unwrap();
    let (cert, key) = short.write_to(world.dir.path(), "short").unwrap();
    let emu = world.emulator().await;
    let config = world
        .config(emu.addr().port())
        .client_cert(&cert, &key)
        .cert_reload_interval(RELOAD)
        .set("client_cert.expiry_warning", "7d");
    let sc = world.sidecar(config).await;
    let warned = eventually(Duration::from_secs(10), || async {
        sc.log()
            .contains("client certificate expires soon")
            .then_some(())
    })
    .await;
    assert!(warned.is_some(), "{}", sc.log());
    assert_eq!(
        sc.log().matches("client certificate expires soon").count(),
        1,
        "warned once, not every poll"
    );
}

/// An odd file: what the log says about it, and how to put it at a path.
type OddFile = (&'static str, Box<dyn Fn(&Path)>);

/// Replaces whatever is at `path` by a FIFO.
fn fifo_at(path: &Path) {
    let _ = std::fs::remove_file(path);
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo has no other memory effects.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Issue 28.10: a FIFO at the certificate path used to hang the reloader for good (a later
/// valid rotation was never published); `/dev/zero` or a 1 GiB file cost about 1 GB of RSS per
/// poll. Each is now a rejected set, named in the log once, and the last good set keeps serving
/// until a valid rotation arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_files_at_the_certificate_path_are_rejected_without_blocking_or_reading_them() {
    let world = World::new();
    let first = world.client.clone();
    let emu = world.emulator().await;
    let config = world.config(emu.addr().port()).cert_reload_interval(RELOAD);
    let sc = world.sidecar(config).await;
    let client = http_client();
    let rejected = "finhub_sidecar_cert_reloads_total{result=\"rejected\"}";
    let cert = world.client_cert.clone();
    let baseline_rss = sc.peak_rss_kib();

    let stages: [OddFile; 4] = [
        ("a FIFO", Box::new(fifo_at)),
        (
            "larger than",
            Box::new(|p: &Path| {
                let _ = std::fs::remove_file(p);
                // Sparse: costs no disk, but reading it whole would cost 1 GiB of memory.
                let f = std::fs::File::create(p).unwrap();
                f.set_len(1 << 30).unwrap();
            }),
        ),
        (
            "character device",
            Box::new(|p: &Path| {
                let _ = std::fs::remove_file(p);
                std::os::unix::fs::symlink("/dev/zero", p).unwrap();
            }),
        ),
        (
            "No such file",
            Box::new(|p: &Path| {
                let _ = std::fs::remove_file(p);
            }),
        ),
    ];
    for (n, (what, put)) in stages.iter().enumerate() {
        put(&cert);
        let counted = eventually(Duration::from_secs(10), || async {
            (sc.counter(rejected).await >= (n + 1) as f64).then_some(())
        })
        .await;
        assert!(
            counted.is_some(),
            "stage {n} ({what}) rejected by the reloader\n{}",
            sc.log()
        );
        assert!(
            sc.log()
                .lines()
                .any(|l| l.contains(what) && l.contains(cert.to_str().unwrap())),
            "the log names the file and the problem ({what})\n{}",
            sc.log()
        );
        let r = client.get(sc.url("/api/v2/x")).send().await.unwrap();
        assert_eq!(r.status(), 200, "the last good set keeps serving ({what})");
    }
    let peak = sc.peak_rss_kib();
    println!("peak RSS: {baseline_rss} KiB at start, {peak} KiB after the odd files");
    assert!(
        peak < baseline_rss + 64 * 1024,
        "no odd file was read into memory: peak RSS {peak} KiB (start {baseline_rss} KiB)"
    );

    // A valid rotation after all that is published.
    let second = world.another_client_cert();
    std::fs::write(&world.client_key, &second.key_pem).unwrap();
    std::fs::write(&cert, &second.cert_pem).unwrap();
    let published = eventually(Duration::from_secs(10), || async {
        client.get(sc.url("/api/v2/x")).send().await.ok()?;
        let seen = emu.controls().api_requests();
        seen.iter()
            .any(|r| {
                r.client_cert
                    .as_ref()
                    .is_some_and(|c| c.serial_hex == second.serial_hex)
            })
            .then_some(())
    })
    .await;
    assert!(
        published.is_some(),
        "the valid rotation reached FinHub\n{}",
        sc.log()
    );
    assert!(first.serial_hex != second.serial_hex);
}
