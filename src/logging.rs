//! Log setup: `tracing` with JSON lines by default or a human format for terminals.
//! `RUST_LOG` overrides the configured level. Pingora's `log` records are bridged in.
//!
//! Every level is as free of secrets as `info`. The sidecar's own events never carry a token,
//! password, customer secret or body byte at any level; third-party crates that dump wire data
//! at `debug`/`trace` (Pingora writes request header buffers and body chunks, hyper/h2/rustls
//! frames and handshake messages, reqwest/redis their traffic) are capped at `info` whatever the
//! configured level or `RUST_LOG` says ([`WIRE_TARGETS`]).

use tracing::{Level, Metadata};
use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, DEFAULT_LOG_LEVEL};

/// Crates whose `debug`/`trace` events can contain request or response bytes, headers or TLS
/// secrets; never logged below `info`.
pub const WIRE_TARGETS: &[&str] = &[
    "pingora",
    "pingora_core",
    "pingora_proxy",
    "pingora_pool",
    "pingora_http",
    "pingora_rustls",
    "pingora_runtime",
    "pingora_timeout",
    "pingora_error",
    "pingora_header_serde",
    "hyper",
    "hyper_util",
    "h2",
    "http_body_util",
    "rustls",
    "tokio_rustls",
    "reqwest",
    "redis",
    "tokio_util",
    "mio",
];

/// Modules that log a `warn` line per retry of a call, several per millisecond while a Redis
/// Cluster node is lost (the crate's cluster client): errors only, or one node loss writes
/// gigabytes of log. The pool logs the outage itself, once per state change.
pub const FLOOD_TARGETS: &[&str] = &["redis::cluster_handling", "redis::cluster_async"];

/// Whether an event may be logged: wire-data crates only at `info` and above, whatever
/// `RUST_LOG` or the configured level asks for (a module directive such as
/// `pingora_proxy::proxy_h1=trace` included); flooding modules only at `error`.
pub fn allowed(meta: &Metadata<'_>) -> bool {
    let level = *meta.level();
    if level > Level::ERROR && in_targets(FLOOD_TARGETS, meta.target()) {
        return false;
    }
    level <= Level::INFO || !in_targets(WIRE_TARGETS, meta.target())
}

fn in_targets(targets: &[&str], target: &str) -> bool {
    targets.iter().any(|t| {
        target
            .strip_prefix(t)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// Installs the global subscriber once; later calls are no-ops.
pub fn init(format: LogFormat, level: &str) {
    let env = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_LEVEL));
    let filter = env.and(filter_fn(allowed));
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Json => layer
            .json()
            .with_current_span(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => layer.with_filter(filter).boxed(),
    };
    let _ = tracing_subscriber::registry().with(layer).try_init();
    cap_log_facade();
}

/// Records of crates that use the `log` facade (Pingora, rustls, reqwest …) are bridged into
/// `tracing` and can only pass at `info` or above ([`allowed`]); telling `log` so makes every
/// `debug!`/`trace!` in them a single comparison instead of a record built, bridged and filtered
/// (≈ 9,500 instructions per proxied request: `benches/e2e/icount.py`).
fn cap_log_facade() {
    log::set_max_level(log::max_level().min(log::LevelFilter::Info));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_targets_are_capped_at_info() {
        for t in [
            "pingora_proxy",
            "pingora_proxy::proxy_h1",
            "pingora_core::protocols::http::v1::server",
            "h2::codec",
            "rustls::client::hs",
            "hyper_util::client",
        ] {
            assert!(in_targets(WIRE_TARGETS, t), "{t}");
        }
        for t in ["finhub_sidecar::proxy", "pingora_like", "hyperx", "log"] {
            assert!(!in_targets(WIRE_TARGETS, t), "{t}");
        }
    }

    #[test]
    fn cluster_retry_warnings_are_capped_at_error() {
        let t = "redis::cluster_handling::cluster_async";
        assert!(in_targets(FLOOD_TARGETS, t));
        assert!(!in_targets(FLOOD_TARGETS, "redis::aio"));
        assert!(!in_targets(FLOOD_TARGETS, "redis_pool"));
    }

    #[test]
    fn the_log_facade_stops_below_info() {
        log::set_max_level(log::LevelFilter::Trace);
        cap_log_facade();
        assert_eq!(log::max_level(), log::LevelFilter::Info);
        log::set_max_level(log::LevelFilter::Warn);
        cap_log_facade();
        assert_eq!(log::max_level(), log::LevelFilter::Warn);
    }
}
