//! Making one connection: to the server, to the primary the Sentinels name (checked with
//! `ROLE`), or to the cluster; and reading Sentinel's answers and announcements.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, Pipeline, RedisError,
    RedisFuture, RedisResult, TlsCertificates, Value,
};

use crate::config::{RedisTopology, SentinelTopology};
use crate::secret::SecretSource;

/// Tries of one cluster call (redirections and retries included) before it fails.
pub const CLUSTER_RETRIES: u32 = 3;

/// A connection handed to [`super::Pool::call`]: one server's multiplexed connection (single or
/// Sentinel mode) or the cluster client. Cheap to clone; use it as any
/// `redis::aio::ConnectionLike`.
#[derive(Clone)]
pub enum Conn {
    /// One server (the resolved primary with Sentinel).
    Single(MultiplexedConnection),
    /// Redis Cluster: routes each command by its keys' slot, follows `MOVED` and `ASK`.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// How a pool reaches Redis; makes each new connection.
pub(super) struct Connector {
    /// One server, Sentinel or Cluster.
    pub(super) topology: RedisTopology,
    /// The Sentinel that answered last (asked first next time).
    pub(super) sentinel_next: AtomicUsize,
    /// Address, TLS, database and user name; the template of every node's connection.
    pub(super) connection: ConnectionInfo,
    /// Password, re-read at each connect.
    pub(super) password: Option<SecretSource>,
    /// PEM CA bundle for `rediss://`.
    pub(super) ca_pem: Option<Vec<u8>>,
    /// Longest a connect (and a health check) may take.
    pub(super) connect_timeout: Duration,
    /// Longest one call may take.
    pub(super) response_timeout: Duration,
    /// Both timeouts, for the crate's connections.
    pub(super) options: AsyncConnectionConfig,
}

/// A new connection and what it reaches.
pub(super) struct Connected {
    /// The connection.
    pub(super) conn: Conn,
    /// `host:port` of the server (the resolved primary with Sentinel; `cluster` with Cluster).
    pub(super) primary: String,
    /// Its `ROLE` as checked at connect (`None` when it could not be asked).
    pub(super) role: Option<String>,
}

/// Why a connect failed, for a log line: never a password, never wire bytes.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    #[error("{}", describe(.0))]
    Redis(RedisError),
    #[error("{0}")]
    Sentinel(String),
}

fn describe(e: &RedisError) -> String {
    if e.kind() == redis::ErrorKind::Parse {
        return "answered bytes that are not the Redis protocol".into();
    }
    format!(
        "{:?}{}",
        e.kind(),
        e.code().map(|c| format!(" ({c})")).unwrap_or_default()
    )
}

impl From<RedisError> for ConnectError {
    fn from(e: RedisError) -> Self {
        ConnectError::Redis(e)
    }
}

impl Connector {
    /// A fresh connection, with the password as it is now: to the server, to the primary the
    /// Sentinels name (checked with `ROLE`), or to the cluster.
    pub(super) async fn connect(&self) -> Result<Connected, ConnectError> {
        match &self.topology {
            RedisTopology::Single => {
                let mut conn = self.connect_node(self.connection.clone()).await?;
                let primary = address_of(self.connection.addr());
                // Shown on /status only: an ACL may forbid ROLE.
                let role = tokio::time::timeout(
                    self.connect_timeout,
                    redis::cmd("ROLE").query_async::<Value>(&mut conn),
                )
                .await
                .ok()
                .and_then(Result::ok)
                .and_then(|v| role_of(&v));
                Ok(Connected {
                    conn: Conn::Single(conn),
                    primary,
                    role,
                })
            }
            RedisTopology::Sentinel(s) => self.connect_via_sentinels(s).await,
            RedisTopology::Cluster { seeds } => self.connect_cluster(seeds).await,
        }
    }

