//! Which refusal a Pingora error raised while talking with FinHub is: the app's fault, the
//! egress proxy's, TLS (by reason), a timeout, or FinHub unreachable or broken.

use pingora::{Error, ErrorSource, ErrorType};

use super::{ProxyError, TlsFailure};
use crate::egress::EgressError;

impl ProxyError {
    /// Classifies a Pingora error raised while connecting to or talking with FinHub.
    pub fn from_upstream(e: &Error) -> ProxyError {
        if e.esource() == &ErrorSource::Downstream {
            // The app was too slow with its body, or its own bytes were wrong (header or body
            // framing, chunk encoding): FinHub is not at fault.
            return match e.etype() {
                ErrorType::ReadTimedout => ProxyError::BodyTimeout,
                _ => ProxyError::InvalidRequest,
            };
        }
        if let Some(egress) = causes(e).find_map(|c| c.downcast_ref::<EgressError>()) {
            return match egress {
                EgressError::Unreachable(_) => ProxyError::EgressProxyUnreachable,
                EgressError::Refused(status) => ProxyError::EgressProxyRefused(*status),
                EgressError::Malformed => ProxyError::EgressProxyMalformed,
                EgressError::Timeout => ProxyError::EgressProxyTimeout,
            };
        }
        let tls = || {
            ProxyError::UpstreamTls(
                tls_cause(e).unwrap_or_else(|| classify_tls(&error_chain_text(e))),
            )
        };
        match e.etype() {
            ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert | ErrorType::HandshakeError => {
                tls()
            }
            ErrorType::ConnectTimedout
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout
            | ErrorType::TLSHandshakeTimedout => ProxyError::UpstreamTimeout,
            ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError => {
                ProxyError::UpstreamUnreachable
            }
            _ if tls_cause(e).is_some() || error_chain_text(e).contains("alert") => tls(),
            _ => ProxyError::UpstreamFailed,
        }
    }
}

