//! The real sidecar binary as a child process: start, readiness, `/metrics` scrape, one
//! metric, `/status`, signals, exit code, and its log (audit lines included).
//!
//! Both listeners are configured on port 0; the addresses the OS chose are read from the
//! sidecar's start-up line (`"finhub-sidecar starting"`, fields `listen` and `admin`), so no
//! port is picked before the sidecar binds it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{eventually, http_client, init_crypto};

/// The sidecar binary running as a child process; killed on drop.
pub struct SidecarProcess {
    pub child: Mutex<Child>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub log_file: PathBuf,
}

/// The message of the sidecar's start-up line.
const STARTING: &str = "finhub-sidecar starting";

impl SidecarProcess {
    /// Runs `finhub-sidecar run --config <config>` with its output in `log_file`, and waits
    /// (polling the log, up to `within`) for the start-up line naming the bound addresses.
    /// Fails early, with the log, if the process exits first.
    pub async fn spawn(
        config: &Path,
        log_file: PathBuf,
        within: Duration,
    ) -> Result<SidecarProcess, String> {
        Self::spawn_with_env(config, log_file, within, &[]).await
    }

    /// [`SidecarProcess::spawn`] with extra environment variables (e.g. `SOFTHSM2_CONF`).
    pub async fn spawn_with_env(
        config: &Path,
        log_file: PathBuf,
        within: Duration,
        env: &[(String, String)],
    ) -> Result<SidecarProcess, String> {
        let log = std::fs::File::create(&log_file).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_finhub-sidecar"))
            .arg("run")
            .arg("--config")
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("RUST_LOG")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn sidecar");
        let read_log = || std::fs::read_to_string(&log_file).unwrap_or_default();
        let deadline = Instant::now() + within;
        let (proxy, admin) = loop {
            if let Some(addrs) = read_log().lines().find_map(bound_addresses) {
                break addrs;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "sidecar exited with {status} before starting:\n{}",
                    read_log()
                ));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no `{STARTING}` line within {within:?}:\n{}",
                    read_log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok(SidecarProcess {
            child: Mutex::new(child),
            proxy,
            admin,
            log_file,
        })
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

    /// The status code of `GET /ready` (0 when the admin listener does not answer).
    pub async fn ready_status(&self) -> u16 {
        http_client()
            .get(format!("http://{}/ready", self.admin))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
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

    /// A counter or gauge that may not be exposed yet: its value, 0 when absent.
    pub async fn counter(&self, series: &str) -> f64 {
        self.metric(series).await.unwrap_or(0.0)
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
    pub async fn status(&self) -> Option<Value> {
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

    /// The audit lines written so far, parsed.
    pub fn audit_lines(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter(|l| l.contains("\"kind\":\"audit\""))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (polling) until at least `n` audit lines were written by the background writer.
    pub async fn wait_audit(&self, n: usize) -> Vec<Value> {
        eventually(Duration::from_secs(5), || async {
            let lines = self.audit_lines();
            (lines.len() >= n).then_some(lines)
        })
        .await
        .unwrap_or_else(|| panic!("{n} audit lines expected:\n{}", self.log()))
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

/// The `listen` and `admin` addresses of a JSON start-up line.
fn bound_addresses(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let v: Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields").unwrap_or(&v);
    if fields["message"] != STARTING {
        return None;
    }
    let addr = |name: &str| fields[name].as_str()?.parse().ok();
    Some((addr("listen")?, addr("admin")?))
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        if let Ok(mut c) = self.child.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
