//! What a TLS signature scheme needs from the token: the hash computed here, the mechanism
//! the token signs with, and the certificate key kinds that go with each.

use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::MechanismType;
use rustls::SignatureScheme;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKeyKind {
    /// RSA.
    Rsa,
    /// Elliptic curve (the curve is the certificate's).
    Ec,
}

/// The hash of a signature scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    /// The digest of `msg`.
    pub(super) fn digest(self, msg: &[u8]) -> Vec<u8> {
        let alg = match self {
            Hash::Sha256 => &ring::digest::SHA256,
            Hash::Sha384 => &ring::digest::SHA384,
            Hash::Sha512 => &ring::digest::SHA512,
        };
        ring::digest::digest(alg, msg).as_ref().to_vec()
    }

    /// The DER DigestInfo prefix of PKCS#1 v1.5 signatures (RFC 8017 §9.2, note 1).
    pub(super) fn digest_info_prefix(self) -> &'static [u8] {
        match self {
            Hash::Sha256 => &[
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x01, 0x05, 0x00, 0x04, 0x20,
            ],
            Hash::Sha384 => &[
                0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x02, 0x05, 0x00, 0x04, 0x30,
            ],
            Hash::Sha512 => &[
                0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x03, 0x05, 0x00, 0x04, 0x40,
            ],
        }
    }

    /// `CKM_RSA_PKCS_PSS` parameters for this hash (MGF1 with it, salt of its length).
    pub(super) fn pss_params(self) -> PkcsPssParams {
        let (hash_alg, mgf, len) = match self {
            Hash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256, 32u64),
            Hash::Sha384 => (MechanismType::SHA384, PkcsMgfType::MGF1_SHA384, 48),
            Hash::Sha512 => (MechanismType::SHA512, PkcsMgfType::MGF1_SHA512, 64),
        };
        PkcsPssParams {
            hash_alg,
            mgf,
            s_len: len.into(),
        }
    }
}

/// How the token signs a prepared input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mech {
    /// `CKM_RSA_PKCS` over DigestInfo || digest.
    RsaPkcs1,
    /// `CKM_RSA_PKCS_PSS` over the digest.
    RsaPss(Hash),
    /// `CKM_ECDSA` over the digest; answers `r || s`.
    Ecdsa,
}

/// What a TLS signature scheme needs from the token.
pub(super) fn plan(scheme: SignatureScheme) -> Option<(Hash, Mech)> {
    use SignatureScheme as S;
    Some(match scheme {
        S::RSA_PSS_SHA256 => (Hash::Sha256, Mech::RsaPss(Hash::Sha256)),
        S::RSA_PSS_SHA384 => (Hash::Sha384, Mech::RsaPss(Hash::Sha384)),
        S::RSA_PSS_SHA512 => (Hash::Sha512, Mech::RsaPss(Hash::Sha512)),
        S::RSA_PKCS1_SHA256 => (Hash::Sha256, Mech::RsaPkcs1),
        S::RSA_PKCS1_SHA384 => (Hash::Sha384, Mech::RsaPkcs1),
        S::RSA_PKCS1_SHA512 => (Hash::Sha512, Mech::RsaPkcs1),
        S::ECDSA_NISTP256_SHA256 => (Hash::Sha256, Mech::Ecdsa),
        S::ECDSA_NISTP384_SHA384 => (Hash::Sha384, Mech::Ecdsa),
        _ => return None,
    })
}

/// The curve or key family a certificate's public key is, which fixes the schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    /// RSA (any size the token has).
    Rsa,
    /// ECDSA on P-256.
    EcP256,
    /// ECDSA on P-384.
    EcP384,
}

