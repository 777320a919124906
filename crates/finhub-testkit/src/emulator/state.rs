//! Emulator state shared by every connection: knobs set through [`Controls`], counters, the
//! recorded API requests and the server-side token table.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{ClaimStyle, EmulatorConfig, EmulatorUser, ResponseShape};
use crate::pki::CertIdentity;

/// Expired tokens are forgotten this long after their expiry (bounded memory under load).
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// Longest lifetime issued (100 years): keeps `exp` arithmetic far from overflow.
const MAX_LIFETIME_SECS: u64 = 100 * 365 * 86_400;

/// Locks a mutex; a panic elsewhere while holding it does not make the state unusable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Counters since start (a snapshot from [`Controls::stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Successful logins (both login endpoints).
    pub logins: u64,
    /// Logins answered 401 (bad credentials or `fail_logins`).
    pub failed_logins: u64,
    /// Refreshes that issued a new token.
    pub refreshes: u64,
    /// Refreshes answered with the same token because more than 10 % of its lifetime remained.
    pub refreshes_not_needed: u64,
    /// Echo API calls answered 200.
    pub api_ok: u64,
    /// Echo API calls answered with an error (any status but 200, injected 429s included).
    pub api_rejected: u64,
    /// Requests (echo API or refresh) that presented a known but expired token.
    pub expired_token_seen: u64,
    /// Logouts that ended a session (`cleared: true`).
    pub logouts: u64,
    /// Requests to any auth endpoint (login, refresh, logout), whatever the answer (injected
    /// 429s and `set_auth_down` 503s included).
    pub auth_requests: u64,
}

/// One call of the logout endpoint, as the emulator saw it.
#[derive(Clone, Debug)]
pub struct LogoutRecord {
    /// Tenant of the presented token, if the token was known.
    pub tenant: Option<String>,
    /// Whether a session was ended by it.
    pub cleared: bool,
    /// When it was answered.
    pub at: Instant,
}

/// One request that reached the echo API, as the emulator saw it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: String,
    /// Path and query as received.
    pub path_and_query: String,
    /// Every header in arrival order, names lowercase (plus `host` from the HTTP/2 authority).
    pub headers: Vec<(String, String)>,
    /// Bytes of request body received.
    pub body_len: u64,
    /// The TLS client certificate of the connection, if any.
    pub client_cert: Option<CertIdentity>,
    /// The server name (SNI) the client sent in its TLS handshake, if any.
    pub sni: Option<String>,
    /// Status the emulator answered.
    pub status: u16,
    /// The tenant of the presented token when the token was known, else the `X-Tenant-ID` header.
    pub tenant: Option<String>,
    /// When the emulator answered it (after any injected delay).
    pub answered_at: Instant,
}

impl RecordedRequest {
    /// The first value of header `name` (any case), as received.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// JWT claims of an emulator session token.
#[derive(Serialize, Deserialize)]
pub(crate) struct Claims {
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(rename = "tenantId")]
    pub tenant_id: String,
    #[serde(rename = "customerId")]
    pub customer_id: String,
    #[serde(rename = "userId")]
    pub user_id: String,
    pub jti: String,
    #[serde(rename = "sessionId")]
    pub session_id: String,
    #[serde(
        rename = "internalTokenKey",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub internal_token_key: Option<String>,
}

/// Server-side record of an issued token.
struct TokenRecord {
    token: String,
    username: String,
    tenant: String,
    customer_id: String,
    user_id: String,
    session_id: String,
    internal_key: Option<String>,
    expires_at: SystemTime,
    lifetime: Duration,
    revoked: bool,
}

/// What a handler learns about a presented token (no secret besides the token itself).
#[derive(Clone)]
pub(crate) struct TokenView {
    pub token: String,
    pub jti: String,
    pub username: String,
    pub tenant: String,
    pub customer_id: String,
    pub user_id: String,
    pub session_id: String,
    pub internal_key: Option<String>,
    pub expires_at: SystemTime,
    pub lifetime: Duration,
}

