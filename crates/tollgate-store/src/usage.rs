//! What both backends agree on when writing usage rows (README, Usage metering): how a
//! batch is checked and normalized before it reaches SQL, and how values
//! that do not fit a column are made to fit.
//!
//! The rules here exist so that one bad value can never make a batch
//! unwritable: a batch the database refuses would stay in the spool and be
//! retried forever, holding up every row behind it. So out-of-range numbers
//! saturate instead of failing, and NUL characters (which Postgres text
//! cannot hold) are replaced.

use std::borrow::Cow;
use std::collections::BTreeMap;

use foldhash::{HashMap, HashSet, HashSetExt};

use time::{Date, Month, OffsetDateTime, UtcOffset};
use tollgate_metering::usage::UsageEvent;
use tollgate_metering::StoreError;
use tollgate_metering::{CustomerId, KeyId};

/// How many months after the current one `migrate` creates partitions for
/// (Postgres), so that writes at a month's start never wait for one.
pub(crate) const PARTITIONS_AHEAD: u8 = 2;

/// One row of a batch, ready to be written.
pub(crate) struct Row<'a> {
    pub(crate) event: &'a UsageEvent,
    /// `event.ts` in UTC, truncated to the microsecond (what both databases
    /// store), so that both backends agree on it to the last digit.
    pub(crate) ts: OffsetDateTime,
    /// The UTC day the row is rolled up under.
    pub(crate) day: Date,
    /// `(ts, id)` as integers, the order rows are written in: comparing
    /// `OffsetDateTime`s converts both to UTC at every step of the sort,
    /// which made the sort cost twice as much.
    order: (i128, u128),
}

/// The rows of `batch` to write: each id once (the first occurrence wins,
/// as it would if the rows came in separate batches), timestamps in UTC,
/// in `(ts, id)` order. That is the primary key of `usage_events` in both
/// databases (migration 7), so inserting in it appends to the right edge
/// of the key (both databases have a fast path for that) instead of
/// splitting pages in the middle, as completion order (which differs from
/// start order) would.
///
/// Fails only for a timestamp that cannot be expressed in UTC (the edge of
/// year ±9999 with an offset), which no gateway clock produces.
pub(crate) fn rows(batch: &[UsageEvent]) -> Result<Vec<Row<'_>>, StoreError> {
    let mut seen = HashSet::with_capacity(batch.len());
    let mut rows = Vec::with_capacity(batch.len());
    for event in batch {
        if !seen.insert(event.id) {
            continue;
        }
        let utc = event.ts.checked_to_offset(UtcOffset::UTC).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "usage row {} has a timestamp out of range: {}",
                event.id, event.ts
            ))
        })?;
        let ts = utc
            .replace_nanosecond(utc.microsecond() * 1_000)
            .unwrap_or(utc);
        // `day` converts to UTC again; it cannot fail now that
        // `checked_to_offset` succeeded.
        rows.push(Row {
            event,
            ts,
            day: event.day(),
            order: (ts.unix_timestamp_nanos(), event.id.as_u128()),
        });
    }
    rows.sort_unstable_by_key(|row| row.order);
    Ok(rows)
}

/// A `u64` counter as a signed 64-bit column: values above `i64::MAX`
/// saturate (no real count gets there; a bogus one must not fail the batch).
pub(crate) fn bigint(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// `text` without NUL characters, which Postgres text cannot store (each
/// becomes U+FFFD); SQLite gets the same so that both backends agree.
/// Borrowed, so free, in the usual case.
pub(crate) fn text(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// The first day of the month `at` is in.
pub(crate) fn month_of(at: Date) -> Date {
    at.replace_day(1).unwrap_or(at)
}

/// The first days of the month of `today` and the `ahead` months after it.
pub(crate) fn months_from(today: Date, ahead: u8) -> Vec<Date> {
    let mut month = month_of(today);
    let mut months = vec![month];
    for _ in 0..ahead {
        let (year, next) = match month.month() {
            Month::December => (month.year() + 1, Month::January),
            other => (month.year(), other.next()),
        };
        match Date::from_calendar_date(year, next, 1) {
            Ok(first) => {
                month = first;
                months.push(first);
            }
            // Past the last representable year: nothing to create.
            Err(_) => break,
        }
    }
    months
}

/// A `usage_daily` group: day, customer, key, route and model (`""` for
/// none), the texts as stored (see [`text`]), so that two rows the database
/// would put in one group are in one group here too.
pub(crate) type GroupKey<'a> = (Date, CustomerId, KeyId, Cow<'a, str>, Cow<'a, str>);

/// The `usage_daily` groups of some rows and their sums, gathered in a hash
/// map (a few times cheaper per row than an ordered map, `benches/usage_write.rs`)
/// and put in key order once, by [`Groups::into_sorted`].
///
/// The map (and the set of ids in [`rows`]) hashes with foldhash, seeded
/// per process, not SipHash: with SipHash, hashing and probing were a
/// tenth of the recorder's CPU per row. The keys are the gateway's own ids
/// and configured routes, and models named by upstreams, a few per batch.
#[derive(Default)]
pub(crate) struct Groups<'a>(HashMap<GroupKey<'a>, Rollup>);

/// Groups in key order, so that writers upsert, and lock, groups in one
/// order.
pub(crate) type SortedGroups<'a> = Vec<(GroupKey<'a>, Rollup)>;

