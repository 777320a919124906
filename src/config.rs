//! Configuration: TOML file structs, converted once into typed values.
//!
//! Two layers, as in River: the `File*` structs mirror `proxy.toml` exactly (`deny_unknown_fields`,
//! a doc comment on every key), and [`Config::load`] converts them into [`Config`], whose fields
//! are already typed (`SocketAddr`, `IpNet`, `Duration`, `HeaderValue`, [`Secret`]). Nothing
//! downstream re-parses a string. Every error names the file and the dotted key.
//!
//! Secrets are never taken inline: a secret key either names a file (`password_file`) or holds
//! exactly one `${ENV_VAR}` reference (`password = "${FINHUB_PASSWORD}"`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderValue;
use ipnet::IpNet;
use serde::Deserialize;

use crate::audit::AuditOutput;
use crate::policy::ratelimit::{Backend, Limit, RateLimitConfig, RouteLimit};
use crate::policy::redis_limit::{OnRedisError, RedisSettings};
use crate::secret::{Secret, SecretSource};

// ---------------------------------------------------------------------------------------------
// Public API: the typed configuration
// ---------------------------------------------------------------------------------------------

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
    /// Audit log.
    pub audit: AuditConfig,
    /// How app connections are accepted and read.
    pub listener: ListenerConfig,
    /// Admin listener options.
    pub admin: AdminConfig,
}

/// How app connections are accepted and their requests read (`[listener]`).
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// A request's header block must arrive whole within this time (408 and close).
    pub header_timeout: Duration,
    /// Open app connections beyond this are answered 503 and closed at accept.
    pub max_connections: usize,
    /// A request body must arrive whole within this from the request's start, and no read of it
    /// may wait longer (408 and close).
    pub body_timeout: Duration,
}

/// Admin listener options (`[admin]`).
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Whether `POST /shutdown` exists (from loopback peers only).
    pub shutdown_endpoint: bool,
}

/// Graceful shutdown timing.
#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    /// After SIGTERM, keep serving new requests this long (readiness is already false).
    pub drain_delay: Duration,
    /// Then wait at most this long for in-flight requests before stopping.
    pub deadline: Duration,
}

/// The FinHub upstream, resolved from `upstream.base_url`.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Host name (or IP literal) of the base URL, lower case.
    pub host: String,
    /// TCP port of the base URL (443 unless given).
    pub port: u16,
    /// `Host` header value sent upstream (`host` or `host:port`).
    pub host_header: HeaderValue,
    /// Optional CA bundle that verifies FinHub's server certificate (system roots otherwise).
    pub ca_file: Option<PathBuf>,
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Timeout waiting for each read from FinHub.
    pub read_timeout: Duration,
    /// Timeout for each write to FinHub.
    pub write_timeout: Duration,
    /// Idle pooled connections are closed after this long.
    pub idle_timeout: Duration,
    /// Keep-alive pool size (connections kept per worker).
    pub pool_size: usize,
    /// How often DNS for `host` is re-resolved in the background.
    pub dns_refresh: Duration,
    /// Host names an absolute-form (`HTTP_PROXY`) request may name, lower case, no port.
    pub allowed_hosts: Vec<String>,
}

/// Client certificate and key files (PEM).
#[derive(Debug, Clone)]
pub struct ClientCertFiles {
    /// Certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// How often the files are re-read.
    pub reload_interval: Duration,
    /// Warn when the certificate expires within this window.
    pub expiry_warning: Duration,
}

/// FinHub environment; selects the login flavour and how strict the checks are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Playground: sandbox token endpoint, client credentials in the body, mTLS optional.
    Playground,
    /// Sandbox: as playground.
    Sandbox,
    /// Integration: `/api/v2/auth/token`, no client credentials in the body.
    Integration,
    /// Production: `/api/v2/auth/token` over mandatory mTLS, strict checks.
    Production,
}

impl Environment {
    /// Whether this environment uses the sandbox token endpoint and body.
    pub fn is_sandbox_flavour(self) -> bool {
        matches!(self, Environment::Playground | Environment::Sandbox)
    }

    /// Default login path (protocol notes §2.2–2.4).
    pub fn default_login_path(self) -> &'static str {
        if self.is_sandbox_flavour() {
            "/api/v2/auth/sandbox/token"
        } else {
            "/api/v2/auth/token"
        }
    }

    /// Whether client credentials (`customerId`, `customerSecret`) go in the login body (A9).
    pub fn sends_client_credentials(self) -> bool {
        !matches!(self, Environment::Integration)
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Environment::Playground => "playground",
            Environment::Sandbox => "sandbox",
            Environment::Integration => "integration",
            Environment::Production => "production",
        })
    }
}

/// Login and session settings.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Which FinHub environment this is.
    pub environment: Environment,
    /// Login endpoint path.
    pub login_path: String,
    /// Refresh endpoint path.
    pub refresh_path: String,
    /// `accountType` sent verbatim (A11).
    pub account_type: String,
    /// `grantType` for the `/api/v2/auth/token` flavour.
    pub grant_type: String,
    /// Fraction of the token lifetime after which it is renewed (A4).
    pub refresh_at: f64,
    /// Timeout of one login or refresh call.
    pub request_timeout: Duration,
    /// Request bodies up to this size are kept to replay after a 401 (at most 64 KiB).
    pub replay_body_limit: usize,
    /// Logout endpoint path.
    pub logout_path: String,
    /// While a tenant has no usable session, a failed login is retried at least this often.
    pub recovery_interval: Duration,
    /// End each tenant's session with FinHub's logout during a graceful shutdown.
    pub logout_on_shutdown: bool,
    /// Bound on the whole logout at shutdown (all tenants together).
    pub logout_timeout: Duration,
}

/// One tenant the sidecar holds a session for.
#[derive(Debug, Clone)]
pub struct TenantConfig {
    /// FinHub tenant id, sent byte-exact as `X-Tenant-ID` (A16).
    pub id: String,
    /// `id` as a header value, built once.
    pub id_header: HeaderValue,
    /// Login user name.
    pub username: String,
    /// Login password (re-read from its file at each login).
    pub password: SecretSource,
    /// Client id (`customerId` / `customerKey`), if this environment sends it.
    pub customer_id: Option<String>,
    /// Client secret, if this environment sends it.
    pub customer_secret: Option<SecretSource>,
}

