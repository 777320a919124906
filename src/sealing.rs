//! Encryption of shared session records: AES-256-GCM (RustCrypto `aes-gcm`), a random 96-bit
//! nonce per record, the record's identity (Redis key, tenant, generation, fence) as associated
//! data, so a record cannot be moved to another key or tenant or replayed as another
//! generation. Keys come from files, are zeroized on drop and never shown: a key is named by
//! its id, a truncated SHA-256 of the key (not a secret, the same on every replica holding it).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// One 32-byte key and its id.
pub struct SessionKey {
    id: String,
    cipher: Aes256Gcm,
    /// HMAC-SHA256 key derived from the key (never the AES key itself): fingerprints of
    /// credentials that every replica holding the key computes alike.
    mac: ring::hmac::Key,
    /// HMAC-SHA256 key derived from the key for the small values that steer replicas (renewal
    /// requests, the fleet's backoff, rejected-credentials markers): a writer to Redis without
    /// the key cannot forge or alter them.
    tag: ring::hmac::Key,
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SessionKey {
    /// A key from its base64 text (exactly 32 bytes once decoded; surrounding whitespace is
    /// ignored); `None` otherwise. The decoded bytes are zeroized once the cipher holds them.
    pub fn from_base64(text: &[u8]) -> Option<SessionKey> {
        let text = text.trim_ascii();
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .ok()?,
        );
        let bytes: &[u8; 32] = decoded.as_slice().try_into().ok()?;
        Some(SessionKey::from_bytes(bytes))
    }

    /// A key from its bytes.
    pub fn from_bytes(bytes: &[u8; 32]) -> SessionKey {
        let mut h = Sha256::new();
        h.update(b"finhub-sidecar session key id\0");
        h.update(bytes);
        let digest = h.finalize();
        let id = format!(
            "k{}",
            digest[..6]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let mut m = Sha256::new();
        m.update(b"finhub-sidecar credential fingerprint\0");
        m.update(bytes);
        let mac_key = Zeroizing::new(m.finalize());
        let mut t = Sha256::new();
        t.update(b"finhub-sidecar store value tag\0");
        t.update(bytes);
        let tag_key = Zeroizing::new(t.finalize());
        SessionKey {
            id,
            // `Aes256Gcm` zeroizes its key schedule on drop (feature `zeroize`).
            cipher: Aes256Gcm::new(bytes.into()),
            mac: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &mac_key[..]),
            tag: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &tag_key[..]),
        }
    }

    /// The key's id (in every record it encrypts).
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// The keys a replica holds: the current one (new records) first, then older ones (reading
/// records written before a rotation).
#[derive(Debug)]
pub struct KeyRing {
    keys: Vec<SessionKey>,
}

/// An encrypted record body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Id of the key that encrypted it.
    pub key_id: String,
    /// The 96-bit nonce.
    pub nonce: [u8; 12],
    /// Ciphertext and tag.
    pub ciphertext: Vec<u8>,
}

/// Why a record could not be decrypted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The record names a key this replica does not hold.
    #[error("the record is encrypted with a key this replica does not hold")]
    UnknownKey,
    /// The key is known but the record does not authenticate (tampered, moved, or another key
    /// with a colliding id).
    #[error("the record does not authenticate with the key it names")]
    Corrupt,
}

impl KeyRing {
    /// A ring of `keys`, the first being the current one. Keys with the id of an earlier one
    /// are dropped.
    pub fn new(keys: Vec<SessionKey>) -> KeyRing {
        let mut unique: Vec<SessionKey> = Vec::with_capacity(keys.len());
        for k in keys {
            if !unique.iter().any(|u| u.id == k.id) {
                unique.push(k);
            }
        }
        KeyRing { keys: unique }
    }

    /// How many keys the ring holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the ring holds no key (never, once configured).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Id of the key new records are written with.
    pub fn current_id(&self) -> &str {
        self.keys.first().map_or("", |k| k.id.as_str())
    }

    /// Whether this ring holds the key `id`.
    pub fn holds(&self, id: &str) -> bool {
        self.keys.iter().any(|k| k.id == id)
    }

    /// Encrypts `plaintext` with the current key and a fresh random nonce, bound to `aad`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Option<Sealed> {
        let key = self.keys.first()?;
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = key
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .ok()?;
        Some(Sealed {
            key_id: key.id.clone(),
            nonce,
            ciphertext,
        })
    }

    /// A fingerprint of `parts` (e.g. a tenant's credentials): HMAC-SHA256 with a key derived
    /// from the current key, hex, truncated to 128 bits. Replicas with the same key and the same
    /// parts compute the same one; without the key it tells nothing about the parts.
    pub fn fingerprint(&self, parts: &[&[u8]]) -> String {
        let Some(key) = self.keys.first() else {
            return String::new();
        };
        let mut ctx = ring::hmac::Context::with_key(&key.mac);
        for p in parts {
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p);
        }
        ctx.sign().as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// `value` as stored under the Redis key `key`, authenticated with the current key:
    /// `<value>:<key id>:<tag>` (tag: HMAC-SHA256 of the key name and the value, base64url).
    /// `None` without a key.
    pub fn sign(&self, key: &str, value: &str) -> Option<String> {
        let k = self.keys.first()?;
        let tag = ring::hmac::sign(&k.tag, &tag_input(key, value));
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        Some(format!("{value}:{}:{}", k.id, b64.encode(tag.as_ref())))
    }

    /// The value of `signed` (see [`KeyRing::sign`]) if it authenticates, with any key of this
    /// ring, as stored under `key`; `None` for anything else (no tag, an unknown key, another
    /// key name, an altered value).
    pub fn verify<'a>(&self, key: &str, signed: &'a str) -> Option<&'a str> {
        let (rest, tag) = signed.rsplit_once(':')?;
        let (value, key_id) = rest.rsplit_once(':')?;
        let k = self.keys.iter().find(|k| k.id == key_id)?;
        let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(tag)
            .ok()?;
        ring::hmac::verify(&k.tag, &tag_input(key, value), &tag).ok()?;
        Some(value)
    }

    /// Decrypts `sealed`, which must be bound to `aad`.
    pub fn open(&self, aad: &[u8], sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == sealed.key_id)
            .ok_or(OpenError::UnknownKey)?;
        key.cipher
            .decrypt(
                &Nonce::from(sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| OpenError::Corrupt)
    }
}

