//! Fleet-shared sessions (`auth.session_store = "redis"`): one FinHub session per tenant for
//! every replica that uses the same Redis and key prefix.
//!
//! - **Lease.** One replica at a time owns a tenant's renewals: it holds
//!   `<prefix><tenant>:lease` (`<replica>:<fence>`, set `NX PX lease_ttl`, extended by its
//!   owner), where the fence comes from `INCR <prefix><tenant>:fence`, so every new owner has a
//!   higher one. The owner renews (refresh or login, the same plan as a single replica) and
//!   writes the session with [`WRITE_SCRIPT`], which refuses a writer that no longer holds the
//!   lease or whose fence or generation is not newer than the record's: a paused or
//!   partitioned former owner cannot overwrite a newer session.
//! - **Record.** `<prefix><tenant>:session`, a hash: `v`, `kid` (key id), `nonce`, `ct`
//!   (AES-256-GCM ciphertext of the token, refresh token, session id and expiry data, base64),
//!   `gen`, `fence`, `owner`; it expires with the session. Only ciphertext of a secret is ever
//!   in Redis; the associated data binds it to its key, tenant, generation and fence.
//! - **Followers** read the record (with the lease and renewal requests, one pipelined round
//!   trip) at start and every `poll_interval`, and publish a newer one into the tenant's slot:
//!   the data path is unchanged. A replica never logs in while a readable shared session is
//!   usable.
//! - **401 on a follower**: it asks the owner (`<prefix><tenant>:renew` = the generation FinHub
//!   refused) and waits up to `follow_timeout` for a newer generation, then renews on its own.
//! - **Steering values** (`:renew`, `:backoff`, `:rejected`) carry an HMAC tag under a key
//!   derived from the session key ([`KeyRing::sign`]) and are bounded by what a sidecar writes;
//!   they are re-read at every look and never kept, and none keeps a follower from renewing its
//!   own session before it becomes unusable ([`own_renewal_at`]).
//! - **Failures**: store unavailable → keep the last good session, renew on its own when due
//!   (`on_store_error = "local"`) or never (`"wait"`); a record this replica cannot decrypt →
//!   error metric and a log line naming the key id, own login, and it never takes the lease (so
//!   never overwrites a record the others can read) while that record lives.

mod crypto;

pub use crypto::{KeyRing, OpenError, Sealed, SessionKey};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use redis::Script;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use http::HeaderValue;

use super::clock::{from_unix_us, unix_us, us, ClockOffset, OffsetBounds};
use super::grant::{self, Claims};
use super::plan::{
    forced_spacing, window_surely_open_us, Planned, Step, MAX_RETRY_AFTER, REJECTED_MAX,
};
use super::renew::{unix_secs, Renewer};
use super::session::{sensitive, FinHubSession};
use super::slot::SessionTable;
use crate::config::{OnStoreError, SharedSessionSettings, TenantConfig};
use crate::metrics::Metrics;
use crate::redis_pool::{Failure, Pool, PoolSpec};
use crate::secret::Secret;

/// Takes or extends the lease. `KEYS`: lease, fence. `ARGV`: replica id, ttl ms, the highest
/// fence of an authenticated record this replica has seen. Returns `{1, fence}` when this
/// replica holds it, `{0, fence}` when another does, `{-1, 0}` when the lease or fence is not
/// one this code writes (another type, garbage, longer than 256 bytes, a lease without a TTL, a
/// fence beyond 2^53): a corrupt lease must not make every replica follow forever. A lease of
/// this replica's with a fence below that highest one (forged, or a fence counter set back) is
/// replaced by a fresh fence, as is a new fence not above it: the next write is then not
/// refused for an old fence. Values are formatted with `%d`: Lua's `..` writes numbers above
/// 1e14 as `1e+14`.
pub const ACQUIRE_SCRIPT: &str = r#"
local max = 9007199254740992
local seen = tonumber(ARGV[3]) or 0
local function fresh()
  local ft = redis.call('TYPE', KEYS[2]).ok
  if ft ~= 'none' and ft ~= 'string' then return nil end
  local r = redis.pcall('INCR', KEYS[2])
  if type(r) ~= 'number' or r >= max then return nil end
  if r <= seen then
    r = seen + 1
    if r >= max then return nil end
    redis.call('SET', KEYS[2], string.format('%d', r))
  end
  redis.call('SET', KEYS[1], string.format('%s:%d', ARGV[1], r), 'PX', ARGV[2])
  return r
end
local t = redis.call('TYPE', KEYS[1]).ok
if t ~= 'none' then
  if t ~= 'string' or redis.call('STRLEN', KEYS[1]) > 256 then return {-1, 0} end
  local owner, f = string.match(redis.call('GET', KEYS[1]), '^(.*):(%d+)$')
  local n = tonumber(f)
  if not owner or not n or n >= max then return {-1, 0} end
  if owner == ARGV[1] then
    if n < seen then
      local r = fresh()
      if not r then return {-1, 0} end
      return {1, r}
    end
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, n}
  end
  if redis.call('PTTL', KEYS[1]) < 0 then return {-1, 0} end
  return {0, n}
end
local r = fresh()
if not r then return {-1, 0} end
return {1, r}
"#;

/// Writes the record if the writer holds the lease with its fence and both fence and generation
/// are not older than the stored record's. `KEYS`: record, lease, backoff. `ARGV`: replica id,
/// fence, generation, key id, nonce, ciphertext, ttl ms. Returns 1, or a negative refusal: -1
/// not the lease holder, -2 an older fence, -3 not a newer generation, -4 the record key holds
/// another type (or fence or generation fields longer than 32 bytes). Fields are set first and
/// stale ones removed after (no moment without a record, even if a step fails); a written
/// session ends the fleet's auth backoff.
pub const WRITE_SCRIPT: &str = r#"
local t = redis.call('TYPE', KEYS[1]).ok
if t ~= 'none' and t ~= 'hash' then return -4 end
if redis.call('HSTRLEN', KEYS[1], 'fence') > 32 or redis.call('HSTRLEN', KEYS[1], 'gen') > 32 then return -4 end
if redis.call('TYPE', KEYS[2]).ok ~= 'string' or redis.call('STRLEN', KEYS[2]) > 256 then return -1 end
if redis.call('GET', KEYS[2]) ~= ARGV[1] .. ':' .. ARGV[2] then return -1 end
local f = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0') or 0
local g = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0') or 0
if tonumber(ARGV[2]) < f then return -2 end
if tonumber(ARGV[3]) <= g then return -3 end
redis.call('HSET', KEYS[1], 'v', '1', 'kid', ARGV[4], 'nonce', ARGV[5], 'ct', ARGV[6], 'gen', ARGV[3], 'fence', ARGV[2], 'owner', ARGV[1])
local known = {v = true, kid = true, nonce = true, ct = true, gen = true, fence = true, owner = true}
for _, k in ipairs(redis.call('HKEYS', KEYS[1])) do
  if not known[k] then redis.call('HDEL', KEYS[1], k) end
end
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('DEL', KEYS[3])
return 1
"#;

/// Reads a tenant's keys in one round trip, checking types and sizes in Redis (a hostile or
/// broken value is neither transferred nor decoded). `KEYS`: record, renew, rejected, backoff.
/// `ARGV`: the largest field accepted (bytes). Returns `{state, fields, renew, rejected,
/// backoff}`: state 0 no record, 1 a record (`fields` its `HGETALL`), 2 the key holds another
/// type, 3 too large; a small value is nil unless it is a short string.
pub const READ_SCRIPT: &str = r#"
local max = tonumber(ARGV[1])
local function small(k)
  if redis.call('TYPE', k).ok ~= 'string' then return false end
  if redis.call('STRLEN', k) > 256 then return false end
  return redis.call('GET', k)
end
local t = redis.call('TYPE', KEYS[1]).ok
local state, fields = 0, {}
if t == 'hash' then
  state = 1
  if redis.call('HLEN', KEYS[1]) > 16 then
    state = 3
  else
    for _, k in ipairs(redis.call('HKEYS', KEYS[1])) do
      if #k > 16 or redis.call('HSTRLEN', KEYS[1], k) > max then state = 3 end
    end
  end
  if state == 1 then fields = redis.call('HGETALL', KEYS[1]) end
elseif t ~= 'none' then
  state = 2
end
return {state, fields, small(KEYS[2]), small(KEYS[3]), small(KEYS[4])}
"#;

/// Gives the lease up if this replica holds it. `KEYS`: lease. `ARGV`: replica id.
pub const RELEASE_SCRIPT: &str = r#"
if redis.call('TYPE', KEYS[1]).ok ~= 'string' or redis.call('STRLEN', KEYS[1]) > 256 then return 0 end
local cur = redis.call('GET', KEYS[1])
if string.match(cur, '^(.*):%d+$') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The largest record field read (the ciphertext of a session is about 2 KiB).
pub const MAX_FIELD_BYTES: usize = 16 * 1024;

/// An owner without a session gives its lease to another replica after this many failed
/// attempts in a row (transient ones; rejected credentials are never rotated).
const YIELD_AFTER_FAILURES: u32 = 3;

/// While waiting for the owner's renewal after a 401, the record is read this often.
const FOLLOW_POLL: Duration = Duration::from_millis(50);

/// The longest fleet backoff a replica honours: the longest wait the sidecar itself ever
/// writes (FinHub's `Retry-After` is honoured up to 15 min; without one the backoff is at most
/// 30 s, or `auth.recovery_interval`).
const MAX_STORED_BACKOFF: Duration = MAX_RETRY_AFTER;
/// Failure and rejection counts read from the store are capped here (the waits they drive are
/// capped long before).
const MAX_STORED_COUNT: u32 = 16;
/// Slack for another replica's clock when a stored time is bounded.
const CLOCK_SLACK: Duration = Duration::from_secs(5);
/// The shortest grace a follower gives the owner's planned renewal ([`owner_grace_us`]).
const MIN_OWNER_GRACE: Duration = Duration::from_millis(50);
/// A refused write (the lease or record belongs to another owner) is logged at most this often.
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(60);

