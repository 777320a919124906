//! `[client_cert]`: the mTLS identity presented to FinHub, and how often its files are re-read.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::convert::{secs, Convert};
use super::EnvRules;
use crate::secret::SecretSource;

/// Default of `client_cert.reload_interval`, also used to poll the CA file without a client
/// certificate.
pub(super) const DEFAULT_RELOAD_INTERVAL: Duration = secs(5);

/// Default of `client_cert.expiry_warning`.
pub(super) const DEFAULT_EXPIRY_WARNING: Duration = secs(7 * 86_400);

/// Client certificate file (PEM) and where its private key is.
#[derive(Debug, Clone)]
pub struct ClientCertFiles {
    /// Certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The private key: a PEM file, or an object in a PKCS#11 token.
    pub key: KeySource,
    /// How often the files are re-read.
    pub reload_interval: Duration,
    /// Warn when the certificate expires within this window.
    pub expiry_warning: Duration,
}

/// Where the client certificate's private key is.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A PEM file (PKCS#8, PKCS#1 or SEC1), re-read with the certificate.
    File(PathBuf),
    /// A key that never leaves a PKCS#11 token (an HSM): handshakes sign through it.
    Pkcs11(Pkcs11Key),
}

/// `client_cert.key_uri` with its module and PIN.
#[derive(Debug, Clone)]
pub struct Pkcs11Key {
    /// The RFC 7512 URI as written (contains no secret: PINs in URIs are refused).
    pub uri_text: String,
    /// What the URI selects.
    pub uri: Pkcs11Uri,
    /// The PKCS#11 library (`.so`) to load.
    pub module: PathBuf,
    /// The user PIN, from `pin_file` (re-read when the token is opened again) or `${ENV}`.
    pub pin: SecretSource,
    /// Bound on each call into the token (a signature, a key lookup).
    pub timeout: Duration,
}

/// `client_cert` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileClientCert {
    /// PEM certificate chain, leaf first.
    cert_file: PathBuf,
    /// PEM private key matching the leaf; or use `key_uri`.
    key_file: Option<PathBuf>,
    /// RFC 7512 PKCS#11 URI of the private key in an HSM, e.g.
    /// `"pkcs11:token=finhub;object=mtls"` (`token`, `serial`, `object`, `id`); instead of
    /// `key_file`.
    key_uri: Option<String>,
    /// Path of the PKCS#11 module (library) that reaches the token; needed with `key_uri`.
    pkcs11_module: Option<PathBuf>,
    /// The token's user PIN as `${ENV_VAR}`; or use `pin_file`.
    pin: Option<String>,
    /// File holding the token's user PIN.
    pin_file: Option<PathBuf>,
    /// Bound on each call into the token (a signature during a handshake, a key lookup);
    /// default 2 s.
    pkcs11_timeout: Option<String>,
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
        let client_cert = match c {
            None => None,
            Some(c) => {
                let key = self.key_source(
                    c.key_file,
                    c.key_uri,
                    c.pkcs11_module,
                    c.pin,
                    c.pin_file,
                    c.pkcs11_timeout,
                );
                let cert_file = self.path(c.cert_file);
                let reload_interval = self.duration(
                    "client_cert.reload_interval",
                    c.reload_interval.as_deref(),
                    DEFAULT_RELOAD_INTERVAL,
                );
                let expiry_warning = self.duration(
                    "client_cert.expiry_warning",
                    c.expiry_warning.as_deref(),
                    DEFAULT_EXPIRY_WARNING,
                );
                key.map(|key| ClientCertFiles {
                    cert_file,
                    key,
                    reload_interval,
                    expiry_warning,
                })
            }
        };
        if client_cert.is_none() && rules.is_some_and(|r| r.requires_client_cert) {
            self.err(
                "client_cert",
                "production requires a client certificate (mTLS is mandatory)",
            );
        }
        client_cert
    }

    /// `key_file`, or `key_uri` with `pkcs11_module` and the PIN: exactly one key.
    fn key_source(
        &mut self,
        key_file: Option<PathBuf>,
        key_uri: Option<String>,
        module: Option<PathBuf>,
        pin: Option<String>,
        pin_file: Option<PathBuf>,
        timeout: Option<String>,
    ) -> Option<KeySource> {
        let uri_text = match (key_file, key_uri) {
            (Some(_), Some(_)) => {
                self.err(
                    "client_cert.key_uri",
                    "set either key_file or key_uri, not both",
                );
                return None;
            }
            (None, None) => {
                self.err(
                    "client_cert.key_file",
                    "missing: set key_file (PEM) or key_uri (PKCS#11)",
                );
                return None;
            }
            (Some(f), None) => {
                for (set, key) in [
                    (module.is_some(), "client_cert.pkcs11_module"),
                    (pin.is_some() || pin_file.is_some(), "client_cert.pin_file"),
                    (timeout.is_some(), "client_cert.pkcs11_timeout"),
                ] {
                    if set {
                        self.err(key, "only used with key_uri (the key is in key_file)");
                    }
                }
                let f = self.path(f);
                self.check_secret_mode("client_cert.key_file", &f);
                return Some(KeySource::File(f));
            }
            (None, Some(u)) => u,
        };
        let uri = Pkcs11Uri::parse(&uri_text).map_err(|m| self.err("client_cert.key_uri", m));
        let module = match module {
            Some(m) => Some(self.path(m)),
            None => {
                self.err(
                    "client_cert.pkcs11_module",
                    "missing: key_uri needs the path of the PKCS#11 library",
                );
                None
            }
        };
        let pin = self.secret("client_cert", "pin", pin, pin_file, true);
        let timeout = self.duration(
            "client_cert.pkcs11_timeout",
            timeout.as_deref(),
            DEFAULT_PKCS11_TIMEOUT,
        );
        Some(KeySource::Pkcs11(Pkcs11Key {
            uri_text,
            uri: uri.ok()?,
            module: module?,
            pin: pin?,
            timeout,
        }))
    }
}

