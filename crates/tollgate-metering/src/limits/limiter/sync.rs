//! The limiter's one database read: the period's totals, per customer and
//! per key family, taken in by [`Limiter::apply_totals`].
//!
//! Reading the whole period sums every customer's rollup rows of every day
//! so far: its cost grows with customers × days, 8 s at 100,000 customers
//! at the end of a month (benches/totals_sync.rs). But rows land almost
//! only on the open days, today and yesterday (a request near midnight is
//! committed after it). So a sync can read the open days alone and add the
//! closed days' totals kept from the last whole read ([`ClosedDays`]). The
//! whole period is read again when those totals may be stale:
//!
//! - at start, at a new period, and when the open days move on (midnight);
//! - when this instance has committed a row of a closed day (a spool
//!   replaying old rows): its own counts include the row, and the kept
//!   totals would not;
//! - when a key has gained limits since (its family's closed days were not
//!   read: only families with limits are);
//! - after a failed sync;
//! - and when the caller asks ([`SyncRead::Whole`]), which the gateway does
//!   every minute or so: other instances' rows on closed days (their spool
//!   replays) reach this one's limits then.
//!
//! Syncs take turns: each holds the kept totals for its whole length.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use time::Date;

use super::{Limiter, PeriodTotals, NANOS_PER_SEC};
use crate::keys::ids::{CustomerId, KeyId};
use crate::limits::clock::from_unix_nanos;
use crate::limits::period::Period;
use crate::store::{StoreError, UsageReports};

const NANOS_PER_DAY: i64 = 86_400 * NANOS_PER_SEC;

/// What a sync reads from the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncRead {
    /// Every day of the period so far.
    Whole,
    /// The open days only (today and yesterday), with the closed days'
    /// totals kept from the last whole read.
    OpenDays,
}

/// The closed days' totals, from the last whole read of the period.
#[derive(Debug)]
pub(super) struct ClosedDays {
    period: Period,
    /// The first open day at that read: the days before it are closed.
    open_from: Date,
    /// `Limiter::closed_stale` before that read's snapshot: the totals are
    /// good while it stays there.
    stale_count: u64,
    customers: HashMap<CustomerId, PeriodTotals>,
    keys: HashMap<KeyId, PeriodTotals>,
}

/// Today and yesterday (UTC, at `now_ns`), within `period`.
fn open_days(period: Period, now_ns: i64) -> Range<Date> {
    let today = from_unix_nanos(now_ns).date();
    let yesterday = today.previous_day().unwrap_or(today);
    yesterday.max(period.first_day())..period.days().end
}

/// Whether a row at `ts_ns`, committed at `now_ns`, lies on a closed day
/// (before yesterday).
pub(super) fn on_closed_day(ts_ns: i64, now_ns: i64) -> bool {
    ts_ns.div_euclid(NANOS_PER_DAY) < now_ns.div_euclid(NANOS_PER_DAY) - 1
}

/// `closed` plus `open`, per id.
fn summed<Id: std::hash::Hash + Eq + Copy>(
    closed: &HashMap<Id, PeriodTotals>,
    open: HashMap<Id, PeriodTotals>,
) -> HashMap<Id, PeriodTotals> {
    let mut totals = closed.clone();
    for (id, open) in open {
        totals
            .entry(id)
            .and_modify(|total| *total = total.plus(open))
            .or_insert(open);
    }
    totals
}

impl Limiter {
    /// Start-up load and multi-instance sync: reads the current period's
    /// totals from the database (per customer, and per key family when
    /// some keys have limits of their own) and takes them in. Each
    /// counter's used becomes (database total − what this instance had
    /// committed just before the read) + this instance's own counts, so
    /// this instance's rows are never counted twice nor missed; rows
    /// committed between that moment and the read count twice until the
    /// next sync (the safe direction). Customers this limiter has not seen
    /// are added, unlimited until their limits are set. Reads the whole
    /// period: [`Limiter::sync_read`] with [`SyncRead::Whole`].
    pub async fn sync(&self, store: &dyn UsageReports) -> Result<(), StoreError> {
        self.sync_read(store, SyncRead::Whole).await.map(drop)
    }

