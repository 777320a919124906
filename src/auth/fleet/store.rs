//! The shared store's I/O: the Redis scripts and [`FleetStore`], one per process (snapshot,
//! lease, write, release, steering markers, backoff).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use redis::Script;
use zeroize::Zeroizing;

use super::metrics::FleetMetrics;
use super::record::{
    aad, parse_snapshot, payload_of, record_ttl_us, verified_backoff, verified_marker,
    verified_renew, Backoff, Lease, Marker, Payload, RawRecord, Snapshot,
};
use crate::auth::session::FinHubSession;
use crate::config::{SharedSessionSettings, TenantConfig};
use crate::redis_pool::{Failure, Pool, PoolName, PoolSpec, RedisPoolMetrics};
use crate::sealing::OpenError;
use crate::time::unix_us;

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

/// The shared store: the Redis pool, the scripts and the keys. One per process.
pub struct FleetStore {
    pool: Arc<Pool>,
    pub(super) settings: SharedSessionSettings,
    replica: String,
    acquire: Script,
    write: Script,
    read: Script,
    release: Script,
    metrics: FleetMetrics,
}

impl FleetStore {
    /// The store for `settings` (connections are made by [`FleetStore::keep_connected`]),
    /// counted in `metrics` and its pool in `redis`.
    pub fn new(
        settings: &SharedSessionSettings,
        metrics: &FleetMetrics,
        redis: &RedisPoolMetrics,
    ) -> Arc<FleetStore> {
        let scripts = [ACQUIRE_SCRIPT, WRITE_SCRIPT, READ_SCRIPT, RELEASE_SCRIPT];
        let pool = Pool::new(PoolSpec {
            connection: settings.connection.clone(),
            topology: settings.topology.clone(),
            name: PoolName::SessionStore,
            metrics: redis.clone(),
            password: settings.password.clone(),
            ca_pem: settings.ca_pem.clone(),
            connect_timeout: settings.connect_timeout,
            timeout: settings.timeout,
            connections: 1,
            scripts: scripts.iter().map(|s| Script::new(s)).collect(),
            gauge: metrics.store_connections(),
            purpose: "session store",
            meanwhile: "sessions follow auth.shared.on_store_error",
        });
        metrics.store_configured();
        Arc::new(FleetStore {
            pool: Arc::new(pool),
            settings: settings.clone(),
            replica: replica_id(),
            acquire: Script::new(ACQUIRE_SCRIPT),
            write: Script::new(WRITE_SCRIPT),
            read: Script::new(READ_SCRIPT),
            release: Script::new(RELEASE_SCRIPT),
            metrics: metrics.clone(),
        })
    }

    /// Keeps the store's connection up, forever (a background task).
    pub async fn keep_connected(self: Arc<Self>) {
        self.pool.clone().keep_connected().await
    }

    /// Waits (up to twice the connect timeout) for the first connection, so that a replica
    /// starting next to a working store reads it before deciding to log in.
    pub(super) async fn connected(&self) {
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
        self.metrics.store_failed(f.into());
        f
    }

    fn answered(&self) {
        self.metrics.store_answered();
    }

    /// The record, a pending renewal request, the rejected-credentials marker and the fleet's
    /// backoff, in one round trip ([`READ_SCRIPT`]).
    pub(super) async fn snapshot(&self, tenant: &str) -> Result<Snapshot, Failure> {
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
            self.metrics.malformed();
            tracing::debug!(why = kind, "the shared record key holds no record");
        }
        Ok(snap)
    }

    /// Takes or extends the lease (in a `finhub.session.lease` span); a fence not above `seen`
    /// (the highest fence of an authenticated record this replica knows) is replaced by a fresh
    /// one.
    pub(super) async fn acquire(&self, tenant: &str, seen: u64) -> Result<Lease, Failure> {
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
    pub(super) fn credentials_fingerprint(&self, tenant: &TenantConfig) -> String {
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
    pub(super) async fn mark_rejected(&self, tenant: &str, marker: &Marker) -> Result<(), Failure> {
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
    pub(super) async fn set_backoff(&self, tenant: &str, b: Backoff) -> Result<(), Failure> {
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
    pub(in crate::auth) async fn release(&self, tenant: &str) {
        let mut inv = self.release.key(self.key(tenant, "lease"));
        inv.arg(&self.replica);
        let _ = self
            .pool
            .call(|mut c| async move { inv.invoke_async::<i64>(&mut c).await })
            .await;
    }

    /// Asks the owner to renew generation `generation` (FinHub refused it).
    pub(super) async fn ask_renewal(&self, tenant: &str, generation: u64) -> Result<(), Failure> {
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
    pub(super) async fn write(
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
    pub(super) fn open(&self, tenant: &str, raw: &RawRecord) -> Result<Payload, OpenError> {
        let aad = aad(
            &self.key(tenant, "session"),
            tenant,
            raw.generation,
            raw.fence,
        );
        let plain = self.settings.keys.open(aad.as_bytes(), &raw.sealed)?;
        serde_json::from_slice(&plain).map_err(|_| OpenError::Corrupt)
    }

    /// The fleet's metrics.
    pub(super) fn metrics(&self) -> &FleetMetrics {
        &self.metrics
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
