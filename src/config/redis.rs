//! `[policy.rate_limit.redis]`: the shared rate-limit backend (address, credentials, timeouts,
//! and what decides while Redis cannot).

use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use redis::ConnectionInfo;
use serde::Deserialize;

use super::convert::{pem_has_certificates, secs, Convert};
use super::redis_url::parse_multi_host;
use crate::secret::SecretSource;

/// How the Redis nodes are found, from the `url` scheme.
#[derive(Debug, Clone)]
pub enum RedisTopology {
    /// `redis://` or `rediss://`: one server, or a primary behind a stable address.
    Single,
    /// `redis+sentinel://` or `rediss+sentinel://`: the primary is found through Sentinels and
    /// followed on failover.
    Sentinel(SentinelTopology),
    /// `redis+cluster://`: a Redis Cluster discovered from seed nodes.
    Cluster {
        /// Seed nodes (`host`, `port`); the client learns the others from them.
        seeds: Vec<(String, u16)>,
    },
}

/// Sentinels and the primary they watch (`redis+sentinel://h1:26379,h2:26379/mymaster/0`).
#[derive(Debug, Clone)]
pub struct SentinelTopology {
    /// Sentinel addresses (`host`, `port`), asked in turn.
    pub sentinels: Vec<(String, u16)>,
    /// The name the Sentinels monitor the primary under.
    pub master_name: String,
    /// The Sentinels' own password (`sentinel_password`), re-read at each connect.
    pub password: Option<SecretSource>,
}

impl RedisTopology {
    /// The mode's name, as `/status` and the `mode` metric label show it.
    pub fn mode(&self) -> &'static str {
        match self {
            RedisTopology::Single => "single",
            RedisTopology::Sentinel(_) => "sentinel",
            RedisTopology::Cluster { .. } => "cluster",
        }
    }
}

/// Redis backend settings (`[policy.rate_limit.redis]`).
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Address, TLS (`rediss://`), database and user name from `url`; never a password. With
    /// Sentinel or Cluster, the template of every node's connection (its address is replaced).
    pub connection: ConnectionInfo,
    /// How the nodes are found: one server, Sentinel or Cluster.
    pub topology: RedisTopology,
    /// Password (`AUTH`), re-read from its file at each connect.
    pub password: Option<SecretSource>,
    /// PEM CA bundle that verifies a `rediss://` server (system roots otherwise).
    pub ca_pem: Option<Vec<u8>>,
    /// Prepended to every key, e.g. `finhub-sidecar:rl:payments-api:`.
    pub key_prefix: String,
    /// Longest a request waits for Redis before the failure mode decides.
    pub timeout: Duration,
    /// Longest a (background) connect may take.
    pub connect_timeout: Duration,
    /// Multiplexed connections in the pool.
    pub connections: NonZeroUsize,
    /// What decides while Redis cannot.
    pub on_error: OnRedisError,
}

/// What decides while Redis cannot (`on_redis_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRedisError {
    /// Let requests through (availability over the limit).
    Allow,
    /// Refuse with 503 `rate_limit_unavailable` (the limit over availability).
    Deny,
    /// An in-process bucket with `1 / replicas` of each limit (at least 1 per second and burst).
    Local {
        /// How many replicas share the limit.
        replicas: NonZeroU32,
    },
}

