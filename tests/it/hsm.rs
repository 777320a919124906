//! The client key in a real PKCS#11 token (SoftHSM2, initialised by each test in its own
//! folder; keys generated inside it with pkcs11-tool), certificates issued for the token's
//! public keys by the test CA, against the emulator requiring mTLS.

use std::path::PathBuf;
use std::time::Duration;

use crate::common::*;
use finhub_testkit::pki::{cert_identity, ClientCertOpts};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

const RELOAD: &str = "200ms";

fn serial_of(pem: &str) -> String {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    cert_identity(der.as_ref()).unwrap().serial_hex
}

fn opts() -> ClientCertOpts {
    ClientCertOpts {
        common_name: "test-app".into(),
        organization: "Test Org".into(),
        ..ClientCertOpts::default()
    }
}

/// A world whose client key is `mtls` in a fresh token (`key_type` as pkcs11-tool takes it),
/// its certificate written to `hsm-cert.pem` and the PIN to `pin`.
struct HsmWorld {
    world: World,
    hsm: SoftHsm,
    cert_file: PathBuf,
    cert_pem: String,
}

impl HsmWorld {
    fn new(key_type: &str) -> HsmWorld {
        let mut world = World::new();
        let hsm = SoftHsm::new(world.dir.path());
        let spki = hsm.keypair(key_type, "mtls", "01");
        let cert_pem = world.pki.client_cert_for_spki(&opts(), &spki).unwrap();
        let cert_file = world.dir.path().join("hsm-cert.pem");
        std::fs::write(&cert_file, &cert_pem).unwrap();
        std::fs::write(world.dir.path().join("pin"), PIN).unwrap();
        world.sidecar_env.push(hsm.env());
        HsmWorld {
            world,
            hsm,
            cert_file,
            cert_pem,
        }
    }

    fn config(&self, port: u16) -> SidecarConfig {
        self.world
            .config(port)
            .unset("client_cert.key_file")
            .set("client_cert.cert_file", path(&self.cert_file))
            .set(
                "client_cert.key_uri",
                format!("pkcs11:token={TOKEN};object=mtls"),
            )
            .set("client_cert.pkcs11_module", SOFTHSM_MODULE)
            .set("client_cert.pin_file", "pin")
            .cert_reload_interval(RELOAD)
    }

