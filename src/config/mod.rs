//! Configuration: TOML file structs, converted once into typed values.
//!
//! Two layers, as in River: the `File*` structs mirror `proxy.toml` exactly (`deny_unknown_fields`,
//! a doc comment on every key), and [`Config::load`] converts them into [`Config`], whose fields
//! are already typed (`SocketAddr`, `IpNet`, `Duration`, `HeaderValue`, [`Secret`]). Nothing
//! downstream re-parses a string. Every error names the file and the dotted key.
//!
//! Secrets are never taken inline: a secret key either names a file (`password_file`) or holds
//! exactly one `${ENV_VAR}` reference (`password = "${FINHUB_PASSWORD}"`).
//!
//! Layout: [`file`] holds the top-level file struct and the parser, [`convert`] the conversion
//! context and its shared helpers (durations, addresses, paths, secrets); each section has one
//! module with its typed struct, its file struct, its conversion and its tests. Every public
//! type is re-exported here, so callers write `crate::config::AuthConfig`.
//!
//! [`Secret`]: crate::secret::Secret

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

mod admin;
mod audit;
mod auth;
mod client_cert;
mod convert;
mod environment;
mod error;
mod file;
mod headers;
mod listener;
mod log;
mod policy;
mod rate_limit;
mod redis;
mod redis_url;
mod retry;
mod session_store;
mod shutdown;
mod tenants;
mod tracing;
mod upstream;

pub use admin::AdminConfig;
pub use audit::{AuditConfig, AuditOutput, DEFAULT_AUDIT_FLUSH_INTERVAL};
pub use auth::AuthConfig;
pub use client_cert::{ClientCertFiles, KeySource, Pkcs11Key, Pkcs11Uri};
pub use environment::{EnvRules, Environment};
pub use error::{ConfigError, ConfigErrors};
pub use headers::HeaderConfig;
pub use listener::ListenerConfig;
pub use log::{LogConfig, LogFormat, DEFAULT_LOG_LEVEL};
pub use policy::PolicyConfig;
pub use rate_limit::{Backend, Limit, RateLimitConfig, RouteLimit};
pub use redis::{OnRedisError, RedisSettings, RedisTopology, SentinelTopology};
pub use retry::RetryConfig;
pub use session_store::{OnStoreError, SessionStore, SharedSessionSettings};
pub use shutdown::ShutdownConfig;
pub use tenants::TenantConfig;
pub use tracing::{ParentRoot, Sampler, TracingConfig};
pub use upstream::{EgressProxy, ProxyAuth, UpstreamConfig};

use client_cert::{DEFAULT_EXPIRY_WARNING, DEFAULT_RELOAD_INTERVAL};
use convert::Convert;
use file::{parse_file, FileConfig};

/// The sidecar's whole configuration, validated and typed.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration came from (for messages).
    pub file: PathBuf,
    /// Where apps send plain HTTP.
    pub listen: SocketAddr,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// Admin listener (health, readiness, metrics).
    pub admin_listen: SocketAddr,
    /// The FinHub upstream.
    pub upstream: UpstreamConfig,
    /// Client certificate presented to FinHub; `None` only outside production.
    pub client_cert: Option<ClientCertFiles>,
    /// How the sidecar logs in.
    pub auth: AuthConfig,
    /// What `auth.environment` demands, decided once: read these flags, never compare
    /// environments.
    pub rules: EnvRules,
    /// Tenants, in file order.
    pub tenants: Vec<TenantConfig>,
    /// Index into `tenants` used when a request names no tenant.
    pub default_tenant: usize,
    /// Request policy.
    pub policy: PolicyConfig,
    /// Values of the compliance headers the sidecar sets.
    pub headers: HeaderConfig,
    /// Logging.
    pub log: LogConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Retries of FinHub's blips and their per-tenant budget.
    pub retry: RetryConfig,
    /// Audit log.
    pub audit: AuditConfig,
    /// How app connections are accepted and read.
    pub listener: ListenerConfig,
    /// Admin listener options.
    pub admin: AdminConfig,
    /// OpenTelemetry tracing; `None` when off (no endpoint configured).
    pub tracing: Option<TracingConfig>,
    /// What is allowed but unwise (a secret file other users can read), one line each naming
    /// the key and the file, never a secret: logged by `run`, printed by `check`.
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads, parses and converts `path`, reading every secret file it names.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = crate::files::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                key: "(file)".into(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        let env = |name: &str| std::env::var(name).ok();
        Self::from_toml_with_otel(path, &text, &env, &env)
    }

    /// Parses TOML text as if read from `path`; `env` looks up `${VAR}` references. No
    /// `OTEL_*` variable is read (see [`Config::from_toml_with_otel`]).
    pub fn from_toml(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        Self::from_toml_with_otel(path, text, env, &|_| None)
    }

    /// [`Config::from_toml`], with `otel_env` looking up the standard `OTEL_*` variables that
    /// configure tracing where `[tracing]` does not.
    pub fn from_toml_with_otel(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        otel_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let file: FileConfig = parse_file(path, text).map_err(|e| ConfigErrors(vec![e]))?;
        let mut cx = Convert::new(path, env);
        cx.otel_env = otel_env;
        let config = cx.config(file);
        match config {
            Some(c) if cx.errors.is_empty() => Ok(c),
            _ => Err(ConfigErrors(cx.errors)),
        }
    }

    /// The tenant used when a request names none.
    pub fn default_tenant(&self) -> &TenantConfig {
        &self.tenants[self.default_tenant]
    }

    /// How often the TLS files are re-read (the CA file too, without a client certificate).
    pub fn tls_reload_interval(&self) -> std::time::Duration {
        self.client_cert
            .as_ref()
            .map_or(DEFAULT_RELOAD_INTERVAL, |c| c.reload_interval)
    }

    /// Warn when the client certificate expires within this window.
    pub fn expiry_warning(&self) -> std::time::Duration {
        self.client_cert
            .as_ref()
            .map_or(DEFAULT_EXPIRY_WARNING, |c| c.expiry_warning)
    }
}

