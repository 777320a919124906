//! What the sidecar decides for each request: who may use it, where it may go, which headers
//! FinHub gets. Pure functions over parsed values, each tested on its own; `proxy/` calls them.

pub mod allow;
pub mod headers;
pub mod ratelimit;
pub mod redis_limit;
pub mod strip;

pub use crate::request_path as path;
