//! What `/status` shows about a tenant's place in the fleet ([`FleetStatus`]): a plain value,
//! written by the fleet's bookkeeping (`state.rs`) and kept in the tenant's slot beside its
//! `TenantStatus`.

/// What `/status` shows about a tenant's shared session (no secret).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FleetStatus {
    /// `ok` or `unavailable`.
    pub store: &'static str,
    /// Whether this replica holds the renewal lease.
    pub lease_owner: bool,
    /// `shared` (from the store), `local` (this replica's own login or renewal) or `none`.
    pub source: &'static str,
    /// Generation of the shared record last seen or written.
    pub generation: u64,
    /// The key id of a live record this replica cannot decrypt.
    pub undecryptable_key_id: Option<String>,
    /// This replica's id in the lease.
    pub replica: String,
}
