//! finhub-sidecar: a Pingora sidecar that lets legacy apps talk plain HTTP to FinHub while it
//! handles mTLS, sessions and compliance headers.
//!
//! `main.rs` only wires these modules together; every decision lives in a module with its own tests.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod check;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod egress;
pub mod error;
pub mod files;
pub mod lifecycle;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod policy;
pub mod proxy;
pub mod redis_pool;
pub mod registry;
pub mod request_path;
pub mod sealing;
pub mod secret;
pub mod server;
pub mod state;
pub mod supervise;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod trim;
pub mod upstream;
