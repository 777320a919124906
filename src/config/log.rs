//! `[log]`: the diagnostic log's format and level.

use serde::Deserialize;

/// Default of `log.level`, also the filter used when a level does not parse.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line (default; for log shippers).
    Json,
    /// Human-readable lines for a terminal.
    Text,
}

/// Logging settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info` or `finhub_sidecar=debug`; `RUST_LOG` wins.
    pub level: String,
}

/// `[log]` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLog {
    /// `json` (default) or `text`.
    format: Option<LogFormat>,
    /// Filter directive; default `info`. `RUST_LOG` overrides it.
    level: Option<String>,
}

impl FileLog {
    /// `[log]` (nothing in it can be wrong beyond what serde checks).
    pub(super) fn convert(self) -> LogConfig {
        LogConfig {
            format: self.format.unwrap_or(LogFormat::Json),
            level: self.level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.into()),
        }
    }
}
