//! The compliance headers every FinHub call carries (protocol notes §3 policy 5, §8, A17–A19):
//! `User-Agent`, `sec-ch-ua-platform`, `X-Forwarded-For` and, with `headers.v21_headers`, the
//! v2.1 request source (`X-Forwarded-From`, `platform`, `deviceId`, A18: "on every request,
//! not just login"). Built once from `[headers]`; the API path (`proxy/outbound.rs`) and the
//! auth client (`auth/client.rs`) set them through the one [`ComplianceHeaders::apply`].

use std::convert::Infallible;

use http::header::{HeaderName, USER_AGENT};
use http::{HeaderMap, HeaderValue};
use pingora::http::RequestHeader;

use crate::config::HeaderConfig;
use crate::names;

/// A request whose headers [`ComplianceHeaders::apply`] can read and set: Pingora's
/// `RequestHeader` on the API path, a plain `HeaderMap` on the auth client's.
pub trait SetHeaders {
    /// Why a header could not be set.
    type Error;
    /// The headers the request carries now.
    fn headers(&self) -> &HeaderMap;
    /// Sets `name` to `value`, replacing any earlier value.
    fn set(&mut self, name: HeaderName, value: HeaderValue) -> Result<(), Self::Error>;
}

impl SetHeaders for RequestHeader {
    type Error = Box<pingora::Error>;

    fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    fn set(&mut self, name: HeaderName, value: HeaderValue) -> Result<(), Self::Error> {
        self.insert_header(name, value)
    }
}

impl SetHeaders for HeaderMap {
    type Error = Infallible;

    fn headers(&self) -> &HeaderMap {
        self
    }

    fn set(&mut self, name: HeaderName, value: HeaderValue) -> Result<(), Infallible> {
        self.insert(name, value);
        Ok(())
    }
}

/// The compliance header values, built once from `[headers]`.
#[derive(Debug, Clone)]
pub struct ComplianceHeaders {
    /// `User-Agent` when the request has no usable one (every auth call).
    user_agent: HeaderValue,
    /// `sec-ch-ua-platform` (unquoted, A19).
    sec_ch_ua_platform: HeaderValue,
    /// `X-Forwarded-For` of the sidecar's own calls: the originating server's IP (§8).
    origin_ip: HeaderValue,
    /// The v2.1 request source, when `headers.v21_headers` is on.
    request_source: Option<RequestSource>,
}

/// The v2.1 request-source values (A18).
#[derive(Debug, Clone)]
struct RequestSource {
    forwarded_from: HeaderValue,
    platform: HeaderValue,
    device_id: HeaderValue,
}

impl ComplianceHeaders {
    /// The values `[headers]` configures.
    pub fn new(h: &HeaderConfig) -> Self {
        ComplianceHeaders {
            user_agent: h.user_agent.clone(),
            sec_ch_ua_platform: h.sec_ch_ua_platform.clone(),
            origin_ip: h.origin_ip_header.clone(),
            request_source: h.v21_headers.then(|| RequestSource {
                forwarded_from: h.forwarded_from.clone(),
                platform: h.platform.clone(),
                device_id: h.device_id.clone(),
            }),
        }
    }

    /// `X-Forwarded-For` for a call the sidecar makes on its own (login, refresh, logout).
    pub fn origin_ip(&self) -> &HeaderValue {
        &self.origin_ip
    }

    /// Sets the compliance headers on `req`, in this order: `User-Agent` (the request's own if
    /// non-empty and printable, else the configured one), `sec-ch-ua-platform`,
    /// `X-Forwarded-For` = `forwarded_for`, then the v2.1 request source unless the request
    /// already names it under any documented alias.
    pub fn apply<R: SetHeaders>(
        &self,
        req: &mut R,
        forwarded_for: &HeaderValue,
    ) -> Result<(), R::Error> {
        let ua = user_agent(req.headers().get(USER_AGENT), &self.user_agent);
        req.set(USER_AGENT, ua)?;
        req.set(names::SEC_CH_UA_PLATFORM, self.sec_ch_ua_platform.clone())?;
        req.set(names::X_FORWARDED_FOR, forwarded_for.clone())?;
        if let Some(s) = &self.request_source {
            apply_request_source(req, &s.forwarded_from, &s.platform, &s.device_id)?;
        }
        Ok(())
    }
}

