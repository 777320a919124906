//! Certificates for the demo and the tests (rcgen, ring backend). [`cert_identity`] (re-exported
//! from the `cert-identity` crate, the sidecar's own `tls::identity`) names what they generate.
//!
//! Nothing here is meant for production key management: keys are generated in memory and
//! handed out as PEM strings.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use x509_parser::time::ASN1Time;

pub use crate::identity::{cert_identity, CertIdentity};

const DAY_SECS: i64 = 86_400;

/// Why a certificate could not be generated or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or failed to sign.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A name or date that cannot go into a certificate.
    #[error("invalid certificate parameter: {0}")]
    Invalid(String),
    /// Writing PEM files.
    #[error("certificate files: {0}")]
    Io(#[from] std::io::Error),
}

/// Key algorithm of a generated certificate. (RSA is not offered: rcgen's ring backend cannot
/// generate RSA keys.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA P-256 with SHA-256.
    #[default]
    EcP256,
    /// ECDSA P-384 with SHA-384.
    EcP384,
}

impl KeyKind {
    fn generate(self) -> Result<KeyPair, PkiError> {
        let alg = match self {
            KeyKind::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyKind::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        };
        Ok(KeyPair::generate_for(alg)?)
    }
}

/// Options of [`Pki::client_cert`].
#[derive(Clone, Debug)]
pub struct ClientCertOpts {
    /// Subject CN.
    pub common_name: String,
    /// Subject O (left out when empty).
    pub organization: String,
    /// Days between notBefore and notAfter.
    pub validity_days: i64,
    /// Add the extendedKeyUsage extension with clientAuth (otherwise no EKU at all).
    pub client_auth_eku: bool,
    /// notBefore relative to now, in days; negative is in the past (expired certs: `-30` with
    /// `validity_days: 10`).
    pub not_before_offset_days: i64,
    /// Key algorithm.
    pub key: KeyKind,
}

impl Default for ClientCertOpts {
    fn default() -> Self {
        ClientCertOpts {
            common_name: "finhub-sidecar-client".into(),
            organization: "Example Org".into(),
            validity_days: 90,
            client_auth_eku: true,
            not_before_offset_days: -1,
            key: KeyKind::EcP256,
        }
    }
}

/// A certificate and its private key, PEM-encoded. `Debug` never shows the key.
#[derive(Clone)]
pub struct CertPair {
    /// Leaf certificate (PEM).
    pub cert_pem: String,
    /// PKCS#8 private key (PEM). Secret.
    pub key_pem: String,
    /// Serial number as [`cert_identity`] reports it.
    pub serial_hex: String,
    /// Subject as [`cert_identity`] reports it.
    pub subject: String,
}

impl fmt::Debug for CertPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertPair")
            .field("subject", &self.subject)
            .field("serial_hex", &self.serial_hex)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl CertPair {
    /// Writes `<stem>.crt` and `<stem>.key` (mode 0600 on Unix) into `dir`; returns both paths.
    pub fn write_to(&self, dir: &Path, stem: &str) -> std::io::Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &self.cert_pem)?;
        write_private(&key, self.key_pem.as_bytes())?;
        Ok((cert, key))
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its old mode on open; tighten it before writing the key.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// A throwaway certificate authority.
pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

