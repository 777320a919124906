//! Header names the sidecar reads or sets, parsed once. A leaf: nothing from the crate, so
//! any module (policy, proxy, auth client, error) can name a header without an import circle.

use http::header::HeaderName;

/// `x-tenant-id`.
pub const X_TENANT_ID: HeaderName = HeaderName::from_static("x-tenant-id");
/// `x-forwarded-for`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-request-id`.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `x-activity-id`.
pub const X_ACTIVITY_ID: HeaderName = HeaderName::from_static("x-activity-id");
/// `x-idempotency-key`.
pub const X_IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("x-idempotency-key");
/// `x-correlation-id`.
pub const X_CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
/// `x-forwarded-from` (v2.1 request source).
pub const X_FORWARDED_FROM: HeaderName = HeaderName::from_static("x-forwarded-from");
/// `platform` (v2.1 request source).
pub const PLATFORM: HeaderName = HeaderName::from_static("platform");
/// `deviceid` (v2.1 request source).
pub const DEVICE_ID: HeaderName = HeaderName::from_static("deviceid");
/// `x-device-id` (alias of `deviceId`).
pub const X_DEVICE_ID: HeaderName = HeaderName::from_static("x-device-id");
/// `device-id` (alias of `deviceId`).
pub const DEVICE_ID_DASHED: HeaderName = HeaderName::from_static("device-id");
/// `x-user-session-token`.
pub const X_USER_SESSION_TOKEN: HeaderName = HeaderName::from_static("x-user-session-token");
/// `x-session-active`.
pub const X_SESSION_ACTIVE: HeaderName = HeaderName::from_static("x-session-active");
/// `x-session-id`.
pub const X_SESSION_ID: HeaderName = HeaderName::from_static("x-session-id");
/// `upgrade`.
pub const UPGRADE: HeaderName = HeaderName::from_static("upgrade");
/// `sec-ch-ua-platform`.
pub const SEC_CH_UA_PLATFORM: HeaderName = HeaderName::from_static("sec-ch-ua-platform");