/// Request policy.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    /// TCP peers allowed to use the proxy.
    pub allowed_clients: Vec<IpNet>,
    /// TCP peers whose single-IP `X-Forwarded-For` is trusted as the end user's IP.
    pub trusted_forwarders: Vec<IpNet>,
    /// Requests whose header block is larger get 431.
    pub max_header_bytes: usize,
    /// Operator-added reserved path prefixes (normalised: lower case, no trailing slash),
    /// refused like the built-in auth and session surface.
    pub reserved_paths: Vec<String>,
    /// Rate limits.
    pub rate_limit: RateLimitConfig,
}

/// Values of headers the sidecar sets on FinHub calls.
#[derive(Debug, Clone)]
pub struct HeaderConfig {
    /// IP sent as `X-Forwarded-For` (the originating server's IP, §8).
    pub origin_ip: IpAddr,
    /// `origin_ip` as a header value, built once.
    pub origin_ip_header: HeaderValue,
    /// `User-Agent` used when the app sends none (and on login).
    pub user_agent: HeaderValue,
    /// `sec-ch-ua-platform` value.
    pub sec_ch_ua_platform: HeaderValue,
    /// `platform` value (v2.1 request-source platform, A18).
    pub platform: HeaderValue,
    /// `X-Forwarded-From` value (A18).
    pub forwarded_from: HeaderValue,
    /// `deviceId` value, stable per deployment (A18).
    pub device_id: HeaderValue,
    /// Whether `X-Forwarded-From`, `platform` and `deviceId` are sent (A18).
    pub v21_headers: bool,
    /// Whether an `X-Idempotency-Key` is generated for unsafe methods without one (A21).
    pub idempotency_keys: bool,
}

/// Audit log settings.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Where the lines go.
    pub output: AuditOutput,
    /// Keep the query string in the logged path.
    pub include_query: bool,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (default; for log shippers).
    Json,
    /// Human-readable lines for a terminal.
    Text,
}

/// Logging settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `finhub_sidecar=debug`; `RUST_LOG` wins.
    pub level: String,
}

/// One thing wrong with the configuration: which file, which key, what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {key}: {message}", file.display())]
pub struct ConfigError {
    /// The configuration file (or the file a key names, for file-content errors).
    pub file: PathBuf,
    /// Dotted key, e.g. `upstream.base_url` or `tenants[0].password_file`.
    pub key: String,
    /// What is wrong, never containing a secret.
    pub message: String,
}

/// Everything wrong with a configuration (at least one entry).
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and converts `path`, reading every secret file it names.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                key: "(file)".into(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        Self::from_toml(path, &text, &|name| std::env::var(name).ok())
    }

    /// Parses TOML text as if read from `path`; `env` looks up `${VAR}` references.
    pub fn from_toml(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let file: FileConfig = parse_file(path, text).map_err(|e| ConfigErrors(vec![e]))?;
        let mut cx = Convert {
            file: path.to_path_buf(),
            base_dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            env,
            errors: Vec::new(),
        };
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
}

// ---------------------------------------------------------------------------------------------
// File layer: mirrors proxy.toml
// ---------------------------------------------------------------------------------------------

