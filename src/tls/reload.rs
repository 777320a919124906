//! The certificate reloader: re-reads the TLS files by content on an interval and publishes a
//! new snapshot only when the whole set is valid.
//!
//! Polling by content (through symlinks) catches every way files change: in-place rewrite,
//! rename over, and Kubernetes secret volumes, where each file is a symlink into `..data`, itself
//! a symlink swapped atomically to a new timestamped directory. A half-written rotation (new
//! certificate, old key) fails the key-match check and is not published; the next poll sees the
//! finished set. New content is acted on only when two consecutive polls read the same bytes.
//! A rejected set is logged once per distinct content, and counted.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::metrics::{ReloadResult, TlsMetrics};
use super::{ClientTls, TlsError, TlsFiles, TlsStore};
use crate::time::unix_now;

/// What one poll did.
#[derive(Debug)]
pub enum Poll {
    /// The files hold the published set.
    Unchanged,
    /// New content, read once; it is acted on if the next poll reads the same.
    Settling,
    /// A new set was published.
    Published,
    /// The files hold a set that was already rejected (not logged again).
    StillRejected,
    /// A new set was rejected; the last good one stays.
    Rejected(TlsError),
}

/// Watches one [`TlsFiles`] set and publishes into one [`TlsStore`].
pub struct Reloader {
    files: TlsFiles,
    store: Arc<TlsStore>,
    metrics: TlsMetrics,
    expiry_warning: Duration,
    last_rejected: Mutex<Option<u64>>,
    last_read: Mutex<Option<u64>>,
    last_expiry_warning: Mutex<Option<(u64, Instant)>>,
}

impl Reloader {
    /// A reloader for `files`, publishing into `store`.
    pub fn new(
        files: TlsFiles,
        store: Arc<TlsStore>,
        metrics: TlsMetrics,
        expiry_warning: Duration,
    ) -> Self {
        let r = Reloader {
            files,
            store,
            metrics,
            expiry_warning,
            last_rejected: Mutex::new(None),
            last_read: Mutex::new(None),
            last_expiry_warning: Mutex::new(None),
        };
        r.record_published(&r.store.current());
        r
    }

    /// Reads the files once and publishes, rejects or ignores them.
    pub fn poll(&self) -> Poll {
        let now = unix_now();
        let (fingerprint, material) = match self.files.read() {
            Ok(m) => (m.fingerprint(), Ok(m)),
            // A read error during a rotation is just another content to reject once.
            Err(e) => (text_fingerprint(&e.to_string()), Err(e)),
        };
        let current = self.store.current();
        // Unchanged files are not parsed again, and cost no test signature by a token.
        if current.fingerprint == fingerprint {
            self.warn_if_expiring(&current, now);
            return Poll::Unchanged;
        }
        // Act only on content seen twice in a row: files read while a rotation is being
        // written (a chain cut between PEM blocks, a CA bundle half copied) are not published,
        // nor counted as rejections.
        {
            let mut last = match self.last_read.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if *last != Some(fingerprint) {
                *last = Some(fingerprint);
                return Poll::Settling;
            }
        }
        let result = material.and_then(|m| ClientTls::from_material(&self.files, &m, now));
        let mut last_rejected = match self.last_rejected.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match result {
            Ok(tls) => {
                *last_rejected = None;
                let tls = Arc::new(tls);
                tracing::info!(
                    subject = tls
                        .identity
                        .as_ref()
                        .map(|i| i.subject.as_str())
                        .unwrap_or("-"),
                    serial = tls
                        .identity
                        .as_ref()
                        .map(|i| i.serial_hex.as_str())
                        .unwrap_or("-"),
                    not_after = tls.identity.as_ref().map(|i| i.not_after_unix).unwrap_or(0),
                    "client certificate set published"
                );
                for w in &tls.warnings {
                    tracing::warn!(finding = %w, "client certificate breaks a FinHub rule (enforced in production)");
                }
                self.metrics.reload(ReloadResult::Published);
                self.record_published(&tls);
                self.store.publish(tls.clone());
                self.warn_if_expiring(&tls, now);
                Poll::Published
            }
            Err(_) if *last_rejected == Some(fingerprint) => Poll::StillRejected,
            Err(e) => {
                *last_rejected = Some(fingerprint);
                tracing::warn!(error = %e, "client certificate set rejected; keeping the last good set");
                self.metrics.reload(ReloadResult::Rejected);
                Poll::Rejected(e)
            }
        }
    }

    fn record_published(&self, tls: &ClientTls) {
        let not_after = tls.identity.as_ref().map(|i| i.not_after_unix).unwrap_or(0);
        self.metrics.published(not_after, unix_now());
    }

    /// Warns (at most hourly per certificate) when the certificate expires within the window.
    fn warn_if_expiring(&self, tls: &ClientTls, now: i64) {
        let Some(id) = &tls.identity else { return };
        let left = id.not_after_unix - now;
        if left > self.expiry_warning.as_secs() as i64 {
            return;
        }
        let mut last = match self.last_expiry_warning.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let due = match *last {
            Some((fp, at)) => fp != tls.fingerprint || at.elapsed() >= Duration::from_secs(3600),
            None => true,
        };
        if due {
            *last = Some((tls.fingerprint, Instant::now()));
            tracing::warn!(
                serial = %id.serial_hex,
                not_after = id.not_after_unix,
                seconds_left = left,
                "client certificate expires soon; rotate it"
            );
        }
    }

    /// Polls every `interval` forever, off the runtime's threads (file reads and, with a token
    /// key, calls into the token, each bounded by `client_cert.pkcs11_timeout`). A token key is
    /// probed on every round, so `/ready` follows its health even without handshakes.
    pub async fn run(self, interval: Duration) {
        let me = Arc::new(self);
        loop {
            tokio::time::sleep(interval).await;
            let r = me.clone();
            let _ = tokio::task::spawn_blocking(move || {
                r.poll();
                if let Some(token) = r.store.current().token.clone() {
                    let _ = token.probe();
                }
            })
            .await;
        }
    }
}

fn text_fingerprint(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    "read-error".hash(&mut h);
    s.hash(&mut h);
    h.finish()
}
