//! Every black-box test of the sidecar in one binary (`cargo test --test it`), one module per
//! area, so the sidecar's tests link once instead of once per file (as linkerd2-proxy does).
//! The harness they share is [`common`].
//!
//! All modules run in one process, in parallel: a test keeps its state in its own `World`
//! (temporary folder, ports chosen by the OS, child processes with their own environment) and
//! never sets this process's environment. Filter by module: `cargo test --test it sessions::`.

mod common;

mod cert_rotation;
mod dialler;
mod egress;
mod hsm;
mod operations;
mod policy;
mod proxy;
mod redis_limit;
mod sessions;
mod shared_sessions;
mod tracing;
mod trust_boundary;