/// The v2.1 request-source headers (`X-Forwarded-From`, `platform`, `deviceId`, §2.6, A18):
/// set to the configured values unless the request carries its own, under any documented alias
/// (`X-Device-Id` and `device-id` for `deviceId`).
pub fn apply_request_source<R: SetHeaders>(
    req: &mut R,
    forwarded_from: &HeaderValue,
    platform: &HeaderValue,
    device_id: &HeaderValue,
) -> Result<(), R::Error> {
    for (name, aliases, value) in [
        (names::X_FORWARDED_FROM, &[][..], forwarded_from),
        (names::PLATFORM, &[][..], platform),
        (
            names::DEVICE_ID,
            &[names::X_DEVICE_ID, names::DEVICE_ID_DASHED][..],
            device_id,
        ),
    ] {
        let h = req.headers();
        let sent = h.contains_key(&name) || aliases.iter().any(|a| h.contains_key(a));
        if !sent {
            req.set(name, value.clone())?;
        }
    }
    Ok(())
}

/// The request's `User-Agent` if non-empty and printable, else the configured default (§8).
pub fn user_agent(app: Option<&HeaderValue>, default: &HeaderValue) -> HeaderValue {
    match app {
        Some(v) if !v.is_empty() && v.to_str().is_ok() => v.clone(),
        _ => default.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_source_headers_respect_the_apps_own_under_any_alias() {
        let (from, platform, device) = (
            HeaderValue::from_static("finhub-sidecar"),
            HeaderValue::from_static("server"),
            HeaderValue::from_static("dev-1"),
        );
        let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
        apply_request_source(&mut req, &from, &platform, &device).unwrap();
        assert_eq!(req.headers["x-forwarded-from"], "finhub-sidecar");
        assert_eq!(req.headers["platform"], "server");
        assert_eq!(req.headers["deviceid"], "dev-1");
        for alias in ["X-Device-Id", "device-id", "deviceId"] {
            let mut req = RequestHeader::build("GET", b"/x", None).unwrap();
            req.insert_header(alias, "app-device").unwrap();
            req.insert_header("Platform", "web").unwrap();
            apply_request_source(&mut req, &from, &platform, &device).unwrap();
            assert!(
                req.headers
                    .get("deviceid")
                    .is_none_or(|v| v == "app-device"),
                "{alias}"
            );
            assert_eq!(
                req.headers.get_all("deviceid").iter().count()
                    + req.headers.get_all("x-device-id").iter().count()
                    + req.headers.get_all("device-id").iter().count(),
                1,
                "{alias}"
            );
            assert_eq!(req.headers["platform"], "web");
        }
    }

    #[test]
    fn user_agent_falls_back_to_default() {
        let d = HeaderValue::from_static("finhub-sidecar/0.1.0");
        assert_eq!(user_agent(None, &d), d);
        assert_eq!(user_agent(Some(&HeaderValue::from_static("")), &d), d);
        let app = HeaderValue::from_static("legacy-app/3.2");
        assert_eq!(user_agent(Some(&app), &d), app);
    }

    fn config(v21: bool) -> ComplianceHeaders {
        ComplianceHeaders {
            user_agent: HeaderValue::from_static("finhub-sidecar/0.1.0"),
            sec_ch_ua_platform: HeaderValue::from_static("Linux"),
            origin_ip: HeaderValue::from_static("10.1.2.3"),
            request_source: v21.then(|| RequestSource {
                forwarded_from: HeaderValue::from_static("finhub-sidecar"),
                platform: HeaderValue::from_static("server"),
                device_id: HeaderValue::from_static("dev-1"),
            }),
        }
    }

    #[test]
    fn the_api_path_and_the_auth_client_get_the_same_headers() {
        let c = config(true);
        let mut api = RequestHeader::build("GET", b"/x", None).unwrap();
        c.apply(&mut api, c.origin_ip()).unwrap();
        let mut auth = HeaderMap::new();
        c.apply(&mut auth, c.origin_ip()).unwrap();
        assert_eq!(api.headers, auth);
        assert_eq!(auth["user-agent"], "finhub-sidecar/0.1.0");
        assert_eq!(auth["sec-ch-ua-platform"], "Linux");
        assert_eq!(auth["x-forwarded-for"], "10.1.2.3");
        assert_eq!(auth["x-forwarded-from"], "finhub-sidecar");
        let mut v2 = HeaderMap::new();
        config(false).apply(&mut v2, c.origin_ip()).unwrap();
        assert_eq!(v2.len(), 3, "no request source without v21_headers");
    }
}