/// Default of `client_cert.pkcs11_timeout`.
const DEFAULT_PKCS11_TIMEOUT: Duration = secs(2);

/// What an RFC 7512 `pkcs11:` URI selects: a private key by its token and its label or id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `token=`: the token's label.
    pub token: Option<String>,
    /// `serial=`: the token's serial number.
    pub serial: Option<String>,
    /// `object=`: the key's label (`CKA_LABEL`).
    pub object: Option<String>,
    /// `id=`: the key's `CKA_ID` (bytes, percent-encoded in the URI).
    pub id: Option<Vec<u8>>,
}

impl Pkcs11Uri {
    /// Parses `pkcs11:attr=value;…` (path attributes percent-decoded). A PIN or module in the
    /// URI is refused (they have keys of their own); so is any attribute this cannot honour.
    pub fn parse(text: &str) -> Result<Pkcs11Uri, String> {
        let rest = text
            .strip_prefix("pkcs11:")
            .ok_or("must start with `pkcs11:` (RFC 7512)")?;
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        // Query attributes (PIN, module) have keys of their own; none is honoured here.
        if let Some(attr) = query.and_then(|q| q.split('&').find(|a| !a.is_empty())) {
            let name = attr.split_once('=').map_or(attr, |(n, _)| n);
            return Err(match name {
                // Not echoed: the value is a secret.
                "pin-value" | "pin-source" => {
                    "must not carry the PIN; use client_cert.pin_file".into()
                }
                "module-path" | "module-name" => {
                    "must not name the module; use client_cert.pkcs11_module".into()
                }
                other => format!("query attribute `{other}` is not supported"),
            });
        }
        let mut uri = Pkcs11Uri::default();
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (name, raw) = attr
                .split_once('=')
                .ok_or_else(|| format!("`{attr}` is not attribute=value"))?;
            let value = percent_decode(raw)
                .ok_or_else(|| format!("the value of `{name}` has a malformed percent-encoding"))?;
            let text = || {
                String::from_utf8(value.clone())
                    .map_err(|_| format!("the value of `{name}` is not UTF-8"))
            };
            let slot = match name {
                "token" => uri.token.replace(text()?).is_some(),
                "serial" => uri.serial.replace(text()?).is_some(),
                "object" => uri.object.replace(text()?).is_some(),
                "id" => uri.id.replace(value).is_some(),
                "type" => match value.as_slice() {
                    b"private" => false,
                    _ => return Err("`type` must be `private` (the key, not a certificate)".into()),
                },
                other => {
                    return Err(format!(
                    "path attribute `{other}` is not supported (token, serial, object, id, type)"
                ))
                }
            };
            if slot {
                return Err(format!("attribute `{name}` is given twice"));
            }
        }
        if uri.object.is_none() && uri.id.is_none() {
            return Err("must name the key with `object=` (label) or `id=`".into());
        }
        Ok(uri)
    }
}