/// Why a presented token is not usable.
pub(crate) enum TokenProblem {
    /// Not a token we issued (bad signature, garbage, forgotten).
    Unknown,
    /// Logged out or revoked by `revoke_all_sessions`.
    Revoked(Box<TokenView>),
    /// Past its precise expiry.
    Expired(Box<TokenView>),
}

/// A freshly issued token.
pub(crate) struct Issued {
    pub view: TokenView,
    pub refresh_token: String,
}

pub(crate) struct Shared {
    pub users: Vec<EmulatorUser>,
    pub strict_headers: bool,
    pub include_internal_token_key: bool,
    max_recorded: usize,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,

    pub fail_logins: AtomicBool,
    pub auth_down: AtomicBool,
    /// Milliseconds the emulator's clock is ahead of the real one (negative: behind).
    clock_offset_ms: AtomicI64,
    /// Milliseconds the token issuer's clock is ahead of the gateway's `Date` clock.
    token_clock_offset_ms: AtomicI64,
    /// How `iat`/`exp` are written into issued tokens.
    claim_style: Mutex<ClaimStyle>,
    /// Echo paths starting with this answer 401 to a valid session (FinHub's own reasons).
    always_401: Mutex<Option<String>>,
    inject_429: Mutex<(u32, Option<u64>)>,
    delay: Mutex<Duration>,
    shape: Mutex<ResponseShape>,
    lifetime: Mutex<Duration>,

    pub total_requests: AtomicU64,
    pub logins: AtomicU64,
    pub failed_logins: AtomicU64,
    pub refreshes: AtomicU64,
    pub refreshes_not_needed: AtomicU64,
    pub api_ok: AtomicU64,
    pub api_rejected: AtomicU64,
    pub expired_token_seen: AtomicU64,
    pub logouts: AtomicU64,
    pub auth_requests: AtomicU64,

    logout_records: Mutex<Vec<LogoutRecord>>,
    recorded: Mutex<VecDeque<RecordedRequest>>,
    tokens: Mutex<HashMap<String, TokenRecord>>,
    /// Every credential handed out (tokens, internal keys, refresh tokens), for tests that
    /// look for them where they must not be.
    handed_out: Mutex<Vec<String>>,
    /// Business API faults and the idempotency store.
    pub(crate) faults: super::faults::Faults,
}

impl Shared {
    pub(crate) fn new(cfg: &EmulatorConfig) -> Shared {
        let mut validation = Validation::new(Algorithm::HS256);
        // Expiry is checked against the precise server-side record, not the whole-second claim.
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        Shared {
            users: cfg.users.clone(),
            strict_headers: cfg.strict_headers,
            include_internal_token_key: cfg.include_internal_token_key,
            max_recorded: cfg.max_recorded,
            encoding: EncodingKey::from_secret(&cfg.jwt_secret),
            decoding: DecodingKey::from_secret(&cfg.jwt_secret),
            validation,
            fail_logins: AtomicBool::new(false),
            auth_down: AtomicBool::new(false),
            clock_offset_ms: AtomicI64::new(cfg.clock_offset_ms),
            token_clock_offset_ms: AtomicI64::new(0),
            claim_style: Mutex::new(ClaimStyle::Seconds),
            always_401: Mutex::new(None),
            inject_429: Mutex::new((0, None)),
            delay: Mutex::new(Duration::ZERO),
            shape: Mutex::new(cfg.response_shape),
            lifetime: Mutex::new(cfg.token_lifetime),
            total_requests: AtomicU64::new(0),
            logins: AtomicU64::new(0),
            failed_logins: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
            refreshes_not_needed: AtomicU64::new(0),
            api_ok: AtomicU64::new(0),
            api_rejected: AtomicU64::new(0),
            expired_token_seen: AtomicU64::new(0),
            logouts: AtomicU64::new(0),
            auth_requests: AtomicU64::new(0),
            logout_records: Mutex::new(Vec::new()),
            recorded: Mutex::new(VecDeque::new()),
            tokens: Mutex::new(HashMap::new()),
            handed_out: Mutex::new(Vec::new()),
            faults: Default::default(),
        }
    }