/// `proxy.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// `[listener]`: where apps connect.
    #[serde(default)]
    listener: FileListener,
    /// `[admin]`: health, readiness and metrics listener.
    #[serde(default)]
    admin: FileAdmin,
    /// `[upstream]`: the FinHub API.
    upstream: FileUpstream,
    /// `[client_cert]`: mTLS identity presented to FinHub.
    client_cert: Option<FileClientCert>,
    /// `[auth]`: login flavour and session settings.
    auth: FileAuth,
    /// `[[tenants]]`: one session is kept per tenant.
    #[serde(default)]
    tenants: Vec<FileTenant>,
    /// `[policy]`: who may use the proxy.
    #[serde(default)]
    policy: FilePolicy,
    /// `[headers]`: compliance header values.
    #[serde(default)]
    headers: FileHeaders,
    /// `[log]`: log format and level.
    #[serde(default)]
    log: FileLog,
    /// `[shutdown]`: graceful drain timing.
    #[serde(default)]
    shutdown: FileShutdown,
    /// `[audit]`: the per-request audit line.
    #[serde(default)]
    audit: FileAudit,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileShutdown {
    /// After SIGTERM or `POST /shutdown`, keep serving this long while `/ready` is 503; default 5 s.
    drain_delay: Option<String>,
    /// Then wait at most this long for in-flight requests; default 20 s.
    deadline: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileListener {
    /// Listen address for app traffic; default `127.0.0.1:8080`.
    address: Option<String>,
    /// Proxy worker threads; default 2.
    threads: Option<usize>,
    /// A request's header block must arrive whole within this time, e.g. `"10s"`; default 10 s.
    header_timeout: Option<String>,
    /// Open app connections beyond this are refused (503, closed); default 1024.
    max_connections: Option<usize>,
    /// A request body must arrive whole within this, e.g. `"30s"`; default 30 s.
    body_timeout: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    /// Admin listen address; default `127.0.0.1:9901`.
    address: Option<String>,
    /// Serve `POST /shutdown` (loopback peers only); default false.
    #[serde(default)]
    shutdown_endpoint: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    /// FinHub base URL, `https://host[:port]`, no path.
    base_url: String,
    /// PEM CA bundle that signs FinHub's server certificate; system roots when absent.
    ca_file: Option<PathBuf>,
    /// TCP+TLS connect timeout, e.g. `"5s"`; default 5 s.
    connect_timeout: Option<String>,
    /// Per-read timeout; default 30 s. Expiry gives the app a 504.
    read_timeout: Option<String>,
    /// Per-write timeout; default 30 s.
    write_timeout: Option<String>,
    /// Idle keep-alive connections close after this; default 60 s.
    idle_timeout: Option<String>,
    /// Keep-alive pool size (idle FinHub connections kept for reuse); default 512.
    pool_size: Option<usize>,
    /// DNS re-resolution interval; default 30 s.
    dns_refresh: Option<String>,
    /// Extra host names apps may name in absolute-form requests (the base URL host is always allowed).
    #[serde(default)]
    extra_hosts: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileClientCert {
    /// PEM certificate chain, leaf first.
    cert_file: PathBuf,
    /// PEM private key matching the leaf.
    key_file: PathBuf,
    /// How often the files are re-read for rotation; default 5 s.
    reload_interval: Option<String>,
    /// Log a warning when the certificate expires within this window; default 7 days.
    expiry_warning: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    /// `playground`, `sandbox`, `integration` or `production`.
    environment: Environment,
    /// Login path; default per environment.
    login_path: Option<String>,
    /// Refresh path; default `/api/v2/auth/token/refresh`.
    refresh_path: Option<String>,
    /// `accountType` sent verbatim; default `B2B`.
    account_type: Option<String>,
    /// `grantType`; default `password`.
    grant_type: Option<String>,
    /// Renew after this fraction of the lifetime; default 0.92, range 0.5–0.97.
    refresh_at: Option<f64>,
    /// Timeout for one login/refresh call; default 10 s.
    request_timeout: Option<String>,
    /// Replay a request once after a 401 if its body is at most this many bytes; default and
    /// maximum 65536 (Pingora's retry buffer). 0 disables replays of requests with a body.
    replay_body_limit: Option<usize>,
    /// Logout path; default `/api/v2/auth/logout`.
    logout_path: Option<String>,
    /// While a tenant has no usable session, retry a failed login at least this often
    /// (jittered, `Retry-After` honoured); default 3 s, range 1–60 s.
    recovery_interval: Option<String>,
    /// Log each tenant's session out during a graceful shutdown; default true.
    logout_on_shutdown: Option<bool>,
    /// Bound on the logout at shutdown, all tenants together; default 2 s, at most 30 s.
    logout_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTenant {
    /// FinHub tenant id (`X-Tenant-ID`), opaque and case-sensitive.
    id: String,
    /// Use this tenant for requests without `X-Tenant-ID`; default: the first tenant.
    #[serde(default)]
    default: bool,
    /// Login user name.
    username: String,
    /// Password as a `${ENV_VAR}` reference.
    password: Option<String>,
    /// File holding the password (trailing newline ignored).
    password_file: Option<PathBuf>,
    /// Client id (`customerId`); not a secret.
    customer_id: Option<String>,
    /// Client secret as a `${ENV_VAR}` reference.
    customer_secret: Option<String>,
    /// File holding the client secret.
    customer_secret_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FilePolicy {
    /// CIDRs allowed to use the proxy (TCP peer address); default loopback only.
    allowed_clients: Option<Vec<String>>,
    /// CIDRs of proxies/ingresses whose single-IP `X-Forwarded-For` names the real end user.
    #[serde(default)]
    trusted_forwarders: Vec<String>,
    /// Largest accepted request header block in bytes; default 32768 (larger gets 431).
    max_header_bytes: Option<usize>,
    /// Path prefixes refused with 403 `reserved_path` besides FinHub's auth and session surface.
    #[serde(default)]
    reserved_paths: Vec<String>,
    /// `[policy.rate_limit]`: token buckets per tenant.
    #[serde(default)]
    rate_limit: FileRateLimit,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileRateLimit {
    /// Sustained requests per second per tenant; unset disables local limiting.
    rate: Option<u32>,
    /// Burst above the rate; default equal to `rate`.
    burst: Option<u32>,
    /// `[[policy.rate_limit.routes]]`: stricter buckets by method and path prefix.
    #[serde(default)]
    routes: Vec<FileRouteLimit>,
    /// `local` (default: each replica has the whole limit) or `redis` (one limit shared by every
    /// replica using the same Redis and key prefix).
    backend: Option<FileBackend>,
    /// `[policy.rate_limit.redis]`: the shared backend; required with `backend = "redis"`.
    redis: Option<FileRedis>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum FileBackend {
    Local,
    Redis,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum FileOnRedisError {
    Allow,
    Deny,
    Local,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRedis {
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRouteLimit {
    /// HTTP method to match (e.g. `POST`); unset matches every method.
    method: Option<String>,
    /// Path prefix to match, e.g. `/api/v2/auth`.
    path_prefix: String,
    /// Requests per second for this route, per tenant.
    rate: u32,
    /// Burst; default equal to `rate`.
    burst: Option<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileAudit {
    /// `stdout` (default), `off`, or a file path to append to.
    output: Option<String>,
    /// Keep the query string in the logged path (it may carry personal data); default false.
    #[serde(default)]
    include_query: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileHeaders {
    /// Originating IP sent as `X-Forwarded-For`, e.g. `"${POD_IP}"`; default 127.0.0.1 (not in production).
    origin_ip: Option<String>,
    /// Default `User-Agent`; default `finhub-sidecar/<version> rust/<rustc version>`.
    user_agent: Option<String>,
    /// `sec-ch-ua-platform`; default `Linux` (unquoted, A19).
    sec_ch_ua_platform: Option<String>,
    /// `platform` (v2.1); default `server`.
    platform: Option<String>,
    /// `X-Forwarded-From` (v2.1 request source); default `finhub-sidecar`.
    forwarded_from: Option<String>,
    /// `deviceId` (v2.1), stable per deployment; default `finhub-sidecar`.
    device_id: Option<String>,
    /// Send `X-Forwarded-From`, `platform` and `deviceId` on every request; default true.
    v21_headers: Option<bool>,
    /// Generate `X-Idempotency-Key` for POST/PUT/PATCH/DELETE without one; default true.
    idempotency_keys: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileLog {
    /// `json` (default) or `text`.
    format: Option<LogFormat>,
    /// Filter directive; default `info`. `RUST_LOG` overrides it.
    level: Option<String>,
}

fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        key: "(syntax)".into(),
        message: describe(&e, text),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        ConfigError {
            file: path.to_path_buf(),
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            message: describe(&e.into_inner(), text),
        }
    })
}

/// The parser's message and position only: toml's own Display quotes the offending source line,
/// which could hold a secret someone typed inline.
fn describe(e: &toml::de::Error, text: &str) -> String {
    let msg = one_line(e.message());
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("{msg} (line {line}, column {column})")
        }
        None => msg,
    }
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// Conversion: file structs -> typed config, collecting every error
// ---------------------------------------------------------------------------------------------

struct Convert<'a> {
    file: PathBuf,
    base_dir: PathBuf,
    env: &'a dyn Fn(&str) -> Option<String>,
    errors: Vec<ConfigError>,
}

impl Convert<'_> {
    fn err(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            key: key.into(),
            message: message.into(),
        });
    }

    fn config(&mut self, f: FileConfig) -> Option<Config> {
        let listen = self.addr(
            "listener.address",
            f.listener.address.as_deref(),
            "127.0.0.1:8080",
        );
        let threads = f.listener.threads.unwrap_or(2);
        if threads == 0 || threads > 256 {
            self.err("listener.threads", "must be between 1 and 256");
        }
        let admin_listen = self.addr(
            "admin.address",
            f.admin.address.as_deref(),
            "127.0.0.1:9901",
        );
        let header_timeout = self.duration(
            "listener.header_timeout",
            f.listener.header_timeout.as_deref(),
            secs(10),
        );
        if header_timeout > secs(300) {
            self.err("listener.header_timeout", "must be at most 5m");
        }
        let max_connections = f.listener.max_connections.unwrap_or(1024);
        if max_connections == 0 || max_connections > 1_000_000 {
            self.err("listener.max_connections", "must be between 1 and 1000000");
        }
        let body_timeout = self.duration(
            "listener.body_timeout",
            f.listener.body_timeout.as_deref(),
            secs(30),
        );
        if body_timeout > secs(3600) {
            self.err("listener.body_timeout", "must be at most 1h");
        }
        let listener = ListenerConfig {
            header_timeout,
            max_connections,
            body_timeout,
        };
        let admin = AdminConfig {
            shutdown_endpoint: f.admin.shutdown_endpoint,
        };
        let auth = self.auth(f.auth);
        let upstream = self.upstream(f.upstream);
        let client_cert = f.client_cert.map(|c| ClientCertFiles {
            cert_file: self.path(c.cert_file),
            key_file: self.path(c.key_file),
            reload_interval: self.duration(
                "client_cert.reload_interval",
                c.reload_interval.as_deref(),
                secs(5),
            ),
            expiry_warning: self.duration(
                "client_cert.expiry_warning",
                c.expiry_warning.as_deref(),
                secs(7 * 86_400),
            ),
        });
        if client_cert.is_none()
            && auth.as_ref().map(|a| a.environment) == Some(Environment::Production)
        {
            self.err(
                "client_cert",
                "production requires a client certificate (mTLS is mandatory)",
            );
        }
        let (tenants, default_tenant) =
            self.tenants(f.tenants, auth.as_ref().map(|a| a.environment));
        let policy = self.policy(f.policy);
        let headers = self.headers(f.headers, auth.as_ref().map(|a| a.environment));
        let shutdown = ShutdownConfig {
            drain_delay: self.duration_or_zero(
                "shutdown.drain_delay",
                f.shutdown.drain_delay.as_deref(),
                secs(5),
            ),
            deadline: self.duration(
                "shutdown.deadline",
                f.shutdown.deadline.as_deref(),
                secs(20),
            ),
        };
        let audit = AuditConfig {
            output: match f.audit.output.as_deref().map(str::trim) {
                None | Some("stdout") => AuditOutput::Stdout,
                Some("off") => AuditOutput::Off,
                Some("") => {
                    self.err("audit.output", "must be stdout, off, or a file path");
                    AuditOutput::Off
                }
                Some(p) => AuditOutput::File(self.path(PathBuf::from(p))),
            },
            include_query: f.audit.include_query,
        };
        let log = LogConfig {
            format: f.log.format.unwrap_or(LogFormat::Json),
            level: f.log.level.unwrap_or_else(|| "info".into()),
        };
        Some(Config {
            file: self.file.clone(),
            listen: listen?,
            threads,
            admin_listen: admin_listen?,
            upstream: upstream?,
            client_cert,
            auth: auth?,
            tenants,
            default_tenant,
            policy: policy?,
            headers: headers?,
            log,
            shutdown,
            audit,
            listener,
            admin,
        })
    }

    fn path(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() {
            p
        } else {
            self.base_dir.join(p)
        }
    }

    fn addr(&mut self, key: &str, value: Option<&str>, default: &str) -> Option<SocketAddr> {
        let v = value.unwrap_or(default);
        match v.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(key, format!("`{v}` is not an IP:port socket address"));
                None
            }
        }
    }

    fn duration(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(v) => match humantime::parse_duration(v) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    self.err(key, "must be greater than zero");
                    default
                }
                Err(e) => {
                    self.err(
                        key,
                        format!("`{v}` is not a duration like \"5s\" or \"250ms\": {e}"),
                    );
                    default
                }
            },
        }
    }

    /// Like [`Self::duration`] but `"0s"` is allowed.
    fn duration_or_zero(&mut self, key: &str, value: Option<&str>, default: Duration) -> Duration {
        match value.map(str::trim) {
            Some("0" | "0s") => Duration::ZERO,
            other => self.duration(key, other, default),
        }
    }

    fn upstream(&mut self, u: FileUpstream) -> Option<UpstreamConfig> {
        let parsed = parse_base_url(&u.base_url).map_err(|m| self.err("upstream.base_url", m));
        let connect_timeout = self.duration(
            "upstream.connect_timeout",
            u.connect_timeout.as_deref(),
            secs(5),
        );
        let read_timeout =
            self.duration("upstream.read_timeout", u.read_timeout.as_deref(), secs(30));
        let write_timeout = self.duration(
            "upstream.write_timeout",
            u.write_timeout.as_deref(),
            secs(30),
        );
        let idle_timeout =
            self.duration("upstream.idle_timeout", u.idle_timeout.as_deref(), secs(60));
        let dns_refresh = self.duration("upstream.dns_refresh", u.dns_refresh.as_deref(), secs(30));
        let pool_size = u.pool_size.unwrap_or(512);
        if pool_size == 0 {
            self.err("upstream.pool_size", "must be at least 1");
        }
        let mut extra = Vec::new();
        for (i, h) in u.extra_hosts.iter().enumerate() {
            let h = h.trim().to_ascii_lowercase();
            if h.is_empty() || h.contains(['/', ':', '@', ' ']) {
                self.err(
                    format!("upstream.extra_hosts[{i}]"),
                    format!("`{h}` is not a bare host name"),
                );
            } else {
                extra.push(h);
            }
        }
        let ca_file = u.ca_file.map(|p| self.path(p));
        let (host, port) = parsed.ok()?;
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let host_header = if port == 443 {
            bracketed
        } else {
            format!("{bracketed}:{port}")
        };
        let host_header = HeaderValue::from_str(&host_header).ok()?;
        let mut allowed_hosts = vec![host.clone()];
        allowed_hosts.extend(extra);
        Some(UpstreamConfig {
            host,
            port,
            host_header,
            ca_file,
            connect_timeout,
            read_timeout,
            write_timeout,
            idle_timeout,
            pool_size,
            dns_refresh,
            allowed_hosts,
        })
    }

    fn auth(&mut self, a: FileAuth) -> Option<AuthConfig> {
        let env = a.environment;
        let login_path = a
            .login_path
            .unwrap_or_else(|| env.default_login_path().to_string());
        let refresh_path = a
            .refresh_path
            .unwrap_or_else(|| "/api/v2/auth/token/refresh".to_string());
        let logout_path = a
            .logout_path
            .unwrap_or_else(|| "/api/v2/auth/logout".to_string());
        for (key, p) in [
            ("auth.login_path", &login_path),
            ("auth.refresh_path", &refresh_path),
            ("auth.logout_path", &logout_path),
        ] {
            if !p.starts_with('/') || p.contains(char::is_whitespace) {
                self.err(
                    key,
                    format!("`{p}` must be an absolute path starting with /"),
                );
            }
        }
        let refresh_at = a.refresh_at.unwrap_or(0.92);
        if !(0.5..=0.97).contains(&refresh_at) {
            self.err(
                "auth.refresh_at",
                format!(
                    "{refresh_at} is outside 0.5–0.97 (FinHub only refreshes in the last 10 %)"
                ),
            );
        }
        let request_timeout = self.duration(
            "auth.request_timeout",
            a.request_timeout.as_deref(),
            secs(10),
        );
        let replay_body_limit = a.replay_body_limit.unwrap_or(MAX_REPLAY_BODY);
        if replay_body_limit > MAX_REPLAY_BODY {
            self.err(
                "auth.replay_body_limit",
                format!("{replay_body_limit} exceeds {MAX_REPLAY_BODY} (the proxy's retry buffer)"),
            );
        }
        let recovery_interval = self.duration(
            "auth.recovery_interval",
            a.recovery_interval.as_deref(),
            secs(3),
        );
        if !(secs(1)..=secs(60)).contains(&recovery_interval) {
            self.err(
                "auth.recovery_interval",
                "must be between 1s and 60s (apps fail until the session is back)",
            );
        }
        let logout_timeout =
            self.duration("auth.logout_timeout", a.logout_timeout.as_deref(), secs(2));
        if logout_timeout > secs(30) {
            self.err(
                "auth.logout_timeout",
                "must be at most 30s (it delays the process exit)",
            );
        }
        Some(AuthConfig {
            environment: env,
            replay_body_limit,
            login_path,
            refresh_path,
            logout_path,
            recovery_interval,
            logout_on_shutdown: a.logout_on_shutdown.unwrap_or(true),
            logout_timeout,
            account_type: a.account_type.unwrap_or_else(|| "B2B".into()),
            grant_type: a.grant_type.unwrap_or_else(|| "password".into()),
            refresh_at,
            request_timeout,
        })
    }

    fn tenants(
        &mut self,
        tenants: Vec<FileTenant>,
        env: Option<Environment>,
    ) -> (Vec<TenantConfig>, usize) {
        if tenants.is_empty() {
            self.err("tenants", "at least one [[tenants]] entry is required");
        }
        let mut out = Vec::new();
        let mut default = None;
        for (i, t) in tenants.into_iter().enumerate() {
            let key = format!("tenants[{i}]");
            if t.default {
                if default.is_some() {
                    self.err(
                        format!("{key}.default"),
                        "more than one tenant is marked default",
                    );
                }
                default = Some(i);
            }
            if out.iter().any(|o: &TenantConfig| o.id == t.id) {
                self.err(
                    format!("{key}.id"),
                    format!("duplicate tenant id `{}`", t.id),
                );
            }
            let id_header = match HeaderValue::from_str(&t.id) {
                Ok(h) if !t.id.is_empty() => h,
                _ => {
                    self.err(
                        format!("{key}.id"),
                        "must be a non-empty printable header value",
                    );
                    continue;
                }
            };
            if t.username.is_empty() {
                self.err(format!("{key}.username"), "must not be empty");
            }
            let password = self.secret(&key, "password", t.password, t.password_file, true);
            let customer_secret = self.secret(
                &key,
                "customer_secret",
                t.customer_secret,
                t.customer_secret_file,
                false,
            );
            if env.is_some_and(Environment::sends_client_credentials)
                && env != Some(Environment::Production)
                && (t.customer_id.is_none() || customer_secret.is_none())
            {
                self.err(
                    format!("{key}.customer_id"),
                    "playground/sandbox logins need customer_id and customer_secret",
                );
            }
            if let Some(password) = password {
                out.push(TenantConfig {
                    id: t.id,
                    id_header,
                    username: t.username,
                    password,
                    customer_id: t.customer_id,
                    customer_secret,
                });
            }
        }
        (out, default.unwrap_or(0))
    }

    /// A secret given as `${ENV}` in `name` or as a file in `name_file`, exactly one of them.
    fn secret(
        &mut self,
        prefix: &str,
        name: &str,
        inline: Option<String>,
        file: Option<PathBuf>,
        required: bool,
    ) -> Option<SecretSource> {
        let key = format!("{prefix}.{name}");
        let file_key = format!("{prefix}.{name}_file");
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.err(&key, format!("set either {name} or {name}_file, not both"));
                None
            }
            (None, None) => {
                if required {
                    self.err(
                        &key,
                        format!(
                            "missing: set {name} = \"${{ENV_VAR}}\" or {name}_file = \"/path\""
                        ),
                    );
                }
                None
            }
            (Some(v), None) => match env_reference(&v) {
                Some(var) => match (self.env)(var) {
                    Some(val) if !val.is_empty() => Some(SecretSource::fixed(Secret::new(val))),
                    _ => {
                        self.err(
                            &key,
                            format!("environment variable {var} is not set or empty"),
                        );
                        None
                    }
                },
                None => {
                    self.err(
                        &key,
                        format!(
                            "secrets are not accepted inline; use {name} = \"${{ENV_VAR}}\" or {name}_file"
                        ),
                    );
                    None
                }
            },
            (None, Some(p)) => {
                let p = self.path(p);
                match std::fs::read_to_string(&p) {
                    Ok(s) => {
                        let s = s.trim_end_matches(['\n', '\r']);
                        if s.is_empty() {
                            self.err(&file_key, format!("{} is empty", p.display()));
                            None
                        } else {
                            Some(SecretSource::file(Secret::new(s), p.clone()))
                        }
                    }
                    Err(e) => {
                        self.err(&file_key, format!("cannot read {}: {e}", p.display()));
                        None
                    }
                }
            }
        }
    }

    fn policy(&mut self, p: FilePolicy) -> Option<PolicyConfig> {
        let raw = p
            .allowed_clients
            .unwrap_or_else(|| vec!["127.0.0.0/8".into(), "::1/128".into()]);
        let mut allowed_clients = Vec::new();
        for (i, c) in raw.iter().enumerate() {
            let parsed = c
                .parse::<IpNet>()
                .or_else(|_| c.parse::<IpAddr>().map(IpNet::from));
            match parsed {
                Ok(n) => allowed_clients.push(n),
                Err(_) => self.err(
                    format!("policy.allowed_clients[{i}]"),
                    format!("`{c}` is not a CIDR or IP address"),
                ),
            }
        }
        let mut trusted_forwarders = Vec::new();
        for (i, c) in p.trusted_forwarders.iter().enumerate() {
            match c
                .parse::<IpNet>()
                .or_else(|_| c.parse::<IpAddr>().map(IpNet::from))
            {
                Ok(n) => trusted_forwarders.push(n),
                Err(_) => self.err(
                    format!("policy.trusted_forwarders[{i}]"),
                    format!("`{c}` is not a CIDR or IP address"),
                ),
            }
        }
        let max_header_bytes = p.max_header_bytes.unwrap_or(32 * 1024);
        if max_header_bytes < 1024 {
            self.err("policy.max_header_bytes", "must be at least 1024");
        }
        let mut reserved_paths = Vec::new();
        for (i, raw) in p.reserved_paths.iter().enumerate() {
            match crate::policy::path::normalise_prefix(raw) {
                Some(prefix) => reserved_paths.push(prefix),
                None => self.err(
                    format!("policy.reserved_paths[{i}]"),
                    format!(
                        "`{}` is not a canonical absolute path like \"/api/v2/admin\"",
                        one_line(raw)
                    ),
                ),
            }
        }
        let rate_limit = self.rate_limit(p.rate_limit);
        Some(PolicyConfig {
            allowed_clients,
            trusted_forwarders,
            max_header_bytes,
            reserved_paths,
            rate_limit,
        })
    }

    fn limit(&mut self, key: &str, rate: u32, burst: Option<u32>) -> Option<Limit> {
        let per_second = std::num::NonZeroU32::new(rate);
        let burst = std::num::NonZeroU32::new(burst.unwrap_or(rate));
        match (per_second, burst) {
            (Some(per_second), Some(burst)) => Some(Limit { per_second, burst }),
            _ => {
                self.err(key, "rate and burst must be at least 1");
                None
            }
        }
    }

    fn rate_limit(&mut self, r: FileRateLimit) -> RateLimitConfig {
        let default = match r.rate {
            Some(rate) => self.limit("policy.rate_limit.rate", rate, r.burst),
            None => {
                if r.burst.is_some() {
                    self.err("policy.rate_limit.burst", "burst needs rate");
                }
                None
            }
        };
        let mut routes = Vec::new();
        for (i, route) in r.routes.into_iter().enumerate() {
            let key = format!("policy.rate_limit.routes[{i}]");
            let method = match route.method.as_deref() {
                None => None,
                Some(m) => match http::Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
                {
                    Ok(m) => Some(m),
                    Err(_) => {
                        self.err(
                            format!("{key}.method"),
                            format!("`{m}` is not an HTTP method"),
                        );
                        continue;
                    }
                },
            };
            if !route.path_prefix.starts_with('/') {
                self.err(format!("{key}.path_prefix"), "must start with /");
                continue;
            }
            if let Some(limit) = self.limit(&format!("{key}.rate"), route.rate, route.burst) {
                routes.push(RouteLimit {
                    method,
                    path_prefix: route.path_prefix,
                    limit,
                });
            }
        }
        let enabled = default.is_some() || !routes.is_empty();
        let backend = match (r.backend.unwrap_or(FileBackend::Local), r.redis) {
            (FileBackend::Local, None) => Backend::Local,
            (FileBackend::Local, Some(_)) => {
                self.err(
                    "policy.rate_limit.redis",
                    "set policy.rate_limit.backend = \"redis\" to use it (or remove this table)",
                );
                Backend::Local
            }
            (FileBackend::Redis, None) => {
                self.err(
                    "policy.rate_limit.redis",
                    "missing: backend = \"redis\" needs [policy.rate_limit.redis] with a url",
                );
                Backend::Local
            }
            (FileBackend::Redis, Some(redis)) => {
                if !enabled {
                    self.err(
                        "policy.rate_limit.backend",
                        "redis shares limits, but neither rate nor routes is set",
                    );
                }
                self.redis(redis)
                    .map_or(Backend::Local, |s| Backend::Redis(Box::new(s)))
            }
        };
        RateLimitConfig {
            default,
            routes,
            backend,
        }
    }

    fn redis(&mut self, r: FileRedis) -> Option<RedisSettings> {
        const KEY: &str = "policy.rate_limit.redis";
        const NOT_A_REDIS_URL: &str = "not a redis:// or rediss:// URL (redis://host:6379/0)";
        let url = r.url.trim();
        let tls = url.starts_with("rediss://");
        let connection = if !tls && !url.starts_with("redis://") {
            // The URL is not echoed: a malformed one may still hold credentials.
            self.err(format!("{KEY}.url"), NOT_A_REDIS_URL);
            None
        } else if url.contains('#') {
            self.err(
                format!("{KEY}.url"),
                "URL fragments such as #insecure are not accepted: the server certificate is always verified",
            );
            None
        } else {
            match redis::IntoConnectionInfo::into_connection_info(url) {
                Ok(c) if c.redis_settings().password().is_some() => {
                    self.err(
                        format!("{KEY}.url"),
                        "must not contain a password; use password_file or password = \"${ENV_VAR}\"",
                    );
                    None
                }
                Ok(c) => Some(c),
                Err(_) => {
                    self.err(format!("{KEY}.url"), NOT_A_REDIS_URL);
                    None
                }
            }
        };
        if r.ca_file.is_some() && !tls {
            self.err(format!("{KEY}.ca_file"), "needs a rediss:// url (TLS)");
        }
        let user_without_password = connection
            .as_ref()
            .is_some_and(|c| c.redis_settings().username().is_some())
            && r.password.is_none()
            && r.password_file.is_none();
        if user_without_password {
            self.err(
                format!("{KEY}.password"),
                "missing: the url names a user, which needs password_file or password = \"${ENV_VAR}\"",
            );
        }
        let password = self.secret(KEY, "password", r.password, r.password_file, false);
        let ca_pem = r.ca_file.and_then(|p| {
            let p = self.path(p);
            match std::fs::read(&p) {
                Ok(pem) if pem_has_certificates(&pem) => Some(pem),
                Ok(_) => {
                    self.err(
                        format!("{KEY}.ca_file"),
                        format!("{} holds no readable PEM certificate", p.display()),
                    );
                    None
                }
                Err(e) => {
                    self.err(
                        format!("{KEY}.ca_file"),
                        format!("cannot read {}: {e}", p.display()),
                    );
                    None
                }
            }
        });
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
        Some(RedisSettings {
            connection: connection?,
            password,
            ca_pem,
            key_prefix,
            timeout,
            connect_timeout,
            connections: connections?,
            on_error: on_error?,
        })
    }

    fn headers(&mut self, h: FileHeaders, env: Option<Environment>) -> Option<HeaderConfig> {
        let origin_ip = match h.origin_ip {
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(v) => {
                let resolved = match env_reference(&v) {
                    Some(var) => (self.env)(var).unwrap_or_default(),
                    None => v.clone(),
                };
                match resolved.trim().parse::<IpAddr>() {
                    Ok(ip) => ip,
                    Err(_) => {
                        self.err(
                            "headers.origin_ip",
                            format!("`{v}` is not (or does not expand to) an IP address"),
                        );
                        return None;
                    }
                }
            }
        };
        if env == Some(Environment::Production) && origin_ip.is_loopback() {
            self.err(
                "headers.origin_ip",
                "production needs the real originating IP (e.g. \"${POD_IP}\"), not loopback",
            );
        }
        let default_ua = format!(
            "finhub-sidecar/{} rust/{}",
            env!("CARGO_PKG_VERSION"),
            env!("FINHUB_RUSTC_VERSION")
        );
        let user_agent = self.header_value("headers.user_agent", h.user_agent, &default_ua);
        let sec_ch_ua_platform =
            self.header_value("headers.sec_ch_ua_platform", h.sec_ch_ua_platform, "Linux");
        let platform = self.header_value("headers.platform", h.platform, "server");
        let forwarded_from =
            self.header_value("headers.forwarded_from", h.forwarded_from, "finhub-sidecar");
        let device_id = self.header_value("headers.device_id", h.device_id, "finhub-sidecar");
        let origin_ip_header = HeaderValue::from_str(&origin_ip.to_string()).ok()?;
        Some(HeaderConfig {
            origin_ip,
            origin_ip_header,
            user_agent: user_agent?,
            sec_ch_ua_platform: sec_ch_ua_platform?,
            platform: platform?,
            forwarded_from: forwarded_from?,
            device_id: device_id?,
            v21_headers: h.v21_headers.unwrap_or(true),
            idempotency_keys: h.idempotency_keys.unwrap_or(true),
        })
    }

    fn header_value(&mut self, key: &str, v: Option<String>, default: &str) -> Option<HeaderValue> {
        let v = v.unwrap_or_else(|| default.to_string());
        match HeaderValue::from_str(&v) {
            Ok(h) if !v.is_empty() && v.is_ascii() => Some(h),
            _ => {
                self.err(key, "must be a non-empty printable ASCII header value");
                None
            }
        }
    }
}

