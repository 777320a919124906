//! Sending a request to FinHub again: one state per request for every kind of retry — the 401
//! replay after a renewal, and FinHub's blips (connect failure, reset before an answer, gateway
//! 502/503/504, a timeout of a safe request) — and the per-tenant budget that bounds them.
//!
//! A request is resent only when it can be sent again unchanged: its body is held whole and it
//! is safe (GET, HEAD, OPTIONS) or carries an `X-Idempotency-Key`, which every attempt repeats,
//! so FinHub answers a repeat with the original response instead of executing it twice.
//! Nothing is retried once a byte of FinHub's answer went to the app.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::Method;
use rand::Rng;

use crate::config::RetryConfig;

/// Why an attempt is sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// FinHub refused the session (401): renewed, sent once more.
    Unauthorized,
    /// The connection (TCP, TLS, egress tunnel) could not be opened: nothing was sent.
    Connect,
    /// The connection broke before FinHub's answer header arrived.
    Reset,
    /// FinHub's gateway answered 502.
    BadGateway,
    /// FinHub's gateway answered 503.
    Unavailable,
    /// FinHub's gateway answered 504.
    GatewayTimeout,
    /// FinHub did not answer in time (safe methods only).
    Timeout,
}

impl Reason {
    /// Every reason, in label order.
    pub const ALL: [Reason; 7] = [
        Reason::Unauthorized,
        Reason::Connect,
        Reason::Reset,
        Reason::BadGateway,
        Reason::Unavailable,
        Reason::GatewayTimeout,
        Reason::Timeout,
    ];

    /// The `reason` metric label and audit value.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Unauthorized => "unauthorized",
            Reason::Connect => "connect",
            Reason::Reset => "reset",
            Reason::BadGateway => "status_502",
            Reason::Unavailable => "status_503",
            Reason::GatewayTimeout => "status_504",
            Reason::Timeout => "timeout",
        }
    }

    /// A gateway status FinHub's blips produce, as a reason.
    pub fn of_status(status: u16) -> Option<Reason> {
        match status {
            502 => Some(Reason::BadGateway),
            503 => Some(Reason::Unavailable),
            504 => Some(Reason::GatewayTimeout),
            _ => None,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How an attempt failed before FinHub's answer header arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection: FinHub saw nothing of this attempt.
    Connect,
    /// The connection broke (reset, closed, malformed answer) after the request was sent.
    Reset,
    /// No answer within `upstream.read_timeout` after the request was sent.
    Timeout,
}

/// Why a wanted retry was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The request cannot be sent again unchanged (body streamed, or an unkeyed mutation).
    NotResendable,
    /// `retry.max_attempts` reached.
    Attempts,
    /// The backoff would start the attempt after `retry.deadline`.
    Deadline,
    /// The tenant's retry budget is spent.
    Budget,
}

/// One request's attempts.
#[derive(Debug)]
pub struct Retry {
    /// The body is held whole and the method is safe or the request is keyed.
    resendable: bool,
    /// GET, HEAD or OPTIONS.
    safe: bool,
    /// It carries an `X-Idempotency-Key`.
    keyed: bool,
    /// Attempts whose request went (or was being sent) to FinHub, and connect attempts.
    attempts: u32,
    /// A retry was decided; the next upstream error is its signal.
    pending: Option<Reason>,
    /// Wait this long before the next attempt.
    delay: Option<Duration>,
    /// Retries made, by reason.
    made: [u8; Reason::ALL.len()],
    /// The reason of the last retry, for the audit line.
    last: Option<Reason>,
    /// The 401 replay was made (never twice).
    replayed: bool,
    /// An attempt was sent and no answer to it was seen: FinHub may have executed it.
    maybe_executed: bool,
    /// A retry was wanted and refused by the limits.
    refused: Option<Refusal>,
}

impl Retry {
    /// The state of a request with `method`, keyed or not, whose body is held whole or not.
    pub fn new(method: &Method, keyed: bool, body_whole: bool) -> Retry {
        let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        Retry {
            resendable: body_whole && (safe || keyed),
            safe,
            keyed,
            attempts: 0,
            pending: None,
            delay: None,
            made: [0; Reason::ALL.len()],
            last: None,
            replayed: false,
            maybe_executed: false,
            refused: None,
        }
    }

    /// The body turned out to be held whole (or not) once read.
    pub fn set_body_whole(&mut self, whole: bool) {
        self.resendable = whole && (self.safe || self.keyed);
    }