impl Convert<'_> {
    /// The whole file, section by section (in this order, so errors are listed in it).
    fn config(&mut self, f: FileConfig) -> Option<Config> {
        let (listen, threads) = self.listen(&f.listener);
        let (admin_listen, admin) = self.admin(&f.admin);
        let listener = self.listener(&f.listener);
        let auth = self.auth(f.auth);
        let upstream = self.upstream(f.upstream);
        // Without a valid `[auth]` no environment rule is checked (its error is reported).
        let rules = auth.as_ref().map(|a| a.environment.rules());
        let client_cert = self.client_cert(f.client_cert, rules);
        let (tenants, default_tenant) = self.tenants(f.tenants, rules);
        let policy = self.policy(f.policy);
        let headers = self.headers(f.headers, rules);
        let shutdown = self.shutdown(f.shutdown);
        let retry = self.retry(f.retry);
        let audit = self.audit(f.audit);
        let log = f.log.convert();
        let tracing = self.tracing(f.tracing);
        Some(Config {
            file: self.file.clone(),
            listen: listen?,
            threads,
            admin_listen: admin_listen?,
            upstream: upstream?,
            client_cert,
            auth: auth?,
            rules: rules?,
            tenants,
            default_tenant,
            policy: policy?,
            headers: headers?,
            log,
            shutdown,
            retry,
            audit,
            listener,
            admin,
            tracing,
            warnings: std::mem::take(&mut self.warnings),
        })
    }
}

/// What the section tests share: a minimal valid file and a loader with a fixed environment.
#[cfg(test)]
mod testing {
    use std::path::Path;

    pub(super) use super::{Config, ConfigErrors};

    /// The smallest valid file (integration, one tenant, password from `${PW}`).
    pub(super) const MINIMAL: &str = r#"
[upstream]
base_url = "https://api.finhub.cloud"

[auth]
environment = "integration"

[[tenants]]
id = "tenant-a"
username = "svc"
password = "${PW}"
"#;

    /// `PW` and `POD_IP` are set; nothing else is.
    fn env(name: &str) -> Option<String> {
        (name == "PW" || name == "POD_IP").then(|| {
            if name == "PW" {
                "s3cret-value".to_string()
            } else {
                "10.1.2.3".to_string()
            }
        })
    }

    /// `text` as if read from `/etc/finhub/proxy.toml`.
    pub(super) fn load(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_toml(Path::new("/etc/finhub/proxy.toml"), text, &env)
    }

    /// The keys named by the errors of loading `text` (which must fail).
    pub(super) fn keys(text: &str) -> Vec<String> {
        load(text)
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| e.key)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = load(MINIMAL).expect("valid");
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.admin_listen, "127.0.0.1:9901".parse().unwrap());
        assert_eq!(c.upstream.host, "api.finhub.cloud");
        assert_eq!(c.upstream.port, 443);
        assert_eq!(c.upstream.host_header, "api.finhub.cloud");
        assert_eq!(c.auth.login_path, "/api/v2/auth/token");
        assert_eq!(c.auth.refresh_at, 0.92);
        assert_eq!(c.tenants[0].password.current().expose(), "s3cret-value");
        assert_eq!(c.policy.allowed_clients.len(), 2);
    }

    #[test]
    fn every_error_is_collected() {
        let text = MINIMAL
            .replace("https://api.finhub.cloud", "http://api.finhub.cloud")
            .replace("[auth]", "[upstream2]\n[auth]");
        // unknown table stops parsing: one error
        assert_eq!(load(&text).unwrap_err().0.len(), 1);
        let text = MINIMAL.replace(
            "https://api.finhub.cloud\"",
            "http://api.finhub.cloud\"\nconnect_timeout = \"soon\"",
        );
        let e = load(&text).unwrap_err();
        let keys: Vec<_> = e.0.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"upstream.base_url"), "{keys:?}");
        assert!(keys.contains(&"upstream.connect_timeout"), "{keys:?}");
    }
}
