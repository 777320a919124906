//! The client key in a PKCS#11 token (an HSM): the key never leaves it; TLS handshakes sign
//! through it.
//!
//! One dedicated thread per token owns the PKCS#11 context and its session (PKCS#11 calls
//! block, and a session is not to be shared between threads). Callers — rustls' [`Signer`]
//! during a handshake, the reloader, `check` — send it a job over a bounded queue and wait at
//! most `client_cert.pkcs11_timeout` for the answer: an HSM that hangs costs a handshake that
//! much and fails it, it never blocks a runtime thread for longer nor crashes the process. Each
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

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use prometheus::IntCounterVec;
use rustls::sign::{Signer, SigningKey};
use rustls::{SignatureAlgorithm, SignatureScheme};

use crate::config::Pkcs11Key;

/// Jobs that may wait for the token thread; more are refused at once (`busy`).
const QUEUE: usize = 64;

/// A token call running longer than this many `pkcs11_timeout`s is taken as never returning:
/// `/live` fails so that Kubernetes restarts the pod (a PKCS#11 call cannot be cancelled).
pub const STUCK_AFTER_TIMEOUTS: u32 = 10;

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

    /// The `kind` label of `finhub_sidecar_pkcs11_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            TokenError::Timeout(_) => "timeout",
            TokenError::Busy => "busy",
            TokenError::PinIncorrect | TokenError::PinLocked | TokenError::PinFinalTry => "login",
            TokenError::Module(_) | TokenError::Token(_) | TokenError::Key(_) => "not_found",
            TokenError::Failed(_) => "error",
        }
    }

    /// Every `kind` label, to create the series at 0 (`skipped`: a signature failed at once,
    /// without asking the token, because its previous call is still running late).
    pub const KINDS: [&'static str; 6] =
        ["timeout", "busy", "skipped", "login", "not_found", "error"];
}

fn ck(what: &str, e: CkError) -> TokenError {
    match e {
        // The RV name (`CKR_…` as a word), not the library's prose.
        CkError::Pkcs11(rv, f) => TokenError::Failed(format!("{what}: {f:?} returned {rv:?}")),
        other => TokenError::Failed(format!("{what}: {other}")),
    }
}

/// The kind of key found in the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKeyKind {
    /// RSA.
    Rsa,
    /// Elliptic curve (the curve is the certificate's).
    Ec,
}

/// The hash of a signature scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn digest(self, msg: &[u8]) -> Vec<u8> {
        let alg = match self {
            Hash::Sha256 => &ring::digest::SHA256,
            Hash::Sha384 => &ring::digest::SHA384,
            Hash::Sha512 => &ring::digest::SHA512,
        };
        ring::digest::digest(alg, msg).as_ref().to_vec()
    }

    /// The DER DigestInfo prefix of PKCS#1 v1.5 signatures (RFC 8017 §9.2, note 1).
    fn digest_info_prefix(self) -> &'static [u8] {
        match self {
            Hash::Sha256 => &[
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x01, 0x05, 0x00, 0x04, 0x20,
            ],
            Hash::Sha384 => &[
                0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x02, 0x05, 0x00, 0x04, 0x30,
            ],
            Hash::Sha512 => &[
                0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x03, 0x05, 0x00, 0x04, 0x40,
            ],
        }
    }

    fn pss_params(self) -> PkcsPssParams {
        let (hash_alg, mgf, len) = match self {
            Hash::Sha256 => (MechanismType::SHA256, PkcsMgfType::MGF1_SHA256, 32u64),
            Hash::Sha384 => (MechanismType::SHA384, PkcsMgfType::MGF1_SHA384, 48),
            Hash::Sha512 => (MechanismType::SHA512, PkcsMgfType::MGF1_SHA512, 64),
        };
        PkcsPssParams {
            hash_alg,
            mgf,
            s_len: len.into(),
        }
    }
}

/// How the token signs a prepared input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mech {
    /// `CKM_RSA_PKCS` over DigestInfo || digest.
    RsaPkcs1,
    /// `CKM_RSA_PKCS_PSS` over the digest.
    RsaPss(Hash),
    /// `CKM_ECDSA` over the digest; answers `r || s`.
    Ecdsa,
}

