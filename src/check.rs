//! `finhub-sidecar check`: validate a configuration and every file it names, and say what is
//! wrong with file and key. Prints nothing secret.

use std::io::Write;
use std::path::Path;

use crate::config::{Config, KeySource};
use crate::tls::ClientTls;

/// Checks `path`, writing a report to `out`; returns whether the configuration is usable.
pub fn check(path: &Path, out: &mut dyn Write) -> std::io::Result<bool> {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                writeln!(out, "error: {e}")?;
            }
            writeln!(
                out,
                "{}: {} problem(s) found",
                path.display(),
                errors.0.len()
            )?;
            return Ok(false);
        }
    };
    let tls = match ClientTls::load(&config) {
        Ok(t) => t,
        Err(e) => {
            let p = e.path();
            let key = if let Some(key) = e.config_key() {
                key
            } else if p.is_some() && config.upstream.ca_file.as_deref() == p {
                "upstream.ca_file"
            } else if config
                .client_cert
                .as_ref()
                .is_some_and(|c| matches!(&c.key, KeySource::File(k) if Some(k.as_path()) == p))
            {
                "client_cert.key_file"
            } else {
                "client_cert.cert_file"
            };
            writeln!(out, "error: {}: {key}: {e}", path.display())?;
            return Ok(false);
        }
    };
    for w in &config.warnings {
        writeln!(out, "warning: {w}")?;
    }
    writeln!(out, "config:      {}", path.display())?;
    writeln!(out, "listener:    {}", config.listen)?;
    writeln!(out, "admin:       {}", config.admin_listen)?;
    writeln!(
        out,
        "upstream:    https://{}:{} ({})",
        config.upstream.host, config.upstream.port, config.auth.environment
    )?;
    let ids: Vec<&str> = config.tenants.iter().map(|t| t.id.as_str()).collect();
    writeln!(
        out,
        "tenants:     {} (default {})",
        ids.join(", "),
        config.default_tenant().id
    )?;
    match &tls.identity {
        Some(id) => {
            writeln!(out, "client cert: subject {}", id.subject)?;
            writeln!(out, "             issuer {}", id.issuer)?;
            writeln!(out, "             serial {}", id.serial_hex)?;
            let not_after = std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(id.not_after_unix.max(0) as u64);
            writeln!(
                out,
                "             not after {}",
                humantime::format_rfc3339_seconds(not_after)
            )?;
        }
        None => writeln!(out, "client cert: none (mTLS off)")?,
    }
    if let Some(token) = &tls.token {
        // Loading verified the token, the object and a test signature against the certificate.
        writeln!(
            out,
            "client key:  {} (PKCS#11; test signature verified with the certificate's key)",
            token.uri()
        )?;
    }
    for f in &tls.warnings {
        writeln!(
            out,
            "warning: {}: client_cert.cert_file: {f} (enforced in production)",
            path.display()
        )?;
    }
    writeln!(out, "ok")?;
    Ok(true)
}
