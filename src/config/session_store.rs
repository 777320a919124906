//! `auth.session_store` and `[auth.shared]`: where the tenants' sessions live. `local` (the
//! default) keeps each replica's own; `redis` shares one per tenant with every replica that uses
//! the same Redis and key prefix, encrypted with the key from `encryption_key_file`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use redis::ConnectionInfo;
use serde::Deserialize;

use super::convert::{secs, Convert};
use super::redis::{FileEndpoint, RedisTopology};
use crate::sealing::{KeyRing, SessionKey};
use crate::secret::SecretSource;

/// Where the tenants' sessions live.
#[derive(Debug, Clone, Default)]
pub enum SessionStore {
    /// In this process: each replica logs in and renews on its own.
    #[default]
    Local,
    /// In Redis, shared by the fleet (one login and one renewal per tenant for all replicas).
    Redis(Box<SharedSessionSettings>),
}

/// What a replica does while the shared store cannot be read or written (`on_store_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// Keep serving the last good session, renew it on its own when it runs out (default).
    Local,
    /// Keep serving the last good session, never log in on its own: when it runs out apps get
    /// 503 `session_unavailable` until the store is back (for a credential FinHub must never see
    /// more than one login for).
    Wait,
}

/// `[auth.shared]` typed.
#[derive(Debug, Clone)]
pub struct SharedSessionSettings {
    /// Address, TLS, database and user name (never a password); with Sentinel or Cluster the
    /// template of every node's connection.
    pub connection: ConnectionInfo,
    /// How the nodes are found: one server, Sentinel or Cluster.
    pub topology: RedisTopology,
    /// Redis password, re-read at each connect.
    pub password: Option<SecretSource>,
    /// PEM CA bundle for `rediss://`.
    pub ca_pem: Option<Vec<u8>>,
    /// Longest a (background) connect may take.
    pub connect_timeout: Duration,
    /// Longest one store call may take (background only: no request waits on it).
    pub timeout: Duration,
    /// Prepended to every key.
    pub key_prefix: String,
    /// The encryption keys: the current one (writes) first, then the previous ones (reads).
    pub keys: Arc<KeyRing>,
    /// How long a renewal lease lasts unless its owner extends it.
    pub lease_ttl: Duration,
    /// How often every replica reads the shared record.
    pub poll_interval: Duration,
    /// How long a replica whose session FinHub refused (401) waits for the owner's renewal
    /// before it renews on its own.
    pub follow_timeout: Duration,
    /// While the store cannot be used.
    pub on_store_error: OnStoreError,
}

/// `auth.session_store` as written.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub(super) enum FileSessionStore {
    /// `local`: each replica keeps its own session.
    #[default]
    Local,
    /// `redis`: one shared session per tenant in Redis (`[auth.shared]`).
    Redis,
}

/// `auth.shared.on_store_error` as written.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum FileOnStoreError {
    /// `local`: renew on its own when the last good session runs out.
    Local,
    /// `wait`: never log in on its own; 503 once the last good session runs out.
    Wait,
}

/// `[auth.shared]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileShared {
    /// `redis://host:6379/0`, or `rediss://host:6380/0` for TLS; may name a user, never a
    /// password. May be the rate limit's Redis.
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
    /// Prefix of every key; default `finhub-sidecar:session:`. Replicas share a tenant's session
    /// when Redis, prefix and tenant id match.
    key_prefix: Option<String>,
    /// File holding the 32-byte encryption key, base64 (`openssl rand -base64 32`), e.g. a
    /// Kubernetes Secret. Required. New records are written with it.
    encryption_key_file: Option<PathBuf>,
    /// Files of earlier keys, still accepted for reading during a rotation; default none.
    previous_key_files: Option<Vec<PathBuf>>,
    /// How long a renewal lease lasts unless its owner extends it (every third of it); another
    /// replica takes over within this after an owner dies; default `10s`, 500ms to 5m.
    lease_ttl: Option<String>,
    /// How often each replica reads the shared record; default `1s`, 10ms to 60s, below lease_ttl.
    poll_interval: Option<String>,
    /// After FinHub refused the shared session (401), how long to wait for the owner's renewal
    /// before renewing on its own; default `5s`, at most 60s.
    follow_timeout: Option<String>,
    /// While the store cannot be used: `local` (default: keep the last good session, then renew
    /// on its own) or `wait` (never log in on its own).
    on_store_error: Option<FileOnStoreError>,
    /// Longest one store call may take (background only); default `250ms`, 1ms to 5s.
    timeout: Option<String>,
    /// Longest a background (re)connect may take; default `1s`.
    connect_timeout: Option<String>,
}

