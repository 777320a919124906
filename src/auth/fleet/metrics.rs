//! The fleet's metrics: the shared session store's health (up, errors, connections) and each
//! tenant's place in the fleet (lease, where the session came from, adoptions, records this
//! replica could not decrypt). Built by [`FleetMetrics::register`]; labels are typed
//! ([`StoreError`], [`Origin`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::redis_pool::Failure;

/// At most this many distinct key ids are metric labels (a hostile store cannot grow the
/// exposition without bound); others count as `other`.
const MAX_KEY_ID_LABELS: usize = 16;

/// The `kind` label of `finhub_sidecar_session_store_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// No answer within the timeout.
    Timeout,
    /// The connection broke.
    Connection,
    /// No usable connection.
    Unavailable,
    /// Redis answered with an error or something unexpected.
    Response,
    /// The record key held something that is not a record.
    Malformed,
}

impl StoreError {
    /// Every value, to create the series at 0.
    pub const ALL: [StoreError; 5] = [
        StoreError::Timeout,
        StoreError::Connection,
        StoreError::Unavailable,
        StoreError::Response,
        StoreError::Malformed,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreError::Timeout => "timeout",
            StoreError::Connection => "connection",
            StoreError::Unavailable => "unavailable",
            StoreError::Response => "response",
            StoreError::Malformed => "malformed",
        }
    }
}

impl From<Failure> for StoreError {
    fn from(f: Failure) -> StoreError {
        match f {
            Failure::Timeout => StoreError::Timeout,
            Failure::Connection => StoreError::Connection,
            Failure::Unavailable => StoreError::Unavailable,
            Failure::Response => StoreError::Response,
        }
    }
}

/// The `source` label of `finhub_sidecar_session_source`: where the tenant's current session
/// came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Adopted from the shared store.
    Shared,
    /// This replica's own login or refresh.
    Local,
}

impl Origin {
    /// Every value, to set each series.
    pub const ALL: [Origin; 2] = [Origin::Shared, Origin::Local];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Shared => "shared",
            Origin::Local => "local",
        }
    }
}

/// Fleet metric handles; cheap to clone.
#[derive(Clone)]
pub struct FleetMetrics {
    /// `finhub_sidecar_session_store_up`: 1 while the shared session store answered its last
    /// call, 0 when it did not (or no shared store is configured).
    store_up: IntGauge,
    /// `finhub_sidecar_session_store_errors_total{kind}`: shared session store calls that
    /// failed ([`StoreError`]).
    store_errors: IntCounterVec,
    /// `finhub_sidecar_session_store_connections`: pooled connections to the session store.
    store_connections: IntGauge,
    /// `finhub_sidecar_session_lease_owner{tenant}`: 1 while this replica holds the tenant's
    /// renewal lease.
    lease_owner: IntGaugeVec,
    /// `finhub_sidecar_session_source{tenant,source="shared|local"}`: 1 for where the tenant's
    /// current session came from.
    source: IntGaugeVec,
    /// `finhub_sidecar_session_adopted_total{tenant}`: sessions taken from the shared store.
    adopted: IntCounterVec,
    /// `finhub_sidecar_session_decrypt_errors_total{key_id}`: shared records this replica
    /// could not decrypt, by the key id the record names (at most [`MAX_KEY_ID_LABELS`]).
    decrypt_errors: IntCounterVec,
    /// The key ids that are labels already.
    key_id_labels: Arc<Mutex<HashSet<String>>>,
}

