//! A real `redis-server` for tests: started on a free loopback port (no persistence), killed
//! on drop; restartable on the same port (empty) and stoppable with signals.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port that was free a moment ago on 127.0.0.1 (`redis-server` cannot be told to pick one
/// and report it: `--port 0` turns TCP off).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// A `redis-server` child process on 127.0.0.1; killed on drop.
pub struct Redis {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// Extra `redis-server` arguments (TLS, requirepass).
    pub args: Vec<String>,
    /// Serves TLS only (`--tls-port`): readiness is then an open port, not a plain PING.
    pub tls: bool,
}

impl Redis {
    /// Starts Redis on a free port (another one if that port was taken meanwhile).
    pub async fn start() -> Redis {
        Redis::start_with(Redis::unstarted()).await
    }

    /// A Redis that is not running yet (on a port free now).
    pub fn unstarted() -> Redis {
        Redis {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            args: Vec::new(),
            tls: false,
        }
    }

    pub async fn start_with(mut redis: Redis) -> Redis {
        for _ in 0..5 {
            redis.spawn();
            if redis.wait_up(Duration::from_secs(10)).await {
                return redis;
            }
            redis.kill();
            redis.port = free_port();
        }
        panic!(
            "redis-server did not start (is the Debian package redis-server installed?):\n{}",
            redis.log()
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("redis-{}.log", self.port))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn spawn(&mut self) {
        let log = std::fs::File::create(self.log_path()).unwrap();
        let port = self.port.to_string();
        let ports = if self.tls {
            ["--port", "0", "--tls-port", &port]
        } else {
            ["--port", &port, "--tls-port", "0"]
        };
        let child = Command::new("redis-server")
            .args(ports)
            .args(&self.args)
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--protected-mode", "no"])
            .args(["--loglevel", "warning"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn redis-server (apt-get install redis-server)");
        self.child = Some(child);
    }

    /// Polls `PING` until `+PONG` (or the deadline, or the process exits).
    pub async fn wait_up(&mut self, within: Duration) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let deadline = Instant::now() + within;
        loop {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                return false;
            }
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
                if self.tls {
                    return true;
                }
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").await.is_ok()
                    && s.read_exact(&mut buf).await.is_ok()
                    && &buf == b"+PONG\r\n"
                {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts Redis again on the same port (empty: no persistence).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        assert!(
            self.wait_up(Duration::from_secs(10)).await,
            "redis-server did not restart on port {}:\n{}",
            self.port,
            self.log()
        );
    }

    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.child.as_ref().expect("running").id() as libc::pid_t;
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A stopped process must be continued to die promptly.
            // SAFETY: our own child process.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGCONT) };
        }
        self.kill();
    }
}
