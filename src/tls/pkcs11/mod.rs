//! The client key in a PKCS#11 token (an HSM): the key never leaves it; TLS handshakes sign
//! through it.
//!
//! One dedicated thread per token owns the PKCS#11 context and its session (PKCS#11 calls
//! block, and a session is not to be shared between threads). Callers — rustls'
//! [`rustls::sign::Signer`] during a handshake, the reloader, `check` — send it a job over a
//! bounded queue and wait at most `client_cert.pkcs11_timeout` for the answer: an HSM that
//! hangs costs a handshake that much and fails it, it never blocks a runtime thread for longer
//! nor crashes the process. Each
//! failure is counted (`finhub_sidecar_pkcs11_errors_total{kind}`) and kept as the token's
//! health, which `/ready` reports until a call succeeds again (the reloader probes the token
//! every `reload_interval`). While the last call timed out (or found the queue full),
//! signatures fail at once instead of waiting again: one hung token costs the handshakes of one
//! timeout window, not a runtime thread per handshake.
//!
//! The session is opened on first use and again after any failure; the PIN is read then (a
//! rotated `pin_file` is picked up). A PIN the token refused is not tried again until it
//! changes: tokens lock a user after a few wrong PINs.
//!
//! Schemes: RSA signs RSA-PSS (preferred; the only RSA scheme of TLS 1.3) or PKCS#1 v1.5 with
//! SHA-256/384/512, ECDSA P-256 with SHA-256 and P-384 with SHA-384. The digest is computed
//! here and the token signs it (`CKM_RSA_PKCS_PSS`, `CKM_RSA_PKCS` over a DigestInfo,
//! `CKM_ECDSA`), the mechanisms every token offers; PKCS#11's raw `r || s` ECDSA signature is
//! DER-encoded for TLS.

mod error;
mod key;
mod scheme;
mod session;

pub use error::TokenError;
pub use key::{TokenKey, STUCK_AFTER_TIMEOUTS};
pub use scheme::{cert_key_alg, ecdsa_raw_to_der, kinds_agree, KeyAlg, TokenKeyKind};
