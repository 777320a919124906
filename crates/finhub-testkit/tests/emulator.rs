//! The FinHub emulator over real loopback sockets: HTTPS (HTTP/1.1 and h2), mTLS, login,
//! refresh, logout, the echo API and the failure knobs. Certificates come from `Pki` at test
//! time; nothing sleeps for a fixed time (waits poll with a deadline).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use finhub_testkit::emulator::{Emulator, EmulatorConfig, MtlsMode, ResponseShape};
use finhub_testkit::pki::{CertPair, ClientCertOpts, Pki};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(15);
/// The tenant of the emulator's default user.
const TENANT: &str = "tenant-demo";

/// Status and JSON body of a response; panics (showing the body) if it is not JSON.
async fn json(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    let v = serde_json::from_slice(&body).unwrap_or_else(|_| {
        panic!(
            "status {status}: body is not JSON: {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, v)
}

/// A rustls client config trusting `pki`'s CA, presenting `cert` if given.
fn tls_client(pki: &Pki, cert: Option<&CertPair>, alpn_h2: bool) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(pki.ca_pem().as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match cert {
        Some(pair) => {
            let chain = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = if alpn_h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    cfg
}

fn http(pki: &Pki, cert: Option<&CertPair>, alpn_h2: bool, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls_client(pki, cert, alpn_h2))
        .resolve("localhost", addr)
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

struct Env {
    pki: Pki,
    client: CertPair,
    emu: Emulator,
    http: reqwest::Client,
}

impl Env {
    /// Emulator with mTLS `Optional`; the default client presents a certificate over HTTP/1.1.
    async fn start(adjust: impl FnOnce(&mut EmulatorConfig)) -> Env {
        let pki = Pki::new("Emulator Test CA").unwrap();
        let server = pki
            .server_cert(&["localhost"], &["127.0.0.1".parse().unwrap()])
            .unwrap();
        let client = pki
            .client_cert(&ClientCertOpts {
                common_name: "emu-test-app".into(),
                organization: "Test Org".into(),
                ..ClientCertOpts::default()
            })
            .unwrap();
        let mut cfg = EmulatorConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            server.cert_pem.clone(),
            server.key_pem.clone(),
        );
        cfg.client_ca_pem = Some(pki.ca_pem());
        cfg.mtls = MtlsMode::Optional;
        adjust(&mut cfg);
        let emu = Emulator::start(cfg).await.unwrap();
        let http = http(&pki, Some(&client), false, emu.addr());
        Env {
            pki,
            client,
            emu,
            http,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{}", self.emu.addr().port(), path)
    }

    fn client(&self, cert: Option<&CertPair>, alpn_h2: bool) -> reqwest::Client {
        http(&self.pki, cert, alpn_h2, self.emu.addr())
    }

    async fn post(&self, path: &str, headers: &[(&str, &str)], body: &Value) -> (u16, Value) {
        let mut req = self.http.post(self.url(path)).json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        json(req.send().await.unwrap()).await
    }

    /// Sandbox login with the demo user; returns the S1 answer.
    async fn login(&self) -> Value {
        let (status, body) = self
            .post(
                "/api/v2/auth/sandbox/token",
                &[("X-Forwarded-For", "192.0.2.10")],
                &sandbox_body(),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn token(&self) -> String {
        self.login().await["userSessionToken"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        json(req.send().await.unwrap()).await
    }

    async fn get_api(&self, token: &str) -> (u16, Value) {
        let auth = format!("Bearer {token}");
        self.api(
            reqwest::Method::GET,
            "/api/v2/accounts?limit=5",
            &[
                ("Authorization", &auth),
                ("X-Tenant-ID", TENANT),
                ("X-Activity-ID", "5d0f6a4e-2c1b-4f7e-9a57-0d9c7d1f3a11"),
            ],
        )
        .await
    }

    async fn refresh(&self, token: &str, key: &str) -> (u16, Value) {
        let auth = format!("Bearer {token}");
        self.post(
            "/api/v2/auth/token/refresh",
            &[
                ("Authorization", &auth),
                ("X-User-Session-Token", token),
                ("X-Tenant-ID", TENANT),
                ("X-Session-Active", "true"),
            ],
            &json!({"userSessionToken": token, "internalTokenKey": key}),
        )
        .await
    }
}

fn sandbox_body() -> Value {
    json!({
        "username": "demo",
        "password": "demo-password",
        "customerId": "demo-customer",
        "customerSecret": "demo-secret",
        "accountType": "b2b",
    })
}

fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&raw).unwrap()
}

/// Asserts a BaaS envelope with `status` and returns `data.error`.
fn envelope(status: u16, body: &Value) -> String {
    assert_eq!(body["code"], status, "{body}");
    assert!(body["message"].is_string(), "{body}");
    body["data"]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// `expires_in` right after issuing a token of `lifetime` seconds: the whole seconds left, so
/// `lifetime - 1` (the token's `exp` is a whole second after `iat`, and part of the current
/// second has passed) or `lifetime` exactly on a second boundary.
fn whole_seconds_left(v: &Value, lifetime: u64) -> bool {
    v.as_u64()
        .is_some_and(|s| s + 1 == lifetime || s == lifetime)
}

#[tokio::test]
async fn login_on_both_endpoints_in_every_shape() {
    let env = Env::start(|c| c.token_lifetime = Duration::from_secs(1800)).await;

    // S1 on the sandbox endpoint (customerId) ...
    let s1 = env.login().await;
    assert!(whole_seconds_left(&s1["expires_in"], 1800), "{s1}");
    assert_eq!(s1["token_type"], "Bearer");
    assert_eq!(s1["tenantId"], TENANT);
    assert_eq!(s1["customerId"], "demo-customer");
    assert!(s1["refreshToken"].is_string());
    let token = s1["userSessionToken"].as_str().unwrap();
    let c = claims(token);
    for claim in [
        "sub",
        "iat",
        "exp",
        "tenantId",
        "customerId",
        "userId",
        "jti",
        "sessionId",
    ] {
        assert!(!c[claim].is_null(), "claim {claim} in {c}");
    }
    assert_eq!(c["tenantId"], TENANT);
    assert_eq!(
        c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(),
        1800
    );
    assert!(uuid::Uuid::parse_str(c["internalTokenKey"].as_str().unwrap()).is_ok());

    // ... with customerKey instead (A10) and an upper-case accountType (A11).
    let mut body = sandbox_body();
    body.as_object_mut().unwrap().remove("customerId");
    body["customerKey"] = json!("demo-customer");
    body["accountType"] = json!("B2B");
    let (status, s1k) = env
        .post(
            "/api/v2/auth/sandbox/token",
            &[("X-Forwarded-For", "2001:db8::7")],
            &body,
        )
        .await;
    assert_eq!(status, 200, "{s1k}");

    // S1 on the integration/production endpoint, without client credentials.
    let token_body = json!({"username": "demo", "password": "demo-password", "accountType": "b2c", "grantType": "password"});
    let (status, t1) = env
        .post(
            "/api/v2/auth/token",
            &[("X-Forwarded-For", "192.0.2.10")],
            &token_body,
        )
        .await;
    assert_eq!(status, 200, "{t1}");
    assert!(t1["userSessionToken"].is_string() && whole_seconds_left(&t1["expires_in"], 1800));
    assert_ne!(
        t1["userSessionToken"], s1["userSessionToken"],
        "every login is a new session"
    );

    // S4 on both endpoints.
    env.emu.controls().set_response_shape(ResponseShape::S4);
    for (path, body) in [
        ("/api/v2/auth/sandbox/token", sandbox_body()),
        ("/api/v2/auth/token", token_body.clone()),
    ] {
        let (status, s4) = env
            .post(path, &[("X-Forwarded-For", "192.0.2.10")], &body)
            .await;
        assert_eq!(status, 200, "{s4}");
        assert_eq!(s4["code"], 200);
        assert_eq!(s4["message"], "Success");
        assert!(whole_seconds_left(&s4["data"]["expiresIn"], 1800), "{s4}");
        assert_eq!(s4["data"]["tenantId"], TENANT);
        assert!(
            claims(s4["data"]["userSessionToken"].as_str().unwrap())["internalTokenKey"]
                .is_string()
        );
    }

    // S2 and S3 are there too.
    env.emu.controls().set_response_shape(ResponseShape::S2);
    let (_, s2) = env
        .post(
            "/api/v2/auth/token",
            &[("X-Forwarded-For", "192.0.2.10")],
            &token_body,
        )
        .await;
    assert!(
        s2["access_token"].is_string() && whole_seconds_left(&s2["expires_in"], 1800),
        "{s2}"
    );
    env.emu.controls().set_response_shape(ResponseShape::S3);
    let (_, s3) = env
        .post(
            "/api/v2/auth/token",
            &[("X-Forwarded-For", "192.0.2.10")],
            &token_body,
        )
        .await;
    assert!(
        s3["userSessionToken"].is_string() && whole_seconds_left(&s3["expiresIn"], 1800),
        "{s3}"
    );

    let stats = env.emu.controls().stats();
    assert_eq!(stats.logins, 7);
    assert_eq!(stats.failed_logins, 0);
    assert_eq!(env.emu.controls().total_requests(), 7);
}

#[tokio::test]
async fn login_rejections_use_the_envelope_and_are_counted() {
    let env = Env::start(|_| {}).await;
    let xff = [("X-Forwarded-For", "192.0.2.10")];

    let mut bad = sandbox_body();
    bad["password"] = json!("wrong");
    let (status, body) = env.post("/api/v2/auth/sandbox/token", &xff, &bad).await;
    assert_eq!(status, 401);
    assert_eq!(envelope(401, &body), "INVALID_CREDENTIALS");
    assert!(
        !body.to_string().contains("wrong"),
        "no credential echoed: {body}"
    );

    let mut bad_secret = sandbox_body();
    bad_secret["customerSecret"] = json!("nope");
    assert_eq!(
        env.post("/api/v2/auth/sandbox/token", &xff, &bad_secret)
            .await
            .0,
        401
    );
    assert_eq!(env.emu.controls().stats().failed_logins, 2);

    env.emu.controls().fail_logins(true);
    assert_eq!(
        env.post("/api/v2/auth/sandbox/token", &xff, &sandbox_body())
            .await
            .0,
        401
    );
    env.emu.controls().fail_logins(false);
    assert_eq!(env.emu.controls().stats().failed_logins, 3);
    env.login().await;

    // Missing / invalid X-Forwarded-For.
    let (status, body) = env
        .post("/api/v2/auth/sandbox/token", &[], &sandbox_body())
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["data"]["field"], "X-Forwarded-For");
    let (status, body) = env
        .post(
            "/api/v2/auth/sandbox/token",
            &[("X-Forwarded-For", "192.0.2.1, 10.0.0.1")],
            &sandbox_body(),
        )
        .await;
    assert_eq!(
        (status, envelope(400, &body)),
        (400, "INVALID_HEADER".to_string())
    );

    // Missing fields, per endpoint.
    for (path, field, body) in [
        (
            "/api/v2/auth/sandbox/token",
            "customerId",
            json!({"username":"demo","password":"demo-password","customerSecret":"demo-secret","accountType":"b2b"}),
        ),
        (
            "/api/v2/auth/sandbox/token",
            "accountType",
            json!({"username":"demo","password":"demo-password","customerId":"demo-customer","customerSecret":"demo-secret"}),
        ),
        (
            "/api/v2/auth/token",
            "grantType",
            json!({"username":"demo","password":"demo-password","accountType":"b2b"}),
        ),
        (
            "/api/v2/auth/token",
            "username",
            json!({"password":"demo-password","accountType":"b2b","grantType":"password"}),
        ),
    ] {
        let (status, resp) = env.post(path, &xff, &body).await;
        assert_eq!(status, 400, "{path} {field}: {resp}");
        assert_eq!(resp["data"]["field"], field, "{resp}");
    }
    let mut odd = sandbox_body();
    odd["accountType"] = json!("martian");
    let (status, resp) = env.post("/api/v2/auth/sandbox/token", &xff, &odd).await;
    assert_eq!(
        (status, resp["data"]["field"].as_str()),
        (400, Some("accountType"))
    );
    let resp = env
        .http
        .post(env.url("/api/v2/auth/token"))
        .header("X-Forwarded-For", "192.0.2.10")
        .body("not json")
        .send()
        .await
        .unwrap();
    let (status, resp) = json(resp).await;
    assert_eq!(
        (status, envelope(400, &resp)),
        (400, "INVALID_BODY".to_string())
    );

    // The integration endpoint checks client credentials only if present.
    let (status, _) = env
        .post(
            "/api/v2/auth/token",
            &xff,
            &json!({"username":"demo","password":"demo-password","accountType":"b2b","grantType":"password","customerId":"someone-else"}),
        )
        .await;
    assert_eq!(status, 401);

    // Tenant header must be the user's tenant.
    let (status, resp) = env
        .post(
            "/api/v2/auth/sandbox/token",
            &[
                ("X-Forwarded-For", "192.0.2.10"),
                ("X-Tenant-ID", "other-tenant"),
            ],
            &sandbox_body(),
        )
        .await;
    assert_eq!(
        (status, envelope(403, &resp)),
        (403, "TENANT_MISMATCH".to_string())
    );

    // Auth down.
    env.emu.controls().set_auth_down(true);
    let (status, resp) = env
        .post("/api/v2/auth/sandbox/token", &xff, &sandbox_body())
        .await;
    assert_eq!(
        (status, envelope(503, &resp)),
        (503, "SERVICE_UNAVAILABLE".to_string())
    );
    env.emu.controls().set_auth_down(false);
    assert_eq!(env.emu.controls().stats().logins, 1);
}

#[tokio::test]
async fn strict_headers_on_login_and_api() {
    let env = Env::start(|c| c.strict_headers = true).await;
    let (status, resp) = env
        .post(
            "/api/v2/auth/sandbox/token",
            &[("X-Forwarded-For", "192.0.2.10")],
            &sandbox_body(),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(resp["data"]["error"], "MISSING_HEADER");
    let login_headers = [
        ("X-Forwarded-For", "192.0.2.10"),
        ("User-Agent", "finhub-sidecar-test/1.0"),
        ("sec-ch-ua-platform", "Linux"),
        ("X-Tenant-ID", TENANT),
    ];
    let (status, s1) = env
        .post(
            "/api/v2/auth/sandbox/token",
            &login_headers,
            &sandbox_body(),
        )
        .await;
    assert_eq!(status, 200, "{s1}");
    let token = s1["userSessionToken"].as_str().unwrap();

    // The lenient set is not enough any more ...
    let (status, resp) = env.get_api(token).await;
    assert_eq!(
        (status, resp["data"]["field"].as_str()),
        (400, Some("X-Request-ID"))
    );
    // ... the production set is.
    let auth = format!("Bearer {token}");
    let (status, echo) = env
        .api(
            reqwest::Method::GET,
            "/api/v2/x",
            &[
                ("Authorization", &auth),
                ("X-Tenant-ID", TENANT),
                ("X-Activity-ID", "a"),
                ("X-Request-ID", "b"),
                ("X-Session-ID", "c"),
                ("X-Correlation-ID", "d"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{echo}");
}

#[tokio::test]
async fn mtls_required_needs_a_certificate_from_the_ca() {
    let env = Env::start(|c| c.mtls = MtlsMode::Required).await;

    // No certificate: the handshake (or the first request) fails.
    let no_cert = env.client(None, false);
    let r = no_cert
        .post(env.url("/api/v2/auth/sandbox/token"))
        .header("X-Forwarded-For", "192.0.2.10")
        .json(&sandbox_body())
        .send()
        .await;
    match r {
        Err(_) => {}
        Ok(resp) => assert!(resp.status().is_client_error(), "{}", resp.status()),
    }

    // A certificate from another CA is refused as well.
    let other = Pki::new("Other CA").unwrap();
    let foreign = other.client_cert(&ClientCertOpts::default()).unwrap();
    let r = env
        .client(Some(&foreign), false)
        .get(env.url("/api/v2/x"))
        .send()
        .await;
    match r {
        Err(_) => {}
        Ok(resp) => assert!(resp.status().is_client_error(), "{}", resp.status()),
    }
    assert_eq!(
        env.emu.controls().total_requests(),
        0,
        "nothing got through"
    );

    // With the right certificate, over HTTP/1.1 and h2, the echo names it.
    let token = env.token().await;
    for h2 in [false, true] {
        let client = env.client(Some(&env.client), h2);
        let resp = client
            .get(env.url("/api/v2/accounts"))
            .header("Authorization", format!("Bearer {token}"))
            .header("X-Tenant-ID", TENANT)
            .header("X-Activity-ID", "act-1")
            .send()
            .await
            .unwrap();
        let version = resp.version();
        assert_eq!(version == reqwest::Version::HTTP_2, h2);
        let (status, echo) = json(resp).await;
        assert_eq!(status, 200, "{echo}");
        assert_eq!(
            echo["client_cert"]["serial_hex"],
            env.client.serial_hex.as_str()
        );
        assert_eq!(echo["client_cert"]["subject"], env.client.subject.as_str());
        assert_eq!(echo["client_cert"]["subject"], "CN=emu-test-app,O=Test Org");
        assert_eq!(echo["client_cert"]["issuer"], "CN=Emulator Test CA");
        assert!(echo["client_cert"]["not_after_unix"].as_i64().unwrap() > 0);
        let port = env.emu.addr().port();
        assert_eq!(
            echo["headers"]["host"],
            format!("localhost:{port}"),
            "{echo}"
        );
    }
    let seen = env.emu.controls().api_requests();
    assert_eq!(seen.len(), 2);
    assert!(seen
        .iter()
        .all(|r| r.client_cert.as_ref().map(|c| c.serial_hex.as_str())
            == Some(env.client.serial_hex.as_str())));
}

#[tokio::test]
async fn mtls_optional_and_off() {
    let env = Env::start(|_| {}).await;
    let token = env.token().await;
    let auth = format!("Bearer {token}");
    let h = [
        ("Authorization", auth.as_str()),
        ("X-Tenant-ID", TENANT),
        ("X-Activity-ID", "a"),
    ];
    let anonymous = env.client(None, false);
    let mut req = anonymous.get(env.url("/api/v2/x"));
    for (k, v) in h {
        req = req.header(k, v);
    }
    let (status, echo) = json(req.send().await.unwrap()).await;
    assert_eq!(status, 200, "{echo}");
    assert!(echo["client_cert"].is_null());

    let off = Env::start(|c| {
        c.mtls = MtlsMode::Off;
        c.client_ca_pem = None;
    })
    .await;
    let token = off.token().await;
    let (status, echo) = off.get_api(&token).await;
    assert_eq!(status, 200, "{echo}");
    assert!(echo["client_cert"].is_null(), "no certificate requested");

    // Required without a CA is a configuration error.
    let pki = Pki::new("x").unwrap();
    let server = pki.server_cert(&["localhost"], &[]).unwrap();
    let mut cfg = EmulatorConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        server.cert_pem,
        server.key_pem,
    );
    cfg.mtls = MtlsMode::Required;
    assert!(Emulator::start(cfg).await.is_err());
}

#[tokio::test]
async fn echo_validates_the_session_headers() {
    let env = Env::start(|_| {}).await;
    let token = env.token().await;
    let auth = format!("Bearer {token}");
    let get = reqwest::Method::GET;

    // No Authorization / garbage token.
    let (status, body) = env
        .api(
            get.clone(),
            "/api/v2/a",
            &[("X-Tenant-ID", TENANT), ("X-Activity-ID", "a")],
        )
        .await;
    assert_eq!(status, 401);
    envelope(401, &body);
    let (status, body) = env
        .api(
            get.clone(),
            "/api/v2/a",
            &[
                ("Authorization", "Bearer not-a-jwt"),
                ("X-Tenant-ID", TENANT),
                ("X-Activity-ID", "a"),
            ],
        )
        .await;
    assert_eq!(
        (status, envelope(401, &body)),
        (401, "INVALID_TOKEN".to_string())
    );
    // A token signed with another key is unknown too.
    let forged = {
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[2] = "c2lnbmF0dXJl";
        parts.join(".")
    };
    let (status, _) = env.get_api(&forged).await;
    assert_eq!(status, 401);

    // Tenant: missing -> 400, other -> 403.
    let (status, body) = env
        .api(
            get.clone(),
            "/api/v2/a",
            &[("Authorization", &auth), ("X-Activity-ID", "a")],
        )
        .await;
    assert_eq!(
        (status, body["data"]["field"].as_str()),
        (400, Some("X-Tenant-ID"))
    );
    let (status, body) = env
        .api(
            get.clone(),
            "/api/v2/a",
            &[
                ("Authorization", &auth),
                ("X-Tenant-ID", "tenant-other"),
                ("X-Activity-ID", "a"),
            ],
        )
        .await;
    assert_eq!(
        (status, envelope(403, &body)),
        (403, "TENANT_MISMATCH".to_string())
    );

    // Activity id.
    let (status, body) = env
        .api(
            get.clone(),
            "/api/v2/a",
            &[("Authorization", &auth), ("X-Tenant-ID", TENANT)],
        )
        .await;
    assert_eq!(
        (status, body["data"]["field"].as_str()),
        (400, Some("X-Activity-ID"))
    );

    // All good: the echo tells what arrived.
    let (status, echo) = env
        .api(
            reqwest::Method::DELETE,
            "/api/v2/beneficiaries/42?force=true&q=a%20b",
            &[
                ("Authorization", &auth),
                ("X-Tenant-ID", TENANT),
                ("X-Activity-ID", "act-9"),
                ("X-Custom", "one"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["method"], "DELETE");
    assert_eq!(echo["path"], "/api/v2/beneficiaries/42");
    assert_eq!(echo["query"], "force=true&q=a%20b");
    assert_eq!(echo["headers"]["x-custom"], "one");
    assert_eq!(echo["headers"]["x-activity-id"], "act-9");
    assert_eq!(echo["body_len"], 0);
    assert_eq!(echo["tenant"], TENANT);

    let seen = env.emu.controls().api_requests();
    let statuses: Vec<u16> = seen.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![401, 401, 401, 400, 403, 400, 200]);
    let last = seen.last().unwrap();
    assert_eq!(last.method, "DELETE");
    assert_eq!(
        last.path_and_query,
        "/api/v2/beneficiaries/42?force=true&q=a%20b"
    );
    assert_eq!(last.tenant.as_deref(), Some(TENANT));
    assert!(last
        .headers
        .iter()
        .any(|(k, v)| k == "x-custom" && v == "one"));
    assert_eq!(
        seen[4].tenant.as_deref(),
        Some(TENANT),
        "the token's tenant, not the header's"
    );
    let stats = env.emu.controls().stats();
    assert_eq!((stats.api_ok, stats.api_rejected), (1, 6));

    // Unknown paths and wrong methods.
    let (status, body) = env.api(get.clone(), "/nothing/here", &[]).await;
    assert_eq!(
        (status, envelope(404, &body)),
        (404, "NOT_FOUND".to_string())
    );
    let resp = env
        .http
        .get(env.url("/api/v2/auth/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers().get("allow").map(|v| v.to_str().unwrap()),
        Some("POST")
    );
    let (status, body) = json(resp).await;
    assert_eq!(
        (status, envelope(405, &body)),
        (405, "METHOD_NOT_ALLOWED".to_string())
    );
}

#[tokio::test]
async fn refresh_follows_the_ten_percent_rule() {
    let lifetime = Duration::from_secs(3);
    let env = Env::start(|c| c.token_lifetime = lifetime).await;
    let s1 = env.login().await;
    let token = s1["userSessionToken"].as_str().unwrap().to_string();
    let key = claims(&token)["internalTokenKey"]
        .as_str()
        .unwrap()
        .to_string();

    // Plenty of lifetime left: same token, remaining validity.
    let (status, r) = env.refresh(&token, &key).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["userSessionToken"], token.as_str());
    assert!(r["expires_in"].as_u64().unwrap() <= 3);
    assert_eq!(env.emu.controls().stats().refreshes_not_needed, 1);
    assert_eq!(env.emu.controls().stats().refreshes, 0);

    // Wrong key, missing headers, mismatched tokens.
    let (status, body) = env
        .refresh(&token, "00000000-0000-4000-8000-000000000000")
        .await;
    assert_eq!(
        (status, body["data"]["field"].as_str()),
        (401, Some("internalTokenKey"))
    );
    let (status, body) = env
        .post(
            "/api/v2/auth/token/refresh",
            &[
                ("Authorization", &format!("Bearer {token}")),
                ("X-Tenant-ID", TENANT),
                ("X-Session-Active", "true"),
            ],
            &json!({"userSessionToken": token, "internalTokenKey": key}),
        )
        .await;
    assert_eq!(
        (status, body["data"]["field"].as_str()),
        (400, Some("X-User-Session-Token"))
    );
    let other = env.token().await;
    let (status, _) = env
        .post(
            "/api/v2/auth/token/refresh",
            &[
                ("Authorization", &format!("Bearer {token}")),
                ("X-User-Session-Token", &token),
                ("X-Tenant-ID", TENANT),
                ("X-Session-Active", "true"),
            ],
            &json!({"userSessionToken": other, "internalTokenKey": key}),
        )
        .await;
    assert_eq!(status, 403);

    // Wait (polling) until at least 90 % of the lifetime has surely passed, then refresh until
    // a new token comes back; it must come back before the old one expires.
    // The token is valid until its whole-second `exp`, so the window opens 10 % of the
    // lifetime before that.
    let exp = std::time::UNIX_EPOCH
        + Duration::from_secs(claims(&token)["exp"].as_u64().expect("exp claim"));
    let window_opens = exp - lifetime.mul_f64(0.1) + Duration::from_millis(20);
    while std::time::SystemTime::now() < window_opens {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + DEADLINE;
    let renewed = loop {
        let (status, r) = env.refresh(&token, &key).await;
        assert_eq!(status, 200, "refresh inside the window: {r}");
        if r["userSessionToken"] != token.as_str() {
            break r;
        }
        assert!(Instant::now() < deadline, "never renewed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(whole_seconds_left(&renewed["expires_in"], 3), "{renewed}");
    let new_token = renewed["userSessionToken"].as_str().unwrap();
    let new_claims = claims(new_token);
    assert_ne!(new_claims["jti"], claims(&token)["jti"]);
    assert_ne!(new_claims["internalTokenKey"].as_str().unwrap(), key);
    assert_eq!(env.emu.controls().stats().refreshes, 1);
    let (status, _) = env.get_api(new_token).await;
    assert_eq!(status, 200);

    // The refresh answer has the login's shape (S4 here).
    env.emu.controls().set_response_shape(ResponseShape::S4);
    let new_key = new_claims["internalTokenKey"].as_str().unwrap();
    let (status, r) = env.refresh(new_token, new_key).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["data"]["userSessionToken"], new_token);

    // Auth down covers refresh.
    env.emu.controls().set_auth_down(true);
    assert_eq!(env.refresh(new_token, new_key).await.0, 503);
}

#[tokio::test]
async fn revoked_sessions_and_logout_get_401() {
    let env = Env::start(|_| {}).await;
    let a = env.token().await;
    let b = env.token().await;
    assert_eq!(env.get_api(&a).await.0, 200);

    // Logout revokes one session.
    let (status, body) = env
        .post(
            "/api/v2/auth/logout",
            &[("X-Forwarded-For", "192.0.2.10")],
            &json!({"userSessionToken": a}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"cleared": true, "message": "Session cleared successfully", "success": true})
    );
    let (status, body) = env.get_api(&a).await;
    assert_eq!(
        (status, envelope(401, &body)),
        (401, "SESSION_REVOKED".to_string())
    );
    assert_eq!(env.get_api(&b).await.0, 200);

    // revoke_all_sessions: every token so far, for the API and refresh.
    env.emu.controls().revoke_all_sessions();
    assert_eq!(env.get_api(&b).await.0, 401);
    let key = claims(&b)["internalTokenKey"].as_str().unwrap().to_string();
    assert_eq!(env.refresh(&b, &key).await.0, 401);
    // A new login works again.
    let c = env.token().await;
    assert_eq!(env.get_api(&c).await.0, 200);
}

#[tokio::test]
async fn answer_429_with_retry_after() {
    let env = Env::start(|_| {}).await;
    let token = env.token().await;
    env.emu.controls().answer_429(2, Some(7));
    for _ in 0..2 {
        let resp = env
            .http
            .post(env.url("/api/v2/auth/sandbox/token"))
            .header("X-Forwarded-For", "192.0.2.10")
            .json(&sandbox_body())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers().get("retry-after").unwrap(), "7");
        let (_, body) = json(resp).await;
        assert_eq!(envelope(429, &body), "RATE_LIMITED");
    }
    env.login().await;

    // On the API too, recorded; without Retry-After when none was asked for.
    env.emu.controls().answer_429(1, None);
    let auth = format!("Bearer {token}");
    let resp = env
        .http
        .get(env.url("/api/v2/x"))
        .header("Authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("retry-after").is_none());
    assert_eq!(env.get_api(&token).await.0, 200);
    let statuses: Vec<u16> = env
        .emu
        .controls()
        .api_requests()
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![429, 200]);
    assert_eq!(env.emu.controls().total_requests(), 6);
}

#[tokio::test]
async fn an_expired_token_gets_401_and_is_counted() {
    let env = Env::start(|c| c.token_lifetime = Duration::from_secs(1)).await;
    let token = env.token().await;
    let deadline = Instant::now() + DEADLINE;
    let body = loop {
        let (status, body) = env.get_api(&token).await;
        if status == 401 {
            break body;
        }
        assert_eq!(status, 200, "{body}");
        assert!(Instant::now() < deadline, "token never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(envelope(401, &body), "TOKEN_EXPIRED");
    assert_eq!(body["message"], "access token has expired");
    assert_eq!(env.emu.controls().stats().expired_token_seen, 1);
    // Refreshing an expired token is refused too (and counted).
    let key = claims(&token)["internalTokenKey"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(env.refresh(&token, &key).await.0, 401);
    assert_eq!(env.emu.controls().stats().expired_token_seen, 2);

    // set_token_lifetime applies to new tokens.
    env.emu
        .controls()
        .set_token_lifetime(Duration::from_secs(600));
    let s1 = env.login().await;
    assert!(whole_seconds_left(&s1["expires_in"], 600), "{s1}");
}

#[tokio::test]
async fn large_bodies_are_counted_exactly() {
    let env = Env::start(|_| {}).await;
    let token = env.token().await;
    let size = 5 * 1024 * 1024;
    for h2 in [false, true] {
        let client = env.client(Some(&env.client), h2);
        let resp = client
            .post(env.url("/api/v2/documents"))
            .header("Authorization", format!("Bearer {token}"))
            .header("X-Tenant-ID", TENANT)
            .header("X-Activity-ID", "upload")
            .body(vec![0x5a_u8; size])
            .send()
            .await
            .unwrap();
        let (status, echo) = json(resp).await;
        assert_eq!(status, 200, "{echo}");
        assert_eq!(echo["body_len"], size as u64);
    }
    // A rejected upload is drained and counted as well.
    let resp = env
        .http
        .put(env.url("/api/v2/documents"))
        .body(vec![1u8; 123_457])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let seen = env.emu.controls().api_requests();
    let lens: Vec<u64> = seen.iter().map(|r| r.body_len).collect();
    assert_eq!(lens, vec![size as u64, size as u64, 123_457]);
}

#[tokio::test]
async fn delay_and_shutdown() {
    let env = Env::start(|_| {}).await;
    env.emu.controls().set_delay(Duration::from_millis(300));
    let started = Instant::now();
    let (status, _) = env.api(reqwest::Method::GET, "/nope", &[]).await;
    assert_eq!(status, 404);
    assert!(started.elapsed() >= Duration::from_millis(300));
    env.emu.controls().set_delay(Duration::ZERO);

    // After shutdown, new connections are refused.
    let addr = env.emu.addr();
    env.emu.shutdown();
    let deadline = Instant::now() + DEADLINE;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fresh = env.client(Some(&env.client), false);
    assert!(fresh.get(env.url("/api/v2/x")).send().await.is_err());
}

/// Unix seconds of an HTTP `Date` header.
fn date_secs(resp: &reqwest::Response) -> u64 {
    let date = resp
        .headers()
        .get("date")
        .expect("every answer has a Date")
        .to_str()
        .unwrap();
    httpdate::parse_http_date(date)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn real_now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test]
async fn times_are_whole_seconds_on_the_emulators_own_clock() {
    for offset_ms in [0i64, 7_000, -7_000] {
        let env = Env::start(|c| {
            c.token_lifetime = Duration::from_secs(60);
            c.clock_offset_ms = offset_ms;
        })
        .await;
        let before = real_now_secs();
        let resp = env
            .http
            .post(env.url("/api/v2/auth/sandbox/token"))
            .header("X-Forwarded-For", "192.0.2.10")
            .json(&sandbox_body())
            .send()
            .await
            .unwrap();
        let after = real_now_secs();
        let date = date_secs(&resp);
        let (status, s1) = json(resp).await;
        assert_eq!(status, 200, "{s1}");
        let shift = offset_ms as f64 / 1000.0;
        // Date and iat are read from the shifted clock, whole seconds.
        let date = date as f64;
        assert!(
            date >= (before + shift).floor() && date <= after + shift,
            "Date {date} on a clock shifted by {shift} s (real {before}..{after})"
        );
        let c = claims(s1["userSessionToken"].as_str().unwrap());
        let (iat, exp) = (c["iat"].as_u64().unwrap(), c["exp"].as_u64().unwrap());
        assert_eq!(exp - iat, 60);
        assert!(iat as f64 <= date && iat as f64 >= (before + shift).floor());
        // expires_in: whole seconds left when the answer was made (Date's second).
        let left = s1["expires_in"].as_u64().unwrap();
        assert!(
            left + 1 + date as u64 == exp || left + date as u64 == exp,
            "expires_in {left}, exp {exp}, Date {date}"
        );
        // The "not refreshed" answer reports the validity left the same way.
        let token = s1["userSessionToken"].as_str().unwrap();
        let key = c["internalTokenKey"].as_str().unwrap();
        let resp = env
            .http
            .post(env.url("/api/v2/auth/token/refresh"))
            .header("Authorization", format!("Bearer {token}"))
            .header("X-User-Session-Token", token)
            .header("X-Tenant-ID", TENANT)
            .header("X-Session-Active", "true")
            .json(&json!({"userSessionToken": token, "internalTokenKey": key}))
            .send()
            .await
            .unwrap();
        let date = date_secs(&resp);
        let (status, r) = json(resp).await;
        assert_eq!(status, 200, "{r}");
        assert_eq!(
            r["userSessionToken"], token,
            "more than 10 % left: not refreshed"
        );
        let left = r["expires_in"].as_u64().unwrap();
        assert!(
            left + 1 + date == exp || left + date == exp,
            "{left} {exp} {date}"
        );
        // The API accepts the token: its validity is judged on the same clock.
        assert_eq!(env.get_api(token).await.0, 200);
    }
}

#[tokio::test]
async fn a_token_expires_by_the_emulators_clock() {
    // Issued on a clock 5 s behind, a 2 s token is already expired when the clock catches up.
    let env = Env::start(|c| {
        c.token_lifetime = Duration::from_secs(2);
        c.clock_offset_ms = -5_000;
    })
    .await;
    let token = env.token().await;
    assert_eq!(env.get_api(&token).await.0, 200);
    env.emu.controls().set_clock_offset_ms(0);
    let (status, body) = env.get_api(&token).await;
    assert_eq!(
        (status, envelope(401, &body)),
        (401, "TOKEN_EXPIRED".into())
    );
}

#[tokio::test]
async fn logout_has_the_documented_shape_revokes_and_is_counted() {
    let env = Env::start(|_| {}).await;
    let token = env.token().await;
    let logout = |headers: &'static [(&'static str, &'static str)], body: Value| {
        let env = &env;
        async move { env.post("/api/v2/auth/logout", headers, &body).await }
    };
    // X-Forwarded-For and userSessionToken are required.
    let (status, body) = logout(&[], json!({"userSessionToken": token})).await;
    assert_eq!(
        (status, body["data"]["field"].as_str()),
        (400, Some("X-Forwarded-For"))
    );
    let (status, body) = logout(&[("X-Forwarded-For", "192.0.2.10")], json!({})).await;
    assert_eq!(
        (status, body["data"]["field"].as_str()),
        (400, Some("userSessionToken"))
    );
    // Auth down covers logout.
    env.emu.controls().set_auth_down(true);
    let (status, _) = logout(
        &[("X-Forwarded-For", "192.0.2.10")],
        json!({"userSessionToken": token}),
    )
    .await;
    assert_eq!(status, 503);
    env.emu.controls().set_auth_down(false);
    assert_eq!(env.emu.controls().stats().logouts, 0);

    let (status, body) = logout(
        &[("X-Forwarded-For", "192.0.2.10")],
        json!({"userSessionToken": token}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"cleared": true, "message": "Session cleared successfully", "success": true})
    );
    assert_eq!(env.get_api(&token).await.0, 401, "revoked");
    // A second logout of the same session clears nothing.
    let (status, body) = logout(
        &[("X-Forwarded-For", "192.0.2.10")],
        json!({"userSessionToken": token}),
    )
    .await;
    assert_eq!((status, body["cleared"].as_bool()), (200, Some(false)));
    let stats = env.emu.controls().stats();
    assert_eq!(stats.logouts, 1);
    // One login and five logout calls (the refused ones included).
    assert_eq!(stats.auth_requests, 6);
    let records = env.emu.controls().logouts();
    assert_eq!(records.len(), 2, "refused calls are not logouts");
    assert_eq!(records[0].tenant.as_deref(), Some(TENANT));
    assert!(records[0].cleared && !records[1].cleared);
}
