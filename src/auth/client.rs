//! The FinHub auth endpoints: login, refresh and logout, over mTLS with the current client
//! certificate. Every answer's `Date` feeds the estimate of FinHub's gateway clock, every
//! token's claims the estimate of its token issuer's clock ([`ClockOffset`]): the two need not
//! agree, and only the second says anything about a token.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde_json::{json, Map, Value};

use super::clock::ClockOffset;
use super::grant::{Grant, GrantError};
use super::FinHubSession;
use crate::config::{Config, EnvRules, TenantConfig};
use crate::egress::EgressError;
use crate::names;
use crate::policy::compliance::ComplianceHeaders;
use crate::tls::TlsStore;
use crate::upstream::{DialError, UpstreamAddrs};

/// The largest auth answer body read (FinHub's are a few KiB); a longer one is an error,
/// and nothing beyond this is buffered.
pub const MAX_AUTH_ANSWER_BYTES: usize = 64 * 1024;

/// Why a login or refresh did not produce a session. Never carries a credential or token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// FinHub rejected the credentials (login 401) or the token (refresh 401/403).
    #[error("FinHub refused the credentials or token (HTTP {0})")]
    Rejected(u16),
    /// The session carries no `internalTokenKey`: only a login renews it (A3).
    #[error("the session cannot be refreshed (its token has no internalTokenKey)")]
    NotRefreshable,
    /// FinHub asked us to slow down.
    #[error("FinHub rate-limited the auth call (HTTP 429)")]
    RateLimited {
        /// `Retry-After`, if sent.
        retry_after: Option<Duration>,
    },
    /// Any other non-2xx status, with its `Retry-After` (503), if sent.
    #[error("FinHub auth endpoint answered HTTP {0}")]
    Status(u16, Option<Duration>),
    /// The answer could not be used.
    #[error("unusable auth answer: {0}")]
    Answer(#[from] GrantError),
    /// Network or TLS.
    #[error("auth call failed: {0}")]
    Transport(String),
    /// No tunnel through `upstream.egress_proxy` (counted in
    /// `finhub_sidecar_egress_proxy_errors_total{path="auth"}`).
    #[error("auth call failed: {0} (upstream.egress_proxy)")]
    Egress(EgressError),
    /// No answer within the timeout.
    #[error("auth call timed out")]
    Timeout,
}

impl From<DialError> for AuthError {
    /// A failed dial as the auth call's failure: the egress tunnel's own error, a timeout when
    /// every address ran out of time, else transport.
    fn from(e: DialError) -> Self {
        match e {
            DialError::Egress(e) => AuthError::Egress(e),
            DialError::TimedOut(_) => AuthError::Timeout,
            other => AuthError::Transport(other.to_string()),
        }
    }
}

impl AuthError {
    /// How long FinHub asked us to wait (`Retry-After` on a 429 or 503), if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AuthError::RateLimited { retry_after } | AuthError::Status(_, retry_after) => {
                *retry_after
            }
            _ => None,
        }
    }
}

/// Calls FinHub's auth endpoints. Rebuilds its HTTP client when the TLS snapshot changes.
pub struct AuthClient {
    tls: Arc<TlsStore>,
    /// FinHub's gateway clock (its answers' `Date`), for `/status` and the metric.
    date_clock: Arc<ClockOffset>,
    /// FinHub's token issuer's clock (its tokens' claims), on which sessions are planned.
    token_clock: Arc<ClockOffset>,
    /// The environment's rules (login body flavour, refresh support).
    rules: EnvRules,
    login_path: String,
    refresh_path: String,
    logout_path: String,
    account_type: String,
    grant_type: String,
    timeout: Duration,
    /// The compliance headers every FinHub call carries.
    compliance: ComplianceHeaders,
    /// FinHub's host for SNI and certificate verification.
    server_name: ServerName<'static>,
    /// The base URL's authority, sent as `Host` (`host` alone on port 443).
    authority: http::HeaderValue,
    /// How FinHub is dialled (the API path's addresses, `connect_to` or egress tunnel).
    upstream: Arc<UpstreamAddrs>,
    /// Keys [`AuthClient::credentials_fingerprint`] (random per process).
    hasher: RandomState,
}