    /// Whether the request can be sent again unchanged.
    pub fn resendable(&self) -> bool {
        self.resendable
    }

    /// An attempt starts (a connection is picked or opened for it). A retry decided for the
    /// previous attempt was carried out by now: nothing pending survives into this one.
    pub fn start_attempt(&mut self) {
        self.attempts += 1;
        self.pending = None;
    }

    /// Upstream attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The reason of the last retry, if any.
    pub fn last_reason(&self) -> Option<Reason> {
        self.last
    }

    /// Retries made, by reason.
    pub fn made(&self) -> impl Iterator<Item = (Reason, u8)> + '_ {
        Reason::ALL
            .into_iter()
            .map(|r| (r, self.made[r.index()]))
            .filter(|(_, n)| *n > 0)
    }

    /// Whether any retry was made.
    pub fn retried(&self) -> bool {
        self.last.is_some()
    }

    /// Whether the 401 replay was made.
    pub fn replayed(&self) -> bool {
        self.replayed
    }

    /// Whether FinHub may have executed an attempt whose answer was lost (an unsafe request):
    /// then no later failure can say it was surely not sent.
    pub fn outcome_unknown(&self) -> bool {
        self.maybe_executed && !self.safe
    }

    /// The limit that stopped a wanted retry, if one did.
    pub fn refused(&self) -> Option<Refusal> {
        self.refused
    }

    /// FinHub answered 401: whether the request may be replayed once after a renewal.
    pub fn wants_replay(&self) -> bool {
        self.resendable && !self.replayed
    }

    /// The renewal arrived: the next attempt is the replay (no backoff).
    pub fn replay(&mut self) {
        self.replayed = true;
        self.decide(Reason::Unauthorized, Duration::ZERO);
    }

    /// FinHub answered `status` (with `Retry-After` of `retry_after`): the delay before the
    /// next attempt if the answer is a blip to retry, or why not.
    pub fn after_status(
        &mut self,
        status: u16,
        retry_after: Option<Duration>,
        limits: &Limits<'_>,
    ) -> Option<Duration> {
        let reason = Reason::of_status(status)?;
        self.try_retry(reason, retry_after, limits)
    }

    /// An attempt failed with `failure` before an answer header: whether to send it again (the
    /// delay is then taken by [`Retry::take_delay`]). `sent`: the request header went out.
    /// The caller acts on the answer at once: nothing is left pending.
    pub fn after_failure(&mut self, failure: Failure, sent: bool, limits: &Limits<'_>) -> bool {
        let retry = self.decide_failure(failure, sent, limits);
        self.pending = None;
        retry
    }

    fn decide_failure(&mut self, failure: Failure, sent: bool, limits: &Limits<'_>) -> bool {
        if sent && failure != Failure::Connect {
            self.maybe_executed = true;
        }
        let reason = match failure {
            Failure::Connect => Reason::Connect,
            Failure::Reset => Reason::Reset,
            // A keyed mutation that timed out may still be running at FinHub: FinHub does not
            // document what a concurrent duplicate does, so only safe requests are resent.
            Failure::Timeout if !self.safe => {
                self.refused = Some(Refusal::NotResendable);
                return false;
            }
            Failure::Timeout => Reason::Timeout,
        };
        // Nothing was sent: any request may go again (a streamed body was not read yet).
        if failure == Failure::Connect && !self.resendable {
            return self.try_retry_unchecked(reason, None, limits).is_some();
        }
        self.try_retry(reason, None, limits).is_some()
    }

    /// On an upstream error: whether it is the signal of a decided retry.
    pub fn take_pending(&mut self) -> bool {
        self.pending.take().is_some()
    }

    /// The wait before the next attempt, once.
    pub fn take_delay(&mut self) -> Option<Duration> {
        self.delay.take()
    }

    fn try_retry(
        &mut self,
        reason: Reason,
        retry_after: Option<Duration>,
        limits: &Limits<'_>,
    ) -> Option<Duration> {
        if !self.resendable {
            self.refused = Some(Refusal::NotResendable);
            return None;
        }
        self.try_retry_unchecked(reason, retry_after, limits)
    }

    fn try_retry_unchecked(
        &mut self,
        reason: Reason,
        retry_after: Option<Duration>,
        limits: &Limits<'_>,
    ) -> Option<Duration> {
        let c = limits.config;
        if self.attempts >= c.max_attempts {
            self.refused = Some(Refusal::Attempts);
            return None;
        }
        let retries: u32 = self.made.iter().map(|&n| u32::from(n)).sum();
        let mut delay = backoff(c, retries, limits.jitter);
        if self.maybe_executed && !self.safe {
            delay = delay.max(c.mutation_delay);
        }
        if let Some(after) = retry_after {
            delay = delay.max(after);
        }
        if limits.elapsed + delay > c.deadline {
            self.refused = Some(Refusal::Deadline);
            return None;
        }
        if !limits.budget.withdraw(limits.now) {
            self.refused = Some(Refusal::Budget);
            return None;
        }
        self.decide(reason, delay);
        Some(delay)
    }

    fn decide(&mut self, reason: Reason, delay: Duration) {
        self.pending = Some(reason);
        self.delay = (!delay.is_zero()).then_some(delay);
        self.made[reason.index()] = self.made[reason.index()].saturating_add(1);
        self.last = Some(reason);
        self.refused = None;
    }
}