impl<'a> Groups<'a> {
    pub(crate) fn new() -> Groups<'a> {
        Groups::default()
    }

    /// Adds `row` to its group.
    pub(crate) fn add(&mut self, row: &Row<'a>) {
        let event = row.event;
        let key = (
            row.day,
            event.customer_id,
            event.key_id,
            text(&event.route),
            text(event.model.as_deref().unwrap_or("")),
        );
        self.0.entry(key).or_default().add(event);
    }

    pub(crate) fn into_sorted(self) -> SortedGroups<'a> {
        let mut groups: SortedGroups<'a> = self.0.into_iter().collect();
        groups.sort_unstable_by(|(a, _), (b, _)| a.cmp(b));
        groups
    }
}

/// A `usage_customer_daily` row's key: day and customer.
pub(crate) type CustomerDay = (Date, CustomerId);

/// The `usage_customer_daily` rows of some `usage_daily` groups: their
/// sums over keys, routes and models, exact, in key order (so that writers
/// upsert, and lock, them in one order).
pub(crate) fn customer_days(groups: &SortedGroups<'_>) -> BTreeMap<CustomerDay, Rollup> {
    let mut days = BTreeMap::<CustomerDay, Rollup>::new();
    // Groups are in (day, customer, …) order: each customer day is one run.
    let mut current: Option<(CustomerDay, Rollup)> = None;
    for ((day, customer_id, ..), rollup) in groups {
        let key = (*day, *customer_id);
        match &mut current {
            Some((at, sums)) if *at == key => sums.merge(rollup),
            _ => {
                if let Some((at, sums)) = current.replace((key, *rollup)) {
                    days.insert(at, sums);
                }
            }
        }
    }
    if let Some((at, sums)) = current {
        days.insert(at, sums);
    }
    days
}

/// The sums of one `usage_daily` group. Kept exact (in `i128`) and clamped
/// to the bigint range only when read, which is what the Postgres SQL does
/// (sums in numeric, then clamped), so that both agree to the last unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Rollup {
    /// In the order of [`Rollup::columns`].
    sums: [i128; 10],
}

impl Rollup {
    /// Adds `event`, each value as its `usage_events` column holds it.
    pub(crate) fn add(&mut self, event: &UsageEvent) {
        // `is_rejected` and `is_error` define the columns (README, Usage metering):
        // refused rows count in `rejected`, the others in `requests`.
        let rejected = event.outcome.is_rejected();
        let values = [
            i64::from(!rejected),
            i64::from(rejected),
            i64::from(event.is_error()),
            bigint(event.input_tokens),
            bigint(event.output_tokens),
            bigint(event.cache_read_tokens),
            bigint(event.cache_write_tokens),
            bigint(event.request_bytes),
            bigint(event.response_bytes),
            event.cost_nanos,
        ];
        for (sum, value) in self.sums.iter_mut().zip(values) {
            *sum += i128::from(value);
        }
    }

    /// Adds the sums of `other`, exactly.
    pub(crate) fn merge(&mut self, other: &Rollup) {
        for (sum, value) in self.sums.iter_mut().zip(other.sums) {
            *sum += value;
        }
    }

