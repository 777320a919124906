//! Request handling: routing, the auth endpoints, the echo API and the BaaS error envelope.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, ALLOW, CONTENT_TYPE, DATE, RETRY_AFTER};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};

use super::faults::{Fault, Seen};
use super::state::{Issued, Shared, TokenProblem, TokenView};
use super::{ConnInfo, EmulatorUser, RecordedRequest, ResponseShape};

/// Largest JSON body accepted by the auth endpoints.
const AUTH_BODY_LIMIT: usize = 64 * 1024;

/// Sample `scope` value from the docs (§2.8).
const SCOPE: &str = "01f0418c-36da-17a0-830a-aca6bf25e007";

/// `accountType` values (§2.2), compared case-insensitively (A11).
const ACCOUNT_TYPES: &[&str] = &[
    "B2B",
    "B2C",
    "TENANT_USER",
    "TENANT_ADMIN",
    "PLATFORM_OWNER_ADMIN",
    "PT_USER",
    "PT_ADMIN",
    "GOD_USER",
    "DEVELOPER",
];

const GRANT_TYPES: &[&str] = &["password", "client_credentials", "refresh_token"];

type Resp = Response<Full<Bytes>>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LoginKind {
    /// `/api/v2/auth/sandbox/token`.
    Sandbox,
    /// `/api/v2/auth/token`.
    Token,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    Login(LoginKind),
    Refresh,
    Logout,
    Echo,
    MethodNotAllowed,
    NotFound,
}

fn route(method: &Method, path: &str) -> Route {
    let auth = match path {
        "/api/v2/auth/sandbox/token" => Some(Route::Login(LoginKind::Sandbox)),
        "/api/v2/auth/token" => Some(Route::Login(LoginKind::Token)),
        "/api/v2/auth/token/refresh" => Some(Route::Refresh),
        "/api/v2/auth/logout" => Some(Route::Logout),
        _ => None,
    };
    match auth {
        Some(r) if method == Method::POST => r,
        Some(_) => Route::MethodNotAllowed,
        None if path.starts_with("/api/") => Route::Echo,
        None => Route::NotFound,
    }
}

/// An error answer in the BaaS envelope (§6).
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    error: &'static str,
    message: String,
    field: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            error,
            message: message.into(),
            field: None,
        }
    }

    fn field(mut self, field: &'static str) -> Self {
        self.field = Some(field);
        self
    }

    fn missing_header(name: &'static str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "MISSING_HEADER",
            format!("Missing required header: {name}"),
        )
        .field(name)
    }

    fn invalid_header(name: &'static str, why: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "INVALID_HEADER",
            format!("Invalid header {name}: {why}"),
        )
        .field(name)
    }

    fn missing_field(name: &'static str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "MISSING_FIELD",
            format!("Missing required field: {name}"),
        )
        .field(name)
    }

    fn invalid_field(name: &'static str, why: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            format!("Invalid field {name}: {why}"),
        )
        .field(name)
    }

    fn bad_credentials() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "INVALID_CREDENTIALS",
            "Invalid username, password or client credentials",
        )
    }

    fn tenant_mismatch() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "TENANT_MISMATCH",
            "X-Tenant-ID does not match the tenant of the session",
        )
        .field("X-Tenant-ID")
    }

    fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL_ERROR",
            "Internal server error",
        )
    }

    fn into_response(self) -> Resp {
        let mut data = Map::new();
        data.insert("error".into(), Value::from(self.error));
        if let Some(f) = self.field {
            data.insert("field".into(), Value::from(f));
        }
        json_response(
            self.status,
            &json!({"code": self.status.as_u16(), "message": self.message, "data": data}),
        )
    }
}

fn json_response(status: StatusCode, body: &Value) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Request headers the echo API never reflects (their values are replaced by [`REDACTED`]).
const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-user-session-token",
    "cookie",
];

/// What the echo shows instead of a credential.
const REDACTED: &str = "<redacted>";

