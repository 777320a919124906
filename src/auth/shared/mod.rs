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
//! - **Failures**: store unavailable → keep the last good session, renew on its own when due
//!   (`on_store_error = "local"`) or never (`"wait"`); a record this replica cannot decrypt →
//!   error metric and a log line naming the key id, own login, and it never takes the lease (so
//!   never overwrites a record the others can read) while that record lives.

mod crypto;

pub use crypto::{KeyRing, OpenError, Sealed, SessionKey};

use std::collections::{HashMap, HashSet};

use base64::Engine;
use redis::Script;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::renew::{unix_secs, Renewer};
use super::*;
use crate::config::{OnStoreError, SharedSessionSettings};
use crate::redis_pool::{Failure, Pool, PoolSpec};

/// Takes or extends the lease. `KEYS`: lease, fence. `ARGV`: replica id, ttl ms.
/// Returns `{1, fence}` when this replica holds it, `{0, fence}` when another does.
pub const ACQUIRE_SCRIPT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local owner, f = string.match(cur, '^(.*):(%d+)$')
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(f)}
  end
  return {0, tonumber(f) or 0}
end
local f = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. f, 'PX', ARGV[2])
return {1, f}
"#;

/// Writes the record if the writer holds the lease with its fence and both fence and generation
/// are not older than the stored record's. `KEYS`: record, lease. `ARGV`: replica id, fence,
/// generation, key id, nonce, ciphertext, ttl ms. Returns 1, or a negative refusal: -1 not the
/// lease holder, -2 an older fence, -3 not a newer generation.
pub const WRITE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[2]) ~= ARGV[1] .. ':' .. ARGV[2] then return -1 end
local f = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0') or 0
local g = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0') or 0
if tonumber(ARGV[2]) < f then return -2 end
if tonumber(ARGV[3]) <= g then return -3 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', '1', 'kid', ARGV[4], 'nonce', ARGV[5], 'ct', ARGV[6], 'gen', ARGV[3], 'fence', ARGV[2], 'owner', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return 1
"#;

/// Gives the lease up if this replica holds it. `KEYS`: lease. `ARGV`: replica id.
pub const RELEASE_SCRIPT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and string.match(cur, '^(.*):%d+$') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// An owner without a session gives its lease to another replica after this many failed
/// attempts in a row (transient ones; rejected credentials are never rotated).
const YIELD_AFTER_FAILURES: u32 = 3;

/// While waiting for the owner's renewal after a 401, the record is read this often.
const FOLLOW_POLL: Duration = Duration::from_millis(50);

/// At most this many distinct key ids are metric labels (a hostile store cannot grow the
/// exposition without bound); others count as `other`.
const MAX_KEY_ID_LABELS: usize = 16;

/// The shared store: the Redis pool, the scripts and the keys. One per process.
pub struct SharedStore {
    pool: Arc<Pool>,
    settings: SharedSessionSettings,
    replica: String,
    acquire: Script,
    write: Script,
    release: Script,
    metrics: Metrics,
    key_id_labels: Mutex<HashSet<String>>,
}

