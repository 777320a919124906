//! The world around the sidecar: a throwaway CA with server and client certificates, the
//! secret files, the FinHub emulator's config, the sidecar's config, and TCP fixtures (a
//! switchable upstream, a foreign host that counts what reaches it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use finhub_testkit::emulator::{Emulator, EmulatorConfig, MtlsMode};
use finhub_testkit::pki::{CertPair, ClientCertOpts, Pki};

use super::{init_crypto, path, SidecarConfig, SidecarProcess, STARTUP, TENANT};

/// Sidecars started by this test binary (names their config and log files).
static SIDECARS: AtomicUsize = AtomicUsize::new(0);

/// The subject of the world's client certificates.
fn client_opts() -> ClientCertOpts {
    ClientCertOpts {
        common_name: "test-app".into(),
        organization: "Test Org".into(),
        ..ClientCertOpts::default()
    }
}

/// Certificates and secret files for one test world, in a temporary folder.
pub struct World {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub server: CertPair,
    pub client: CertPair,
    pub ca_file: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Extra environment of the sidecars this world starts (e.g. `SOFTHSM2_CONF`).
    pub sidecar_env: Vec<(String, String)>,
}

impl World {
    pub fn new() -> World {
        init_crypto();
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new("Test FinHub CA").expect("ca");
        let server = pki
            .server_cert(&["localhost"], &["127.0.0.1".parse().unwrap()])
            .expect("server cert");
        let client = pki.client_cert(&client_opts()).expect("client cert");
        let (client_cert, client_key) = client.write_to(dir.path(), "client").expect("write");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, pki.ca_pem()).unwrap();
        std::fs::write(dir.path().join("password"), "demo-password").unwrap();
        std::fs::write(dir.path().join("customer_secret"), "demo-secret").unwrap();
        World {
            dir,
            pki,
            server,
            client,
            ca_file,
            client_cert,
            client_key,
            sidecar_env: Vec::new(),
        }
    }

    /// Another client certificate from this world's CA with the same subject as `client`.
    pub fn another_client_cert(&self) -> CertPair {
        self.pki.client_cert(&client_opts()).expect("client cert")
    }

    /// Emulator config: mTLS required against this world's CA, default demo user.
    pub fn emulator_config(&self, server: &CertPair) -> EmulatorConfig {
        let mut cfg = EmulatorConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            server.cert_pem.clone(),
            server.key_pem.clone(),
        );
        cfg.client_ca_pem = Some(self.pki.ca_pem());
        cfg.mtls = MtlsMode::Required;
        cfg
    }

    pub async fn emulator(&self) -> Emulator {
        Emulator::start(self.emulator_config(&self.server))
            .await
            .expect("emulator starts")
    }

    /// The sidecar config every test starts from: FinHub at `https://localhost:<upstream_port>`
    /// (also reachable as `api.finhub.cloud` in absolute form), this world's certificates, one
    /// tenant, sandbox, JSON logs at debug for the sidecar.
    pub fn config(&self, upstream_port: u16) -> SidecarConfig {
        let mut tenant = toml::Table::new();
        for (k, v) in [
            ("id", TENANT),
            ("username", "demo"),
            ("password_file", "password"),
            ("customer_id", "demo-customer"),
            ("customer_secret_file", "customer_secret"),
        ] {
            tenant.insert(k.into(), v.into());
        }
        SidecarConfig::default()
            .set("listener.address", "127.0.0.1:0")
            .set("listener.threads", 1)
            .set("admin.address", "127.0.0.1:0")
            .set(
                "upstream.base_url",
                format!("https://localhost:{upstream_port}"),
            )
            .set("upstream.ca_file", path(&self.ca_file))
            .set("upstream.extra_hosts", vec!["api.finhub.cloud"])
            .set("upstream.connect_timeout", "2s")
            .set("upstream.read_timeout", "2s")
            .client_cert(&self.client_cert, &self.client_key)
            .environment("sandbox")
            .set("auth.request_timeout", "2s")
            .set("headers.origin_ip", "192.0.2.10")
            .push("tenants", tenant)
            .set("log.format", "json")
            .log_level("info,finhub_sidecar=debug")
    }

    /// Starts the sidecar with `config`; returns once it has bound its listeners (their
    /// addresses known), without waiting for readiness.
    pub async fn spawn_sidecar(&self, config: SidecarConfig) -> SidecarProcess {
        let n = SIDECARS.fetch_add(1, Ordering::SeqCst);
        let file = self.dir.path().join(format!("proxy-{n}.toml"));
        config.write_to(&file);
        let log = self.dir.path().join(format!("sidecar-{n}.log"));
        SidecarProcess::spawn_with_env(&file, log, STARTUP, &self.sidecar_env)
            .await
            .unwrap_or_else(|e| panic!("sidecar did not start: {e}"))
    }

    /// Starts the sidecar with `config` and waits until `/ready` is 200.
    pub async fn sidecar(&self, config: SidecarConfig) -> SidecarProcess {
        let sc = self.spawn_sidecar(config).await;
        if let Err(e) = sc.wait_ready(STARTUP).await {
            panic!("sidecar did not become ready: {e}\nlog:\n{}", sc.log());
        }
        sc
    }

    /// A world, its emulator and a ready sidecar whose default config `adjust` changed.
    pub async fn start(
        adjust: impl FnOnce(SidecarConfig) -> SidecarConfig,
    ) -> (World, Emulator, SidecarProcess) {
        let world = World::new();
        let emu = world.emulator().await;
        let sc = world.sidecar(adjust(world.config(emu.addr().port()))).await;
        (world, emu, sc)
    }
}

/// A TCP forwarder whose target can be switched at run time (for steering the sidecar's new
/// connections to a different upstream after it has logged in).
pub struct Switch {
    pub addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    pub accepted: Arc<AtomicU64>,
}

impl Switch {
    pub async fn start(target: SocketAddr) -> Switch {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let accepted = Arc::new(AtomicU64::new(0));
        let (t, a) = (target.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let to = *t.lock().unwrap();
                tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Switch {
            addr,
            target,
            accepted,
        }
    }

    pub fn point_to(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }
}

/// A plain TCP server that counts every connection and every byte it receives (the "foreign
/// host" an open proxy would forward to).
pub struct Tripwire {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicU64>,
    pub bytes: Arc<AtomicU64>,
}

impl Tripwire {
    pub async fn start() -> Tripwire {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (c, b) = (connections.clone(), bytes.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let b = b.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        b.fetch_add(n as u64, Ordering::SeqCst);
                    }
                });
            }
        });
        Tripwire {
            addr,
            connections,
            bytes,
        }
    }
}
