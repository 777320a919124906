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

/// A port free now whose cluster bus port (`+ 10000`) is a valid port too.
fn free_cluster_port() -> u16 {
    loop {
        let p = free_port();
        if p < 55000 {
            return p;
        }
    }
}

/// A synchronous connection to `port` on 127.0.0.1.
pub fn redis_conn(port: u16) -> redis::Connection {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap()
}

/// `ROLE`'s first element on `port` (`master`, `slave`), or `None` if it does not answer.
pub fn role(port: u16) -> Option<String> {
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
        .ok()?
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()?;
    let v: Vec<redis::Value> = redis::cmd("ROLE").query(&mut c).ok()?;
    match v.first()? {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

/// Commands from clients a server refused with `READONLY` (from `INFO errorstats`): a write
/// attempted on a replica.
pub fn readonly_errors(port: u16) -> u64 {
    let mut c = redis_conn(port);
    let info: String = redis::cmd("INFO").arg("errorstats").query(&mut c).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("errorstat_READONLY:count="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// A `redis-sentinel` on 127.0.0.1 watching `mymaster`; killed on drop.
pub struct Sentinel {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Sentinel {
    /// A Sentinel monitoring the primary on `primary` as `mymaster` (quorum 2, down after
    /// 1 s, failover timeout 5 s).
    pub async fn start(primary: u16) -> Sentinel {
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let conf = dir.path().join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\nsentinel monitor mymaster 127.0.0.1 {primary} 2\nsentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\nsentinel parallel-syncs mymaster 1\n",
                    dir.path().display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.path().join("sentinel.log")).unwrap();
            let child = Command::new("redis-sentinel")
                .arg(&conf)
                .stdout(Stdio::from(log.try_clone().unwrap()))
                .stderr(Stdio::from(log))
                .spawn()
                .expect("spawn redis-sentinel (apt-get install redis-sentinel)");
            let mut s = Sentinel {
                child: Some(child),
                port,
                dir,
            };
            let up = super::eventually(Duration::from_secs(10), || async {
                let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
                    .ok()?
                    .get_connection_with_timeout(Duration::from_millis(500))
                    .ok()?;
                redis::cmd("PING").query::<String>(&mut c).ok()
            })
            .await;
            if up.is_some() {
                return s;
            }
            s.kill();
        }
        panic!("redis-sentinel did not start");
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sentinel.log")).unwrap_or_default()
    }

    /// `SENTINEL <args...>` on this Sentinel.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let mut c = redis_conn(self.port);
        redis::cmd("SENTINEL").arg(args).query(&mut c)
    }

    /// The port of the primary this Sentinel names now.
    pub fn primary_port(&self) -> Option<u16> {
        let v: Option<(String, String)> = self
            .cmd(&["get-master-addr-by-name", "mymaster"])
            .ok()
            .flatten();
        v.and_then(|(_, p)| p.parse().ok())
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One primary, one replica and three Sentinels on loopback (quorum 2).
pub struct SentinelSet {
    pub primary: Redis,
    pub replica: Redis,
    pub sentinels: Vec<Sentinel>,
}

impl SentinelSet {
    /// Starts the set and waits until every Sentinel knows the replica and the other two
    /// Sentinels (a failover needs both).
    pub async fn start() -> SentinelSet {
        let primary = Redis::start().await;
        let mut replica = Redis::unstarted();
        replica.args = vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            primary.port.to_string(),
        ];
        let replica = Redis::start_with(replica).await;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(Sentinel::start(primary.port).await);
        }
        let set = SentinelSet {
            primary,
            replica,
            sentinels,
        };
        let ready = super::eventually(Duration::from_secs(30), || async {
            for s in &set.sentinels {
                let replicas: Vec<redis::Value> = s.cmd(&["replicas", "mymaster"]).ok()?;
                let others: Vec<redis::Value> = s.cmd(&["sentinels", "mymaster"]).ok()?;
                if replicas.is_empty() || others.len() < 2 {
                    return None;
                }
            }
            let (_, linked) = set.replica_link();
            linked.then_some(())
        })
        .await;
        assert!(
            ready.is_some(),
            "the sentinels did not discover each other and the replica:\n{}",
            set.sentinels[0].log()
        );
        set
    }

    /// `redis+sentinel://…/mymaster` naming the three Sentinels.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis+sentinel://{}/mymaster", hosts.join(","))
    }

    /// (the replica's port, whether its link to its primary is up).
    fn replica_link(&self) -> (u16, bool) {
        let mut c = redis_conn(self.replica.port);
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut c)
            .unwrap_or_default();
        (self.replica.port, info.contains("master_link_status:up"))
    }

    /// Waits until every live Sentinel names `port` as the primary and it answers `ROLE
    /// master`.
    pub async fn wait_primary(&self, port: u16, within: Duration) -> bool {
        super::eventually(within, || async {
            let all = self
                .sentinels
                .iter()
                .all(|s| s.primary_port() == Some(port));
            (all && role(port).as_deref() == Some("master")).then_some(())
        })
        .await
        .is_some()
    }
}