/// Result of a refresh call.
#[derive(Debug)]
pub enum Refreshed {
    /// A new token.
    New(Box<FinHubSession>),
    /// FinHub kept the current token (more than 10 % of its lifetime left).
    NotYet {
        /// The validity FinHub reports left (`expires_in`, whole seconds), if it said.
        remaining: Option<Duration>,
        /// When the refresh request was sent (our clock).
        sent: SystemTime,
        /// When its answer arrived (our clock).
        received: SystemTime,
    },
}

impl AuthClient {
    /// A client for the upstream and auth settings in `config`; FinHub's `Date` headers go
    /// into `date_clock` (the token clock is the client's own, [`AuthClient::clock`]); FinHub is
    /// dialled through `upstream`, as the API path dials it.
    pub fn new(
        config: &Config,
        tls: Arc<TlsStore>,
        date_clock: Arc<ClockOffset>,
        upstream: Arc<UpstreamAddrs>,
    ) -> Self {
        let u = &config.upstream;
        let host = if u.host.contains(':') {
            format!("[{}]", u.host)
        } else {
            u.host.clone()
        };
        let authority = if u.port == 443 {
            host.clone()
        } else {
            format!("{host}:{}", u.port)
        };
        // The config layer validated the host as a DNS name or an IP literal.
        let server_name = ServerName::try_from(u.host.clone())
            .unwrap_or_else(|_| ServerName::try_from("invalid.invalid").expect("static name"));
        AuthClient {
            tls,
            date_clock,
            token_clock: Arc::new(ClockOffset::new()),
            rules: config.rules,
            login_path: config.auth.login_path.clone(),
            refresh_path: config.auth.refresh_path.clone(),
            logout_path: config.auth.logout_path.clone(),
            account_type: config.auth.account_type.clone(),
            grant_type: config.auth.grant_type.clone(),
            timeout: config.auth.request_timeout,
            compliance: ComplianceHeaders::new(&config.headers),
            server_name,
            authority: http::HeaderValue::from_str(&authority)
                .unwrap_or_else(|_| http::HeaderValue::from_static("invalid.invalid")),
            upstream,
            hasher: RandomState::new(),
        }
    }

    /// The rules of the environment this client logs in to.
    pub fn rules(&self) -> &EnvRules {
        &self.rules
    }

    /// The estimate of FinHub's token issuer's clock (from its tokens' claims and what FinHub
    /// did with them), on which every session this client obtains is planned.
    pub fn clock(&self) -> &Arc<ClockOffset> {
        &self.token_clock
    }

    /// The estimate of FinHub's gateway clock (from its answers' `Date`).
    pub fn date_clock(&self) -> &Arc<ClockOffset> {
        &self.date_clock
    }

    /// A keyed hash of `tenant`'s current credentials (files re-read), to notice a rotated
    /// password after a rejected login. Never logged; the key is random per process.
    pub fn credentials_fingerprint(&self, tenant: &TenantConfig) -> u64 {
        let secret = tenant.customer_secret.as_ref().map(|s| s.current());
        self.hasher.hash_one((
            tenant.username.as_str(),
            tenant.password.current().expose(),
            secret.as_ref().map(|s| s.expose()),
        ))
    }

    /// Sends `req` on a new TLS connection (client certificate, SNI the base URL's host) and
    /// reads the answer, all within `within`.
    async fn send(
        &self,
        req: http::Request<Full<Bytes>>,
        within: Duration,
    ) -> Result<Answer, AuthError> {
        tokio::time::timeout(within, self.send_now(req))
            .await
            .map_err(|_| AuthError::Timeout)?
    }

