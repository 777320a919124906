//! One consistent set of client TLS material ([`ClientTls`]) built from a [`TlsFiles`] set and
//! checked whole (chain, key match or token signature, FinHub's rules), and the store that
//! publishes it ([`TlsStore`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::utils::tls::{CertKey, WrappedX509};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::error::TlsError;
use super::files::{KeyRef, Material, RulePolicy, TlsFiles};
use super::metrics::TlsMetrics;
use super::pkcs11::{cert_key_alg, kinds_agree, TokenKey};
use super::rules::{check_leaf, Finding};
use crate::config::Config;
use cert_identity::{cert_identity, CertIdentity};

use crate::time::unix_now;

/// One consistent set of client TLS material, ready for Pingora and for the auth client.
pub struct ClientTls {
    /// mTLS identity for `HttpPeer::new_mtls`; `None` when no client certificate is configured.
    pub cert_key: Option<Arc<CertKey>>,
    /// CA bundle for `peer.options.ca`; `None` means the system roots.
    pub ca: Option<Arc<[WrappedX509]>>,
    /// The same material as a rustls client config (HTTP/1.1), for login and refresh calls.
    pub rustls: Arc<rustls::ClientConfig>,
    /// Subject, issuer, serial and expiry of the leaf, for status and logs.
    pub identity: Option<CertIdentity>,
    /// Rules the leaf breaks that were only warned about (non-production).
    pub warnings: Vec<Finding>,
    /// Fingerprint of the material this was built from.
    pub fingerprint: u64,
    /// The PKCS#11 token that holds the key, when it is not in a file (its health is a
    /// readiness reason).
    pub token: Option<Arc<TokenKey>>,
    /// Whether FinHub can be called with this set: [`Availability::WaitingForPin`] only on the
    /// stand-in published while the token refuses the PIN at start
    /// ([`ClientTls::waiting_for_pin`]).
    pub availability: Availability,
}

/// Whether a [`ClientTls`] set can be used to call FinHub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// A set read from the files: usable.
    Ready,
    /// A stand-in without a client identity, published while the token refuses the PIN at
    /// start. Nothing is sent to FinHub with it; `/ready` reports `reason`.
    WaitingForPin {
        /// Why there is no client certificate set yet, and what to fix (no secret).
        reason: String,
    },
}

