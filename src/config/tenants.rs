//! `[[tenants]]`: the tenants the sidecar keeps a session for, and their credentials.

use std::path::PathBuf;

use http::HeaderValue;
use serde::Deserialize;

use super::convert::Convert;
use super::EnvRules;
use crate::secret::SecretSource;

/// One tenant the sidecar holds a session for.
#[derive(Debug, Clone)]
pub struct TenantConfig {
    /// FinHub tenant id, sent byte-exact as `X-Tenant-ID` (A16).
    pub id: String,
    /// `id` as a header value, built once.
    pub id_header: HeaderValue,
    /// Login user name.
    pub username: String,
    /// Login password (re-read from its file at each login).
    pub password: SecretSource,
    /// Client id (`customerId` / `customerKey`), if this environment sends it.
    pub customer_id: Option<String>,
    /// Client secret, if this environment sends it.
    pub customer_secret: Option<SecretSource>,
}

/// One `[[tenants]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTenant {
    /// FinHub tenant id (`X-Tenant-ID`), opaque and case-sensitive.
    id: String,
    /// Use this tenant for requests without `X-Tenant-ID`; default: the first tenant.
    #[serde(default)]
    default: bool,
    /// Login user name.
    username: String,
    /// Password as a `${ENV_VAR}` reference.
    password: Option<String>,
    /// File holding the password (trailing newline ignored).
    password_file: Option<PathBuf>,
    /// Client id (`customerId`); not a secret.
    customer_id: Option<String>,
    /// Client secret as a `${ENV_VAR}` reference.
    customer_secret: Option<String>,
    /// File holding the client secret.
    customer_secret_file: Option<PathBuf>,
}

impl Convert<'_> {
    /// `[[tenants]]`, in file order, and the index of the default tenant.
    pub(super) fn tenants(
        &mut self,
        tenants: Vec<FileTenant>,
        rules: Option<EnvRules>,
    ) -> (Vec<TenantConfig>, usize) {
        if tenants.is_empty() {
            self.err("tenants", "at least one [[tenants]] entry is required");
        }
        let mut out = Vec::new();
        let mut default = None;
        for (i, t) in tenants.into_iter().enumerate() {
            let key = format!("tenants[{i}]");
            if t.default {
                if default.is_some() {
                    self.err(
                        format!("{key}.default"),
                        "more than one tenant is marked default",
                    );
                }
                default = Some(i);
            }
            if out.iter().any(|o: &TenantConfig| o.id == t.id) {
                self.err(
                    format!("{key}.id"),
                    format!("duplicate tenant id `{}`", t.id),
                );
            }
            let id_header = match HeaderValue::from_str(&t.id) {
                Ok(h) if !t.id.is_empty() => h,
                _ => {
                    self.err(
                        format!("{key}.id"),
                        "must be a non-empty printable header value",
                    );
                    continue;
                }
            };
            if t.username.is_empty() {
                self.err(format!("{key}.username"), "must not be empty");
            }
            let password = self.secret(&key, "password", t.password, t.password_file, true);
            let customer_secret = self.secret(
                &key,
                "customer_secret",
                t.customer_secret,
                t.customer_secret_file,
                false,
            );
            if rules.is_some_and(|r| r.requires_client_credentials)
                && (t.customer_id.is_none() || customer_secret.is_none())
            {
                self.err(
                    format!("{key}.customer_id"),
                    "playground/sandbox logins need customer_id and customer_secret",
                );
            }
            if let Some(password) = password {
                out.push(TenantConfig {
                    id: t.id,
                    id_header,
                    username: t.username,
                    password,
                    customer_id: t.customer_id,
                    customer_secret,
                });
            }
        }
        (out, default.unwrap_or(0))
    }
}
