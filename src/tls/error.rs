//! Why a set of TLS files cannot be used (never carrying key material), and which setting an
//! operator fixes for each.

use std::path::{Path, PathBuf};

use super::pkcs11::TokenError;
use super::rules::Finding;

/// Why a set of TLS files cannot be used. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM block of the expected kind.
    #[error("{}: {what}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The key does not belong to the leaf certificate, or is of an unsupported kind.
    #[error("{}: {what}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The leaf breaks FinHub's certificate rules (enforced in production).
    #[error("{}: {}", path.display(), join(findings))]
    Rules {
        /// The certificate file.
        path: PathBuf,
        /// Every rule it breaks.
        findings: Vec<Finding>,
    },
    /// The PKCS#11 token holding the key failed (`key` names the setting to fix, if one is).
    #[error("{uri}: {error}")]
    Token {
        /// `client_cert.key_uri` as configured.
        uri: String,
        /// What went wrong.
        error: TokenError,
    },
    /// The certificate is not for the token's key (a test signature by the token does not
    /// verify with the certificate's public key), or of a kind the token key is not.
    #[error("{}: {what}", path.display())]
    TokenKeyMismatch {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The TLS provider refused the protocol settings (no file is at fault).
    #[error("TLS provider: {0}")]
    Provider(String),
    /// Production without a client certificate (mTLS is mandatory there).
    #[error("production requires a client certificate (mTLS is mandatory)")]
    MissingClientCert,
}

fn join(findings: &[Finding]) -> String {
    findings
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl TlsError {
    /// The file the error is about, if a file is.
    pub fn path(&self) -> Option<&Path> {
        match self {
            TlsError::Read { path, .. }
            | TlsError::Pem { path, .. }
            | TlsError::Key { path, .. }
            | TlsError::Rules { path, .. }
            | TlsError::TokenKeyMismatch { path, .. } => Some(path),
            TlsError::Provider(_) | TlsError::MissingClientCert | TlsError::Token { .. } => None,
        }
    }

    /// The configuration key at fault when no file is (a token setting).
    pub fn config_key(&self) -> Option<&'static str> {
        match self {
            TlsError::Token { error, .. } => {
                Some(error.config_key().unwrap_or("client_cert.key_uri"))
            }
            _ => None,
        }
    }

    /// Whether this is the token refusing to log the user in (wrong, locked or last-try PIN):
    /// `run` then keeps running unready ([`super::ClientTls::waiting_for_pin`]) instead of exiting
    /// and being restarted into another PIN attempt.
    pub fn is_pin_refusal(&self) -> bool {
        matches!(self, TlsError::Token { error, .. } if error.is_pin_refusal())
    }
}