/// RFC 3986 percent-decoding; `None` for a malformed escape.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            // Exactly two hex digits (`from_str_radix` alone would take a sign: `%+1`).
            let hex = b.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn percent_escapes_are_two_hex_digits() {
        assert_eq!(percent_decode("a%2Fb%41"), Some(b"a/bA".to_vec()));
        for bad in ["%+1", "%-1", "%1", "%", "%g0", "% 1"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn pkcs11_uris_per_rfc_7512() {
        let u = Pkcs11Uri::parse("pkcs11:token=finhub;object=mtls").unwrap();
        assert_eq!(u.token.as_deref(), Some("finhub"));
        assert_eq!(u.object.as_deref(), Some("mtls"));
        let u = Pkcs11Uri::parse("pkcs11:token=My%20Token;id=%01%a2;type=private").unwrap();
        assert_eq!(u.token.as_deref(), Some("My Token"));
        assert_eq!(u.id.as_deref(), Some([0x01, 0xa2].as_slice()));
        assert_eq!(u.object, None);
        for bad in [
            "pkcs11:token=finhub",
            "file:///key.pem",
            "pkcs11:object=a;object=b",
            "pkcs11:object=%zz",
            "pkcs11:object=a;type=cert",
            "pkcs11:object=a;slot-id=3",
            "pkcs11:object=a?module-path=/x.so",
            "pkcs11:object",
        ] {
            assert!(Pkcs11Uri::parse(bad).is_err(), "{bad}");
        }
        let e = Pkcs11Uri::parse("pkcs11:object=a?pin-value=123456").unwrap_err();
        assert!(!e.contains("123456"), "{e}");
    }

    fn with_cert(keys: &str) -> String {
        format!("{MINIMAL}\n[client_cert]\ncert_file = \"c.pem\"\n{keys}\n")
    }

    #[test]
    fn a_token_key_is_configured_with_module_and_pin() {
        let c = load(&with_cert(
            "key_uri = \"pkcs11:token=finhub;object=mtls\"\npkcs11_module = \"/usr/lib/softhsm/libsofthsm2.so\"\npin = \"${PW}\"",
        ))
        .unwrap();
        let KeySource::Pkcs11(k) = c.client_cert.unwrap().key else {
            panic!("a token key")
        };
        assert_eq!(k.uri.object.as_deref(), Some("mtls"));
        assert_eq!(k.pin.current().expose(), "s3cret-value");
        assert_eq!(k.timeout, secs(2));
    }

    #[test]
    fn key_mistakes_name_their_key() {
        assert_eq!(
            keys(&with_cert(
                "key_file = \"k.pem\"\nkey_uri = \"pkcs11:object=x\""
            )),
            ["client_cert.key_uri"]
        );
        assert_eq!(keys(&with_cert("")), ["client_cert.key_file"]);
        assert_eq!(
            keys(&with_cert("key_file = \"k.pem\"\npin = \"${PW}\"")),
            ["client_cert.pin_file"]
        );
        assert_eq!(
            keys(&with_cert("key_uri = \"pkcs11:object=x\"\npin = \"${PW}\"")),
            ["client_cert.pkcs11_module"]
        );
        assert_eq!(
            keys(&with_cert(
                "key_uri = \"pkcs11:object=x\"\npkcs11_module = \"/m.so\""
            )),
            ["client_cert.pin"]
        );
        assert_eq!(
            keys(&with_cert(
                "key_uri = \"pkcs11:token=x\"\npkcs11_module = \"/m.so\"\npin = \"${PW}\""
            )),
            ["client_cert.key_uri"]
        );
        // The PIN is never accepted inline, and never echoed.
        let e = load(&with_cert(
            "key_uri = \"pkcs11:object=x\"\npkcs11_module = \"/m.so\"\npin = \"123456\"",
        ))
        .unwrap_err();
        assert_eq!(e.0[0].key, "client_cert.pin");
        assert!(!e.to_string().contains("123456"));
    }
}
