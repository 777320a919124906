//! Time in `auth`: instants are microseconds since the Unix epoch (`i64`, `_us` names), on
//! our clock unless a name or a flag says FinHub's; FinHub's clock is reached only through
//! [`super::clock::ClockOffset`]'s bounds. The conversions between `SystemTime`, `Duration`
//! and those numbers live here, and only here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch (negative before it).
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
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
