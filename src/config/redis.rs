//! `[policy.rate_limit.redis]`: the shared rate-limit backend (address, credentials, timeouts,
//! and what decides while Redis cannot).

use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use redis::ConnectionInfo;
use serde::Deserialize;

use super::convert::{pem_has_certificates, secs, Convert};
use crate::secret::SecretSource;

/// Redis backend settings (`[policy.rate_limit.redis]`).
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Address, TLS (`rediss://`), database and user name from `url`; never a password.
    pub connection: ConnectionInfo,
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
    /// (`redis://user@host`), never a password.
    url: String,
    /// Redis password as exactly `"${ENV_VAR}"`; or use `password_file`.
    password: Option<String>,
    /// File holding the Redis password (re-read at each reconnect).
    password_file: Option<PathBuf>,
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

/// A Redis endpoint: connection (no password), password source, CA bundle.
pub(super) type RedisEndpoint = (ConnectionInfo, Option<SecretSource>, Option<Vec<u8>>);

impl Convert<'_> {
    /// A Redis endpoint under `KEY` (`url`, `password` / `password_file`, `ca_file`): shared by
    /// every Redis user's section. The URL and password never reach a message.
    pub(super) fn redis_endpoint(
        &mut self,
        key: &str,
        url: &str,
        password: Option<String>,
        password_file: Option<PathBuf>,
        ca_file: Option<PathBuf>,
    ) -> Option<RedisEndpoint> {
        const NOT_A_REDIS_URL: &str = "not a redis:// or rediss:// URL (redis://host:6379/0)";
        let url = url.trim();
        let tls = url.starts_with("rediss://");
        let connection = if !tls && !url.starts_with("redis://") {
            // The URL is not echoed: a malformed one may still hold credentials.
            self.err(format!("{key}.url"), NOT_A_REDIS_URL);
            None
        } else if url.contains('#') {
            self.err(
                format!("{key}.url"),
                "URL fragments such as #insecure are not accepted: the server certificate is always verified",
            );
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
        if ca_file.is_some() && !tls {
            self.err(format!("{key}.ca_file"), "needs a rediss:// url (TLS)");
        }
        let user_without_password = connection
            .as_ref()
            .is_some_and(|c| c.redis_settings().username().is_some())
            && password.is_none()
            && password_file.is_none();
        if user_without_password {
            self.err(
                format!("{key}.password"),
                "missing: the url names a user, which needs password_file or password = \"${ENV_VAR}\"",
            );
        }
        let password = self.secret(key, "password", password, password_file, false);
        let ca_pem = ca_file.and_then(|p| {
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
        Some((connection?, password, ca_pem))
    }

    /// `[policy.rate_limit.redis]`; the URL and password never reach a message.
    pub(super) fn redis(&mut self, r: FileRedis) -> Option<RedisSettings> {
        const KEY: &str = "policy.rate_limit.redis";
        let endpoint = self.redis_endpoint(
            KEY,
            &r.url,
            r.password.clone(),
            r.password_file.clone(),
            r.ca_file.clone(),
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
        let (connection, password, ca_pem) = endpoint?;
        Some(RedisSettings {
            connection,
            password,
            ca_pem,
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