/// Lease changes logged at info per minute (more are logged at debug).
const LEASE_LINES_PER_MINUTE: u32 = 6;

/// At most this many distinct key ids are metric labels (a hostile store cannot grow the
/// exposition without bound); others count as `other`.
const MAX_KEY_ID_LABELS: usize = 16;

/// The shared store: the Redis pool, the scripts and the keys. One per process.
pub struct FleetStore {
    pool: Arc<Pool>,
    settings: SharedSessionSettings,
    replica: String,
    acquire: Script,
    write: Script,
    read: Script,
    release: Script,
    metrics: Metrics,
    key_id_labels: Mutex<HashSet<String>>,
}

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

/// A record as read from Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawRecord {
    sealed: Sealed,
    generation: u64,
    fence: u64,
}

/// One read of a tenant's keys.
#[derive(Debug, Default, PartialEq, Eq)]
struct Snapshot {
    record: Option<Result<RawRecord, String>>,
    /// Why the record key holds nothing this code writes (another type, too large, not
    /// text): an unreadable record, not a store outage.
    malformed: Option<&'static str>,
    /// The small keys as read (`renew`, `rejected`, `backoff`), not yet authenticated.
    raw: [Option<String>; 3],
    /// A follower's authenticated request to renew (`<prefix><tenant>:renew`).
    renew_requested: Option<RenewRequest>,
    /// Credentials FinHub rejected (`<prefix><tenant>:rejected`), authenticated and bounded.
    rejected: Option<Marker>,
    /// The fleet's auth backoff (`<prefix><tenant>:backoff`), authenticated and bounded.
    backoff: Option<Backoff>,
}

/// `<prefix><tenant>:renew`: `<generation>:<asked at, unix ms>`, tagged ([`KeyRing::sign`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RenewRequest {
    generation: u64,
    at_ms: i64,
}

/// `<prefix><tenant>:rejected`: `<fingerprint>:<retry at, unix ms>:<rejections>`, tagged.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Marker {
    fingerprint: String,
    until_us: i64,
    rejections: u32,
}

/// `<prefix><tenant>:backoff`: `<next attempt, unix ms>:<failures in a row>:<generation>`,
/// tagged; written by an owner after a failed auth call, honoured by every owner after it
/// while no newer record than `generation` was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backoff {
    until_us: i64,
    failures: u32,
    generation: u64,
}

/// The lease as [`ACQUIRE_SCRIPT`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    /// This replica holds it, with this fence.
    Held(u64),
    /// Another replica does.
    Other,
    /// Not a lease this code writes (garbage, no TTL, another type, a fence beyond 2^53).
    Corrupt,
}

/// The encrypted part of a record.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct Payload {
    token: String,
    refresh_token: Option<String>,
    session_id: String,
    obtained_us: i64,
    received_us: i64,
    validity_us: i64,
    expiry_us: i64,
    on_finhub_clock: bool,
    window_known: bool,
    at_least_us: i64,
    at_most_us: i64,
    /// The writer's estimate of FinHub's clock offset.
    offset_lo_us: Option<i64>,
    offset_hi_us: Option<i64>,
}

impl FleetStore {
    /// The store for `settings` (connections are made by [`FleetStore::keep_connected`]).
    pub fn new(settings: &SharedSessionSettings, metrics: &Metrics) -> Arc<FleetStore> {
        let scripts = [ACQUIRE_SCRIPT, WRITE_SCRIPT, READ_SCRIPT, RELEASE_SCRIPT];
        let pool = Pool::new(PoolSpec {
            connection: settings.connection.clone(),
            topology: settings.topology.clone(),
            name: "session_store",
            metrics: metrics.clone(),
            password: settings.password.clone(),
            ca_pem: settings.ca_pem.clone(),
            connect_timeout: settings.connect_timeout,
            timeout: settings.timeout,
            connections: 1,
            scripts: scripts.iter().map(|s| Script::new(s)).collect(),
            gauge: metrics.session_store_connections.clone(),
            purpose: "session store",
            meanwhile: "sessions follow auth.shared.on_store_error",
        });
        for kind in [
            "timeout",
            "connection",
            "unavailable",
            "response",
            "malformed",
        ] {
            metrics.session_store_errors.with_label_values(&[kind]);
        }
        Arc::new(FleetStore {
            pool: Arc::new(pool),
            settings: settings.clone(),
            replica: replica_id(),
            acquire: Script::new(ACQUIRE_SCRIPT),
            write: Script::new(WRITE_SCRIPT),
            read: Script::new(READ_SCRIPT),
            release: Script::new(RELEASE_SCRIPT),
            metrics: metrics.clone(),
            key_id_labels: Mutex::new(HashSet::new()),
        })
    }

    /// Keeps the store's connection up, forever (a background task).
    pub async fn keep_connected(self: Arc<Self>) {
        self.pool.clone().keep_connected().await
    }