/// What a TLS signature scheme needs from the token.
fn plan(scheme: SignatureScheme) -> Option<(Hash, Mech)> {
    use SignatureScheme as S;
    Some(match scheme {
        S::RSA_PSS_SHA256 => (Hash::Sha256, Mech::RsaPss(Hash::Sha256)),
        S::RSA_PSS_SHA384 => (Hash::Sha384, Mech::RsaPss(Hash::Sha384)),
        S::RSA_PSS_SHA512 => (Hash::Sha512, Mech::RsaPss(Hash::Sha512)),
        S::RSA_PKCS1_SHA256 => (Hash::Sha256, Mech::RsaPkcs1),
        S::RSA_PKCS1_SHA384 => (Hash::Sha384, Mech::RsaPkcs1),
        S::RSA_PKCS1_SHA512 => (Hash::Sha512, Mech::RsaPkcs1),
        S::ECDSA_NISTP256_SHA256 => (Hash::Sha256, Mech::Ecdsa),
        S::ECDSA_NISTP384_SHA384 => (Hash::Sha384, Mech::Ecdsa),
        _ => return None,
    })
}

/// The curve or key family a certificate's public key is, which fixes the schemes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlg {
    /// RSA (any size the token has).
    Rsa,
    /// ECDSA on P-256.
    EcP256,
    /// ECDSA on P-384.
    EcP384,
}

impl KeyAlg {
    /// Schemes in order of preference: PSS before PKCS#1 v1.5.
    fn schemes(self) -> &'static [SignatureScheme] {
        use SignatureScheme as S;
        match self {
            KeyAlg::Rsa => &[
                S::RSA_PSS_SHA256,
                S::RSA_PSS_SHA384,
                S::RSA_PSS_SHA512,
                S::RSA_PKCS1_SHA256,
                S::RSA_PKCS1_SHA384,
                S::RSA_PKCS1_SHA512,
            ],
            KeyAlg::EcP256 => &[S::ECDSA_NISTP256_SHA256],
            KeyAlg::EcP384 => &[S::ECDSA_NISTP384_SHA384],
        }
    }

    /// The scheme `check` and the reloader test the key with.
    pub fn test_scheme(self) -> SignatureScheme {
        self.schemes()[0]
    }

    fn token_kind(self) -> TokenKeyKind {
        match self {
            KeyAlg::Rsa => TokenKeyKind::Rsa,
            KeyAlg::EcP256 | KeyAlg::EcP384 => TokenKeyKind::Ec,
        }
    }

    /// The verification algorithm for this scheme over the certificate's key.
    pub fn verifier(
        self,
        scheme: SignatureScheme,
    ) -> Option<&'static dyn ring::signature::VerificationAlgorithm> {
        use ring::signature as v;
        use SignatureScheme as S;
        Some(match (self, scheme) {
            (KeyAlg::Rsa, S::RSA_PSS_SHA256) => &v::RSA_PSS_2048_8192_SHA256,
            (KeyAlg::Rsa, S::RSA_PSS_SHA384) => &v::RSA_PSS_2048_8192_SHA384,
            (KeyAlg::Rsa, S::RSA_PSS_SHA512) => &v::RSA_PSS_2048_8192_SHA512,
            (KeyAlg::Rsa, S::RSA_PKCS1_SHA256) => &v::RSA_PKCS1_2048_8192_SHA256,
            (KeyAlg::EcP256, S::ECDSA_NISTP256_SHA256) => &v::ECDSA_P256_SHA256_ASN1,
            (KeyAlg::EcP384, S::ECDSA_NISTP384_SHA384) => &v::ECDSA_P384_SHA384_ASN1,
            _ => return None,
        })
    }
}

enum Op {
    Describe(SyncSender<Result<TokenKeyKind, TokenError>>),
    Sign {
        mech: Mech,
        data: Vec<u8>,
        reply: SyncSender<Result<Vec<u8>, TokenError>>,
    },
    Probe(SyncSender<Result<(), TokenError>>),
}

struct Job {
    /// Past this nobody waits for the answer: the job is skipped.
    deadline: Instant,
    op: Op,
}