/// Entry point for every request.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Resp {
    shared.total_requests.fetch_add(1, Ordering::SeqCst);
    let delay = shared.delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let route = route(&method, &path);
    if matches!(route, Route::Login(_) | Route::Refresh | Route::Logout) {
        shared.auth_requests.fetch_add(1, Ordering::SeqCst);
    }
    let mut resp = if let Some(retry_after) = shared.take_429() {
        too_many_requests(&shared, &conn, route, req, retry_after).await
    } else {
        match route {
            Route::Login(kind) => login(&shared, kind, req)
                .await
                .unwrap_or_else(ApiError::into_response),
            Route::Refresh => refresh(&shared, req)
                .await
                .unwrap_or_else(ApiError::into_response),
            Route::Logout => logout(&shared, req)
                .await
                .unwrap_or_else(ApiError::into_response),
            Route::Echo => echo(&shared, &conn, req).await,
            Route::MethodNotAllowed => {
                let mut resp = ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "METHOD_NOT_ALLOWED",
                    format!("Method {method} is not allowed here"),
                )
                .into_response();
                resp.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("POST"));
                resp
            }
            Route::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "No such endpoint")
                    .into_response()
            }
        }
    };
    // hyper would add a `Date` from the real clock; FinHub's is on its own clock.
    if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(shared.now())) {
        resp.headers_mut().insert(DATE, date);
    }
    tracing::debug!(%method, %path, status = resp.status().as_u16(), "emulator answered");
    resp
}

/// Whole seconds from `now` until `expires_at`, floored (0 once expired).
fn seconds_left(expires_at: SystemTime, now: SystemTime) -> u64 {
    expires_at
        .duration_since(now)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn too_many_requests(
    shared: &Shared,
    conn: &ConnInfo,
    route: Route,
    req: Request<Incoming>,
    retry_after: Option<u64>,
) -> Resp {
    let mut resp = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "RATE_LIMITED",
        "Too many requests; reduce the request rate and retry with exponential backoff",
    )
    .into_response();
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    if route == Route::Echo {
        let (parts, body) = req.into_parts();
        let body_len = count_body(body).await.map_or(0, |(n, _)| n);
        let tenant = header(&parts.headers, "x-tenant-id").map(str::to_string);
        record(
            shared,
            conn,
            &parts,
            body_len,
            StatusCode::TOO_MANY_REQUESTS,
            tenant,
        );
    }
    resp
}

/// A header as trimmed UTF-8; empty counts as absent.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn require_header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, ApiError> {
    header(headers, name).ok_or_else(|| ApiError::missing_header(name))
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let value = header(headers, "authorization").ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "MISSING_TOKEN",
            "Authorization: Bearer <token> is required",
        )
        .field("Authorization")
    })?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "INVALID_TOKEN",
            "Authorization must use the Bearer scheme",
        )
        .field("Authorization"));
    }
    Ok(token)
}

/// `X-Forwarded-For` must be exactly one IPv4 or IPv6 address (§8).
fn require_forwarded_for(headers: &HeaderMap) -> Result<(), ApiError> {
    let xff = require_header(headers, "x-forwarded-for")
        .map_err(|_| ApiError::missing_header("X-Forwarded-For"))?;
    xff.parse::<IpAddr>().map(|_| ()).map_err(|_| {
        ApiError::invalid_header("X-Forwarded-For", "must be a single IPv4 or IPv6 address")
    })
}

/// Reads a small JSON object body.
async fn json_body(body: Incoming) -> Result<Map<String, Value>, ApiError> {
    let bytes = Limited::new(body, AUTH_BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "BODY_TOO_LARGE",
                    format!("Request body larger than {AUTH_BODY_LIMIT} bytes"),
                )
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "INVALID_BODY",
                    "Request body could not be read",
                )
            }
        })?
        .to_bytes();
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "INVALID_BODY",
            "Request body must be a JSON object",
        )),
    }
}

