//! Test harness: a real FinHub emulator (HTTPS + mTLS, in-process) and the real sidecar binary
//! (child process) on loopback, with certificates generated at test time. No fixed sleeps:
//! everything waits by polling with a deadline.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use finhub_testkit::emulator::{Emulator, EmulatorConfig, MtlsMode};
use finhub_testkit::pki::{CertPair, ClientCertOpts, Pki};

pub const TENANT: &str = "tenant-demo";
pub const STARTUP: Duration = Duration::from_secs(30);

/// Installs ring as the process-wide rustls provider (reqwest is built without one).
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Polls `f` every 20 ms until it returns `Some` or `within` passes.
pub async fn eventually<T, F, Fut>(within: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Certificates for one test world.
pub struct World {
    pub dir: tempfile::TempDir,
    pub pki: Pki,
    pub server: CertPair,
    pub client: CertPair,
    pub ca_file: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// `auth.environment` of the sidecar config.
    pub environment: &'static str,
    /// Extra lines inside `[upstream]`.
    pub upstream_extra: String,
    /// Extra lines inside `[client_cert]`.
    pub cert_extra: String,
    /// Extra lines inside `[auth]`.
    pub auth_extra: String,
    /// Extra lines inside `[admin]`.
    pub admin_extra: String,
    /// Extra lines inside `[listener]`.
    pub listener_extra: String,
    /// `auth.request_timeout` of the sidecar config.
    pub auth_request_timeout: &'static str,
}

impl World {
    pub fn new() -> World {
        init_crypto();
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new("Test FinHub CA").expect("ca");
        let server = pki
            .server_cert(&["localhost"], &["127.0.0.1".parse().unwrap()])
            .expect("server cert");
        let client = pki
            .client_cert(&ClientCertOpts {
                common_name: "test-app".into(),
                organization: "Test Org".into(),
                ..ClientCertOpts::default()
            })
            .expect("client cert");
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
            environment: "sandbox",
            upstream_extra: String::new(),
            cert_extra: String::new(),
            auth_extra: String::new(),
            admin_extra: String::new(),
            listener_extra: String::new(),
            auth_request_timeout: "2s",
        }
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

    /// A sidecar config (TOML) for `upstream_port`; `extra` is appended verbatim.
    pub fn sidecar_toml(&self, listen: u16, admin: u16, upstream_port: u16, extra: &str) -> String {
        format!(
            r#"
[listener]
address = "127.0.0.1:{listen}"
threads = 1
{listener_extra}

[admin]
address = "127.0.0.1:{admin}"
{admin_extra}

[upstream]
base_url = "https://localhost:{upstream_port}"
ca_file = "{ca}"
extra_hosts = ["api.finhub.cloud"]
connect_timeout = "2s"
read_timeout = "2s"
{upstream_extra}

[client_cert]
cert_file = "{cert}"
key_file = "{key}"
{cert_extra}

[auth]
environment = "{environment}"
request_timeout = "{auth_request_timeout}"
{auth_extra}

[headers]
origin_ip = "192.0.2.10"

[[tenants]]
id = "{TENANT}"
username = "demo"
password_file = "password"
customer_id = "demo-customer"
customer_secret_file = "customer_secret"

[log]
format = "json"
level = "info,finhub_sidecar=debug"
{extra}
"#,
            ca = self.ca_file.display(),
            cert = self.client_cert.display(),
            key = self.client_key.display(),
            upstream_extra = self.upstream_extra,
            cert_extra = self.cert_extra,
            environment = self.environment,
            auth_extra = self.auth_extra,
            admin_extra = self.admin_extra,
            listener_extra = self.listener_extra,
            auth_request_timeout = self.auth_request_timeout,
        )
    }

    /// Starts the sidecar against `upstream_port` without waiting for readiness.
    pub fn spawn_sidecar(&self, upstream_port: u16, extra: &str) -> SidecarProcess {
        let (listen, admin) = (free_port(), free_port());
        let config = self.dir.path().join(format!("proxy-{listen}.toml"));
        std::fs::write(
            &config,
            self.sidecar_toml(listen, admin, upstream_port, extra),
        )
        .unwrap();
        SidecarProcess::spawn(&config, listen, admin, self.dir.path())
    }

    /// Starts the sidecar against `upstream_port` and waits until `/ready` is 200.
    pub async fn sidecar(&self, upstream_port: u16, extra: &str) -> SidecarProcess {
        let mut last_err = String::new();
        for attempt in 0..3 {
            let sc = self.spawn_sidecar(upstream_port, extra);
            match sc.wait_ready(STARTUP).await {
                Ok(()) => return sc,
                Err(e) => last_err = format!("attempt {attempt}: {e}\nlog:\n{}", sc.log()),
            }
        }
        panic!("sidecar did not become ready: {last_err}");
    }
}

/// The sidecar binary running as a child process; killed on drop.
pub struct SidecarProcess {
    pub child: Mutex<Child>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub log_file: PathBuf,
}

impl SidecarProcess {
    pub fn spawn(config: &Path, listen: u16, admin: u16, dir: &Path) -> SidecarProcess {
        let log_file = dir.join(format!("sidecar-{listen}.log"));
        let log = std::fs::File::create(&log_file).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_finhub-sidecar"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn sidecar");
        SidecarProcess {
            child: Mutex::new(child),
            proxy: SocketAddr::from(([127, 0, 0, 1], listen)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            log_file,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id()
    }

    /// Polls `/ready`; fails early if the process exits.
    pub async fn wait_ready(&self, within: Duration) -> Result<(), String> {
        let client = http_client();
        let url = format!("http://{}/ready", self.admin);
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.lock().unwrap().try_wait() {
                return Err(format!("sidecar exited with {status}"));
            }
            if let Ok(r) = client.get(&url).send().await {
                if r.status() == 200 {
                    // The proxy port is opened by Pingora independently; wait for it too.
                    if tokio::net::TcpStream::connect(self.proxy).await.is_ok() {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err("timed out waiting for /ready".into());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// One scrape of `/metrics`.
    pub async fn scrape(&self) -> Option<String> {
        http_client()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    }

    /// The value of one metric series (`name` or `name{labels}` exactly as exposed).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.scrape().await?;
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid we spawned and a valid signal number has no memory effects.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill -{signal} {}", self.pid());
    }

    /// Waits (polling, with a deadline) for the process to exit; its exit code.
    pub async fn exit_code(&self, within: Duration) -> Option<i32> {
        eventually(within, || async {
            self.child
                .lock()
                .unwrap()
                .try_wait()
                .ok()
                .flatten()
                .map(|s| s.code().unwrap_or(-1))
        })
        .await
    }

    /// `GET /status` as JSON.
    pub async fn status(&self) -> Option<serde_json::Value> {
        http_client()
            .get(format!("http://{}/status", self.admin))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    /// A client that uses the sidecar as its HTTP proxy (absolute-form requests).
    pub fn proxy_client(&self) -> reqwest::Client {
        init_crypto();
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(format!("http://{}", self.proxy)).unwrap())
            .build()
            .unwrap()
    }

    /// Peak resident memory of the sidecar process (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        if let Ok(mut c) = self.child.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A plain client (direct, no proxy).
pub fn http_client() -> reqwest::Client {
    init_crypto();
    reqwest::Client::builder().no_proxy().build().unwrap()
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
