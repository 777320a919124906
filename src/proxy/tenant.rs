//! The tenants as the data path sees them: one [`Tenant`] value each, owning everything per
//! tenant (its session slot, its rate-limit buckets, the hold after FinHub's own 429, its metric
//! series), looked up by `X-Tenant-ID`. Nothing per tenant lives in a vector that must stay
//! aligned with another.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderValue;

use crate::auth::{SessionSlot, SessionTable};
use crate::config::RetryConfig;
use crate::error::ProxyError;
use crate::policy::ratelimit::{Limiter, TenantLimiter, UpstreamHold};
use crate::proxy::metrics::{ProxyMetrics, RequestSeries};
use crate::proxy::retry::RetryBudget;

/// One tenant: configuration, session, FinHub's 429 hold, metric series.
pub struct Tenant {
    /// The session slot (and the tenant's configuration, `slot.tenant`).
    pub slot: Arc<SessionSlot>,
    /// Its rate-limit buckets (local or in Redis).
    pub limits: Box<dyn TenantLimiter>,
    /// Set when FinHub answered 429 with `Retry-After`: requests wait locally until then.
    pub hold: UpstreamHold,
    /// The tenant's request metrics, resolved once.
    pub series: RequestSeries,
    /// How many retries of FinHub's blips its requests may still make.
    pub retry_budget: RetryBudget,
}

impl Tenant {
    /// The tenant's id (as configured, byte-exact).
    pub fn id(&self) -> &str {
        &self.slot.tenant.id
    }
}

/// Every tenant, by id, with the default one for requests that name none.
pub struct Tenants {
    all: Vec<Arc<Tenant>>,
    by_id: HashMap<String, Arc<Tenant>>,
    default: Arc<Tenant>,
}

impl Tenants {
    /// One [`Tenant`] per session slot of `sessions` (configuration order); `default` is the
    /// index of the default tenant in it. `None` without tenants (config conversion refuses
    /// such a configuration).
    pub fn new(
        sessions: &SessionTable,
        default: usize,
        metrics: &ProxyMetrics,
        limiter: &dyn Limiter,
        retry: &RetryConfig,
    ) -> Option<Tenants> {
        let all: Vec<Arc<Tenant>> = sessions
            .tenants()
            .iter()
            .map(|s| {
                Arc::new(Tenant {
                    series: metrics.request_series(&s.tenant.id),
                    limits: limiter.tenant(&s.tenant.id),
                    hold: UpstreamHold::default(),
                    retry_budget: RetryBudget::new(retry),
                    slot: s.clone(),
                })
            })
            .collect();
        let by_id = all
            .iter()
            .map(|t| (t.id().to_string(), t.clone()))
            .collect();
        // Config conversion guarantees the default is one of the tenants.
        debug_assert!(default < all.len(), "default tenant index out of range");
        let default = all.get(default).or_else(|| all.first()).cloned()?;
        Some(Tenants {
            all,
            by_id,
            default,
        })
    }

    /// The tenant a request selects with `X-Tenant-ID` (byte-exact, A16), or the default.
    pub fn select(&self, header: Option<&HeaderValue>) -> Result<&Arc<Tenant>, ProxyError> {
        match header {
            None => Ok(&self.default),
            Some(h) => {
                let id = h
                    .to_str()
                    .map_err(|_| ProxyError::UnknownTenant("(non-ASCII)".into()))?;
                self.by_id
                    .get(id)
                    .ok_or_else(|| ProxyError::UnknownTenant(id.chars().take(64).collect()))
            }
        }
    }

    /// Every tenant, in configuration order.
    pub fn all(&self) -> &[Arc<Tenant>] {
        &self.all
    }
}
