//! A real HTTP CONNECT proxy for the egress tests: Debian's `tinyproxy`, started by the test in
//! the foreground on a free loopback port with its own config and log file, killed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::eventually;

/// A running tinyproxy.
pub struct Tinyproxy {
    pub addr: SocketAddr,
    pub log_file: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
}

/// What the proxy allows.
pub struct TinyproxyOpts<'a> {
    /// The only port CONNECT may reach (the emulator's).
    pub connect_port: u16,
    /// `BasicAuth user password`, when set.
    pub basic_auth: Option<(&'a str, &'a str)>,
}

impl Tinyproxy {
    /// Starts tinyproxy with a config in `dir` on a port the OS picked, and waits until it
    /// accepts connections.
    pub async fn start(dir: &Path, opts: &TinyproxyOpts<'_>) -> Tinyproxy {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut p = Tinyproxy {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log_file: dir.join(format!("tinyproxy-{port}.log")),
            conf: dir.join(format!("tinyproxy-{port}.conf")),
            child: None,
        };
        p.write_conf(opts);
        p.spawn().await;
        p
    }

    fn write_conf(&self, opts: &TinyproxyOpts<'_>) {
        let mut text = format!(
            "Port {}\nListen 127.0.0.1\nTimeout 60\nMaxClients 100\nLogFile \"{}\"\n\
             LogLevel Connect\nAllow 127.0.0.1\nConnectPort {}\nDisableViaHeader Yes\n",
            self.addr.port(),
            self.log_file.display(),
            opts.connect_port
        );
        if let Some((user, password)) = opts.basic_auth {
            text.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        std::fs::write(&self.conf, text).unwrap();
    }

    /// Restarts it on the same port with new settings.
    pub async fn reconfigure(&mut self, opts: &TinyproxyOpts<'_>) {
        self.stop();
        self.write_conf(opts);
        self.spawn().await;
    }

    async fn spawn(&mut self) {
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy is installed (apt-get install tinyproxy; .ci/run does)");
        self.child = Some(child);
        let addr = self.addr;
        let up = eventually(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
        })
        .await;
        assert!(up.is_some(), "tinyproxy did not start:\n{}", self.log());
    }

    /// Kills the proxy (every tunnel through it breaks).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops and starts it again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// The targets of every request the proxy logged (`CONNECT host:port`, `GET http://…`).
    pub fn requests(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| l.split_once("): ").filter(|_| l.contains("Request (")))
            .map(|(_, r)| r.trim().to_string())
            .collect()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        self.stop();
    }
}
