//! The FinHub auth endpoints: login, refresh and logout, over mTLS with the current client
//! certificate. Every answer's `Date` feeds the estimate of FinHub's clock ([`ClockOffset`]).

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{json, Map, Value};

use super::clock::ClockOffset;
use super::grant::{Grant, GrantError};
use super::Session;
use crate::config::{Config, EgressProxy, EnvRules, TenantConfig};
use crate::tls::{ClientTls, TlsStore};

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
    /// No answer within the timeout.
    #[error("auth call timed out")]
    Timeout,
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
    clock: Arc<ClockOffset>,
    base_url: String,
    /// The environment's rules (login body flavour, refresh support).
    rules: EnvRules,
    login_path: String,
    refresh_path: String,
    logout_path: String,
    account_type: String,
    grant_type: String,
    timeout: Duration,
    origin_ip: String,
    user_agent: http::HeaderValue,
    platform: http::HeaderValue,
    /// FinHub's host, for `connect_to`.
    host: String,
    /// `upstream.connect_to`: FinHub's addresses instead of DNS.
    connect_to: Vec<std::net::SocketAddr>,
    /// `upstream.egress_proxy`: every auth call is a CONNECT tunnel through it.
    egress: Option<EgressProxy>,
    /// The client, for this TLS snapshot and this keyed hash of the proxy password.
    cached: Mutex<Option<(Arc<ClientTls>, u64, reqwest::Client)>>,
    /// Keys [`AuthClient::credentials_fingerprint`] (random per process).
    hasher: RandomState,
}

/// Result of a refresh call.
#[derive(Debug)]
pub enum Refreshed {
    /// A new token.
    New(Box<Session>),
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
    /// into `clock`.
    pub fn new(config: &Config, tls: Arc<TlsStore>, clock: Arc<ClockOffset>) -> Self {
        let u = &config.upstream;
        let host = if u.host.contains(':') {
            format!("[{}]", u.host)
        } else {
            u.host.clone()
        };
        AuthClient {
            tls,
            clock,
            base_url: format!("https://{host}:{}", u.port),
            rules: config.rules,
            login_path: config.auth.login_path.clone(),
            refresh_path: config.auth.refresh_path.clone(),
            logout_path: config.auth.logout_path.clone(),
            account_type: config.auth.account_type.clone(),
            grant_type: config.auth.grant_type.clone(),
            timeout: config.auth.request_timeout,
            origin_ip: config.headers.origin_ip.to_string(),
            user_agent: config.headers.user_agent.clone(),
            platform: config.headers.sec_ch_ua_platform.clone(),
            host: u.host.clone(),
            connect_to: u.connect_to.clone(),
            egress: u.egress_proxy.clone(),
            cached: Mutex::new(None),
            hasher: RandomState::new(),
        }
    }

    /// The rules of the environment this client logs in to.
    pub fn rules(&self) -> &EnvRules {
        &self.rules
    }