/// A Redis Cluster on loopback: three primaries, each with one replica, made with
/// `redis-cli --cluster create` (cluster node timeout 1 s).
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    pub async fn start() -> Cluster {
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let mut n = Redis::unstarted();
            n.port = free_cluster_port();
            n.args = vec![
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                "nodes.conf".into(),
                "--cluster-node-timeout".into(),
                "1000".into(),
                "--cluster-port".into(),
                free_port().to_string(),
                // A replica that never finished its first sync cannot be promoted.
                "--repl-diskless-sync-delay".into(),
                "0".into(),
            ];
            nodes.push(Redis::start_with(n).await);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("run redis-cli (apt-get install redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Cluster { nodes };
        assert!(
            cluster.wait_ok(Duration::from_secs(30)).await,
            "the cluster did not reach cluster_state:ok"
        );
        let synced = super::eventually(Duration::from_secs(30), || async {
            let mut linked = 0;
            for n in &cluster.nodes {
                let mut c = redis_conn(n.port);
                let info: String = redis::cmd("INFO").arg("replication").query(&mut c).ok()?;
                if info.contains("master_link_status:up") {
                    linked += 1;
                }
            }
            (linked == 3).then_some(())
        })
        .await;
        assert!(synced.is_some(), "the cluster's replicas did not sync");
        cluster
    }

    /// `redis+cluster://` naming every node as a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// Waits until every live node reports `cluster_state:ok`.
    pub async fn wait_ok(&self, within: Duration) -> bool {
        super::eventually(within, || async {
            for n in self.nodes.iter().filter(|n| n.child.is_some()) {
                let mut c = redis::Client::open(n.url())
                    .ok()?
                    .get_connection_with_timeout(Duration::from_millis(500))
                    .ok()?;
                let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut c).ok()?;
                if !info.contains("cluster_state:ok") {
                    return None;
                }
            }
            Some(())
        })
        .await
        .is_some()
    }

    /// The index of the node that serves `key`'s slot as primary now (there must be one).
    pub fn primary_of(&self, key: &str) -> usize {
        self.live_primary_of(key)
            .unwrap_or_else(|slot| panic!("no primary serves slot {slot}"))
    }

    /// The index of the node that serves `key`'s slot as primary now, or `Err(slot)` while no
    /// live node does (between a primary's failure and its replica's promotion): for polling
    /// through a failover.
    pub fn live_primary_of(&self, key: &str) -> Result<usize, u16> {
        let mut c = redis_conn(self.nodes.iter().find(|n| n.child.is_some()).unwrap().port);
        // A slot whose primary failed has no live primary until its replica is promoted.
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut c)
            .unwrap();
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut c).unwrap();
        for range in slots {
            let redis::Value::Array(r) = range else {
                continue;
            };
            let (redis::Value::Int(lo), redis::Value::Int(hi)) = (&r[0], &r[1]) else {
                continue;
            };
            if (*lo..=*hi).contains(&i64::from(slot)) {
                let redis::Value::Array(node) = &r[2] else {
                    break;
                };
                let redis::Value::Int(port) = node[1] else {
                    break;
                };
                return Ok(self
                    .nodes
                    .iter()
                    .position(|n| i64::from(n.port) == port)
                    .unwrap());
            }
        }
        Err(slot)
    }
}

/// A raw TCP server speaking just enough RESP: each command (an array of bulk strings) is
/// answered with `answer(args)`'s bytes, verbatim. For hostile Sentinels and cluster nodes.
pub struct FakeRedis {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl FakeRedis {
    pub async fn start(
        answer: impl Fn(&[String], u16) -> Vec<u8> + Send + Sync + 'static,
    ) -> FakeRedis {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let answer = std::sync::Arc::new(answer);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some((args, used)) = parse_command(&buf) {
                            buf.drain(..used);
                            if s.write_all(&answer(&args, port)).await.is_err() {
                                return;
                            }
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        FakeRedis { port, task }
    }
}

impl Drop for FakeRedis {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One RESP command at the start of `buf`: its arguments and the bytes it used.
fn parse_command(buf: &[u8]) -> Option<(Vec<String>, usize)> {
    fn line(buf: &[u8], at: usize) -> Option<(&str, usize)> {
        let end = buf[at..].windows(2).position(|w| w == b"\r\n")? + at;
        Some((std::str::from_utf8(&buf[at..end]).ok()?, end + 2))
    }
    let (head, mut at) = line(buf, 0)?;
    let n: usize = head.strip_prefix('*')?.parse().ok()?;
    let mut args = Vec::new();
    for _ in 0..n {
        let (len, next) = line(buf, at)?;
        let len: usize = len.strip_prefix('$')?.parse().ok()?;
        if buf.len() < next + len + 2 {
            return None;
        }
        args.push(String::from_utf8_lossy(&buf[next..next + len]).into_owned());
        at = next + len + 2;
    }
    Some((args, at))
}
