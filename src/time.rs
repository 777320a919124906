//! Time, in one module (a leaf: std only). Instants on two clocks, ours ([`Local`]) and
//! FinHub's ([`FinHubTime`]), both microseconds since the Unix epoch as that clock reads it.
//! One becomes the other only through the estimate of FinHub's offset
//! (`auth::clock::OffsetBounds`): there is no `From` between them. Arithmetic saturates
//! (FinHub's claims can be absurd) and never panics.
//!
//! Code that still keeps instants as bare `i64` (`_us` names: the fleet's Redis record) crosses
//! into these types with [`Local::from_micros`] / [`Local::micros`] and the helpers at the end
//! of this file, the one place where `SystemTime`, `Duration` and those numbers are converted
//! ([`unix_now`]: whole seconds now, for certificate validity).

use std::ops::{Add, Sub};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Defines an instant type: a `Copy` newtype over µs since the epoch of its clock.
macro_rules! instant {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(i64);

        impl $name {
            /// The earliest instant there is (also "no lower bound").
            pub const MIN: $name = $name(i64::MIN);
            /// The latest instant there is (also "no upper bound").
            pub const MAX: $name = $name(i64::MAX);

            /// The instant `us` microseconds after the epoch (negative before it).
            pub const fn from_micros(us: i64) -> $name {
                $name(us)
            }

            /// Microseconds since the epoch (negative before it).
            pub const fn micros(self) -> i64 {
                self.0
            }

            /// The instant this system time names (saturating beyond `i64` µs).
            pub fn from_system(t: SystemTime) -> $name {
                $name(unix_us(t))
            }

            /// This instant as a system time (the epoch when out of range).
            pub fn to_system(self) -> SystemTime {
                from_unix_us(self.0)
            }

            /// Whole seconds since the epoch (0 before it).
            pub fn secs(self) -> i64 {
                self.0.max(0) / 1_000_000
            }

            /// Microseconds from `earlier` to `self` (negative if `earlier` is later),
            /// saturating.
            pub fn since(self, earlier: $name) -> i64 {
                self.0.saturating_sub(earlier.0)
            }

            /// `us` microseconds later (earlier if negative), saturating.
            pub fn plus_us(self, us: i64) -> $name {
                $name(self.0.saturating_add(us))
            }

            /// `us` microseconds earlier (later if negative), saturating.
            pub fn minus_us(self, us: i64) -> $name {
                $name(self.0.saturating_sub(us))
            }
        }

        impl Add<Duration> for $name {
            type Output = $name;

            fn add(self, d: Duration) -> $name {
                self.plus_us(us(d))
            }
        }

        impl Sub<Duration> for $name {
            type Output = $name;

            fn sub(self, d: Duration) -> $name {
                self.minus_us(us(d))
            }
        }
    };
}

instant!(
    /// An instant on this host's clock: µs since the Unix epoch.
    Local
);

instant!(
    /// An instant on FinHub's (token issuer's) clock: µs since the Unix epoch as FinHub reads
    /// it. Compared with a [`Local`] only after conversion through the offset estimate.
    FinHubTime
);

impl Local {
    /// Now, on our clock.
    pub fn now() -> Local {
        Local::from_system(SystemTime::now())
    }
}

/// A [`Local`] updated in place (sequentially consistent).
#[derive(Debug)]
pub struct AtomicLocal(AtomicI64);

impl AtomicLocal {
    /// Holds `t`.
    pub fn new(t: Local) -> AtomicLocal {
        AtomicLocal(AtomicI64::new(t.micros()))
    }

    /// The instant held.
    pub fn load(&self) -> Local {
        Local::from_micros(self.0.load(Ordering::SeqCst))
    }

    /// Holds `t` from now on.
    pub fn store(&self, t: Local) {
        self.0.store(t.micros(), Ordering::SeqCst);
    }
}

/// Microseconds since the Unix epoch (negative before it), saturating.
pub fn unix_us(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_micros())
            .map(|v| -v)
            .unwrap_or(i64::MIN),
    }
}

/// The time `us` microseconds after the Unix epoch.
pub fn from_unix_us(us: i64) -> SystemTime {
    let d = Duration::from_micros(us.unsigned_abs());
    if us >= 0 {
        UNIX_EPOCH.checked_add(d).unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH.checked_sub(d).unwrap_or(UNIX_EPOCH)
    }
}

/// Duration in whole microseconds, saturating.
pub fn us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Whole seconds since the Unix epoch (0 before it): the unit of the expiry gauges.
pub fn unix_secs(t: SystemTime) -> i64 {
    Local::from_system(t).secs()
}

/// Whole seconds since the Unix epoch now (0 before it): certificate validity is checked in
/// these.
pub fn unix_now() -> i64 {
    unix_secs(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::{FinHubTime, Local};

    #[test]
    fn arithmetic_saturates_and_round_trips() {
        let t = Local::from_micros(1_700_000_000_000_000);
        assert_eq!((t + Duration::from_secs(2)).since(t), 2_000_000);
        assert_eq!((t - Duration::from_secs(2)).since(t), -2_000_000);
        assert_eq!(Local::MAX + Duration::MAX, Local::MAX);
        assert_eq!(Local::MIN - Duration::MAX, Local::MIN);
        assert_eq!(Local::MIN.since(Local::MAX), i64::MIN);
        assert_eq!(FinHubTime::MAX.plus_us(1), FinHubTime::MAX);
        assert_eq!(Local::from_system(t.to_system()), t);
        assert_eq!(t.secs(), 1_700_000_000);
        assert_eq!(Local::from_micros(-5).secs(), 0);
        assert_eq!(
            Local::from_micros(-1).to_system(),
            UNIX_EPOCH - Duration::from_micros(1)
        );
    }
}
