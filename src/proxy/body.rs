//! The request body, read whole before anything goes upstream when it fits the hold limit
//! (nginx's `proxy_request_buffering on`): FinHub then receives a request whole or not at all,
//! and every retry (the 401 replay included) sends the same bytes again. A larger body streams
//! as it arrives; the part read while deciding is sent first.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use pingora::{Error, ErrorType};

use crate::error::ProxyError;

/// The largest body held whole: Pingora's retry buffer (`BODY_BUF_LIMIT` in `pingora-core`),
/// which is what a retry resends.
pub const HOLD_LIMIT: usize = 64 * 1024;

/// Pieces kept apart while reading before they are joined into one buffer.
const MAX_CHUNKS: usize = 32;

/// What the sidecar holds of a request body before the request goes upstream.
#[derive(Debug)]
pub enum Body {
    /// No body, or all of it (`len` bytes) is in Pingora's retry buffer: FinHub gets it whole,
    /// as often as the request is sent.
    Held {
        /// The body's length.
        len: usize,
    },
    /// Larger than the hold limit: sent once, as it arrives. `prefix` is what was read while
    /// deciding, still to be sent ahead of the rest.
    Streamed {
        /// Bytes read from the app but not yet sent upstream.
        prefix: Option<Bytes>,
    },
}

impl Default for Body {
    fn default() -> Self {
        Body::Held { len: 0 }
    }
}

/// Why the body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// The app's bytes were wrong (chunk framing) or too slow: answer with this refusal.
    Refuse(ProxyError),
    /// The app went away mid-body: nothing to answer.
    Gone(Box<Error>),
}

impl Body {
    /// Reads the body of `session`'s request while it is at most [`HOLD_LIMIT`] (Pingora's
    /// retry buffer: whatever it holds whole, it sends), all of it by `deadline`. A body whose
    /// `Content-Length` already says it is larger is not read here.
    pub async fn read(session: &mut Session, deadline: Instant) -> Result<Body, BodyError> {
        let limit = HOLD_LIMIT;
        if session.as_downstream_mut().is_body_empty() {
            return Ok(Body::default());
        }
        if declared_length(session).is_some_and(|n| n > limit) {
            return Ok(Body::Streamed { prefix: None });
        }
        let downstream = session.as_downstream_mut();
        if expects_continue(downstream.req_header()) {
            // The app waits for a go-ahead before it sends the body; FinHub will see the
            // body whole, so the sidecar gives it (the header is not sent upstream).
            downstream
                .write_continue_response()
                .await
                .map_err(|e| BodyError::Gone(e.into_down()))?;
        }
        downstream.enable_retry_buffering();
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut total = 0usize;
        while total <= limit {
            let left = deadline.saturating_duration_since(Instant::now());
            let read = tokio::time::timeout(left, downstream.read_request_body()).await;
            match read {
                Err(_) => return Err(BodyError::Refuse(ProxyError::BodyTimeout)),
                Ok(Err(e)) => return Err(classify(e)),
                Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => {
                    total += chunk.len();
                    chunks.push(chunk);
                    if chunks.len() >= MAX_CHUNKS {
                        // A body in tiny pieces: one buffer, not thousands of small ones.
                        chunks = vec![concat(std::mem::take(&mut chunks), total)];
                    }
                }
            }
        }
        // Pingora sends its retry buffer whenever it holds the whole body; only a body it
        // could not keep is ours to send.
        if downstream.is_body_done() && !downstream.retry_buffer_truncated() {
            return Ok(Body::Held { len: total });
        }
        Ok(Body::Streamed {
            prefix: Some(concat(chunks, total)),
        })
    }

    /// Whether the body streams (it is larger than the hold limit).
    pub fn is_streamed(&self) -> bool {
        matches!(self, Body::Streamed { .. })
    }

    /// Whether every attempt can send the body whole and it is at most `limit` bytes.
    pub fn resendable_within(&self, limit: usize) -> bool {
        matches!(self, Body::Held { len } if *len <= limit)
    }