/// `e`'s causes, outermost first: through nested Pingora errors (whose `source()` is empty)
/// by their `cause`, through other errors by `source()`.
fn causes(e: &Error) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    let first = e
        .cause
        .as_deref()
        .map(|c| c as &(dyn std::error::Error + 'static));
    std::iter::successors(first, |c| {
        let nested = c
            .downcast_ref::<Error>()
            .or_else(|| c.downcast_ref::<Box<Error>>().map(|b| &**b));
        match nested {
            Some(inner) => inner
                .cause
                .as_deref()
                .map(|c| c as &(dyn std::error::Error + 'static)),
            None => c.source(),
        }
    })
}

/// The TLS failure named by a `rustls::Error` in `e`'s cause chain (directly or inside an
/// `io::Error`, as tokio-rustls reports it).
///
/// Pingora 0.9.1's client handshake (`protocols/tls/rustls/client.rs`) keeps only the text of
/// its cause (`Error::e_explain(.., format!(".. {e}"))`), so today a handshake failure reaches
/// here without one and [`classify_tls`] reads the text instead; failures on an established
/// connection (alerts after the handshake) keep their cause.
fn tls_cause(e: &Error) -> Option<TlsFailure> {
    use rustls::{CertificateError, Error as Tls};
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e
        .cause
        .as_deref()
        .map(|c| c as &(dyn std::error::Error + 'static));
    while let Some(c) = cause {
        let found = c.downcast_ref::<Tls>().or_else(|| {
            c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<Tls>())
        });
        if let Some(t) = found {
            return Some(match t {
                Tls::InvalidCertificate(CertificateError::UnknownIssuer) => TlsFailure::UnknownCa,
                Tls::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                ) => TlsFailure::NameMismatch,
                Tls::InvalidCertificate(
                    CertificateError::Expired
                    | CertificateError::ExpiredContext { .. }
                    | CertificateError::NotValidYet
                    | CertificateError::NotValidYetContext { .. },
                ) => TlsFailure::ServerCertExpired,
                Tls::AlertReceived(_) => TlsFailure::ClientCertRejected,
                _ => TlsFailure::Other,
            });
        }
        cause = c.source();
    }
    None
}

/// The error, its context and its causes as one string (for the text fallback only).
fn error_chain_text(e: &Error) -> String {
    let mut s = e.to_string();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e
        .cause
        .as_deref()
        .map(|c| c as &(dyn std::error::Error + 'static));
    while let Some(c) = cause {
        s.push_str(" | ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Maps rustls' error text to the reason an operator can act on.
pub fn classify_tls(text: &str) -> TlsFailure {
    if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
        TlsFailure::UnknownCa
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        TlsFailure::NameMismatch
    } else if text.contains("Expired") || text.contains("NotValidYet") {
        TlsFailure::ServerCertExpired
    } else if text.contains("alert") {
        // Fatal alerts from the server during/after the handshake: BadCertificate,
        // CertificateRequired, UnknownCA, CertificateUnknown, AccessDenied, ...
        TlsFailure::ClientCertRejected
    } else {
        TlsFailure::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_reasons_are_told_apart() {
        assert_eq!(
            classify_tls("TLS connect() failed: invalid peer certificate: UnknownIssuer"),
            TlsFailure::UnknownCa
        );
        assert_eq!(
            classify_tls("invalid peer certificate: NotValidForName"),
            TlsFailure::NameMismatch
        );
        assert_eq!(
            classify_tls("received fatal alert: CertificateRequired"),
            TlsFailure::ClientCertRejected
        );
        assert_eq!(classify_tls("eof"), TlsFailure::Other);
    }

    #[test]
    fn downstream_failures_are_the_apps_fault() {
        let mut e = Error::new(ErrorType::new("InvalidChunk"));
        e.as_down();
        assert_eq!(ProxyError::from_upstream(&e), ProxyError::InvalidRequest);
        let mut e = Error::new(ErrorType::InvalidHTTPHeader);
        e.as_down();
        assert_eq!(ProxyError::from_upstream(&e).code(), "invalid_request");
    }

    #[test]
    fn tls_failures_are_read_from_the_cause_chain() {
        let cases = [
            (
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
                "upstream_tls_unknown_ca",
            ),
            (
                rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName),
                "upstream_tls_name_mismatch",
            ),
            (
                rustls::Error::InvalidCertificate(rustls::CertificateError::Expired),
                "upstream_tls_server_cert_invalid",
            ),
            (
                rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
                "upstream_tls_client_cert_rejected",
            ),
        ];
        for (cause, code) in cases {
            // As tokio-rustls reports it: an io::Error carrying the rustls::Error.
            let io = std::io::Error::new(std::io::ErrorKind::InvalidData, cause);
            let e = Error::because(ErrorType::TLSHandshakeFailure, "tls connect error", io);
            assert_eq!(ProxyError::from_upstream(&e).code(), code);
        }
        // An alert on an established connection is a TLS failure whatever Pingora calls it.
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate),
        );
        let e = Error::because(ErrorType::ReadError, "reading response", io);
        assert_eq!(
            ProxyError::from_upstream(&e).code(),
            "upstream_tls_client_cert_rejected"
        );
    }

    #[test]
    fn egress_failures_are_read_from_the_cause_chain_even_when_wrapped() {
        let cases = [
            (EgressError::Refused(407), "egress_proxy_refused", 502),
            (
                EgressError::Unreachable(std::io::ErrorKind::ConnectionRefused),
                "egress_proxy_unreachable",
                502,
            ),
            (EgressError::Malformed, "egress_proxy_failed", 502),
            (EgressError::Timeout, "egress_proxy_timeout", 504),
        ];
        for (cause, code, status) in cases {
            let inner = Error::because(ErrorType::ConnectProxyFailure, "tunnel", cause);
            let outer = Error::because(ErrorType::ConnectError, "connecting", inner);
            let got = ProxyError::from_upstream(&outer);
            assert_eq!((got.code(), got.status()), (code, status));
        }
        let e = ProxyError::EgressProxyRefused(407);
        assert!(e.to_string().contains("407"), "{e}");
    }

    #[test]
    fn timeouts_map_to_504() {
        let e = Error::new(ErrorType::ReadTimedout);
        assert_eq!(ProxyError::from_upstream(&e).status(), 504);
        let e = Error::new(ErrorType::TLSHandshakeFailure).more_context("UnknownIssuer");
        assert_eq!(
            ProxyError::from_upstream(&e).code(),
            "upstream_tls_unknown_ca"
        );
    }
}
