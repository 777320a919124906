//! What each pool shows on `/status`: its mode, the primary in use and its role, the
//! connections held and the failovers followed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What one pool shows on `/status`: its mode, the primary in use and its role.
pub struct PoolView {
    /// `rate_limit` or `session_store`.
    pub pool: &'static str,
    /// `single`, `sentinel` or `cluster`.
    pub mode: &'static str,
    pub(super) state: Mutex<ViewState>,
    /// Connections held now.
    pub(super) connected: AtomicUsize,
}

/// The part of a view that changes together.
#[derive(Default, Clone)]
pub(super) struct ViewState {
    /// `host:port` of the server in use.
    pub(super) primary: Option<String>,
    /// Its `ROLE` as last checked.
    pub(super) role: Option<String>,
    /// Failovers followed since start.
    pub(super) failovers: u64,
}

impl PoolView {
    /// The `/status` entry: mode, primary address, its role as last checked, connections,
    /// failovers followed. Addresses and roles only, never a credential.
    pub fn report(&self) -> serde_json::Value {
        let st = match self.state.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        };
        serde_json::json!({
            "pool": self.pool,
            "mode": self.mode,
            "primary": st.primary,
            "role": st.role,
            "connections": self.connected.load(Ordering::Relaxed),
            "failovers_followed": st.failovers,
        })
    }
}

/// Every pool's view, for `/status` (held by [`super::RedisPoolMetrics`]).
#[derive(Default)]
pub struct PoolViews(Mutex<Vec<Arc<PoolView>>>);

impl PoolViews {
    /// Every pool's `/status` entry.
    pub fn report(&self) -> Vec<serde_json::Value> {
        match self.0.lock() {
            Ok(v) => v.iter().map(|p| p.report()).collect(),
            Err(p) => p.into_inner().iter().map(|p| p.report()).collect(),
        }
    }

    /// Adds a new pool's view.
    pub(super) fn add(&self, view: Arc<PoolView>) {
        match self.0.lock() {
            Ok(mut v) => v.push(view),
            Err(p) => p.into_inner().push(view),
        }
    }
}