/// A private key in a PKCS#11 token, reached through its own thread.
pub struct TokenKey {
    jobs: SyncSender<Job>,
    timeout: Duration,
    errors: IntCounterVec,
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
    pub fn start(cfg: &Pkcs11Key, errors: IntCounterVec) -> Arc<TokenKey> {
        let (jobs, rx) = mpsc::sync_channel(QUEUE);
        let in_call = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let worker = Worker {
            cfg: cfg.clone(),
            ctx: None,
            open: None,
            refused_pin: None,
            hasher: RandomState::new(),
            in_call: in_call.clone(),
            epoch,
        };
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
                self.errors.with_label_values(&["skipped"]).inc();
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
                self.errors.with_label_values(&[e.kind()]).inc();
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

/// PKCS#11's `r || s` (each half the length) as the DER `ECDSA-Sig-Value` TLS carries.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) || raw.len() > 132 {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let int = |v: &[u8]| {
        let v = match v.iter().position(|&b| b != 0) {
            Some(i) => &v[i..],
            None => &[0u8][..],
        };
        let mut out = vec![0x02];
        let pad = v[0] & 0x80 != 0;
        out.push((v.len() + usize::from(pad)) as u8);
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
        out
    };
    let body = [int(r), int(s)].concat();
    let mut der = vec![0x30];
    if body.len() >= 0x80 {
        der.push(0x81);
    }
    der.push(body.len() as u8);
    der.extend_from_slice(&body);
    Some(der)
}

/// The token's thread: owns the context and the session.
struct Worker {
    cfg: Pkcs11Key,
    ctx: Option<Pkcs11>,
    open: Option<Open>,
    /// Keyed hash of a PIN the token refused: not sent again.
    refused_pin: Option<u64>,
    hasher: RandomState,
    /// See [`TokenKey::in_call_for`].
    in_call: Arc<AtomicU64>,
    epoch: Instant,
}

struct Open {
    session: Session,
    key: ObjectHandle,
    kind: TokenKeyKind,
}

impl Worker {
    fn run(mut self, jobs: Receiver<Job>) {
        for job in jobs {
            if Instant::now() >= job.deadline {
                continue;
            }
            let since = self.epoch.elapsed().as_millis() as u64 + 1;
            self.in_call.store(since, Ordering::Release);
            self.serve(job.op);
            self.in_call.store(0, Ordering::Release);
        }
    }

    fn serve(&mut self, op: Op) {
        match op {
            Op::Describe(reply) => {
                let r = self.ensure().map(|o| o.kind);
                let _ = reply.send(r);
            }
            Op::Probe(reply) => {
                let r = self.ensure().and_then(|o| {
                    o.session
                        .get_session_info()
                        .map(|_| ())
                        .map_err(|e| ck("C_GetSessionInfo", e))
                });
                self.forget_on_error(&r);
                let _ = reply.send(r);
            }
            Op::Sign { mech, data, reply } => {
                let r = self.ensure().and_then(|o| sign(o, mech, &data));
                self.forget_on_error(&r);
                let _ = reply.send(r);
            }
        }
    }

    /// After a failed call the session is reopened next time (token removed, session closed,
    /// logged out by the token, …).
    fn forget_on_error<T>(&mut self, r: &Result<T, TokenError>) {
        if matches!(r, Err(TokenError::Failed(_))) {
            self.open = None;
        }
    }

    fn ensure(&mut self) -> Result<&Open, TokenError> {
        if self.open.is_none() {
            self.open = Some(self.open_session()?);
        }
        // Just set if it was empty.
        self.open
            .as_ref()
            .ok_or_else(|| TokenError::Failed("no session".into()))
    }