/// Pingora keeps at most 64 KiB of a request body for retries.
const MAX_REPLAY_BODY: usize = 64 * 1024;

/// Whether `pem` holds at least one certificate and every certificate block in it parses.
fn pem_has_certificates(pem: &[u8]) -> bool {
    use rustls_pki_types::pem::PemObject;
    let mut any = false;
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
        if cert.is_err() {
            return false;
        }
        any = true;
    }
    any
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// `${NAME}` -> `NAME`; anything else -> `None`.
fn env_reference(v: &str) -> Option<&str> {
    let name = v.trim().strip_prefix("${")?.strip_suffix('}')?;
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    valid.then_some(name)
}

/// `https://host[:port][/]` -> (lower-case host, port).
fn parse_base_url(url: &str) -> Result<(String, u16), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!(
            "`{url}` must use https:// (FinHub is only reached over TLS)"
        ));
    }
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(format!("`{url}` must not have a path or query"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{url}` has no host"))?;
    if authority.as_str().contains('@') {
        // Not echoed: the user info may be a credential.
        return Err("the base URL must not contain user info (`user:password@`)".into());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    Ok((host, authority.port_u16().unwrap_or(443)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[upstream]
base_url = "https://api.finhub.cloud"

[auth]
environment = "integration"

[[tenants]]
id = "tenant-a"
username = "svc"
password = "${PW}"
"#;

    fn env(name: &str) -> Option<String> {
        (name == "PW" || name == "POD_IP").then(|| {
            if name == "PW" {
                "s3cret-value".to_string()
            } else {
                "10.1.2.3".to_string()
            }
        })
    }

    fn load(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_toml(Path::new("/etc/finhub/proxy.toml"), text, &env)
    }

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
    fn unknown_key_is_named_with_its_section() {
        let text = MINIMAL.replace("[auth]", "[auth]\nfoo = 1");
        let e = load(&text).unwrap_err();
        assert_eq!(e.0[0].key, "auth.foo");
        assert!(
            e.to_string()
                .starts_with("/etc/finhub/proxy.toml: auth.foo:"),
            "{e}"
        );
    }

    #[test]
    fn listener_admin_and_reserved_path_settings() {
        let c = load(MINIMAL).expect("valid");
        assert_eq!(c.listener.header_timeout, secs(10));
        assert_eq!(c.listener.max_connections, 1024);
        assert_eq!(c.listener.body_timeout, secs(30));
        assert!(!c.admin.shutdown_endpoint);
        assert!(c.policy.reserved_paths.is_empty());
        let text = MINIMAL.replace(
            "[auth]",
            "[listener]\nheader_timeout = \"3s\"\nmax_connections = 10\n[admin]\nshutdown_endpoint = true\n[policy]\nreserved_paths = [\"/API/v3/Login/\"]\n[auth]",
        );
        let c = load(&text).expect("valid");
        assert_eq!(c.listener.header_timeout, secs(3));
        assert_eq!(c.listener.max_connections, 10);
        assert!(c.admin.shutdown_endpoint);
        assert_eq!(c.policy.reserved_paths, ["/api/v3/login"]);
        for (bad, key) in [
            (
                "[listener]\nheader_timeout = \"0s\"",
                "listener.header_timeout",
            ),
            (
                "[listener]\nheader_timeout = \"1h\"",
                "listener.header_timeout",
            ),
            (
                "[listener]\nmax_connections = 0",
                "listener.max_connections",
            ),
            ("[listener]\nbody_timeout = \"2h\"", "listener.body_timeout"),
            (
                "[policy]\nreserved_paths = [\"api/x\"]",
                "policy.reserved_paths[0]",
            ),
            (
                "[policy]\nreserved_paths = [\"/a/../b\"]",
                "policy.reserved_paths[0]",
            ),
            (
                "[policy]\nreserved_paths = [\"/\"]",
                "policy.reserved_paths[0]",
            ),
        ] {
            let e = load(&MINIMAL.replace("[auth]", &format!("{bad}\n[auth]"))).unwrap_err();
            assert_eq!(e.0[0].key, key, "{bad}: {e}");
        }
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = MINIMAL.replace("[auth]", "[listener]\nthreads = \"two\"\n[auth]");
        let e = load(&text).unwrap_err();
        assert_eq!(e.0[0].key, "listener.threads");
    }

    #[test]
    fn inline_secret_is_refused_without_echoing_it() {
        let text = MINIMAL.replace("${PW}", "plain-text-password");
        let e = load(&text).unwrap_err();
        assert_eq!(e.0[0].key, "tenants[0].password");
        assert!(!e.to_string().contains("plain-text-password"));
    }

    #[test]
    fn syntax_errors_do_not_quote_the_line() {
        let text = MINIMAL.replace(
            "username = \"svc\"",
            "pasword = \"hunter2-inline\"\nusername = \"svc\"",
        );
        let e = load(&text).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert_eq!(e.0[0].key, "tenants[0].pasword");
        let broken = MINIMAL.replace("username = \"svc\"", "password2 = hunter2-unquoted");
        let e = load(&broken).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert!(e.to_string().contains("line "), "{e}");
        let e = parse_base_url("https://user:s3cr3t@api.finhub.cloud").unwrap_err();
        assert!(!e.contains("s3cr3t"));
    }

    #[test]
    fn missing_env_var_is_reported() {
        let text = MINIMAL.replace("${PW}", "${NOPE}");
        let e = load(&text).unwrap_err();
        assert!(e.0[0].message.contains("NOPE"));
    }

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

    #[test]
    fn session_continuity_keys_have_defaults_and_bounds() {
        let c = load(MINIMAL).expect("valid");
        assert_eq!(c.auth.recovery_interval, Duration::from_secs(3));
        assert!(c.auth.logout_on_shutdown);
        assert_eq!(c.auth.logout_timeout, Duration::from_secs(2));
        assert_eq!(c.auth.logout_path, "/api/v2/auth/logout");
        let c = load(&MINIMAL.replace(
            "[auth]",
            "[auth]\nrecovery_interval = \"5s\"\nlogout_on_shutdown = false\nlogout_timeout = \"500ms\"\nlogout_path = \"/v2/logout\"",
        ))
        .expect("valid");
        assert_eq!(c.auth.recovery_interval, Duration::from_secs(5));
        assert!(!c.auth.logout_on_shutdown);
        assert_eq!(c.auth.logout_timeout, Duration::from_millis(500));
        assert_eq!(c.auth.logout_path, "/v2/logout");
        for (line, key) in [
            ("recovery_interval = \"200ms\"", "auth.recovery_interval"),
            ("recovery_interval = \"5m\"", "auth.recovery_interval"),
            ("recovery_interval = \"often\"", "auth.recovery_interval"),
            ("logout_timeout = \"0s\"", "auth.logout_timeout"),
            ("logout_timeout = \"1m\"", "auth.logout_timeout"),
            ("logout_on_shutdown = \"yes\"", "auth.logout_on_shutdown"),
            ("logout_path = \"logout\"", "auth.logout_path"),
        ] {
            let e = load(&MINIMAL.replace("[auth]", &format!("[auth]\n{line}"))).unwrap_err();
            assert_eq!(e.0[0].key, key, "{line}: {e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("/etc/finhub/proxy.toml: {key}:")),
                "{e}"
            );
        }
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

    #[test]
    fn production_needs_cert_and_real_origin_ip() {
        let text = MINIMAL.replace("integration", "production");
        let e = load(&text).unwrap_err();
        let keys: Vec<_> = e.0.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"client_cert"), "{keys:?}");
        assert!(keys.contains(&"headers.origin_ip"), "{keys:?}");
        let ok = format!(
            "{}\n[client_cert]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n[headers]\norigin_ip = \"${{POD_IP}}\"\n",
            text
        );
        let c = load(&ok).expect("valid");
        assert_eq!(c.headers.origin_ip, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(
            c.client_cert.unwrap().cert_file,
            PathBuf::from("/etc/finhub/c.pem")
        );
    }

    #[test]
    fn base_url_forms() {
        assert_eq!(
            parse_base_url("https://localhost:8443").unwrap(),
            ("localhost".into(), 8443)
        );
        assert_eq!(
            parse_base_url("https://API.finhub.cloud/").unwrap().0,
            "api.finhub.cloud"
        );
        assert!(parse_base_url("https://api.finhub.cloud/api").is_err());
        assert!(parse_base_url("ftp://x").is_err());
    }
}