impl Pki {
    /// A self-signed CA (EC P-256) named `CN=<ca_common_name>`, valid from yesterday for a year.
    pub fn new(ca_common_name: &str) -> Result<Pki, PkiError> {
        let key = KeyKind::EcP256.generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(ca_common_name, "")?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        set_validity(&mut params, -1, 366)?;
        let cert = params.self_signed(&key)?;
        Ok(Pki {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// A server certificate (EKU serverAuth, EC P-256, 1 year) for the given DNS names and IPs;
    /// the CN is the first DNS name (or the first IP).
    pub fn server_cert(
        &self,
        dns_names: &[&str],
        ip_sans: &[IpAddr],
    ) -> Result<CertPair, PkiError> {
        let key = KeyKind::EcP256.generate()?;
        let mut params = CertificateParams::default();
        let cn = dns_names
            .first()
            .map(|s| s.to_string())
            .or_else(|| ip_sans.first().map(|ip| ip.to_string()))
            .ok_or_else(|| {
                PkiError::Invalid("a server certificate needs a DNS name or an IP".into())
            })?;
        params.distinguished_name = name(&cn, "")?;
        for dns in dns_names {
            let ia5 = (*dns)
                .to_string()
                .try_into()
                .map_err(|_| PkiError::Invalid(format!("DNS name {dns:?}")))?;
            params.subject_alt_names.push(SanType::DnsName(ia5));
        }
        params
            .subject_alt_names
            .extend(ip_sans.iter().map(|ip| SanType::IpAddress(*ip)));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, key, -1, 365)
    }

    /// A client certificate per `opts` with a random positive 16-byte serial.
    pub fn client_cert(&self, opts: &ClientCertOpts) -> Result<CertPair, PkiError> {
        let key = opts.key.generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&opts.common_name, &opts.organization)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if opts.client_auth_eku {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        self.sign(params, key, opts.not_before_offset_days, opts.validity_days)
    }

    /// A client certificate (EKU clientAuth) for an RSA public key generated elsewhere, given as
    /// PKCS#1 `RSAPublicKey` DER; returns the certificate PEM. For tests of key-size rules,
    /// since ring cannot generate RSA keys.
    pub fn client_cert_for_rsa_key(
        &self,
        opts: &ClientCertOpts,
        pkcs1_public_key_der: &[u8],
    ) -> Result<String, PkiError> {
        let params = client_params_for_public_key(opts)?;
        let key = RsaPublicKeyDer(pkcs1_public_key_der.to_vec());
        Ok(params.signed_by(&key, &self.issuer)?.pem())
    }

    /// A client certificate (EKU clientAuth) for a public key held elsewhere (an HSM), given
    /// as its DER `SubjectPublicKeyInfo` (RSA, or EC P-256/P-384); returns the certificate PEM.
    pub fn client_cert_for_spki(
        &self,
        opts: &ClientCertOpts,
        spki_der: &[u8],
    ) -> Result<String, PkiError> {
        use x509_parser::prelude::FromDer;
        let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| PkiError::Invalid(format!("SubjectPublicKeyInfo: {e}")))?;
        let oid = spki.algorithm.algorithm.to_id_string();
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string());
        let alg = match (oid.as_str(), curve.as_deref()) {
            ("1.2.840.113549.1.1.1", _) => &rcgen::PKCS_RSA_SHA256,
            ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => &rcgen::PKCS_ECDSA_P256_SHA256,
            ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => &rcgen::PKCS_ECDSA_P384_SHA384,
            _ => {
                return Err(PkiError::Invalid(format!(
                    "unsupported key algorithm {oid}"
                )))
            }
        };
        let params = client_params_for_public_key(opts)?;
        let key = RemotePublicKey {
            raw: spki.subject_public_key.data.to_vec(),
            alg,
        };
        Ok(params.signed_by(&key, &self.issuer)?.pem())
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        key: KeyPair,
        not_before_offset_days: i64,
        validity_days: i64,
    ) -> Result<CertPair, PkiError> {
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, not_before_offset_days, validity_days)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let id = cert_identity(cert.der())
            .ok_or_else(|| PkiError::Invalid("generated certificate does not parse".into()))?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial_hex: id.serial_hex,
            subject: id.subject,
        })
    }
}

/// A public key held elsewhere, as the bits of its `SubjectPublicKeyInfo`, for rcgen to certify.
struct RemotePublicKey {
    raw: Vec<u8>,
    alg: &'static rcgen::SignatureAlgorithm,
}

impl rcgen::PublicKeyData for RemotePublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

/// An RSA public key (PKCS#1 DER) for rcgen to certify.
struct RsaPublicKeyDer(Vec<u8>);

impl rcgen::PublicKeyData for RsaPublicKeyDer {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_RSA_SHA256
    }
}

fn name(common_name: &str, organization: &str) -> Result<DistinguishedName, PkiError> {
    if common_name.is_empty() {
        return Err(PkiError::Invalid("empty common name".into()));
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if !organization.is_empty() {
        dn.push(DnType::OrganizationName, organization);
    }
    Ok(dn)
}

fn set_validity(
    params: &mut CertificateParams,
    not_before_offset_days: i64,
    validity_days: i64,
) -> Result<(), PkiError> {
    if validity_days <= 0 {
        return Err(PkiError::Invalid(format!(
            "validity of {validity_days} days"
        )));
    }
    let now = unix_now();
    let not_before = not_before_offset_days
        .checked_mul(DAY_SECS)
        .and_then(|off| now.checked_add(off))
        .ok_or_else(|| PkiError::Invalid("notBefore out of range".into()))?;
    let not_after = validity_days
        .checked_mul(DAY_SECS)
        .and_then(|v| not_before.checked_add(v))
        .ok_or_else(|| PkiError::Invalid("notAfter out of range".into()))?;
    let at = |secs: i64| {
        ASN1Time::from_timestamp(secs)
            .map(|t| t.to_datetime())
            .map_err(|_| PkiError::Invalid(format!("timestamp {secs} out of range")))
    };
    params.not_before = at(not_before)?;
    params.not_after = at(not_after)?;
    Ok(())
}

/// Client-certificate parameters for a key the test kit does not hold (issued for its public key).
fn client_params_for_public_key(opts: &ClientCertOpts) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&opts.common_name, &opts.organization)?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.serial_number = Some(random_serial());
    set_validity(&mut params, opts.not_before_offset_days, opts.validity_days)?;
    Ok(params)
}

