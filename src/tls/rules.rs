//! FinHub's client-certificate rules (protocol notes §1): X.509 v3, valid now, Extended Key Usage
//! clientAuth, RSA ≥ 2048 bits or EC P-256/P-384, SHA-256 or stronger signature, validity period
//! of at most one year. [`check_leaf`] lists every rule a leaf breaks; the caller decides whether
//! a finding rejects the set (production) or is a warning (elsewhere).

use std::fmt;

use x509_parser::prelude::{FromDer, X509Certificate, X509Version};

/// One rule a certificate breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// `notBefore` is in the future.
    NotYetValid {
        /// `notBefore`, Unix seconds.
        not_before: i64,
    },
    /// `notAfter` has passed.
    Expired {
        /// `notAfter`, Unix seconds.
        not_after: i64,
    },
    /// Not an X.509 v3 certificate.
    NotV3,
    /// Extended Key Usage is missing or lacks clientAuth (1.3.6.1.5.5.7.3.2).
    NoClientAuth,
    /// RSA key shorter than 2048 bits.
    WeakRsaKey {
        /// Modulus length.
        bits: usize,
    },
    /// EC key on a curve other than P-256 / P-384.
    UnsupportedCurve,
    /// Neither RSA nor EC.
    UnsupportedKeyType,
    /// Signature weaker than SHA-256 (or unknown).
    WeakSignature {
        /// Signature algorithm OID.
        oid: String,
    },
    /// Validity period longer than one year.
    ValidityTooLong {
        /// Days between `notBefore` and `notAfter`.
        days: i64,
    },
    /// The DER could not be parsed.
    Unparseable,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::NotYetValid { not_before } => {
                write!(f, "certificate is not valid yet (notBefore {not_before})")
            }
            Finding::Expired { not_after } => {
                write!(f, "certificate expired (notAfter {not_after})")
            }
            Finding::NotV3 => f.write_str("certificate is not X.509 v3"),
            Finding::NoClientAuth => {
                f.write_str("Extended Key Usage does not include clientAuth (1.3.6.1.5.5.7.3.2)")
            }
            Finding::WeakRsaKey { bits } => {
                write!(f, "RSA key has {bits} bits; at least 2048 required")
            }
            Finding::UnsupportedCurve => f.write_str("EC key is not on P-256 or P-384"),
            Finding::UnsupportedKeyType => f.write_str("key is neither RSA nor EC"),
            Finding::WeakSignature { oid } => {
                write!(f, "signature algorithm {oid} is weaker than SHA-256")
            }
            Finding::ValidityTooLong { days } => {
                write!(
                    f,
                    "validity period is {days} days; FinHub allows at most one year"
                )
            }
            Finding::Unparseable => f.write_str("certificate cannot be parsed"),
        }
    }
}

const SHA256_OR_STRONGER: [&str; 8] = [
    "1.2.840.113549.1.1.11", // sha256WithRSAEncryption
    "1.2.840.113549.1.1.12", // sha384WithRSAEncryption
    "1.2.840.113549.1.1.13", // sha512WithRSAEncryption
    "1.2.840.113549.1.1.10", // RSASSA-PSS (hash in parameters; rustls only offers SHA-256+)
    "1.2.840.10045.4.3.2",   // ecdsa-with-SHA256
    "1.2.840.10045.4.3.3",   // ecdsa-with-SHA384
    "1.2.840.10045.4.3.4",   // ecdsa-with-SHA512
    "1.3.101.112",           // Ed25519 (key type is still refused)
];
const RSA_KEY: &str = "1.2.840.113549.1.1.1";
const EC_KEY: &str = "1.2.840.10045.2.1";
const ALLOWED_CURVES: [&str; 2] = ["1.2.840.10045.3.1.7", "1.3.132.0.34"];
/// One year, with a day of slack for leap years and issuance rounding.
const MAX_VALIDITY_DAYS: i64 = 366;

