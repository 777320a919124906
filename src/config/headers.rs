//! `[headers]`: the values of the compliance headers the sidecar sets on FinHub calls.

use std::net::{IpAddr, Ipv4Addr};

use http::HeaderValue;
use serde::Deserialize;

use super::convert::{env_reference, Convert};
use super::EnvRules;

/// Values of headers the sidecar sets on FinHub calls.
#[derive(Debug, Clone)]
pub struct HeaderConfig {
    /// IP sent as `X-Forwarded-For` (the originating server's IP, §8).
    pub origin_ip: IpAddr,
    /// `origin_ip` as a header value, built once.
    pub origin_ip_header: HeaderValue,
    /// `User-Agent` used when the app sends none (and on login).
    pub user_agent: HeaderValue,
    /// `sec-ch-ua-platform` value.
    pub sec_ch_ua_platform: HeaderValue,
    /// `platform` value (v2.1 request-source platform, A18).
    pub platform: HeaderValue,
    /// `X-Forwarded-From` value (A18).
    pub forwarded_from: HeaderValue,
    /// `deviceId` value, stable per deployment (A18).
    pub device_id: HeaderValue,
    /// Whether `X-Forwarded-From`, `platform` and `deviceId` are sent (A18).
    pub v21_headers: bool,
    /// Whether an `X-Idempotency-Key` is generated for unsafe methods without one (A21).
    pub idempotency_keys: bool,
}

/// `[headers]` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileHeaders {
    /// Originating IP sent as `X-Forwarded-For`, e.g. `"${POD_IP}"`; default 127.0.0.1 (not in production).
    origin_ip: Option<String>,
    /// Default `User-Agent`; default `finhub-sidecar/<version> rust/<rustc version>`.
    user_agent: Option<String>,
    /// `sec-ch-ua-platform`; default `Linux` (unquoted, A19).
    sec_ch_ua_platform: Option<String>,
    /// `platform` (v2.1); default `server`.
    platform: Option<String>,
    /// `X-Forwarded-From` (v2.1 request source); default `finhub-sidecar`.
    forwarded_from: Option<String>,
    /// `deviceId` (v2.1), stable per deployment; default `finhub-sidecar`.
    device_id: Option<String>,
    /// Send `X-Forwarded-From`, `platform` and `deviceId` on every request; default true.
    v21_headers: Option<bool>,
    /// Generate `X-Idempotency-Key` for POST/PUT/PATCH/DELETE without one; default true.
    idempotency_keys: Option<bool>,
}

impl Convert<'_> {
    /// `[headers]`.
    pub(super) fn headers(
        &mut self,
        h: FileHeaders,
        rules: Option<EnvRules>,
    ) -> Option<HeaderConfig> {
        let origin_ip = match h.origin_ip {
            None => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(v) => {
                let resolved = match env_reference(&v) {
                    Some(var) => (self.env)(var).unwrap_or_default(),
                    None => v.clone(),
                };
                match resolved.trim().parse::<IpAddr>() {
                    Ok(ip) => ip,
                    Err(_) => {
                        self.err(
                            "headers.origin_ip",
                            format!("`{v}` is not (or does not expand to) an IP address"),
                        );
                        return None;
                    }
                }
            }
        };
        if rules.is_some_and(|r| r.requires_real_origin_ip) && origin_ip.is_loopback() {
            self.err(
                "headers.origin_ip",
                "production needs the real originating IP (e.g. \"${POD_IP}\"), not loopback",
            );
        }
        let default_ua = format!(
            "finhub-sidecar/{} rust/{}",
            env!("CARGO_PKG_VERSION"),
            env!("FINHUB_RUSTC_VERSION")
        );
        let user_agent = self.header_value("headers.user_agent", h.user_agent, &default_ua);
        let sec_ch_ua_platform =
            self.header_value("headers.sec_ch_ua_platform", h.sec_ch_ua_platform, "Linux");
        let platform = self.header_value("headers.platform", h.platform, "server");
        let forwarded_from =
            self.header_value("headers.forwarded_from", h.forwarded_from, "finhub-sidecar");
        let device_id = self.header_value("headers.device_id", h.device_id, "finhub-sidecar");
        let origin_ip_header = HeaderValue::from_str(&origin_ip.to_string()).ok()?;
        Some(HeaderConfig {
            origin_ip,
            origin_ip_header,
            user_agent: user_agent?,
            sec_ch_ua_platform: sec_ch_ua_platform?,
            platform: platform?,
            forwarded_from: forwarded_from?,
            device_id: device_id?,
            v21_headers: h.v21_headers.unwrap_or(true),
            idempotency_keys: h.idempotency_keys.unwrap_or(true),
        })
    }

    /// A non-empty printable ASCII header value, `default` when unset.
    fn header_value(&mut self, key: &str, v: Option<String>, default: &str) -> Option<HeaderValue> {
        let v = v.unwrap_or_else(|| default.to_string());
        match HeaderValue::from_str(&v) {
            Ok(h) if !v.is_empty() && v.is_ascii() => Some(h),
            _ => {
                self.err(key, "must be a non-empty printable ASCII header value");
                None
            }
        }
    }
}