impl Availability {
    /// Whether FinHub can be called with the set.
    pub fn is_ready(&self) -> bool {
        matches!(self, Availability::Ready)
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("identity", &self.identity)
            .field("ca_certs", &self.ca.as_ref().map(|c| c.len()))
            .field("warnings", &self.warnings)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Reads and checks the files named by `config`.
    pub fn load(config: &Config) -> Result<ClientTls, TlsError> {
        TlsFiles::from_config(config, &TlsMetrics::register(&prometheus::Registry::new()))
            .load(unix_now())
    }

    /// Parses and checks `m` (read from `files`) at Unix time `now`.
    pub fn from_material(files: &TlsFiles, m: &Material, now: i64) -> Result<ClientTls, TlsError> {
        let ca = match (&files.ca, &m.ca) {
            (Some(p), Some(bytes)) => Some(parse_certs(p, bytes)?),
            _ => None,
        };
        let identity = match (&files.cert_key, &m.cert_key) {
            (Some((cp, KeyRef::File(kp))), Some((cb, kb))) => Some((
                parse_certs(cp, cb)?,
                Key::Der(parse_key(kp, kb)?),
                cp.as_path(),
                kp.as_path(),
            )),
            (Some((cp, KeyRef::Token(token))), Some((cb, _))) => {
                let chain = parse_certs(cp, cb)?;
                let signer = token_signer(token, cp, &chain[0])?;
                Some((
                    chain,
                    Key::Token(token.clone(), signer),
                    cp.as_path(),
                    cp.as_path(),
                ))
            }
            _ => None,
        };
        let mut warnings = Vec::new();
        if let Some((chain, _, cert_path, _)) = &identity {
            let findings = check_leaf(chain[0].as_ref(), now);
            if !findings.is_empty() {
                match files.policy {
                    RulePolicy::Enforce => {
                        return Err(TlsError::Rules {
                            path: cert_path.to_path_buf(),
                            findings,
                        })
                    }
                    RulePolicy::Warn => warnings = findings,
                }
            }
        }
        let mut tls = Self::build(identity.map(|(c, k, _, kp)| (c, k, kp)), ca)?;
        tls.warnings = warnings;
        tls.fingerprint = m.fingerprint();
        Ok(tls)
    }

    fn build(
        identity: Option<(Vec<CertificateDer<'static>>, Key, &Path)>,
        ca: Option<Vec<CertificateDer<'static>>>,
    ) -> Result<ClientTls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        match &ca {
            Some(ders) => {
                for d in ders {
                    // Each DER already parsed as X.509 in parse_certs; a CA rustls rejects is
                    // skipped here and surfaces as an unknown-CA handshake error.
                    let _ = roots.add(d.clone());
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                for d in native.certs {
                    let _ = roots.add(d);
                }
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Provider(e.to_string()))?
            .with_root_certificates(roots);

        let mut token = None;
        let (cert_key, rustls_cfg, identity) = match identity {
            None => (None, builder.with_no_client_auth(), None),
            Some((chain, Key::Token(t, signer), cert_path)) => {
                token = Some(t);
                let identity = cert_identity(&chain[0]);
                let certified = rustls::sign::CertifiedKey::new(chain.clone(), signer.clone());
                let cfg = builder.with_client_cert_resolver(Arc::new(
                    rustls::sign::SingleCertAndKey::from(certified),
                ));
                let ders: Vec<Vec<u8>> = chain.iter().map(|c| c.as_ref().to_vec()).collect();
                // As below: Pingora's own parser `expect`s.
                // The signer is only moved in and out (AssertUnwindSafe): a panic leaves no
                // half-updated state behind.
                let signer = std::panic::AssertUnwindSafe(signer);
                let ck = std::panic::catch_unwind(move || {
                    let signer = signer;
                    CertKey::with_signing_key(ders, signer.0)
                })
                .map_err(|_| TlsError::Pem {
                    path: cert_path.to_path_buf(),
                    what: "the certificate chain cannot be loaded by the TLS stack".into(),
                })?;
                (Some(Arc::new(ck)), cfg, identity)
            }
            Some((chain, Key::Der(key), key_path)) => {
                let signing = provider
                    .key_provider
                    .load_private_key(key.clone_key())
                    .map_err(|e| TlsError::Key {
                        path: key_path.to_path_buf(),
                        what: format!("unsupported private key: {e}"),
                    })?;
                let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
                certified.keys_match().map_err(|_| TlsError::Key {
                    path: key_path.to_path_buf(),
                    what: "private key does not match the certificate".into(),
                })?;
                let identity = cert_identity(&chain[0]);
                let cfg = builder
                    .with_client_auth_cert(chain.clone(), key.clone_key())
                    .map_err(|e| TlsError::Key {
                        path: key_path.to_path_buf(),
                        what: format!("unusable certificate/key: {e}"),
                    })?;
                let ders: Vec<Vec<u8>> = chain.iter().map(|c| c.as_ref().to_vec()).collect();
                let key_der = key.secret_der().to_vec();
                // Pingora parses the chain again with its own x509-parser and `expect`s; a
                // certificate only that parser refuses must be a rejected set, not a crash.
                let ck = std::panic::catch_unwind(move || CertKey::new(ders, key_der)).map_err(
                    |_| TlsError::Pem {
                        path: key_path.to_path_buf(),
                        what: "the certificate chain cannot be loaded by the TLS stack".into(),
                    },
                )?;
                (Some(Arc::new(ck)), cfg, identity)
            }
        };
        let ca = match ca {
            None => None,
            Some(ders) => {
                let raw: Vec<Vec<u8>> = ders.iter().map(|d| d.as_ref().to_vec()).collect();
                let wrapped = std::panic::catch_unwind(move || {
                    raw.into_iter()
                        .map(|d| WrappedX509::new(d, pingora::utils::tls::parse_x509))
                        .collect::<Vec<_>>()
                })
                .map_err(|_| TlsError::Pem {
                    path: PathBuf::from("(upstream.ca_file)"),
                    what: "a CA certificate cannot be loaded by the TLS stack".into(),
                })?;
                Some(wrapped.into())
            }
        };
        Ok(ClientTls {
            cert_key,
            ca,
            rustls: Arc::new(rustls_cfg),
            identity,
            warnings: Vec::new(),
            fingerprint: 0,
            token,
            availability: Availability::Ready,
        })
    }

    /// A stand-in set without a client identity, published while the token refuses the PIN
    /// (`refusal`): the reloader replaces it once `pin_file` holds a PIN the token takes.
    pub fn waiting_for_pin(files: &TlsFiles, refusal: &TlsError) -> Result<ClientTls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let rustls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Provider(e.to_string()))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let token = match &files.cert_key {
            Some((_, KeyRef::Token(t))) => Some(t.clone()),
            _ => None,
        };
        Ok(ClientTls {
            cert_key: None,
            ca: None,
            rustls: Arc::new(rustls),
            identity: None,
            warnings: Vec::new(),
            // No material hashes to this (a content hash of 0 is as likely as any other).
            fingerprint: 0,
            token,
            availability: Availability::WaitingForPin {
                reason: format!(
                    "client key token refused the login: {refusal} (fix client_cert.pin_file; it is re-read every client_cert.reload_interval)"
                ),
            },
        })
    }
}

/// The private key of a set being built.
enum Key {
    /// Parsed from a PEM file.
    Der(PrivateKeyDer<'static>),
    /// Held by a token; handshakes sign through the signer.
    Token(Arc<TokenKey>, Arc<dyn rustls::sign::SigningKey>),
}

/// A signer for `leaf` through `token`, once the token proves it holds the leaf's key: its key
/// is of the leaf's kind and a fresh test signature verifies with the leaf's public key.
fn token_signer(
    token: &Arc<TokenKey>,
    cert_path: &Path,
    leaf: &CertificateDer<'_>,
) -> Result<Arc<dyn rustls::sign::SigningKey>, TlsError> {
    let mismatch = |what: String| TlsError::TokenKeyMismatch {
        path: cert_path.to_path_buf(),
        what,
    };
    let token_err = |error| TlsError::Token {
        uri: token.uri().to_string(),
        error,
    };
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| mismatch(format!("the certificate does not parse: {e}")))?;
    let spki = cert.public_key();
    let alg = cert_key_alg(spki).ok_or_else(|| {
        mismatch("the certificate's key is neither RSA nor EC P-256/P-384".into())
    })?;
    let kind = token.describe().map_err(token_err)?;
    if !kinds_agree(kind, alg) {
        return Err(mismatch(format!(
            "the certificate is for an {alg:?} key, the token's key (client_cert.key_uri) is {kind:?}"
        )));
    }
    let scheme = alg.test_scheme();
    let mut challenge = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut challenge)
        .map_err(|_| TlsError::Provider("no randomness for the token test signature".into()))?;
    let signature = token.sign(scheme, &challenge).map_err(token_err)?;
    let verifier = alg
        .verifier(scheme)
        .ok_or_else(|| TlsError::Provider(format!("no verifier for {scheme:?}")))?;
    ring::signature::UnparsedPublicKey::new(verifier, spki.subject_public_key.data.as_ref())
        .verify(&challenge, &signature)
        .map_err(|_| {
            mismatch(
                "the certificate's public key is not the token's key (client_cert.key_uri): a test signature does not verify".into(),
            )
        })?;
    Ok(token.signing_key(alg))
}

