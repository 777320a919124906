//! `[auth]`: the login flavour, the auth endpoints and the session's renewal settings.

use std::time::Duration;

use serde::Deserialize;

use super::convert::{secs, Convert};
use super::session_store::{FileSessionStore, FileShared, SessionStore};
use super::Environment;

/// Pingora keeps at most 64 KiB of a request body for retries.
const MAX_REPLAY_BODY: usize = 64 * 1024;

/// Login and session settings.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Which FinHub environment this is.
    pub environment: Environment,
    /// Login endpoint path.
    pub login_path: String,
    /// Refresh endpoint path.
    pub refresh_path: String,
    /// `accountType` sent verbatim (A11).
    pub account_type: String,
    /// `grantType` for the `/api/v2/auth/token` flavour.
    pub grant_type: String,
    /// Fraction of the token lifetime after which it is renewed (A4).
    pub refresh_at: f64,
    /// Timeout of one login or refresh call.
    pub request_timeout: Duration,
    /// Request bodies up to this size are kept to replay after a 401 (at most 64 KiB).
    pub replay_body_limit: usize,
    /// Logout endpoint path.
    pub logout_path: String,
    /// The least wait after a failed login or refresh (a floor: jitter goes above it); while a
    /// tenant has no usable session, retries come every interval plus up to a quarter of it.
    pub recovery_interval: Duration,
    /// End each tenant's session with FinHub's logout during a graceful shutdown.
    pub logout_on_shutdown: bool,
    /// Bound on the whole logout at shutdown (all tenants together).
    pub logout_timeout: Duration,
    /// Where the sessions live: this process, or Redis shared by the fleet.
    pub session_store: SessionStore,
}

impl AuthConfig {
    /// How long a request refused with 401 waits for the renewed session before it is
    /// answered without a replay: a forced renewal (a refresh, then a login) plus a second;
    /// with a shared store, plus the follower's wait for the owner (`follow_timeout`), after
    /// which it renews on its own.
    pub fn replay_wait(&self) -> Duration {
        let follow = match &self.session_store {
            SessionStore::Redis(s) => s.follow_timeout,
            SessionStore::Local => Duration::ZERO,
        };
        follow + self.request_timeout * 2 + Duration::from_secs(1)
    }
}

/// `[auth]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAuth {
    /// `playground`, `sandbox`, `integration` or `production`.
    environment: Environment,
    /// Login path; default per environment.
    login_path: Option<String>,
    /// Refresh path; default `/api/v2/auth/token/refresh`.
    refresh_path: Option<String>,
    /// `accountType` sent verbatim; default `B2B`.
    account_type: Option<String>,
    /// `grantType`; default `password`.
    grant_type: Option<String>,
    /// Renew after this fraction of the lifetime; default 0.92, range 0.5–0.97.
    refresh_at: Option<f64>,
    /// Timeout for one login/refresh call; default 10 s.
    request_timeout: Option<String>,
    /// Replay a request once after a 401 if its body is at most this many bytes; default and
    /// maximum 65536 (Pingora's retry buffer). 0 disables replays of requests with a body.
    replay_body_limit: Option<usize>,
    /// Logout path; default `/api/v2/auth/logout`.
    logout_path: Option<String>,
    /// The least wait after a failed login or refresh (jitter above it, `Retry-After`
    /// honoured); while a tenant has no usable session, retries come about this often;
    /// default 3 s, range 1–60 s.
    recovery_interval: Option<String>,
    /// Log each tenant's session out during a graceful shutdown; default true.
    logout_on_shutdown: Option<bool>,
    /// Bound on the logout at shutdown, all tenants together; default 2 s, at most 30 s.
    logout_timeout: Option<String>,
    /// `local` (default: each replica logs in and renews on its own) or `redis` (one session
    /// per tenant shared by every replica using the same Redis and key prefix; `[auth.shared]`).
    session_store: Option<FileSessionStore>,
    /// `[auth.shared]`: the shared session store; required with `session_store = "redis"`.
    shared: Option<FileShared>,
}

