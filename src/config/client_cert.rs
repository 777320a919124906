//! `[client_cert]`: the mTLS identity presented to FinHub, and how often its files are re-read.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::convert::{secs, Convert};
use super::EnvRules;

/// Default of `client_cert.reload_interval`, also used to poll the CA file without a client
/// certificate.
pub(super) const DEFAULT_RELOAD_INTERVAL: Duration = secs(5);

/// Default of `client_cert.expiry_warning`.
pub(super) const DEFAULT_EXPIRY_WARNING: Duration = secs(7 * 86_400);

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

/// `[client_cert]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileClientCert {
    /// PEM certificate chain, leaf first.
    cert_file: PathBuf,
    /// PEM private key matching the leaf.
    key_file: PathBuf,
    /// How often the files are re-read for rotation; default 5 s.
    reload_interval: Option<String>,
    /// Log a warning when the certificate expires within this window; default 7 days.
    expiry_warning: Option<String>,
}

impl Convert<'_> {
    /// `[client_cert]`, which production requires.
    pub(super) fn client_cert(
        &mut self,
        c: Option<FileClientCert>,
        rules: Option<EnvRules>,
    ) -> Option<ClientCertFiles> {
        let client_cert = c.map(|c| ClientCertFiles {
            cert_file: self.path(c.cert_file),
            key_file: self.path(c.key_file),
            reload_interval: self.duration(
                "client_cert.reload_interval",
                c.reload_interval.as_deref(),
                DEFAULT_RELOAD_INTERVAL,
            ),
            expiry_warning: self.duration(
                "client_cert.expiry_warning",
                c.expiry_warning.as_deref(),
                DEFAULT_EXPIRY_WARNING,
            ),
        });
        if client_cert.is_none() && rules.is_some_and(|r| r.requires_client_cert) {
            self.err(
                "client_cert",
                "production requires a client certificate (mTLS is mandatory)",
            );
        }
        client_cert
    }
}