/// `[policy.rate_limit.redis]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRedis {
    /// `redis://host:6379/0`, or `rediss://host:6380/0` for TLS; may name a user
    /// (`redis://user@host`), never a password. Sentinel:
    /// `redis+sentinel://h1:26379,h2:26379/mymaster/0`; Cluster: `redis+cluster://h1:7000,h2:7000`.
    url: String,
    /// Redis password as exactly `"${ENV_VAR}"`; or use `password_file`.
    password: Option<String>,
    /// File holding the Redis password (re-read at each reconnect).
    password_file: Option<PathBuf>,
    /// The Sentinels' own password as exactly `"${ENV_VAR}"` (`redis+sentinel://` only).
    sentinel_password: Option<String>,
    /// File holding the Sentinels' password (re-read at each connect).
    sentinel_password_file: Option<PathBuf>,
    /// PEM CA bundle that verifies a `rediss://` server; default the system roots.
    ca_file: Option<PathBuf>,
    /// Prefix of every key; default `finhub-sidecar:rl:`. Replicas share a bucket when prefix,
    /// tenant id and route match.
    key_prefix: Option<String>,
    /// Longest a request waits for Redis before `on_redis_error` decides, 1 ms to 1 s; default `5ms`.
    timeout: Option<String>,
    /// Longest a background (re)connect may take; default `1s`.
    connect_timeout: Option<String>,
    /// Pooled multiplexed connections (each carries any number of concurrent calls); default 2.
    connections: Option<usize>,
    /// While Redis cannot decide: `allow`, `deny` (503 `rate_limit_unavailable`) or `local`
    /// (default: an in-process bucket with this pod's share of the limit).
    on_redis_error: Option<FileOnRedisError>,
    /// How many replicas share the limit; with `on_redis_error = "local"` each gets
    /// `rate / replicas` and `burst / replicas` (rounded up). Required for `local`.
    replicas: Option<u32>,
}

/// `policy.rate_limit.redis.on_redis_error` as written.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum FileOnRedisError {
    /// `allow`: let requests through.
    Allow,
    /// `deny`: refuse with 503.
    Deny,
    /// `local`: this pod's share of the limit, in-process.
    Local,
}

/// A Redis endpoint as configured under one section's key.
pub(super) struct RedisEndpoint {
    /// The (template) connection: TLS, database, user; never a password.
    pub connection: ConnectionInfo,
    /// The nodes' password.
    pub password: Option<SecretSource>,
    /// PEM CA bundle for TLS.
    pub ca_pem: Option<Vec<u8>>,
    /// Single, Sentinel or Cluster.
    pub topology: RedisTopology,
}

/// The Redis keys of one `url`, `password`, ... group, as written.
pub(super) struct FileEndpoint {
    pub url: String,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub sentinel_password: Option<String>,
    pub sentinel_password_file: Option<PathBuf>,
}

