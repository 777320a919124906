//! The data path's metrics: requests by tenant, decision and status class, their duration,
//! FinHub's time to answer, connections new or reused, 401 replays, retries and give-ups, and
//! rate-limit refusals. Registered by [`ProxyMetrics::register`], labels typed (the enums
//! below), per-tenant series resolved once ([`RequestSeries`]), in the style of
//! linkerd2-proxy's `app/core/src/dns/metrics.rs`.

use std::sync::OnceLock;

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

use crate::error::Outcome;
use crate::proxy::retry::Reason;

/// Latency buckets (seconds) for request and upstream durations.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every `status_class` label value, in [`status_class`] order of index.
const STATUS_CLASSES: [&str; 6] = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];

/// The `reused` label of `finhub_sidecar_upstream_connections_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    /// A new connection to FinHub.
    Opened,
    /// A connection from the keep-alive pool.
    Reused,
}

impl Connection {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Connection::Opened => "false",
            Connection::Reused => "true",
        }
    }
}

/// The `outcome` label of `finhub_sidecar_upstream_retries_total`: how a retried request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOutcome {
    /// FinHub's answer reached the app.
    Answered,
    /// It did not.
    GaveUp,
}

impl RetryOutcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryOutcome::Answered => "answered",
            RetryOutcome::GaveUp => "gave_up",
        }
    }
}

/// The `code` label of `finhub_sidecar_upstream_give_ups_total`: what the app got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUp {
    /// The sidecar's own upstream failure, by its stable code (`ProxyError::code`).
    Failed(&'static str),
    /// FinHub's own gateway 502, passed on.
    FinHub502,
    /// FinHub's own gateway 503, passed on.
    FinHub503,
    /// FinHub's own gateway 504, passed on.
    FinHub504,
}

impl GiveUp {
    /// FinHub's gateway answer `status` as a give-up, if it is one (502, 503, 504).
    pub fn finhub_gateway(status: u16) -> Option<GiveUp> {
        match status {
            502 => Some(GiveUp::FinHub502),
            503 => Some(GiveUp::FinHub503),
            504 => Some(GiveUp::FinHub504),
            _ => None,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUp::Failed(code) => code,
            GiveUp::FinHub502 => "finhub_502",
            GiveUp::FinHub503 => "finhub_503",
            GiveUp::FinHub504 => "finhub_504",
        }
    }
}

/// The data path's metric families.
#[derive(Clone)]
pub struct ProxyMetrics {
    /// `finhub_sidecar_requests_total{tenant,decision,status_class}`: every request the proxy
    /// handled; `decision` is `allow` or why the sidecar answered itself, `tenant` is `-` when
    /// the request never got that far.
    requests: IntCounterVec,
    /// `finhub_sidecar_request_duration_seconds{tenant}`: time from request to the end of the
    /// response, as the app sees it.
    request_duration: HistogramVec,
    /// `finhub_sidecar_upstream_duration_seconds`: time from choosing FinHub to its response
    /// header (one observation per attempt).
    upstream_duration: Histogram,
    /// `finhub_sidecar_upstream_connections_total{reused}`: upstream connections used, new
    /// (`false`) or reused from the keep-alive pool (`true`).
    connections: IntCounterVec,
    /// `finhub_sidecar_rate_limited_total{tenant}`: requests refused with 429 by the rate limit
    /// (local or Redis bucket) or by a hold after FinHub's own 429.
    rate_limited: IntCounterVec,
    /// `finhub_sidecar_upstream_401_replays_total{tenant}`: requests replayed once with a
    /// renewed session after FinHub answered 401.
    replays: IntCounterVec,
    /// `finhub_sidecar_upstream_retries_total{reason,outcome}`: attempts sent again, by why
    /// (`connect`, `reset`, `status_502`/`503`/`504`, `timeout`, `unauthorized`) and how the
    /// request ended.
    retries: IntCounterVec,
    /// `finhub_sidecar_upstream_retry_budget_exhausted_total{tenant}`: retries not made because
    /// the tenant's retry budget was spent.
    budget_exhausted: IntCounterVec,
    /// `finhub_sidecar_upstream_give_ups_total{code}`: requests that ended in an upstream
    /// failure although a retry was wanted or made, by the code the app got.
    give_ups: IntCounterVec,
}

