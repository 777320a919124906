//! The open app connections, so that a new connection finding every slot taken can close the
//! one idle longest (keep-alive connections between requests).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio::time::Instant;

/// One open app connection as the eviction sees it.
pub(super) struct ConnState {
    /// 0 while a request is being read or served; else when it became idle (ms since the
    /// listener's epoch, + 1).
    idle_since: AtomicU64,
    /// Closes the connection when it is idle.
    pub(super) close: Notify,
}

/// The open app connections, so that a new connection finding every slot taken can close the
/// one idle longest. Locked at connect, at close and on eviction only; a request only stores
/// an atomic.
pub struct IdleConnections {
    epoch: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<ConnState>>>,
    /// New connections waiting for an evicted connection's slot (at most one per eviction).
    pub(super) waiting: AtomicUsize,
}

impl IdleConnections {
    /// No connection yet.
    pub(super) fn new() -> Self {
        IdleConnections {
            epoch: Instant::now(),
            next_id: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            waiting: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnState>>> {
        match self.open.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Registers a new connection (idle until its first bytes arrive).
    pub(super) fn register(self: &Arc<Self>) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            idle_since: AtomicU64::new(self.now()),
            close: Notify::new(),
        });
        self.lock().insert(id, state.clone());
        Registered {
            table: self.clone(),
            id,
            state,
        }
    }

    /// Closes the connection idle longest, if any is idle; whether one was.
    pub(super) fn evict_oldest_idle(&self) -> bool {
        let open = self.lock();
        let victim = open
            .values()
            .filter_map(|c| {
                let since = c.idle_since.load(Ordering::Relaxed);
                (since != 0).then_some((since, c))
            })
            .min_by_key(|(since, _)| *since);
        match victim {
            Some((_, c)) => {
                // Stores a permit: the connection closes at its next idle moment even if a
                // request arrived meanwhile.
                c.close.notify_one();
                true
            }
            None => false,
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }
}

/// A connection's entry in [`IdleConnections`], removed when dropped.
pub(super) struct Registered {
    table: Arc<IdleConnections>,
    id: u64,
    /// Its state, whose `close` fires when it is evicted.
    pub(super) state: Arc<ConnState>,
}

impl Registered {
    /// Marks the connection idle between requests (from now).
    pub(super) fn idle(&self) {
        self.state
            .idle_since
            .store(self.table.now(), Ordering::Relaxed);
    }

    /// Marks the connection reading or serving a request.
    pub(super) fn busy(&self) {
        self.state.idle_since.store(0, Ordering::Relaxed);
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}
