//! The refusal table: each [`ProxyError`] with its status, stable code and metric [`Outcome`].

use bytes::Bytes;

use crate::request_path::PathError;

/// Why a TLS handshake with FinHub failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// FinHub's certificate is not signed by a trusted CA.
    UnknownCa,
    /// FinHub's certificate does not name the host we connected to.
    NameMismatch,
    /// FinHub's certificate is expired or not yet valid.
    ServerCertExpired,
    /// FinHub refused our client certificate (or wanted one).
    ClientCertRejected,
    /// Anything else.
    Other,
}

/// A request the sidecar answers itself instead of (or after failing at) forwarding it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The TCP peer is not in `policy.allowed_clients`.
    #[error("client address is not allowed to use this proxy")]
    ClientNotAllowed,
    /// An absolute-form request named a host that is not a FinHub host.
    #[error("destination host `{0}` is not a configured FinHub host; this is not an open proxy")]
    DestinationNotAllowed(String),
    /// `CONNECT` (an HTTPS_PROXY client): the sidecar must see requests to add the session.
    #[error("CONNECT is not supported: send plain HTTP to the sidecar (base URL or HTTP_PROXY), it adds TLS itself")]
    ConnectNotSupported,
    /// The request target could not be understood unambiguously.
    #[error("request target is malformed or ambiguous")]
    BadTarget,
    /// A trusted forwarder sent an `X-Forwarded-For` that is not exactly one IP address.
    #[error("X-Forwarded-For must be exactly one valid IPv4 or IPv6 address")]
    InvalidForwardedFor,
    /// A header the sidecar interprets has a malformed value.
    #[error("header `{0}` has a malformed value")]
    InvalidHeader(&'static str),
    /// The request's header block is larger than `policy.max_header_bytes`.
    #[error("request headers are too large")]
    HeadersTooLarge,
    /// The request's header block did not arrive whole within `listener.header_timeout`.
    #[error("the request header did not arrive in time")]
    HeaderTimeout,
    /// The request body did not arrive whole within `listener.body_timeout`.
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    /// The path belongs to FinHub's auth and session surface, which only the sidecar uses.
    #[error("this path belongs to the FinHub auth and session surface, which the sidecar owns; apps never log in, refresh or log out")]
    ReservedPath,
    /// The path is not in canonical form (dot or empty segments, needless or separator
    /// percent-encoding, control bytes), so servers could read it differently.
    #[error(transparent)]
    InvalidPath(#[from] PathError),
    /// `TRACE` / `TRACK`: they would reflect the sidecar's credentials back to the app.
    #[error("method is not allowed through the sidecar")]
    MethodNotAllowed,
    /// `Upgrade` (WebSocket, h2c): a tunnel would bypass every rule for its later bytes.
    #[error("protocol upgrades (WebSocket, h2c) are not supported; send plain HTTP/1.1 requests")]
    UpgradeNotSupported,
    /// More app connections are open than `listener.max_connections`.
    #[error("too many connections to the sidecar; retry shortly")]
    TooManyConnections,
    /// The tenant's rate limit (or FinHub's own 429 hold) refuses the request.
    #[error("rate limit exceeded for this tenant; retry after the indicated seconds")]
    RateLimited {
        /// Seconds until a request would be accepted.
        retry_after_secs: u64,
    },
    /// The shared rate limiter (Redis) cannot decide and `on_redis_error = "deny"`.
    #[error("the shared rate limiter is unavailable; retry shortly")]
    RateLimitUnavailable,
    /// `X-Tenant-ID` names a tenant the sidecar has no session for.
    #[error("tenant `{0}` is not configured in this sidecar")]
    UnknownTenant(String),
    /// The tenant has no valid FinHub session right now.
    #[error("no valid FinHub session for this tenant yet; retry shortly")]
    SessionUnavailable {
        /// Seconds the client should wait.
        retry_after_secs: u64,
    },
    /// FinHub's address could not be resolved yet.
    #[error("FinHub upstream address is not resolved yet")]
    UpstreamUnresolved,
    /// The TLS handshake with FinHub failed.
    #[error("{}", tls_message(*.0))]
    UpstreamTls(TlsFailure),
    /// FinHub could not be reached.
    #[error("FinHub upstream could not be reached")]
    UpstreamUnreachable,
    /// The egress proxy (`upstream.egress_proxy`) could not be reached.
    #[error("the egress proxy to FinHub could not be reached")]
    EgressProxyUnreachable,
    /// The egress proxy answered the CONNECT with this non-2xx status (407: its credentials,
    /// 403: its policy, 502/503: it could not reach FinHub).
    #[error("the egress proxy refused the tunnel to FinHub (HTTP {0})")]
    EgressProxyRefused(u16),
    /// The egress proxy's answer to the CONNECT was malformed, or it closed without one.
    #[error("the egress proxy to FinHub sent a malformed answer")]
    EgressProxyMalformed,
    /// The egress proxy did not answer the CONNECT in time.
    #[error("the egress proxy to FinHub did not answer in time")]
    EgressProxyTimeout,
    /// FinHub did not answer in time.
    #[error("FinHub upstream did not answer in time")]
    UpstreamTimeout,
    /// FinHub broke the exchange (reset, malformed answer).
    #[error("FinHub upstream connection failed")]
    UpstreamFailed,
    /// A request that changes state was sent and no answer came back (reset or timeout), and
    /// it was not (or no longer) retried: FinHub may have executed it. Sending it again with
    /// the answer's `X-Idempotency-Key` cannot execute it twice.
    #[error("FinHub did not answer and may have executed the request; retry it with the same X-Idempotency-Key")]
    UpstreamOutcomeUnknown {
        /// No answer within `upstream.read_timeout` (504), rather than a broken connection (502).
        timed_out: bool,
    },
    /// `Expect` asks for something other than a single `100-continue`.
    #[error("the only expectation the sidecar meets is Expect: 100-continue")]
    ExpectationFailed,
    /// The app's request was malformed (unparsable header, conflicting framing, broken body).
    #[error("malformed HTTP request")]
    InvalidRequest,
    /// A bug or unexpected state in the sidecar.
    #[error("internal sidecar error")]
    Internal,
}

fn tls_message(f: TlsFailure) -> &'static str {
    match f {
        TlsFailure::UnknownCa => {
            "TLS to FinHub failed: the server certificate is not signed by a trusted CA (check upstream.ca_file)"
        }
        TlsFailure::NameMismatch => {
            "TLS to FinHub failed: the server certificate does not match the upstream host name"
        }
        TlsFailure::ServerCertExpired => {
            "TLS to FinHub failed: the server certificate is expired or not yet valid"
        }
        TlsFailure::ClientCertRejected => {
            "TLS to FinHub failed: FinHub refused the client certificate"
        }
        TlsFailure::Other => "TLS to FinHub failed",
    }
}