    /// Waits (up to twice the connect timeout) for the first connection, so that a replica
    /// starting next to a working store reads it before deciding to log in.
    async fn connected(&self) {
        let deadline = Instant::now() + self.settings.connect_timeout * 2;
        while self.pool.connected() == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// This replica's id in leases (`HOSTNAME`, i.e. the pod name, plus a random suffix).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// `<prefix><tenant>:<what>`; with Redis Cluster `<prefix>{<tenant>}:<what>` (one slot
    /// per tenant, so each script touches one slot).
    fn key(&self, tenant: &str, what: &str) -> String {
        self.pool
            .tenant_key(&self.settings.key_prefix, tenant, what)
    }

    fn failed(&self, f: Failure) -> Failure {
        self.metrics
            .session_store_errors
            .with_label_values(&[f.label()])
            .inc();
        self.metrics.session_store_up.set(0);
        f
    }

    fn answered(&self) {
        self.metrics.session_store_up.set(1);
    }

    /// The record, a pending renewal request, the rejected-credentials marker and the fleet's
    /// backoff, in one round trip ([`READ_SCRIPT`]).
    async fn snapshot(&self, tenant: &str) -> Result<Snapshot, Failure> {
        let mut inv = self.read.key(self.key(tenant, "session"));
        inv.key(self.key(tenant, "renew"))
            .key(self.key(tenant, "rejected"))
            .key(self.key(tenant, "backoff"))
            .arg(MAX_FIELD_BYTES);
        let v = self
            .pool
            .call(|mut c| async move { inv.invoke_async::<redis::Value>(&mut c).await })
            .await
            .map_err(|f| self.failed(f))?;
        self.answered();
        let mut snap = parse_snapshot(v);
        let now_us = unix_us(SystemTime::now());
        let keys = &self.settings.keys;
        let [renew, rejected, backoff] = &snap.raw;
        snap.renew_requested = renew.as_deref().and_then(|raw| {
            verified_renew(
                keys,
                &self.key(tenant, "renew"),
                raw,
                now_us,
                self.settings.follow_timeout * 2,
            )
        });
        snap.rejected = rejected
            .as_deref()
            .and_then(|raw| verified_marker(keys, &self.key(tenant, "rejected"), raw, now_us));
        snap.backoff = backoff.as_deref().and_then(|raw| {
            verified_backoff(
                keys,
                &self.key(tenant, "backoff"),
                raw,
                now_us,
                self.settings.lease_ttl,
            )
        });
        if let Some(kind) = snap.malformed {
            self.metrics
                .session_store_errors
                .with_label_values(&["malformed"])
                .inc();
            tracing::debug!(tenant, why = kind, "the shared record key holds no record");
        }
        Ok(snap)
    }

    /// Takes or extends the lease (in a `finhub.session.lease` span); a fence not above `seen`
    /// (the highest fence of an authenticated record this replica knows) is replaced by a fresh
    /// one.
    async fn acquire(&self, tenant: &str, seen: u64) -> Result<Lease, Failure> {
        let span = crate::telemetry::BackgroundSpan::start("finhub.session.lease", tenant);
        let lease = self.acquire_lease(tenant, seen).await;
        span.end(match &lease {
            Ok(Lease::Held(_)) => "held",
            Ok(Lease::Other) => "other",
            Ok(Lease::Corrupt) => "corrupt",
            Err(_) => "error",
        });
        lease
    }

    async fn acquire_lease(&self, tenant: &str, seen: u64) -> Result<Lease, Failure> {
        let mut inv = self.acquire.key(self.key(tenant, "lease"));
        inv.key(self.key(tenant, "fence"))
            .arg(&self.replica)
            .arg(self.settings.lease_ttl.as_millis() as u64)
            .arg(seen);
        let (held, fence) = self
            .pool
            .call(|mut c| async move { inv.invoke_async::<(i64, i64)>(&mut c).await })
            .await
            .map_err(|f| self.failed(f))?;
        self.answered();
        Ok(match held {
            1 if fence > 0 => Lease::Held(fence as u64),
            0 => Lease::Other,
            _ => Lease::Corrupt,
        })
    }

    /// The fingerprint of `tenant`'s credentials as they are now (see [`KeyRing::fingerprint`]).
    fn credentials_fingerprint(&self, tenant: &TenantConfig) -> String {
        let password = tenant.password.current();
        let secret = tenant.customer_secret.as_ref().map(|s| s.current());
        self.settings.keys.fingerprint(&[
            tenant.id.as_bytes(),
            tenant.username.as_bytes(),
            password.expose().as_bytes(),
            secret.as_ref().map_or(&b""[..], |s| s.expose().as_bytes()),
        ])
    }

    /// Tells the fleet FinHub rejected the credentials with `fingerprint` (until `until_us`),
    /// so replicas holding the same ones do not try them again meanwhile.
    async fn mark_rejected(&self, tenant: &str, marker: &Marker) -> Result<(), Failure> {
        let key = self.key(tenant, "rejected");
        let ttl_ms = ((marker.until_us - unix_us(SystemTime::now())) / 1000).max(1);
        let value = format!(
            "{}:{}:{}",
            marker.fingerprint,
            marker.until_us / 1000,
            marker.rejections
        );
        let Some(signed) = self.settings.keys.sign(&key, &value) else {
            return Ok(());
        };
        self.set_px(key, signed, ttl_ms).await
    }

    /// Tells every later owner when the next auth attempt may be made.
    async fn set_backoff(&self, tenant: &str, b: Backoff) -> Result<(), Failure> {
        let key = self.key(tenant, "backoff");
        let left_ms = (b.until_us - unix_us(SystemTime::now())) / 1000;
        let ttl_ms = left_ms.max(0) + self.settings.lease_ttl.as_millis() as i64;
        let value = format!("{}:{}:{}", b.until_us / 1000, b.failures, b.generation);
        let Some(signed) = self.settings.keys.sign(&key, &value) else {
            return Ok(());
        };
        self.set_px(key, signed, ttl_ms).await
    }

    async fn set_px(&self, key: String, value: String, ttl_ms: i64) -> Result<(), Failure> {
        self.pool
            .call(|mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("PX")
                    .arg(ttl_ms.max(1))
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
            .map_err(|f| self.failed(f))?;
        self.answered();
        Ok(())
    }

    /// Gives the lease up (at shutdown), best effort.
    async fn release(&self, tenant: &str) {
        let mut inv = self.release.key(self.key(tenant, "lease"));
        inv.arg(&self.replica);
        let _ = self
            .pool
            .call(|mut c| async move { inv.invoke_async::<i64>(&mut c).await })
            .await;
    }

    /// Asks the owner to renew generation `generation` (FinHub refused it).
    async fn ask_renewal(&self, tenant: &str, generation: u64) -> Result<(), Failure> {
        let ttl = i64::try_from((self.settings.follow_timeout * 2).as_millis()).unwrap_or(i64::MAX);
        let key = self.key(tenant, "renew");
        let value = format!("{generation}:{}", unix_us(SystemTime::now()) / 1000);
        let Some(signed) = self.settings.keys.sign(&key, &value) else {
            return Ok(());
        };
        self.set_px(key, signed, ttl).await
    }

    /// Encrypts `s` and writes it as generation `generation` under the lease with `fence`.
    /// `Ok(false)`: refused (the lease or a newer record belongs to another replica).
    async fn write(
        &self,
        tenant: &str,
        fence: u64,
        generation: u64,
        s: &FinHubSession,
    ) -> Result<bool, Failure> {
        let now = SystemTime::now();
        let ttl_ms = record_ttl_us(s, now) / 1000;
        if ttl_ms <= 0 {
            return Ok(false);
        }
        let record_key = self.key(tenant, "session");
        let payload = payload_of(s);
        // Sized for the secrets and the JSON around them: a reallocation would leave a copy
        // of the plaintext behind in freed memory.
        let secrets = payload.token.len()
            + payload.refresh_token.as_ref().map_or(0, String::len)
            + payload.session_id.len();
        let mut plain = Zeroizing::new(Vec::with_capacity(2 * secrets + 1024));
        if serde_json::to_writer(&mut *plain, &payload).is_err() {
            return Ok(false);
        }
        let aad = aad(&record_key, tenant, generation, fence);
        let Some(sealed) = self.settings.keys.seal(aad.as_bytes(), &plain) else {
            return Ok(false);
        };
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut inv = self.write.key(&record_key);
        inv.key(self.key(tenant, "lease"))
            .key(self.key(tenant, "backoff"))
            .arg(&self.replica)
            .arg(fence)
            .arg(generation)
            .arg(&sealed.key_id)
            .arg(b64.encode(sealed.nonce))
            .arg(b64.encode(&sealed.ciphertext))
            .arg(ttl_ms);
        let r = self
            .pool
            .call(|mut c| async move { inv.invoke_async::<i64>(&mut c).await })
            .await
            .map_err(|f| self.failed(f))?;
        self.answered();
        Ok(r == 1)
    }

    /// Decrypts a record of `tenant`.
    fn open(&self, tenant: &str, raw: &RawRecord) -> Result<Payload, OpenError> {
        let aad = aad(
            &self.key(tenant, "session"),
            tenant,
            raw.generation,
            raw.fence,
        );
        let plain = self.settings.keys.open(aad.as_bytes(), &raw.sealed)?;
        serde_json::from_slice(&plain).map_err(|_| OpenError::Corrupt)
    }

    fn count_decrypt_error(&self, key_id: &str) {
        let label = {
            let mut seen = match self.key_id_labels.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            if seen.contains(key_id) || seen.len() < MAX_KEY_ID_LABELS {
                seen.insert(key_id.to_string());
                key_id.to_string()
            } else {
                "other".to_string()
            }
        };
        self.metrics
            .session_decrypt_errors
            .with_label_values(&[label.as_str()])
            .inc();
    }
}

/// How long a record of `s` written at `now` lives: as long as FinHub may still take the token
/// (its expiry at the offset's lower bound, within FinHub's own count) plus a second. Readers
/// judge usability themselves; the record must not vanish while its token is still good (an
/// estimate narrowed later extends the usable time).
fn record_ttl_us(s: &FinHubSession, now: SystemTime) -> i64 {
    let t = s.timing();
    let lo = if t.on_finhub_clock {
        s.clock.bounds_at(now).lo_us
    } else {
        0
    };
    t.expiry_us
        .saturating_sub(lo)
        .min(t.at_most_us)
        .saturating_sub(unix_us(now))
        .saturating_add(1_000_000)
}

/// At graceful shutdown (after the drain): stops every tenant's renewals and gives up the
/// leases this replica holds, so another replica takes over at once instead of after
/// `lease_ttl`. The sessions stay published until the process exits and are not logged out:
/// they are the fleet's.
pub async fn leave_all(table: Arc<SessionTable>, store: Arc<FleetStore>) {
    for slot in table.tenants() {
        slot.ending.send_replace(true);
    }
    let mut releases = tokio::task::JoinSet::new();
    for slot in table.tenants() {
        let (store, tenant) = (store.clone(), slot.tenant.id.clone());
        releases.spawn(async move { store.release(&tenant).await });
    }
    while releases.join_next().await.is_some() {}
    tracing::info!("renewal leases given up; the shared sessions live on for the other replicas");
}

/// The associated data of a record: its Redis key, tenant, generation and fence.
fn aad(record_key: &str, tenant: &str, generation: u64, fence: u64) -> String {
    format!("finhub-sidecar/session/v1\n{record_key}\n{tenant}\n{generation}\n{fence}")
}

/// A record's fields; `Err(key id)` when they are malformed (the key id as far as it can be
/// told, sanitized).
fn parse_record(fields: &HashMap<String, String>) -> Result<RawRecord, String> {
    let key_id = fields
        .get("kid")
        .map(|k| sanitize_id(k))
        .unwrap_or_default();
    let b64 = base64::engine::general_purpose::STANDARD;
    let parsed = (|| {
        if fields.get("v").map(String::as_str) != Some("1") {
            return None;
        }
        let nonce: [u8; 12] = b64.decode(fields.get("nonce")?).ok()?.try_into().ok()?;
        let ciphertext = b64.decode(fields.get("ct")?).ok()?;
        Some(RawRecord {
            sealed: Sealed {
                key_id: fields.get("kid")?.clone(),
                nonce,
                ciphertext,
            },
            generation: fields.get("gen")?.parse().ok()?,
            fence: fields.get("fence")?.parse().ok()?,
        })
    })();
    parsed.ok_or(key_id)
}

/// Whether a readable, usable shared session obtained at `obtained_us` may replace the current
/// one: it must be newer than every shared session seen (`newest_us`), unless the current one
/// is unusable anyway.
fn adoptable(obtained_us: i64, newest_us: i64, current_usable: bool) -> bool {
    obtained_us > newest_us || !current_usable
}

/// [`READ_SCRIPT`]'s answer as a snapshot. Anything unexpected in the record (another type,
/// too large, a field that is not text) is an unreadable record; anything unexpected in the
/// small keys is ignored.
fn parse_snapshot(v: redis::Value) -> Snapshot {
    use redis::Value;
    let text = |v: &Value| -> Option<String> {
        match v {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    };
    let Value::Array(items) = v else {
        return Snapshot {
            malformed: Some("answer"),
            ..Snapshot::default()
        };
    };
    let mut snap = Snapshot::default();
    match (items.first(), items.get(1)) {
        (Some(Value::Int(1)), Some(Value::Array(flat))) => {
            let mut fields = HashMap::new();
            let mut utf8 = true;
            for pair in flat.chunks(2) {
                match (pair.first().and_then(text), pair.get(1).and_then(text)) {
                    (Some(k), Some(v)) => {
                        fields.insert(k, v);
                    }
                    _ => utf8 = false,
                }
            }
            if !utf8 {
                snap.malformed = Some("not_text");
                snap.record = Some(Err("invalid".to_string()));
            } else if !fields.is_empty() {
                snap.record = Some(parse_record(&fields));
            }
        }
        (Some(Value::Int(0)), _) => {}
        (Some(Value::Int(3)), _) => {
            snap.malformed = Some("too_large");
            snap.record = Some(Err("invalid".to_string()));
        }
        _ => {
            snap.malformed = Some("wrong_type");
            snap.record = Some(Err("invalid".to_string()));
        }
    }
    let small = |i: usize| items.get(i).and_then(text);
    snap.raw = [small(2), small(3), small(4)];
    snap
}

/// A renewal request read from `key`, if it authenticates and was asked within `window` (plus
/// [`CLOCK_SLACK`]) of `now_us`: a replayed or forged one forces nothing.
fn verified_renew(
    keys: &KeyRing,
    key: &str,
    raw: &str,
    now_us: i64,
    window: Duration,
) -> Option<RenewRequest> {
    let (generation, at_ms) = keys.verify(key, raw)?.split_once(':')?;
    let r = RenewRequest {
        generation: generation.parse().ok()?,
        at_ms: at_ms.parse().ok()?,
    };
    let at_us = r.at_ms.checked_mul(1000)?;
    let slack = us(CLOCK_SLACK);
    (at_us <= now_us.saturating_add(slack)
        && at_us >= now_us.saturating_sub(us(window)).saturating_sub(slack))
    .then_some(r)
}

/// A rejected-credentials marker read from `key`, if it authenticates and its retry time is
/// ahead but no further than the longest wait for rejected credentials (5 min).
fn verified_marker(keys: &KeyRing, key: &str, raw: &str, now_us: i64) -> Option<Marker> {
    let mut it = keys.verify(key, raw)?.splitn(3, ':');
    let fingerprint = it.next()?.to_string();
    let until_us = it.next()?.parse::<i64>().ok()?.checked_mul(1000)?;
    let rejections: u32 = it.next()?.parse().ok()?;
    let latest = now_us.saturating_add(us(REJECTED_MAX + CLOCK_SLACK));
    (fingerprint.len() == 32 && until_us > now_us && until_us <= latest).then(|| Marker {
        fingerprint,
        until_us,
        rejections: rejections.min(MAX_STORED_COUNT),
    })
}

/// The fleet's backoff read from `key`, if it authenticates and its next attempt is no further
/// ahead than the longest wait the sidecar writes ([`MAX_STORED_BACKOFF`]) and no longer ago
/// than the key lives after it (`lease_ttl`): an owner between two attempts still reports one
/// (it holds nothing back once its time has passed).
fn verified_backoff(
    keys: &KeyRing,
    key: &str,
    raw: &str,
    now_us: i64,
    lease_ttl: Duration,
) -> Option<Backoff> {
    let mut it = keys.verify(key, raw)?.splitn(3, ':');
    let until_us = it.next()?.parse::<i64>().ok()?.checked_mul(1000)?;
    let failures: u32 = it.next()?.parse().ok()?;
    let generation = it.next()?.parse().ok()?;
    let latest = now_us.saturating_add(us(MAX_STORED_BACKOFF + CLOCK_SLACK));
    let earliest = now_us.saturating_sub(us(lease_ttl + CLOCK_SLACK));
    (until_us > earliest && until_us <= latest).then_some(Backoff {
        until_us,
        failures: failures.min(MAX_STORED_COUNT),
        generation,
    })
}

/// When a follower whose session came from the store renews it on its own: the owner's
/// renewal was planned at `planned_us` and the token can be renewed in time until
/// `latest_us`; half of the time between is the owner's (its renewal and a poll to see it),
/// the rest the follower's, so that it still renews before its token becomes unusable.
fn own_renewal_at(planned_us: i64, latest_us: i64) -> i64 {
    planned_us + (latest_us - planned_us).max(0) / 2
}

/// When a follower takes the renewal of the shared session over ([`own_renewal_at`]), but
/// never sooner than `grace_us` after the owner's planned renewal (the owner's call, its
/// write and the follower's read of the record: with short tokens half of the span can be a
/// few ms, and a follower renewing the same token as the owner is a second refresh), and
/// never after `latest_us`, its own last moment.
fn takeover_at(planned_us: i64, latest_us: i64, grace_us: i64) -> i64 {
    own_renewal_at(planned_us, latest_us)
        .max(planned_us.saturating_add(grace_us))
        .min(latest_us.max(planned_us))
}

/// The owner's grace before a follower takes a renewal over ([`takeover_at`]): a fiftieth
/// of the token's validity (80 ms for 4 s tokens), at least [`MIN_OWNER_GRACE`].
pub(super) fn owner_grace_us(validity: Duration) -> i64 {
    us(validity / 50).max(us(MIN_OWNER_GRACE))
}

/// A key id or replica id fit for a log line and a metric label: at most 32 characters of
/// `[A-Za-z0-9._-]`, else `invalid`.
fn sanitize_id(id: &str) -> String {
    if !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        id.to_string()
    } else {
        "invalid".to_string()
    }
}

/// `HOSTNAME` (the pod name in Kubernetes) sanitized, plus a random suffix (two processes
/// with one name, a restarted container, are different owners).
fn replica_id() -> String {
    let host: String = std::env::var("HOSTNAME")
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .take(40)
        .collect();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    if host.is_empty() {
        format!("replica-{}", &suffix[..8])
    } else {
        format!("{host}-{}", &suffix[..8])
    }
}

fn payload_of(s: &FinHubSession) -> Payload {
    let t = s.timing();
    let offset = s
        .clock
        .report()
        .map(|_| s.clock.bounds_at(SystemTime::now()));
    Payload {
        token: s.token.expose().to_string(),
        refresh_token: s.refresh_token.as_ref().map(|r| r.expose().to_string()),
        session_id: s.session_id.to_str().unwrap_or("").to_string(),
        obtained_us: unix_us(s.obtained_at),
        received_us: unix_us(s.received_at),
        validity_us: t.validity_us,
        expiry_us: t.expiry_us,
        on_finhub_clock: t.on_finhub_clock,
        window_known: s.window_known,
        at_least_us: t.at_least_us,
        at_most_us: t.at_most_us,
        offset_lo_us: offset.map(|o| o.lo_us),
        offset_hi_us: offset.map(|o| o.hi_us),
    }
}

/// The session a record describes, on this replica's estimate of FinHub's clock (which takes
/// the writer's estimate if it has none of its own yet).
fn session_of(p: &Payload, clock: &Arc<ClockOffset>) -> FinHubSession {
    if let (Some(lo_us), Some(hi_us)) = (p.offset_lo_us, p.offset_hi_us) {
        clock.adopt(OffsetBounds { lo_us, hi_us }, SystemTime::now());
    }
    let claims = Claims::of(&p.token);
    FinHubSession {
        reflections: crate::policy::headers::Reflections::of(
            &p.token,
            p.refresh_token.as_deref(),
            claims.internal_token_key.as_ref().map(|k| k.expose()),
        ),
        authorization: sensitive(&format!("Bearer {}", p.token)),
        session_token: sensitive(&p.token),
        session_id: HeaderValue::from_str(&p.session_id)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid-session-id")),
        token: Secret::new(p.token.clone()),
        obtained_at: from_unix_us(p.obtained_us),
        received_at: from_unix_us(p.received_us),
        validity: Duration::from_micros(p.validity_us.clamp(0, us(grant::MAX_LIFETIME)) as u64),
        internal_token_key: claims.internal_token_key,
        refresh_token: p.refresh_token.clone().map(Secret::new),
        generation: 0,
        expiry_us: AtomicI64::new(p.expiry_us),
        on_finhub_clock: p.on_finhub_clock,
        window_known: p.window_known,
        valid_until_at_least_us: AtomicI64::new(p.at_least_us),
        valid_until_at_most_us: AtomicI64::new(p.at_most_us),
        clock: clock.clone(),
    }
}

/// Where the tenant's current session came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    None,
    Shared,
    Local,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::None => "none",
            Source::Shared => "shared",
            Source::Local => "local",
        }
    }
}