impl FleetMetrics {
    /// Creates the fleet metrics in `registry`. Their labelled series are created when a store
    /// is configured ([`FleetMetrics::store_configured`]) and per tenant as it starts
    /// ([`FleetMetrics::tenant_started`]).
    pub fn register(registry: &Registry) -> FleetMetrics {
        // Each definition is static and each name is registered once per registry.
        let store_up = IntGauge::new(
            "finhub_sidecar_session_store_up",
            "1 while the shared session store answered its last call",
        )
        .expect("static metric definition is valid");
        let store_errors = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_session_store_errors_total",
                "Shared session store calls that failed, by kind",
            ),
            &["kind"],
        )
        .expect("static metric definition is valid");
        let store_connections = IntGauge::new(
            "finhub_sidecar_session_store_connections",
            "Pooled connections to the shared session store",
        )
        .expect("static metric definition is valid");
        let lease_owner = IntGaugeVec::new(
            Opts::new(
                "finhub_sidecar_session_lease_owner",
                "1 while this replica holds the tenant's renewal lease in the shared store",
            ),
            &["tenant"],
        )
        .expect("static metric definition is valid");
        let source = IntGaugeVec::new(
            Opts::new(
                "finhub_sidecar_session_source",
                "1 for where the tenant's current session came from (shared store or this replica's own login)",
            ),
            &["tenant", "source"],
        )
        .expect("static metric definition is valid");
        let adopted = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_session_adopted_total",
                "Sessions taken from the shared store",
            ),
            &["tenant"],
        )
        .expect("static metric definition is valid");
        let decrypt_errors = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_session_decrypt_errors_total",
                "Shared session records this replica could not decrypt, by the record's key id",
            ),
            &["key_id"],
        )
        .expect("static metric definition is valid");
        crate::registry::register_all(
            registry,
            [
                Box::new(store_up.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(store_errors.clone()),
                Box::new(store_connections.clone()),
                Box::new(lease_owner.clone()),
                Box::new(source.clone()),
                Box::new(adopted.clone()),
                Box::new(decrypt_errors.clone()),
            ],
        );
        FleetMetrics {
            store_up,
            store_errors,
            store_connections,
            lease_owner,
            source,
            adopted,
            decrypt_errors,
            key_id_labels: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    /// Creates every store error series at 0 (a shared store is configured).
    pub fn store_configured(&self) {
        for kind in StoreError::ALL {
            self.store_errors.with_label_values(&[kind.as_str()]);
        }
    }

    /// The gauge of pooled connections to the store, for the store's pool.
    pub fn store_connections(&self) -> IntGauge {
        self.store_connections.clone()
    }

    /// Counts one failed store call (the store is then down).
    pub fn store_failed(&self, kind: StoreError) {
        self.store_errors.with_label_values(&[kind.as_str()]).inc();
        self.store_up.set(0);
    }

    /// Counts one record key that held no record (the store answered).
    pub fn malformed(&self) {
        self.store_errors
            .with_label_values(&[StoreError::Malformed.as_str()])
            .inc();
    }

    /// The store answered a call.
    pub fn store_answered(&self) {
        self.store_up.set(1);
    }

    /// Creates `tenant`'s adoption series at 0 (a tenant with a shared store starts).
    pub fn tenant_started(&self, tenant: &str) {
        self.adopted.with_label_values(&[tenant]);
    }

    /// Sets whether this replica holds `tenant`'s renewal lease.
    pub fn lease_held(&self, tenant: &str, held: bool) {
        self.lease_owner
            .with_label_values(&[tenant])
            .set(i64::from(held));
    }

    /// Sets where `tenant`'s current session came from (`None`: no session yet).
    pub fn source(&self, tenant: &str, current: Option<Origin>) {
        for o in Origin::ALL {
            self.source
                .with_label_values(&[tenant, o.as_str()])
                .set(i64::from(Some(o) == current));
        }
    }

    /// Counts one session of `tenant`'s taken from the shared store.
    pub fn adopted(&self, tenant: &str) {
        self.adopted.with_label_values(&[tenant]).inc();
    }

    /// Counts one shared record this replica could not decrypt, by the key id it names (the
    /// first `MAX_KEY_ID_LABELS` distinct ids; later ones count as `other`).
    pub fn decrypt_failed(&self, key_id: &str) {
        let label = {
            let mut seen = match self.key_id_labels.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            if seen.contains(key_id) || seen.len() < MAX_KEY_ID_LABELS {
                seen.insert(key_id.to_string());
                key_id.to_string()
            } else {
                "other".to_string()
            }
        };
        self.decrypt_errors
            .with_label_values(&[label.as_str()])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(registry: &Registry) -> String {
        String::from_utf8(crate::registry::text(registry)).unwrap()
    }

    #[test]
    fn store_errors_start_at_zero_only_with_a_store() {
        let registry = Registry::new();
        let m = FleetMetrics::register(&registry);
        assert!(!render(&registry).contains("session_store_errors_total{"));
        m.store_configured();
        m.store_failed(Failure::Timeout.into());
        let text = render(&registry);
        for line in [
            r#"finhub_sidecar_session_store_errors_total{kind="timeout"} 1"#,
            r#"finhub_sidecar_session_store_errors_total{kind="malformed"} 0"#,
            r#"finhub_sidecar_session_store_up 0"#,
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn key_id_labels_are_bounded() {
        let registry = Registry::new();
        let m = FleetMetrics::register(&registry);
        for i in 0..MAX_KEY_ID_LABELS + 3 {
            m.decrypt_failed(&format!("k{i}"));
        }
        m.decrypt_failed("k0");
        let text = render(&registry);
        assert!(text.contains(r#"{key_id="other"} 3"#), "{text}");
        assert!(text.contains(r#"{key_id="k0"} 2"#), "{text}");
    }

    #[test]
    fn one_source_at_a_time() {
        let registry = Registry::new();
        let m = FleetMetrics::register(&registry);
        m.source("t1", Some(Origin::Local));
        let text = render(&registry);
        assert!(text.contains(r#"{source="local",tenant="t1"} 1"#), "{text}");
        assert!(
            text.contains(r#"{source="shared",tenant="t1"} 0"#),
            "{text}"
        );
    }
}
