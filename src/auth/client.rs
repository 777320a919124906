//! The FinHub auth endpoints: login and refresh, over mTLS with the current client certificate.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{json, Map, Value};

use super::grant::{Grant, GrantError};
use super::Session;
use crate::config::{Config, Environment, TenantConfig};
use crate::tls::{ClientTls, TlsStore};

/// Why a login or refresh did not produce a session. Never carries a credential or token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// FinHub rejected the credentials (login 401) or the token (refresh 401/403).
    #[error("FinHub refused the credentials or token (HTTP {0})")]
    Rejected(u16),
    /// FinHub asked us to slow down.
    #[error("FinHub rate-limited the auth call (HTTP 429)")]
    RateLimited {
        /// `Retry-After`, if sent.
        retry_after: Option<Duration>,
    },
    /// Any other non-2xx status.
    #[error("FinHub auth endpoint answered HTTP {0}")]
    Status(u16),
    /// The answer could not be used.
    #[error("unusable auth answer: {0}")]
    Answer(#[from] GrantError),
    /// Network, TLS or timeout.
    #[error("auth call failed: {0}")]
    Transport(String),
}

/// Calls FinHub's auth endpoints. Rebuilds its HTTP client when the TLS snapshot changes.
pub struct AuthClient {
    tls: Arc<TlsStore>,
    base_url: String,
    env: Environment,
    login_path: String,
    refresh_path: String,
    account_type: String,
    grant_type: String,
    timeout: Duration,
    origin_ip: String,
    user_agent: http::HeaderValue,
    platform: http::HeaderValue,
    cached: Mutex<Option<(Arc<ClientTls>, reqwest::Client)>>,
}

/// Result of a refresh call.
#[derive(Debug)]
pub enum Refreshed {
    /// A new token.
    New(Box<Session>),
    /// FinHub kept the current token (more than 10 % of its lifetime left); it reports this
    /// much remaining validity, if it said.
    NotYet(Option<Duration>),
}

impl AuthClient {
    /// A client for the upstream and auth settings in `config`.
    pub fn new(config: &Config, tls: Arc<TlsStore>) -> Self {
        let u = &config.upstream;
        let host = if u.host.contains(':') {
            format!("[{}]", u.host)
        } else {
            u.host.clone()
        };
        AuthClient {
            tls,
            base_url: format!("https://{host}:{}", u.port),
            env: config.auth.environment,
            login_path: config.auth.login_path.clone(),
            refresh_path: config.auth.refresh_path.clone(),
            account_type: config.auth.account_type.clone(),
            grant_type: config.auth.grant_type.clone(),
            timeout: config.auth.request_timeout,
            origin_ip: config.headers.origin_ip.to_string(),
            user_agent: config.headers.user_agent.clone(),
            platform: config.headers.sec_ch_ua_platform.clone(),
            cached: Mutex::new(None),
        }
    }

    fn http(&self) -> Result<reqwest::Client, AuthError> {
        let tls = self.tls.current();
        let mut cached = self
            .cached
            .lock()
            .map_err(|_| AuthError::Transport("auth client cache poisoned".into()))?;
        if let Some((t, c)) = cached.as_ref() {
            if Arc::ptr_eq(t, &tls) {
                return Ok(c.clone());
            }
        }
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured((*tls.rustls).clone())
            .timeout(self.timeout)
            .no_proxy()
            .http1_only()
            .build()
            .map_err(|e| AuthError::Transport(e.to_string()))?;
        *cached = Some((tls, client.clone()));
        Ok(client)
    }

    /// The login body for this environment (protocol notes §2.2–2.4, A9–A11).
    pub fn login_body(&self, tenant: &TenantConfig) -> Value {
        let mut m = Map::new();
        m.insert("username".into(), json!(tenant.username));
        m.insert("password".into(), json!(tenant.password.current().expose()));
        m.insert("accountType".into(), json!(self.account_type));
        if !self.env.is_sandbox_flavour() {
            m.insert("grantType".into(), json!(self.grant_type));
        }
        if self.env.sends_client_credentials() {
            if let Some(id) = &tenant.customer_id {
                m.insert("customerId".into(), json!(id));
                if self.env.is_sandbox_flavour() {
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
        let grant = read_grant(resp).await?;
        Ok(Session::from_grant(grant, sent))
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
            .ok_or(AuthError::Rejected(0))?;
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
        let grant = read_grant(resp).await?;
        if grant.token.expose() == current.token.expose() {
            return Ok(Refreshed::NotYet(grant.expires_in));
        }
        Ok(Refreshed::New(Box::new(Session::from_grant(grant, sent))))
    }
}

fn transport(e: reqwest::Error) -> AuthError {
    // reqwest errors name the URL (no credentials in it) and the cause.
    AuthError::Transport(e.without_url().to_string())
}

async fn read_grant(resp: reqwest::Response) -> Result<Grant, AuthError> {
    let status = resp.status().as_u16();
    match status {
        200..=299 => {}
        401 | 403 => return Err(AuthError::Rejected(status)),
        429 => {
            let retry_after = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(AuthError::RateLimited { retry_after });
        }
        _ => return Err(AuthError::Status(status)),
    }
    let body = resp.bytes().await.map_err(transport)?;
    Ok(Grant::parse(&body)?)
}