    /// `requests, rejected, errors, input_tokens, output_tokens,
    /// cache_read_tokens, cache_write_tokens, request_bytes,
    /// response_bytes, cost_nanos`, each clamped to the bigint range.
    pub(crate) fn columns(&self) -> [i64; 10] {
        self.sums
            .map(|sum| i64::try_from(sum).unwrap_or(if sum < 0 { i64::MIN } else { i64::MAX }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{date, datetime};
    use tollgate_metering::usage::{CostSource, Outcome};
    use uuid::Uuid;

    fn event(ts: OffsetDateTime, outcome: Outcome, status: u16) -> UsageEvent {
        UsageEvent {
            id: Uuid::now_v7(),
            client_request_id: None,
            ts,
            customer_id: CustomerId::new(),
            key_id: KeyId::new(),
            instance: "gw-1".to_owned(),
            route: "openai".to_owned(),
            method: "POST".to_owned(),
            path: "/v1/chat/completions".to_owned(),
            status,
            outcome,
            latency_us: 1,
            upstream_latency_us: 1,
            request_bytes: 10,
            response_bytes: 20,
            model: None,
            input_tokens: 3,
            output_tokens: 4,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
            cost_nanos: -5,
            cost_source: CostSource::None,
        }
    }

    #[test]
    fn rows_are_utc_micros_once_per_id_in_ts_id_order() {
        let first = event(
            datetime!(2026-03-01 00:30:00.123456789 +01:00),
            Outcome::Ok,
            200,
        );
        let mut again = first.clone();
        again.input_tokens = 99;
        // A later id, first in the batch.
        let other = event(datetime!(2026-03-01 00:00 UTC), Outcome::Ok, 200);
        // The same instant with a later id: ids break the tie.
        let beside = event(other.ts, Outcome::Ok, 200);
        // The latest id of all at the earliest instant: time comes first.
        let earliest = event(datetime!(2026-02-28 22:00 UTC), Outcome::Ok, 200);
        assert!(first.id < other.id && other.id < beside.id && beside.id < earliest.id);
        let batch = [
            beside.clone(),
            other.clone(),
            first.clone(),
            again,
            earliest.clone(),
        ];
        let rows = rows(&batch).unwrap_or_default();
        let ids: Vec<Uuid> = rows.iter().map(|row| row.event.id).collect();
        assert_eq!(ids, [earliest.id, first.id, other.id, beside.id]);
        assert_eq!(rows[1].event.input_tokens, 3, "the first occurrence wins");
        assert_eq!(rows[1].ts, datetime!(2026-02-28 23:30:00.123456 UTC));
        assert_eq!(rows[1].ts.offset(), UtcOffset::UTC);
        assert_eq!(rows[1].day, date!(2026 - 02 - 28));
        assert_eq!(rows[2].day, date!(2026 - 03 - 01));
    }

    /// The integer order is `(ts, id)`'s, whatever the offsets, the
    /// nanoseconds dropped, the ids' bytes or the side of 1970.
    #[test]
    fn rows_are_in_ts_then_id_order() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut random = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let base = datetime!(1969-12-31 23:59:59.999999 UTC);
        let batch: Vec<UsageEvent> = (0..2000)
            .map(|_| {
                // Few distinct instants, so that ids decide many ties.
                let nanos = (random() % 4000) as i64 - 2000;
                let offset = UtcOffset::from_hms((random() % 25) as i8 - 12, 0, 0).unwrap();
                let mut event = event(base, Outcome::Ok, 200);
                event.ts = (base + time::Duration::nanoseconds(nanos * 997)).to_offset(offset);
                event.id = Uuid::from_u128(u128::from(random()) << 64 | u128::from(random() % 8));
                event
            })
            .collect();
        let rows = rows(&batch).unwrap();
        let order: Vec<(OffsetDateTime, Uuid)> =
            rows.iter().map(|row| (row.ts, row.event.id)).collect();
        let mut expected: Vec<(OffsetDateTime, Uuid)> = batch
            .iter()
            .map(|event| {
                let utc = event.ts.to_offset(UtcOffset::UTC);
                (
                    utc.replace_nanosecond(utc.microsecond() * 1_000).unwrap(),
                    event.id,
                )
            })
            .collect();
        expected.sort();
        assert_eq!(order.len(), expected.len());
        assert_eq!(order, expected);
    }

    #[test]
    fn timestamps_beyond_utc_are_refused_not_panicking() {
        let edge = event(datetime!(9999-12-31 23:00 -02:00), Outcome::Ok, 200);
        assert!(matches!(rows(&[edge]), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn out_of_range_values_saturate() {
        assert_eq!(bigint(0), 0);
        assert_eq!(bigint(i64::MAX as u64), i64::MAX);
        assert_eq!(bigint(u64::MAX), i64::MAX);
        let mut huge = event(datetime!(2026-03-01 00:00 UTC), Outcome::Ok, 200);
        huge.input_tokens = u64::MAX;
        huge.cost_nanos = i64::MIN;
        let mut rollup = Rollup::default();
        rollup.add(&huge);
        rollup.add(&huge);
        let columns = rollup.columns();
        assert_eq!(columns[3], i64::MAX, "input_tokens");
        assert_eq!(columns[9], i64::MIN, "cost_nanos");
        assert_eq!(columns[0], 2, "requests");
        // Exact underneath: a sum that comes back into range is exact.
        let mut back = huge.clone();
        back.input_tokens = 0;
        back.cost_nanos = i64::MAX;
        rollup.add(&back);
        rollup.add(&back);
        assert_eq!(rollup.columns()[9], -2);
    }

    #[test]
    fn nul_characters_are_replaced() {
        assert!(matches!(text("gpt-4o"), Cow::Borrowed("gpt-4o")));
        assert_eq!(text("gpt\0x"), "gpt\u{FFFD}x");
    }

    #[test]
    fn rollups_count_by_outcome_and_status() {
        let at = datetime!(2026-03-01 00:00 UTC);
        let mut rollup = Rollup::default();
        for (outcome, status) in [
            (Outcome::Ok, 200),
            (Outcome::Ok, 503),
            (Outcome::UpstreamError, 502),
            (Outcome::UpstreamTimeout, 504),
            (Outcome::ClientClosed, 0),
            (Outcome::RateLimited, 429),
            (Outcome::PayloadTooLarge, 413),
        ] {
            rollup.add(&event(at, outcome, status));
        }
        assert_eq!(rollup.columns(), [5, 2, 3, 21, 28, 0, 0, 70, 140, -35]);
    }

    #[test]
    fn groups_merge_equal_keys_and_come_out_in_key_order() {
        // 60 rows over 3 customers × 2 keys × 2 routes × (model or none),
        // added in a scrambled order.
        let at = datetime!(2026-03-01 12:00 UTC);
        let customers = [CustomerId::new(), CustomerId::new(), CustomerId::new()];
        let keys = [KeyId::new(), KeyId::new()];
        let batch: Vec<UsageEvent> = (0..60usize)
            .map(|i| {
                let n = i * 37 % 60;
                let mut e = event(at, Outcome::Ok, 200);
                e.customer_id = customers[n % 3];
                e.key_id = keys[n / 3 % 2];
                e.route = ["b", "a"][n / 6 % 2].to_owned();
                e.model = (n / 12 % 2 == 0).then(|| "m".to_owned());
                e.input_tokens = n as u64;
                e
            })
            .collect();
        let rows = rows(&batch).unwrap_or_default();
        let mut groups = Groups::new();
        for row in &rows {
            groups.add(row);
        }
        let sorted = groups.into_sorted();
        assert_eq!(sorted.len(), 24);
        assert!(sorted.windows(2).all(|pair| pair[0].0 < pair[1].0));
        assert_eq!(
            sorted
                .iter()
                .map(|(_, sums)| sums.columns()[0])
                .sum::<i64>(),
            60,
            "requests"
        );
        assert_eq!(
            sorted
                .iter()
                .map(|(_, sums)| sums.columns()[3])
                .sum::<i64>(),
            (0..60).sum::<i64>(),
            "input_tokens"
        );
        // Empty model is "", the smallest text: it sorts first.
        let (first, _) = &sorted[0];
        assert_eq!(first.4, "");
    }

    #[test]
    fn customer_days_sum_groups_exactly_in_key_order() {
        let at = datetime!(2026-03-01 12:00 UTC);
        let mut a = event(at, Outcome::Ok, 200);
        a.input_tokens = u64::MAX;
        let mut b = a.clone();
        b.id = Uuid::now_v7();
        b.key_id = KeyId::new();
        b.model = Some("m".to_owned());
        b.input_tokens = 0;
        b.cost_nanos = i64::MIN;
        let mut c = event(at, Outcome::RateLimited, 429);
        c.customer_id = a.customer_id;
        c.ts = datetime!(2026-03-02 00:00 UTC);
        let d = event(at, Outcome::Ok, 200);
        let batch = [a.clone(), b, c, d.clone()];
        let rows = rows(&batch).unwrap_or_default();
        let mut groups = Groups::new();
        for row in &rows {
            groups.add(row);
        }
        let days = customer_days(&groups.into_sorted());
        let keys: Vec<_> = days.keys().copied().collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(keys, sorted);
        assert_eq!(days.len(), 3);
        let first = days[&(date!(2026 - 03 - 01), a.customer_id)].columns();
        assert_eq!(first[0], 2, "requests");
        assert_eq!(first[3], i64::MAX, "input_tokens saturate");
        assert_eq!(first[9], i64::MIN, "cost_nanos: -5 + i64::MIN saturates");
        let later = days[&(date!(2026 - 03 - 02), a.customer_id)].columns();
        assert_eq!((later[0], later[1]), (0, 1));
        let other = days[&(date!(2026 - 03 - 01), d.customer_id)].columns();
        assert_eq!(other[0], 1);
    }

    #[test]
    fn months_roll_over_years() {
        assert_eq!(
            months_from(date!(2026 - 11 - 22), 2),
            [
                date!(2026 - 11 - 01),
                date!(2026 - 12 - 01),
                date!(2027 - 01 - 01)
            ]
        );
        assert_eq!(
            months_from(date!(2028 - 02 - 29), 0),
            [date!(2028 - 02 - 01)]
        );
        assert_eq!(months_from(date!(9999 - 12 - 31), 2).len(), 1);
    }
}