/// What this replica is for a tenant after a look at the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Holds the lease: renews and writes.
    Owner,
    /// Another replica renews.
    FleetState,
    /// Renews on its own (store unavailable with `on_store_error = "local"`, or a record it
    /// cannot read).
    Alone,
    /// Store unavailable with `on_store_error = "wait"`: serves what it has, renews nothing.
    Waiting,
}

/// What the renewal loop does after a look at the store.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Turn {
    /// Nothing to renew now: sleep until the next look (or the plan).
    Wait,
    /// Renew now (the plan is due, or a renewal was forced).
    Renew,
}

/// The lease extension running while an owner renews ([`Renewer::heartbeat`]).
pub(super) struct Heartbeat {
    task: tokio::task::JoinHandle<()>,
    lost: Arc<AtomicBool>,
}

/// One tenant's view of the shared store (inside its renewal task).
pub(super) struct FleetState {
    store: Arc<FleetStore>,
    /// Fence of the lease this replica holds.
    fence: Option<u64>,
    /// Highest record generation seen or written.
    last_generation: u64,
    /// `(generation, fence)` of the record whose session is published here.
    adopted: Option<(u64, u64)>,
    source: Source,
    role: Option<Role>,
    store_up: bool,
    /// Key id of a live record this replica cannot decrypt (and the generation logged).
    unreadable: Option<(String, u64)>,
    /// When this replica asked the owner to renew a refused session, and which generation.
    asked: Option<(Instant, u64)>,
    /// When to look at the store next (µs, our clock).
    pub(super) next_look_us: i64,
    /// The slot's generation before the renewal step in progress.
    generation_before: u64,
    /// After giving the lease up (repeated failures), not taking it again before this.
    yielded_until: Option<Instant>,
    /// Since when this replica has had no usable session (and no newer record came).
    stale_since: Option<Instant>,
    /// `obtained` (unix µs) of the newest shared session adopted or written: an older record
    /// (replayed, or restored by a failover that lost the last write) is not adopted while
    /// the current session is usable.
    newest_obtained_us: i64,
    /// Whether the fallback (or a corrupt lease) was logged since the last normal look.
    fallback_logged: bool,
    /// The highest fence of an authenticated record seen or written: a lease of this
    /// replica's with a lower one is replaced by a fresh fence ([`ACQUIRE_SCRIPT`]).
    max_fence: u64,
    /// Not renewing before this (µs, our clock): the fleet's backoff as of the last look
    /// (re-derived at every look, 0 for none).
    hold_until_us: i64,
    /// Credentials rejected per the fleet's marker as of the last look: this replica's
    /// credentials' fingerprint and the retry time (re-derived at every look that reads the
    /// store; kept until that time while the store cannot be read).
    marker_hold: Option<(u64, i64)>,
    /// The last renewal request honoured (each is honoured once).
    honoured: Option<RenewRequest>,
    /// Writes refused since the last log line about them, and when that was.
    refused: u32,
    refused_logged: Option<Instant>,
    /// The generation whose session this follower renewed on its own: logged once, and from
    /// then on it follows the plan of its own attempt's answer (no new attempt per look).
    renewed_alone: Option<u64>,
    /// The writer's estimate of FinHub's token clock in the adopted record: the owner planned
    /// its renewal with it, so a follower works out that plan with it too (its own estimate
    /// may be narrower or wider and would put the owner's renewal elsewhere).
    writer_offset: Option<OffsetBounds>,
    /// Lease changes logged in the current minute: since when, how many.
    lease_lines: (Instant, u32),
}

