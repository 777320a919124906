//! Every refusal the sidecar answers itself, and the one place it becomes an HTTP response.
//!
//! Each [`ProxyError`] has a status, a stable machine-readable `error` code and a message for
//! people. The body is always `{"error": "<code>", "message": "..."}` with
//! `Content-Type: application/json`. Messages never contain a secret; upstream TLS details are
//! reduced to the reason (unknown CA, wrong name, certificate refused).

mod classify;
mod refusal;
mod response;

pub use classify::classify_tls;
pub use refusal::{Meta, Outcome, ProxyError, TlsFailure};
pub use response::{raw_response, respond, respond_keyed, response};