/// What a steering value's tag covers: a domain, the Redis key's name and the value, each
/// length-prefixed.
fn tag_input(key: &str, value: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(64 + key.len() + value.len());
    for part in [
        &b"finhub-sidecar/store-value/v1"[..],
        key.as_bytes(),
        value.as_bytes(),
    ] {
        v.extend_from_slice(&(part.len() as u64).to_be_bytes());
        v.extend_from_slice(part);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> SessionKey {
        SessionKey::from_bytes(&[b; 32])
    }

    #[test]
    fn a_record_opens_only_with_its_key_and_its_identity() {
        let ring = KeyRing::new(vec![key(1)]);
        let sealed = ring.seal(b"p:t:session|t|7", b"token-bytes").unwrap();
        assert_eq!(sealed.key_id, ring.current_id());
        assert!(!sealed
            .ciphertext
            .windows(b"token-bytes".len())
            .any(|w| w == b"token-bytes"));
        assert_eq!(
            ring.open(b"p:t:session|t|7", &sealed).unwrap().as_slice(),
            b"token-bytes"
        );
        // Moved to another tenant, key or generation: refused.
        assert_eq!(
            ring.open(b"p:u:session|u|7", &sealed),
            Err(OpenError::Corrupt)
        );
        assert_eq!(
            ring.open(b"p:t:session|t|8", &sealed),
            Err(OpenError::Corrupt)
        );
        // A flipped bit: refused.
        let mut bad = sealed.clone();
        bad.ciphertext[0] ^= 1;
        assert_eq!(ring.open(b"p:t:session|t|7", &bad), Err(OpenError::Corrupt));
        // Another replica's key: unknown.
        let other = KeyRing::new(vec![key(2)]);
        assert_eq!(
            other.open(b"p:t:session|t|7", &sealed),
            Err(OpenError::UnknownKey)
        );
        // Fresh nonces: the same plaintext never gives the same ciphertext.
        let again = ring.seal(b"p:t:session|t|7", b"token-bytes").unwrap();
        assert_ne!(again.nonce, sealed.nonce);
    }

    #[test]
    fn steering_values_verify_only_unaltered_under_their_own_key_name() {
        let ring = KeyRing::new(vec![key(1)]);
        let signed = ring.sign("p:t:backoff", "1700000000000:3:7").unwrap();
        assert!(signed.len() < 100, "{signed}");
        assert_eq!(
            ring.verify("p:t:backoff", &signed),
            Some("1700000000000:3:7")
        );
        // Another key name, an altered value, a truncated or missing tag, another fleet's key.
        assert_eq!(ring.verify("p:u:backoff", &signed), None);
        assert_eq!(ring.verify("p:t:renew", &signed), None);
        let altered = signed.replacen("1700000000000", "4102444800000", 1);
        assert_eq!(ring.verify("p:t:backoff", &altered), None);
        assert_eq!(
            ring.verify("p:t:backoff", &signed[..signed.len() - 2]),
            None
        );
        assert_eq!(ring.verify("p:t:backoff", "4102444800000:0"), None);
        assert_eq!(ring.verify("p:t:backoff", ""), None);
        assert_eq!(ring.verify("p:t:backoff", "::"), None);
        let other = KeyRing::new(vec![key(2)]);
        assert_eq!(other.verify("p:t:backoff", &signed), None);
        // After a rotation the old key still verifies.
        let rotated = KeyRing::new(vec![key(2), key(1)]);
        assert!(rotated.verify("p:t:backoff", &signed).is_some());
    }

    #[test]
    fn rotation_reads_with_the_old_key_and_writes_with_the_new() {
        let old = KeyRing::new(vec![key(1)]);
        let sealed = old.seal(b"a", b"x").unwrap();
        let rotated = KeyRing::new(vec![key(2), key(1)]);
        assert_eq!(rotated.open(b"a", &sealed).unwrap().as_slice(), b"x");
        let new = rotated.seal(b"a", b"y").unwrap();
        assert_eq!(new.key_id, key(2).id());
        assert_eq!(old.open(b"a", &new), Err(OpenError::UnknownKey));
    }

    #[test]
    fn keys_parse_from_base64_and_never_show() {
        let text = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let k = SessionKey::from_base64(format!("  {text}\n").as_bytes()).unwrap();
        assert_eq!(k.id(), key(7).id());
        assert_eq!(k.id().len(), 13);
        assert!(!format!("{k:?}").contains(&text[..8]));
        assert!(SessionKey::from_base64(b"c2hvcnQ=").is_none());
        assert!(SessionKey::from_base64(b"not base64 at all!").is_none());
        assert!(SessionKey::from_base64(b"").is_none());
        assert_ne!(key(1).id(), key(2).id());
    }
}