impl Convert<'_> {
    /// `[auth]`.
    pub(super) fn auth(&mut self, a: FileAuth) -> Option<AuthConfig> {
        let env = a.environment;
        let login_path = a
            .login_path
            .unwrap_or_else(|| env.rules().default_login_path.to_string());
        let refresh_path = a
            .refresh_path
            .unwrap_or_else(|| "/api/v2/auth/token/refresh".to_string());
        let logout_path = a
            .logout_path
            .unwrap_or_else(|| "/api/v2/auth/logout".to_string());
        for (key, p) in [
            ("auth.login_path", &login_path),
            ("auth.refresh_path", &refresh_path),
            ("auth.logout_path", &logout_path),
        ] {
            if !p.starts_with('/') || p.contains(char::is_whitespace) {
                self.err(
                    key,
                    format!("`{p}` must be an absolute path starting with /"),
                );
            }
        }
        let refresh_at = a.refresh_at.unwrap_or(0.92);
        if !(0.5..=0.97).contains(&refresh_at) {
            self.err(
                "auth.refresh_at",
                format!(
                    "{refresh_at} is outside 0.5–0.97 (FinHub only refreshes in the last 10 %)"
                ),
            );
        }
        let request_timeout = self.duration(
            "auth.request_timeout",
            a.request_timeout.as_deref(),
            secs(10),
        );
        let replay_body_limit = a.replay_body_limit.unwrap_or(MAX_REPLAY_BODY);
        if replay_body_limit > MAX_REPLAY_BODY {
            self.err(
                "auth.replay_body_limit",
                format!("{replay_body_limit} exceeds {MAX_REPLAY_BODY} (the proxy's retry buffer)"),
            );
        }
        let recovery_interval = self.duration(
            "auth.recovery_interval",
            a.recovery_interval.as_deref(),
            secs(3),
        );
        if !(secs(1)..=secs(60)).contains(&recovery_interval) {
            self.err(
                "auth.recovery_interval",
                "must be between 1s and 60s (apps fail until the session is back)",
            );
        }
        let logout_timeout =
            self.duration("auth.logout_timeout", a.logout_timeout.as_deref(), secs(2));
        if logout_timeout > secs(30) {
            self.err(
                "auth.logout_timeout",
                "must be at most 30s (it delays the process exit)",
            );
        }
        let session_store = self.session_store(a.session_store, a.shared, request_timeout);
        Some(AuthConfig {
            session_store,
            environment: env,
            replay_body_limit,
            login_path,
            refresh_path,
            logout_path,
            recovery_interval,
            logout_on_shutdown: a.logout_on_shutdown.unwrap_or(true),
            logout_timeout,
            account_type: a.account_type.unwrap_or_else(|| "B2B".into()),
            grant_type: a.grant_type.unwrap_or_else(|| "password".into()),
            refresh_at,
            request_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::*;

    #[test]
    fn session_continuity_keys_have_defaults_and_bounds() {
        let c = load(MINIMAL).expect("valid");
        assert_eq!(c.auth.recovery_interval, Duration::from_secs(3));
        assert!(c.auth.logout_on_shutdown);
        assert_eq!(c.auth.logout_timeout, Duration::from_secs(2));
        assert_eq!(c.auth.logout_path, "/api/v2/auth/logout");
        let c = load(&MINIMAL.replace(
            "[auth]",
            "[auth]\nrecovery_interval = \"5s\"\nlogout_on_shutdown = false\nlogout_timeout = \"500ms\"\nlogout_path = \"/v2/logout\"",
        ))
        .expect("valid");
        assert_eq!(c.auth.recovery_interval, Duration::from_secs(5));
        assert!(!c.auth.logout_on_shutdown);
        assert_eq!(c.auth.logout_timeout, Duration::from_millis(500));
        assert_eq!(c.auth.logout_path, "/v2/logout");
        for (line, key) in [
            ("recovery_interval = \"200ms\"", "auth.recovery_interval"),
            ("recovery_interval = \"5m\"", "auth.recovery_interval"),
            ("recovery_interval = \"often\"", "auth.recovery_interval"),
            ("logout_timeout = \"0s\"", "auth.logout_timeout"),
            ("logout_timeout = \"1m\"", "auth.logout_timeout"),
            ("logout_on_shutdown = \"yes\"", "auth.logout_on_shutdown"),
            ("logout_path = \"logout\"", "auth.logout_path"),
        ] {
            let e = load(&MINIMAL.replace("[auth]", &format!("[auth]\n{line}"))).unwrap_err();
            assert_eq!(e.0[0].key, key, "{line}: {e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("/etc/finhub/proxy.toml: {key}:")),
                "{e}"
            );
        }
    }
}
