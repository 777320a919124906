//! Client TLS material: the mTLS certificate chain, its key and the upstream CA bundle.
//!
//! The files are read, parsed and checked off the hot path into one immutable [`ClientTls`]
//! snapshot, which is published through [`TlsStore`] (`ArcSwap`). The request path only calls
//! [`TlsStore::current`]; it never parses PEM and never sees a half-loaded set.
//!
//! Pingora's rustls connector wants DER and `unwrap`s while converting (a PEM or truncated
//! key panics at connect time), so everything handed to it is parsed and verified here first.

mod client;
mod error;
mod files;
/// Who a certificate names (the `cert-identity` crate, shared with the test kit).
pub use ::cert_identity as identity;
pub mod metrics;
pub mod pkcs11;
pub mod reload;
pub mod rules;

pub use client::{Availability, ClientTls, TlsStore};
pub use error::TlsError;
pub use files::{KeyRef, Material, RulePolicy, TlsFiles};
pub use identity::{cert_identity, CertIdentity};
pub use rules::{check_leaf, Finding};
