//! The app listener: the sidecar's own accept loop in front of Pingora's HTTP proxy.
//!
//! Pingora's listening service reads whatever a peer sends before any hook runs: a peer outside
//! `policy.allowed_clients` could park 1 MiB of unterminated header per connection, a
//! slowloris could keep a connection by sending one header line per read timeout, and nothing
//! bounds the number of connections. So the sidecar accepts connections itself
//! ([`AppListener`], a Pingora service with its own runtime) and hands each to Pingora's
//! [`pingora::proxy::HttpProxy`] through its public `process_new_http`, one request at a time:
//!
//! 1. **at accept**: a peer outside the allowlist is closed before a byte is read; when
//!    `listener.max_connections` connections are open, a new one closes the connection that
//!    has been idle between requests the longest (keep-alive, as nginx reuses idle keep-alive
//!    connections when it runs out) and takes its slot; with none idle it gets 503
//!    `too_many_connections` and is closed ([`IdleConnections`]);
//! 2. **while a header is read** ([`GuardedStream`]): the header block must arrive whole within
//!    `listener.header_timeout` (from accept for the first request, from its first byte for the
//!    next ones; 408 `request_header_timeout` and close) and is capped at
//!    `policy.max_header_bytes` while it is read (431 `request_headers_too_large` and close),
//!    so a connection never buffers more than that;
//! 3. then Pingora parses the request and the proxy's hooks take over.
//!
//! Every refusal here is counted in `finhub_sidecar_listener_refusals_total{reason}`.

mod accept;
mod guard;
mod idle;
pub mod metrics;
mod stream;

pub use accept::{bind, AppListener, Limits};
pub(crate) use guard::LineState;
pub use idle::IdleConnections;
pub use stream::GuardedStream;
