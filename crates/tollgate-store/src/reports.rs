//! What both backends agree on for usage reports and billing periods
//! (the SQL itself is in `sqlite/reports.rs` and `postgres/reports.rs`):
//! the column lists, how a page of the export is bounded, and how the sums
//! a database returns become [`UsageTotals`].
//!
//! Reports read the rollups only (a month of reports must not scan a
//! month of `usage_events`): `usage_customer_daily` (day × customer, a
//! tenth of the rows) for totals, days, customers and billing,
//! `usage_daily` for routes and models; the export is the one reader of
//! `usage_events`, a keyset page at a time in `(ts, id)` order.

use std::collections::HashSet;

use time::OffsetDateTime;
use tollgate_metering::billing::{BillingLine, UsageFilter, UsageTotals};
use tollgate_metering::limits::{Period, PeriodTotals};
use tollgate_metering::StoreError;
use uuid::Uuid;

/// The summed columns of `usage_daily`, in the order of [`totals`].
pub(crate) const SUMMED: [&str; 10] = [
    "requests",
    "rejected",
    "errors",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "request_bytes",
    "response_bytes",
    "cost_nanos",
];

/// The columns of `usage_events` (the same in both backends), in the order
/// the backends decode them.
pub(crate) const EVENT_COLUMNS: &str = "id, client_request_id, ts, customer_id, key_id, \
    instance, route, method, path, status, outcome, latency_us, upstream_latency_us, \
    request_bytes, response_bytes, model, input_tokens, output_tokens, cache_read_tokens, \
    cache_write_tokens, cost_nanos, cost_source";

/// The columns of `billing_lines` after `period`, in the order the
/// backends decode them.
pub(crate) const LINE_COLUMNS: &str = "customer_id, customer, tier, requests, \
    included_requests, overage_requests, overage_charge_nanos, metered_cost_nanos, total_nanos";

/// Sums in the order of [`SUMMED`], each already clamped to the bigint
/// range, as [`UsageTotals`]. A negative count (only manual tampering makes
/// one) reads as 0, as `period_totals` reads it.
pub(crate) fn totals(sums: [i64; 10]) -> UsageTotals {
    let count = |value: i64| u64::try_from(value).unwrap_or(0);
    let [requests, rejected, errors, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, request_bytes, response_bytes, cost_nanos] =
        sums;
    UsageTotals {
        requests: count(requests),
        rejected: count(rejected),
        errors: count(errors),
        input_tokens: count(input_tokens),
        output_tokens: count(output_tokens),
        cache_read_tokens: count(cache_read_tokens),
        cache_write_tokens: count(cache_write_tokens),
        request_bytes: count(request_bytes),
        response_bytes: count(response_bytes),
        cost_nanos,
    }
}

/// A customer's period totals, what the limiter loads at start and at
/// each sync, from the same clamped sums the reports show: tokens of all
/// four classes added as `limits::event_tokens` adds a row's, saturating.
/// Whatever the rollups hold, a total is a number and never an error, so
/// a gateway always starts on the database it has.
pub(crate) fn period_totals(totals: &UsageTotals) -> PeriodTotals {
    PeriodTotals {
        requests: totals.requests,
        tokens: totals.tokens(),
        cost_nanos: totals.cost_nanos,
    }
}

/// A stored count that must not be negative; one that is can only come
/// from manual tampering.
pub(crate) fn unsigned(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("a negative {what}: {value}")))
}

/// Refuses lines that name a customer twice, before anything is written:
/// a period has one line per customer.
pub(crate) fn check_lines(period: Period, lines: &[BillingLine]) -> Result<(), StoreError> {
    let mut seen = HashSet::with_capacity(lines.len());
    match lines.iter().find(|line| !seen.insert(line.customer_id)) {
        Some(line) => Err(StoreError::Conflict(format!(
            "two billing lines for customer {} in {period}",
            line.customer_id
        ))),
        None => Ok(()),
    }
}

/// `value` clamped to the bigint range.
pub(crate) fn clamp(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
}

/// Where a page of the export starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lower {
    /// At the first instant of the filter (inclusive): the first page.
    Start(OffsetDateTime),
    /// Strictly after this `(ts, id)`: the pages after it.
    After(OffsetDateTime, Uuid),
}

/// The lower bound of a page: the cursor, unless it lies before the
/// filter's start (then it excludes nothing the start does not). The
/// cursor's time is truncated to the microsecond, as stored, so a cursor
/// taken from a returned row matches that row exactly.
pub(crate) fn lower(filter: &UsageFilter, after: Option<(OffsetDateTime, Uuid)>) -> Lower {
    let start = filter.start();
    match after {
        Some((ts, id)) => {
            let ts = ts.to_offset(time::UtcOffset::UTC);
            let ts = ts
                .replace_nanosecond(ts.microsecond() * 1_000)
                .unwrap_or(ts);
            if ts < start {
                Lower::Start(start)
            } else {
                Lower::After(ts, id)
            }
        }
        None => Lower::Start(start),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{date, datetime};

    fn filter() -> UsageFilter {
        UsageFilter {
            from: date!(2026 - 03 - 01),
            to: date!(2026 - 03 - 31),
            customer: None,
        }
    }

    #[test]
    fn pages_start_at_the_filter_or_after_the_cursor() {
        let id = Uuid::now_v7();
        assert_eq!(
            lower(&filter(), None),
            Lower::Start(datetime!(2026-03-01 0:00 UTC))
        );
        assert_eq!(
            lower(&filter(), Some((datetime!(2026-02-28 23:00 UTC), id))),
            Lower::Start(datetime!(2026-03-01 0:00 UTC)),
            "a cursor before the filter changes nothing"
        );
        assert_eq!(
            lower(
                &filter(),
                Some((datetime!(2026-03-02 01:00:00.123456789 +01:00), id))
            ),
            Lower::After(datetime!(2026-03-02 00:00:00.123456 UTC), id),
            "UTC, truncated to the microsecond"
        );
    }

    #[test]
    fn totals_read_negative_counts_as_zero_and_keep_signed_cost() {
        let totals = totals([1, 2, 3, 4, 5, 6, 7, 8, -9, -10]);
        assert_eq!(totals.requests, 1);
        assert_eq!(totals.response_bytes, 0);
        assert_eq!(totals.cost_nanos, -10);
        assert_eq!(clamp(i128::from(i64::MAX) + 1), i64::MAX);
        assert_eq!(clamp(i128::from(i64::MIN) - 1), i64::MIN);
        assert_eq!(clamp(-5), -5);
    }
}
