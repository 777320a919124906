//! Which files make up a TLS set (certificate chain, key or token key, CA bundle) and their raw
//! bytes, read in one go.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::TlsError;
use super::metrics::TlsMetrics;
use super::pkcs11::TokenKey;
use crate::config::{Config, KeySource};

/// What to do when the leaf breaks one of FinHub's certificate rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RulePolicy {
    /// Refuse the set (production).
    Enforce,
    /// Accept it and report the findings as warnings (other environments).
    Warn,
}

/// Where the client certificate's private key is, as the TLS loader uses it.
#[derive(Debug, Clone)]
pub enum KeyRef {
    /// A PEM file, read with the certificate.
    File(PathBuf),
    /// A key in a PKCS#11 token, reached through its thread.
    Token(Arc<TokenKey>),
}

/// Which files make up the TLS set.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Client certificate chain and its key, if mTLS is configured.
    pub cert_key: Option<(PathBuf, KeyRef)>,
    /// CA bundle for FinHub's server certificate, if not the system roots.
    pub ca: Option<PathBuf>,
    /// How rule violations are treated.
    pub policy: RulePolicy,
}

/// The raw bytes of one TLS set, read in one go (symlinks followed). No `Debug`: it holds the
/// private key.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// Certificate chain and key (empty for a token key), if mTLS is configured.
    pub(super) cert_key: Option<(Vec<u8>, Vec<u8>)>,
    /// CA bundle, if not the system roots.
    pub(super) ca: Option<Vec<u8>>,
}

impl TlsFiles {
    /// The files named by `config`; rules are enforced in production. A token key starts its
    /// thread here (it opens the token on first use), counting failures in `metrics`.
    pub fn from_config(config: &Config, metrics: &TlsMetrics) -> TlsFiles {
        TlsFiles {
            cert_key: config.client_cert.as_ref().map(|c| {
                let key = match &c.key {
                    KeySource::File(p) => KeyRef::File(p.clone()),
                    KeySource::Pkcs11(k) => KeyRef::Token(TokenKey::start(k, metrics.token())),
                };
                (c.cert_file.clone(), key)
            }),
            ca: config.upstream.ca_file.clone(),
            policy: if config.rules.strict_certificate_rules {
                RulePolicy::Enforce
            } else {
                RulePolicy::Warn
            },
        }
    }

    /// Reads every file (following symlinks, so a Kubernetes `..data` swap is seen whole).
    pub fn read(&self) -> Result<Material, TlsError> {
        let read = |p: &Path| {
            crate::files::read(p).map_err(|source| TlsError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        Ok(Material {
            cert_key: match &self.cert_key {
                Some((c, KeyRef::File(k))) => Some((read(c)?, read(k)?)),
                // The key stays in the token: only the certificate is read.
                Some((c, KeyRef::Token(_))) => Some((read(c)?, Vec::new())),
                None => None,
            },
            ca: match &self.ca {
                Some(p) => Some(read(p)?),
                None => None,
            },
        })
    }
}

impl Material {
    /// A content fingerprint, to notice changes and to log a rejected set only once.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

impl std::hash::Hash for Material {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.cert_key.hash(state);
        self.ca.hash(state);
    }
}
