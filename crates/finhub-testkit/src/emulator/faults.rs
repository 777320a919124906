//! FinHub's ordinary blips on the business API, injected at a seeded rate, and FinHub's
//! idempotency (§7): a repeat of an `X-Idempotency-Key` within 24 hours gets the original
//! response back (`X-Idempotent-Replay: true`); the same key with a different request is 409.
//!
//! Concurrent duplicates are not documented; the emulator takes the harshest reading: a
//! duplicate that arrives while the original still runs executes again, and is counted, so a
//! test sees every double execution the sidecar could cause.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How long FinHub remembers a key (§7).
const KEY_TTL: Duration = Duration::from_secs(24 * 3600);

/// Fault rates for business API calls (each in `[0, 1]`, drawn in this order from one seeded
/// generator, so a run is reproducible).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiFaults {
    /// Answer `503` from the gateway (the call never reaches the API).
    pub gateway_503: f64,
    /// The gateway's `Retry-After` seconds on its 503, if any.
    pub retry_after: Option<u64>,
    /// Reset the connection before the request is processed (nothing executed).
    pub reset_before: f64,
    /// Process the request, then reset the connection instead of answering (the answer is
    /// lost; the call was executed).
    pub lost_after: f64,
    /// Process the request, but answer only after `slow_for`.
    pub slow: f64,
    /// The delay of a slow answer.
    pub slow_for: Duration,
    /// The generator's seed.
    pub seed: u64,
}

impl ApiFaults {
    /// No faults (rates zero) with `seed`.
    pub fn none(seed: u64) -> ApiFaults {
        ApiFaults {
            gateway_503: 0.0,
            retry_after: None,
            reset_before: 0.0,
            lost_after: 0.0,
            slow: 0.0,
            slow_for: Duration::ZERO,
            seed,
        }
    }
}

/// The fault drawn for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    None,
    Gateway503(Option<u64>),
    ResetBefore,
    LostAfter,
    Slow(Duration),
}

/// A stored answer to a key.
struct Stored {
    /// Method, path and body of the request that first used the key.
    fingerprint: u64,
    status: StatusCode,
    body: Bytes,
    at: Instant,
}

/// What a keyed call finds.
pub(crate) enum Seen {
    /// First use (or expired): execute.
    New,
    /// A repeat of the same request: the original answer.
    Replay(StatusCode, Bytes),
    /// The same key with a different request.
    Conflict,
}

/// Fault dice and the idempotency store.
#[derive(Default)]
pub(crate) struct Faults {
    dice: Mutex<Option<(ApiFaults, StdRng)>>,
    keys: Mutex<HashMap<(String, String), Stored>>,
    /// Executions per (tenant, key) of keyed calls.
    executions: Mutex<HashMap<(String, String), u32>>,
    /// Every executed business call, keyed or not.
    pub(crate) executed: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Faults {
    /// Sets (or clears) the fault rates; the generator restarts from the seed.
    pub(crate) fn set(&self, faults: Option<ApiFaults>) {
        *lock(&self.dice) = faults.map(|f| {
            let rng = StdRng::seed_from_u64(f.seed);
            (f, rng)
        });
    }

    /// The fault for the next call.
    pub(crate) fn draw(&self) -> Fault {
        let mut dice = lock(&self.dice);
        let Some((f, rng)) = dice.as_mut() else {
            return Fault::None;
        };
        let x: f64 = rng.random();
        let mut edge = f.gateway_503;
        if x < edge {
            return Fault::Gateway503(f.retry_after);
        }
        edge += f.reset_before;
        if x < edge {
            return Fault::ResetBefore;
        }
        edge += f.lost_after;
        if x < edge {
            return Fault::LostAfter;
        }
        edge += f.slow;
        if x < edge {
            return Fault::Slow(f.slow_for);
        }
        Fault::None
    }

    /// A keyed call of `tenant` with `key` and request `fingerprint`.
    pub(crate) fn lookup(&self, tenant: &str, key: &str, fingerprint: u64) -> Seen {
        let keys = lock(&self.keys);
        match keys.get(&(tenant.to_string(), key.to_string())) {
            Some(s) if s.at.elapsed() < KEY_TTL => {
                if s.fingerprint == fingerprint {
                    Seen::Replay(s.status, s.body.clone())
                } else {
                    Seen::Conflict
                }
            }
            _ => Seen::New,
        }
    }

    /// A call was executed (with its key, if any) and answered `status` with `body`.
    pub(crate) fn executed(
        &self,
        key: Option<(&str, &str, u64)>,
        status: StatusCode,
        body: &Bytes,
    ) {
        self.executed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let Some((tenant, key, fingerprint)) = key else {
            return;
        };
        let id = (tenant.to_string(), key.to_string());
        *lock(&self.executions).entry(id.clone()).or_default() += 1;
        lock(&self.keys).entry(id).or_insert(Stored {
            fingerprint,
            status,
            body: body.clone(),
            at: Instant::now(),
        });
    }

    /// Executions per (tenant, key).
    pub(crate) fn executions(&self) -> HashMap<(String, String), u32> {
        lock(&self.executions).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_faults() {
        let rates = ApiFaults {
            gateway_503: 0.2,
            retry_after: None,
            reset_before: 0.2,
            lost_after: 0.2,
            slow: 0.2,
            slow_for: Duration::from_millis(5),
            seed: 7,
        };
        let a = Faults::default();
        a.set(Some(rates.clone()));
        let b = Faults::default();
        b.set(Some(rates));
        let da: Vec<_> = (0..200).map(|_| a.draw()).collect();
        let db: Vec<_> = (0..200).map(|_| b.draw()).collect();
        assert_eq!(da, db);
        for f in [
            Fault::None,
            Fault::Gateway503(None),
            Fault::ResetBefore,
            Fault::LostAfter,
            Fault::Slow(Duration::from_millis(5)),
        ] {
            assert!(da.contains(&f), "{f:?} drawn");
        }
        assert_eq!(Faults::default().draw(), Fault::None);
    }

    #[test]
    fn a_repeated_key_replays_and_a_different_request_conflicts() {
        let f = Faults::default();
        assert!(matches!(f.lookup("t", "k", 1), Seen::New));
        f.executed(
            Some(("t", "k", 1)),
            StatusCode::OK,
            &Bytes::from_static(b"{}"),
        );
        assert!(matches!(
            f.lookup("t", "k", 1),
            Seen::Replay(StatusCode::OK, _)
        ));
        assert!(matches!(f.lookup("t", "k", 2), Seen::Conflict));
        assert!(matches!(f.lookup("other", "k", 1), Seen::New), "per tenant");
        assert_eq!(f.executions()[&("t".into(), "k".into())], 1);
    }
}
