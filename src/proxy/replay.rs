//! The 401 replay of one request, as one state: FinHub refused the session a request carried,
//! the sidecar renewed it (single flight), and the request may be sent once more with the new
//! session — only if it can be sent again safely.

use http::Method;

/// Where a request is in the 401-replay protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// It cannot be sent again: its body is too large or of unknown length, or the method is
    /// unsafe and there is no idempotency key that would make a second execution harmless.
    Never,
    /// It may be replayed once after a renewal.
    Allowed,
    /// A replay was decided; the next upstream error is that replay and must be retried.
    Pending,
    /// It was replayed once (never twice).
    Done,
}

impl Replay {
    /// The starting state for a request with `method`, an idempotency key or not, and a body
    /// that fits the replay buffer or not.
    pub fn of(method: &Method, has_idempotency_key: bool, body_fits: bool) -> Replay {
        if body_fits && (method.is_safe() || has_idempotency_key) {
            Replay::Allowed
        } else {
            Replay::Never
        }
    }

    /// FinHub answered 401: whether to wait for a renewal and send the request again. Pingora
    /// keeps the body for a retry only up to its buffer; a truncated one cannot be replayed.
    pub fn wants_replay(self, body_truncated: bool) -> bool {
        self == Replay::Allowed && !body_truncated
    }

    /// The renewal arrived: the next upstream attempt is the replay.
    pub fn start(&mut self) {
        *self = Replay::Pending;
    }

    /// On an upstream error: whether it is the replay's signal (then Pingora retries once).
    pub fn take_pending(&mut self) -> bool {
        if *self == Replay::Pending {
            *self = Replay::Done;
            return true;
        }
        false
    }

    /// Whether the request was (or is being) replayed, for the audit line.
    pub fn replayed(self) -> bool {
        matches!(self, Replay::Pending | Replay::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_safe_or_keyed_requests_with_small_bodies_replay() {
        assert_eq!(Replay::of(&Method::GET, false, true), Replay::Allowed);
        assert_eq!(Replay::of(&Method::POST, true, true), Replay::Allowed);
        assert_eq!(Replay::of(&Method::POST, false, true), Replay::Never);
        assert_eq!(Replay::of(&Method::GET, false, false), Replay::Never);
    }

    #[test]
    fn a_request_is_replayed_at_most_once() {
        let mut r = Replay::of(&Method::GET, false, true);
        assert!(!r.wants_replay(true), "truncated body");
        assert!(r.wants_replay(false));
        assert!(!r.take_pending(), "no replay decided yet");
        r.start();
        assert!(r.replayed());
        assert!(r.take_pending());
        assert_eq!(r, Replay::Done);
        assert!(!r.wants_replay(false), "never twice");
        assert!(!r.take_pending());
        assert!(r.replayed());
        assert!(!Replay::Never.wants_replay(false));
    }
}
