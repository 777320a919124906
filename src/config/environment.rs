//! `auth.environment`: which FinHub environment this is.

use std::fmt;

use serde::Deserialize;

/// FinHub environment; selects the login flavour and how strict the checks are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Playground: sandbox token endpoint, client credentials in the body, mTLS optional.
    Playground,
    /// Sandbox: as playground.
    Sandbox,
    /// Integration: `/api/v2/auth/token`, no client credentials in the body.
    Integration,
    /// Production: `/api/v2/auth/token` over mandatory mTLS, strict checks.
    Production,
}

impl Environment {
    /// Whether this environment uses the sandbox token endpoint and body.
    pub fn is_sandbox_flavour(self) -> bool {
        matches!(self, Environment::Playground | Environment::Sandbox)
    }

    /// Default login path (protocol notes §2.2–2.4).
    pub fn default_login_path(self) -> &'static str {
        if self.is_sandbox_flavour() {
            "/api/v2/auth/sandbox/token"
        } else {
            "/api/v2/auth/token"
        }
    }

    /// Whether client credentials (`customerId`, `customerSecret`) go in the login body (A9).
    pub fn sends_client_credentials(self) -> bool {
        !matches!(self, Environment::Integration)
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Environment::Playground => "playground",
            Environment::Sandbox => "sandbox",
            Environment::Integration => "integration",
            Environment::Production => "production",
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::path::PathBuf;

    use super::super::testing::*;

    #[test]
    fn production_needs_cert_and_real_origin_ip() {
        let text = MINIMAL.replace("integration", "production");
        let e = load(&text).unwrap_err();
        let keys: Vec<_> = e.0.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"client_cert"), "{keys:?}");
        assert!(keys.contains(&"headers.origin_ip"), "{keys:?}");
        let ok = format!(
            "{}\n[client_cert]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n[headers]\norigin_ip = \"${{POD_IP}}\"\n",
            text
        );
        let c = load(&ok).expect("valid");
        assert_eq!(c.headers.origin_ip, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(
            c.client_cert.unwrap().cert_file,
            PathBuf::from("/etc/finhub/c.pem")
        );
    }
}