    /// The estimate of FinHub's clock this client feeds.
    pub fn clock(&self) -> &Arc<ClockOffset> {
        &self.clock
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

    fn http(&self) -> Result<reqwest::Client, AuthError> {
        let tls = self.tls.current();
        // A rotated proxy password (file re-read) makes a new client, like a new certificate.
        let password = self
            .egress
            .as_ref()
            .and_then(|p| p.auth.as_ref())
            .map(|a| a.password.current());
        let password_key = self.hasher.hash_one(password.as_ref().map(|p| p.expose()));
        let mut cached = self
            .cached
            .lock()
            .map_err(|_| AuthError::Transport("auth client cache poisoned".into()))?;
        if let Some((t, k, c)) = cached.as_ref() {
            if Arc::ptr_eq(t, &tls) && *k == password_key {
                return Ok(c.clone());
            }
        }
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured((*tls.rustls).clone())
            .timeout(self.timeout)
            .no_proxy()
            .http1_only();
        if let Some(p) = &self.egress {
            let host = if p.host.contains(':') {
                format!("[{}]", p.host)
            } else {
                p.host.clone()
            };
            let mut proxy = reqwest::Proxy::https(format!("http://{host}:{}", p.port))
                .map_err(|e| AuthError::Transport(format!("egress proxy: {e}")))?;
            if let (Some(a), Some(pw)) = (&p.auth, &password) {
                proxy = proxy.basic_auth(&a.username, pw.expose());
            }
            builder = builder.proxy(proxy);
        } else if !self.connect_to.is_empty() {
            builder = builder.resolve_to_addrs(&self.host, &self.connect_to);
        }
        let client = builder
            .build()
            .map_err(|e| AuthError::Transport(e.to_string()))?;
        *cached = Some((tls, password_key, client.clone()));
        Ok(client)
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

    /// A POST to FinHub with the compliance headers every auth call carries.
    fn post(
        &self,
        http: &reqwest::Client,
        path: &str,
        tenant: &TenantConfig,
    ) -> reqwest::RequestBuilder {
        http.post(format!("{}{}", self.base_url, path))
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, self.user_agent.clone())
            .header("sec-ch-ua-platform", self.platform.clone())
            .header("X-Forwarded-For", self.origin_ip.as_str())
            .header("X-Tenant-ID", tenant.id_header.clone())
    }

    /// Logs `tenant` in.
    pub async fn login(&self, tenant: &TenantConfig) -> Result<Session, AuthError> {
        let http = self.http()?;
        let sent = SystemTime::now();
        let resp = self
            .post(&http, &self.login_path, tenant)
            .json(&self.login_body(tenant))
            .send()
            .await
            .map_err(transport)?;
        let received = SystemTime::now();
        let grant = self.read_grant(resp, sent, received).await?;
        Ok(Session::from_grant(grant, sent, received, &self.clock))
    }

    /// Refreshes `current` through the refresh endpoint with its `internalTokenKey` (§4.1).
    pub async fn refresh(
        &self,
        tenant: &TenantConfig,
        current: &Session,
    ) -> Result<Refreshed, AuthError> {
        let key = current
            .internal_token_key
            .as_ref()
            .ok_or(AuthError::NotRefreshable)?;
        let http = self.http()?;
        let sent = SystemTime::now();
        let body = json!({
            "userSessionToken": current.token.expose(),
            "internalTokenKey": key.expose(),
        });
        let resp = self
            .post(&http, &self.refresh_path, tenant)
            .header(http::header::AUTHORIZATION, current.authorization.clone())
            .header("X-Session-Active", "true")
            .header("X-User-Session-Token", current.session_token.clone())
            .json(&body)
            .send()
            .await
            .map_err(transport)?;
        let received = SystemTime::now();
        let grant = self.read_grant(resp, sent, received).await?;
        if grant.token.expose() == current.token.expose() {
            return Ok(Refreshed::NotYet {
                remaining: grant.expires_in,
                sent,
                received,
            });
        }
        Ok(Refreshed::New(Box::new(Session::from_grant(
            grant,
            sent,
            received,
            &self.clock,
        ))))
    }

    /// Ends `session` at FinHub (`POST /api/v2/auth/logout`, body `{"userSessionToken": …}`,
    /// Bearer and the compliance headers; protocol notes §5, A22), giving up after `within`.
    /// `Ok(Some(cleared))` when the answer says whether a session was cleared.
    pub async fn logout(
        &self,
        tenant: &TenantConfig,
        session: &Session,
        within: Duration,
    ) -> Result<Option<bool>, AuthError> {
        let http = self.http()?;
        let sent = SystemTime::now();
        let resp = self
            .post(&http, &self.logout_path, tenant)
            .header(http::header::AUTHORIZATION, session.authorization.clone())
            .json(&json!({"userSessionToken": session.token.expose()}))
            .timeout(within)
            .send()
            .await
            .map_err(transport)?;
        let received = SystemTime::now();
        self.check_status(&resp, sent, received)?;
        // The answer is informational (§5: `{cleared, message, success}`); any 2xx ends it.
        let body = resp.bytes().await.map_err(transport)?;
        Ok(serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("cleared").and_then(Value::as_bool)))
    }

    /// Observes the answer's `Date`, then maps a non-2xx status to its error.
    fn check_status(
        &self,
        resp: &reqwest::Response,
        sent: SystemTime,
        received: SystemTime,
    ) -> Result<(), AuthError> {
        let headers = resp.headers();
        self.clock
            .observe(headers.get(http::header::DATE), sent, received);
        let status = resp.status().as_u16();
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

    async fn read_grant(
        &self,
        resp: reqwest::Response,
        sent: SystemTime,
        received: SystemTime,
    ) -> Result<Grant, AuthError> {
        self.check_status(&resp, sent, received)?;
        let body = resp.bytes().await.map_err(transport)?;
        Ok(Grant::parse(&body)?)
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

fn transport(e: reqwest::Error) -> AuthError {
    if e.is_timeout() {
        return AuthError::Timeout;
    }
    // reqwest errors name the URL (no credentials in it) and the cause.
    AuthError::Transport(e.without_url().to_string())
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