    fn context(&mut self) -> Result<&Pkcs11, TokenError> {
        if self.ctx.is_none() {
            let module = &self.cfg.module;
            let ctx = Pkcs11::new(module)
                .map_err(|e| TokenError::Module(format!("{}: {e}", module.display())))?;
            match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
                Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
                Err(e) => {
                    return Err(TokenError::Module(format!(
                        "{}: C_Initialize: {}",
                        module.display(),
                        ck("", e)
                    )))
                }
            }
            self.ctx = Some(ctx);
        }
        self.ctx
            .as_ref()
            .ok_or_else(|| TokenError::Failed("no context".into()))
    }

    fn open_session(&mut self) -> Result<Open, TokenError> {
        let uri = self.cfg.uri.clone();
        let pin = self.cfg.pin.current();
        let pin_key = self.hasher.hash_one(pin.expose());
        if self.refused_pin == Some(pin_key) {
            return Err(TokenError::PinIncorrect);
        }
        let ctx = self.context()?;
        let mut matching = Vec::new();
        for slot in ctx
            .get_slots_with_token()
            .map_err(|e| ck("C_GetSlotList", e))?
        {
            let info = ctx
                .get_token_info(slot)
                .map_err(|e| ck("C_GetTokenInfo", e))?;
            let label_ok = uri
                .token
                .as_deref()
                .is_none_or(|t| info.label().trim() == t);
            let serial_ok = uri
                .serial
                .as_deref()
                .is_none_or(|s| info.serial_number().trim() == s);
            if label_ok && serial_ok {
                matching.push((slot, info));
            }
        }
        let (slot, info) = match matching.as_slice() {
            [(slot, info)] => (*slot, info),
            [] => {
                return Err(TokenError::Token(
                    "no token matches client_cert.key_uri".into(),
                ))
            }
            more => {
                return Err(TokenError::Token(format!(
                    "{} tokens match client_cert.key_uri; name one with token= or serial=",
                    more.len()
                )))
            }
        };
        // Tokens lock the user after a few wrong PINs: never make the attempt that could.
        if info.user_pin_locked() {
            return Err(TokenError::PinLocked);
        }
        if info.user_pin_final_try() {
            return Err(TokenError::PinFinalTry);
        }
        let session = ctx
            .open_ro_session(slot)
            .map_err(|e| ck("C_OpenSession", e))?;
        let auth = AuthPin::new(pin.expose().to_string().into());
        match session.login(UserType::User, Some(&auth)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(RvError::PinIncorrect, _)) => {
                self.refused_pin = Some(pin_key);
                return Err(TokenError::PinIncorrect);
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => return Err(TokenError::PinLocked),
            Err(e) => return Err(ck("C_Login", e)),
        }
        self.refused_pin = None;
        let mut template = vec![Attribute::Class(ObjectClass::PRIVATE_KEY)];
        if let Some(label) = &uri.object {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &uri.id {
            template.push(Attribute::Id(id.clone()));
        }
        let keys = session
            .find_objects(&template)
            .map_err(|e| ck("C_FindObjects", e))?;
        let key = match keys.as_slice() {
            [one] => *one,
            [] => {
                return Err(TokenError::Key(
                    "no private key in the token matches client_cert.key_uri".into(),
                ))
            }
            more => {
                return Err(TokenError::Key(format!(
                    "{} private keys match client_cert.key_uri; add object= or id=",
                    more.len()
                )))
            }
        };
        let attrs = session
            .get_attributes(key, &[AttributeType::KeyType, AttributeType::Sign])
            .map_err(|e| ck("C_GetAttributeValue", e))?;
        let mut kind = None;
        for a in attrs {
            match a {
                Attribute::KeyType(t) if t == KeyType::RSA => kind = Some(TokenKeyKind::Rsa),
                Attribute::KeyType(t) if t == KeyType::EC => kind = Some(TokenKeyKind::Ec),
                Attribute::KeyType(t) => {
                    return Err(TokenError::Key(format!(
                        "the key is of type {t}; only RSA and EC keys sign TLS handshakes"
                    )))
                }
                Attribute::Sign(false) => {
                    return Err(TokenError::Key(
                        "the key may not sign (CKA_SIGN false)".into(),
                    ))
                }
                _ => {}
            }
        }
        let kind = kind.ok_or_else(|| TokenError::Key("the key has no CKA_KEY_TYPE".into()))?;
        Ok(Open { session, key, kind })
    }
}

