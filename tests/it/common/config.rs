//! The sidecar's config file as a typed builder over a `toml::Table`: [`World::config`] gives
//! the config every test starts from, typed setters cover the keys tests change, and
//! [`SidecarConfig::set`] reaches any other key by its dotted name.
//!
//! [`World::config`]: super::World::config

use std::path::Path;

use toml::{Table, Value};

/// A sidecar config file being built.
#[derive(Clone, Debug, Default)]
pub struct SidecarConfig {
    table: Table,
}

impl SidecarConfig {
    /// Sets `key` (dotted, e.g. `"policy.rate_limit.rate"`) to `value`, creating the tables on
    /// the way.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Self {
        let (path, last) = match key.rsplit_once('.') {
            Some((path, last)) => (Some(path), last),
            None => (None, key),
        };
        let mut table = &mut self.table;
        for part in path.into_iter().flat_map(|p| p.split('.')) {
            table = table
                .entry(part)
                .or_insert_with(|| Value::Table(Table::new()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("{key}: `{part}` is not a table"));
        }
        table.insert(last.to_string(), value.into());
        self
    }

    /// Removes `key` (dotted), if set.
    pub fn unset(mut self, key: &str) -> Self {
        let (path, last) = key.rsplit_once('.').unwrap_or(("", key));
        let mut table = &mut self.table;
        for part in path.split('.').filter(|p| !p.is_empty()) {
            match table.get_mut(part).and_then(Value::as_table_mut) {
                Some(t) => table = t,
                None => return self,
            }
        }
        table.remove(last);
        self
    }

    /// The value at `key` (dotted), if set.
    pub fn get(&self, key: &str) -> Option<&Value> {
        let mut parts = key.split('.');
        let mut value = self.table.get(parts.next()?)?;
        for part in parts {
            value = value.as_table()?.get(part)?;
        }
        Some(value)
    }

    /// Appends `entry` to the array of tables at `key` (dotted), e.g. `[[tenants]]`.
    pub fn push(mut self, key: &str, entry: Table) -> Self {
        let mut entries = match self.get(key) {
            Some(Value::Array(a)) => a.clone(),
            _ => Vec::new(),
        };
        entries.push(Value::Table(entry));
        self = self.set(key, entries);
        self
    }

    /// `auth.environment`: `sandbox` (the default here), `integration` or `production`.
    pub fn environment(self, environment: &str) -> Self {
        self.set("auth.environment", environment)
    }

    /// `client_cert.cert_file` and `client_cert.key_file`.
    pub fn client_cert(self, cert: &Path, key: &Path) -> Self {
        self.set("client_cert.cert_file", path(cert))
            .set("client_cert.key_file", path(key))
    }

    /// `client_cert.reload_interval`.
    pub fn cert_reload_interval(self, interval: &str) -> Self {
        self.set("client_cert.reload_interval", interval)
    }

    /// Another `[[tenants]]` entry with a password file (relative to the config's folder).
    pub fn tenant(self, id: &str, username: &str, password_file: &str) -> Self {
        let mut t = Table::new();
        t.insert("id".into(), id.into());
        t.insert("username".into(), username.into());
        t.insert("password_file".into(), password_file.into());
        self.push("tenants", t)
    }

    /// `policy.allowed_clients`.
    pub fn allowed_clients(self, cidrs: &[&str]) -> Self {
        self.set("policy.allowed_clients", cidrs.to_vec())
    }

    /// `policy.trusted_forwarders`.
    pub fn trusted_forwarders(self, cidrs: &[&str]) -> Self {
        self.set("policy.trusted_forwarders", cidrs.to_vec())
    }

    /// The tenant limit: `policy.rate_limit.rate` per second, `burst`.
    pub fn rate_limit(self, rate: i64, burst: i64) -> Self {
        self.set("policy.rate_limit.rate", rate)
            .set("policy.rate_limit.burst", burst)
    }

    /// A `[[policy.rate_limit.routes]]` bucket for paths under `path_prefix`.
    pub fn route_limit(self, path_prefix: &str, rate: i64, burst: i64) -> Self {
        let mut r = Table::new();
        r.insert("path_prefix".into(), path_prefix.into());
        r.insert("rate".into(), rate.into());
        r.insert("burst".into(), burst.into());
        self.push("policy.rate_limit.routes", r)
    }

    /// `shutdown.drain_delay` and `shutdown.deadline`.
    pub fn shutdown(self, drain_delay: &str, deadline: &str) -> Self {
        self.set("shutdown.drain_delay", drain_delay)
            .set("shutdown.deadline", deadline)
    }

    /// `log.level` (an `EnvFilter` directive).
    pub fn log_level(self, level: &str) -> Self {
        self.set("log.level", level)
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.table).expect("a TOML table serialises")
    }

    /// Writes the TOML text to `file`.
    pub fn write_to(&self, file: &Path) {
        std::fs::write(file, self.to_toml()).expect("write the sidecar config");
    }
}

/// A path as a TOML string.
pub fn path(p: &Path) -> String {
    p.to_str().expect("UTF-8 test path").to_string()
}
