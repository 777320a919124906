//! The file layer's top: [`FileConfig`] mirrors `proxy.toml` (each section's own struct lives in
//! its section's module), and [`parse_file`] reads it, naming the key of any error without
//! quoting the file's text.

use std::path::Path;

use serde::Deserialize;

use super::admin::FileAdmin;
use super::audit::FileAudit;
use super::auth::FileAuth;
use super::client_cert::FileClientCert;
use super::convert::one_line;
use super::headers::FileHeaders;
use super::listener::FileListener;
use super::log::FileLog;
use super::policy::FilePolicy;
use super::retry::FileRetry;
use super::shutdown::FileShutdown;
use super::tenants::FileTenant;
use super::tracing::FileTracing;
use super::upstream::FileUpstream;
use super::ConfigError;

/// `proxy.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    /// `[listener]`: where apps connect.
    #[serde(default)]
    pub(super) listener: FileListener,
    /// `[admin]`: health, readiness and metrics listener.
    #[serde(default)]
    pub(super) admin: FileAdmin,
    /// `[upstream]`: the FinHub API.
    pub(super) upstream: FileUpstream,
    /// `[client_cert]`: mTLS identity presented to FinHub.
    pub(super) client_cert: Option<FileClientCert>,
    /// `[auth]`: login flavour and session settings.
    pub(super) auth: FileAuth,
    /// `[[tenants]]`: one session is kept per tenant.
    #[serde(default)]
    pub(super) tenants: Vec<FileTenant>,
    /// `[policy]`: who may use the proxy.
    #[serde(default)]
    pub(super) policy: FilePolicy,
    /// `[headers]`: compliance header values.
    #[serde(default)]
    pub(super) headers: FileHeaders,
    /// `[log]`: log format and level.
    #[serde(default)]
    pub(super) log: FileLog,
    /// `[shutdown]`: graceful drain timing.
    #[serde(default)]
    pub(super) shutdown: FileShutdown,
    /// `[retry]`: retries of FinHub's blips and their per-tenant budget.
    #[serde(default)]
    pub(super) retry: FileRetry,
    /// `[audit]`: the per-request audit line.
    #[serde(default)]
    pub(super) audit: FileAudit,
    /// `[tracing]`: OpenTelemetry traces (OTLP/HTTP); the `OTEL_*` variables otherwise.
    #[serde(default)]
    pub(super) tracing: FileTracing,
}

/// Parses `text` (read from `path`) into the file structs; the error names the key.
pub(super) fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::upstream::parse_base_url;

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
    fn wrong_type_names_the_key() {
        let text = MINIMAL.replace("[auth]", "[listener]\nthreads = \"two\"\n[auth]");
        let e = load(&text).unwrap_err();
        assert_eq!(e.0[0].key, "listener.threads");
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
}