impl Convert<'_> {
    /// A Redis endpoint under `KEY` (`url`, `password` / `password_file`, `ca_file`,
    /// `sentinel_password` / `sentinel_password_file`): shared by every Redis user's section.
    /// The URL and passwords never reach a message.
    pub(super) fn redis_endpoint(&mut self, key: &str, e: FileEndpoint) -> Option<RedisEndpoint> {
        const NOT_A_REDIS_URL: &str = "not a redis://, rediss://, redis+sentinel:// or redis+cluster:// URL (redis://host:6379/0)";
        let url = e.url.trim();
        let multi = parse_multi_host(url);
        let tls = match &multi {
            Some(Ok(m)) => m.tls,
            _ => url.starts_with("rediss://"),
        };
        let mut topology = RedisTopology::Single;
        let connection = if url.contains('#') {
            self.err(
                format!("{key}.url"),
                "URL fragments such as #insecure are not accepted: the server certificate is always verified",
            );
            None
        } else if let Some(m) = multi {
            match m {
                Err(why) => {
                    self.err(format!("{key}.url"), why);
                    None
                }
                Ok(m) if m.tls && !m.sentinel => {
                    self.err(
                        format!("{key}.url"),
                        "rediss+cluster:// (Redis Cluster with TLS) is not supported yet; use Sentinel with TLS (rediss+sentinel://) or a plain cluster on a private network",
                    );
                    None
                }
                Ok(m) => {
                    // The template of every node's connection: TLS, user, database; the address
                    // is replaced by the resolved primary's (or the cluster's nodes').
                    let (host, port) = m.hosts[0].clone();
                    let host = if host.contains(':') {
                        format!("[{host}]")
                    } else {
                        host
                    };
                    let template = format!(
                        "{}://{}{host}:{port}/{}",
                        if m.tls { "rediss" } else { "redis" },
                        m.user
                            .as_deref()
                            .map(|u| format!("{u}@"))
                            .unwrap_or_default(),
                        m.db
                    );
                    topology = if m.sentinel {
                        RedisTopology::Sentinel(SentinelTopology {
                            sentinels: m.hosts,
                            master_name: m.master_name,
                            password: None,
                        })
                    } else {
                        RedisTopology::Cluster { seeds: m.hosts }
                    };
                    match redis::IntoConnectionInfo::into_connection_info(template.as_str()) {
                        Ok(c) => Some(c),
                        Err(_) => {
                            self.err(format!("{key}.url"), NOT_A_REDIS_URL);
                            None
                        }
                    }
                }
            }
        } else if !tls && !url.starts_with("redis://") {
            // The URL is not echoed: a malformed one may still hold credentials.
            self.err(format!("{key}.url"), NOT_A_REDIS_URL);
            None
        } else {
            match redis::IntoConnectionInfo::into_connection_info(url) {
                Ok(c) if c.redis_settings().password().is_some() => {
                    self.err(
                        format!("{key}.url"),
                        "must not contain a password; use password_file or password = \"${ENV_VAR}\"",
                    );
                    None
                }
                Ok(c) => Some(c),
                Err(_) => {
                    self.err(format!("{key}.url"), NOT_A_REDIS_URL);
                    None
                }
            }
        };
        if e.ca_file.is_some() && !tls {
            self.err(format!("{key}.ca_file"), "needs a rediss:// url (TLS)");
        }
        let user_without_password = connection
            .as_ref()
            .is_some_and(|c| c.redis_settings().username().is_some())
            && e.password.is_none()
            && e.password_file.is_none();
        if user_without_password {
            self.err(
                format!("{key}.password"),
                "missing: the url names a user, which needs password_file or password = \"${ENV_VAR}\"",
            );
        }
        let password = self.secret(key, "password", e.password, e.password_file, false);
        let sentinel_set = e.sentinel_password.is_some() || e.sentinel_password_file.is_some();
        let sentinel_password = self.secret(
            key,
            "sentinel_password",
            e.sentinel_password,
            e.sentinel_password_file,
            false,
        );
        match &mut topology {
            RedisTopology::Sentinel(s) => s.password = sentinel_password,
            _ if sentinel_set && connection.is_some() => self.err(
                format!("{key}.sentinel_password"),
                "is only read with a redis+sentinel:// url",
            ),
            _ => {}
        }
        let ca_pem = e.ca_file.and_then(|p| {
            let p = self.path(p);
            match crate::files::read(&p) {
                Ok(pem) if pem_has_certificates(&pem) => Some(pem),
                Ok(_) => {
                    self.err(
                        format!("{key}.ca_file"),
                        format!("{} holds no readable PEM certificate", p.display()),
                    );
                    None
                }
                Err(e) => {
                    self.err(
                        format!("{key}.ca_file"),
                        format!("cannot read {}: {e}", p.display()),
                    );
                    None
                }
            }
        });
        Some(RedisEndpoint {
            connection: connection?,
            password,
            ca_pem,
            topology,
        })
    }

    /// `[policy.rate_limit.redis]`; the URL and password never reach a message.
    pub(super) fn redis(&mut self, r: FileRedis) -> Option<RedisSettings> {
        const KEY: &str = "policy.rate_limit.redis";
        let endpoint = self.redis_endpoint(
            KEY,
            FileEndpoint {
                url: r.url,
                password: r.password,
                password_file: r.password_file,
                ca_file: r.ca_file,
                sentinel_password: r.sentinel_password,
                sentinel_password_file: r.sentinel_password_file,
            },
        );
        let timeout = self.duration(
            &format!("{KEY}.timeout"),
            r.timeout.as_deref(),
            Duration::from_millis(5),
        );
        if !(Duration::from_millis(1)..=secs(1)).contains(&timeout) {
            // Every request with a bucket may wait this long; tokio's timer has 1 ms steps.
            self.err(format!("{KEY}.timeout"), "must be between 1ms and 1s");
        }
        let connect_timeout = self.duration(
            &format!("{KEY}.connect_timeout"),
            r.connect_timeout.as_deref(),
            secs(1),
        );
        let connections = match std::num::NonZeroUsize::new(r.connections.unwrap_or(2)) {
            Some(n) if n.get() <= 64 => Some(n),
            _ => {
                self.err(format!("{KEY}.connections"), "must be between 1 and 64");
                None
            }
        };
        let replicas = match r.replicas.map(std::num::NonZeroU32::new) {
            Some(None) => {
                self.err(format!("{KEY}.replicas"), "must be at least 1");
                None
            }
            Some(n) => n,
            None => None,
        };
        let on_error = match (
            r.on_redis_error.unwrap_or(FileOnRedisError::Local),
            replicas,
        ) {
            (FileOnRedisError::Allow, _) => Some(OnRedisError::Allow),
            (FileOnRedisError::Deny, _) => Some(OnRedisError::Deny),
            (FileOnRedisError::Local, Some(replicas)) => Some(OnRedisError::Local { replicas }),
            (FileOnRedisError::Local, None) => {
                if r.replicas.is_none() {
                    self.err(
                        format!("{KEY}.replicas"),
                        "missing: on_redis_error = \"local\" (the default) gives each pod rate/replicas while Redis is down; set replicas to the deployment's replica count",
                    );
                }
                None
            }
        };
        let key_prefix = r
            .key_prefix
            .unwrap_or_else(|| "finhub-sidecar:rl:".to_string());
        if key_prefix.is_empty() {
            self.err(format!("{KEY}.key_prefix"), "must not be empty");
        }
        let endpoint = endpoint?;
        if matches!(endpoint.topology, RedisTopology::Cluster { .. })
            && key_prefix.contains(['{', '}'])
        {
            self.err(
                format!("{KEY}.key_prefix"),
                "must not contain { or } with Redis Cluster (the tenant id is the keys' hash tag)",
            );
            return None;
        }
        Some(RedisSettings {
            connection: endpoint.connection,
            topology: endpoint.topology,
            password: endpoint.password,
            ca_pem: endpoint.ca_pem,
            key_prefix,
            timeout,
            connect_timeout,
            connections: connections?,
            on_error: on_error?,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::*;
    use super::super::Backend;
    use super::*;

    #[test]
    fn redis_backend_is_typed_once() {
        let text = format!(
            "{MINIMAL}\n[policy.rate_limit]\nrate = 10\nbackend = \"redis\"\n[policy.rate_limit.redis]\nurl = \"redis://rl-user@redis.infra:6380/2\"\npassword = \"${{PW}}\"\ntimeout = \"3ms\"\nreplicas = 20\n"
        );
        let c = load(&text).expect("valid");
        let Backend::Redis(r) = &c.policy.rate_limit.backend else {
            panic!("expected redis backend");
        };
        assert_eq!(r.timeout, Duration::from_millis(3));
        assert_eq!(r.connections.get(), 2);
        assert_eq!(r.key_prefix, "finhub-sidecar:rl:");
        assert_eq!(
            r.on_error,
            OnRedisError::Local {
                replicas: std::num::NonZeroU32::new(20).unwrap()
            }
        );
        assert_eq!(
            r.password.as_ref().unwrap().current().expose(),
            "s3cret-value"
        );
        assert_eq!(r.connection.redis_settings().username(), Some("rl-user"));
        assert_eq!(r.connection.redis_settings().db(), 2);
        assert!(!format!("{r:?}").contains("s3cret"));
    }

    #[test]
    fn sentinel_and_cluster_urls_are_typed() {
        let text = format!(
            "{MINIMAL}\n[policy.rate_limit]\nrate = 10\nbackend = \"redis\"\n[policy.rate_limit.redis]\nurl = \"redis+sentinel://127.0.0.1:26379,127.0.0.2/mymaster/1\"\nsentinel_password = \"${{PW}}\"\non_redis_error = \"deny\"\n"
        );
        let c = load(&text).expect("valid");
        let Backend::Redis(r) = &c.policy.rate_limit.backend else {
            panic!("expected redis backend");
        };
        let RedisTopology::Sentinel(s) = &r.topology else {
            panic!("expected sentinel");
        };
        assert_eq!(s.master_name, "mymaster");
        assert_eq!(s.sentinels.len(), 2);
        assert_eq!(
            s.password.as_ref().unwrap().current().expose(),
            "s3cret-value"
        );
        assert_eq!(r.connection.redis_settings().db(), 1);
        assert!(!format!("{r:?}").contains("s3cret"));
    }

    #[test]
    fn sentinel_and_cluster_mistakes_are_named() {
        let base = format!("{MINIMAL}\n[policy.rate_limit]\nrate = 10\nbackend = \"redis\"\n[policy.rate_limit.redis]\non_redis_error = \"deny\"\n");
        for (extra, key) in [
            (
                "url = \"redis+sentinel://h1\"",
                "policy.rate_limit.redis.url",
            ),
            (
                "url = \"redis+sentinel://u:hunter2@h1/m\"",
                "policy.rate_limit.redis.url",
            ),
            (
                "url = \"rediss+cluster://h1\"",
                "policy.rate_limit.redis.url",
            ),
            (
                "url = \"redis://h1\"\nsentinel_password = \"${PW}\"",
                "policy.rate_limit.redis.sentinel_password",
            ),
            (
                "url = \"redis+cluster://h1\"\nkey_prefix = \"{x}:\"",
                "policy.rate_limit.redis.key_prefix",
            ),
            (
                "url = \"redis+sentinel://h1/m\"\nca_file = \"/etc/hosts\"",
                "policy.rate_limit.redis.ca_file",
            ),
        ] {
            let e = load(&format!("{base}{extra}\n")).unwrap_err();
            assert!(e.0.iter().any(|e| e.key == key), "{extra}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn redis_mistakes_are_named() {
        let base = format!("{MINIMAL}\n[policy.rate_limit]\nrate = 10\nbackend = \"redis\"\n");
        // No [policy.rate_limit.redis] table.
        let e = load(&base).unwrap_err();
        assert_eq!(e.0[0].key, "policy.rate_limit.redis");
        // Inline password in the URL: refused, not echoed.
        let e = load(&format!(
            "{base}[policy.rate_limit.redis]\nurl = \"redis://:hunter2@h:6379\"\non_redis_error = \"allow\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.0[0].key, "policy.rate_limit.redis.url");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        // The default failure mode needs the replica count.
        let e = load(&format!(
            "{base}[policy.rate_limit.redis]\nurl = \"redis://h\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.0[0].key, "policy.rate_limit.redis.replicas");
        // Unknown failure mode: named by serde.
        let e = load(&format!(
            "{base}[policy.rate_limit.redis]\nurl = \"redis://h\"\non_redis_error = \"maybe\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.0[0].key, "policy.rate_limit.redis.on_redis_error");
        // A redis table without the redis backend is a mistake, not ignored.
        let e = load(&format!(
            "{MINIMAL}\n[policy.rate_limit]\nrate = 10\n[policy.rate_limit.redis]\nurl = \"redis://h\"\non_redis_error = \"deny\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.0[0].key, "policy.rate_limit.redis");
        // A user name needs a password; TLS-only settings need rediss; no #insecure; bounded timeout.
        for (extra, key) in [
            (
                "url = \"redis://rl-user@h\"",
                "policy.rate_limit.redis.password",
            ),
            (
                "url = \"redis://h\"\nca_file = \"/etc/hosts\"",
                "policy.rate_limit.redis.ca_file",
            ),
            (
                "url = \"rediss://h/#insecure\"",
                "policy.rate_limit.redis.url",
            ),
            (
                "url = \"redis+unix:///tmp/r.sock\"",
                "policy.rate_limit.redis.url",
            ),
            (
                "url = \"redis://h\"\ntimeout = \"5s\"",
                "policy.rate_limit.redis.timeout",
            ),
        ] {
            let e = load(&format!(
                "{base}[policy.rate_limit.redis]\n{extra}\non_redis_error = \"deny\"\n"
            ))
            .unwrap_err();
            assert!(e.0.iter().any(|e| e.key == key), "{extra}: {e}");
        }
        // Not a URL.
        let e = load(&format!(
            "{base}[policy.rate_limit.redis]\nurl = \"http://h\"\non_redis_error = \"deny\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.0[0].key, "policy.rate_limit.redis.url");
    }
}