/// Parses every certificate in PEM `bytes` (from `path`); each must parse as X.509.
fn parse_certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |what: String| TlsError::Pem {
        path: path.to_path_buf(),
        what,
    };
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(format!("malformed PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem_err("no CERTIFICATE block found".into()));
    }
    for (i, c) in certs.iter().enumerate() {
        X509Certificate::from_der(c.as_ref())
            .map_err(|e| pem_err(format!("certificate #{} is not valid X.509: {e}", i + 1)))?;
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#8, PKCS#1 or SEC1) in PEM `bytes` (from `path`).
fn parse_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        // The error names the PEM problem only, never key bytes.
        what: format!("no usable private key: {e}"),
    })
}

/// The published TLS snapshot. Readers never block; writers swap whole snapshots.
pub struct TlsStore {
    current: ArcSwap<ClientTls>,
}

impl TlsStore {
    /// A store publishing `initial`.
    pub fn new(initial: ClientTls) -> Self {
        TlsStore {
            current: ArcSwap::from_pointee(initial),
        }
    }

    /// The snapshot in force now (one atomic load).
    pub fn current(&self) -> Arc<ClientTls> {
        self.current.load_full()
    }

    /// Publishes a new, already validated snapshot.
    pub fn publish(&self, next: Arc<ClientTls>) {
        self.current.store(next);
    }
}

