//! A refusal as the HTTP answer the app gets: JSON body, `Content-Type`, `Cache-Control:
//! no-store`, `Retry-After` when it has one.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use super::ProxyError;

/// `err` as a complete HTTP/1.1 response that closes the connection, for answers written
/// straight to a socket before Pingora has a request (connection cap, header deadline or cap).
pub fn raw_response(err: &ProxyError) -> Vec<u8> {
    let body = err.body();
    let status = err.status();
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n",
        body.len()
    );
    if let Some(secs) = err.retry_after() {
        out.push_str(&format!("retry-after: {secs}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// `err` as a response header and JSON body.
pub fn response(err: &ProxyError) -> pingora::Result<(ResponseHeader, Bytes)> {
    let body = err.body();
    let mut resp = ResponseHeader::build(err.status(), Some(4))?;
    resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    if let Some(secs) = err.retry_after() {
        resp.insert_header(http::header::RETRY_AFTER, secs.to_string())?;
    }
    Ok((resp, body))
}

/// Writes `err` as the complete response (header and JSON body) and keeps the connection usable.
pub async fn respond(session: &mut Session, err: &ProxyError) -> pingora::Result<()> {
    respond_keyed(session, err, None).await
}

/// As [`respond`], with the request's `X-Idempotency-Key` (sending the request again with it
/// cannot execute it twice).
pub async fn respond_keyed(
    session: &mut Session,
    err: &ProxyError,
    idempotency_key: Option<&http::HeaderValue>,
) -> pingora::Result<()> {
    let (mut resp, body) = response(err)?;
    if let Some(key) = idempotency_key {
        resp.insert_header(crate::names::X_IDEMPOTENCY_KEY, key.clone())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_responses_are_complete_and_close() {
        let r = String::from_utf8(raw_response(&ProxyError::HeadersTooLarge)).unwrap();
        assert!(r.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(r.contains("connection: close\r\n"));
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "request_headers_too_large");
        let r = String::from_utf8(raw_response(&ProxyError::TooManyConnections)).unwrap();
        assert!(r.contains("retry-after: 1\r\n"));
    }
}