/// A string field; present but not a string, or empty, is an invalid value.
fn opt_str<'a>(
    body: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
        Some(Value::String(_)) => Err(ApiError::invalid_field(name, "must not be empty")),
        Some(_) => Err(ApiError::invalid_field(name, "must be a string")),
    }
}

fn req_str<'a>(body: &'a Map<String, Value>, name: &'static str) -> Result<&'a str, ApiError> {
    opt_str(body, name)?.ok_or_else(|| ApiError::missing_field(name))
}

/// Equality that does not stop at the first differing byte.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn login(shared: &Shared, kind: LoginKind, req: Request<Incoming>) -> Result<Resp, ApiError> {
    if shared.auth_down.load(Ordering::SeqCst) {
        return Err(auth_unavailable());
    }
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    require_forwarded_for(headers)?;
    if shared.strict_headers {
        require_header(headers, "user-agent")
            .map_err(|_| ApiError::missing_header("User-Agent"))?;
        require_header(headers, "sec-ch-ua-platform")
            .map_err(|_| ApiError::missing_header("sec-ch-ua-platform"))?;
        require_header(headers, "x-tenant-id")
            .map_err(|_| ApiError::missing_header("X-Tenant-ID"))?;
    }
    let body = json_body(body).await?;
    let username = req_str(&body, "username")?;
    let password = req_str(&body, "password")?;
    let customer_id = opt_str(&body, "customerId")?;
    let customer_key = opt_str(&body, "customerKey")?;
    let customer_secret = opt_str(&body, "customerSecret")?;
    let account_type = req_str(&body, "accountType")?;
    match kind {
        LoginKind::Sandbox => {
            if customer_id.is_none() && customer_key.is_none() {
                return Err(ApiError::missing_field("customerId"));
            }
            if customer_secret.is_none() {
                return Err(ApiError::missing_field("customerSecret"));
            }
        }
        LoginKind::Token => {
            let grant = req_str(&body, "grantType")?;
            if !GRANT_TYPES.contains(&grant) {
                return Err(ApiError::invalid_field(
                    "grantType",
                    "unsupported grant type",
                ));
            }
        }
    }
    if !ACCOUNT_TYPES
        .iter()
        .any(|t| t.eq_ignore_ascii_case(account_type))
    {
        return Err(ApiError::invalid_field(
            "accountType",
            "unknown account type",
        ));
    }

    let user = (!shared.fail_logins.load(Ordering::SeqCst))
        .then(|| shared.user(username))
        .flatten()
        .filter(|u| {
            same(password, &u.password)
                && customer_id.is_none_or(|c| same(c, &u.customer_id))
                && customer_key.is_none_or(|c| same(c, &u.customer_id))
                && customer_secret.is_none_or(|s| same(s, &u.customer_secret))
        });
    let Some(user) = user else {
        shared.failed_logins.fetch_add(1, Ordering::SeqCst);
        return Err(ApiError::bad_credentials());
    };
    if header(headers, "x-tenant-id").is_some_and(|t| t != user.tenant_id) {
        return Err(ApiError::tenant_mismatch());
    }
    let issued = shared.issue(user).map_err(|_| ApiError::internal())?;
    shared.logins.fetch_add(1, Ordering::SeqCst);
    let left = seconds_left(issued.view.expires_at, shared.token_now());
    Ok(token_response(shared.shape(), user, &issued, left))
}

fn auth_unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "SERVICE_UNAVAILABLE",
        "Authentication service temporarily unavailable",
    )
}