/// 16 random bytes, positive and with the top byte non-zero, so the DER INTEGER is exactly
/// these 16 bytes (32 hex digits in [`cert_identity`]).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    use x509_parser::extensions::ParsedExtension;

    fn der_of(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("pem")
            .as_ref()
            .to_vec()
    }

    fn eku_client_auth(der: &[u8]) -> Option<bool> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse");
        cert.extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::ExtendedKeyUsage(eku) => Some(eku.client_auth),
                _ => None,
            })
    }

    #[test]
    fn client_cert_has_client_auth_eku_and_matching_identity() {
        let pki = Pki::new("Unit CA").unwrap();
        let pair = pki
            .client_cert(&ClientCertOpts {
                common_name: "app".into(),
                organization: "Acme".into(),
                ..ClientCertOpts::default()
            })
            .unwrap();
        let der = der_of(&pair.cert_pem);
        assert_eq!(eku_client_auth(&der), Some(true));
        let id = cert_identity(&der).unwrap();
        assert_eq!(id.serial_hex, pair.serial_hex);
        assert_eq!(id.serial_hex.len(), 32);
        assert!(id
            .serial_hex
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(id.subject, "CN=app,O=Acme");
        assert_eq!(pair.subject, id.subject);
        assert_eq!(id.issuer, "CN=Unit CA");
        let now = unix_now();
        assert!(
            (id.not_after_unix - (now + 89 * DAY_SECS)).abs() < 60,
            "90 days from yesterday"
        );
        // The key parses and is not shown by Debug.
        assert!(pair.key_pem.contains("PRIVATE KEY"));
        assert!(!format!("{pair:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn serials_are_random_and_positive() {
        let pki = Pki::new("Unit CA").unwrap();
        let a = pki.client_cert(&ClientCertOpts::default()).unwrap();
        let b = pki.client_cert(&ClientCertOpts::default()).unwrap();
        assert_ne!(a.serial_hex, b.serial_hex);
        for p in [&a, &b] {
            let der = der_of(&p.cert_pem);
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            // No sign byte needed: top bit clear, first byte non-zero.
            assert_eq!(cert.tbs_certificate.raw_serial().len(), 16);
            assert_eq!(cert_identity(&der).unwrap().serial_hex, p.serial_hex);
        }
    }

    #[test]
    fn eku_can_be_left_out() {
        let pki = Pki::new("Unit CA").unwrap();
        let pair = pki
            .client_cert(&ClientCertOpts {
                client_auth_eku: false,
                ..ClientCertOpts::default()
            })
            .unwrap();
        assert_eq!(eku_client_auth(&der_of(&pair.cert_pem)), None);
    }

    #[test]
    fn expired_cert_can_be_made() {
        let pki = Pki::new("Unit CA").unwrap();
        let pair = pki
            .client_cert(&ClientCertOpts {
                not_before_offset_days: -30,
                validity_days: 10,
                ..ClientCertOpts::default()
            })
            .unwrap();
        let der = der_of(&pair.cert_pem);
        let id = cert_identity(&der).unwrap();
        assert!(id.not_after_unix < unix_now() - 19 * DAY_SECS);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.validity().is_valid());
    }

    #[test]
    fn p384_and_server_certs() {
        let pki = Pki::new("Unit CA").unwrap();
        let p384 = pki
            .client_cert(&ClientCertOpts {
                key: KeyKind::EcP384,
                ..ClientCertOpts::default()
            })
            .unwrap();
        let der = der_of(&p384.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(
            cert.public_key().parsed().map(|k| k.key_size()).ok(),
            Some(384)
        );

        let server = pki
            .server_cert(&["localhost"], &["127.0.0.1".parse().unwrap()])
            .unwrap();
        let der = der_of(&server.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let eku = cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::ExtendedKeyUsage(eku) => Some(eku.server_auth),
                _ => None,
            });
        assert_eq!(eku, Some(true));
        let sans = cert.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(sans.general_names.len(), 2);
        assert_eq!(server.subject, "CN=localhost");
        assert!(pki.server_cert(&[], &[]).is_err());
    }

    #[test]
    fn ca_is_a_ca() {
        let pki = Pki::new("Unit CA").unwrap();
        let der = der_of(&pki.ca_pem());
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(cert.is_ca());
        assert_eq!(cert_identity(&der).unwrap().subject, "CN=Unit CA");
    }

    #[test]
    fn names_are_escaped_in_the_subject() {
        let pki = Pki::new("Unit CA").unwrap();
        let pair = pki
            .client_cert(&ClientCertOpts {
                common_name: "app, v2".into(),
                organization: String::new(),
                ..ClientCertOpts::default()
            })
            .unwrap();
        assert_eq!(pair.subject, "CN=app\\, v2");
    }

    #[test]
    fn write_to_makes_key_private() {
        let pki = Pki::new("Unit CA").unwrap();
        let pair = pki.client_cert(&ClientCertOpts::default()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair.write_to(dir.path(), "client").unwrap();
        assert_eq!(cert.file_name().unwrap(), "client.crt");
        assert_eq!(key.file_name().unwrap(), "client.key");
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), pair.cert_pem);
        assert_eq!(std::fs::read_to_string(&key).unwrap(), pair.key_pem);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