    /// Whether the sidecar read (part of) the body itself: the app got its `100 Continue`
    /// from the sidecar, so FinHub must not be asked for one.
    pub fn was_read(&self) -> bool {
        !matches!(self, Body::Streamed { prefix: None })
    }

    /// The body piece to send upstream: the held prefix first (once), then what Pingora read.
    /// At the end of the body (`chunk` is `None`) the prefix alone is sent.
    pub fn next_chunk(&mut self, chunk: &mut Option<Bytes>) {
        let Body::Streamed { prefix } = self else {
            return;
        };
        let Some(prefix) = prefix.take() else {
            return;
        };
        *chunk = Some(match chunk.take() {
            None => prefix,
            Some(rest) if rest.is_empty() => prefix,
            Some(rest) => concat(vec![prefix, rest], 0),
        });
    }
}

/// Whether the request asks for `100 Continue` before its body.
pub fn expects_continue(req: &pingora::http::RequestHeader) -> bool {
    req.headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// The request's `Content-Length`, when it has one and no chunked coding.
fn declared_length(session: &Session) -> Option<usize> {
    let h = &session.req_header().headers;
    if h.contains_key(http::header::TRANSFER_ENCODING) {
        return None;
    }
    h.get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// A body read failure as the app's fault (answered) or its departure (not answered).
fn classify(e: Box<Error>) -> BodyError {
    match e.etype() {
        ErrorType::ReadTimedout => BodyError::Refuse(ProxyError::BodyTimeout),
        ErrorType::ReadError | ErrorType::ConnectionClosed => BodyError::Gone(e.into_down()),
        _ => BodyError::Refuse(ProxyError::InvalidRequest),
    }
}

/// The chunks as one buffer (`total` is a capacity hint).
fn concat(chunks: Vec<Bytes>, total: usize) -> Bytes {
    if chunks.len() == 1 {
        return chunks.into_iter().next().unwrap_or_default();
    }
    let mut buf = BytesMut::with_capacity(total.max(chunks.iter().map(Bytes::len).sum()));
    for c in &chunks {
        buf.extend_from_slice(c);
    }
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_goes_first_once() {
        let mut b = Body::Streamed {
            prefix: Some(Bytes::from_static(b"head-")),
        };
        let mut chunk = Some(Bytes::from_static(b"tail"));
        b.next_chunk(&mut chunk);
        assert_eq!(chunk.as_deref(), Some(&b"head-tail"[..]));
        let mut chunk = Some(Bytes::from_static(b"more"));
        b.next_chunk(&mut chunk);
        assert_eq!(chunk.as_deref(), Some(&b"more"[..]), "prefix sent once");
    }

    #[test]
    fn at_the_end_of_the_body_the_prefix_alone_is_sent() {
        let mut b = Body::Streamed {
            prefix: Some(Bytes::from_static(b"all")),
        };
        let mut chunk = None;
        b.next_chunk(&mut chunk);
        assert_eq!(chunk.as_deref(), Some(&b"all"[..]));
        let mut w = Body::Held { len: 1 };
        let mut chunk = Some(Bytes::from_static(b"x"));
        w.next_chunk(&mut chunk);
        assert_eq!(
            chunk.as_deref(),
            Some(&b"x"[..]),
            "a whole body passes unchanged"
        );
    }

    #[test]
    fn only_a_held_body_within_the_limit_is_resendable() {
        assert!(Body::Held { len: 10 }.resendable_within(10));
        assert!(!Body::Held { len: 11 }.resendable_within(10));
        assert!(!Body::Streamed { prefix: None }.resendable_within(10));
        assert!(!Body::Streamed { prefix: None }.was_read());
        assert!(Body::Streamed {
            prefix: Some(Bytes::new())
        }
        .was_read());
        assert!(Body::default().was_read());
    }

    #[test]
    fn expect_continue_is_recognised_in_any_case() {
        let mut req = pingora::http::RequestHeader::build("POST", b"/", None).unwrap();
        assert!(!expects_continue(&req));
        req.insert_header("Expect", "100-Continue").unwrap();
        assert!(expects_continue(&req));
    }
}