impl Convert<'_> {
    /// `auth.session_store` with its `[auth.shared]` table.
    pub(super) fn session_store(
        &mut self,
        store: Option<FileSessionStore>,
        shared: Option<FileShared>,
        request_timeout: Duration,
    ) -> SessionStore {
        const KEY: &str = "auth.shared";
        let shared = match (store.unwrap_or_default(), shared) {
            (FileSessionStore::Local, None) => return SessionStore::Local,
            (FileSessionStore::Local, Some(_)) => {
                self.err(
                    KEY,
                    "is only read with auth.session_store = \"redis\"; remove it or set the store",
                );
                return SessionStore::Local;
            }
            (FileSessionStore::Redis, None) => {
                self.err(KEY, "missing: auth.session_store = \"redis\" needs it");
                return SessionStore::Local;
            }
            (FileSessionStore::Redis, Some(s)) => s,
        };
        let endpoint = self.redis_endpoint(
            KEY,
            FileEndpoint {
                url: shared.url,
                password: shared.password,
                password_file: shared.password_file,
                ca_file: shared.ca_file,
                sentinel_password: shared.sentinel_password,
                sentinel_password_file: shared.sentinel_password_file,
            },
        );
        let key_prefix = shared
            .key_prefix
            .unwrap_or_else(|| "finhub-sidecar:session:".to_string());
        if key_prefix.is_empty() {
            self.err(format!("{KEY}.key_prefix"), "must not be empty");
        }
        let mut keys = Vec::new();
        match shared.encryption_key_file {
            None => self.err(
                format!("{KEY}.encryption_key_file"),
                "missing: the shared session is stored only encrypted (a file with 32 random bytes, base64)",
            ),
            Some(p) => keys.extend(self.session_key(&format!("{KEY}.encryption_key_file"), p)),
        }
        let current_ok = !keys.is_empty();
        for (i, p) in shared
            .previous_key_files
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            keys.extend(self.session_key(&format!("{KEY}.previous_key_files[{i}]"), p));
        }
        let timeout = self.duration(
            &format!("{KEY}.timeout"),
            shared.timeout.as_deref(),
            Duration::from_millis(250),
        );
        if !(Duration::from_millis(1)..=secs(5)).contains(&timeout) {
            self.err(format!("{KEY}.timeout"), "must be between 1ms and 5s");
        }
        // A renewal is at most a refresh and a login, each up to auth.request_timeout, and the
        // owner's extensions are store calls: the lease must outlast them all.
        let renewal = request_timeout * 2 + timeout;
        let lease_ttl = self.duration(
            &format!("{KEY}.lease_ttl"),
            shared.lease_ttl.as_deref(),
            secs(10).max(renewal + secs(1)),
        );
        if !(Duration::from_millis(500)..=secs(300)).contains(&lease_ttl) {
            self.err(format!("{KEY}.lease_ttl"), "must be between 500ms and 5m");
        } else if lease_ttl < renewal {
            self.err(
                format!("{KEY}.lease_ttl"),
                format!(
                    "{} is shorter than a renewal can take: 2 × auth.request_timeout + auth.shared.timeout = {} (a refresh then a login); raise it or lower auth.request_timeout",
                    humantime::format_duration(lease_ttl),
                    humantime::format_duration(renewal)
                ),
            );
        }
        if timeout * 3 > lease_ttl {
            self.err(
                format!("{KEY}.timeout"),
                "must be at most a third of auth.shared.lease_ttl (the owner extends the lease every third of it)",
            );
        }
        let poll_interval = self.duration(
            &format!("{KEY}.poll_interval"),
            shared.poll_interval.as_deref(),
            secs(1),
        );
        if !(Duration::from_millis(10)..=secs(60)).contains(&poll_interval)
            || poll_interval >= lease_ttl
        {
            self.err(
                format!("{KEY}.poll_interval"),
                "must be between 10ms and 60s and below lease_ttl",
            );
        }
        let follow_timeout = self.duration(
            &format!("{KEY}.follow_timeout"),
            shared.follow_timeout.as_deref(),
            secs(5),
        );
        if follow_timeout > secs(60) || follow_timeout < poll_interval || follow_timeout.is_zero() {
            self.err(
                format!("{KEY}.follow_timeout"),
                "must be at least auth.shared.poll_interval (and not 0) and at most 60s",
            );
        }
        let connect_timeout = self.duration(
            &format!("{KEY}.connect_timeout"),
            shared.connect_timeout.as_deref(),
            secs(1),
        );
        if !(Duration::from_millis(10)..=secs(30)).contains(&connect_timeout) {
            self.err(
                format!("{KEY}.connect_timeout"),
                "must be between 10ms and 30s",
            );
        }
        let on_store_error = match shared.on_store_error.unwrap_or(FileOnStoreError::Local) {
            FileOnStoreError::Local => OnStoreError::Local,
            FileOnStoreError::Wait => OnStoreError::Wait,
        };
        let Some(endpoint) = endpoint else {
            return SessionStore::Local;
        };
        if matches!(endpoint.topology, RedisTopology::Cluster { .. })
            && key_prefix.contains(['{', '}'])
        {
            self.err(
                format!("{KEY}.key_prefix"),
                "must not contain { or } with Redis Cluster (the tenant id is the keys' hash tag)",
            );
            return SessionStore::Local;
        }
        if !current_ok {
            return SessionStore::Local;
        }
        SessionStore::Redis(Box::new(SharedSessionSettings {
            connection: endpoint.connection,
            topology: endpoint.topology,
            password: endpoint.password,
            ca_pem: endpoint.ca_pem,
            connect_timeout,
            timeout,
            key_prefix,
            keys: Arc::new(KeyRing::new(keys)),
            lease_ttl,
            poll_interval,
            follow_timeout,
            on_store_error,
        }))
    }

    /// One key file: base64 of exactly 32 bytes (surrounding whitespace ignored). The key's
    /// bytes never reach a message.
    fn session_key(&mut self, key: &str, p: PathBuf) -> Option<SessionKey> {
        let p = self.path(p);
        let text = match crate::files::read(&p) {
            Ok(t) => {
                self.check_secret_mode(key, &p);
                zeroize::Zeroizing::new(t)
            }
            Err(e) => {
                self.err(key, format!("cannot read {}: {e}", p.display()));
                return None;
            }
        };
        match SessionKey::from_base64(&text) {
            Some(k) => Some(k),
            None => {
                self.err(
                    key,
                    format!(
                        "{} does not hold a base64 32-byte key (make one with `openssl rand -base64 32`)",
                        p.display()
                    ),
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::*;
    use super::*;

    fn with_shared(extra: &str) -> String {
        MINIMAL.replace(
            "[auth]\nenvironment = \"integration\"",
            &format!("[auth]\nenvironment = \"integration\"\nsession_store = \"redis\"\n[auth.shared]\n{extra}"),
        )
    }

    fn key_file(dir: &std::path::Path, name: &str, text: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    #[test]
    fn local_is_the_default_and_redis_is_typed_once() {
        let c = load(MINIMAL).expect("valid");
        assert!(matches!(c.auth.session_store, SessionStore::Local));
        let dir = tempfile::tempdir().unwrap();
        let k1 = key_file(
            dir.path(),
            "k1",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n",
        );
        let k0 = key_file(
            dir.path(),
            "k0",
            "HxwdHh8AAQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRo=",
        );
        let c = load(&with_shared(&format!(
            "url = \"redis://sessions@redis.infra:6379/3\"\npassword = \"${{PW}}\"\nencryption_key_file = \"{k1}\"\nprevious_key_files = [\"{k0}\"]\nlease_ttl = \"2s\"\npoll_interval = \"100ms\"\non_store_error = \"wait\"\n"
        )).replace("environment = \"integration\"\n", "environment = \"integration\"\nrequest_timeout = \"800ms\"\n"))
        .expect("valid");
        let SessionStore::Redis(s) = &c.auth.session_store else {
            panic!("expected the redis store");
        };
        assert_eq!(s.lease_ttl, Duration::from_secs(2));
        // Unset, the lease outlasts a renewal at the default request timeout (10s).
        let c = load(&with_shared(&format!(
            "url = \"redis://h\"\nencryption_key_file = \"{k1}\"\n"
        )))
        .expect("valid");
        let SessionStore::Redis(d) = &c.auth.session_store else {
            panic!("expected the redis store");
        };
        // A held request outwaits the follower's wait for the owner and its own renewal.
        assert_eq!(c.auth.replay_wait(), Duration::from_secs(5 + 20 + 1));
        assert!(
            d.lease_ttl >= c.auth.request_timeout * 2 + d.timeout,
            "{:?}",
            d.lease_ttl
        );
        assert_eq!(s.poll_interval, Duration::from_millis(100));
        assert_eq!(s.follow_timeout, Duration::from_secs(5));
        assert_eq!(s.timeout, Duration::from_millis(250));
        assert_eq!(s.on_store_error, OnStoreError::Wait);
        assert_eq!(s.key_prefix, "finhub-sidecar:session:");
        assert_eq!(s.keys.len(), 2);
        assert_eq!(s.connection.redis_settings().db(), 3);
        // Neither the password nor a key byte in Debug.
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(!debug.contains("AAECAwQF"), "{debug}");
    }

    #[test]
    fn store_mistakes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = key_file(
            dir.path(),
            "good",
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        );
        let short = key_file(dir.path(), "short", "c2hvcnQta2V5LXNlY3JldA==");
        let e = load(&MINIMAL.replace(
            "[auth]\nenvironment = \"integration\"",
            "[auth]\nenvironment = \"integration\"\nsession_store = \"redis\"",
        ))
        .unwrap_err();
        assert_eq!(e.0[0].key, "auth.shared");
        let e = load(&MINIMAL.replace(
            "[auth]\nenvironment = \"integration\"",
            "[auth]\nenvironment = \"integration\"\nsession_store = \"shared\"",
        ))
        .unwrap_err();
        assert_eq!(e.0[0].key, "auth.session_store");
        for (extra, key) in [
            ("url = \"redis://h\"", "auth.shared.encryption_key_file"),
            (
                &format!("url = \"redis://h\"\nencryption_key_file = \"{short}\""),
                "auth.shared.encryption_key_file",
            ),
            (
                "url = \"redis://h\"\nencryption_key_file = \"/nonexistent/k\"",
                "auth.shared.encryption_key_file",
            ),
            (
                &format!("url = \"redis://h\"\nencryption_key_file = \"{good}\"\nprevious_key_files = [\"{short}\"]"),
                "auth.shared.previous_key_files[0]",
            ),
            (
                &format!("url = \"redis://:hunter2@h\"\nencryption_key_file = \"{good}\""),
                "auth.shared.url",
            ),
            (
                &format!("url = \"redis://h\"\nencryption_key_file = \"{good}\"\nlease_ttl = \"10ms\""),
                "auth.shared.lease_ttl",
            ),
            // The default auth.request_timeout (10s) with the old default lease: a forced
            // renewal (refresh, then login) could outlive the lease.
            (
                &format!("url = \"redis://h\"\nencryption_key_file = \"{good}\"\nlease_ttl = \"10s\""),
                "auth.shared.lease_ttl",
            ),
            (
                &format!("url = \"redis://h\"\nencryption_key_file = \"{good}\"\nlease_ttl = \"5s\"\ntimeout = \"2s\""),
                "auth.shared.timeout",
            ),
            (
                &format!("url = \"redis://h\"\nencryption_key_file = \"{good}\"\nconnect_timeout = \"10m\""),
                "auth.shared.connect_timeout",
            ),
            (
                &format!("url = \"redis://h\"\nencryption_key_file = \"{good}\"\npoll_interval = \"2s\"\nfollow_timeout = \"1s\""),
                "auth.shared.follow_timeout",
            ),
            (
                &format!("url = \"redis://h\"\nencryption_key_file = \"{good}\"\nfollow_timeout = \"0s\""),
                "auth.shared.follow_timeout",
            ),
            (
                &format!("url = \"redis://h\"\nencryption_key_file = \"{good}\"\npoll_interval = \"90s\""),
                "auth.shared.poll_interval",
            ),
            (
                &format!("url = \"redis://h\"\nencryption_key_file = \"{good}\"\nfollow_timeout = \"2m\""),
                "auth.shared.follow_timeout",
            ),
            (
                &format!("url = \"redis://h\"\nencryption_key_file = \"{good}\"\non_store_error = \"deny\""),
                "auth.shared.on_store_error",
            ),
            (
                &format!("url = \"redis://h\"\nencryption_key_file = \"{good}\"\nkey_prefix = \"\""),
                "auth.shared.key_prefix",
            ),
        ] {
            let e = load(&with_shared(extra)).unwrap_err();
            assert!(e.0.iter().any(|e| e.key == key), "{extra}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
            assert!(!e.to_string().contains("c2hvcnQ"), "{e}");
        }
        // A table without the store is a mistake, not ignored.
        let e = load(&MINIMAL.replace(
            "[auth]\nenvironment = \"integration\"",
            &format!("[auth]\nenvironment = \"integration\"\n[auth.shared]\nurl = \"redis://h\"\nencryption_key_file = \"{good}\""),
        ))
        .unwrap_err();
        assert_eq!(e.0[0].key, "auth.shared");
    }
}