/// What bounds a retry decision, as of now.
pub struct Limits<'a> {
    /// `[retry]`.
    pub config: &'a RetryConfig,
    /// The tenant's budget.
    pub budget: &'a RetryBudget,
    /// Since the request arrived.
    pub elapsed: Duration,
    /// Now (for the budget window).
    pub now: Instant,
    /// A value in `[0, 1)`: the backoff's jitter.
    pub jitter: f64,
}

impl<'a> Limits<'a> {
    /// The limits for a request that arrived at `start`, with fresh jitter.
    pub fn now(config: &'a RetryConfig, budget: &'a RetryBudget, start: Instant) -> Self {
        let now = Instant::now();
        Limits {
            config,
            budget,
            elapsed: now.saturating_duration_since(start),
            now,
            jitter: rand::rng().random::<f64>(),
        }
    }
}

/// The `n`-th retry's backoff (`n` from 0): `backoff × 2^n`, capped, plus up to as much again
/// (jitter), never above `backoff_max`.
fn backoff(c: &RetryConfig, n: u32, jitter: f64) -> Duration {
    let base = c
        .backoff
        .saturating_mul(1u32 << n.min(16))
        .min(c.backoff_max);
    base.saturating_add(base.mul_f64(jitter.clamp(0.0, 1.0)))
        .min(c.backoff_max.max(base))
}

/// A tenant's retry budget (linkerd2-proxy's and Finagle's): over a sliding window, retries
/// are at most `ratio` × requests plus `min_per_second` × the window. Lock-free; the counts
/// of the previous window fade out linearly over the current one.
#[derive(Debug)]
pub struct RetryBudget {
    window: Duration,
    ratio: f64,
    floor: f64,
    origin: Instant,
    /// Index of the current window since `origin`.
    epoch: AtomicU64,
    requests: [AtomicU64; 2],
    retries: [AtomicU64; 2],
}

