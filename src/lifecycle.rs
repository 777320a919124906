//! Process lifecycle: readiness latch, in-flight accounting and graceful drain.
//!
//! Pingora closes its listeners the moment it sees SIGTERM, which would refuse requests the app
//! is still sending. So the sidecar catches SIGTERM (and `POST /shutdown`) itself:
//!
//! 1. `/ready` turns 503 at once ([`Lifecycle::is_draining`]);
//! 2. the proxy keeps serving new and in-flight requests for `shutdown.drain_delay`;
//! 3. it then waits (up to `shutdown.deadline`) until no request is in flight;
//! 4. then runs the work registered with [`Lifecycle::on_drained`] (the sessions' logout),
//!    bounded;
//! 5. only then is Pingora told to shut down gracefully (listeners close, runtimes stop), and the
//!    process exits 0.
//!
//! SIGQUIT drains like SIGTERM; SIGINT (Ctrl-C in a terminal) skips the drain and the logout;
//! SIGHUP, SIGUSR1, SIGUSR2 and SIGALRM are logged and ignored ([`HANDLED_SIGNALS`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::sync::Notify;

use crate::metrics::Metrics;

/// Work to run once the drain is complete, before the process stops.
pub type DrainedHook = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Shared shutdown state.
pub struct Lifecycle {
    /// Registered with [`Lifecycle::on_drained`]: the hook and its bound.
    drained: Mutex<Option<(DrainedHook, Duration)>>,
    draining: AtomicBool,
    in_flight: AtomicI64,
    idle: Notify,
    shutdown_requested: Notify,
    drain_delay: Duration,
    deadline: Duration,
    metrics: Metrics,
}

impl Lifecycle {
    /// A running (not draining) lifecycle.
    pub fn new(drain_delay: Duration, deadline: Duration, metrics: Metrics) -> Arc<Self> {
        Arc::new(Lifecycle {
            drained: Mutex::new(None),
            draining: AtomicBool::new(false),
            in_flight: AtomicI64::new(0),
            idle: Notify::new(),
            shutdown_requested: Notify::new(),
            drain_delay,
            deadline,
            metrics,
        })
    }

    /// Whether shutdown has begun (readiness is false from then on).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Requests currently being handled.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Starts a graceful shutdown, as SIGTERM does (used by `POST /shutdown`).
    pub fn request_shutdown(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.shutdown_requested.notify_one();
    }

    /// Runs `hook` once the drain is complete (no request in flight, or the deadline passed),
    /// giving up on it after `within`. One hook; a later call replaces it.
    pub fn on_drained(&self, within: Duration, hook: DrainedHook) {
        let mut slot = match self.drained.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        *slot = Some((hook, within));
    }

    /// Marks one request in flight until the guard is dropped.
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.metrics.requests_in_flight.inc();
        InFlight(self.clone())
    }

    async fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        tracing::info!(
            drain_delay_ms = self.drain_delay.as_millis() as u64,
            "shutdown requested: not ready; still serving during the drain delay"
        );
        tokio::time::sleep(self.drain_delay).await;
        let waited = tokio::time::timeout(self.deadline, async {
            loop {
                let idle = self.idle.notified();
                if self.in_flight() <= 0 {
                    return;
                }
                idle.await;
            }
        })
        .await;
        match waited {
            Ok(()) => tracing::info!("no request in flight; stopping"),
            Err(_) => tracing::warn!(
                in_flight = self.in_flight(),
                "drain deadline reached with requests in flight; stopping anyway"
            ),
        }
        let hook = match self.drained.lock() {
            Ok(mut s) => s.take(),
            Err(p) => p.into_inner().take(),
        };
        if let Some((hook, within)) = hook {
            let started = Instant::now();
            if tokio::time::timeout(within, hook()).await.is_err() {
                tracing::warn!(
                    within_ms = within.as_millis() as u64,
                    "shutdown work did not finish in time; stopping anyway"
                );
            }
            tracing::info!(
                took_ms = started.elapsed().as_millis() as u64,
                "shutdown work done"
            );
        }
    }
}

/// One in-flight request; decrements the count when dropped (also on errors and cancellation).
pub struct InFlight(Arc<Lifecycle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.requests_in_flight.dec();
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) <= 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// What a signal does to the sidecar (README, Operations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalAction {
    /// The graceful drain, then logout and exit 0 (SIGTERM, SIGQUIT).
    Drain,
    /// Stop at once, without drain or logout (SIGINT).
    Stop,
    /// Logged at INFO and otherwise ignored (SIGHUP, SIGUSR1, SIGUSR2, SIGALRM): their default
    /// action would kill the process with no drain and no logout.
    Ignore,
}

/// The signals the sidecar handles, with what each does. Every other signal keeps its default.
pub const HANDLED_SIGNALS: [(libc::c_int, &str, SignalAction); 7] = [
    (libc::SIGTERM, "SIGTERM", SignalAction::Drain),
    (libc::SIGQUIT, "SIGQUIT", SignalAction::Drain),
    (libc::SIGINT, "SIGINT", SignalAction::Stop),
    (libc::SIGHUP, "SIGHUP", SignalAction::Ignore),
    (libc::SIGUSR1, "SIGUSR1", SignalAction::Ignore),
    (libc::SIGUSR2, "SIGUSR2", SignalAction::Ignore),
    (libc::SIGALRM, "SIGALRM", SignalAction::Ignore),
];

