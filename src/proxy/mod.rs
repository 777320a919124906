//! The data path: Pingora's `ProxyHttp` hooks (`hooks.rs`), each a one-line contract
//! delegating to a small function: the app's side — admission, the body held whole, the
//! refusal, the answer's headers — (`inbound.rs`, `admission.rs`, `body.rs`), toward FinHub —
//! peer, request rewrite, FinHub's answer — (`outbound.rs`), what is retried and the JSON error
//! (`failure.rs`, `retry.rs`), the metrics and audit line of a finished request (`record.rs`),
//! the per-request context (`ctx.rs`), the tenants as the data path sees them (`tenant.rs`).
//! The hook order is in `hooks.rs`.

pub mod admission;
pub mod body;
mod ctx;
mod failure;
mod hooks;
mod inbound;
pub mod metrics;
mod outbound;
mod record;
pub mod retry;
pub mod tenant;

pub use ctx::RequestCtx;
pub use hooks::FinHubProxy;