impl FleetState {
    /// A follower of `store` for one tenant.
    pub(super) fn new(store: Arc<FleetStore>) -> FleetState {
        FleetState {
            store,
            fence: None,
            last_generation: 0,
            adopted: None,
            source: Source::None,
            role: None,
            store_up: true,
            unreadable: None,
            asked: None,
            next_look_us: 0,
            generation_before: 0,
            yielded_until: None,
            stale_since: None,
            newest_obtained_us: 0,
            fallback_logged: false,
            max_fence: 0,
            hold_until_us: 0,
            marker_hold: None,
            honoured: None,
            refused: 0,
            refused_logged: None,
            renewed_alone: None,
            writer_offset: None,
            lease_lines: (Instant::now(), 0),
        }
    }

    /// Whether this replica holds the tenant's renewal lease.
    pub(super) fn owns(&self) -> bool {
        self.fence.is_some()
    }

    /// When the renewal loop wakes next for a plan due at `at_us`: not before the fleet's
    /// backoff (as of the last look), and never after the next look.
    pub(super) fn wake_us(&self, at_us: i64) -> i64 {
        at_us.max(self.hold_until_us).min(self.next_look_us)
    }
}

impl Renewer {
    fn follower(&mut self) -> Option<&mut FleetState> {
        self.fleet.as_mut()
    }

    fn set_source(&mut self, source: Source) {
        let tenant = self.tenant_id.clone();
        let Some(f) = self.fleet.as_mut() else {
            return;
        };
        f.source = source;
        for s in [Source::Shared, Source::Local] {
            self.metrics
                .session_source
                .with_label_values(&[tenant.as_str(), s.label()])
                .set(i64::from(s == source));
        }
        self.show_fleet();
    }

    fn set_owner(&mut self, fence: Option<u64>) {
        let tenant = self.tenant_id.clone();
        let Some(f) = self.fleet.as_mut() else {
            return;
        };
        let was = f.fence.is_some();
        f.fence = fence;
        if fence.is_some() != was {
            // A lease that keeps changing hands (someone rewriting it) is not a log flood.
            let now = Instant::now();
            let (since, lines) = f.lease_lines;
            let (since, lines) = if now - since >= REFUSED_LOG_EVERY {
                (now, 0)
            } else {
                (since, lines)
            };
            f.lease_lines = (since, lines.saturating_add(1));
            let loud = lines < LEASE_LINES_PER_MINUTE;
            match (fence, loud) {
                (Some(n), true) => {
                    tracing::info!(tenant = %tenant, fence = n, replica = f.store.replica(), "took the tenant's renewal lease: this replica renews the shared session")
                }
                (Some(n), false) => {
                    tracing::debug!(tenant = %tenant, fence = n, "took the tenant's renewal lease")
                }
                (None, true) => {
                    tracing::info!(tenant = %tenant, "gave up the tenant's renewal lease")
                }
                (None, false) => {
                    tracing::debug!(tenant = %tenant, "gave up the tenant's renewal lease")
                }
            }
        }
        self.metrics
            .session_lease_owner
            .with_label_values(&[tenant.as_str()])
            .set(i64::from(fence.is_some()));
    }

    fn show_fleet(&self) {
        let Some(f) = self.fleet.as_ref() else {
            return;
        };
        let status = FleetStatus {
            store: if f.store_up { "ok" } else { "unavailable" },
            lease_owner: f.fence.is_some(),
            source: f.source.label(),
            generation: f.last_generation,
            undecryptable_key_id: f.unreadable.as_ref().map(|(k, _)| k.clone()),
            replica: f.store.replica().to_string(),
        };
        let mut s = match self.slot.status.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        s.fleet = Some(status);
    }

    /// The series of a tenant with a shared store, created at 0; waits for the store's first
    /// connection (bounded).
    pub(super) async fn init_fleet(&mut self) {
        if let Some(f) = self.fleet.as_ref() {
            f.store.connected().await;
        }
        let tenant = self.tenant_id.clone();
        self.metrics
            .session_adopted
            .with_label_values(&[tenant.as_str()]);
        self.set_owner(None);
        self.set_source(Source::None);
    }

