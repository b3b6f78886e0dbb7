//! Billing periods: calendar months in UTC (docs/CONFIGURATION.md).

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use time::{Date, Month, OffsetDateTime, UtcOffset};

/// A calendar month in UTC. Orders chronologically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    year: i32,
    /// 1..=12.
    month: u8,
}

/// Why a period text was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("expected a period like 2026-01 (YYYY-MM), found {found:?}")]
pub struct PeriodError {
    pub found: String,
}

impl Period {
    pub fn new(year: i32, month: Month) -> Period {
        Period {
            year,
            month: u8::from(month),
        }
    }

    /// The month `t` falls in, in UTC whatever `t`'s offset.
    pub fn containing(t: OffsetDateTime) -> Period {
        let t = t.to_offset(UtcOffset::UTC);
        Period::new(t.year(), t.month())
    }

    pub(crate) fn month(self) -> Month {
        Month::try_from(self.month).unwrap_or(Month::January)
    }

    /// The month after this one (December → January of the next year).
    pub fn next(self) -> Period {
        if self.month >= 12 {
            Period {
                year: self.year.saturating_add(1),
                month: 1,
            }
        } else {
            Period {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    #[cfg(test)]
    /// The month before this one.
    pub(crate) fn previous(self) -> Period {
        if self.month <= 1 {
            Period {
                year: self.year.saturating_sub(1),
                month: 12,
            }
        } else {
            Period {
                year: self.year,
                month: self.month - 1,
            }
        }
    }

    /// The first day of the month. Outside the years `time` can represent
    /// (±9999) it clamps to the nearest representable date.
    pub fn first_day(self) -> Date {
        Date::from_calendar_date(self.year, self.month(), 1).unwrap_or(if self.year < 0 {
            Date::MIN
        } else {
            Date::MAX
        })
    }

    /// Its days: from the first, up to the next period's first (exclusive).
    pub fn days(self) -> Range<Date> {
        self.first_day()..self.next().first_day()
    }

    /// Midnight UTC on the first day: when the period begins.
    pub fn start(self) -> OffsetDateTime {
        self.first_day().midnight().assume_utc()
    }

    /// When the next period begins (this one's end, exclusive).
    pub(crate) fn next_start(self) -> OffsetDateTime {
        self.next().start()
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

impl FromStr for Period {
    type Err = PeriodError;

    /// Exactly `YYYY-MM`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || PeriodError {
            found: text.to_owned(),
        };
        let bytes = text.as_bytes();
        if bytes.len() != 7
            || bytes[4] != b'-'
            || !bytes[..4].iter().chain(&bytes[5..]).all(u8::is_ascii_digit)
        {
            return Err(error());
        }
        let year: i32 = text[..4].parse().map_err(|_| error())?;
        let month: u8 = text[5..].parse().map_err(|_| error())?;
        let month = Month::try_from(month).map_err(|_| error())?;
        Ok(Period::new(year, month))
    }
}

#[cfg(test)]
mod tests {
    use time::macros::{date, datetime};

    use super::*;

    #[test]
    fn containing_uses_utc() {
        assert_eq!(
            Period::containing(datetime!(2026-01-31 23:59:59.999_999_999 UTC)),
            Period::new(2026, Month::January)
        );
        assert_eq!(
            Period::containing(datetime!(2026-02-01 0:00 UTC)),
            Period::new(2026, Month::February)
        );
        // 1 Feb 00:30 in +01:00 is still 31 Jan in UTC.
        assert_eq!(
            Period::containing(datetime!(2026-02-01 0:30 +01:00)),
            Period::new(2026, Month::January)
        );
    }

    #[test]
    fn boundaries_across_year_end_and_leap_february() {
        let december = Period::new(2026, Month::December);
        assert_eq!(december.next(), Period::new(2027, Month::January));
        assert_eq!(december.next().previous(), december);
        assert_eq!(december.start(), datetime!(2026-12-01 0:00 UTC));
        assert_eq!(december.next_start(), datetime!(2027-01-01 0:00 UTC));

        let leap = Period::new(2028, Month::February);
        assert_eq!(leap.first_day(), date!(2028 - 02 - 01));
        assert_eq!(leap.next_start(), datetime!(2028-03-01 0:00 UTC));
        assert_eq!(Period::containing(datetime!(2028-02-29 23:59:59 UTC)), leap);
        assert_eq!(
            (leap.next_start() - leap.start()).whole_days(),
            29,
            "February 2028 has 29 days"
        );
        let common = Period::new(2027, Month::February);
        assert_eq!((common.next_start() - common.start()).whole_days(), 28);
        assert!(Period::new(2026, Month::December) < Period::new(2027, Month::January));
    }

    #[test]
    fn text_round_trips() {
        let period = Period::new(2026, Month::March);
        assert_eq!(period.to_string(), "2026-03");
        assert_eq!("2026-03".parse::<Period>(), Ok(period));
        assert_eq!(
            "2026-12".parse::<Period>().map(Period::month),
            Ok(Month::December)
        );
        for bad in [
            "2026-13",
            "2026-00",
            "2026-3",
            "26-03",
            "2026/03",
            "2026-03-01",
            "",
            "+026-03",
        ] {
            let error = bad.parse::<Period>().unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("expected a period like 2026-01 (YYYY-MM), found {bad:?}")
            );
        }
    }
}