fn sign(o: &Open, mech: Mech, data: &[u8]) -> Result<Vec<u8>, TokenError> {
    let pss;
    let mechanism = match mech {
        Mech::RsaPkcs1 => Mechanism::RsaPkcs,
        Mech::RsaPss(h) => {
            pss = h.pss_params();
            Mechanism::RsaPkcsPss(pss)
        }
        Mech::Ecdsa => Mechanism::Ecdsa,
    };
    o.session
        .sign(&mechanism, o.key, data)
        .map_err(|e| ck("C_Sign", e))
}

/// The kind of the certificate's public key, which must be the token key's.
pub fn cert_key_alg(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Option<KeyAlg> {
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    };
    let alg = &spki.algorithm;
    if alg.algorithm == OID_PKCS1_RSAENCRYPTION {
        return Some(KeyAlg::Rsa);
    }
    if alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = alg.parameters.as_ref()?.as_oid().ok()?;
        if curve == OID_EC_P256 {
            return Some(KeyAlg::EcP256);
        }
        if curve == OID_NIST_EC_P384 {
            return Some(KeyAlg::EcP384);
        }
    }
    None
}

/// Whether the token key of `kind` can be the certificate's `alg`.
pub fn kinds_agree(kind: TokenKeyKind, alg: KeyAlg) -> bool {
    alg.token_kind() == kind
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{
        EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED_SIGNING,
    };

    #[test]
    fn raw_ecdsa_signatures_become_der_that_verifies() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let public = ring::signature::UnparsedPublicKey::new(
            &ECDSA_P256_SHA256_ASN1,
            key.public_key().as_ref().to_vec(),
        );
        // Many signatures: r and s with and without the high bit, now and then a leading zero.
        for i in 0..200u32 {
            let msg = i.to_be_bytes();
            let raw = key.sign(&rng, &msg).unwrap();
            assert_eq!(raw.as_ref().len(), 64);
            let der = ecdsa_raw_to_der(raw.as_ref()).unwrap();
            public.verify(&msg, &der).unwrap();
        }
        assert_eq!(
            ecdsa_raw_to_der(&[0x80, 0x01]).unwrap(),
            [0x30, 0x07, 0x02, 0x02, 0x00, 0x80, 0x02, 0x01, 0x01]
        );
        assert_eq!(
            ecdsa_raw_to_der(&[0, 0]).unwrap(),
            [0x30, 0x06, 0x02, 0x01, 0, 0x02, 0x01, 0]
        );
        assert!(ecdsa_raw_to_der(&[1, 2, 3]).is_none());
        assert!(ecdsa_raw_to_der(&[]).is_none());
    }

    #[test]
    fn schemes_prefer_pss_and_follow_the_curve() {
        assert_eq!(KeyAlg::Rsa.test_scheme(), SignatureScheme::RSA_PSS_SHA256);
        assert_eq!(
            KeyAlg::EcP384.test_scheme(),
            SignatureScheme::ECDSA_NISTP384_SHA384
        );
        for alg in [KeyAlg::Rsa, KeyAlg::EcP256, KeyAlg::EcP384] {
            for s in alg.schemes() {
                assert!(plan(*s).is_some(), "{s:?}");
            }
        }
        assert_eq!(plan(SignatureScheme::ED25519), None);
    }

    #[test]
    fn a_missing_module_is_a_clear_error_naming_its_key() {
        let cfg = Pkcs11Key {
            uri_text: "pkcs11:object=x".into(),
            uri: crate::config::Pkcs11Uri::parse("pkcs11:object=x").unwrap(),
            module: "/nonexistent/libnothing.so".into(),
            pin: crate::secret::SecretSource::fixed(crate::secret::Secret::new("1234")),
            timeout: Duration::from_secs(2),
        };
        let errors = IntCounterVec::new(prometheus::Opts::new("e", "e"), &["kind"]).unwrap();
        let t = TokenKey::start(&cfg, errors.clone());
        let e = t.describe().unwrap_err();
        assert_eq!(e.config_key(), Some("client_cert.pkcs11_module"), "{e}");
        assert!(e.to_string().contains("libnothing.so"), "{e}");
        assert_eq!(t.health(), Some(e));
        assert_eq!(errors.with_label_values(&["not_found"]).get(), 1);
    }
}