    /// [`Limiter::sync`], reading only the open days when `wanted` is
    /// [`SyncRead::OpenDays`] and the closed days' totals kept from the
    /// last whole read are still good (the module's doc says when they are
    /// not). Returns what it read. A second sync waits for the first.
    pub async fn sync_read(
        &self,
        store: &dyn UsageReports,
        wanted: SyncRead,
    ) -> Result<SyncRead, StoreError> {
        let mut slot = self.closed.lock().await;
        let now_ns = self.now();
        let period = Self::period_at(now_ns);
        let open = open_days(period, now_ns);
        // Read before the snapshot for a whole read, after it to judge
        // kept totals: whatever made them stale before a row reached the
        // snapshot shows in the second (see `Limiter::committed`).
        let read_number = self.begin_key_read();
        let stale_before = self.closed_stale.load(Ordering::SeqCst);
        let committed = self.committed_snapshot();
        let stale_count = self.closed_stale.load(Ordering::SeqCst);
        let with_keys = !self.families.is_empty();
        let kept = slot.take().filter(|kept| {
            wanted == SyncRead::OpenDays
                && kept.stale_count == stale_count
                && kept.period == period
                && kept.open_from == open.start
        });
        let (read, closed) = match kept {
            Some(kept) => (SyncRead::OpenDays, kept),
            None => {
                let days = period.first_day()..open.start;
                let mut closed = ClosedDays {
                    period,
                    open_from: open.start,
                    stale_count: stale_before,
                    customers: HashMap::new(),
                    keys: HashMap::new(),
                };
                if !days.is_empty() {
                    closed.customers = store.period_totals(days.clone()).await?;
                    if with_keys {
                        closed.keys = store.key_period_totals(days).await?;
                    }
                }
                (SyncRead::Whole, closed)
            }
        };
        let totals = summed(&closed.customers, store.period_totals(open.clone()).await?);
        let key_totals = if with_keys {
            summed(&closed.keys, store.key_period_totals(open).await?)
        } else {
            HashMap::new()
        };
        self.apply_totals(period, &totals, &committed);
        self.apply_key_totals(period, &key_totals, &committed, read_number);
        *slot = Some(closed);
        Ok(read)
    }

    /// [`Limiter::sync_read`] on a thread of the blocking pool, as the
    /// periodic sync runs it: reading every customer's counters, decoding
    /// one row a customer and applying them takes milliseconds at tens of
    /// thousands of customers, which would hold up every request waiting
    /// on the worker that ran it. The runtime's workers only move the rows'
    /// bytes. A panic in the sync comes back as an error, so that the next
    /// tick tries again. Dropping the returned future (a stopping gateway
    /// aborts its sync) ends the sync at its next wait, so that the
    /// runtime is not left waiting for a blocking thread still reading.
    pub async fn sync_on_blocking_pool(
        self: Arc<Self>,
        store: Arc<dyn UsageReports>,
        wanted: SyncRead,
    ) -> Result<SyncRead, StoreError> {
        let runtime = tokio::runtime::Handle::current();
        // Closed when this future is dropped.
        let (_alive, dropped) = tokio::sync::oneshot::channel::<()>();
        tokio::task::spawn_blocking(move || {
            runtime.block_on(async move {
                tokio::select! {
                    // Cancellation first: once the runtime is going away,
                    // the sync's own timers must not be polled.
                    biased;
                    _ = dropped => Err(StoreError::Unavailable("the totals sync was cancelled".into())),
                    result = self.sync_read(&*store, wanted) => result,
                }
            })
        })
        .await
        .unwrap_or_else(|error| Err(StoreError::Unavailable(Box::new(error))))
    }
}

#[cfg(test)]
mod tests {
    use time::macros::{date, datetime};

    use super::*;
    use crate::limits::clock::unix_nanos;

    #[test]
    fn the_open_days_are_today_and_yesterday_within_the_period() {
        let at = |t| unix_nanos(t);
        let march = Period::new(2026, time::Month::March);
        assert_eq!(
            open_days(march, at(datetime!(2026-03-17 00:00 UTC))),
            date!(2026 - 03 - 16)..date!(2026 - 04 - 01)
        );
        assert_eq!(
            open_days(march, at(datetime!(2026-03-17 23:59:59.999 UTC))),
            date!(2026 - 03 - 16)..date!(2026 - 04 - 01)
        );
        // On the first day, yesterday is last month's: nothing is closed.
        assert_eq!(
            open_days(march, at(datetime!(2026-03-01 08:00 UTC))),
            date!(2026 - 03 - 01)..date!(2026 - 04 - 01)
        );
    }

    #[test]
    fn a_row_is_on_a_closed_day_from_the_day_before_yesterday() {
        let now = unix_nanos(datetime!(2026-03-17 00:00:01 UTC));
        let on_closed = |t| on_closed_day(unix_nanos(t), now);
        assert!(!on_closed(datetime!(2026-03-17 00:00 UTC)));
        assert!(!on_closed(datetime!(2026-03-16 00:00 UTC)));
        assert!(on_closed(datetime!(2026-03-15 23:59:59.999999999 UTC)));
        assert!(on_closed(datetime!(1969-12-31 12:00 UTC)));
        // Far from the epoch either way, no overflow.
        assert!(on_closed_day(i64::MIN, i64::MAX));
        assert!(!on_closed_day(i64::MAX, i64::MIN));
    }
}