/// A login/refresh answer in the configured shape (§2.8).
fn token_response(
    shape: ResponseShape,
    user: &EmulatorUser,
    issued: &Issued,
    expires_in: u64,
) -> Resp {
    let v = &issued.view;
    let body = match shape {
        ResponseShape::S1 => json!({
            "expires_in": expires_in,
            "token_type": "Bearer",
            "scope": SCOPE,
            "customerId": v.customer_id,
            "tenantId": v.tenant,
            "userSessionToken": v.token,
            "refreshToken": issued.refresh_token,
        }),
        ResponseShape::S2 => json!({
            "access_token": v.token,
            "token_type": "Bearer",
            "expires_in": expires_in,
            "scope": SCOPE,
        }),
        ResponseShape::S3 => json!({
            "userSessionToken": v.token,
            "expiresIn": expires_in,
            "tokenType": "Bearer",
            "userId": v.user_id,
            "customerId": v.customer_id,
            "personId": format!("per-{}", user.username),
            "tenantId": v.tenant,
            "credentials": [{"sessionId": v.session_id, "value": user.username, "token": v.token}],
            "organizationId": null,
            "twoFaInfo": [],
            "isOneTimePasswordLogin": false,
            "isPasswordExpired": false,
            "bffToken": v.token,
            "oneTimePasswordLogin": false,
        }),
        ResponseShape::S4 => json!({
            "code": 200,
            "message": "Success",
            "data": {
                "userSessionToken": v.token,
                "expiresIn": expires_in,
                "tokenType": "Bearer",
                "userId": v.user_id,
                "customerId": v.customer_id,
                "tenantId": v.tenant,
                "sessionId": v.session_id,
            },
        }),
    };
    json_response(StatusCode::OK, &body)
}

/// 401 (and the expiry counter) for an unusable token.
fn token_problem(shared: &Shared, problem: TokenProblem) -> ApiError {
    match problem {
        TokenProblem::Unknown => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "INVALID_TOKEN",
            "Invalid session token",
        ),
        TokenProblem::Revoked(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "SESSION_REVOKED",
            "The session has been logged out or revoked",
        ),
        TokenProblem::Expired(_) => {
            shared.expired_token_seen.fetch_add(1, Ordering::SeqCst);
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "TOKEN_EXPIRED",
                "access token has expired",
            )
        }
    }
}

async fn refresh(shared: &Shared, req: Request<Incoming>) -> Result<Resp, ApiError> {
    if shared.auth_down.load(Ordering::SeqCst) {
        return Err(auth_unavailable());
    }
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    let token = bearer(headers)?;
    let session_header = require_header(headers, "x-user-session-token")
        .map_err(|_| ApiError::missing_header("X-User-Session-Token"))?;
    let tenant = require_header(headers, "x-tenant-id")
        .map_err(|_| ApiError::missing_header("X-Tenant-ID"))?;
    let active = require_header(headers, "x-session-active")
        .map_err(|_| ApiError::missing_header("X-Session-Active"))?;
    if !active.eq_ignore_ascii_case("true") {
        return Err(ApiError::invalid_header("X-Session-Active", "must be true"));
    }
    let body = json_body(body).await?;
    let body_token = req_str(&body, "userSessionToken")?;
    let key = req_str(&body, "internalTokenKey")?;
    let view = shared.check(token).map_err(|p| token_problem(shared, p))?;
    if !same(session_header, token) || !same(body_token, token) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "SESSION_MISMATCH",
            "Bearer token, X-User-Session-Token and userSessionToken must be the same session",
        ));
    }
    if tenant != view.tenant {
        return Err(ApiError::tenant_mismatch());
    }
    if !view.internal_key.as_deref().is_some_and(|k| same(k, key)) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "INVALID_TOKEN_KEY",
            "internalTokenKey does not belong to this session",
        )
        .field("internalTokenKey"));
    }
    let user = shared.user(&view.username).ok_or_else(ApiError::internal)?;
    let now = shared.token_now();
    let remaining = view.expires_at.duration_since(now).unwrap_or_default();
    // 10 % rule (§4.1), on this server's clock: with more than a tenth of the token's validity
    // (`exp - iat`) left nothing is renewed and the answer reports the validity left.
    if remaining > view.lifetime / 10 {
        shared.refreshes_not_needed.fetch_add(1, Ordering::SeqCst);
        let same_token = Issued {
            view,
            refresh_token: shared.hand_out(format!("rt-{}", uuid::Uuid::new_v4())),
        };
        return Ok(token_response(
            shared.shape(),
            user,
            &same_token,
            remaining.as_secs(),
        ));
    }
    // The old token stays valid until its own expiry (in-flight requests).
    let issued = shared.issue(user).map_err(|_| ApiError::internal())?;
    shared.refreshes.fetch_add(1, Ordering::SeqCst);
    let left = seconds_left(issued.view.expires_at, shared.token_now());
    Ok(token_response(shared.shape(), user, &issued, left))
}

