//! What usage reports and billing periods read and write through the
//! [`Store`](crate::store::Store) (README, Usage metering and Admin API): the filter a report covers,
//! the totals it sums from `usage_daily`, how rows are grouped and ranked,
//! and the frozen billing lines of a closed month.
//!
//! Only types live here. The sums are taken by the database (the admin API
//! must not pull a month of rows to add them up), and the billing
//! arithmetic (included requests, overage) belongs to the caller: the store
//! hands it [`BillingUsage`] and keeps the [`BillingLine`]s it computed,
//! exactly as given.

use time::{Date, OffsetDateTime, Time};

use crate::keys::ids::{CustomerId, KeyId};
use crate::limits::Period;

/// Which usage rows a report covers: UTC days `from..=to`, optionally one
/// customer. A filter whose `from` is after its `to` matches nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageFilter {
    pub from: Date,
    pub to: Date,
    pub customer: Option<CustomerId>,
}

impl UsageFilter {
    /// Every day of `period`, every customer.
    pub fn period(period: Period) -> UsageFilter {
        UsageFilter {
            from: period.first_day(),
            to: period
                .next()
                .first_day()
                .previous_day()
                .unwrap_or(Date::MAX),
            customer: None,
        }
    }

    /// The first instant covered: midnight UTC at the start of `from`.
    pub fn start(&self) -> OffsetDateTime {
        self.from.midnight().assume_utc()
    }

    /// The last instant covered, at the microsecond precision usage rows
    /// are stored with: 23:59:59.999999 UTC on `to`. Inclusive rather than
    /// the next midnight so that it exists for every `to`, `Date::MAX`
    /// included.
    pub fn last_instant(&self) -> OffsetDateTime {
        let last = Time::from_hms_micro(23, 59, 59, 999_999).unwrap_or(Time::MIDNIGHT);
        self.to.with_time(last).assume_utc()
    }
}

/// Sums over `usage_daily` rows (the meanings the README's Usage metering gives): `requests` counts
/// admitted requests, `rejected` those refused by a limit, `errors`
/// admitted requests that failed upstream; tokens, bytes and cost are sums
/// over all rows, rejected ones included. Each sum saturates at the
/// column's range (`i64`) rather than failing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct UsageTotals {
    pub requests: u64,
    pub rejected: u64,
    pub errors: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub cost_nanos: i64,
}

impl UsageTotals {
    /// Tokens of all four classes (saturating).
    pub fn tokens(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.output_tokens)
            .saturating_add(self.cache_read_tokens)
            .saturating_add(self.cache_write_tokens)
    }
}

/// What [`UsageReports::usage_grouped`](crate::store::UsageReports::usage_grouped)
/// groups by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageGroup {
    Day,
    Customer,
    Route,
    Model,
    Key,
}

/// One group's key. Customers carry their name (README, Admin API: every
/// per-customer row has both); a customer id found in usage but not among
/// the customers is named by its id. A model of `""` means none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupKey {
    Day(Date),
    Customer {
        id: CustomerId,
        name: String,
    },
    Route(String),
    Model(String),
    /// A key with its display prefix and name, and its customer. A key no
    /// longer stored shows its id as its prefix.
    Key {
        id: KeyId,
        prefix: String,
        name: Option<String>,
        customer_id: CustomerId,
        customer: String,
    },
}

/// What [`UsageReports::top_customers`](crate::store::UsageReports::top_customers)
/// ranks by: cost, admitted requests, or tokens of all four classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ranking {
    Cost,
    Requests,
    Tokens,
}

/// One customer's month, as billing needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BillingUsage {
    pub customer_id: CustomerId,
    /// The customer's name.
    pub customer: String,
    /// The customer's current tier.
    pub tier: String,
    /// The customer's own limits over its tier's (a JSON object).
    pub overrides: serde_json::Value,
    /// Admitted requests in the month (`usage_daily.requests`).
    pub requests: u64,
    /// Metered cost in the month, rejected rows included.
    pub cost_nanos: i64,
}

/// One frozen billing line: computed by the caller, stored as given
/// (counts above `i64::MAX` saturate).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BillingLine {
    pub customer_id: CustomerId,
    pub customer: String,
    pub tier: String,
    pub requests: u64,
    /// `None` when the tier has no request quota.
    pub included_requests: Option<u64>,
    pub overage_requests: u64,
    pub overage_charge_nanos: i64,
    pub metered_cost_nanos: i64,
    pub total_nanos: i64,
}

/// A closed billing period: when it was closed and its lines, ordered by
/// customer name (bytewise), then id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClosedPeriod {
    pub period: Period,
    /// As stored: UTC, truncated to the microsecond.
    pub closed_at: OffsetDateTime,
    pub lines: Vec<BillingLine>,
}

#[cfg(test)]
mod tests {
    use time::macros::{date, datetime};
    use time::Month;

    use super::*;

    #[test]
    fn tokens_add_all_four_classes_and_saturate() {
        let totals = UsageTotals {
            input_tokens: 1,
            output_tokens: 20,
            cache_read_tokens: 300,
            cache_write_tokens: 4_000,
            ..UsageTotals::default()
        };
        assert_eq!(totals.tokens(), 4_321);
        let huge = UsageTotals {
            input_tokens: u64::MAX,
            output_tokens: 1,
            ..UsageTotals::default()
        };
        assert_eq!(huge.tokens(), u64::MAX);
    }

    #[test]
    fn filters_cover_whole_utc_days() {
        let filter = UsageFilter {
            from: date!(2028 - 02 - 28),
            to: date!(2028 - 02 - 29),
            customer: None,
        };
        assert_eq!(filter.start(), datetime!(2028-02-28 0:00 UTC));
        assert_eq!(
            filter.last_instant(),
            datetime!(2028-02-29 23:59:59.999_999 UTC)
        );
        let edge = UsageFilter {
            from: Date::MAX,
            to: Date::MAX,
            customer: None,
        };
        assert_eq!(edge.last_instant().date(), Date::MAX);
    }

    #[test]
    fn a_period_filter_covers_the_whole_month() {
        let leap = UsageFilter::period(Period::new(2028, Month::February));
        assert_eq!(
            (leap.from, leap.to),
            (date!(2028 - 02 - 01), date!(2028 - 02 - 29))
        );
        let december = UsageFilter::period(Period::new(2026, Month::December));
        assert_eq!(december.to, date!(2026 - 12 - 31));
        assert_eq!(december.customer, None);
    }
}
