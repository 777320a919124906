//! The conversion context and the helpers every section uses: one [`Convert`] collects every
//! error (file and dotted key) while the sections turn their file structs into typed values.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ConfigError;
use crate::secret::{Secret, SecretSource};

/// File structs -> typed config, collecting every error instead of stopping at the first.
pub(super) struct Convert<'a> {
    /// The configuration file (named in every error).
    pub(super) file: PathBuf,
    /// Relative paths in the file are relative to this directory.
    base_dir: PathBuf,
    /// Looks up `${VAR}` references.
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
    /// Looks up the standard `OTEL_*` variables (tracing only).
    pub(super) otel_env: &'a dyn Fn(&str) -> Option<String>,
    /// Everything wrong so far.
    pub(super) errors: Vec<ConfigError>,
    /// Everything unwise so far ([`super::Config::warnings`]).
    pub(super) warnings: Vec<String>,
}

impl<'a> Convert<'a> {
    /// A context for `file`, resolving `${VAR}` through `env`.
    pub(super) fn new(file: &Path, env: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Convert {
            file: file.to_path_buf(),
            base_dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
            env,
            otel_env: &|_| None,
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

impl Convert<'_> {
    /// Records that `key` is wrong.
    pub(super) fn err(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            key: key.into(),
            message: message.into(),
        });
    }

    /// Records a warning about `key` for the secret file `p` if other users can read or change
    /// it (as ssh does for private keys).
    pub(super) fn check_secret_mode(&mut self, key: &str, p: &Path) {
        if let Some(w) = crate::files::loose_secret_warning(key, p) {
            self.warnings.push(format!("{}: {w}", self.file.display()));
        }
    }

    /// `p`, relative to the configuration file's directory unless absolute.
    pub(super) fn path(&self, p: PathBuf) -> PathBuf {
        if p.is_absolute() {
            p
        } else {
            self.base_dir.join(p)
        }
    }

    /// An `IP:port` socket address, `default` when unset.
    pub(super) fn addr(
        &mut self,
        key: &str,
        value: Option<&str>,
        default: &str,
    ) -> Option<SocketAddr> {
        let v = value.unwrap_or(default);
        match v.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(key, format!("`{v}` is not an IP:port socket address"));
                None
            }
        }
    }

    /// A humantime duration greater than zero, `default` when unset (or wrong).
    pub(super) fn duration(
        &mut self,
        key: &str,
        value: Option<&str>,
        default: Duration,
    ) -> Duration {
        match value {
            None => default,
            Some(v) => match humantime::parse_duration(v) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    self.err(key, "must be greater than zero");
                    default
                }
                Err(e) => {
                    self.err(
                        key,
                        format!("`{v}` is not a duration like \"5s\" or \"250ms\": {e}"),
                    );
                    default
                }
            },
        }
    }

    /// Like [`Self::duration`] but `"0s"` is allowed.
    pub(super) fn duration_or_zero(
        &mut self,
        key: &str,
        value: Option<&str>,
        default: Duration,
    ) -> Duration {
        match value.map(str::trim) {
            Some("0" | "0s") => Duration::ZERO,
            other => self.duration(key, other, default),
        }
    }

    /// A secret given as `${ENV}` in `name` or as a file in `name_file`, exactly one of them.
    pub(super) fn secret(
        &mut self,
        prefix: &str,
        name: &str,
        inline: Option<String>,
        file: Option<PathBuf>,
        required: bool,
    ) -> Option<SecretSource> {
        let key = format!("{prefix}.{name}");
        let file_key = format!("{prefix}.{name}_file");
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.err(&key, format!("set either {name} or {name}_file, not both"));
                None
            }
            (None, None) => {
                if required {
                    self.err(
                        &key,
                        format!(
                            "missing: set {name} = \"${{ENV_VAR}}\" or {name}_file = \"/path\""
                        ),
                    );
                }
                None
            }
            (Some(v), None) => match env_reference(&v) {
                Some(var) => match (self.env)(var) {
                    Some(val) if !val.is_empty() => Some(SecretSource::fixed(Secret::new(val))),
                    _ => {
                        self.err(
                            &key,
                            format!("environment variable {var} is not set or empty"),
                        );
                        None
                    }
                },
                None => {
                    self.err(
                        &key,
                        format!(
                            "secrets are not accepted inline; use {name} = \"${{ENV_VAR}}\" or {name}_file"
                        ),
                    );
                    None
                }
            },
            (None, Some(p)) => {
                let p = self.path(p);
                match crate::files::read_to_string(&p) {
                    Ok(s) => {
                        let s = s.trim_end_matches(['\n', '\r']);
                        if s.is_empty() {
                            self.err(&file_key, format!("{} is empty", p.display()));
                            None
                        } else {
                            self.check_secret_mode(&file_key, &p);
                            Some(SecretSource::file(Secret::new(s), p.clone()))
                        }
                    }
                    Err(e) => {
                        self.err(&file_key, format!("cannot read {}: {e}", p.display()));
                        None
                    }
                }
            }
        }
    }
}

/// Whole seconds as a [`Duration`] (for defaults and bounds).
pub(super) const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// `${NAME}` -> `NAME`; anything else -> `None`.
pub(super) fn env_reference(v: &str) -> Option<&str> {
    let name = v.trim().strip_prefix("${")?.strip_suffix('}')?;
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    valid.then_some(name)
}

/// `s` on one line: lines trimmed, empty ones dropped, joined by spaces.
pub(super) fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `pem` holds at least one certificate and every certificate block in it parses.
pub(super) fn pem_has_certificates(pem: &[u8]) -> bool {
    use rustls_pki_types::pem::PemObject;
    let mut any = false;
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
        if cert.is_err() {
            return false;
        }
        any = true;
    }
    any
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;

    #[test]
    fn inline_secret_is_refused_without_echoing_it() {
        let text = MINIMAL.replace("${PW}", "plain-text-password");
        let e = load(&text).unwrap_err();
        assert_eq!(e.0[0].key, "tenants[0].password");
        assert!(!e.to_string().contains("plain-text-password"));
    }

    #[test]
    fn missing_env_var_is_reported() {
        let text = MINIMAL.replace("${PW}", "${NOPE}");
        let e = load(&text).unwrap_err();
        assert!(e.0[0].message.contains("NOPE"));
    }
}