/// Ignores every handled signal but SIGINT and SIGTERM until [`DrainingSignal`] installs its
/// handlers, so that a stray signal in the first moments of the process does not kill it
/// (SIGINT and SIGTERM keep their default until then: stopping a sidecar that is still
/// starting loses nothing). Call once, first thing in `run`.
pub fn ignore_signals_until_handled() {
    for (signal, _, action) in HANDLED_SIGNALS {
        if action != SignalAction::Stop && signal != libc::SIGTERM {
            // SAFETY: SIG_IGN for a valid, catchable signal number; no handler code runs.
            unsafe {
                libc::signal(signal, libc::SIG_IGN);
            }
        }
    }
}

/// The handlers of [`HANDLED_SIGNALS`], each with its action.
struct Signals(Vec<(tokio::signal::unix::Signal, &'static str, SignalAction)>);

impl Signals {
    /// Installs a handler for each handled signal; `None` if any cannot be installed.
    fn install() -> Option<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        HANDLED_SIGNALS
            .iter()
            .map(|&(n, name, action)| {
                signal(SignalKind::from_raw(n))
                    .ok()
                    .map(|s| (s, name, action))
            })
            .collect::<Option<Vec<_>>>()
            .map(Signals)
    }

    /// The next signal that arrives: its name and action.
    async fn next(&mut self) -> (&'static str, SignalAction) {
        std::future::poll_fn(|cx| {
            for (s, name, action) in &mut self.0 {
                if s.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready((*name, *action));
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}

/// Pingora's shutdown trigger: resolves only after the drain is complete.
pub struct DrainingSignal(pub Arc<Lifecycle>);

#[async_trait]
impl ShutdownSignalWatch for DrainingSignal {
    async fn recv(&self) -> ShutdownSignal {
        let Some(mut signals) = Signals::install() else {
            tracing::error!("cannot install signal handlers; shutdown only via POST /shutdown");
            self.0.shutdown_requested.notified().await;
            self.0.drain().await;
            return ShutdownSignal::GracefulTerminate;
        };
        loop {
            tokio::select! {
                _ = self.0.shutdown_requested.notified() => break,
                (name, action) = signals.next() => match action {
                    SignalAction::Drain => {
                        tracing::info!(signal = name, "graceful shutdown requested");
                        break;
                    }
                    SignalAction::Stop => {
                        tracing::info!(signal = name, "stopping without drain");
                        self.0.draining.store(true, Ordering::SeqCst);
                        return ShutdownSignal::FastShutdown;
                    }
                    SignalAction::Ignore => {
                        tracing::info!(signal = name, "signal ignored (SIGTERM or SIGQUIT drains, SIGINT stops)");
                    }
                },
            }
        }
        // During the drain, SIGINT (an impatient operator) still stops at once; the others
        // change nothing.
        let drain = self.0.drain();
        tokio::pin!(drain);
        loop {
            tokio::select! {
                _ = &mut drain => return ShutdownSignal::GracefulTerminate,
                (name, action) = signals.next() => {
                    if action == SignalAction::Stop {
                        tracing::info!(signal = name, "stopping now, during the drain");
                        return ShutdownSignal::FastShutdown;
                    }
                    tracing::info!(signal = name, "already draining");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fatal_by_default_signal_an_operator_may_send_is_handled() {
        let action = |n| {
            HANDLED_SIGNALS
                .iter()
                .find(|(s, _, _)| *s == n)
                .map(|(_, _, a)| *a)
        };
        assert_eq!(action(libc::SIGTERM), Some(SignalAction::Drain));
        assert_eq!(action(libc::SIGQUIT), Some(SignalAction::Drain));
        assert_eq!(action(libc::SIGINT), Some(SignalAction::Stop));
        for s in [libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2, libc::SIGALRM] {
            assert_eq!(action(s), Some(SignalAction::Ignore), "{s}");
        }
    }

    #[tokio::test]
    async fn drain_waits_for_in_flight_requests() {
        let l = Lifecycle::new(
            Duration::from_millis(10),
            Duration::from_secs(5),
            Metrics::new(),
        );
        let guard = l.track();
        assert_eq!(l.in_flight(), 1);
        let l2 = l.clone();
        let drained = tokio::spawn(async move { l2.drain().await });
        tokio::task::yield_now().await;
        assert!(l.is_draining());
        assert!(!drained.is_finished());
        drop(guard);
        tokio::time::timeout(Duration::from_secs(5), drained)
            .await
            .expect("drain finishes once idle")
            .unwrap();
        assert_eq!(l.in_flight(), 0);
    }

    #[tokio::test]
    async fn the_drained_hook_runs_after_the_last_request_and_is_bounded() {
        let l = Lifecycle::new(Duration::ZERO, Duration::from_secs(5), Metrics::new());
        let guard = l.track();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let in_flight_when_run = Arc::new(AtomicI64::new(-1));
        let (l2, seen) = (l.clone(), in_flight_when_run.clone());
        l.on_drained(
            Duration::from_millis(200),
            Box::new(move || {
                Box::pin(async move {
                    seen.store(l2.in_flight(), Ordering::SeqCst);
                    let _ = tx.send(());
                    // Never finishes on its own: the bound ends it.
                    std::future::pending::<()>().await;
                })
            }),
        );
        let l3 = l.clone();
        let drained = tokio::spawn(async move { l3.drain().await });
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err(), "not while a request is in flight");
        drop(guard);
        tokio::time::timeout(Duration::from_secs(5), drained)
            .await
            .expect("the bound ends a hook that hangs")
            .unwrap();
        assert!(rx.try_recv().is_ok());
        assert_eq!(in_flight_when_run.load(Ordering::SeqCst), 0);
    }
}
