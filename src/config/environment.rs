//! `auth.environment`: which FinHub environment this is, and the rules that follow from it
//! ([`EnvRules`], decided here and nowhere else).

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
    /// The rules of this environment: the one place an environment is matched on.
    pub const fn rules(self) -> EnvRules {
        /// Playground and sandbox: the sandbox login, client credentials, mTLS optional.
        const SANDBOX: EnvRules = EnvRules {
            requires_client_cert: false,
            strict_certificate_rules: false,
            requires_real_origin_ip: false,
            requires_client_credentials: true,
            sends_client_credentials: true,
            sandbox_login_body: true,
            refresh_supported: false,
            default_login_path: "/api/v2/auth/sandbox/token",
        };
        match self {
            Environment::Playground | Environment::Sandbox => SANDBOX,
            Environment::Integration => EnvRules {
                requires_client_cert: false,
                strict_certificate_rules: false,
                requires_real_origin_ip: false,
                requires_client_credentials: false,
                sends_client_credentials: false,
                sandbox_login_body: false,
                refresh_supported: true,
                default_login_path: "/api/v2/auth/token",
            },
            Environment::Production => EnvRules {
                requires_client_cert: true,
                strict_certificate_rules: true,
                requires_real_origin_ip: true,
                requires_client_credentials: false,
                sends_client_credentials: true,
                sandbox_login_body: false,
                refresh_supported: true,
                default_login_path: "/api/v2/auth/token",
            },
        }
    }
}

/// What an environment demands and how its login works, computed once from [`Environment`]
/// (stored as [`super::Config::rules`]); callers read a flag instead of comparing environments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvRules {
    /// mTLS is mandatory: a configuration without `[client_cert]` is refused, and so is a
    /// start without a loaded client certificate.
    pub requires_client_cert: bool,
    /// FinHub's client-certificate rules are enforced (a violation refuses the certificate)
    /// rather than only warned about.
    pub strict_certificate_rules: bool,
    /// `headers.origin_ip` must be the real originating IP, not loopback.
    pub requires_real_origin_ip: bool,
    /// Every tenant needs `customer_id` and `customer_secret`.
    pub requires_client_credentials: bool,
    /// `customerId` and `customerSecret` go in the login body (A9).
    pub sends_client_credentials: bool,
    /// The sandbox token body: no `grantType`, and `customerKey` beside `customerId` (A10).
    pub sandbox_login_body: bool,
    /// Sessions can be refreshed (A3, A6); otherwise every renewal is a login.
    pub refresh_supported: bool,
    /// Default of `auth.login_path` (protocol notes §2.2–2.4).
    pub default_login_path: &'static str,
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
    use super::*;

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

    #[test]
    fn playground_rules() {
        let r = Environment::Playground.rules();
        assert!(!r.requires_client_cert);
        assert!(!r.strict_certificate_rules);
        assert!(!r.requires_real_origin_ip);
        assert!(r.requires_client_credentials);
        assert!(r.sends_client_credentials);
        assert!(r.sandbox_login_body);
        assert!(!r.refresh_supported);
        assert_eq!(r.default_login_path, "/api/v2/auth/sandbox/token");
    }

    #[test]
    fn sandbox_rules() {
        // "Sandbox: as playground."
        assert_eq!(
            Environment::Sandbox.rules(),
            Environment::Playground.rules()
        );
    }

    #[test]
    fn integration_rules() {
        let r = Environment::Integration.rules();
        assert!(!r.requires_client_cert);
        assert!(!r.strict_certificate_rules);
        assert!(!r.requires_real_origin_ip);
        assert!(!r.requires_client_credentials);
        assert!(!r.sends_client_credentials);
        assert!(!r.sandbox_login_body);
        assert!(r.refresh_supported);
        assert_eq!(r.default_login_path, "/api/v2/auth/token");
    }

    #[test]
    fn production_rules() {
        let r = Environment::Production.rules();
        assert!(r.requires_client_cert);
        assert!(r.strict_certificate_rules);
        assert!(r.requires_real_origin_ip);
        assert!(!r.requires_client_credentials);
        assert!(r.sends_client_credentials);
        assert!(!r.sandbox_login_body);
        assert!(r.refresh_supported);
        assert_eq!(r.default_login_path, "/api/v2/auth/token");
    }

    #[test]
    fn config_carries_its_environments_rules() {
        for (name, env) in [
            ("playground", Environment::Playground),
            ("sandbox", Environment::Sandbox),
            ("integration", Environment::Integration),
            ("production", Environment::Production),
        ] {
            let text = format!(
                "{}\n[client_cert]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\n[headers]\norigin_ip = \"${{POD_IP}}\"\n",
                MINIMAL
                    .replace("integration", name)
                    .replace("password = \"${PW}\"", "password = \"${PW}\"\ncustomer_id = \"c\"\ncustomer_secret = \"${PW}\"")
            );
            let c = load(&text).expect(name);
            assert_eq!(c.auth.environment, env);
            assert_eq!(c.rules, env.rules(), "{name}");
            assert_eq!(c.auth.login_path, env.rules().default_login_path, "{name}");
        }
    }

    #[test]
    fn sandbox_flavours_need_client_credentials() {
        for name in ["playground", "sandbox"] {
            let e = load(&MINIMAL.replace("integration", name)).unwrap_err();
            assert_eq!(e.0[0].key, "tenants[0].customer_id", "{name}: {e}");
        }
    }
}
