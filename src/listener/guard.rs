//! The header guard of one connection: the header block must arrive whole within the deadline
//! and within the size cap; where one request's header ends is found by its empty line.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Where the guard is in the current request's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Nothing of this request read yet; the deadline starts at the first byte.
    Idle,
    /// Nothing read yet on a new connection; the deadline started at accept.
    Fresh,
    /// Inside the header block; `line` tracks line ends to find the empty line.
    Header { read: usize, line: LineState },
    /// Header complete: body bytes and whatever follows pass unguarded until re-armed.
    Passed,
    /// Refused: every further read fails.
    Refused,
}

/// Line-end scanner state (a header ends at an empty line; LF or CRLF line ends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineState {
    /// Only empty lines so far (ignored before the request line, RFC 9112 §2.2).
    Leading,
    /// Inside a line.
    Text,
    /// Just after a line end.
    LineStart,
    /// A CR at the start of a line.
    LineStartCr,
}

impl LineState {
    /// Feeds `bytes`; returns how many bytes belong to the header if its end is among them.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            if *self == LineState::Text {
                // Inside a line only the next LF matters: jump to it.
                let lf = memchr::memchr(b'\n', &bytes[i..])?;
                i += lf + 1;
                *self = LineState::LineStart;
                continue;
            }
            *self = match (*self, bytes[i]) {
                (LineState::Leading, b'\r' | b'\n') => LineState::Leading,
                (LineState::LineStart | LineState::LineStartCr, b'\n') => return Some(i + 1),
                (LineState::LineStart, b'\r') => LineState::LineStartCr,
                (_, b'\n') => LineState::LineStart,
                _ => LineState::Text,
            };
            i += 1;
        }
        None
    }
}

/// The header deadline and size cap of one connection.
pub(super) struct HeaderGuard {
    pub(super) phase: Phase,
    pub(super) deadline: Instant,
    pub(super) timer: Option<Pin<Box<Sleep>>>,
    pub(super) timeout: Duration,
    pub(super) max: usize,
}

impl HeaderGuard {
    pub(super) fn new(timeout: Duration, max: usize) -> Self {
        HeaderGuard {
            phase: Phase::Fresh,
            deadline: Instant::now() + timeout,
            timer: None,
            timeout,
            max,
        }
    }

    /// The previous request is done: guard the next header.
    pub(super) fn next_request(&mut self) {
        if self.phase != Phase::Refused {
            self.phase = Phase::Idle;
        }
    }

    /// Bytes the next read may take: never more than what is left of the header cap.
    pub(super) fn budget(&self) -> Option<usize> {
        match self.phase {
            Phase::Fresh | Phase::Idle => Some(self.max),
            Phase::Header { read, .. } => Some(self.max.saturating_sub(read)),
            Phase::Passed | Phase::Refused => None,
        }
    }

    /// Accounts `bytes` just read.
    pub(super) fn saw(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let (read, mut line) = match self.phase {
            Phase::Idle => {
                self.deadline = Instant::now() + self.timeout;
                (0, LineState::Leading)
            }
            Phase::Fresh => (0, LineState::Leading),
            Phase::Header { read, line } => (read, line),
            Phase::Passed | Phase::Refused => return,
        };
        self.phase = match line.feed(bytes) {
            Some(_) => Phase::Passed,
            None => Phase::Header {
                read: read + bytes.len(),
                line,
            },
        };
    }

    /// Whether the deadline of the header being read has passed (arming the timer so that
    /// the task is woken when it does).
    pub(super) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !matches!(self.phase, Phase::Fresh | Phase::Header { .. }) {
            return false;
        }
        let deadline = self.deadline;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end_of(bytes: &[u8]) -> Option<usize> {
        LineState::Leading.feed(bytes)
    }

    #[test]
    fn header_end_is_found_with_any_line_ending() {
        assert_eq!(end_of(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"), Some(27));
        assert_eq!(end_of(b"GET / HTTP/1.1\nHost: a\n\n"), Some(24));
        assert_eq!(end_of(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        // Empty lines before the request line do not end anything.
        assert_eq!(end_of(b"\r\n\r\n\r\nGET / HTTP/1.1\r\n\r\n"), Some(24));
        assert_eq!(end_of(b"\r\n\r\n"), None);
    }

    #[test]
    fn header_end_split_across_reads() {
        let mut s = LineState::Leading;
        assert_eq!(s.feed(b"GET / HTTP/1.1\r\nA: b\r"), None);
        assert_eq!(s.feed(b"\n\r"), None);
        assert_eq!(s.feed(b"\nrest"), Some(1));
    }

    #[test]
    fn budget_shrinks_while_the_header_is_read_and_resets_per_request() {
        let mut g = HeaderGuard::new(Duration::from_secs(10), 100);
        assert_eq!(g.budget(), Some(100));
        g.saw(b"GET / HTTP/1.1\r\n");
        assert_eq!(g.budget(), Some(84));
        g.saw(b"X: y\r\n\r\n");
        assert_eq!(
            g.budget(),
            None,
            "header complete: body reads are not capped"
        );
        g.next_request();
        assert_eq!(g.budget(), Some(100));
        g.phase = Phase::Refused;
        g.next_request();
        assert_eq!(g.phase, Phase::Refused);
    }
}