    /// Looks at the store (at start, every poll interval, before a due renewal): adopts a newer
    /// shared session, takes or extends the lease when it may, and says whether this replica
    /// renews now. `next` is the renewal plan, replanned when the role changes.
    pub(super) async fn look(&mut self, next: &mut Planned) -> Turn {
        let tenant = self.tenant_id.clone();
        if self.slot.is_ending() {
            // Shutting down: no new lease (the loop sees the end next).
            return Turn::Wait;
        }
        let Some(f) = self.follower() else {
            return Turn::Renew;
        };
        let store = f.store.clone();
        let settings_poll = store.settings.poll_interval;
        let now_us = unix_us(SystemTime::now());
        f.next_look_us = now_us + us(settings_poll);
        f.hold_until_us = 0;
        let snapshot = store.snapshot(&tenant).await;
        let mut renew_requested = None;
        let mut backoff = None;
        let role = match snapshot {
            // An authenticated rejected-credentials hold from the last look stays until its
            // retry time (at most 5 min): the store cannot say it is over.
            Err(failure) => self.store_failed(failure),
            Ok(snap) => {
                if let Some(f) = self.follower() {
                    if !f.store_up {
                        tracing::info!(tenant = %tenant, "session store answering again");
                    }
                    f.store_up = true;
                }
                renew_requested = snap.renew_requested;
                let readable = match snap.record {
                    None => {
                        if let Some(f) = self.follower() {
                            f.unreadable = None;
                        }
                        true
                    }
                    Some(record) => self.consider(record, next),
                };
                // A backoff written before the newest record is over (a replay).
                let last_generation = self.fleet.as_ref().map_or(0, |f| f.last_generation);
                backoff = snap.backoff.filter(|b| b.generation >= last_generation);
                self.note_staleness();
                self.apply_marker(&store, snap.rejected.as_ref());
                let held_back = self.held_back();
                if !readable {
                    if self.fleet.as_ref().is_some_and(|f| f.fence.is_some()) {
                        store.release(&tenant).await;
                        self.set_owner(None);
                    }
                    Role::Alone
                } else if held_back
                    || self
                        .fleet
                        .as_ref()
                        .and_then(|f| f.yielded_until)
                        .is_some_and(|t| Instant::now() < t)
                {
                    // Gave the lease up after failing, or holding credentials FinHub rejected:
                    // another replica's turn.
                    if held_back && self.fleet.as_ref().is_some_and(|f| f.fence.is_some()) {
                        self.give_way_rejected(&store).await;
                    }
                    Role::FleetState
                } else {
                    let seen = self.fleet.as_ref().map_or(0, |f| f.max_fence);
                    match store.acquire(&tenant, seen).await {
                        Ok(Lease::Held(fence)) => {
                            self.set_owner(Some(fence));
                            Role::Owner
                        }
                        Ok(Lease::Other) => {
                            self.set_owner(None);
                            if self.stranded(backoff.is_some()) {
                                self.fallback("no usable session and no newer shared record for longer than auth.shared.lease_ttl; the lease holder is not renewing")
                            } else {
                                Role::FleetState
                            }
                        }
                        Ok(Lease::Corrupt) => {
                            self.set_owner(None);
                            self.fallback("the renewal lease or fence in Redis is not one a sidecar writes (garbage, no TTL, another type, or a fence beyond 2^53)")
                        }
                        Err(failure) => self.store_failed(failure),
                    }
                }
            }
        };
        let now = SystemTime::now();
        let now_us = unix_us(now);
        let current = self.slot.current();
        let usable = current.as_ref().filter(|s| s.is_usable(now)).cloned();
        let previous = self.fleet.as_ref().and_then(|f| f.role);
        if let Some(f) = self.follower() {
            f.role = Some(role);
            if role == Role::Owner {
                // Extend the lease well before it ends.
                let extend = now_us + us(store.settings.lease_ttl) / 3;
                f.next_look_us = f.next_look_us.min(extend);
            }
        }
        self.show_fleet();
        let acts = matches!(role, Role::Owner | Role::Alone);
        if acts
            && previous != Some(role)
            && matches!(previous, Some(Role::FleetState | Role::Waiting))
        {
            // Taking over: plan from the session as it is.
            *next = match &usable {
                Some(s) => self.plan_for(s, now_us),
                None => Planned {
                    step: Step::Login,
                    at_us: now_us,
                },
            };
        }
        if role == Role::Owner
            && !matches!(
                previous,
                Some(Role::Owner | Role::FleetState | Role::Waiting)
            )
            && self.failures == 0
        {
            // Taking the lease with a session renewed alone (a store outage, the first look):
            // its plan left the followers no grace ([`Renewer::plan_for`]); an earlier one
            // does (a backoff is not shortened: no failures).
            if let Some(s) = &usable {
                let p = self.plan_for(s, now_us);
                if p.step == next.step && p.at_us < next.at_us {
                    *next = p;
                }
            }
        }
        if let (Role::Owner, Some(b)) = (role, backoff) {
            // The fleet's backoff (an earlier owner's failures): FinHub asked the fleet, not
            // one replica, to slow down. Held for this look only, and never past the moment
            // this replica's own session must be renewed.
            let mut until = b.until_us;
            if let Some(left) = self.usable_for(usable.as_deref(), now) {
                until = until.min(now_us + us(left));
            }
            self.failures = self.failures.max(b.failures);
            if let Some(f) = self.follower() {
                f.hold_until_us = until;
            }
        }
        let hold_us = self.fleet.as_ref().map_or(0, |f| f.hold_until_us);
        let forced = self.slot.forced_pending();
        match role {
            Role::Owner => {
                if usable.is_none()
                    && self.failures >= YIELD_AFTER_FAILURES
                    && self.last_failure_local
                {
                    // This replica cannot reach FinHub (connect, TLS, egress: its own path):
                    // give the lease to another replica for a turn. FinHub's own answers (429,
                    // 5xx) are never a reason: the next owner would only ask again sooner.
                    tracing::warn!(tenant = %tenant, failures = self.failures, "no session after repeated failures; giving the renewal lease to another replica");
                    store.release(&tenant).await;
                    self.set_owner(None);
                    self.failures = 0;
                    if let Some(f) = self.follower() {
                        f.role = Some(Role::FleetState);
                        f.yielded_until = Some(Instant::now() + store.settings.poll_interval * 3);
                        next.at_us = f.next_look_us;
                    }
                    self.show_fleet();
                    return Turn::Wait;
                }
                let source = self.fleet.as_ref().map(|f| f.source);
                if usable.is_some() && source == Some(Source::Local) {
                    // Ours, not yet shared (after a store outage or a lost write): share it.
                    self.share_current().await;
                }
                let adopted = self.fleet.as_ref().and_then(|f| f.adopted);
                let honoured = self.fleet.as_ref().and_then(|f| f.honoured);
                if let (Some(r), Some((mine, _))) = (renew_requested, adopted) {
                    if r.generation == mine
                        && honoured != Some(r)
                        && !forced
                        && self.forced_allowed()
                    {
                        tracing::info!(tenant = %tenant, generation = r.generation, "another replica's request was refused by FinHub: renewing the shared session");
                        if let Some(f) = self.follower() {
                            f.honoured = Some(r);
                        }
                        self.slot
                            .forced
                            .store(self.slot.generation(), Ordering::SeqCst);
                        return Turn::Renew;
                    }
                }
                if forced || now_us >= next.at_us.max(hold_us) {
                    Turn::Renew
                } else {
                    Turn::Wait
                }
            }
            Role::Alone => {
                if forced || now_us >= next.at_us {
                    Turn::Renew
                } else {
                    Turn::Wait
                }
            }
            Role::Waiting => {
                next.at_us = self.fleet.as_ref().map_or(now_us, |f| f.next_look_us);
                Turn::Wait
            }
            Role::FleetState => {
                if let Some(f) = self.follower() {
                    if !forced {
                        f.asked = None;
                    }
                }
                if forced {
                    let turn = self.follow_refusal(&tenant, &store, now_us).await;
                    if turn == Turn::Wait {
                        next.at_us = self.fleet.as_ref().map_or(now_us, |f| f.next_look_us);
                    }
                    return turn;
                }
                let source = self.fleet.as_ref().map(|f| f.source);
                if source == Some(Source::Local) && usable.is_some() {
                    // Our own session (from an outage), no shared one yet: keep it renewed.
                    return if now_us >= next.at_us {
                        Turn::Renew
                    } else {
                        Turn::Wait
                    };
                }
                let look_us = self.fleet.as_ref().map_or(now_us, |f| f.next_look_us);
                if let Some(s) = usable.as_deref() {
                    // The shared session: the owner renews it at its plan. When that has passed
                    // with no newer record (an owner that is stuck, a lease held by no sidecar,
                    // an old record restored), this replica renews on its own, before its token
                    // becomes unusable.
                    let generation = self.fleet.as_ref().and_then(|f| f.adopted).map(|a| a.0);
                    let tried = self.fleet.as_ref().is_some_and(|f| {
                        f.renewed_alone.is_some() && f.renewed_alone == generation
                    });
                    if tried {
                        // Renewed on its own already and got no new token ("not refreshed" or
                        // a failure): its own plan from that answer, as for one replica.
                        return if now_us >= next.at_us && !self.held_back() {
                            Turn::Renew
                        } else {
                            Turn::Wait
                        };
                    }
                    // The plan as the owner made it (not moved to now: a refresh planned inside
                    // FinHub's window stays a refresh): on the writer's estimate of FinHub's
                    // clock, with the shortest lead a sidecar plans with (so never sooner
                    // than the owner's plan).
                    let writer = self.fleet.as_ref().and_then(|f| f.writer_offset);
                    let planned = self.owner_plan(s, writer);
                    let latest = self
                        .usable_for(Some(s), now)
                        .map_or(now_us, |l| now_us + us(l));
                    // An owner whose plan is an early probe ("not refreshed" answers are not
                    // shared) refreshes at the latest where the window surely opens: when that
                    // is still in time here, it is the owner's renewal point (and a renewal of
                    // this replica's own from then on is a refresh that surely lands).
                    let opens = window_surely_open_us(
                        s.timing(),
                        writer.unwrap_or_else(|| s.clock.bounds()),
                    );
                    let owners_at = if planned.step == Step::Refresh
                        && planned.at_us < opens
                        && opens <= latest
                    {
                        opens
                    } else {
                        planned.at_us
                    };
                    // The fleet's backoff (authenticated) may delay it, never past `latest`.
                    let at = takeover_at(owners_at, latest, owner_grace_us(s.validity))
                        .max(backoff.map_or(0, |b| b.until_us))
                        .min(latest);
                    if now_us >= at && !self.held_back() {
                        if let Some(f) = self.follower() {
                            f.renewed_alone = generation;
                        }
                        tracing::warn!(tenant = %tenant, generation = generation.unwrap_or(0), "no newer shared session after its refresh point; renewing on our own before the token becomes unusable");
                        *next = planned;
                        return Turn::Renew;
                    }
                    next.at_us = at.min(look_us);
                    return Turn::Wait;
                }
                next.at_us = look_us;
                Turn::Wait
            }
        }
    }

    /// Notes whether this replica has a usable session now (for [`Renewer::stranded`]).
    fn note_staleness(&mut self) {
        let usable = self
            .slot
            .current()
            .is_some_and(|s| s.is_usable(SystemTime::now()));
        if let Some(f) = self.follower() {
            if usable {
                f.stale_since = None;
                f.fallback_logged = false;
            } else {
                f.stale_since.get_or_insert_with(Instant::now);
            }
        }
    }

    /// A follower without a usable session that has seen no newer record for longer than the
    /// lease (plus two polls), while no owner reports a backoff: whoever holds the lease is not
    /// renewing (stuck, or a lease written without a TTL).
    fn stranded(&self, backoff: bool) -> bool {
        let Some(f) = self.fleet.as_ref() else {
            return false;
        };
        let patience = f.store.settings.lease_ttl + f.store.settings.poll_interval * 2;
        !backoff && f.stale_since.is_some_and(|t| t.elapsed() > patience)
    }

    /// The role when the lease cannot be followed: renew on its own (`on_store_error =
    /// "local"`) or wait; logged once per episode.
    fn fallback(&mut self, why: &str) -> Role {
        let tenant = self.tenant_id.clone();
        let Some(f) = self.follower() else {
            return Role::Alone;
        };
        let mode = f.store.settings.on_store_error;
        if !f.fallback_logged {
            tracing::warn!(tenant = %tenant, on_store_error = ?mode, "{why}; renewing per auth.shared.on_store_error");
            f.fallback_logged = true;
        }
        match mode {
            OnStoreError::Wait => Role::Waiting,
            OnStoreError::Local => Role::Alone,
        }
    }

    /// Takes the fleet's rejected-credentials marker as of this look (`None`: none, or not
    /// authenticated, or not about this replica's credentials): re-derived at every look,
    /// never kept once the marker is gone.
    fn apply_marker(&mut self, store: &FleetStore, marker: Option<&Marker>) {
        let now_us = unix_us(SystemTime::now());
        let hold = marker.filter(|m| {
            m.until_us > now_us && m.fingerprint == store.credentials_fingerprint(&self.slot.tenant)
        });
        let tenant = self.tenant_id.clone();
        let fingerprint = self.client.credentials_fingerprint(&self.slot.tenant);
        let own_until = self.rejected.map_or(0, |(_, until)| until);
        let Some(f) = self.follower() else {
            return;
        };
        let was = f.marker_hold;
        f.marker_hold = hold.map(|m| (fingerprint, m.until_us));
        if let Some(m) = hold {
            if was.is_none() && m.until_us > own_until {
                tracing::warn!(
                    tenant = %tenant,
                    retry_in_ms = (m.until_us - now_us) / 1000,
                    "FinHub rejected another replica's login with the credentials this replica holds; not trying them before then (retried sooner if they change)"
                );
            }
            self.rejections = self.rejections.max(m.rejections);
        }
    }

    /// The credentials FinHub rejected and until when they are not tried again: this
    /// replica's own rejected login, or the fleet's marker as of the last look, whichever
    /// ends later.
    pub(super) fn rejected_now(&self) -> Option<(u64, i64)> {
        let marker = self.fleet.as_ref().and_then(|f| f.marker_hold);
        match (self.rejected, marker) {
            (Some(own), Some(m)) => Some(if m.1 > own.1 { m } else { own }),
            (own, m) => own.or(m),
        }
    }

    /// Whether this replica holds credentials FinHub rejected ([`Renewer::rejected_now`]) and
    /// may not try them yet.
    fn held_back(&self) -> bool {
        let now_us = unix_us(SystemTime::now());
        self.rejected_now().is_some_and(|(fingerprint, until)| {
            until > now_us && fingerprint == self.client.credentials_fingerprint(&self.slot.tenant)
        })
    }

    /// The owner's login was rejected: tell the fleet (the credentials' fingerprint, so
    /// replicas with the same ones hold back) and give the lease to a replica with other
    /// credentials (e.g. one a rotation reached first).
    async fn give_way_rejected(&mut self, store: &FleetStore) {
        let tenant = self.tenant_id.clone();
        if let Some((_, until_us)) = self.rejected_now() {
            let marker = Marker {
                fingerprint: store.credentials_fingerprint(&self.slot.tenant),
                until_us,
                rejections: self.rejections,
            };
            let _ = store.mark_rejected(&tenant, &marker).await;
        }
        tracing::warn!(tenant = %tenant, "FinHub rejected this replica's credentials; giving the renewal lease to a replica with other credentials (replicas with the same ones hold back until the retry)");
        store.release(&tenant).await;
        self.set_owner(None);
    }

