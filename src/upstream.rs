//! Where FinHub is: the upstream host resolved once, refreshed in the background.
//!
//! `HttpPeer::new` with a host name would resolve DNS on every request; instead the request path
//! reads the last good address list from an `ArcSwap`. A failed refresh keeps the previous list.
//!
//! What is dialled depends on `[upstream]`: FinHub's host (resolved), the fixed
//! `upstream.connect_to` addresses (no DNS), or the egress proxy's host (resolved), in which
//! case every connection is a CONNECT tunnel to FinHub's host and port ([`crate::egress`]).
//!
//! This is the one dialler to FinHub: the API path hands Pingora [`UpstreamAddrs::pick`] and
//! [`UpstreamAddrs::dial_options`]; the auth client dials with [`UpstreamAddrs::dial`] (TCP or
//! tunnel, then its TLS handshake, each address bounded by `upstream.connect_timeout`), over
//! the same addresses in the same order ([`UpstreamAddrs::order`]).

use std::fmt::Display;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use pingora::connectors::L4Connect;
use pingora::upstreams::peer::PeerOptions;
use tokio::net::TcpStream;

use crate::config::UpstreamConfig;
use crate::egress::{EgressError, EgressMetrics, EgressPath, Tunnel};

/// How long an address that failed to connect is tried only after the others.
pub const BREAKER_BASE: Duration = Duration::from_secs(5);

/// The longest an address stays behind the others after failures in a row.
pub const BREAKER_MAX: Duration = Duration::from_secs(300);

/// A failure this long after an address's breaker closed again starts the count over.
pub const BREAKER_RESET: Duration = Duration::from_secs(60);

/// The bound on one connection attempt (and on its TLS handshake) when `[upstream]` does not
/// say: `upstream.connect_timeout`'s default.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why [`UpstreamAddrs::dial`] found no connection to FinHub. Carries no credential.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// FinHub's host did not resolve.
    #[error("resolving {host}: {error}")]
    Unresolved {
        /// The host looked up.
        host: String,
        /// Why it did not resolve.
        error: std::io::Error,
    },
    /// No address accepted a connection and finished the handshake: one line per address.
    #[error("could not connect to FinHub ({})", .0.join("; "))]
    Unreachable(Vec<String>),
    /// Every address ran out of time (connect or handshake), none refused: one line per
    /// address. The auth call counts it as a timeout, as when its own deadline ends it.
    #[error("no connection to FinHub in time ({})", .0.join("; "))]
    TimedOut(Vec<String>),
    /// The last address tried accepted the connection and failed the TLS handshake.
    #[error("TLS with FinHub: {0}")]
    Handshake(String),
    /// No tunnel through `upstream.egress_proxy` (counted under `path="auth"`).
    #[error("{0}")]
    Egress(EgressError),
}

/// The known addresses, each with its circuit breaker, and the preferred one.
struct Table {
    addrs: Vec<SocketAddr>,
    /// Per address: until when (ms since [`UpstreamAddrs`]'s epoch) it is tried last; 0 never
    /// failed.
    open_until: Vec<AtomicU64>,
    /// Per address: failures in a row.
    failures: Vec<AtomicU32>,
    /// Per address: when it last failed (ms since the epoch): among open addresses the one
    /// that failed longest ago is tried first.
    last_failure: Vec<AtomicU64>,
    /// Index of the address new connections try first.
    preferred: AtomicUsize,
}

impl Table {
    /// A fresh table for `addrs`, keeping the state of addresses `old` also knows.
    fn new(addrs: Vec<SocketAddr>, old: Option<&Table>) -> Table {
        let carried = |i: usize| old.and_then(|o| o.addrs.iter().position(|a| *a == addrs[i]));
        let load = |v: Option<&Vec<AtomicU64>>, j: Option<usize>| {
            v.zip(j).map_or(0, |(v, j)| v[j].load(Ordering::Relaxed))
        };
        let n = addrs.len();
        let open_until = (0..n)
            .map(|i| AtomicU64::new(load(old.map(|o| &o.open_until), carried(i))))
            .collect();
        let last_failure = (0..n)
            .map(|i| AtomicU64::new(load(old.map(|o| &o.last_failure), carried(i))))
            .collect();
        let failures = (0..n)
            .map(|i| {
                AtomicU32::new(
                    old.zip(carried(i))
                        .map_or(0, |(o, j)| o.failures[j].load(Ordering::Relaxed)),
                )
            })
            .collect();
        let preferred = old
            .and_then(|o| {
                let p = o.addrs.get(o.preferred.load(Ordering::Relaxed))?;
                addrs.iter().position(|a| a == p)
            })
            .unwrap_or(0);
        Table {
            addrs,
            open_until,
            failures,
            last_failure,
            preferred: AtomicUsize::new(preferred),
        }
    }

