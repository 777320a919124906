//! The handle the rest of the sidecar holds: sends jobs to the token thread over a bounded
//! queue, waits at most `pkcs11_timeout`, keeps the last failure as the token's health and
//! counts failures; and rustls' signing key over it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

use super::error::{TokenError, QUEUE};
use super::scheme::{ecdsa_raw_to_der, plan, KeyAlg, Mech, TokenKeyKind};
use super::session::{Job, Op, Worker};
use crate::config::Pkcs11Key;
use crate::tls::metrics::{TokenErrors, TokenFailure};

/// A token call running longer than this many `pkcs11_timeout`s is taken as never returning:
/// `/live` fails so that Kubernetes restarts the pod (a PKCS#11 call cannot be cancelled).
pub const STUCK_AFTER_TIMEOUTS: u32 = 10;

/// A private key in a PKCS#11 token, reached through its own thread.
pub struct TokenKey {
    jobs: SyncSender<Job>,
    timeout: Duration,
    errors: TokenErrors,
    /// The last call's failure, until a call succeeds.
    health: Mutex<Option<TokenError>>,
    /// The key URI as configured, for messages.
    uri: String,
    /// When the token thread entered the call it is in, as milliseconds since `epoch` plus
    /// one; 0 while it is idle.
    in_call: Arc<AtomicU64>,
    epoch: Instant,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

impl TokenKey {
    /// Starts the token's thread for `cfg` (it opens the module and session on first use),
    /// counting failures in `errors`.
    pub fn start(cfg: &Pkcs11Key, errors: TokenErrors) -> Arc<TokenKey> {
        let (jobs, rx) = mpsc::sync_channel(QUEUE);
        let in_call = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let worker = Worker::new(cfg, in_call.clone(), epoch);
        // If the thread cannot be spawned, every call fails as "token thread stopped".
        let _ = std::thread::Builder::new()
            .name("pkcs11".into())
            .spawn(move || worker.run(rx));
        Arc::new(TokenKey {
            jobs,
            timeout: cfg.timeout,
            errors,
            health: Mutex::new(None),
            uri: cfg.uri_text.clone(),
            in_call,
            epoch,
        })
    }

    /// How long the token thread has been inside its current call, if it is in one.
    pub fn in_call_for(&self) -> Option<Duration> {
        match self.in_call.load(Ordering::Acquire) {
            0 => None,
            since => {
                let entered = self.epoch + Duration::from_millis(since - 1);
                Some(Instant::now().saturating_duration_since(entered))
            }
        }
    }

    /// `Some(how long)` when one call has been running for more than
    /// [`STUCK_AFTER_TIMEOUTS`] × `pkcs11_timeout`: the token thread will not serve again
    /// without a restart.
    pub fn stuck(&self) -> Option<Duration> {
        self.in_call_for()
            .filter(|d| *d > self.timeout * STUCK_AFTER_TIMEOUTS)
    }

    /// `client_cert.key_uri` as configured (no secret: a PIN in it is refused).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// What kind of key the URI selects (opening the token if needed).
    pub fn describe(&self) -> Result<TokenKeyKind, TokenError> {
        self.call(Op::Describe)
    }

    /// Checks the session is alive (reopening it after a failure); updates the health.
    pub fn probe(&self) -> Result<(), TokenError> {
        self.call(Op::Probe)
    }