/// How a refusal is answered and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// HTTP status.
    pub status: u16,
    /// The JSON `error` code.
    pub code: &'static str,
    /// The `decision` metric label.
    pub outcome: Outcome,
}

fn tls_code(f: TlsFailure) -> &'static str {
    match f {
        TlsFailure::UnknownCa => "upstream_tls_unknown_ca",
        TlsFailure::NameMismatch => "upstream_tls_name_mismatch",
        TlsFailure::ServerCertExpired => "upstream_tls_server_cert_invalid",
        TlsFailure::ClientCertRejected => "upstream_tls_client_cert_rejected",
        TlsFailure::Other => "upstream_tls_failed",
    }
}

/// The `decision` label of `finhub_sidecar_requests_total` and the audit line: `allow`, or why
/// the sidecar answered itself. Each refusal maps to one ([`ProxyError::meta`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded to FinHub.
    Allow,
    /// The TCP peer is not allowed.
    DenyClient,
    /// An absolute-form target named a foreign host.
    DenyDestination,
    /// The auth and session surface.
    DenyReserved,
    /// A malformed or refused request (method, upgrade, path, header, body).
    BadRequest,
    /// A trusted forwarder's `X-Forwarded-For` is unusable.
    InvalidForwardedFor,
    /// A bucket or FinHub's 429 hold refused it.
    RateLimited,
    /// The shared limiter could not decide.
    RateLimitUnavailable,
    /// `X-Tenant-ID` names no tenant.
    UnknownTenant,
    /// No usable session.
    SessionUnavailable,
    /// FinHub could not be reached or broke the exchange.
    UpstreamError,
    /// FinHub did not answer in time.
    UpstreamTimeout,
    /// A sidecar bug.
    InternalError,
    /// The connection cap refused it.
    TooManyConnections,
}

impl Outcome {
    /// Every outcome, in label order (the index of each is its metric cell).
    pub const ALL: [Outcome; 14] = [
        Outcome::Allow,
        Outcome::DenyClient,
        Outcome::DenyDestination,
        Outcome::DenyReserved,
        Outcome::BadRequest,
        Outcome::InvalidForwardedFor,
        Outcome::RateLimited,
        Outcome::RateLimitUnavailable,
        Outcome::UnknownTenant,
        Outcome::SessionUnavailable,
        Outcome::UpstreamError,
        Outcome::UpstreamTimeout,
        Outcome::InternalError,
        Outcome::TooManyConnections,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::DenyClient => "deny_client",
            Outcome::DenyDestination => "deny_destination",
            Outcome::DenyReserved => "deny_reserved",
            Outcome::BadRequest => "bad_request",
            Outcome::InvalidForwardedFor => "invalid_forwarded_for",
            Outcome::RateLimited => "rate_limited",
            Outcome::RateLimitUnavailable => "rate_limit_unavailable",
            Outcome::UnknownTenant => "unknown_tenant",
            Outcome::SessionUnavailable => "session_unavailable",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::InternalError => "internal_error",
            Outcome::TooManyConnections => "too_many_connections",
        }
    }
}