    /// Asks each Sentinel in turn (the last one that answered first) for the primary, connects
    /// to it and checks its role; the first primary confirmed wins.
    async fn connect_via_sentinels(&self, s: &SentinelTopology) -> Result<Connected, ConnectError> {
        let n = s.sentinels.len();
        let first = self.sentinel_next.load(Ordering::Relaxed);
        let mut why = Vec::new();
        for i in 0..n {
            let index = (first + i) % n;
            let sentinel = &s.sentinels[index];
            let name = format!("{}:{}", sentinel.0, sentinel.1);
            let (host, port) = match self.ask_sentinel(sentinel, s).await {
                Ok(addr) => addr,
                Err(e) => {
                    why.push(format!("sentinel {name}: {e}"));
                    continue;
                }
            };
            let primary = format!("{host}:{port}");
            let info = self.connection.clone().set_addr(self.node_addr(host, port));
            let mut conn = match self.connect_node(info).await {
                Ok(c) => c,
                Err(e) => {
                    why.push(format!(
                        "primary {primary} (named by {name}): {}",
                        describe(&e)
                    ));
                    continue;
                }
            };
            let role = tokio::time::timeout(
                self.connect_timeout,
                redis::cmd("ROLE").query_async::<Value>(&mut conn),
            )
            .await;
            match role {
                Ok(Ok(v)) if role_of(&v).as_deref() == Some("master") => {
                    self.sentinel_next.store(index, Ordering::Relaxed);
                    return Ok(Connected {
                        conn: Conn::Single(conn),
                        primary,
                        role: Some("master".into()),
                    });
                }
                Ok(Ok(v)) => why.push(format!(
                    "{primary} (named by {name}) is not a primary (ROLE {}); not used",
                    role_of(&v).unwrap_or_else(|| "unreadable".into())
                )),
                Ok(Err(e)) => why.push(format!("{primary}: ROLE failed: {}", describe(&e))),
                Err(_) => why.push(format!("{primary}: ROLE timed out")),
            }
        }
        Err(ConnectError::Sentinel(format!(
            "no primary for master {:?} through {n} sentinel(s): {}",
            s.master_name,
            why.join("; ")
        )))
    }

    /// `SENTINEL get-master-addr-by-name` on one Sentinel, bounded by the connect timeout.
    async fn ask_sentinel(
        &self,
        sentinel: &(String, u16),
        s: &SentinelTopology,
    ) -> Result<(String, u16), String> {
        let ask = async {
            let mut conn = self
                .connect_node_with(self.sentinel_info(sentinel, s), false)
                .await
                .map_err(|e| describe(&e))?;
            let v = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&s.master_name)
                .query_async::<Value>(&mut conn)
                .await
                .map_err(|e| describe(&e))?;
            master_addr(&v)
        };
        match tokio::time::timeout(self.connect_timeout, ask).await {
            Ok(r) => r,
            Err(_) => Err("no answer within connect_timeout".into()),
        }
    }

    /// A pub/sub connection to one Sentinel, subscribed to `+switch-master`.
    pub(super) async fn subscribe(
        &self,
        sentinel: &(String, u16),
        s: &SentinelTopology,
    ) -> RedisResult<redis::aio::PubSub> {
        let client = self.client(self.sentinel_info(sentinel, s))?;
        let subscribe = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe("+switch-master").await?;
            Ok(pubsub)
        };
        match tokio::time::timeout(self.connect_timeout, subscribe).await {
            Ok(r) => r,
            Err(_) => Err(timed_out()),
        }
    }

    /// One Sentinel's connection: TLS and CA as the nodes', database 0, no user, the
    /// Sentinels' password as it is now.
    fn sentinel_info(&self, sentinel: &(String, u16), s: &SentinelTopology) -> ConnectionInfo {
        let mut settings = redis::RedisConnectionInfo::default();
        if let Some(p) = &s.password {
            settings = settings.set_password(p.current().expose());
        }
        self.connection
            .clone()
            .set_addr(self.node_addr(sentinel.0.clone(), sentinel.1))
            .set_redis_settings(settings)
    }

    /// `host:port` with the template's TLS.
    fn node_addr(&self, host: String, port: u16) -> ConnectionAddr {
        match self.connection.addr() {
            ConnectionAddr::TcpTls { .. } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: false,
                tls_params: None,
            },
            _ => ConnectionAddr::Tcp(host, port),
        }
    }

    /// The cluster client, from the seeds (each with the template's user and database).
    async fn connect_cluster(&self, seeds: &[(String, u16)]) -> Result<Connected, ConnectError> {
        let nodes: Vec<ConnectionInfo> = seeds
            .iter()
            .map(|(h, p)| {
                self.connection
                    .clone()
                    .set_addr(self.node_addr(h.clone(), *p))
            })
            .collect();
        let mut builder = ClusterClientBuilder::new(nodes)
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.response_timeout)
            // A node answering MOVED in a loop, or a slot without a primary, fails the call
            // after a few tries instead of waiting out the crate's default 16.
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(10)
            .max_retry_wait(100)
            .tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        if let Some(u) = self.connection.redis_settings().username() {
            builder = builder.username(u);
        }
        if let Some(p) = &self.password {
            builder = builder.password(p.current().expose());
        }
        let client = builder.build()?;
        match tokio::time::timeout(self.connect_timeout, client.get_async_connection()).await {
            Ok(Ok(conn)) => Ok(Connected {
                conn: Conn::Cluster(conn),
                primary: "cluster".into(),
                role: Some("cluster".into()),
            }),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(timed_out().into()),
        }
    }

    fn client(&self, info: ConnectionInfo) -> RedisResult<Client> {
        match &self.ca_pem {
            Some(pem) => Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
            None => Client::open(info),
        }
    }

    /// A node's connection with the nodes' password as it is now.
    async fn connect_node(&self, info: ConnectionInfo) -> RedisResult<MultiplexedConnection> {
        self.connect_node_with(info, true).await
    }

    async fn connect_node_with(
        &self,
        mut info: ConnectionInfo,
        node_password: bool,
    ) -> RedisResult<MultiplexedConnection> {
        if let (true, Some(p)) = (node_password, &self.password) {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(p.current().expose());
            info = info.set_redis_settings(settings);
        }
        let client = self.client(info)?;
        match tokio::time::timeout(
            self.connect_timeout,
            client.get_multiplexed_async_connection_with_config(&self.options),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(timed_out()),
        }
    }
}