    /// The emulator's notion of now: the real clock shifted by the configured offset. Every
    /// time FinHub states (`iat`, `exp`, `expires_in`, `Date`, expiry checks, the 10 % rule)
    /// is on this clock.
    pub(crate) fn now(&self) -> SystemTime {
        shift(
            SystemTime::now(),
            self.clock_offset_ms.load(Ordering::SeqCst),
        )
    }

    /// The token issuer's notion of now: [`Shared::now`] shifted by the token clock offset.
    /// Every time about a token (`iat`, `exp`, `expires_in`, expiry checks, the 10 % rule) is on
    /// this clock; only the `Date` header is on the gateway's ([`Shared::now`]).
    pub(crate) fn token_now(&self) -> SystemTime {
        shift(
            self.now(),
            self.token_clock_offset_ms.load(Ordering::SeqCst),
        )
    }

    /// Whether an echo request to `path` is answered 401 whatever its session.
    pub(crate) fn answers_401(&self, path: &str) -> bool {
        lock(&self.always_401)
            .as_deref()
            .is_some_and(|p| path.starts_with(p))
    }

    pub(crate) fn record_logout(&self, tenant: Option<String>, cleared: bool) {
        if cleared {
            self.logouts.fetch_add(1, Ordering::SeqCst);
        }
        lock(&self.logout_records).push(LogoutRecord {
            tenant,
            cleared,
            at: Instant::now(),
        });
    }

    pub(crate) fn delay(&self) -> Duration {
        *lock(&self.delay)
    }

    pub(crate) fn shape(&self) -> ResponseShape {
        *lock(&self.shape)
    }

    /// Consumes one injected 429, if any is pending: `Some(retry_after)`.
    pub(crate) fn take_429(&self) -> Option<Option<u64>> {
        let mut g = lock(&self.inject_429);
        if g.0 == 0 {
            return None;
        }
        g.0 -= 1;
        Some(g.1)
    }

    pub(crate) fn record(&self, r: RecordedRequest) {
        if self.max_recorded == 0 {
            return;
        }
        let mut g = lock(&self.recorded);
        while g.len() >= self.max_recorded {
            g.pop_front();
        }
        g.push_back(r);
    }

    /// Issues a new session token for `user` with the current lifetime. Like a JWT server,
    /// `iat` is the current whole second and `exp = iat + lifetime` (whole seconds, at least
    /// one); the token is valid until `exp` exactly.
    /// Records a credential handed out; returns it.
    pub(crate) fn hand_out(&self, secret: String) -> String {
        lock(&self.handed_out).push(secret.clone());
        secret
    }