impl ProxyError {
    /// Everything an answer is made of, in one table: status, stable code, metric outcome.
    /// A new refusal is one variant, its message (`#[error]`) and one row here.
    pub fn meta(&self) -> Meta {
        use Outcome::*;
        use ProxyError as E;
        let (status, code, outcome) = match self {
            E::ClientNotAllowed => (403, "client_not_allowed", DenyClient),
            E::DestinationNotAllowed(_) => (403, "destination_not_allowed", DenyDestination),
            E::ReservedPath => (403, "reserved_path", DenyReserved),
            E::BadTarget => (400, "invalid_request_target", BadRequest),
            E::UnknownTenant(_) => (400, "unknown_tenant", UnknownTenant),
            E::InvalidForwardedFor => (400, "invalid_forwarded_for", InvalidForwardedFor),
            E::InvalidHeader(_) => (400, "invalid_header", BadRequest),
            E::InvalidPath(_) => (400, "invalid_path", BadRequest),
            E::UpgradeNotSupported => (400, "upgrade_not_supported", BadRequest),
            E::InvalidRequest => (400, "invalid_request", BadRequest),
            E::ExpectationFailed => (417, "expectation_failed", BadRequest),
            E::ConnectNotSupported => (405, "connect_not_supported", BadRequest),
            E::MethodNotAllowed => (405, "method_not_allowed", BadRequest),
            E::HeaderTimeout => (408, "request_header_timeout", BadRequest),
            E::BodyTimeout => (408, "request_body_timeout", BadRequest),
            E::HeadersTooLarge => (431, "request_headers_too_large", BadRequest),
            E::RateLimited { .. } => (429, "rate_limited", RateLimited),
            E::RateLimitUnavailable => (503, "rate_limit_unavailable", RateLimitUnavailable),
            E::SessionUnavailable { .. } => (503, "session_unavailable", SessionUnavailable),
            E::TooManyConnections => (503, "too_many_connections", TooManyConnections),
            E::UpstreamUnresolved => (502, "upstream_unresolved", UpstreamError),
            E::UpstreamTls(f) => (502, tls_code(*f), UpstreamError),
            E::UpstreamUnreachable => (502, "upstream_unreachable", UpstreamError),
            E::EgressProxyUnreachable => (502, "egress_proxy_unreachable", UpstreamError),
            E::EgressProxyRefused(_) => (502, "egress_proxy_refused", UpstreamError),
            E::EgressProxyMalformed => (502, "egress_proxy_failed", UpstreamError),
            E::EgressProxyTimeout => (504, "egress_proxy_timeout", UpstreamTimeout),
            E::UpstreamFailed => (502, "upstream_failed", UpstreamError),
            E::UpstreamTimeout => (504, "upstream_timeout", UpstreamTimeout),
            E::UpstreamOutcomeUnknown { timed_out: false } => {
                (502, "upstream_outcome_unknown", UpstreamError)
            }
            E::UpstreamOutcomeUnknown { timed_out: true } => {
                (504, "upstream_outcome_unknown", UpstreamTimeout)
            }
            E::Internal => (500, "internal_error", InternalError),
        };
        Meta {
            status,
            code,
            outcome,
        }
    }

    /// HTTP status sent to the app.
    pub fn status(&self) -> u16 {
        self.meta().status
    }

    /// Stable machine-readable code (the JSON `error` field).
    pub fn code(&self) -> &'static str {
        self.meta().code
    }

    /// The `decision` label of the requests metric and the audit line.
    pub fn outcome(&self) -> Outcome {
        self.meta().outcome
    }

    /// `Retry-After` seconds, for answers that have one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ProxyError::SessionUnavailable { retry_after_secs }
            | ProxyError::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            ProxyError::RateLimitUnavailable | ProxyError::TooManyConnections => Some(1),
            _ => None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let v = serde_json::json!({ "error": self.code(), "message": self.to_string() });
        Bytes::from(v.to_string())
    }
}

