//! What every component's metrics share: registering its families in the process's one
//! registry and rendering a registry as Prometheus text. A leaf (prometheus only), so any
//! component can use it without an import circle through `metrics`.

use prometheus::core::Collector;
use prometheus::{Encoder, Registry, TextEncoder};

/// Registers `collectors` in `registry`. Each component registers its families once, from its
/// `register`, into the registry `metrics::Metrics::new` made: a name registered twice is a
/// programming error caught by every test that builds the metrics, never a runtime input.
pub fn register_all(registry: &Registry, collectors: impl IntoIterator<Item = Box<dyn Collector>>) {
    for c in collectors {
        registry
            .register(c)
            .expect("each metric is registered once in a fresh registry");
    }
}

/// `registry` in the Prometheus text format.
pub fn text(registry: &Registry) -> Vec<u8> {
    let mut buf = Vec::new();
    // Encoding into a Vec cannot fail for well-formed metric families.
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
    buf
}