    /// Why the token is not usable now, if its last call failed.
    pub fn health(&self) -> Option<TokenError> {
        match self.health.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// A rustls signing key for this token key, whose certificate's key is `alg`.
    pub fn signing_key(self: &Arc<Self>, alg: KeyAlg) -> Arc<dyn SigningKey> {
        Arc::new(TokenSigningKey {
            token: self.clone(),
            alg,
        })
    }

    /// Signs `message` with `scheme` (digest here, signature in the token; ECDSA as DER).
    pub fn sign(&self, scheme: SignatureScheme, message: &[u8]) -> Result<Vec<u8>, TokenError> {
        let (hash, mech) = plan(scheme)
            .ok_or_else(|| TokenError::Key(format!("signature scheme {scheme:?} not offered")))?;
        let digest = hash.digest(message);
        let data = match mech {
            Mech::RsaPkcs1 => [hash.digest_info_prefix(), &digest].concat(),
            Mech::RsaPss(_) | Mech::Ecdsa => digest,
        };
        // While the call that timed out is still running, handshakes do not queue behind it
        // (each would wait the whole timeout): they fail at once, counted as `skipped`. Once
        // the token thread is idle again the next handshake asks the token.
        if let Some(e @ (TokenError::Timeout(_) | TokenError::Busy)) = self.health() {
            if self.in_call_for().is_some() {
                self.errors.count(TokenFailure::Skipped);
                return Err(e);
            }
        }
        let sig = self.call(|reply| Op::Sign { mech, data, reply })?;
        match mech {
            Mech::Ecdsa => ecdsa_raw_to_der(&sig).ok_or_else(|| {
                TokenError::Failed("the token's ECDSA signature is malformed".into())
            }),
            _ => Ok(sig),
        }
    }

    /// Sends one job and waits for its answer, at most the timeout; records the outcome.
    fn call<T>(
        &self,
        op: impl FnOnce(SyncSender<Result<T, TokenError>>) -> Op,
    ) -> Result<T, TokenError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let deadline = Instant::now() + self.timeout;
        let job = Job {
            deadline,
            op: op(reply),
        };
        let result = match self.jobs.try_send(job) {
            Err(TrySendError::Full(_)) => Err(TokenError::Busy),
            Err(TrySendError::Disconnected(_)) => {
                Err(TokenError::Failed("the token thread stopped".into()))
            }
            Ok(()) => match blocking(|| answer.recv_timeout(self.timeout)) {
                Ok(r) => r,
                Err(RecvTimeoutError::Timeout) => Err(TokenError::Timeout(self.timeout)),
                // The token thread drops a job it reaches after its deadline: a timeout.
                Err(RecvTimeoutError::Disconnected) if Instant::now() >= deadline => {
                    Err(TokenError::Timeout(self.timeout))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    Err(TokenError::Failed("the token thread stopped".into()))
                }
            },
        };
        let mut health = match self.health.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match &result {
            Ok(_) => *health = None,
            Err(e) => {
                self.errors.count(e.kind());
                if health.as_ref() != Some(e) {
                    tracing::warn!(uri = %self.uri, error = %e, "PKCS#11 token call failed");
                }
                *health = Some(e.clone());
            }
        }
        result
    }
}

/// Runs `wait` (a bounded wait for the token thread) without holding up the async runtime
/// when there is one that allows it: rustls signs synchronously inside a handshake, on a
/// runtime thread. On a multi-thread runtime the thread's other tasks move to another thread
/// while it waits (`block_in_place`); on a current-thread runtime (`listener.threads = 1`) that
/// is not possible and the thread waits (at most `pkcs11_timeout`, once per hang: later
/// handshakes fail at once while the late call runs, see [`TokenKey::sign`]).
fn blocking<T>(wait: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

/// rustls' view of the token key.
#[derive(Debug)]
struct TokenSigningKey {
    token: Arc<TokenKey>,
    alg: KeyAlg,
}

impl SigningKey for TokenSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        let scheme = self
            .alg
            .schemes()
            .iter()
            .find(|s| offered.contains(s))
            .copied()?;
        Some(Box::new(TokenSigner {
            token: self.token.clone(),
            scheme,
        }))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.alg {
            KeyAlg::Rsa => SignatureAlgorithm::RSA,
            KeyAlg::EcP256 | KeyAlg::EcP384 => SignatureAlgorithm::ECDSA,
        }
    }
}

#[derive(Debug)]
struct TokenSigner {
    token: Arc<TokenKey>,
    scheme: SignatureScheme,
}

impl Signer for TokenSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.token
            .sign(self.scheme, message)
            .map_err(|e| rustls::Error::General(format!("PKCS#11 signature failed: {e}")))
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_module_is_a_clear_error_naming_its_key() {
        let cfg = Pkcs11Key {
            uri_text: "pkcs11:object=x".into(),
            uri: crate::config::Pkcs11Uri::parse("pkcs11:object=x").unwrap(),
            module: "/nonexistent/libnothing.so".into(),
            pin: crate::secret::SecretSource::fixed(crate::secret::Secret::new("1234")),
            timeout: Duration::from_secs(2),
        };
        let errors =
            crate::tls::metrics::TlsMetrics::register(&prometheus::Registry::new()).token();
        let t = TokenKey::start(&cfg, errors.clone());
        let e = t.describe().unwrap_err();
        assert_eq!(e.config_key(), Some("client_cert.pkcs11_module"), "{e}");
        assert!(e.to_string().contains("libnothing.so"), "{e}");
        assert_eq!(t.health(), Some(e));
        assert_eq!(errors.total(TokenFailure::NotFound), 1);
    }
}