impl KeyAlg {
    /// Schemes in order of preference: PSS before PKCS#1 v1.5.
    pub(super) fn schemes(self) -> &'static [SignatureScheme] {
        use SignatureScheme as S;
        match self {
            KeyAlg::Rsa => &[
                S::RSA_PSS_SHA256,
                S::RSA_PSS_SHA384,
                S::RSA_PSS_SHA512,
                S::RSA_PKCS1_SHA256,
                S::RSA_PKCS1_SHA384,
                S::RSA_PKCS1_SHA512,
            ],
            KeyAlg::EcP256 => &[S::ECDSA_NISTP256_SHA256],
            KeyAlg::EcP384 => &[S::ECDSA_NISTP384_SHA384],
        }
    }

    /// The scheme `check` and the reloader test the key with.
    pub fn test_scheme(self) -> SignatureScheme {
        self.schemes()[0]
    }

    fn token_kind(self) -> TokenKeyKind {
        match self {
            KeyAlg::Rsa => TokenKeyKind::Rsa,
            KeyAlg::EcP256 | KeyAlg::EcP384 => TokenKeyKind::Ec,
        }
    }

    /// The verification algorithm for this scheme over the certificate's key.
    pub fn verifier(
        self,
        scheme: SignatureScheme,
    ) -> Option<&'static dyn ring::signature::VerificationAlgorithm> {
        use ring::signature as v;
        use SignatureScheme as S;
        Some(match (self, scheme) {
            (KeyAlg::Rsa, S::RSA_PSS_SHA256) => &v::RSA_PSS_2048_8192_SHA256,
            (KeyAlg::Rsa, S::RSA_PSS_SHA384) => &v::RSA_PSS_2048_8192_SHA384,
            (KeyAlg::Rsa, S::RSA_PSS_SHA512) => &v::RSA_PSS_2048_8192_SHA512,
            (KeyAlg::Rsa, S::RSA_PKCS1_SHA256) => &v::RSA_PKCS1_2048_8192_SHA256,
            (KeyAlg::EcP256, S::ECDSA_NISTP256_SHA256) => &v::ECDSA_P256_SHA256_ASN1,
            (KeyAlg::EcP384, S::ECDSA_NISTP384_SHA384) => &v::ECDSA_P384_SHA384_ASN1,
            _ => return None,
        })
    }
}

/// PKCS#11's `r || s` (each half the length) as the DER `ECDSA-Sig-Value` TLS carries.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) || raw.len() > 132 {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let int = |v: &[u8]| {
        let v = match v.iter().position(|&b| b != 0) {
            Some(i) => &v[i..],
            None => &[0u8][..],
        };
        let mut out = vec![0x02];
        let pad = v[0] & 0x80 != 0;
        out.push((v.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
        out
    };
    let body = [int(r), int(s)].concat();
    let mut der = vec![0x30];
    if body.len() >= 0x80 {
        der.push(0x81);
    }
    der.push(body.len() as u8);
    der.extend_from_slice(&body);
    Some(der)
}

pub fn cert_key_alg(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Option<KeyAlg> {
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    };
    let alg = &spki.algorithm;
    if alg.algorithm == OID_PKCS1_RSAENCRYPTION {
        return Some(KeyAlg::Rsa);
    }
    if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = alg.parameters.as_ref()?.as_oid().ok()?;
        if curve == OID_EC_P256 {
            return Some(KeyAlg::EcP256);
        }
        if curve == OID_NIST_EC_P384 {
            return Some(KeyAlg::EcP384);
        }
    }
    None
}

/// Whether the token key of `kind` can be the certificate's `alg`.
pub fn kinds_agree(kind: TokenKeyKind, alg: KeyAlg) -> bool {
    alg.token_kind() == kind
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{
        EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED_SIGNING,
    };

    #[test]
    fn raw_ecdsa_signatures_become_der_that_verifies() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let public = ring::signature::UnparsedPublicKey::new(
            &ECDSA_P256_SHA256_ASN1,
            key.public_key().as_ref().to_vec(),
        );
        // Many signatures: r and s with and without the high bit, now and then a leading zero.
        for i in 0..200u32 {
            let msg = i.to_be_bytes();
            let raw = key.sign(&rng, &msg).unwrap();
            assert_eq!(raw.as_ref().len(), 64);
            let der = ecdsa_raw_to_der(raw.as_ref()).unwrap();
            public.verify(&msg, &der).unwrap();
        }
        assert_eq!(
            ecdsa_raw_to_der(&[0x80, 0x01]).unwrap(),
            [0x30, 0x07, 0x02, 0x02, 0x00, 0x80, 0x02, 0x01, 0x01]
        );
        assert_eq!(
            ecdsa_raw_to_der(&[0, 0]).unwrap(),
            [0x30, 0x06, 0x02, 0x01, 0, 0x02, 0x01, 0]
        );
        assert!(ecdsa_raw_to_der(&[1, 2, 3]).is_none());
        assert!(ecdsa_raw_to_der(&[]).is_none());
    }

    #[test]
    fn schemes_prefer_pss_and_follow_the_curve() {
        assert_eq!(KeyAlg::Rsa.test_scheme(), SignatureScheme::RSA_PSS_SHA256);
        assert_eq!(
            KeyAlg::EcP384.test_scheme(),
            SignatureScheme::ECDSA_NISTP384_SHA384
        );
        for alg in [KeyAlg::Rsa, KeyAlg::EcP256, KeyAlg::EcP384] {
            for s in alg.schemes() {
                assert!(plan(*s).is_some(), "{s:?}");
            }
        }
        assert_eq!(plan(SignatureScheme::ED25519), None);
    }
}
