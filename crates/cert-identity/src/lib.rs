//! Who a certificate names ([`cert_identity`]): subject, issuer, serial and expiry, for the
//! sidecar's logs, `/status`, `check` and metrics.
//!
//! Its own crate so that both the sidecar (`finhub_sidecar::tls::identity`) and the test kit
//! (`finhub_testkit::identity`) depend on it: the emulator's echo and the generated
//! certificates name a certificate exactly as the sidecar does, without the test kit depending
//! on the sidecar (the sidecar's `demo` feature depends on the test kit). Keep it small: only
//! `serde` and `x509_parser`.

use serde::{Deserialize, Serialize};

/// Who a certificate names: enough to tell certificates apart in logs, `/status` and the echo.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertIdentity {
    /// Subject, attributes in certificate order, e.g. `CN=app,O=Acme` (RFC 4514 escaping,
    /// but not reversed).
    pub subject: String,
    /// Issuer, same format.
    pub issuer: String,
    /// Serial number, lowercase hex without separators or a leading `00` sign byte.
    pub serial_hex: String,
    /// notAfter, Unix seconds.
    pub not_after_unix: i64,
}

/// Subject, issuer, serial and expiry of a DER certificate; `None` if it does not parse.
pub fn cert_identity(der: &[u8]) -> Option<CertIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let raw = cert.tbs_certificate.raw_serial();
    let first = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    let serial = raw.get(first..).unwrap_or(raw);
    Some(CertIdentity {
        subject: dn_string(cert.subject()),
        issuer: dn_string(cert.issuer()),
        serial_hex: if serial.is_empty() {
            "00".into()
        } else {
            hex(serial)
        },
        not_after_unix: cert.validity().not_after.timestamp(),
    })
}

fn dn_string(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    name.iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|attr| {
                    let ty = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                        .map(str::to_string)
                        .unwrap_or_else(|_| attr.attr_type().to_id_string());
                    let value = match attr.as_str() {
                        Ok(s) => escape_rfc4514(s),
                        Err(_) => format!("#{}", hex(attr.as_slice())),
                    };
                    format!("{ty}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn escape_rfc4514(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let last = s.chars().count().saturating_sub(1);
    for (i, c) in s.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
            out.push(c);
        } else if c == '\0' {
            out.push_str("\\00");
        } else {
            out.push(c);
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_of_garbage_is_none() {
        assert_eq!(cert_identity(b"\x30\x03abc"), None);
        assert_eq!(cert_identity(b""), None);
    }

    #[test]
    fn names_are_escaped_per_rfc4514() {
        assert_eq!(escape_rfc4514("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape_rfc4514("#x "), "\\#x\\ ");
        assert_eq!(escape_rfc4514("a\0b"), "a\\00b");
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
    }
}