    fn is_open(&self, i: usize, now: u64) -> bool {
        self.open_until[i].load(Ordering::Relaxed) > now
    }

    /// The address to dial now: the preferred one unless its breaker is open, else the next
    /// closed one, else the open one that failed longest ago.
    fn pick(&self, now: u64) -> Option<SocketAddr> {
        let n = self.addrs.len();
        if n == 0 {
            return None;
        }
        let p = self.preferred.load(Ordering::Relaxed) % n;
        if let Some(i) = (0..n).map(|k| (p + k) % n).find(|&i| !self.is_open(i, now)) {
            return Some(self.addrs[i]);
        }
        (0..n)
            .min_by_key(|&i| self.last_failure[i].load(Ordering::Relaxed))
            .map(|i| self.addrs[i])
    }

    /// Every address in dial order at `now`: from the preferred one on, those whose breaker is
    /// open last, the one that failed longest ago first among those (as [`Table::pick`]).
    fn order(&self, now: u64) -> Vec<SocketAddr> {
        let n = self.addrs.len();
        if n == 0 {
            return Vec::new();
        }
        let p = self.preferred.load(Ordering::Relaxed) % n;
        let mut order: Vec<usize> = (0..n).map(|k| (p + k) % n).collect();
        // Stable: closed addresses keep their rotation; open ones go by when they last failed.
        order.sort_by_key(|&i| {
            let open = self.is_open(i, now);
            (
                open,
                open.then(|| self.last_failure[i].load(Ordering::Relaxed)),
            )
        });
        order.into_iter().map(|i| self.addrs[i]).collect()
    }

    /// Records that connecting to `addr` failed; the cool-down it gets, if it is known.
    fn failed(&self, addr: SocketAddr, now: u64) -> Option<Duration> {
        let n = self.addrs.len();
        let i = self.addrs.iter().position(|a| *a == addr)?;
        let until = self.open_until[i].load(Ordering::Relaxed);
        let fresh = until == 0 || now > until.saturating_add(ms(BREAKER_RESET));
        let failures = if fresh {
            self.failures[i].store(1, Ordering::Relaxed);
            1
        } else {
            self.failures[i]
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1)
        };
        let cool = BREAKER_BASE
            .saturating_mul(1 << failures.saturating_sub(1).min(16))
            .min(BREAKER_MAX);
        self.open_until[i].store(now.saturating_add(ms(cool)), Ordering::Relaxed);
        self.last_failure[i].store(now, Ordering::Relaxed);
        if self.preferred.load(Ordering::Relaxed) % n == i {
            let next = (1..n)
                .map(|k| (i + k) % n)
                .find(|&j| !self.is_open(j, now))
                .unwrap_or((i + 1) % n);
            self.preferred.store(next, Ordering::Relaxed);
        }
        Some(cool)
    }
}

/// Whole milliseconds of `d` (saturating).
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The addresses dialled for FinHub, as last resolved, and the tunnel through the egress
/// proxy when there is one.
pub struct UpstreamAddrs {
    host: String,
    port: u16,
    table: ArcSwap<Table>,
    /// The zero of the breakers' clock.
    epoch: Instant,
    /// `upstream.connect_timeout`: bounds each TCP connect (or tunnel) and each TLS handshake.
    connect_timeout: Duration,
    /// The addresses are fixed (`upstream.connect_to`): never resolved.
    fixed: bool,
    tunnel: Option<Arc<dyn L4Connect + Send + Sync>>,
    /// The auth client's tunnel (failures counted under `path="auth"`).
    auth_tunnel: Option<Arc<Tunnel>>,
    /// Why the last auth call could not open a tunnel (`None` once one opened), for `/ready`.
    auth_egress: Mutex<Option<EgressError>>,
}