    async fn send_now(&self, req: http::Request<Full<Bytes>>) -> Result<Answer, AuthError> {
        let tls = self.tls.current();
        if !tls.availability.is_ready() {
            // No client certificate set yet (the token refuses the PIN): nothing to send with.
            return Err(AuthError::Transport(
                "no client certificate set yet (see /ready)".into(),
            ));
        }
        let tls = tokio_rustls::TlsConnector::from(tls.rustls.clone());
        let stream = self
            .upstream
            .dial(|tcp| tls.connect(self.server_name.clone(), tcp))
            .await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| AuthError::Transport(format!("HTTP/1.1 with FinHub: {e}")))?;
        // The connection task ends with this call (also when the call is given up).
        let conn = AbortOnDrop(tokio::spawn(conn));
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| AuthError::Transport(format!("HTTP/1.1 with FinHub: {e}")))?;
        let (parts, body) = resp.into_parts();
        let body = Limited::new(body, MAX_AUTH_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| AuthError::Transport(format!("reading FinHub's answer: {e}")))?
            .to_bytes();
        drop(conn);
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// The login body for this environment (protocol notes §2.2–2.4, A9–A11).
    pub fn login_body(&self, tenant: &TenantConfig) -> Value {
        let mut m = Map::new();
        m.insert("username".into(), json!(tenant.username));
        m.insert("password".into(), json!(tenant.password.current().expose()));
        m.insert("accountType".into(), json!(self.account_type));
        if !self.rules.sandbox_login_body {
            m.insert("grantType".into(), json!(self.grant_type));
        }
        if self.rules.sends_client_credentials {
            if let Some(id) = &tenant.customer_id {
                m.insert("customerId".into(), json!(id));
                if self.rules.sandbox_login_body {
                    // A10: the guides say customerId, the generated reference customerKey.
                    m.insert("customerKey".into(), json!(id));
                }
            }
            if let Some(s) = &tenant.customer_secret {
                m.insert("customerSecret".into(), json!(s.current().expose()));
            }
        }
        Value::Object(m)
    }

    /// A POST to FinHub with the compliance headers every auth call carries (the API path's,
    /// [`ComplianceHeaders`], with the origin IP as `X-Forwarded-For`) and the tenant's id.
    fn post(&self, path: &str, tenant: &TenantConfig) -> http::request::Builder {
        let mut builder = http::Request::post(path)
            .header(http::header::HOST, self.authority.clone())
            .header(http::header::ACCEPT, "*/*")
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(h) = builder.headers_mut() {
            let Ok(()) = self.compliance.apply(h, self.compliance.origin_ip());
        }
        builder.header(names::X_TENANT_ID, tenant.id_header.clone())
    }

    /// `builder` with `body` as its JSON body.
    fn finish(
        builder: http::request::Builder,
        body: &Value,
    ) -> Result<http::Request<Full<Bytes>>, AuthError> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| AuthError::Transport(format!("encoding the auth body: {e}")))?;
        builder
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| AuthError::Transport(format!("building the auth request: {e}")))
    }

    /// Logs `tenant` in.
    pub async fn login(&self, tenant: &TenantConfig) -> Result<FinHubSession, AuthError> {
        let body = self.login_body(tenant);
        let req = Self::finish(self.post(&self.login_path, tenant), &body)?;
        let sent = SystemTime::now();
        let resp = self.send(req, self.timeout).await?;
        let received = SystemTime::now();
        let grant = self.read_grant(&resp, sent, received)?;
        Ok(FinHubSession::from_grant(
            grant,
            sent,
            received,
            &self.token_clock,
        ))
    }

    /// Refreshes `current` through the refresh endpoint with its `internalTokenKey` (§4.1).
    pub async fn refresh(
        &self,
        tenant: &TenantConfig,
        current: &FinHubSession,
    ) -> Result<Refreshed, AuthError> {
        let key = current
            .internal_token_key
            .as_ref()
            .ok_or(AuthError::NotRefreshable)?;
        let body = json!({
            "userSessionToken": current.token.expose(),
            "internalTokenKey": key.expose(),
        });
        let builder = self
            .post(&self.refresh_path, tenant)
            .header(http::header::AUTHORIZATION, current.authorization.clone())
            .header(names::X_SESSION_ACTIVE, "true")
            .header(names::X_USER_SESSION_TOKEN, current.session_token.clone());
        let req = Self::finish(builder, &body)?;
        let sent = SystemTime::now();
        let resp = self.send(req, self.timeout).await?;
        let received = SystemTime::now();
        let grant = self.read_grant(&resp, sent, received)?;
        if grant.token.expose() == current.token.expose() {
            return Ok(Refreshed::NotYet {
                remaining: grant.expires_in,
                sent,
                received,
            });
        }
        Ok(Refreshed::New(Box::new(FinHubSession::from_grant(
            grant,
            sent,
            received,
            &self.token_clock,
        ))))
    }

    /// Ends `session` at FinHub (`POST /api/v2/auth/logout`, body `{"userSessionToken": …}`,
    /// Bearer and the compliance headers; protocol notes §5, A22), giving up after `within`.
    /// `Ok(Some(cleared))` when the answer says whether a session was cleared.
    pub async fn logout(
        &self,
        tenant: &TenantConfig,
        session: &FinHubSession,
        within: Duration,
    ) -> Result<Option<bool>, AuthError> {
        let body = json!({"userSessionToken": session.token.expose()});
        let builder = self
            .post(&self.logout_path, tenant)
            .header(http::header::AUTHORIZATION, session.authorization.clone());
        let req = Self::finish(builder, &body)?;
        let sent = SystemTime::now();
        let resp = self.send(req, within).await?;
        let received = SystemTime::now();
        self.check_status(&resp, sent, received)?;
        // The answer is informational (§5: `{cleared, message, success}`); any 2xx ends it.
        Ok(serde_json::from_slice::<Value>(&resp.body)
            .ok()
            .and_then(|v| v.get("cleared").and_then(Value::as_bool)))
    }

    /// Observes the answer's `Date`, then maps a non-2xx status to its error.
    fn check_status(
        &self,
        resp: &Answer,
        sent: SystemTime,
        received: SystemTime,
    ) -> Result<(), AuthError> {
        let headers = &resp.headers;
        self.date_clock
            .observe(headers.get(http::header::DATE), sent, received);
        let status = resp.status.as_u16();
        match status {
            200..=299 => Ok(()),
            401 | 403 => Err(AuthError::Rejected(status)),
            429 => Err(AuthError::RateLimited {
                retry_after: retry_after(headers, received),
            }),
            503 => Err(AuthError::Status(status, retry_after(headers, received))),
            _ => Err(AuthError::Status(status, None)),
        }
    }

    fn read_grant(
        &self,
        resp: &Answer,
        sent: SystemTime,
        received: SystemTime,
    ) -> Result<Grant, AuthError> {
        self.check_status(resp, sent, received)?;
        Ok(Grant::parse(&resp.body)?)
    }
}

/// One auth answer, read whole.
struct Answer {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

/// Aborts the connection task when the call that owns it ends (or is given up).
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `Retry-After` as delay-seconds or an HTTP-date (taken relative to the answer's own `Date`,
/// so that FinHub's clock offset does not matter; else to `received`).
fn retry_after(headers: &http::HeaderMap, received: SystemTime) -> Option<Duration> {
    let v = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    let base = headers
        .get(http::header::DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(|d| httpdate::parse_http_date(d).ok())
        .unwrap_or(received);
    Some(at.duration_since(base).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_both_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut h = http::HeaderMap::new();
        assert_eq!(retry_after(&h, now), None);
        h.insert(http::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(12));
        h.insert(http::header::RETRY_AFTER, later.parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(12)));
        // Relative to FinHub's own Date when it sent one (its clock may be off).
        let date = httpdate::fmt_http_date(now + Duration::from_secs(10));
        h.insert(http::header::DATE, date.parse().unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(2)));
        h.insert(http::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h, now), None);
        assert_eq!(
            AuthError::Status(503, Some(Duration::from_secs(3))).retry_after(),
            Some(Duration::from_secs(3))
        );
        assert_eq!(AuthError::Rejected(401).retry_after(), None);
    }
}
