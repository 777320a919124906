//! The token's own thread: opens the module, finds the token and the key, logs in (never
//! retrying a PIN the token refused, never making the attempt that could lock the user), and
//! serves the jobs [`super::TokenKey`] sends it.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::Instant;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;

use super::error::{ck, TokenError};
use super::scheme::{Mech, TokenKeyKind};
use crate::config::Pkcs11Key;

/// One request to the token thread, with where its answer goes.
pub(super) enum Op {
    /// What kind of key the URI selects.
    Describe(SyncSender<Result<TokenKeyKind, TokenError>>),
    /// Sign a prepared input.
    Sign {
        mech: Mech,
        data: Vec<u8>,
        reply: SyncSender<Result<Vec<u8>, TokenError>>,
    },
    /// Check the session is alive.
    Probe(SyncSender<Result<(), TokenError>>),
}

/// A job and how long its sender waits.
pub(super) struct Job {
    /// Past this nobody waits for the answer: the job is skipped.
    pub(super) deadline: Instant,
    /// What to do.
    pub(super) op: Op,
}

/// The token's thread: owns the context and the session.
pub(super) struct Worker {
    cfg: Pkcs11Key,
    ctx: Option<Pkcs11>,
    open: Option<Open>,
    /// Keyed hash of a PIN the token refused: not sent again.
    refused_pin: Option<u64>,
    hasher: RandomState,
    /// See [`super::TokenKey::in_call_for`].
    in_call: Arc<AtomicU64>,
    epoch: Instant,
}

struct Open {
    session: Session,
    key: ObjectHandle,
    kind: TokenKeyKind,
}

impl Worker {
    /// A worker for `cfg` that has opened nothing yet; it marks the calls it is in in
    /// `in_call` (milliseconds since `epoch` plus one, 0 while idle).
    pub(super) fn new(cfg: &Pkcs11Key, in_call: Arc<AtomicU64>, epoch: Instant) -> Worker {
        Worker {
            cfg: cfg.clone(),
            ctx: None,
            open: None,
            refused_pin: None,
            hasher: RandomState::new(),
            in_call,
            epoch,
        }
    }

    /// Serves `jobs` until every sender is gone, skipping those past their deadline.
    pub(super) fn run(mut self, jobs: Receiver<Job>) {
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