/// `POST /api/v2/auth/logout` (§5): body `{"userSessionToken": …}` (required), header
/// `X-Forwarded-For` (required); answers `{cleared, message, success}`. A valid or expired
/// token's session is ended (the token is refused from then on); an unknown or already
/// logged-out token gets `cleared: false`.
async fn logout(shared: &Shared, req: Request<Incoming>) -> Result<Resp, ApiError> {
    if shared.auth_down.load(Ordering::SeqCst) {
        return Err(auth_unavailable());
    }
    let (parts, body) = req.into_parts();
    require_forwarded_for(&parts.headers)?;
    let body = json_body(body).await?;
    let token = req_str(&body, "userSessionToken")?;
    let view = match shared.check(token) {
        Ok(v) => Some(v),
        Err(TokenProblem::Expired(v)) | Err(TokenProblem::Revoked(v)) => Some(*v),
        Err(TokenProblem::Unknown) => None,
    };
    let cleared = view.as_ref().is_some_and(|v| shared.revoke(&v.jti));
    shared.record_logout(view.map(|v| v.tenant), cleared);
    let body = if cleared {
        json!({"cleared": true, "message": "Session cleared successfully", "success": true})
    } else {
        json!({"cleared": false, "message": "No session found for this token", "success": false})
    };
    Ok(json_response(StatusCode::OK, &body))
}

/// Counts the body without keeping it; also hashes it (for the idempotency fingerprint).
async fn count_body(mut body: Incoming) -> Result<(u64, u64), hyper::Error> {
    use std::hash::Hasher;
    let mut n = 0u64;
    let mut hash = std::collections::hash_map::DefaultHasher::new();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            n += data.len() as u64;
            hash.write(data);
        }
    }
    Ok((n, hash.finish()))
}

/// A keyed call's fingerprint: method, path and query, body.
fn fingerprint(parts: &http::request::Parts, body_hash: u64) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.method.as_str().hash(&mut h);
    parts.uri.path_and_query().map(|p| p.as_str()).hash(&mut h);
    body_hash.hash(&mut h);
    h.finish()
}

/// FinHub's gateway, when the API behind it is unavailable.
fn gateway_unavailable(retry_after: Option<u64>) -> Resp {
    let mut resp = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "SERVICE_UNAVAILABLE",
        "The service is temporarily unavailable",
    )
    .into_response();
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

fn header_list(parts: &http::request::Parts) -> Vec<(String, String)> {
    let mut list: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    if !parts.headers.contains_key(http::header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            list.insert(0, ("host".into(), authority.as_str().to_string()));
        }
    }
    list
}

fn record(
    shared: &Shared,
    conn: &ConnInfo,
    parts: &http::request::Parts,
    body_len: u64,
    status: StatusCode,
    tenant: Option<String>,
) {
    if status == StatusCode::OK {
        shared.api_ok.fetch_add(1, Ordering::SeqCst);
    } else {
        shared.api_rejected.fetch_add(1, Ordering::SeqCst);
    }
    shared.record(RecordedRequest {
        method: parts.method.to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| parts.uri.path().to_string()),
        headers: header_list(parts),
        body_len,
        client_cert: conn.client_cert.clone(),
        sni: conn.sni.clone(),
        status: status.as_u16(),
        tenant,
        answered_at: Instant::now(),
    });
}

