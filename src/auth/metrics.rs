//! Auth's metrics: calls to FinHub's auth endpoints by outcome, each tenant's session expiry,
//! and the estimate of FinHub's clock offset. Built by [`AuthMetrics::register`]; labels are
//! typed ([`AuthCall`], [`AuthResult`]), so call sites never write label strings.

use prometheus::{Gauge, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::client::AuthError;

/// The `kind` label of `finhub_sidecar_auth_requests_total`: which endpoint was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthCall {
    /// A login with the tenant's credentials.
    Login,
    /// A refresh of the current session.
    Refresh,
    /// A logout at graceful shutdown.
    Logout,
}

impl AuthCall {
    /// Every value, in label order.
    pub const ALL: [AuthCall; 3] = [AuthCall::Login, AuthCall::Refresh, AuthCall::Logout];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthCall::Login => "login",
            AuthCall::Refresh => "refresh",
            AuthCall::Logout => "logout",
        }
    }

    /// The results a call of this kind can have, to create its series at 0.
    pub fn results(self) -> [AuthResult; 5] {
        match self {
            AuthCall::Login | AuthCall::Refresh => [
                AuthResult::Ok,
                AuthResult::NotRefreshed,
                AuthResult::Rejected,
                AuthResult::RateLimited,
                AuthResult::Error,
            ],
            AuthCall::Logout => [
                AuthResult::Ok,
                AuthResult::Rejected,
                AuthResult::RateLimited,
                AuthResult::Error,
                AuthResult::Timeout,
            ],
        }
    }
}

/// The `result` label of `finhub_sidecar_auth_requests_total` (also the tenant's last result
/// in `/status` and the outcome of the call's span).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthResult {
    /// FinHub answered with a session (or cleared it, for a logout).
    Ok,
    /// The refresh endpoint answered that the token is not refreshed yet.
    NotRefreshed,
    /// FinHub refused the credentials or the refresh token.
    Rejected,
    /// FinHub asked to slow down.
    RateLimited,
    /// Any other failure (dial, TLS, answer).
    Error,
    /// A logout did not finish within `auth.logout_timeout`.
    Timeout,
}

impl AuthResult {
    /// Every value, in label order.
    pub const ALL: [AuthResult; 6] = [
        AuthResult::Ok,
        AuthResult::NotRefreshed,
        AuthResult::Rejected,
        AuthResult::RateLimited,
        AuthResult::Error,
        AuthResult::Timeout,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthResult::Ok => "ok",
            AuthResult::NotRefreshed => "not_refreshed",
            AuthResult::Rejected => "rejected",
            AuthResult::RateLimited => "rate_limited",
            AuthResult::Error => "error",
            AuthResult::Timeout => "timeout",
        }
    }

    /// The result of a call that failed with `e`.
    pub fn of_error(e: &AuthError) -> AuthResult {
        match e {
            AuthError::Rejected(_) | AuthError::NotRefreshable => AuthResult::Rejected,
            AuthError::RateLimited { .. } => AuthResult::RateLimited,
            _ => AuthResult::Error,
        }
    }
}

/// Auth metric handles; cheap to clone.
#[derive(Clone)]
pub struct AuthMetrics {
    /// `finhub_sidecar_session_expiration_timestamp_seconds{tenant}`: expiry of the tenant's
    /// current FinHub session.
    expiration: IntGaugeVec,
    /// `finhub_sidecar_auth_requests_total{tenant,kind="login|refresh|logout",result}`: calls
    /// to FinHub's auth endpoints by outcome ([`AuthCall`], [`AuthResult`]).
    requests: IntCounterVec,
    /// `finhub_sidecar_finhub_clock_offset_seconds`: estimated offset of FinHub's clock from
    /// ours (positive: FinHub ahead), from its `Date` headers; 0 until the first answer.
    clock_offset: Gauge,
}

