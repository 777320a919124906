//! The test kit of finhub-sidecar: a FinHub emulator ([`emulator`]) and throwaway certificates
//! ([`pki`]) for the integration tests, the benches and `finhub-sidecar demo` (the sidecar's
//! `demo` feature). Not part of the product: the release image is built without it.

pub mod emulator;
#[path = "../../../src/tls/identity.rs"]
pub mod identity;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod pki;
