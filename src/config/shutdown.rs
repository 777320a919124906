//! `[shutdown]`: graceful drain timing.

use std::time::Duration;

use serde::Deserialize;

use super::convert::{secs, Convert};

/// Graceful shutdown timing.
#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    /// After SIGTERM, keep serving new requests this long (readiness is already false).
    pub drain_delay: Duration,
    /// Then wait at most this long for in-flight requests before stopping.
    pub deadline: Duration,
}

/// `[shutdown]` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileShutdown {
    /// After SIGTERM or `POST /shutdown`, keep serving this long while `/ready` is 503; default 5 s.
    drain_delay: Option<String>,
    /// Then wait at most this long for in-flight requests; default 20 s.
    deadline: Option<String>,
}

impl Convert<'_> {
    /// `[shutdown]`.
    pub(super) fn shutdown(&mut self, s: FileShutdown) -> ShutdownConfig {
        ShutdownConfig {
            drain_delay: self.duration_or_zero(
                "shutdown.drain_delay",
                s.drain_delay.as_deref(),
                secs(5),
            ),
            deadline: self.duration("shutdown.deadline", s.deadline.as_deref(), secs(20)),
        }
    }
}
