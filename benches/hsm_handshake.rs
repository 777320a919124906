//! What keeping the client key in an HSM costs per new TLS connection: full TLS 1.3 mTLS
//! handshakes (TCP connect included, no resumption: Pingora builds a fresh client config per
//! new connection) against the FinHub emulator, with the key in a PEM file vs in a SoftHSM2
//! token (initialised here in a temporary folder, keys generated inside it with pkcs11-tool),
//! for RSA-2048 (RSA-PSS) and P-256; plus one token signature alone. The client config is the
//! sidecar's own (`ClientTls`, the one the auth client uses; the API pool signs through the same
//! `SigningKey`). Run: `cargo bench --bench hsm_handshake` (needs the Debian packages `softhsm2`
//! and `opensc`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use finhub_sidecar::config::{Pkcs11Key, Pkcs11Uri};
use finhub_sidecar::secret::{Secret, SecretSource};
use finhub_sidecar::time::unix_now;
use finhub_sidecar::tls::metrics::TlsMetrics;
use finhub_sidecar::tls::pkcs11::TokenKey;
use finhub_sidecar::tls::{KeyRef, RulePolicy, TlsFiles};
use finhub_testkit::emulator::{Emulator, EmulatorConfig, MtlsMode};
use finhub_testkit::pki::{ClientCertOpts, Pki};
use rustls::pki_types::ServerName;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "1357-pin";

fn run(program: &str, args: &[&str], conf: &Path) {
    let out = Command::new(program)
        .args(args)
        .env("SOFTHSM2_CONF", conf)
        .output()
        .unwrap_or_else(|e| panic!("{program} (apt-get install softhsm2 opensc): {e}"));
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
}

/// Generates `label` in the token; its SPKI DER.
fn keypair(conf: &Path, key_type: &str, label: &str) -> Vec<u8> {
    let base = ["--module", MODULE, "--token-label", "bench"];
    let mut gen = base.to_vec();
    gen.extend([
        "--login",
        "--pin",
        PIN,
        "--keypairgen",
        "--key-type",
        key_type,
        "--label",
        label,
    ]);
    run("pkcs11-tool", &gen, conf);
    let out = conf.with_file_name(format!("{label}.der"));
    let mut read = base.to_vec();
    read.extend(["--read-object", "--type", "pubkey", "--label", label, "-o"]);
    read.push(out.to_str().expect("UTF-8 path"));
    run("pkcs11-tool", &read, conf);
    std::fs::read(out).expect("public key")
}

fn client_config(files: TlsFiles) -> Arc<rustls::ClientConfig> {
    let tls = files.load(unix_now()).expect("TLS set loads");
    let mut cfg = (*tls.rustls).clone();
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

fn hsm_handshake(c: &mut Criterion) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let conf = d.join("softhsm2.conf");
    std::fs::create_dir_all(d.join("tokens")).expect("token dir");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            d.join("tokens").display()
        ),
    )
    .expect("softhsm conf");
    run(
        "softhsm2-util",
        &[
            "--init-token",
            "--free",
            "--label",
            "bench",
            "--pin",
            PIN,
            "--so-pin",
            "so-2468",
        ],
        &conf,
    );
    // The module reads SOFTHSM2_CONF when it is initialised (in the token thread, below);
    // set before any thread of ours exists.
    std::env::set_var("SOFTHSM2_CONF", &conf);

    let pki = Pki::new("bench CA").expect("ca");
    let server = pki.server_cert(&["localhost"], &[]).expect("server cert");
    let ca = write(d, "ca.pem", &pki.ca_pem());
    let mut emu_cfg = EmulatorConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        server.cert_pem.clone(),
        server.key_pem.clone(),
    );
    emu_cfg.client_ca_pem = Some(pki.ca_pem());
    emu_cfg.mtls = MtlsMode::Required;
    let emu = rt.block_on(Emulator::start(emu_cfg)).expect("emulator");
    let addr = emu.addr();

    let opts = ClientCertOpts::default();
    let files = |cert: PathBuf, key: KeyRef| TlsFiles {
        cert_key: Some((cert, key)),
        ca: Some(ca.clone()),
        policy: RulePolicy::Warn,
    };
    let token = |label: &str| {
        let cfg = Pkcs11Key {
            uri_text: format!("pkcs11:token=bench;object={label}"),
            uri: Pkcs11Uri::parse(&format!("pkcs11:token=bench;object={label}")).expect("uri"),
            module: MODULE.into(),
            pin: SecretSource::fixed(Secret::new(PIN)),
            timeout: Duration::from_secs(2),
        };
        let errors = TlsMetrics::register(&prometheus::Registry::new()).token();
        TokenKey::start(&cfg, errors)
    };

    // File keys.
    let rsa_file = {
        use rsa::pkcs1::EncodeRsaPublicKey;
        use rsa::pkcs8::EncodePrivateKey;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("rsa key");
        let pkcs1 = key.to_public_key().to_pkcs1_der().expect("pkcs1");
        let cert = pki
            .client_cert_for_rsa_key(&opts, pkcs1.as_bytes())
            .expect("cert");
        let pem = key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).expect("pem");
        files(
            write(d, "rsa.crt", &cert),
            KeyRef::File(write(d, "rsa.key", &pem)),
        )
    };
    let ec = pki.client_cert(&opts).expect("p256 cert");
    let ec_file = files(
        write(d, "ec.crt", &ec.cert_pem),
        KeyRef::File(write(d, "ec.key", &ec.key_pem)),
    );
    // Token keys.
    let rsa_spki = keypair(&conf, "rsa:2048", "rsa");
    let rsa_token_key = token("rsa");
    let rsa_token = files(
        write(
            d,
            "rsa-hsm.crt",
            &pki.client_cert_for_spki(&opts, &rsa_spki).expect("cert"),
        ),
        KeyRef::Token(rsa_token_key.clone()),
    );
    let ec_spki = keypair(&conf, "EC:prime256v1", "ec");
    let ec_token = files(
        write(
            d,
            "ec-hsm.crt",
            &pki.client_cert_for_spki(&opts, &ec_spki).expect("cert"),
        ),
        KeyRef::Token(token("ec")),
    );

    let mut group = c.benchmark_group("mtls_handshake");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(4));
    for (name, set) in [
        ("rsa2048/file", rsa_file),
        ("rsa2048/pkcs11", rsa_token),
        ("p256/file", ec_file),
        ("p256/pkcs11", ec_token),
    ] {
        let connector = tokio_rustls::TlsConnector::from(client_config(set));
        let sni = ServerName::try_from("localhost").expect("name");
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
                    let tls = connector
                        .connect(sni.clone(), tcp)
                        .await
                        .expect("handshake");
                    drop(tls);
                })
            })
        });
    }
    group.finish();
    c.bench_function("pkcs11_sign/rsa2048_pss_sha256", |b| {
        b.iter(|| {
            rsa_token_key
                .sign(rustls::SignatureScheme::RSA_PSS_SHA256, b"bench")
                .expect("signature")
        })
    });
    drop(emu);
}

criterion_group!(benches, hsm_handshake);
criterion_main!(benches);