    /// While this replica renews as the lease owner: extends the lease every third of its TTL,
    /// so a slow renewal (a refresh, then a login) never outlives it. `None` unless it owns.
    pub(super) fn heartbeat(&self) -> Option<Heartbeat> {
        let f = self.fleet.as_ref()?;
        let fence = f.fence?;
        let (store, tenant) = (f.store.clone(), self.tenant_id.clone());
        let lost = Arc::new(AtomicBool::new(false));
        let flag = lost.clone();
        let period = store.settings.lease_ttl / 3;
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                match store.acquire(&tenant, fence).await {
                    Ok(Lease::Held(f)) if f == fence => {}
                    _ => {
                        flag.store(true, Ordering::SeqCst);
                        tracing::warn!(tenant = %tenant, "could not extend the renewal lease during a renewal: its result is kept here, not shared");
                        return;
                    }
                }
            }
        });
        Some(Heartbeat { task, lost })
    }

    /// The renewal ended: stop the heartbeat; a lease it could not extend is given up (the new
    /// session is not written).
    pub(super) fn heartbeat_done(&mut self, beat: Option<Heartbeat>) {
        if let Some(b) = beat {
            b.task.abort();
            if b.lost.load(Ordering::SeqCst) {
                self.set_owner(None);
            }
        }
    }

    /// The store failed: the role `on_store_error` gives.
    fn store_failed(&mut self, failure: Failure) -> Role {
        let tenant = self.tenant_id.clone();
        let mode = self.fleet.as_ref().map(|f| f.store.settings.on_store_error);
        if let Some(f) = self.follower() {
            if f.store_up {
                tracing::warn!(tenant = %tenant, kind = failure.label(), on_store_error = ?mode, "session store unavailable; serving the last good session, renewing per auth.shared.on_store_error");
            }
            f.store_up = false;
        }
        self.set_owner(None);
        match mode {
            Some(OnStoreError::Wait) => Role::Waiting,
            _ => Role::Alone,
        }
    }

    /// A record was read: adopt it if it is readable, usable and not the one published here.
    /// Returns whether it was readable.
    fn consider(&mut self, record: Result<RawRecord, String>, next: &mut Planned) -> bool {
        let tenant = self.tenant_id.clone();
        let Some(f) = self.follower() else {
            return true;
        };
        let store = f.store.clone();
        let opened = match &record {
            Ok(raw) => store
                .open(&tenant, raw)
                .map(|p| (raw.generation, raw.fence, p))
                .map_err(|e| (raw.sealed.key_id.clone(), raw.generation, e)),
            Err(kid) => Err((kid.clone(), 0, OpenError::Corrupt)),
        };
        match opened {
            Ok((generation, fence, payload)) => {
                f.unreadable = None;
                f.last_generation = f.last_generation.max(generation);
                f.max_fence = f.max_fence.max(fence);
                if f.adopted == Some((generation, fence)) {
                    return true;
                }
                let newest = f.newest_obtained_us;
                let session = session_of(&payload, self.client.clock());
                let now = SystemTime::now();
                if !session.is_usable(now) {
                    return true;
                }
                let current_usable = self.slot.current().is_some_and(|c| c.is_usable(now));
                if !adoptable(payload.obtained_us, newest, current_usable) {
                    // Older than a shared session already seen (a replayed record, or a
                    // failover that lost the last write): the current one serves on.
                    tracing::warn!(tenant = %tenant, generation, "the shared record holds an older session than one already seen; not adopted");
                    return true;
                }
                if let Some(f) = self.follower() {
                    f.adopted = Some((generation, fence));
                    f.writer_offset = match (payload.offset_lo_us, payload.offset_hi_us) {
                        (Some(lo_us), Some(hi_us)) if lo_us <= hi_us => {
                            Some(OffsetBounds { lo_us, hi_us })
                        }
                        _ => None,
                    };
                    f.asked = None;
                    f.newest_obtained_us = f.newest_obtained_us.max(payload.obtained_us);
                }
                tracing::info!(tenant = %tenant, generation, lifetime_ms = session.lifetime().as_millis() as u64, "adopted the shared session");
                self.metrics
                    .session_expiration
                    .with_label_values(&[tenant.as_str()])
                    .set(unix_secs(session.expires_at()));
                self.metrics
                    .session_adopted
                    .with_label_values(&[tenant.as_str()])
                    .inc();
                self.early = 0;
                self.failures = 0;
                self.slot.publish(session);
                self.set_source(Source::Shared);
                if let Some(s) = self.slot.current() {
                    *next = self.plan_for(&s, unix_us(now));
                }
                true
            }
            Err((kid, generation, e)) => {
                let kid = sanitize_id(&kid);
                let logged = f.unreadable.as_ref() == Some(&(kid.clone(), generation));
                if !logged {
                    // Once per record (key id and generation), not per read.
                    store.count_decrypt_error(&kid);
                    tracing::error!(
                        tenant = %tenant,
                        key_id = %kid,
                        generation,
                        this_replica_key_id = store.settings.keys.current_id(),
                        error = %e,
                        "cannot decrypt the shared session record (is auth.shared.encryption_key_file the fleet's key?); this replica logs in on its own and never overwrites the record"
                    );
                }
                f.unreadable = Some((kid, generation));
                false
            }
        }
    }

    /// A follower's session was refused by FinHub: ask the owner, wait for its renewal up to
    /// `follow_timeout`, then renew on its own.
    async fn follow_refusal(&mut self, tenant: &str, store: &FleetStore, now_us: i64) -> Turn {
        let generation = self
            .fleet
            .as_ref()
            .and_then(|f| f.adopted)
            .map_or(0, |(g, _)| g);
        let asked = self.fleet.as_ref().and_then(|f| f.asked);
        match asked {
            Some((since, g)) if g == generation => {
                if since.elapsed() >= store.settings.follow_timeout {
                    tracing::warn!(tenant = %tenant, generation, "the owner did not renew the refused shared session within auth.shared.follow_timeout; renewing on our own");
                    if let Some(f) = self.follower() {
                        f.asked = None;
                    }
                    return Turn::Renew;
                }
            }
            _ => {
                tracing::info!(tenant = %tenant, generation, "FinHub refused the shared session here; asking the owner to renew it");
                let ok = store.ask_renewal(tenant, generation).await.is_ok();
                if let Some(f) = self.follower() {
                    f.asked = Some((Instant::now(), generation));
                }
                if !ok {
                    return Turn::Renew;
                }
            }
        }
        if let Some(f) = self.follower() {
            f.next_look_us = now_us + us(FOLLOW_POLL);
        }
        Turn::Wait
    }

    /// Whether a forced renewal asked for by another replica may go now (the same spacing as
    /// this replica's own).
    fn forced_allowed(&self) -> bool {
        self.last_forced
            .is_none_or(|t| t.elapsed() >= forced_spacing(self.forced_streak))
    }

    /// Notes the generation published before a renewal step.
    pub(super) fn before_renewal(&mut self) {
        let g = self.slot.generation();
        if let Some(f) = self.follower() {
            f.generation_before = g;
        }
    }

    /// After a renewal step: an owner shares a new session, or, when none came, tells the fleet
    /// when the next attempt may be made (`next`); anyone else now serves its own.
    pub(super) async fn after_renewal(&mut self, next: &Planned) {
        let g = self.slot.generation();
        let tenant = self.tenant_id.clone();
        let failures = self.failures;
        let Some(f) = self.follower() else {
            return;
        };
        let owner = f.role == Some(Role::Owner) && f.fence.is_some();
        if g == f.generation_before {
            if owner && failures > 0 {
                let store = f.store.clone();
                let b = Backoff {
                    until_us: next.at_us,
                    failures,
                    generation: f.last_generation,
                };
                let _ = store.set_backoff(&tenant, b).await;
            }
            return;
        }
        if owner {
            self.share_current().await;
        } else {
            self.set_source(Source::Local);
        }
    }

    /// Writes the current session as the next generation (owner only).
    async fn share_current(&mut self) {
        let tenant = self.tenant_id.clone();
        let current = self.slot.current();
        let Some(f) = self.follower() else {
            return;
        };
        let (Some(fence), Some(s)) = (f.fence, current) else {
            return;
        };
        let store = f.store.clone();
        let generation = f.last_generation + 1;
        match store.write(&tenant, fence, generation, &s).await {
            Ok(true) => {
                if let Some(f) = self.follower() {
                    f.last_generation = generation;
                    f.max_fence = f.max_fence.max(fence);
                    f.refused = 0;
                    f.adopted = Some((generation, fence));
                    f.writer_offset = None;
                    f.newest_obtained_us = f.newest_obtained_us.max(unix_us(s.obtained_at));
                }
                self.set_source(Source::Shared);
                tracing::debug!(tenant = %tenant, generation, "shared session written");
            }
            Ok(false) => {
                // Refused (the lease or the record belongs to another owner, or the lease's
                // fence is older than the record's): follow; the next look comes at the usual
                // pace (it takes a fresh fence if this replica still holds the lease), and the
                // line is logged at most once a minute.
                if let Some(f) = self.follower() {
                    f.refused = f.refused.saturating_add(1);
                    let now = Instant::now();
                    if f.refused_logged
                        .is_none_or(|t| now - t >= REFUSED_LOG_EVERY)
                    {
                        tracing::info!(tenant = %tenant, refused = f.refused, "the shared record belongs to a newer owner; not written, following it");
                        f.refused_logged = Some(now);
                        f.refused = 0;
                    }
                }
                self.set_owner(None);
                self.set_source(Source::Local);
            }
            Err(_) => {
                self.set_source(Source::Local);
            }
        }
    }

    /// At the end (shutdown): give the lease up so another replica takes over at once.
    pub(super) async fn leave(&mut self) {
        let tenant = self.tenant_id.clone();
        if let Some(f) = self.follower() {
            if f.fence.is_some() {
                let store = f.store.clone();
                store.release(&tenant).await;
                self.set_owner(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::grant::Grant;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn malformed_records_are_refused_naming_a_sanitized_key_id() {
        let ok = fields(&[
            ("v", "1"),
            ("kid", "kabc"),
            ("nonce", "AAAAAAAAAAAAAAAA"),
            ("ct", "AAAA"),
            ("gen", "3"),
            ("fence", "2"),
        ]);
        let r = parse_record(&ok).unwrap();
        assert_eq!((r.generation, r.fence), (3, 2));
        for (k, v) in [
            ("v", "2"),
            ("nonce", "AAAA"),
            ("gen", "-1"),
            ("fence", "x"),
            ("ct", "!!"),
        ] {
            let mut bad = ok.clone();
            bad.insert(k.into(), v.into());
            assert_eq!(parse_record(&bad), Err("kabc".to_string()), "{k}={v}");
        }
        let mut hostile = ok.clone();
        hostile.insert("kid".into(), "k\n{\"level\":\"fake\"}".into());
        hostile.insert("v".into(), "9".into());
        assert_eq!(parse_record(&hostile), Err("invalid".to_string()));
        assert_eq!(sanitize_id(&"a".repeat(33)), "invalid");
    }

    #[test]
    fn an_older_record_is_adopted_only_when_the_current_session_is_unusable() {
        // A replayed record, or one a failover restored: older than what was seen.
        assert!(!adoptable(1_000, 2_000, true));
        assert!(!adoptable(2_000, 2_000, true));
        assert!(adoptable(3_000, 2_000, true));
        // Nothing usable here: an older but usable session beats none.
        assert!(adoptable(1_000, 2_000, false));
    }

    #[test]
    fn odd_store_values_are_an_unreadable_record_not_an_outage() {
        use redis::Value;
        let bulk = |s: &[u8]| Value::BulkString(s.to_vec());
        let answer = |state: i64, fields: Vec<Value>, small: [Value; 3]| {
            let [a, b, c] = small;
            Value::Array(vec![Value::Int(state), Value::Array(fields), a, b, c])
        };
        let none = || [Value::Nil, Value::Nil, Value::Nil];
        assert_eq!(
            parse_snapshot(answer(0, vec![], none())),
            Snapshot::default()
        );
        for state in [2, 3, 7] {
            let s = parse_snapshot(answer(state, vec![], none()));
            assert!(s.malformed.is_some(), "{state}");
            assert_eq!(s.record, Some(Err("invalid".to_string())));
        }
        let s = parse_snapshot(answer(1, vec![bulk(b"kid"), bulk(b"\xff\xfe")], none()));
        assert_eq!(s.malformed, Some("not_text"));
        assert!(parse_snapshot(Value::Okay).malformed.is_some());
        // The small keys are passed on as text (non-UTF-8 dropped), to be authenticated.
        let s = parse_snapshot(answer(
            0,
            vec![],
            [bulk(b"7"), bulk(b"\xff:1"), bulk(b"1700000000500:3")],
        ));
        assert_eq!(
            s.raw,
            [Some("7".into()), None, Some("1700000000500:3".into())]
        );
        assert_eq!(
            (s.renew_requested, s.rejected, s.backoff),
            (None, None, None)
        );
    }

    #[test]
    fn steering_values_count_only_authenticated_and_within_what_a_sidecar_writes() {
        let ring = KeyRing::new(vec![SessionKey::from_bytes(&[5; 32])]);
        let now_ms: i64 = 1_700_000_000_000;
        let now_us = now_ms * 1000;
        let fp = "0123456789abcdef0123456789abcdef";
        let sign = |key: &str, v: String| ring.sign(key, &v).unwrap();
        // The fleet's backoff: ahead, at most 15 min (+ slack), counts capped.
        let ttl = Duration::from_secs(2);
        let b = |until_ms: i64, failures: u64| {
            let v = sign("p:t:backoff", format!("{until_ms}:{failures}:4"));
            verified_backoff(&ring, "p:t:backoff", &v, now_us, ttl)
        };
        assert_eq!(
            b(now_ms + 2_000, 3),
            Some(Backoff {
                until_us: (now_ms + 2_000) * 1000,
                failures: 3,
                generation: 4
            })
        );
        assert_eq!(b(now_ms + 900_000, 99).map(|b| b.failures), Some(16));
        assert_eq!(
            b(now_ms + 3_600_000, 1),
            None,
            "beyond what a sidecar writes"
        );
        assert_eq!(b(4_102_444_800_000, 1), None);
        // Just over (an owner between attempts): still reported; long over: not.
        assert!(b(now_ms - 1, 1).is_some());
        assert_eq!(b(now_ms - 60_000, 1), None, "over");
        let unsigned = format!("{}:0:4", now_ms + 2_000);
        assert_eq!(
            verified_backoff(&ring, "p:t:backoff", &unsigned, now_us, ttl),
            None
        );
        // Altered after signing (the 28.2 replay): refused.
        let genuine = sign("p:t:rejected", format!("{fp}:{}:1", now_ms + 30_000));
        let m = verified_marker(&ring, "p:t:rejected", &genuine, now_us).unwrap();
        assert_eq!((m.fingerprint.as_str(), m.rejections), (fp, 1));
        let rewritten = genuine.replacen(&(now_ms + 30_000).to_string(), "4102444800000", 1);
        assert_eq!(
            verified_marker(&ring, "p:t:rejected", &rewritten, now_us),
            None
        );
        let far = sign("p:t:rejected", format!("{fp}:{}:1", now_ms + 400_000));
        assert_eq!(verified_marker(&ring, "p:t:rejected", &far, now_us), None);
        // Moved to another key: refused.
        assert_eq!(
            verified_marker(&ring, "p:u:rejected", &genuine, now_us),
            None
        );
        // Renewal requests: authenticated, asked within the window.
        let window = Duration::from_secs(10);
        let r = |at_ms: i64| {
            let v = sign("p:t:renew", format!("7:{at_ms}"));
            verified_renew(&ring, "p:t:renew", &v, now_us, window)
        };
        assert_eq!(
            r(now_ms - 1_000),
            Some(RenewRequest {
                generation: 7,
                at_ms: now_ms - 1_000
            })
        );
        assert_eq!(r(now_ms - 60_000), None, "a replay of an old request");
        assert_eq!(r(now_ms + 60_000), None);
        assert_eq!(
            verified_renew(&ring, "p:t:renew", "7", now_us, window),
            None
        );
    }

    #[test]
    fn a_follower_renews_on_its_own_halfway_between_the_owners_plan_and_its_last_moment() {
        assert_eq!(own_renewal_at(1_000, 2_000), 1_500);
        assert_eq!(own_renewal_at(1_000, 1_000), 1_000);
        // Already past the last moment: at once.
        assert_eq!(own_renewal_at(1_000, 500), 1_000);
    }

    #[test]
    fn a_follower_gives_the_owners_plan_a_grace_before_taking_over_but_never_past_its_last_moment()
    {
        // A wide span: halfway, as before.
        assert_eq!(takeover_at(1_000_000, 3_000_000, 80_000), 2_000_000);
        // A narrow one (4 s tokens, a 0.4 s window): the grace, not a few ms after the plan.
        assert_eq!(takeover_at(1_000_000, 1_100_000, 80_000), 1_080_000);
        // Never after its own last moment...
        assert_eq!(takeover_at(1_000_000, 1_030_000, 80_000), 1_030_000);
        // ...and a plan already past it stays the plan (the caller caps it).
        assert_eq!(takeover_at(1_000_000, 900_000, 80_000), 1_000_000);
        assert_eq!(owner_grace_us(Duration::from_secs(4)), 80_000);
        assert_eq!(owner_grace_us(Duration::from_secs(1)), 50_000);
        assert_eq!(owner_grace_us(Duration::from_secs(3600)), 72_000_000);
    }

    #[test]
    fn a_session_survives_the_record_round_trip_without_its_bytes_in_the_ciphertext() {
        let clock = Arc::new(ClockOffset::new());
        let now = SystemTime::now();
        let iat = unix_us(now) / 1_000_000;
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &serde_json::json!({"iat": iat, "exp": iat + 600, "internalTokenKey": "itk-0f0f0f0f"}),
            &jsonwebtoken::EncodingKey::from_secret(b"finhub-only"),
        )
        .unwrap();
        let g = Grant {
            token: Secret::new(token.clone()),
            expires_in: Some(Duration::from_secs(600)),
            refresh_token: Some(Secret::new("rt-secret-9999")),
            session_id: Some("sess-1".into()),
        };
        let s = FinHubSession::from_grant(g, now, now, &clock);
        let ring = KeyRing::new(vec![SessionKey::from_bytes(&[3; 32])]);
        let mut plain = Vec::new();
        serde_json::to_writer(&mut plain, &payload_of(&s)).unwrap();
        let a = aad("p:t:session", "t", 1, 1);
        let sealed = ring.seal(a.as_bytes(), &plain).unwrap();
        for secret in [token.as_bytes(), b"rt-secret-9999", b"itk-0f0f0f0f"] {
            assert!(!sealed.ciphertext.windows(secret.len()).any(|w| w == secret));
        }
        let opened = ring.open(a.as_bytes(), &sealed).unwrap();
        let p: Payload = serde_json::from_slice(&opened).unwrap();
        let other_clock = Arc::new(ClockOffset::new());
        let back = session_of(&p, &other_clock);
        assert_eq!(back.token.expose(), token);
        assert_eq!(
            back.internal_token_key.as_ref().map(|k| k.expose()),
            Some("itk-0f0f0f0f")
        );
        assert_eq!(back.session_id, "sess-1");
        assert_eq!(back.timing(), s.timing());
        assert!(back.is_usable(now));
        assert_eq!(back.window_opens_us(), s.window_opens_us());
    }
}
