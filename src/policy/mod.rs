//! What the sidecar decides for each request: who may use it, where it may go, which headers
//! FinHub gets. Pure functions over parsed values, each tested on its own; `proxy/` calls them
//! (and the auth client the compliance headers, `compliance.rs`). Header names are `crate::names`.

pub mod allow;
pub mod compliance;
pub mod headers;
pub mod ratelimit;
pub mod redis_limit;
pub mod strip;

pub use crate::request_path as path;