/// What `/status` shows about a tenant's shared session (no secret).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SharedStatus {
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
struct Snapshot {
    record: Option<Result<RawRecord, String>>,
    renew_requested: Option<u64>,
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

impl SharedStore {
    /// The store for `settings` (connections are made by [`SharedStore::keep_connected`]).
    pub fn new(settings: &SharedSessionSettings, metrics: &Metrics) -> Arc<SharedStore> {
        let scripts = [ACQUIRE_SCRIPT, WRITE_SCRIPT, RELEASE_SCRIPT];
        let pool = Pool::new(PoolSpec {
            connection: settings.connection.clone(),
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
        for kind in ["timeout", "connection", "unavailable", "response"] {
            metrics.session_store_errors.with_label_values(&[kind]);
        }
        Arc::new(SharedStore {
            pool: Arc::new(pool),
            settings: settings.clone(),
            replica: replica_id(),
            acquire: Script::new(ACQUIRE_SCRIPT),
            write: Script::new(WRITE_SCRIPT),
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

    fn key(&self, tenant: &str, what: &str) -> String {
        format!("{}{tenant}:{what}", self.settings.key_prefix)
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

    /// The record and a pending renewal request, in one round trip.
    async fn snapshot(&self, tenant: &str) -> Result<Snapshot, Failure> {
        let (record_key, renew_key) = (self.key(tenant, "session"), self.key(tenant, "renew"));
        let r = self
            .pool
            .call(|mut c| async move {
                redis::pipe()
                    .hgetall(record_key)
                    .get(renew_key)
                    .query_async::<(HashMap<String, String>, Option<String>)>(&mut c)
                    .await
            })
            .await
            .map_err(|f| self.failed(f))?;
        self.answered();
        let (fields, renew) = r;
        Ok(Snapshot {
            record: (!fields.is_empty()).then(|| parse_record(&fields)),
            renew_requested: renew.and_then(|g| g.parse().ok()),
        })
    }

    /// Takes or extends the lease: `Some(fence)` when this replica holds it.
    async fn acquire(&self, tenant: &str) -> Result<Option<u64>, Failure> {
        let mut inv = self.acquire.key(self.key(tenant, "lease"));
        inv.key(self.key(tenant, "fence"))
            .arg(&self.replica)
            .arg(self.settings.lease_ttl.as_millis() as u64);
        let (held, fence) = self
            .pool
            .call(|mut c| async move { inv.invoke_async::<(i64, i64)>(&mut c).await })
            .await
            .map_err(|f| self.failed(f))?;
        self.answered();
        Ok((held == 1).then_some(fence.max(0) as u64))
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
        let key = self.key(tenant, "renew");
        let ttl = (self.settings.follow_timeout * 2).as_millis().max(1) as u64;
        self.pool
            .call(|mut c| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(generation)
                    .arg("PX")
                    .arg(ttl)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
            .map_err(|f| self.failed(f))?;
        self.answered();
        Ok(())
    }

    /// Encrypts `s` and writes it as generation `generation` under the lease with `fence`.
    /// `Ok(false)`: refused (the lease or a newer record belongs to another replica).
    async fn write(
        &self,
        tenant: &str,
        fence: u64,
        generation: u64,
        s: &Session,
    ) -> Result<bool, Failure> {
        let now = SystemTime::now();
        let ttl_ms = record_ttl_us(s, now) / 1000;
        if ttl_ms <= 0 {
            return Ok(false);
        }
        let record_key = self.key(tenant, "session");
        let payload = payload_of(s);
        let mut plain = Zeroizing::new(Vec::with_capacity(8192));
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
fn record_ttl_us(s: &Session, now: SystemTime) -> i64 {
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
pub async fn leave_all(table: Arc<SessionTable>, store: Arc<SharedStore>) {
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

fn payload_of(s: &Session) -> Payload {
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
fn session_of(p: &Payload, clock: &Arc<ClockOffset>) -> Session {
    if let (Some(lo_us), Some(hi_us)) = (p.offset_lo_us, p.offset_hi_us) {
        clock.adopt(OffsetBounds { lo_us, hi_us }, SystemTime::now());
    }
    let claims = Claims::of(&p.token);
    Session {
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
    Follower,
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

/// One tenant's view of the shared store (inside its renewal task).
pub(super) struct Follower {
    store: Arc<SharedStore>,
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
}

impl Follower {
    /// A follower of `store` for one tenant.
    pub(super) fn new(store: Arc<SharedStore>) -> Follower {
        Follower {
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
        }
    }
}

impl Renewer {
    fn follower(&mut self) -> Option<&mut Follower> {
        self.shared.as_mut()
    }

    fn set_source(&mut self, source: Source) {
        let tenant = self.tenant_id.clone();
        let Some(f) = self.shared.as_mut() else {
            return;
        };
        f.source = source;
        for s in [Source::Shared, Source::Local] {
            self.metrics
                .session_source
                .with_label_values(&[tenant.as_str(), s.label()])
                .set(i64::from(s == source));
        }
        self.show_shared();
    }

    fn set_owner(&mut self, fence: Option<u64>) {
        let tenant = self.tenant_id.clone();
        let Some(f) = self.shared.as_mut() else {
            return;
        };
        let was = f.fence.is_some();
        f.fence = fence;
        if fence.is_some() && !was {
            tracing::info!(tenant = %tenant, fence = fence.unwrap_or(0), replica = f.store.replica(), "took the tenant's renewal lease: this replica renews the shared session");
        } else if fence.is_none() && was {
            tracing::info!(tenant = %tenant, "gave up the tenant's renewal lease");
        }
        self.metrics
            .session_lease_owner
            .with_label_values(&[tenant.as_str()])
            .set(i64::from(fence.is_some()));
    }

    fn show_shared(&self) {
        let Some(f) = self.shared.as_ref() else {
            return;
        };
        let status = SharedStatus {
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
        s.shared = Some(status);
    }

    /// The series of a tenant with a shared store, created at 0; waits for the store's first
    /// connection (bounded).
    pub(super) async fn init_shared(&mut self) {
        if let Some(f) = self.shared.as_ref() {
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
        let snapshot = store.snapshot(&tenant).await;
        let mut renew_requested = None;
        let role = match snapshot {
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
                if !readable {
                    if self.shared.as_ref().is_some_and(|f| f.fence.is_some()) {
                        store.release(&tenant).await;
                        self.set_owner(None);
                    }
                    Role::Alone
                } else if self
                    .shared
                    .as_ref()
                    .and_then(|f| f.yielded_until)
                    .is_some_and(|t| Instant::now() < t)
                {
                    // Gave the lease up after failing: another replica's turn.
                    Role::Follower
                } else {
                    match store.acquire(&tenant).await {
                        Ok(Some(fence)) => {
                            self.set_owner(Some(fence));
                            Role::Owner
                        }
                        Ok(None) => {
                            self.set_owner(None);
                            Role::Follower
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
        let previous = self.shared.as_ref().and_then(|f| f.role);
        if let Some(f) = self.follower() {
            f.role = Some(role);
            if role == Role::Owner {
                // Extend the lease well before it ends.
                let extend = now_us + us(store.settings.lease_ttl) / 3;
                f.next_look_us = f.next_look_us.min(extend);
            }
        }
        self.show_shared();
        let acts = matches!(role, Role::Owner | Role::Alone);
        if acts
            && previous != Some(role)
            && matches!(previous, Some(Role::Follower | Role::Waiting))
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
        let forced = self.slot.forced_pending();
        match role {
            Role::Owner => {
                if usable.is_none()
                    && self.failures >= YIELD_AFTER_FAILURES
                    && self.rejected.is_none()
                {
                    // This replica cannot get the fleet a session (its path to FinHub may be
                    // what is broken): give the lease to another replica for a turn. Still one
                    // replica at a time calls FinHub; rejected credentials are not rotated (each
                    // owner would try them again).
                    tracing::warn!(tenant = %tenant, failures = self.failures, "no session after repeated failures; giving the renewal lease to another replica");
                    store.release(&tenant).await;
                    self.set_owner(None);
                    self.failures = 0;
                    if let Some(f) = self.follower() {
                        f.role = Some(Role::Follower);
                        f.yielded_until = Some(Instant::now() + store.settings.poll_interval * 3);
                        next.at_us = f.next_look_us;
                    }
                    self.show_shared();
                    return Turn::Wait;
                }
                let source = self.shared.as_ref().map(|f| f.source);
                if usable.is_some() && source == Some(Source::Local) {
                    // Ours, not yet shared (after a store outage or a lost write): share it.
                    self.share_current().await;
                }
                let adopted = self.shared.as_ref().and_then(|f| f.adopted);
                if let (Some(g), Some((mine, _))) = (renew_requested, adopted) {
                    if g == mine && !forced && self.forced_allowed() {
                        tracing::info!(tenant = %tenant, generation = g, "another replica's request was refused by FinHub: renewing the shared session");
                        self.slot
                            .forced
                            .store(self.slot.generation(), Ordering::SeqCst);
                        return Turn::Renew;
                    }
                }
                if forced || now_us >= next.at_us {
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
                next.at_us = self.shared.as_ref().map_or(now_us, |f| f.next_look_us);
                Turn::Wait
            }
            Role::Follower => {
                if let Some(f) = self.follower() {
                    if !forced {
                        f.asked = None;
                    }
                }
                if forced {
                    let turn = self.follow_refusal(&tenant, &store, now_us).await;
                    if turn == Turn::Wait {
                        next.at_us = self.shared.as_ref().map_or(now_us, |f| f.next_look_us);
                    }
                    return turn;
                }
                let source = self.shared.as_ref().map(|f| f.source);
                if source == Some(Source::Local) && usable.is_some() {
                    // Our own session (from an outage), no shared one yet: keep it renewed.
                    return if now_us >= next.at_us {
                        Turn::Renew
                    } else {
                        Turn::Wait
                    };
                }
                next.at_us = self.shared.as_ref().map_or(now_us, |f| f.next_look_us);
                Turn::Wait
            }
        }
    }

    /// The store failed: the role `on_store_error` gives.
    fn store_failed(&mut self, failure: Failure) -> Role {
        let tenant = self.tenant_id.clone();
        let mode = self
            .shared
            .as_ref()
            .map(|f| f.store.settings.on_store_error);
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
                if f.adopted == Some((generation, fence)) {
                    return true;
                }
                let session = session_of(&payload, self.client.clock());
                let now = SystemTime::now();
                if !session.is_usable(now) {
                    return true;
                }
                if let Some(f) = self.follower() {
                    f.adopted = Some((generation, fence));
                    f.asked = None;
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
    async fn follow_refusal(&mut self, tenant: &str, store: &SharedStore, now_us: i64) -> Turn {
        let generation = self
            .shared
            .as_ref()
            .and_then(|f| f.adopted)
            .map_or(0, |(g, _)| g);
        let asked = self.shared.as_ref().and_then(|f| f.asked);
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

    /// After a renewal step: an owner shares a new session; anyone else now serves its own.
    pub(super) async fn after_renewal(&mut self) {
        let g = self.slot.generation();
        let Some(f) = self.follower() else {
            return;
        };
        if g == f.generation_before {
            return;
        }
        if f.role == Some(Role::Owner) {
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
                    f.adopted = Some((generation, fence));
                }
                self.set_source(Source::Shared);
                tracing::debug!(tenant = %tenant, generation, "shared session written");
            }
            Ok(false) => {
                tracing::info!(tenant = %tenant, "the shared record belongs to a newer owner; not written, following it");
                self.set_owner(None);
                self.set_source(Source::Local);
                if let Some(f) = self.follower() {
                    f.next_look_us = 0;
                }
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
        let s = Session::from_grant(g, now, now, &clock);
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
