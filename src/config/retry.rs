//! `[retry]`: how the sidecar retries FinHub's blips (connect failures, resets before an answer,
//! gateway 502/503/504, timeouts of safe requests) and how much it may retry per tenant.

use std::time::Duration;

use serde::Deserialize;

use super::convert::{secs, Convert};

/// Retries of one request, and the per-tenant budget that bounds them.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Upstream attempts per app request, the first included (1 = never retry a blip).
    pub max_attempts: u32,
    /// No retry starts later than this after the request arrived.
    pub deadline: Duration,
    /// The first retry's backoff; doubled per retry, with jitter up to the same again.
    pub backoff: Duration,
    /// The longest backoff.
    pub backoff_max: Duration,
    /// The least a keyed mutation waits before it is sent again after its outcome became
    /// unknown (reset or timeout after sending), so an original still running at FinHub has
    /// finished and its key answers with the stored response.
    pub mutation_delay: Duration,
    /// Retries per tenant are at most this fraction of its requests over `budget_window` ...
    pub budget_ratio: f64,
    /// ... plus this many per second (so a quiet tenant can still retry).
    pub budget_min_per_second: u32,
    /// The window over which requests and retries are counted.
    pub budget_window: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 4,
            deadline: secs(10),
            backoff: Duration::from_millis(100),
            backoff_max: secs(2),
            mutation_delay: secs(1),
            budget_ratio: 0.2,
            budget_min_per_second: 5,
            budget_window: secs(10),
        }
    }
}

/// `[retry]` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRetry {
    /// Upstream attempts per app request, the first included, 1 to 10; default 4 (1 turns
    /// retries of blips off; the 401 replay is separate and stays).
    max_attempts: Option<u32>,
    /// No retry starts later than this after the request arrived; default 10 s.
    deadline: Option<String>,
    /// The first retry's backoff, doubled per retry with jitter up to the same again;
    /// default 100 ms.
    backoff: Option<String>,
    /// The longest backoff; default 2 s.
    backoff_max: Option<String>,
    /// The least a keyed mutation waits before it is resent after an unknown outcome (a reset
    /// or timeout after it was sent); default 1 s.
    mutation_delay: Option<String>,
    /// Retries per tenant at most this fraction of its requests (0 to 1); default 0.2.
    budget_ratio: Option<f64>,
    /// Plus this many retries per second per tenant; default 5.
    budget_min_per_second: Option<u32>,
    /// The window over which the budget counts requests and retries; default 10 s.
    budget_window: Option<String>,
}

impl Convert<'_> {
    /// `[retry]`.
    pub(super) fn retry(&mut self, r: FileRetry) -> RetryConfig {
        let d = RetryConfig::default();
        let max_attempts = r.max_attempts.unwrap_or(d.max_attempts);
        if !(1..=10).contains(&max_attempts) {
            self.err(
                "retry.max_attempts",
                format!("{max_attempts} is not between 1 and 10"),
            );
        }
        let budget_ratio = r.budget_ratio.unwrap_or(d.budget_ratio);
        if !(0.0..=1.0).contains(&budget_ratio) {
            self.err(
                "retry.budget_ratio",
                format!("{budget_ratio} is not between 0 and 1"),
            );
        }
        let backoff = self.duration("retry.backoff", r.backoff.as_deref(), d.backoff);
        let backoff_max =
            self.duration("retry.backoff_max", r.backoff_max.as_deref(), d.backoff_max);
        if backoff_max < backoff {
            self.err("retry.backoff_max", "is shorter than retry.backoff");
        }
        RetryConfig {
            max_attempts,
            deadline: self.duration("retry.deadline", r.deadline.as_deref(), d.deadline),
            backoff,
            backoff_max,
            mutation_delay: self.duration_or_zero(
                "retry.mutation_delay",
                r.mutation_delay.as_deref(),
                d.mutation_delay,
            ),
            budget_ratio,
            budget_min_per_second: r.budget_min_per_second.unwrap_or(d.budget_min_per_second),
            budget_window: self.duration(
                "retry.budget_window",
                r.budget_window.as_deref(),
                d.budget_window,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{keys, load, MINIMAL};
    use super::*;

    #[test]
    fn defaults_are_a_banks() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.retry, RetryConfig::default());
        assert_eq!(c.retry.max_attempts, 4);
    }

    #[test]
    fn every_key_is_read() {
        let c = load(&format!(
            "{MINIMAL}[retry]\nmax_attempts = 5\ndeadline = \"4s\"\nbackoff = \"50ms\"\nbackoff_max = \"1s\"\n\
             mutation_delay = \"0s\"\nbudget_ratio = 0.5\nbudget_min_per_second = 1\nbudget_window = \"30s\"\n"
        ))
        .unwrap();
        assert_eq!(c.retry.max_attempts, 5);
        assert_eq!(c.retry.deadline, secs(4));
        assert_eq!(c.retry.backoff, Duration::from_millis(50));
        assert_eq!(c.retry.backoff_max, secs(1));
        assert_eq!(c.retry.mutation_delay, Duration::ZERO);
        assert_eq!(c.retry.budget_ratio, 0.5);
        assert_eq!(c.retry.budget_min_per_second, 1);
        assert_eq!(c.retry.budget_window, secs(30));
    }

    #[test]
    fn wrong_values_name_their_key() {
        assert_eq!(
            keys(&format!("{MINIMAL}[retry]\nmax_attempts = 0\n")),
            vec!["retry.max_attempts"]
        );
        assert_eq!(
            keys(&format!("{MINIMAL}[retry]\nmax_attempts = 11\n")),
            vec!["retry.max_attempts"]
        );
        assert_eq!(
            keys(&format!("{MINIMAL}[retry]\nbudget_ratio = 1.5\n")),
            vec!["retry.budget_ratio"]
        );
        assert_eq!(
            keys(&format!(
                "{MINIMAL}[retry]\nbackoff = \"3s\"\nbackoff_max = \"1s\"\n"
            )),
            vec!["retry.backoff_max"]
        );
        assert_eq!(
            keys(&format!("{MINIMAL}[retry]\ndeadline = \"soon\"\n")),
            vec!["retry.deadline"]
        );
        assert_eq!(
            keys(&format!("{MINIMAL}[retry]\nattempts = 2\n")),
            vec!["retry.attempts"]
        );
    }
}