impl ProxyMetrics {
    /// The data path's metrics, registered in `registry` (a fresh one: each name once).
    pub fn register(registry: &Registry) -> Self {
        let requests = counter_vec(
            "finhub_sidecar_requests_total",
            "Requests handled by the proxy, by tenant, decision and status class",
            &["tenant", "decision", "status_class"],
        );
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "finhub_sidecar_request_duration_seconds",
                "Time from request to the end of the response",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["tenant"],
        )
        .expect("static metric definition is valid");
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "finhub_sidecar_upstream_duration_seconds",
                "Time from choosing FinHub to its response header, per attempt",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("static metric definition is valid");
        let connections = counter_vec(
            "finhub_sidecar_upstream_connections_total",
            "Upstream connections used, new (reused=false) or from the pool (reused=true)",
            &["reused"],
        );
        for c in [Connection::Reused, Connection::Opened] {
            connections.with_label_values(&[c.as_str()]);
        }
        let rate_limited = counter_vec(
            "finhub_sidecar_rate_limited_total",
            "Requests refused with 429 by the rate limit (local or Redis bucket) or a FinHub 429 hold",
            &["tenant"],
        );
        let replays = counter_vec(
            "finhub_sidecar_upstream_401_replays_total",
            "Requests replayed once with a renewed session after FinHub answered 401",
            &["tenant"],
        );
        let retries = counter_vec(
            "finhub_sidecar_upstream_retries_total",
            "Attempts sent to FinHub again, by reason and by how the request ended",
            &["reason", "outcome"],
        );
        let budget_exhausted = counter_vec(
            "finhub_sidecar_upstream_retry_budget_exhausted_total",
            "Retries not made because the tenant's retry budget was spent",
            &["tenant"],
        );
        let give_ups = counter_vec(
            "finhub_sidecar_upstream_give_ups_total",
            "Requests that ended in an upstream failure although a retry was wanted or made, by the code the app got",
            &["code"],
        );
        let m = ProxyMetrics {
            requests,
            request_duration,
            upstream_duration,
            connections,
            rate_limited,
            replays,
            retries,
            budget_exhausted,
            give_ups,
        };
        crate::registry::register_all(registry, m.collectors());
        m
    }

    /// Creates `tenant`'s series at 0, so a first event is visible to `increase()`.
    pub fn init_tenant(&self, tenant: &str) {
        self.replays.with_label_values(&[tenant]);
        self.budget_exhausted.with_label_values(&[tenant]);
        self.rate_limited.with_label_values(&[tenant]);
    }

    /// The per-request series of `tenant` (`-` for requests refused before a tenant was chosen).
    pub fn request_series(&self, tenant: &str) -> RequestSeries {
        RequestSeries {
            tenant: tenant.to_string(),
            requests: self.requests.clone(),
            cells: Default::default(),
            duration: self.request_duration.with_label_values(&[tenant]),
            rate_limited: self.rate_limited.with_label_values(&[tenant]),
            replays: self.replays.with_label_values(&[tenant]),
            budget_exhausted: self.budget_exhausted.with_label_values(&[tenant]),
        }
    }

    /// The counter of upstream connections of kind `c` (resolve once, count per connection).
    pub fn connections(&self, c: Connection) -> IntCounter {
        self.connections.with_label_values(&[c.as_str()])
    }

    /// Observes FinHub's time to answer one attempt, in seconds.
    pub fn observe_upstream(&self, secs: f64) {
        self.upstream_duration.observe(secs);
    }

    /// Counts `n` retries for `reason` of a request that ended as `outcome`.
    pub fn count_retries(&self, reason: Reason, outcome: RetryOutcome, n: u8) {
        self.retries
            .with_label_values(&[reason.label(), outcome.as_str()])
            .inc_by(u64::from(n));
    }

    /// Counts a request that ended in an upstream failure although a retry was wanted or made.
    pub fn count_give_up(&self, code: GiveUp) {
        self.give_ups.with_label_values(&[code.as_str()]).inc();
    }

    fn collectors(&self) -> [Box<dyn Collector>; 9] {
        [
            Box::new(self.requests.clone()),
            Box::new(self.request_duration.clone()),
            Box::new(self.upstream_duration.clone()),
            Box::new(self.connections.clone()),
            Box::new(self.rate_limited.clone()),
            Box::new(self.replays.clone()),
            Box::new(self.retries.clone()),
            Box::new(self.budget_exhausted.clone()),
            Box::new(self.give_ups.clone()),
        ]
    }
}