impl AuthMetrics {
    /// Creates the auth metrics in `registry` (per-tenant series: [`AuthMetrics::init_tenant`]).
    pub fn register(registry: &Registry) -> AuthMetrics {
        // Each definition is static and each name is registered once per registry.
        let expiration = IntGaugeVec::new(
            Opts::new(
                "finhub_sidecar_session_expiration_timestamp_seconds",
                "Expiry of the tenant's current FinHub session, Unix seconds",
            ),
            &["tenant"],
        )
        .expect("static metric definition is valid");
        let requests = IntCounterVec::new(
            Opts::new(
                "finhub_sidecar_auth_requests_total",
                "Calls to FinHub's login and refresh endpoints by outcome",
            ),
            &["tenant", "kind", "result"],
        )
        .expect("static metric definition is valid");
        let clock_offset = Gauge::new(
            "finhub_sidecar_finhub_clock_offset_seconds",
            "Estimated offset of FinHub's clock from the sidecar's (positive: FinHub ahead), from its Date headers",
        )
        .expect("static metric definition is valid");
        crate::registry::register_all(
            registry,
            [
                Box::new(expiration.clone()) as Box<dyn prometheus::core::Collector>,
                Box::new(requests.clone()),
                Box::new(clock_offset.clone()),
            ],
        );
        AuthMetrics {
            expiration,
            requests,
            clock_offset,
        }
    }

    /// Creates every per-tenant call series at 0, so a first failure is visible to
    /// `increase()`.
    pub fn init_tenant(&self, tenant: &str) {
        for call in AuthCall::ALL {
            for result in call.results() {
                self.requests
                    .with_label_values(&[tenant, call.as_str(), result.as_str()]);
            }
        }
    }

    /// Counts one call of `tenant`'s to the `call` endpoint that ended with `result`.
    pub fn called(&self, tenant: &str, call: AuthCall, result: AuthResult) {
        self.requests
            .with_label_values(&[tenant, call.as_str(), result.as_str()])
            .inc();
    }

    /// Sets `tenant`'s session expiry (Unix seconds).
    pub fn expires(&self, tenant: &str, unix_secs: i64) {
        self.expiration.with_label_values(&[tenant]).set(unix_secs);
    }

    /// The clock offset gauge, for [`crate::auth::clock::ClockOffset::set_gauge`].
    pub fn clock_offset(&self) -> Gauge {
        self.clock_offset.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(registry: &Registry) -> String {
        String::from_utf8(crate::registry::text(registry)).unwrap()
    }

    #[test]
    fn a_tenants_call_series_start_at_zero() {
        let registry = Registry::new();
        let m = AuthMetrics::register(&registry);
        m.init_tenant("t1");
        m.called("t1", AuthCall::Refresh, AuthResult::NotRefreshed);
        let text = render(&registry);
        for line in [
            r#"finhub_sidecar_auth_requests_total{kind="refresh",result="not_refreshed",tenant="t1"} 1"#,
            r#"finhub_sidecar_auth_requests_total{kind="login",result="not_refreshed",tenant="t1"} 0"#,
            r#"finhub_sidecar_auth_requests_total{kind="login",result="error",tenant="t1"} 0"#,
            r#"finhub_sidecar_auth_requests_total{kind="logout",result="timeout",tenant="t1"} 0"#,
            r#"finhub_sidecar_auth_requests_total{kind="logout",result="rate_limited",tenant="t1"} 0"#,
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        // A logout is never "not refreshed", a login never times out.
        assert!(
            !text.contains(r#"kind="logout",result="not_refreshed""#),
            "{text}"
        );
        assert!(!text.contains(r#"kind="login",result="timeout""#), "{text}");
    }

    #[test]
    fn each_result_has_its_label() {
        let labels: Vec<&str> = AuthResult::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "ok",
                "not_refreshed",
                "rejected",
                "rate_limited",
                "error",
                "timeout"
            ]
        );
    }
}