    pub(crate) fn issue(&self, user: &EmulatorUser) -> Result<Issued, jsonwebtoken::errors::Error> {
        let lifetime =
            Duration::from_secs(lock(&self.lifetime).as_secs().clamp(1, MAX_LIFETIME_SECS));
        let now = self.token_now();
        let iat = unix_secs(now);
        let expires_at = SystemTime::UNIX_EPOCH + Duration::from_secs(iat) + lifetime;
        let exp = unix_secs(expires_at);
        let (iat_claim, exp_claim) = match *lock(&self.claim_style) {
            ClaimStyle::Seconds => (iat, exp),
            ClaimStyle::Milliseconds => (iat.saturating_mul(1000), exp.saturating_mul(1000)),
            ClaimStyle::FarFutureExp => (iat, iat.saturating_add(10 * 365 * 86_400)),
            ClaimStyle::PastExp => (iat, iat.saturating_sub(lifetime.as_secs())),
        };
        let jti = uuid::Uuid::new_v4().to_string();
        let session_id = uuid::Uuid::new_v4().to_string();
        let user_id = user_id_of(user);
        let internal_key = self
            .include_internal_token_key
            .then(|| uuid::Uuid::new_v4().to_string());
        let claims = Claims {
            sub: user.username.clone(),
            iat: iat_claim,
            exp: exp_claim,
            tenant_id: user.tenant_id.clone(),
            customer_id: user.customer_id.clone(),
            user_id: user_id.clone(),
            jti: jti.clone(),
            session_id: session_id.clone(),
            internal_token_key: internal_key.clone(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        self.hand_out(token.clone());
        if let Some(k) = &internal_key {
            self.hand_out(k.clone());
        }
        let record = TokenRecord {
            token: token.clone(),
            username: user.username.clone(),
            tenant: user.tenant_id.clone(),
            customer_id: user.customer_id.clone(),
            user_id,
            session_id,
            internal_key,
            expires_at,
            lifetime,
            revoked: false,
        };
        let view = view_of(&jti, &record);
        let mut tokens = lock(&self.tokens);
        tokens.retain(|_, r| {
            r.expires_at
                .checked_add(FORGET_AFTER)
                .is_none_or(|t| t > now)
        });
        tokens.insert(jti, record);
        Ok(Issued {
            view,
            refresh_token: self.hand_out(format!("rt-{}", uuid::Uuid::new_v4())),
        })
    }

    /// Looks a presented token up: signature, then the server-side record, then state.
    pub(crate) fn check(&self, token: &str) -> Result<TokenView, TokenProblem> {
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| TokenProblem::Unknown)?
            .claims;
        let tokens = lock(&self.tokens);
        let record = tokens.get(&claims.jti).ok_or(TokenProblem::Unknown)?;
        if record.token != token {
            return Err(TokenProblem::Unknown);
        }
        let view = view_of(&claims.jti, record);
        if record.revoked {
            return Err(TokenProblem::Revoked(Box::new(view)));
        }
        if self.token_now() >= record.expires_at {
            return Err(TokenProblem::Expired(Box::new(view)));
        }
        Ok(view)
    }

    /// Marks one token revoked; false if unknown or revoked already.
    pub(crate) fn revoke(&self, jti: &str) -> bool {
        match lock(&self.tokens).get_mut(jti) {
            Some(r) if !r.revoked => {
                r.revoked = true;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn user(&self, username: &str) -> Option<&EmulatorUser> {
        self.users.iter().find(|u| u.username == username)
    }
}

/// `t` moved by `ms` milliseconds (negative: back).
fn shift(t: SystemTime, ms: i64) -> SystemTime {
    let d = Duration::from_millis(ms.unsigned_abs());
    let shifted = if ms >= 0 {
        t.checked_add(d)
    } else {
        t.checked_sub(d)
    };
    shifted.unwrap_or(t)
}

pub(crate) fn user_id_of(user: &EmulatorUser) -> String {
    format!("usr-{}", user.username)
}

fn view_of(jti: &str, r: &TokenRecord) -> TokenView {
    TokenView {
        token: r.token.clone(),
        jti: jti.to_string(),
        username: r.username.clone(),
        tenant: r.tenant.clone(),
        customer_id: r.customer_id.clone(),
        user_id: r.user_id.clone(),
        session_id: r.session_id.clone(),
        internal_key: r.internal_key.clone(),
        expires_at: r.expires_at,
        lifetime: r.lifetime,
    }
}

/// Test knobs and observations of a running emulator. Cheap to clone.
#[derive(Clone)]
pub struct Controls {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Controls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controls")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Controls {
    /// While on, both login endpoints answer 401 (bad credentials).
    pub fn fail_logins(&self, on: bool) {
        self.shared.fail_logins.store(on, Ordering::SeqCst);
    }

    /// Every token issued so far is rejected with 401 by the API and by refresh.
    pub fn revoke_all_sessions(&self) {
        for r in lock(&self.shared.tokens).values_mut() {
            r.revoked = true;
        }
    }

    /// The next `count` requests (any endpoint) are answered 429, with `Retry-After` if given.
    pub fn answer_429(&self, count: u32, retry_after_secs: Option<u64>) {
        *lock(&self.shared.inject_429) = (count, retry_after_secs);
    }

    /// Every response is delayed by `d` (zero turns it off).
    pub fn set_delay(&self, d: Duration) {
        *lock(&self.shared.delay) = d;
    }

    /// While on, login, refresh and logout answer 503.
    pub fn set_auth_down(&self, down: bool) {
        self.shared.auth_down.store(down, Ordering::SeqCst);
    }

    /// Shape of login and refresh answers from now on.
    pub fn set_response_shape(&self, s: ResponseShape) {
        *lock(&self.shared.shape) = s;
    }

    /// Lifetime of tokens issued from now on (whole seconds, at least one).
    pub fn set_token_lifetime(&self, d: Duration) {
        *lock(&self.shared.lifetime) = d;
    }

    /// Shifts the emulator's clock: `ms` milliseconds ahead of the real clock (negative:
    /// behind). It moves `iat`, `exp`, `expires_in`, the `Date` header, expiry checks and the
    /// 10 % refresh rule together, as a FinHub whose clock is off would.
    pub fn set_clock_offset_ms(&self, ms: i64) {
        self.shared.clock_offset_ms.store(ms, Ordering::SeqCst);
    }

    /// Runs the token issuer's clock `ms` milliseconds ahead of the gateway's `Date` clock
    /// (negative: behind), as when FinHub's token service and API gateway are different hosts:
    /// `iat`, `exp`, `expires_in`, expiry checks and the 10 % rule move; `Date` does not.
    pub fn set_token_clock_offset_ms(&self, ms: i64) {
        self.shared
            .token_clock_offset_ms
            .store(ms, Ordering::SeqCst);
    }

    /// How `iat`/`exp` are written into tokens issued from now on (issuer bugs); the
    /// server-side validity, `expires_in` and the 10 % rule stay the real ones.
    pub fn set_claim_style(&self, style: ClaimStyle) {
        *lock(&self.shared.claim_style) = style;
    }

    /// Echo requests whose path starts with `prefix` are answered 401 (`UNAUTHORIZED`) even
    /// with a valid session, as an endpoint that refuses for reasons of its own; `None` ends it.
    pub fn answer_401_on(&self, prefix: Option<&str>) {
        *lock(&self.shared.always_401) = prefix.map(str::to_string);
    }

    /// Every logout call so far, oldest first.
    pub fn logouts(&self) -> Vec<LogoutRecord> {
        lock(&self.shared.logout_records).clone()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        Stats {
            logins: get(&s.logins),
            failed_logins: get(&s.failed_logins),
            refreshes: get(&s.refreshes),
            refreshes_not_needed: get(&s.refreshes_not_needed),
            api_ok: get(&s.api_ok),
            api_rejected: get(&s.api_rejected),
            expired_token_seen: get(&s.expired_token_seen),
            logouts: get(&s.logouts),
            auth_requests: get(&s.auth_requests),
        }
    }

    /// Every token, `internalTokenKey` and refresh token handed out so far.
    pub fn handed_out_secrets(&self) -> Vec<String> {
        lock(&self.shared.handed_out).clone()
    }

    /// Requests that reached the echo API (rejected ones too), oldest first. Only the most
    /// recent `EmulatorConfig::max_recorded` are kept.
    pub fn api_requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.recorded).iter().cloned().collect()
    }

    /// Injects FinHub's blips into business API calls from now on (`None`: none).
    pub fn set_api_faults(&self, faults: Option<super::ApiFaults>) {
        self.shared.faults.set(faults);
    }

    /// How often each (tenant, `X-Idempotency-Key`) was executed (a replay is not an
    /// execution).
    pub fn executions(&self) -> HashMap<(String, String), u32> {
        self.shared.faults.executions()
    }

    /// Business API calls executed (keyed or not; replays and refusals excluded).
    pub fn executed_calls(&self) -> u64 {
        self.shared.faults.executed.load(Ordering::SeqCst)
    }

    /// Every HTTP request on any endpoint since start.
    pub fn total_requests(&self) -> u64 {
        self.shared.total_requests.load(Ordering::SeqCst)
    }
}