impl UpstreamAddrs {
    /// An empty table for `host:port`; an IP literal host is "resolved" at once.
    pub fn new(host: &str, port: u16) -> Self {
        let initial = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => Vec::new(),
        };
        UpstreamAddrs {
            host: host.to_string(),
            port,
            table: ArcSwap::from_pointee(Table::new(initial, None)),
            epoch: Instant::now(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            fixed: false,
            tunnel: None,
            auth_tunnel: None,
            auth_egress: Mutex::new(None),
        }
    }

    /// What `u` says to dial: the egress proxy (tunnels to FinHub, failures counted in
    /// `egress`), the fixed `connect_to` addresses, or FinHub's host.
    pub fn for_config(u: &UpstreamConfig, egress: EgressMetrics) -> Self {
        if let Some(p) = &u.egress_proxy {
            let tunnel = Tunnel::new(
                &u.host,
                u.port,
                p.auth.clone(),
                u.connect_timeout,
                egress.clone(),
            );
            let auth = Tunnel::new(&u.host, u.port, p.auth.clone(), u.connect_timeout, egress)
                .for_path(EgressPath::Auth);
            let mut a = UpstreamAddrs::new(&p.host, p.port);
            a.connect_timeout = u.connect_timeout;
            a.tunnel = Some(Arc::new(tunnel));
            a.auth_tunnel = Some(Arc::new(auth));
            return a;
        }
        if !u.connect_to.is_empty() {
            let mut a = UpstreamAddrs::new(&u.host, u.port);
            a.table = ArcSwap::from_pointee(Table::new(u.connect_to.clone(), None));
            a.connect_timeout = u.connect_timeout;
            a.fixed = true;
            return a;
        }
        let mut a = UpstreamAddrs::new(&u.host, u.port);
        a.connect_timeout = u.connect_timeout;
        a
    }

    /// Sets how Pingora dials FinHub for the API path: each connect bounded by
    /// `upstream.connect_timeout`, connect plus TLS handshake by twice that (an address that
    /// accepts and never answers must not hang), through the egress tunnel when there is one.
    pub fn dial_options(&self, options: &mut PeerOptions) {
        options.connection_timeout = Some(self.connect_timeout);
        options.total_connection_timeout = Some(self.connect_timeout.saturating_mul(2));
        options.custom_l4 = self.tunnel.clone();
    }

    /// The known addresses in dial order, as [`UpstreamAddrs::pick`] chooses: from the
    /// preferred one on, those whose breaker is open last, the one that failed longest ago first
    /// among those.
    pub fn order(&self) -> Vec<SocketAddr> {
        self.table.load().order(self.now_ms())
    }

