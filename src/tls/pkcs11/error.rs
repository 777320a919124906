//! Why the token could not do what was asked, and which failure kind each is counted as.

use std::time::Duration;

use cryptoki::error::Error as CkError;

use crate::tls::metrics::TokenFailure;

/// Jobs that may wait for the token thread; more are refused at once (`busy`).
pub(super) const QUEUE: usize = 64;

/// Why the token could not do what was asked. Never carries the PIN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The PKCS#11 module could not be loaded or initialised.
    #[error("cannot load the PKCS#11 module: {0}")]
    Module(String),
    /// No token (or more than one) matches `token=`/`serial=` of the key URI.
    #[error("{0}")]
    Token(String),
    /// The token refused the PIN; it is not tried again until the PIN changes.
    #[error("the token refused the PIN (CKR_PIN_INCORRECT); it is not tried again until the PIN changes")]
    PinIncorrect,
    /// The token locked the user PIN.
    #[error("the token's user PIN is locked (CKR_PIN_LOCKED)")]
    PinLocked,
    /// The token allows one more PIN attempt only: none is made, so that a wrong PIN cannot
    /// lock it.
    #[error("the token allows one last user PIN attempt (CKF_USER_PIN_FINAL_TRY); not trying, so that a wrong PIN cannot lock the user: check the PIN, then clear the counter with one good login (e.g. pkcs11-tool --login)")]
    PinFinalTry,
    /// No private key (or more than one) matches `object=`/`id=` of the key URI, or it is of a
    /// kind this cannot sign with.
    #[error("{0}")]
    Key(String),
    /// The token did not answer in time.
    #[error("the token did not answer within {0:?}")]
    Timeout(Duration),
    /// Too many calls are waiting for the token already.
    #[error("the token is busy ({QUEUE} calls waiting)")]
    Busy,
    /// A PKCS#11 call failed.
    #[error("PKCS#11 {0}")]
    Failed(String),
}

impl TokenError {
    /// The configuration key an operator fixes for this error, if one is at fault.
    pub fn config_key(&self) -> Option<&'static str> {
        match self {
            TokenError::Module(_) => Some("client_cert.pkcs11_module"),
            TokenError::Token(_) | TokenError::Key(_) => Some("client_cert.key_uri"),
            TokenError::PinIncorrect | TokenError::PinLocked | TokenError::PinFinalTry => {
                Some("client_cert.pin_file")
            }
            _ => None,
        }
    }

    /// Whether the token refused to log the user in (wrong, locked or last-try PIN): another
    /// attempt with the same PIN must not be made.
    pub fn is_pin_refusal(&self) -> bool {
        matches!(
            self,
            TokenError::PinIncorrect | TokenError::PinLocked | TokenError::PinFinalTry
        )
    }

    /// The `kind` label it is counted under in `finhub_sidecar_pkcs11_errors_total`.
    pub fn kind(&self) -> TokenFailure {
        match self {
            TokenError::Timeout(_) => TokenFailure::Timeout,
            TokenError::Busy => TokenFailure::Busy,
            e if e.is_pin_refusal() => TokenFailure::Login,
            TokenError::Module(_) | TokenError::Token(_) | TokenError::Key(_) => {
                TokenFailure::NotFound
            }
            _ => TokenFailure::Error,
        }
    }
}

/// A cryptoki error as a token failure naming the call (`what`).
pub(super) fn ck(what: &str, e: CkError) -> TokenError {
    match e {
        // The RV name (`CKR_…` as a word), not the library's prose.
        CkError::Pkcs11(rv, f) => TokenError::Failed(format!("{what}: {f:?} returned {rv:?}")),
        other => TokenError::Failed(format!("{what}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_refusals_are_counted_as_login_and_nothing_else_is() {
        for e in [
            TokenError::PinIncorrect,
            TokenError::PinLocked,
            TokenError::PinFinalTry,
        ] {
            assert!(e.is_pin_refusal(), "{e}");
            assert_eq!(e.kind(), TokenFailure::Login);
            assert_eq!(e.config_key(), Some("client_cert.pin_file"));
        }
        for (e, kind) in [
            (
                TokenError::Timeout(Duration::from_secs(1)),
                TokenFailure::Timeout,
            ),
            (TokenError::Busy, TokenFailure::Busy),
            (TokenError::Module("m".into()), TokenFailure::NotFound),
            (TokenError::Token("t".into()), TokenFailure::NotFound),
            (TokenError::Key("k".into()), TokenFailure::NotFound),
            (TokenError::Failed("f".into()), TokenFailure::Error),
        ] {
            assert!(!e.is_pin_refusal(), "{e}");
            assert_eq!(e.kind(), kind, "{e}");
        }
    }
}
