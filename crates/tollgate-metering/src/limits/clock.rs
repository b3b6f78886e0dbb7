//! The one clock the limits read, so that windows and periods can be tested
//! by moving time by hand (month ends, Dec → Jan, 29 February) instead of
//! sleeping.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::{OffsetDateTime, UtcOffset};

/// Where the limiter gets "now" from. Always UTC.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> OffsetDateTime;

    /// `now()` as nanoseconds since the Unix epoch, saturating outside
    /// 1677–2262. The admission path reads only this, so a clock may
    /// answer it without building a calendar date.
    fn unix_nanos(&self) -> i64 {
        unix_nanos(self.now())
    }
}

pub(super) fn unix_nanos(t: OffsetDateTime) -> i64 {
    let nanos = t.unix_timestamp_nanos();
    i64::try_from(nanos).unwrap_or(if nanos < 0 { i64::MIN } else { i64::MAX })
}

/// The inverse of [`unix_nanos`]; every i64 is in `time`'s range.
pub(super) fn from_unix_nanos(nanos: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    /// Straight from `SystemTime`: half the cost of `now()` (no calendar
    /// conversion there and back).
    fn unix_nanos(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(since) => i64::try_from(since.as_nanos()).unwrap_or(i64::MAX),
            Err(before) => {
                i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |nanos| -nanos)
            }
        }
    }
}

/// A clock tests move by hand (month ends, Dec → Jan, 29 Feb).
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<OffsetDateTime>,
}

impl ManualClock {
    pub fn new(at: OffsetDateTime) -> Self {
        Self {
            now: Mutex::new(at.to_offset(UtcOffset::UTC)),
        }
    }

    #[cfg(test)]
    /// Jumps to `at` (backwards too).
    pub(crate) fn set(&self, at: OffsetDateTime) {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner) = at.to_offset(UtcOffset::UTC);
    }

    /// Moves forward by `by`; stops at the largest representable time.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now = time::Duration::try_from(by)
            .ok()
            .and_then(|by| now.checked_add(by))
            .unwrap_or(*now);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(datetime!(2026-01-31 23:59:59.9 UTC));
        assert_eq!(clock.now(), datetime!(2026-01-31 23:59:59.9 UTC));
        clock.advance(Duration::from_millis(100));
        assert_eq!(clock.now(), datetime!(2026-02-01 0:00 UTC));
        clock.set(datetime!(2028-02-29 12:00 +02:00));
        assert_eq!(clock.now(), datetime!(2028-02-29 10:00 UTC));
        assert_eq!(clock.now().offset(), UtcOffset::UTC);
    }

    #[test]
    fn system_clock_is_utc_and_its_nanos_agree() {
        let before = unix_nanos(SystemClock.now());
        let nanos = SystemClock.unix_nanos();
        let after = SystemClock.now();
        assert_eq!(after.offset(), UtcOffset::UTC);
        assert!(before <= nanos && nanos <= unix_nanos(after));
    }

    #[test]
    fn nanos_round_trip() {
        let t = datetime!(2028-02-29 23:59:59.123_456_789 UTC);
        assert_eq!(unix_nanos(t), 1_835_481_599_123_456_789);
        assert_eq!(from_unix_nanos(unix_nanos(t)), t);
        let clock = ManualClock::new(t);
        assert_eq!(clock.unix_nanos(), 1_835_481_599_123_456_789);
        assert_eq!(unix_nanos(datetime!(2300-01-01 0:00 UTC)), i64::MAX);
    }
}