impl TlsFiles {
    /// Reads, parses and checks the set at Unix time `now`.
    pub fn load(&self, now: i64) -> Result<ClientTls, TlsError> {
        ClientTls::from_material(self, &self.read()?, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use finhub_testkit::pki::{ClientCertOpts, Pki};

    impl ClientTls {
        fn from_files(
            cert_key: Option<(&Path, &Path)>,
            ca: Option<&Path>,
        ) -> Result<ClientTls, TlsError> {
            TlsFiles {
                cert_key: cert_key.map(|(c, k)| (c.to_path_buf(), KeyRef::File(k.to_path_buf()))),
                ca: ca.map(Path::to_path_buf),
                policy: RulePolicy::Enforce,
            }
            .load(unix_now())
        }
    }

    #[test]
    fn loads_a_matching_pair_and_reports_identity() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new("test-ca").unwrap();
        let client = pki.client_cert(&ClientCertOpts::default()).unwrap();
        let (cert, key) = client.write_to(dir.path(), "client").unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, pki.ca_pem()).unwrap();
        let tls = ClientTls::from_files(Some((&cert, &key)), Some(&ca)).unwrap();
        assert_eq!(tls.identity.as_ref().unwrap().serial_hex, client.serial_hex);
        assert_eq!(tls.ca.as_ref().unwrap().len(), 1);
        assert!(tls.cert_key.is_some());
    }

    #[test]
    fn rejects_a_key_from_another_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new("test-ca").unwrap();
        let a = pki.client_cert(&ClientCertOpts::default()).unwrap();
        let b = pki.client_cert(&ClientCertOpts::default()).unwrap();
        let (cert, _) = a.write_to(dir.path(), "a").unwrap();
        let (_, key) = b.write_to(dir.path(), "b").unwrap();
        let err = ClientTls::from_files(Some((&cert, &key)), None).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn rejects_truncated_pem_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new("test-ca").unwrap();
        let a = pki.client_cert(&ClientCertOpts::default()).unwrap();
        let (cert, key) = a.write_to(dir.path(), "a").unwrap();
        let pem = std::fs::read_to_string(&cert).unwrap();
        std::fs::write(&cert, &pem[..pem.len() / 2]).unwrap();
        assert!(ClientTls::from_files(Some((&cert, &key)), None).is_err());
        let missing = dir.path().join("missing.pem");
        let err = ClientTls::from_files(Some((&missing, &key)), None).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }
}