/// Validates the session headers of an API call (§3, §9.6); returns the session.
fn check_api_call(
    shared: &Shared,
    headers: &HeaderMap,
) -> Result<TokenView, (ApiError, Option<String>)> {
    let header_tenant = header(headers, "x-tenant-id").map(str::to_string);
    let token = bearer(headers).map_err(|e| (e, header_tenant.clone()))?;
    let view = match shared.check(token) {
        Ok(v) => v,
        Err(p) => {
            let tenant = match &p {
                TokenProblem::Expired(v) | TokenProblem::Revoked(v) => Some(v.tenant.clone()),
                TokenProblem::Unknown => header_tenant,
            };
            return Err((token_problem(shared, p), tenant));
        }
    };
    let fail = |e: ApiError| (e, Some(view.tenant.clone()));
    match header_tenant.as_deref() {
        None => return Err(fail(ApiError::missing_header("X-Tenant-ID"))),
        Some(t) if t != view.tenant => return Err(fail(ApiError::tenant_mismatch())),
        Some(_) => {}
    }
    let mut required: Vec<(&str, &'static str)> = vec![("x-activity-id", "X-Activity-ID")];
    if shared.strict_headers {
        required.extend([
            ("x-request-id", "X-Request-ID"),
            ("x-session-id", "X-Session-ID"),
            ("x-correlation-id", "X-Correlation-ID"),
        ]);
    }
    for (name, display) in required {
        if header(headers, name).is_none() {
            return Err(fail(ApiError::missing_header(display)));
        }
    }
    Ok(view)
}

async fn echo(shared: &Shared, conn: &ConnInfo, req: Request<Incoming>) -> Resp {
    let fault = shared.faults.draw();
    match fault {
        Fault::Gateway503(retry_after) => return gateway_unavailable(retry_after),
        Fault::ResetBefore => conn.abort().await,
        Fault::Slow(d) => tokio::time::sleep(d).await,
        Fault::None | Fault::LostAfter => {}
    }
    let (parts, body) = req.into_parts();
    let (body_len, body_hash) = match count_body(body).await {
        Ok(n) => n,
        Err(_) => {
            let e = ApiError::new(
                StatusCode::BAD_REQUEST,
                "INVALID_BODY",
                "Request body could not be read",
            );
            let tenant = header(&parts.headers, "x-tenant-id").map(str::to_string);
            record(shared, conn, &parts, 0, e.status, tenant);
            return e.into_response();
        }
    };
    let view = match check_api_call(shared, &parts.headers) {
        Ok(v) => v,
        Err((e, tenant)) => {
            record(shared, conn, &parts, body_len, e.status, tenant);
            return e.into_response();
        }
    };
    if shared.answers_401(parts.uri.path()) {
        let e = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "Not authorized for this resource",
        );
        record(shared, conn, &parts, body_len, e.status, Some(view.tenant));
        return e.into_response();
    }
    let key = header(&parts.headers, "x-idempotency-key").map(str::to_string);
    let fp = fingerprint(&parts, body_hash);
    if let Some(key) = &key {
        match shared.faults.lookup(&view.tenant, key, fp) {
            Seen::New => {}
            Seen::Replay(status, body) => {
                let mut resp = Response::new(Full::new(body));
                *resp.status_mut() = status;
                let h = resp.headers_mut();
                h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                h.insert(
                    HeaderName::from_static("x-idempotent-replay"),
                    HeaderValue::from_static("true"),
                );
                if fault == Fault::LostAfter {
                    conn.abort().await;
                }
                return resp;
            }
            Seen::Conflict => {
                return ApiError::new(
                    StatusCode::CONFLICT,
                    "IDEMPOTENCY_KEY_REUSED",
                    "X-Idempotency-Key was already used for a different request",
                )
                .into_response();
            }
        }
    }
    // The echo shows what arrived, but like a real API never hands a credential back: the
    // caller is an app behind the sidecar, which must never see the sidecar's session.
    let headers_json: Map<String, Value> = header_list(&parts)
        .into_iter()
        .map(|(k, v)| {
            let v = if CREDENTIAL_HEADERS.contains(&k.as_str()) {
                REDACTED.to_string()
            } else {
                v
            };
            (k, v)
        })
        .fold(Map::new(), |mut m, (k, v)| {
            match m.get_mut(&k) {
                Some(Value::String(prev)) => {
                    prev.push_str(", ");
                    prev.push_str(&v);
                }
                _ => {
                    m.insert(k, Value::String(v));
                }
            }
            m
        });
    let body = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query().unwrap_or(""),
        "headers": headers_json,
        "body_len": body_len,
        "client_cert": conn.client_cert,
        "tenant": view.tenant,
        "user_id": view.user_id,
    });
    record(
        shared,
        conn,
        &parts,
        body_len,
        StatusCode::OK,
        Some(view.tenant.clone()),
    );
    let mut resp = json_response(StatusCode::OK, &body);
    let executed_key = key.as_deref().map(|k| (view.tenant.as_str(), k, fp));
    shared
        .faults
        .executed(executed_key, StatusCode::OK, &Bytes::from(body.to_string()));
    if fault == Fault::LostAfter {
        conn.abort().await;
    }
    if let Some(id) = parts.headers.get("x-request-id") {
        resp.headers_mut()
            .insert(HeaderName::from_static("x-request-id"), id.clone());
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route(&Method::POST, "/api/v2/auth/token"),
            Route::Login(LoginKind::Token)
        );
        assert_eq!(
            route(&Method::POST, "/api/v2/auth/sandbox/token"),
            Route::Login(LoginKind::Sandbox)
        );
        assert_eq!(
            route(&Method::POST, "/api/v2/auth/token/refresh"),
            Route::Refresh
        );
        assert_eq!(route(&Method::POST, "/api/v2/auth/logout"), Route::Logout);
        assert_eq!(
            route(&Method::GET, "/api/v2/auth/token"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(&Method::DELETE, "/api/v2/accounts/1"), Route::Echo);
        assert_eq!(route(&Method::GET, "/health"), Route::NotFound);
        assert_eq!(route(&Method::GET, "/api"), Route::NotFound);
    }

    #[test]
    fn envelope_shape() {
        let resp = ApiError::missing_header("X-Activity-ID").into_response();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            resp.headers().get(CONTENT_TYPE).map(|v| v.as_bytes()),
            Some(&b"application/json"[..])
        );
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h).unwrap_err().status, StatusCode::UNAUTHORIZED);
        h.insert("authorization", HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h).unwrap_err().error, "INVALID_TOKEN");
        h.insert("authorization", HeaderValue::from_static("bearer  tok "));
        assert_eq!(bearer(&h).unwrap(), "tok");
        h.insert("authorization", HeaderValue::from_static("Bearer"));
        assert!(bearer(&h).is_err());
    }

    #[test]
    fn forwarded_for_must_be_one_ip() {
        let mut h = HeaderMap::new();
        assert_eq!(
            require_forwarded_for(&h).unwrap_err().error,
            "MISSING_HEADER"
        );
        for bad in ["1.2.3.4, 5.6.7.8", "example.com", "300.1.1.1"] {
            h.insert("x-forwarded-for", HeaderValue::from_static(bad));
            assert_eq!(
                require_forwarded_for(&h).unwrap_err().error,
                "INVALID_HEADER",
                "{bad}"
            );
        }
        for good in ["192.0.2.1", "2001:db8::1", " 10.0.0.1 "] {
            h.insert("x-forwarded-for", HeaderValue::from_static(good));
            assert!(require_forwarded_for(&h).is_ok(), "{good}");
        }
    }

    #[test]
    fn string_fields() {
        let body: Map<String, Value> =
            serde_json::from_str(r#"{"a":"x","b":"","c":5,"d":null}"#).unwrap();
        assert_eq!(req_str(&body, "a").unwrap(), "x");
        assert_eq!(req_str(&body, "b").unwrap_err().error, "INVALID_FIELD");
        assert_eq!(req_str(&body, "c").unwrap_err().error, "INVALID_FIELD");
        assert_eq!(req_str(&body, "d").unwrap_err().error, "MISSING_FIELD");
        assert_eq!(req_str(&body, "e").unwrap_err().field, Some("e"));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
    }
}