impl RetryBudget {
    /// A budget as `[retry]` configures it.
    pub fn new(c: &RetryConfig) -> RetryBudget {
        RetryBudget {
            window: c.budget_window.max(Duration::from_millis(1)),
            ratio: c.budget_ratio,
            floor: f64::from(c.budget_min_per_second) * c.budget_window.as_secs_f64(),
            origin: Instant::now(),
            epoch: AtomicU64::new(0),
            requests: [AtomicU64::new(0), AtomicU64::new(0)],
            retries: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    /// A request arrived (each one earns `ratio` of a retry).
    pub fn deposit(&self, now: Instant) {
        let e = self.roll(now);
        self.requests[(e % 2) as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if it has one.
    pub fn withdraw(&self, now: Instant) -> bool {
        let e = self.roll(now);
        let (cur, prev) = ((e % 2) as usize, ((e + 1) % 2) as usize);
        let fade = 1.0 - self.position(now);
        let requests = self.requests[cur].load(Ordering::Relaxed) as f64
            + fade * self.requests[prev].load(Ordering::Relaxed) as f64;
        let retries = self.retries[cur].load(Ordering::Relaxed) as f64
            + fade * self.retries[prev].load(Ordering::Relaxed) as f64;
        if retries + 1.0 > self.floor + self.ratio * requests {
            return false;
        }
        // Take the retry, then check again that no concurrent withdrawal took the last one.
        let taken = self.retries[cur].fetch_add(1, Ordering::Relaxed) as f64 + 1.0;
        let prev = fade * self.retries[prev].load(Ordering::Relaxed) as f64;
        if taken + prev > self.floor + self.ratio * requests {
            self.retries[cur].fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// How far into the current window `now` is, in `[0, 1)`.
    fn position(&self, now: Instant) -> f64 {
        let w = self.window.as_nanos().max(1);
        let t = now.saturating_duration_since(self.origin).as_nanos();
        (t % w) as f64 / w as f64
    }

    /// The current window's index, clearing the slot of a window that starts anew.
    fn roll(&self, now: Instant) -> u64 {
        let w = self.window.as_nanos().max(1);
        let e = (now.saturating_duration_since(self.origin).as_nanos() / w) as u64;
        let seen = self.epoch.load(Ordering::Relaxed);
        if e > seen
            && self
                .epoch
                .compare_exchange(seen, e, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // The slot of window `e` held window `e - 2`: clear it; if more than one window
            // passed, the previous one is stale too.
            let (cur, prev) = ((e % 2) as usize, ((e + 1) % 2) as usize);
            self.requests[cur].store(0, Ordering::Relaxed);
            self.retries[cur].store(0, Ordering::Relaxed);
            if e > seen + 1 {
                self.requests[prev].store(0, Ordering::Relaxed);
                self.retries[prev].store(0, Ordering::Relaxed);
            }
        }
        e.max(seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RetryConfig {
        RetryConfig::default()
    }

    fn limits<'a>(c: &'a RetryConfig, b: &'a RetryBudget, elapsed_ms: u64) -> Limits<'a> {
        Limits {
            config: c,
            budget: b,
            elapsed: Duration::from_millis(elapsed_ms),
            now: b.origin,
            jitter: 0.0,
        }
    }

    #[test]
    fn only_whole_safe_or_keyed_requests_are_resent() {
        assert!(Retry::new(&Method::GET, false, true).resendable());
        assert!(Retry::new(&Method::OPTIONS, false, true).resendable());
        assert!(Retry::new(&Method::POST, true, true).resendable());
        assert!(!Retry::new(&Method::POST, false, true).resendable());
        assert!(
            !Retry::new(&Method::GET, false, false).resendable(),
            "streamed"
        );
        assert!(
            !Retry::new(&Method::PATCH, true, false).resendable(),
            "streamed"
        );
        let mut chunked = Retry::new(&Method::POST, true, false);
        chunked.set_body_whole(true);
        assert!(chunked.resendable(), "a chunked body read whole");
        let mut unkeyed = Retry::new(&Method::POST, false, false);
        unkeyed.set_body_whole(true);
        assert!(!unkeyed.resendable());
    }

    #[test]
    fn gateway_statuses_are_retried_with_growing_backoff() {
        let c = RetryConfig {
            max_attempts: 3,
            ..config()
        };
        let b = RetryBudget::new(&c);
        let mut r = Retry::new(&Method::GET, false, true);
        r.start_attempt();
        assert_eq!(r.after_status(200, None, &limits(&c, &b, 0)), None);
        assert_eq!(r.after_status(404, None, &limits(&c, &b, 0)), None);
        assert_eq!(
            r.after_status(503, None, &limits(&c, &b, 0)),
            Some(Duration::from_millis(100))
        );
        assert!(r.take_pending());
        assert!(!r.take_pending(), "one signal per decision");
        assert_eq!(r.take_delay(), Some(Duration::from_millis(100)));
        r.start_attempt();
        assert_eq!(
            r.after_status(502, None, &limits(&c, &b, 300)),
            Some(Duration::from_millis(200))
        );
        r.start_attempt();
        assert_eq!(r.after_status(504, None, &limits(&c, &b, 600)), None);
        assert_eq!(r.refused(), Some(Refusal::Attempts));
        assert_eq!(r.attempts(), 3);
        let made: Vec<_> = r.made().collect();
        assert_eq!(
            made,
            vec![(Reason::BadGateway, 1), (Reason::Unavailable, 1)]
        );
        assert_eq!(r.last_reason(), Some(Reason::BadGateway));
    }

    #[test]
    fn retry_after_within_the_deadline_is_waited_a_far_one_passes_through() {
        let c = config();
        let b = RetryBudget::new(&c);
        let mut r = Retry::new(&Method::GET, false, true);
        r.start_attempt();
        assert_eq!(
            r.after_status(503, Some(Duration::from_secs(2)), &limits(&c, &b, 0)),
            Some(Duration::from_secs(2))
        );
        let mut r = Retry::new(&Method::GET, false, true);
        r.start_attempt();
        assert_eq!(
            r.after_status(503, Some(Duration::from_secs(120)), &limits(&c, &b, 0)),
            None
        );
        assert_eq!(r.refused(), Some(Refusal::Deadline));
    }

    #[test]
    fn a_lost_answer_to_a_keyed_mutation_waits_for_the_original() {
        let c = config();
        let b = RetryBudget::new(&c);
        let mut r = Retry::new(&Method::POST, true, true);
        r.start_attempt();
        assert!(r.after_failure(Failure::Reset, true, &limits(&c, &b, 0)));
        assert_eq!(r.take_delay(), Some(c.mutation_delay));
        assert!(r.outcome_unknown());
        assert!(
            !r.take_pending(),
            "a failure's decision is acted on at once, never left pending"
        );
        // A GET's lost answer is retried at the ordinary backoff and is never "unknown".
        let mut g = Retry::new(&Method::GET, false, true);
        g.start_attempt();
        assert!(g.after_failure(Failure::Reset, true, &limits(&c, &b, 0)));
        assert_eq!(g.take_delay(), Some(c.backoff));
        assert!(!g.outcome_unknown());
    }

    #[test]
    fn timeouts_resend_only_safe_requests() {
        let c = config();
        let b = RetryBudget::new(&c);
        let mut post = Retry::new(&Method::POST, true, true);
        post.start_attempt();
        assert!(!post.after_failure(Failure::Timeout, true, &limits(&c, &b, 0)));
        assert!(post.outcome_unknown());
        let mut get = Retry::new(&Method::GET, false, true);
        get.start_attempt();
        assert!(get.after_failure(Failure::Timeout, true, &limits(&c, &b, 0)));
    }

    #[test]
    fn a_connect_failure_resends_anything_nothing_was_sent() {
        let c = config();
        let b = RetryBudget::new(&c);
        let mut streamed = Retry::new(&Method::POST, true, false);
        streamed.start_attempt();
        assert!(streamed.after_failure(Failure::Connect, false, &limits(&c, &b, 0)));
        assert!(!streamed.outcome_unknown(), "nothing was sent");
        // But a reset of a streamed body is never resent.
        streamed.start_attempt();
        assert!(!streamed.after_failure(Failure::Reset, true, &limits(&c, &b, 0)));
        assert_eq!(streamed.refused(), Some(Refusal::NotResendable));
        assert!(streamed.outcome_unknown());
    }

    #[test]
    fn the_401_replay_is_made_once() {
        let mut r = Retry::new(&Method::GET, false, true);
        assert!(r.wants_replay());
        r.replay();
        assert!(r.replayed());
        assert!(r.take_pending());
        assert_eq!(r.take_delay(), None, "no backoff after a renewal");
        assert!(!r.wants_replay(), "never twice");
        assert!(!Retry::new(&Method::POST, false, true).wants_replay());
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let c = config();
        assert_eq!(backoff(&c, 0, 0.0), Duration::from_millis(100));
        assert_eq!(backoff(&c, 0, 0.5), Duration::from_millis(150));
        assert_eq!(backoff(&c, 1, 0.0), Duration::from_millis(200));
        assert_eq!(backoff(&c, 3, 0.99), Duration::from_millis(1592));
        assert_eq!(backoff(&c, 4, 0.99), c.backoff_max);
        assert_eq!(backoff(&c, u32::MAX, 0.0), c.backoff_max);
    }

    #[test]
    fn the_budget_is_a_ratio_of_requests_plus_a_floor() {
        let c = RetryConfig {
            budget_ratio: 0.2,
            budget_min_per_second: 1,
            budget_window: Duration::from_secs(10),
            ..config()
        };
        let b = RetryBudget::new(&c);
        let t = b.origin;
        // Floor: 10 retries over the window with no requests at all.
        let floor = (0..100).filter(|_| b.withdraw(t)).count();
        assert_eq!(floor, 10);
        // 100 requests earn 20 more.
        for _ in 0..100 {
            b.deposit(t);
        }
        let earned = (0..100).filter(|_| b.withdraw(t)).count();
        assert_eq!(earned, 20);
        // Two windows later everything is forgotten.
        let later = t + Duration::from_secs(25);
        assert_eq!((0..100).filter(|_| b.withdraw(later)).count(), 10);
    }

    #[test]
    fn a_spent_budget_refuses_the_retry() {
        let c = RetryConfig {
            budget_ratio: 0.0,
            budget_min_per_second: 0,
            ..config()
        };
        let b = RetryBudget::new(&c);
        let mut r = Retry::new(&Method::GET, false, true);
        r.start_attempt();
        assert_eq!(r.after_status(503, None, &limits(&c, &b, 0)), None);
        assert_eq!(r.refused(), Some(Refusal::Budget));
    }
}
