//! The TLS component's metrics: the published client certificate (expiry, reloads) and the
//! PKCS#11 token's failures. Built by [`TlsMetrics::register`]; labels are typed.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// The `result` label of `finhub_sidecar_cert_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// A new set was published.
    Published,
    /// A new set was rejected; the last good one stays.
    Rejected,
}

impl ReloadResult {
    /// Every value, to create the series at 0.
    pub const ALL: [ReloadResult; 2] = [ReloadResult::Published, ReloadResult::Rejected];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Published => "published",
            ReloadResult::Rejected => "rejected",
        }
    }
}

/// The `kind` label of `finhub_sidecar_pkcs11_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFailure {
    /// The token did not answer in time.
    Timeout,
    /// Too many calls were waiting for the token already.
    Busy,
    /// A signature failed at once, without asking the token, because its previous call is
    /// still running late.
    Skipped,
    /// The token refused to log the user in (wrong, locked or last-try PIN).
    Login,
    /// The module, token or key named by the key URI was not found or not usable.
    NotFound,
    /// A PKCS#11 call failed.
    Error,
}

impl TokenFailure {
    /// Every value, in label order, to create the series at 0.
    pub const ALL: [TokenFailure; 6] = [
        TokenFailure::Timeout,
        TokenFailure::Busy,
        TokenFailure::Skipped,
        TokenFailure::Login,
        TokenFailure::NotFound,
        TokenFailure::Error,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenFailure::Timeout => "timeout",
            TokenFailure::Busy => "busy",
            TokenFailure::Skipped => "skipped",
            TokenFailure::Login => "login",
            TokenFailure::NotFound => "not_found",
            TokenFailure::Error => "error",
        }
    }
}

/// TLS metric handles; cheap to clone.
#[derive(Clone)]
pub struct TlsMetrics {
    /// `finhub_sidecar_client_cert_expiration_timestamp_seconds`: `notAfter` of the published
    /// client certificate (0 when none).
    expiration: IntGauge,
    /// `finhub_sidecar_cert_reloads_total{result="published|rejected"}`: certificate sets
    /// published or rejected by the reloader (unchanged polls are not counted).
    reloads: IntCounterVec,
    /// `finhub_sidecar_cert_last_reload_timestamp_seconds`: when a set was last published.
    last_reload: IntGauge,
    /// The token's failures.
    token: TokenErrors,
}

/// `finhub_sidecar_pkcs11_errors_total{kind="timeout|busy|skipped|login|not_found|error"}`:
/// calls into the PKCS#11 token holding the client key that failed (signatures, probes, loads).
#[derive(Clone)]
pub struct TokenErrors {
    errors: IntCounterVec,
}

impl TlsMetrics {
    /// Creates the TLS metrics in `registry`, every labelled series at 0.
    pub fn register(registry: &Registry) -> TlsMetrics {
        // Each definition is static and each name is registered once per registry.
        let expiration = IntGauge::new(
            "finhub_sidecar_client_cert_expiration_timestamp_seconds",
            "notAfter of the client certificate in use, Unix seconds",
        )
        .expect("static metric definition is valid");
        let reloads = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_cert_reloads_total",
                "Client certificate sets published or rejected by the reloader",
            ),
            &["result"],
        )
        .expect("static metric definition is valid");
        let last_reload = IntGauge::new(
            "finhub_sidecar_cert_last_reload_timestamp_seconds",
            "When a client certificate set was last published, Unix seconds",
        )
        .expect("static metric definition is valid");
        let errors = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_pkcs11_errors_total",
                "Calls into the PKCS#11 token holding the client key that failed, by kind",
            ),
            &["kind"],
        )
        .expect("static metric definition is valid");
        crate::registry::register_all(
            registry,
            [
                Box::new(expiration.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(reloads.clone()),
                Box::new(last_reload.clone()),
                Box::new(errors.clone()),
            ],
        );
        // Expose every series from the start, so a scrape shows 0 rather than nothing.
        for result in ReloadResult::ALL {
            reloads.with_label_values(&[result.as_str()]);
        }
        for kind in TokenFailure::ALL {
            errors.with_label_values(&[kind.as_str()]);
        }
        TlsMetrics {
            expiration,
            reloads,
            last_reload,
            token: TokenErrors { errors },
        }
    }

    /// Records a published set: its certificate's `notAfter` (0 without one), published at
    /// Unix time `now`.
    pub fn published(&self, not_after: i64, now: i64) {
        self.expiration.set(not_after);
        self.last_reload.set(now);
    }

    /// Counts one reload decision.
    pub fn reload(&self, result: ReloadResult) {
        self.reloads.with_label_values(&[result.as_str()]).inc();
    }

    /// The token's failure counters (for the token thread's handle).
    pub fn token(&self) -> TokenErrors {
        self.token.clone()
    }
}

impl TokenErrors {
    /// Counts one failure of `kind`.
    pub fn count(&self, kind: TokenFailure) {
        self.errors.with_label_values(&[kind.as_str()]).inc();
    }

    /// How many failures of `kind` were counted.
    pub fn total(&self, kind: TokenFailure) -> u64 {
        self.errors.with_label_values(&[kind.as_str()]).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_exposed_at_zero() {
        let registry = Registry::new();
        let m = TlsMetrics::register(&registry);
        m.reload(ReloadResult::Published);
        let text = String::from_utf8(crate::registry::text(&registry)).unwrap();
        for line in [
            r#"finhub_sidecar_cert_reloads_total{result="published"} 1"#,
            r#"finhub_sidecar_cert_reloads_total{result="rejected"} 0"#,
            r#"finhub_sidecar_pkcs11_errors_total{kind="skipped"} 0"#,
            "finhub_sidecar_client_cert_expiration_timestamp_seconds 0",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }
}