/// One tenant's per-request series (or the `-` pseudo-tenant's), resolved once: the request path
/// does no label lookup. A `requests_total` series is created on first use, as before.
pub struct RequestSeries {
    tenant: String,
    requests: IntCounterVec,
    /// `[outcome][status class index]`.
    cells: [[OnceLock<IntCounter>; 6]; Outcome::ALL.len()],
    /// `request_duration_seconds{tenant}`.
    pub duration: Histogram,
    /// `rate_limited_total{tenant}`.
    pub rate_limited: IntCounter,
    /// `upstream_401_replays_total{tenant}`.
    pub replays: IntCounter,
    /// `upstream_retry_budget_exhausted_total{tenant}`.
    pub budget_exhausted: IntCounter,
}

impl RequestSeries {
    /// Counts one request in `requests_total{tenant, decision, status_class}` for a response
    /// `status` (0: none).
    pub fn count_request(&self, outcome: Outcome, status: u16) {
        let class = class_index(status);
        self.cells[outcome as usize][class]
            .get_or_init(|| {
                self.requests.with_label_values(&[
                    self.tenant.as_str(),
                    outcome.label(),
                    STATUS_CLASSES[class],
                ])
            })
            .inc();
    }
}

/// `2xx`..`5xx` for a status code; `none` when no response was sent.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

/// The index of `status`'s class in [`STATUS_CLASSES`].
fn class_index(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100),
        _ => 0,
    }
}

/// An `IntCounterVec` of a static definition.
fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("static metric definition is valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn request_series_count_into_the_labelled_series() {
        let m = Metrics::new();
        let s = ProxyMetrics::register(m.registry()).request_series("t1");
        s.count_request(Outcome::Allow, 204);
        s.count_request(Outcome::Allow, 200);
        s.count_request(Outcome::RateLimited, 429);
        s.count_request(Outcome::InternalError, 0);
        s.duration.observe(0.01);
        let text = String::from_utf8(m.render()).unwrap();
        for line in [
            r#"finhub_sidecar_requests_total{decision="allow",status_class="2xx",tenant="t1"} 2"#,
            r#"finhub_sidecar_requests_total{decision="rate_limited",status_class="4xx",tenant="t1"} 1"#,
            r#"finhub_sidecar_requests_total{decision="internal_error",status_class="none",tenant="t1"} 1"#,
            r#"finhub_sidecar_request_duration_seconds_count{tenant="t1"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        for status in [0, 99, 100, 199, 200, 599, 600, 1000] {
            assert_eq!(
                STATUS_CLASSES[match status {
                    100..=599 => usize::from(status / 100),
                    _ => 0,
                }],
                status_class(status)
            );
        }
    }

    #[test]
    fn typed_labels_keep_their_values() {
        assert_eq!(Connection::Opened.as_str(), "false");
        assert_eq!(Connection::Reused.as_str(), "true");
        assert_eq!(RetryOutcome::GaveUp.as_str(), "gave_up");
        assert_eq!(
            GiveUp::finhub_gateway(503).map(GiveUp::as_str),
            Some("finhub_503")
        );
        assert_eq!(GiveUp::finhub_gateway(500), None);
        assert_eq!(
            GiveUp::Failed("upstream_timeout").as_str(),
            "upstream_timeout"
        );
    }
}