impl ProxyError {
    /// The final answer for an upstream failure `self` of a request that FinHub may have
    /// executed on some attempt (`outcome_unknown`): whatever the last attempt's failure, it is
    /// `upstream_outcome_unknown` (504 after a timeout, else 502). Without that, a failure
    /// before anything was sent keeps saying so.
    pub fn with_outcome(self, outcome_unknown: bool) -> ProxyError {
        if !outcome_unknown || self.status() < 500 {
            return self;
        }
        let timed_out = self.status() == 504;
        ProxyError::UpstreamOutcomeUnknown { timed_out }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_json_with_stable_codes() {
        let e = ProxyError::DestinationNotAllowed("evil.example".into());
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"], "destination_not_allowed");
        assert!(v["message"].as_str().unwrap().contains("evil.example"));
        assert_eq!(e.status(), 403);
        assert_eq!(
            ProxyError::SessionUnavailable {
                retry_after_secs: 2
            }
            .retry_after(),
            Some(2)
        );
    }

    #[test]
    fn every_refusal_has_a_distinct_code_and_an_error_status() {
        let all = [
            ProxyError::ClientNotAllowed,
            ProxyError::DestinationNotAllowed("x".into()),
            ProxyError::ConnectNotSupported,
            ProxyError::BadTarget,
            ProxyError::InvalidForwardedFor,
            ProxyError::InvalidHeader("x"),
            ProxyError::HeadersTooLarge,
            ProxyError::RateLimited {
                retry_after_secs: 1,
            },
            ProxyError::RateLimitUnavailable,
            ProxyError::UnknownTenant("x".into()),
            ProxyError::SessionUnavailable {
                retry_after_secs: 1,
            },
            ProxyError::UpstreamUnresolved,
            ProxyError::UpstreamTls(TlsFailure::UnknownCa),
            ProxyError::UpstreamTls(TlsFailure::NameMismatch),
            ProxyError::UpstreamTls(TlsFailure::ServerCertExpired),
            ProxyError::UpstreamTls(TlsFailure::ClientCertRejected),
            ProxyError::UpstreamTls(TlsFailure::Other),
            ProxyError::UpstreamUnreachable,
            ProxyError::EgressProxyUnreachable,
            ProxyError::EgressProxyRefused(407),
            ProxyError::EgressProxyMalformed,
            ProxyError::EgressProxyTimeout,
            ProxyError::UpstreamTimeout,
            ProxyError::UpstreamFailed,
            ProxyError::UpstreamOutcomeUnknown { timed_out: false },
            ProxyError::ExpectationFailed,
            ProxyError::InvalidRequest,
            ProxyError::Internal,
            ProxyError::HeaderTimeout,
            ProxyError::BodyTimeout,
            ProxyError::ReservedPath,
            ProxyError::InvalidPath(PathError),
            ProxyError::MethodNotAllowed,
            ProxyError::UpgradeNotSupported,
            ProxyError::TooManyConnections,
        ];
        let codes: std::collections::HashSet<_> = all.iter().map(ProxyError::code).collect();
        assert_eq!(codes.len(), all.len(), "codes are distinct");
        for e in &all {
            let m = e.meta();
            assert!((400..600).contains(&m.status), "{e:?}");
            assert_ne!(m.outcome, Outcome::Allow, "{e:?}");
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn a_lost_answer_to_a_mutation_says_its_outcome_is_unknown() {
        let e = ProxyError::UpstreamFailed.with_outcome(true);
        assert_eq!((e.status(), e.code()), (502, "upstream_outcome_unknown"));
        let e = ProxyError::UpstreamTimeout.with_outcome(true);
        assert_eq!((e.status(), e.code()), (504, "upstream_outcome_unknown"));
        // An earlier attempt may have run: a later connect failure cannot say "not sent".
        assert_eq!(
            ProxyError::UpstreamUnreachable.with_outcome(true),
            ProxyError::UpstreamOutcomeUnknown { timed_out: false }
        );
        assert_eq!(
            ProxyError::UpstreamTls(TlsFailure::Other).with_outcome(true),
            ProxyError::UpstreamOutcomeUnknown { timed_out: false }
        );
        assert_eq!(
            ProxyError::UpstreamUnreachable.with_outcome(false),
            ProxyError::UpstreamUnreachable
        );
        assert_eq!(
            ProxyError::UpstreamFailed.with_outcome(false),
            ProxyError::UpstreamFailed
        );
    }

    #[test]
    fn an_invalid_path_keeps_its_answer() {
        let e = ProxyError::from(PathError);
        assert_eq!((e.status(), e.code()), (400, "invalid_path"));
        assert_eq!(
            e.to_string(),
            "request path is not in canonical form (dot or empty segments, encoded unreserved characters or separators)"
        );
    }
}