    /// A connection to FinHub for a call outside Pingora (the auth client): each address in
    /// [`UpstreamAddrs::order`] (resolved now if none is known yet) gets a TCP connection, or a
    /// tunnel through the egress proxy, and then `handshake` (TLS): the connect bounded by
    /// `upstream.connect_timeout` and connect plus handshake by twice that, as Pingora bounds
    /// the API path's ([`UpstreamAddrs::dial_options`]); the first that completes is returned.
    /// An address that fails opens its breaker ([`UpstreamAddrs::connect_failed`]), so the next
    /// call (and the API path) starts at another one. A proxy's refusal is its answer and is
    /// not tried on its other addresses. How the tunnel went is published for `/ready`
    /// ([`UpstreamAddrs::auth_egress_failure`]).
    pub async fn dial<S, E, F, Fut>(&self, handshake: F) -> Result<S, DialError>
    where
        F: Fn(TcpStream) -> Fut,
        Fut: Future<Output = Result<S, E>>,
        E: Display,
    {
        if self.count() == 0 {
            if let Err(error) = self.resolve().await {
                return Err(self.unresolved(error));
            }
        }
        let each = self.connect_timeout;
        let mut failures = Vec::new();
        let mut last = None;
        // Whether every address tried so far ran out of time (none refused or failed).
        let mut only_timeouts = true;
        for addr in self.order() {
            // Marks `addr` failed unless the attempt succeeds, also when the caller's own
            // deadline (`auth.request_timeout`) cuts it short after it had its connect time:
            // the next call starts elsewhere.
            let mut attempt = Attempt {
                addrs: self,
                addr,
                started: Instant::now(),
                fair: each,
                fault: Fault::Unknown,
            };
            let deadline = tokio::time::Instant::now() + each.saturating_mul(2);
            let tcp = match &self.auth_tunnel {
                Some(tunnel) => {
                    let opened = tunnel.open(addr).await;
                    self.note_auth_egress(opened.as_ref().err().cloned());
                    match opened {
                        Ok(s) => s,
                        Err(e @ EgressError::Refused(_)) => {
                            // The proxy's answer, not this address's fault.
                            attempt.fault = Fault::No;
                            return Err(DialError::Egress(e));
                        }
                        Err(e) => {
                            attempt.fault = Fault::Yes;
                            only_timeouts = false;
                            last = Some(DialError::Egress(e));
                            continue;
                        }
                    }
                }
                None => match tokio::time::timeout(each, TcpStream::connect(addr)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        attempt.fault = Fault::Yes;
                        only_timeouts = false;
                        failures.push(format!("{addr}: {e}"));
                        last = None;
                        continue;
                    }
                    Err(_) => {
                        attempt.fault = Fault::Yes;
                        failures.push(format!("{addr}: no connection within {each:?}"));
                        last = None;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let e = match tokio::time::timeout_at(deadline, handshake(tcp)).await {
                Ok(Ok(s)) => {
                    attempt.fault = Fault::No;
                    return Ok(s);
                }
                Ok(Err(e)) => {
                    only_timeouts = false;
                    e.to_string()
                }
                Err(_) => format!(
                    "no handshake within {:?} of connecting",
                    each.saturating_mul(2)
                ),
            };
            attempt.fault = Fault::Yes;
            failures.push(format!("{addr}: TLS: {e}"));
            last = Some(DialError::Handshake(e));
        }
        match last {
            Some(DialError::Handshake(_)) | None if only_timeouts && !failures.is_empty() => {
                Err(DialError::TimedOut(failures))
            }
            Some(last) => Err(last),
            None => Err(DialError::Unreachable(failures)),
        }
    }

    /// The failure of a dial whose host did not resolve: through the egress proxy, a tunnel
    /// that could not be opened (counted and published like one).
    fn unresolved(&self, error: std::io::Error) -> DialError {
        let Some(tunnel) = &self.auth_tunnel else {
            return DialError::Unresolved {
                host: self.host.clone(),
                error,
            };
        };
        let e = EgressError::Unreachable(error.kind());
        tunnel.count(&e);
        self.note_auth_egress(Some(e.clone()));
        DialError::Egress(e)
    }

    /// Records how the auth client's last tunnel went (`None`: it opened).
    fn note_auth_egress(&self, failure: Option<EgressError>) {
        if let Ok(mut slot) = self.auth_egress.lock() {
            *slot = failure;
        }
    }

    /// Why the auth client's last tunnel could not be opened, if it could not.
    pub fn auth_egress_failure(&self) -> Option<EgressError> {
        self.auth_egress.lock().ok().and_then(|s| s.clone())
    }

    /// The host whose addresses are dialled (the egress proxy's, with one), for logs.
    pub fn dialled_host(&self) -> &str {
        &self.host
    }

    /// The address a new connection should dial now (module doc: the preferred address unless
    /// its breaker is open, else the next closed one, else the open one that failed longest
    /// ago). A request whose connect failed asks again and gets the next one, since the failure
    /// was recorded with [`UpstreamAddrs::connect_failed`].
    pub fn pick(&self) -> Option<SocketAddr> {
        self.table.load().pick(self.now_ms())
    }

    /// The `n`-th known address (wrapping), in configured or resolved order.
    pub fn pick_nth(&self, n: usize) -> Option<SocketAddr> {
        let t = self.table.load();
        (!t.addrs.is_empty()).then(|| t.addrs[n % t.addrs.len()])
    }

    /// Records that connecting to `addr` failed (TCP, TLS or tunnel): its breaker opens and
    /// new connections prefer another address.
    pub fn connect_failed(&self, addr: SocketAddr) {
        if let Some(cool) = self.table.load().failed(addr, self.now_ms()) {
            tracing::warn!(
                host = %self.host,
                %addr,
                retry_after_ms = ms(cool),
                "cannot connect to this upstream address; trying the others first"
            );
        }
    }

    /// How many addresses are known.
    pub fn count(&self) -> usize {
        self.table.load().addrs.len()
    }

    fn now_ms(&self) -> u64 {
        // +1: 0 means "never failed" in the table.
        ms(self.epoch.elapsed()).saturating_add(1)
    }

    /// Resolves now; on success publishes the new list (IPv4 first) and returns how many.
    pub async fn resolve(&self) -> std::io::Result<usize> {
        if self.fixed || self.host.parse::<IpAddr>().is_ok() {
            return Ok(self.count());
        }
        let mut list: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect();
        if list.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no addresses",
            ));
        }
        list.sort_by_key(|a| (a.is_ipv6(), *a));
        list.dedup();
        let n = list.len();
        let old = self.table.load();
        if old.addrs != list {
            tracing::info!(host = %self.host, addrs = ?list, "upstream DNS updated");
            self.table.store(Arc::new(Table::new(list, Some(&old))));
        }
        Ok(n)
    }

    /// Re-resolves every `interval` forever (a failure is logged and retried sooner); returns
    /// at once for fixed addresses.
    pub async fn refresh_forever(self: Arc<Self>, interval: Duration) {
        if self.fixed {
            return;
        }
        loop {
            let wait = match self.resolve().await {
                Ok(_) => interval,
                Err(e) => {
                    tracing::warn!(host = %self.host, error = %e, "upstream DNS resolution failed; keeping last addresses");
                    interval.min(Duration::from_secs(2))
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// One address being dialled by [`UpstreamAddrs::dial`]: opens its breaker when dropped if
/// the address failed, or if the dial was cut short (the caller's own deadline) after the
/// address had had `fair` time (its connect timeout); cut short sooner, it is not at fault.
struct Attempt<'a> {
    addrs: &'a UpstreamAddrs,
    addr: SocketAddr,
    started: Instant,
    fair: Duration,
    fault: Fault,
}

/// Whether the address being dialled is at fault.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Undecided: the attempt has not ended on its own (yet).
    Unknown,
    /// It refused, reset or ran out of one of the dial's own bounds.
    Yes,
    /// It connected, or the egress proxy refused on its own account.
    No,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let cut_short_late = self.fault == Fault::Unknown && self.started.elapsed() >= self.fair;
        if self.fault == Fault::Yes || cut_short_late {
            self.addrs.connect_failed(self.addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ip_literal_needs_no_lookup_and_localhost_resolves() {
        let a = UpstreamAddrs::new("127.0.0.1", 9443);
        assert_eq!(a.pick_nth(0), Some("127.0.0.1:9443".parse().unwrap()));
        let b = UpstreamAddrs::new("localhost", 9443);
        assert_eq!(b.pick_nth(0), None);
        assert!(b.resolve().await.unwrap() >= 1);
        assert_eq!(b.pick_nth(0).unwrap().port(), 9443);
        assert_eq!(b.pick_nth(b.count()), b.pick_nth(0), "wraps around");
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_failed_address_is_skipped_until_its_breaker_half_opens() {
        let t = Table::new(vec![addr(1), addr(2), addr(3)], None);
        assert_eq!(t.pick(10), Some(addr(1)));
        assert_eq!(t.failed(addr(1), 10), Some(BREAKER_BASE));
        // Every later request goes to the next address at once (where the pool is).
        for now in [11, 100, 4_000] {
            assert_eq!(t.pick(now), Some(addr(2)));
        }
        // Preferred stays with the address that works, even after the breaker's time is up:
        // the failed one is a fallback again (half-open), tried when its turn comes.
        assert_eq!(t.pick(10 + ms(BREAKER_BASE) + 1), Some(addr(2)));
        assert_eq!(t.failed(addr(2), 20_000), Some(BREAKER_BASE));
        assert_eq!(t.pick(20_001), Some(addr(3)));
        assert!(t.failed(addr(99), 1).is_none(), "unknown address: nothing");
    }

    #[test]
    fn failures_in_a_row_double_the_cool_down_and_a_quiet_minute_resets_it() {
        let t = Table::new(vec![addr(1), addr(2)], None);
        let mut now = 1;
        let mut expected = BREAKER_BASE;
        for _ in 0..8 {
            let cool = t.failed(addr(1), now).unwrap();
            assert_eq!(cool, expected.min(BREAKER_MAX));
            now += ms(cool) + 1; // the probe after the cool-down fails again
            expected *= 2;
        }
        assert_eq!(t.failed(addr(1), now).unwrap(), BREAKER_MAX);
        let long_after = now + ms(BREAKER_MAX) + ms(BREAKER_RESET) + 1;
        assert_eq!(t.failed(addr(1), long_after).unwrap(), BREAKER_BASE);
    }

    #[test]
    fn a_request_tries_every_address_once_even_when_all_fail() {
        let t = Table::new(vec![addr(1), addr(2), addr(3)], None);
        let mut tried = Vec::new();
        for now in 1..=3 {
            let a = t.pick(now).unwrap();
            tried.push(a);
            t.failed(a, now);
        }
        tried.sort();
        assert_eq!(tried, [addr(1), addr(2), addr(3)]);
        // All open: the one that failed longest ago first.
        assert_eq!(t.pick(4), Some(addr(1)));
    }

    #[test]
    fn a_new_dns_answer_keeps_what_is_known_about_each_address() {
        let old = Table::new(vec![addr(1), addr(2)], None);
        old.failed(addr(1), 5);
        let new = Table::new(vec![addr(3), addr(2), addr(1)], Some(&old));
        assert_eq!(new.pick(6), Some(addr(2)), "still preferred");
        new.failed(addr(2), 7);
        assert_eq!(new.pick(8), Some(addr(3)), "addr 1 is still cooling down");
    }

    #[test]
    fn the_dial_order_starts_at_the_preferred_address_and_puts_open_breakers_last() {
        let a = UpstreamAddrs::new("finhub.test", 443);
        a.table
            .store(Arc::new(Table::new(vec![addr(1), addr(2), addr(3)], None)));
        assert_eq!(a.order(), [addr(1), addr(2), addr(3)]);
        let t = Table::new(vec![addr(1), addr(2), addr(3)], None);
        t.failed(addr(1), 1);
        assert_eq!(t.order(2), [addr(2), addr(3), addr(1)]);
        t.failed(addr(3), 5);
        assert_eq!(
            t.order(6),
            [addr(2), addr(1), addr(3)],
            "open ones after, the one that failed longest ago first, as pick() chooses"
        );
        assert_eq!(t.pick(6), Some(addr(2)));
        t.failed(addr(2), 7);
        assert_eq!(t.order(8), [addr(1), addr(3), addr(2)]);
        assert_eq!(t.pick(8), Some(addr(1)), "pick and order agree");
    }

    #[tokio::test]
    async fn a_dial_moves_on_after_a_dead_address_and_a_failed_handshake() {
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let l1 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let l2 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (bad, good) = (l1.local_addr().unwrap(), l2.local_addr().unwrap());
        tokio::spawn(async move {
            let keep = (l1.accept().await, l2.accept().await);
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(keep);
        });
        let mut a = UpstreamAddrs::new("finhub.test", 443);
        a.table = ArcSwap::from_pointee(Table::new(vec![dead, bad, good], None));
        a.fixed = true;
        a.connect_timeout = Duration::from_millis(500);
        let dialled = a
            .dial(|tcp| async move {
                let peer = tcp.peer_addr()?;
                if peer == bad {
                    return Err(std::io::Error::other("bad certificate"));
                }
                Ok(peer)
            })
            .await
            .unwrap();
        assert_eq!(dialled, good);
        // Every address fails: the last failure says what went wrong there.
        let e = a
            .dial(|_tcp| async { Err::<(), _>(std::io::Error::other("bad certificate")) })
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "TLS with FinHub: bad certificate");
        // A handshake that never ends is bounded per address.
        let e = a
            .dial(|_tcp| std::future::pending::<Result<(), std::io::Error>>())
            .await
            .unwrap_err();
        assert!(matches!(e, DialError::Handshake(_)), "{e}");
    }

    #[tokio::test]
    async fn a_dial_where_every_address_ran_out_of_time_is_a_timeout_and_opens_their_breakers() {
        // Bound and never accepted: the kernel completes the TCP handshake, TLS never starts.
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (s1, s2) = (l1.local_addr().unwrap(), l2.local_addr().unwrap());
        let mut a = UpstreamAddrs::new("finhub.test", 443);
        a.table = ArcSwap::from_pointee(Table::new(vec![s1, s2], None));
        a.fixed = true;
        a.connect_timeout = Duration::from_millis(50);
        let e = a
            .dial(|_tcp| std::future::pending::<Result<(), std::io::Error>>())
            .await
            .unwrap_err();
        assert!(
            matches!(e, DialError::TimedOut(ref lines) if lines.len() == 2),
            "{e}"
        );
        let now = a.now_ms();
        let t = a.table.load();
        assert!(t.is_open(0, now) && t.is_open(1, now), "both breakers open");
    }
}
