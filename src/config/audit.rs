//! `[audit]`: where the per-request audit line goes.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::convert::Convert;

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditOutput {
    /// Standard output (the default; container log collectors pick it up).
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Not written.
    Off,
}

/// Audit log settings.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Where the lines go.
    pub output: AuditOutput,
    /// Keep the query string in the logged path.
    pub include_query: bool,
    /// Longest time a line waits in memory before it is written.
    pub flush_interval: Duration,
}

/// `audit.flush_interval` when unset.
pub const DEFAULT_AUDIT_FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// `[audit]` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAudit {
    /// `stdout` (default), `off`, or a file path to append to.
    output: Option<String>,
    /// Keep the query string in the logged path (it may carry personal data); default false.
    #[serde(default)]
    include_query: bool,
    /// Longest time a line waits in memory before it is written (default `100ms`, at most
    /// `10s`); lines are written in batches, earlier when 64 KiB are queued, and all of them at
    /// shutdown.
    flush_interval: Option<String>,
}

impl Convert<'_> {
    /// `[audit]`.
    pub(super) fn audit(&mut self, a: FileAudit) -> AuditConfig {
        AuditConfig {
            output: match a.output.as_deref().map(str::trim) {
                None | Some("stdout") => AuditOutput::Stdout,
                Some("off") => AuditOutput::Off,
                Some("") => {
                    self.err("audit.output", "must be stdout, off, or a file path");
                    AuditOutput::Off
                }
                Some(p) => AuditOutput::File(self.path(PathBuf::from(p))),
            },
            include_query: a.include_query,
            flush_interval: {
                let d = self.duration(
                    "audit.flush_interval",
                    a.flush_interval.as_deref(),
                    DEFAULT_AUDIT_FLUSH_INTERVAL,
                );
                if d > Duration::from_secs(10) {
                    self.err("audit.flush_interval", "must be at most 10s");
                }
                d
            },
        }
    }
}