    /// `finhub-sidecar check` on `config`: (success, stdout).
    fn check(&self, config: &SidecarConfig) -> (bool, String) {
        let file = self.world.dir.path().join("check.toml");
        config.write_to(&file);
        let (k, v) = self.hsm.env();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_finhub-sidecar"))
            .args(["check", "--config"])
            .arg(&file)
            .env(k, v)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

async fn get(sc: &SidecarProcess) -> u16 {
    client_with_timeout(Duration::from_secs(10))
        .get(sc.url("/api/v2/accounts"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Login (auth client) and API calls (Pingora) both sign with the token key.
async fn serves_with_a_token_key(key_type: &str) {
    let w = HsmWorld::new(key_type);
    let emu = w.world.emulator().await;
    let (ok, stdout) = w.check(&w.config(emu.addr().port()));
    assert!(ok, "{stdout}");
    assert!(stdout.contains("test signature verified"), "{stdout}");
    // Ready: the login went through with the token key.
    let sc = w.world.sidecar(w.config(emu.addr().port())).await;
    for _ in 0..3 {
        assert_eq!(get(&sc).await, 200, "{}", sc.log());
    }
    let seen = emu.controls().api_requests();
    assert_eq!(
        seen.last()
            .unwrap()
            .client_cert
            .as_ref()
            .unwrap()
            .serial_hex,
        serial_of(&w.cert_pem)
    );
    assert!(!sc.log().contains(PIN));
    assert_eq!(
        sc.counter("finhub_sidecar_pkcs11_errors_total{kind=\"error\"}")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rsa_2048_key_in_the_token_serves_login_and_api() {
    serves_with_a_token_key("rsa:2048").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p256_key_in_the_token_serves_login_and_api() {
    serves_with_a_token_key("EC:prime256v1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_for_the_token_key_is_used_and_one_for_another_key_is_rejected() {
    let w = HsmWorld::new("rsa:2048");
    let emu = w.world.emulator().await;
    let sc = w.world.sidecar(w.config(emu.addr().port())).await;
    assert_eq!(get(&sc).await, 200);

    // Same key, new certificate: new connections present it.
    let spki = std::fs::read(w.hsm.conf.with_file_name("mtls.spki.der")).unwrap();
    let rotated = w.world.pki.client_cert_for_spki(&opts(), &spki).unwrap();
    std::fs::write(&w.cert_file, &rotated).unwrap();
    let serial = serial_of(&rotated);
    let picked = eventually(Duration::from_secs(10), || async {
        assert_eq!(get(&sc).await, 200);
        let seen = emu.controls().api_requests();
        (seen.last()?.client_cert.as_ref()?.serial_hex == serial).then_some(())
    })
    .await;
    assert!(
        picked.is_some(),
        "rotated certificate not used:\n{}",
        sc.log()
    );

    // A certificate for another key of the same token: rejected, the last good one serves.
    let other_spki = w.hsm.keypair("rsa:2048", "other", "02");
    let foreign = w
        .world
        .pki
        .client_cert_for_spki(&opts(), &other_spki)
        .unwrap();
    std::fs::write(&w.cert_file, &foreign).unwrap();
    let rejected = eventually(Duration::from_secs(10), || async {
        let n = sc
            .counter("finhub_sidecar_cert_reloads_total{result=\"rejected\"}")
            .await;
        (n >= 1.0).then_some(())
    })
    .await;
    assert!(rejected.is_some(), "{}", sc.log());
    assert!(sc.log().contains("not the token's key"), "{}", sc.log());
    // New connections (a new app connection each, no pooled reuse guaranteed) keep the
    // rotated certificate.
    for _ in 0..3 {
        assert_eq!(get(&sc).await, 200);
    }
    let seen = emu.controls().api_requests();
    assert_eq!(
        seen.last()
            .unwrap()
            .client_cert
            .as_ref()
            .unwrap()
            .serial_hex,
        serial
    );
    assert_eq!(sc.ready_status().await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_is_a_clear_check_error_that_never_shows_the_pin() {
    let w = HsmWorld::new("EC:prime256v1");
    std::fs::write(w.world.dir.path().join("pin"), "0000-wrong").unwrap();
    let (ok, stdout) = w.check(&w.config(9));
    assert!(!ok, "{stdout}");
    assert!(stdout.contains("client_cert.pin_file"), "{stdout}");
    assert!(stdout.contains("refused the PIN"), "{stdout}");
    assert!(!stdout.contains("0000-wrong"), "{stdout}");

    // A key URI naming no object in the token names key_uri.
    std::fs::write(w.world.dir.path().join("pin"), PIN).unwrap();
    let config = w.config(9).set(
        "client_cert.key_uri",
        format!("pkcs11:token={TOKEN};object=missing"),
    );
    let (ok, stdout) = w.check(&config);
    assert!(!ok, "{stdout}");
    assert!(stdout.contains("client_cert.key_uri"), "{stdout}");
    assert!(stdout.contains("no private key"), "{stdout}");

    // A certificate that is not for the token's key names cert_file.
    std::fs::write(&w.cert_file, &w.world.client.cert_pem).unwrap();
    let (ok, stdout) = w.check(&w.config(9));
    assert!(!ok, "{stdout}");
    assert!(stdout.contains("client_cert.cert_file"), "{stdout}");
}

/// A PKCS#11 module that forwards to SoftHSM2 but blocks in `C_Sign` and `C_GetSessionInfo`
/// while the file named by `PKCS11_HANG_FILE` exists: an HSM that stops answering, and comes
/// back.
const HANGING_MODULE_C: &str = r#"
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
typedef unsigned long CK_RV;
typedef unsigned long CK_ULONG;
typedef struct { unsigned char major, minor; } CK_VERSION;
/* CK_FUNCTION_LIST of PKCS#11 2.40: the version, then 68 function pointers in spec order. */
typedef struct { CK_VERSION version; void *f[68]; } LIST;
enum { GET_SESSION_INFO = 15, SIGN = 43 };
static LIST wrapped;
static LIST *real;
typedef CK_RV (*get_list_fn)(LIST **);
typedef CK_RV (*session_info_fn)(CK_ULONG, void *);
typedef CK_RV (*sign_fn)(CK_ULONG, unsigned char *, CK_ULONG, unsigned char *, CK_ULONG *);
static void wait_while_hung(void) {
  const char *f = getenv("PKCS11_HANG_FILE");
  while (f && access(f, F_OK) == 0) usleep(10000);
}
static CK_RV session_info(CK_ULONG s, void *i) {
  wait_while_hung();
  return ((session_info_fn) real->f[GET_SESSION_INFO])(s, i);
}
static CK_RV sign(CK_ULONG s, unsigned char *d, CK_ULONG n, unsigned char *sig, CK_ULONG *len) {
  wait_while_hung();
  return ((sign_fn) real->f[SIGN])(s, d, n, sig, len);
}
CK_RV C_GetFunctionList(LIST **out) {
  void *h = dlopen(getenv("PKCS11_REAL_MODULE"), RTLD_NOW | RTLD_LOCAL);
  if (!h) return 5;
  get_list_fn g = (get_list_fn) dlsym(h, "C_GetFunctionList");
  if (!g || g(&real) != 0) return 5;
  memcpy(&wrapped, real, sizeof wrapped);
  wrapped.f[GET_SESSION_INFO] = (void *) session_info;
  wrapped.f[SIGN] = (void *) sign;
  *out = &wrapped;
  return 0;
}
"#;

/// A world whose token is reached through the hanging module: (world, module, hang file).
fn hanging_world() -> (HsmWorld, PathBuf, PathBuf) {
    let mut w = HsmWorld::new("EC:prime256v1");
    let dir = w.world.dir.path().to_path_buf();
    let source = dir.join("hanging.c");
    let module = dir.join("libhanging-pkcs11.so");
    std::fs::write(&source, HANGING_MODULE_C).unwrap();
    let cc = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&module)
        .arg(&source)
        .arg("-ldl")
        .output()
        .expect("a C compiler (build-essential; .ci/run installs it)");
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let hang = dir.join("hang");
    w.world
        .sidecar_env
        .push(("PKCS11_HANG_FILE".into(), path(&hang)));
    w.world
        .sidecar_env
        .push(("PKCS11_REAL_MODULE".into(), SOFTHSM_MODULE.into()));
    (w, module, hang)
}

/// `GET /live`'s status.
async fn live_status(sc: &SidecarProcess) -> u16 {
    http_client()
        .get(format!("http://{}/live", sc.admin))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_stops_answering_is_a_readiness_reason_and_a_metric_not_a_crash() {
    let (w, module, hang) = hanging_world();
    let emu = w.world.emulator().await;
    let config = w
        .config(emu.addr().port())
        .set("client_cert.pkcs11_module", path(&module))
        .set("client_cert.pkcs11_timeout", "300ms");
    let sc = w.world.sidecar(config).await;
    assert_eq!(get(&sc).await, 200);
    assert_eq!(live_status(&sc).await, 200);

    std::fs::write(&hang, "").unwrap();
    let reason = eventually(Duration::from_secs(10), || async {
        let r = http_client()
            .get(format!("http://{}/ready", sc.admin))
            .send()
            .await
            .ok()?;
        (r.status() == 503).then_some(())?;
        r.text().await.ok()
    })
    .await;
    let reason = reason.unwrap_or_else(|| panic!("never unready:\n{}", sc.log()));
    assert!(reason.contains("client key token unavailable"), "{reason}");
    assert!(reason.contains("did not answer within 300ms"), "{reason}");
    assert!(
        sc.counter("finhub_sidecar_pkcs11_errors_total{kind=\"timeout\"}")
            .await
            >= 1.0
    );
    assert!(
        sc.child.lock().unwrap().try_wait().unwrap().is_none(),
        "the sidecar is still running"
    );
    // A call that never returns (here: the probe, held for longer than 10 × 300 ms) fails
    // liveness, so that Kubernetes restarts the pod.
    let unlive = eventually(Duration::from_secs(15), || async {
        (live_status(&sc).await == 503).then_some(())
    })
    .await;
    assert!(unlive.is_some(), "{}", sc.log());

    // The token answers again: live and ready again, requests served.
    std::fs::remove_file(&hang).unwrap();
    let back = eventually(Duration::from_secs(10), || async {
        (sc.ready_status().await == 200 && live_status(&sc).await == 200).then_some(())
    })
    .await;
    assert!(back.is_some(), "{}", sc.log());
    assert_eq!(get(&sc).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connections_keep_being_served_while_handshakes_wait_for_a_hung_token() {
    let (w, module, hang) = hanging_world();
    let emu = w.world.emulator().await;
    // Handshakes wait up to 30 s for the token, on a 2-thread proxy.
    let config = w
        .config(emu.addr().port())
        .set("listener.threads", 2)
        .set("client_cert.pkcs11_module", path(&module))
        .set("client_cert.pkcs11_timeout", "30s")
        .cert_reload_interval("60s");
    let sc = w.world.sidecar(config).await;
    // One pooled connection to FinHub.
    assert_eq!(get(&sc).await, 200);

    std::fs::write(&hang, "").unwrap();
    // Slow answers, so that concurrent requests cannot share the pooled connection: all but
    // one open new connections, whose handshakes wait for the hung token.
    emu.controls().set_delay(Duration::from_millis(500));
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let url = sc.url("/api/v2/accounts");
        waiting.push(tokio::spawn(async move {
            client_with_timeout(Duration::from_secs(60))
                .get(url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }));
    }
    // Requests keep being answered over the pooled connection meanwhile, long before the
    // handshakes' 30 s are up.
    let served = eventually(Duration::from_secs(10), || async {
        let r = client_with_timeout(Duration::from_secs(3))
            .get(sc.url("/api/v2/accounts"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    let log = sc.log();
    std::fs::remove_file(&hang).unwrap();
    emu.controls().set_delay(Duration::ZERO);
    assert!(
        served.is_some(),
        "no request served during the hang:\n{log}"
    );
    for t in waiting {
        let _ = t.await;
    }
    assert_eq!(get(&sc).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_at_run_keeps_the_sidecar_up_and_unready_until_the_pin_file_is_fixed() {
    let w = HsmWorld::new("EC:prime256v1");
    let emu = w.world.emulator().await;
    std::fs::write(w.world.dir.path().join("pin"), "0000-wrong").unwrap();
    // Exiting would have Kubernetes restart it into another attempt, and tokens lock the user
    // after a few: it stays up, unready, naming the file to fix.
    let sc = w.world.spawn_sidecar(w.config(emu.addr().port())).await;
    let reason = eventually(Duration::from_secs(15), || async {
        let r = http_client()
            .get(format!("http://{}/ready", sc.admin))
            .send()
            .await
            .ok()?;
        (r.status() == 503).then_some(())?;
        let body = r.text().await.ok()?;
        body.contains("client_cert.pin_file").then_some(body)
    })
    .await;
    let reason = reason.unwrap_or_else(|| panic!("no PIN reason:\n{}", sc.log()));
    assert!(reason.contains("refused the PIN"), "{reason}");
    assert!(
        sc.child.lock().unwrap().try_wait().unwrap().is_none(),
        "the sidecar exited:\n{}",
        sc.log()
    );
    // No login with an empty client identity reached FinHub.
    assert_eq!(emu.controls().stats().logins, 0);
    // The PIN file is fixed: the next reload logs in to the token, the sidecar becomes ready.
    std::fs::write(w.world.dir.path().join("pin"), PIN).unwrap();
    sc.wait_ready(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", sc.log()));
    assert_eq!(get(&sc).await, 200);
    let log = sc.log();
    assert!(!log.contains("0000-wrong") && !log.contains(PIN), "{log}");
}
