//! The test kit of finhub-sidecar: a FinHub emulator ([`emulator`]) and throwaway certificates
//! ([`pki`]) for the integration tests, the benches and `finhub-sidecar demo` (the sidecar's
//! `demo` feature). Not part of the product: the release image is built without it.

pub mod emulator;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod pki;

/// Who a certificate names, exactly as the sidecar reports it (the `cert-identity` crate).
pub use cert_identity as identity;