/// Every rule the leaf certificate `der` breaks at Unix time `now`.
pub fn check_leaf(der: &[u8], now: i64) -> Vec<Finding> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return vec![Finding::Unparseable];
    };
    let mut out = Vec::new();
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    if now < not_before {
        out.push(Finding::NotYetValid { not_before });
    }
    if now > not_after {
        out.push(Finding::Expired { not_after });
    }
    if cert.version() != X509Version::V3 {
        out.push(Finding::NotV3);
    }
    match cert.extended_key_usage() {
        Ok(Some(eku)) if eku.value.client_auth => {}
        _ => out.push(Finding::NoClientAuth),
    }
    let spki = cert.public_key();
    match spki.algorithm.algorithm.to_id_string().as_str() {
        RSA_KEY => {
            if let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = spki.parsed() {
                let bits = rsa.key_size();
                if bits < 2048 {
                    out.push(Finding::WeakRsaKey { bits });
                }
            } else {
                out.push(Finding::UnsupportedKeyType);
            }
        }
        EC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string());
            if !curve.is_some_and(|c| ALLOWED_CURVES.contains(&c.as_str())) {
                out.push(Finding::UnsupportedCurve);
            }
        }
        _ => out.push(Finding::UnsupportedKeyType),
    }
    let sig = cert.signature_algorithm.algorithm.to_id_string();
    if !SHA256_OR_STRONGER.contains(&sig.as_str()) {
        out.push(Finding::WeakSignature { oid: sig });
    }
    let days = (not_after - not_before) / 86_400;
    if days > MAX_VALIDITY_DAYS {
        out.push(Finding::ValidityTooLong { days });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use finhub_testkit::pki::{ClientCertOpts, KeyKind, Pki};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    fn der(opts: &ClientCertOpts) -> Vec<u8> {
        let pki = Pki::new("rules-ca").unwrap();
        let pair = pki.client_cert(opts).unwrap();
        CertificateDer::from_pem_slice(pair.cert_pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    #[test]
    fn a_good_client_certificate_has_no_findings() {
        assert_eq!(check_leaf(&der(&ClientCertOpts::default()), now()), vec![]);
        let p384 = ClientCertOpts {
            key: KeyKind::EcP384,
            ..ClientCertOpts::default()
        };
        assert_eq!(check_leaf(&der(&p384), now()), vec![]);
    }

    #[test]
    fn missing_client_auth_is_found() {
        let opts = ClientCertOpts {
            client_auth_eku: false,
            ..ClientCertOpts::default()
        };
        assert_eq!(check_leaf(&der(&opts), now()), vec![Finding::NoClientAuth]);
    }

    #[test]
    fn expired_and_too_long_are_found() {
        let expired = ClientCertOpts {
            not_before_offset_days: -30,
            validity_days: 10,
            ..ClientCertOpts::default()
        };
        assert!(matches!(
            check_leaf(&der(&expired), now())[..],
            [Finding::Expired { .. }]
        ));
        let long = ClientCertOpts {
            validity_days: 800,
            ..ClientCertOpts::default()
        };
        assert!(matches!(
            check_leaf(&der(&long), now())[..],
            [Finding::ValidityTooLong { days }] if days >= 799
        ));
        // Not yet valid, seen from the past.
        let fresh = der(&ClientCertOpts::default());
        assert!(matches!(
            check_leaf(&fresh, now() - 10 * 86_400)[..],
            [Finding::NotYetValid { .. }]
        ));
    }

    #[test]
    fn a_1024_bit_rsa_key_is_too_weak() {
        use rsa::pkcs1::EncodeRsaPublicKey;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).unwrap();
        let pkcs1 = key.to_public_key().to_pkcs1_der().unwrap();
        let pki = Pki::new("rules-ca").unwrap();
        let pem = pki
            .client_cert_for_rsa_key(&ClientCertOpts::default(), pkcs1.as_bytes())
            .unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(
            check_leaf(der.as_ref(), now()),
            vec![Finding::WeakRsaKey { bits: 1024 }]
        );
    }

    #[test]
    fn garbage_is_unparseable() {
        assert_eq!(
            check_leaf(b"\x30\x03junk", now()),
            vec![Finding::Unparseable]
        );
    }
}