fn timed_out() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "connect timed out",
    ))
}

/// `host:port` of a configured address (the metric label and `/status`).
fn address_of(addr: &ConnectionAddr) -> String {
    match addr {
        ConnectionAddr::Tcp(h, p)
        | ConnectionAddr::TcpTls {
            host: h, port: p, ..
        } => {
            format!("{h}:{p}")
        }
        ConnectionAddr::Unix(p) => p.display().to_string(),
        _ => "unknown".into(),
    }
}

/// The first element of a `ROLE` answer (`master`, `slave`, `sentinel`), if it is one.
pub(super) fn role_of(v: &Value) -> Option<String> {
    match v {
        Value::Array(items) => match items.first() {
            Some(Value::BulkString(b)) if b.len() <= 16 => {
                std::str::from_utf8(b).ok().map(str::to_string)
            }
            Some(Value::SimpleString(s)) if s.len() <= 16 => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// The primary's address in a `SENTINEL get-master-addr-by-name` answer; a clear reason for
/// anything else (the bytes are not quoted).
fn master_addr(v: &Value) -> Result<(String, u16), String> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok().map(str::to_string),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    match v {
        Value::Nil => Err("knows no master by that name (check the master name in url)".into()),
        Value::Array(items) if items.len() == 2 => {
            let host = text(&items[0]).filter(|h| {
                !h.is_empty()
                    && h.len() <= 255
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-:_".contains(c))
            });
            let port = text(&items[1])
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p > 0);
            match (host, port) {
                (Some(h), Some(p)) => Ok((h, p)),
                _ => Err("answered a malformed address".into()),
            }
        }
        _ => Err("answered something other than an address".into()),
    }
}

/// The new primary `ip:port` in a `+switch-master` message
/// (`<master-name> <old-ip> <old-port> <new-ip> <new-port>`) for `master`; `None` for
/// another master or a malformed message.
pub(super) fn switched_primary(payload: &str, master: &str) -> Option<String> {
    let parts: Vec<&str> = payload.split(' ').collect();
    match parts.as_slice() {
        [name, _, _, ip, port] if *name == master && port.parse::<u16>().is_ok() => {
            Some(format!("{ip}:{port}"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_answers_are_an_address_or_a_clear_reason() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(
            master_addr(&Value::Array(vec![bulk("10.0.0.7"), bulk("6379")])),
            Ok(("10.0.0.7".to_string(), 6379))
        );
        let unknown = master_addr(&Value::Nil).unwrap_err();
        assert!(unknown.contains("knows no master"), "{unknown}");
        for hostile in [
            Value::Array(vec![bulk("10.0.0.7"), bulk("0")]),
            Value::Array(vec![bulk("10.0.0.7"), bulk("99999")]),
            Value::Array(vec![bulk("evil host\r\n"), bulk("6379")]),
            Value::Array(vec![bulk(""), bulk("6379")]),
            Value::Array(vec![bulk("a"), bulk("1"), bulk("2")]),
            Value::Int(7),
            bulk("10.0.0.7:6379"),
        ] {
            let why = master_addr(&hostile).unwrap_err();
            assert!(!why.contains("evil"), "{why}");
        }
        assert_eq!(
            role_of(&Value::Array(vec![bulk("master"), Value::Int(0)])),
            Some("master".into())
        );
        assert_eq!(
            role_of(&Value::Array(vec![bulk("slave")])),
            Some("slave".into())
        );
        assert_eq!(role_of(&bulk("master")), None);
    }

    #[test]
    fn switch_master_names_the_new_primary_of_our_master_only() {
        assert_eq!(
            switched_primary("mymaster 127.0.0.1 7001 127.0.0.1 7002", "mymaster"),
            Some("127.0.0.1:7002".into())
        );
        assert_eq!(
            switched_primary("other 127.0.0.1 7001 127.0.0.1 7002", "mymaster"),
            None
        );
        assert_eq!(switched_primary("mymaster garbage", "mymaster"), None);
        assert_eq!(
            switched_primary("mymaster 1 2 3 notaport", "mymaster"),
            None
        );
    }
}
