//! The gateway's background loops: each runs for the life of the process,
//! owns nothing the request path waits for, and logs a failure once per
//! outage rather than once per attempt.
//!
//! The key feed (`tollgate_metering::keys::run_feed`) and the usage
//! recorder run beside these; they live with what they feed.
//!
//! # Failure behaviour
//! A failed totals sync leaves the limits on the last totals plus this
//! instance's own counts; the next tick tries again.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tollgate_metering::billing::UsageReports;
use tollgate_metering::limits::{Limiter, SyncRead};
use tollgate_metering::telemetry::emit;
use tollgate_proxy::{Metrics, UPKEEP_INTERVAL};

use crate::events::{TotalsSyncFailed, TotalsSyncFast, TotalsSyncRecovered, TotalsSyncSlow};

/// The totals sync takes at most a fifth of the time: the next one starts
/// no sooner than this many times the last one's duration after it.
const SYNC_SPACING: u32 = 5;

/// A sync shorter than this is never spaced out, whatever the interval: it
/// costs the database little, and short test intervals stay exact.
const SLOW_SYNC: Duration = Duration::from_millis(100);

/// Syncs are never further apart than this (or `sync_interval`, if
/// longer), however slow they get.
const MAX_SYNC_SPACING: Duration = Duration::from_secs(60);

/// Most syncs read only the open days (today and yesterday) and keep the
/// closed days' totals of the last whole read ([`SyncRead::OpenDays`]);
/// the whole period is read again this long after the start of the last
/// whole read, or [`SYNC_SPACING`] times its duration if that is longer.
/// Rows that another instance commits for a closed day (its spool
/// replaying old rows) reach this instance's limits then.
const WHOLE_SYNC_EVERY: Duration = Duration::from_secs(60);

/// How long after the start of a sync that took `took` the next one starts:
/// `interval`, or longer when the sync is slow. A whole read of the month's
/// rollup grows with customers × days (0.5 s at 10,000 customers at the end
/// of the month, 8 s at 100,000, benches/totals_sync.rs), a read of the
/// open days with the customers active on them (65 ms, 1.1 s): without
/// spacing, a sync slower than its interval would run back to back and
/// keep a database connection busy for good.
fn sync_spacing(interval: Duration, took: Duration) -> Duration {
    if took < SLOW_SYNC {
        return interval;
    }
    took.saturating_mul(SYNC_SPACING)
        .min(MAX_SYNC_SPACING)
        .max(interval)
}

/// The pace of the totals sync: when the next one starts, what it reads,
/// and when the pace changed enough to say so.
struct SyncPace {
    interval: Duration,
    /// The spacing after the last read of the open days: the pace.
    spacing: Duration,
    /// The spacing last reported as slow; `None` while syncs are fast.
    reported: Option<Duration>,
    /// Until the next whole read is due.
    until_whole: Duration,
}

/// A change of pace worth a log line.
#[derive(Debug, PartialEq)]
enum PaceChange {
    /// Syncing every `every` instead of `sync_interval`: the first time,
    /// and again whenever the spacing doubles (it grows with the customers
    /// active on the open days).
    Slower { every: Duration },
    /// Back to every `sync_interval`, well under the limit rather than just
    /// under it, so that a sync hovering at it is not logged every time.
    Normal,
}

impl SyncPace {
    /// After start-up, which has just read the whole period.
    fn new(interval: Duration) -> SyncPace {
        SyncPace {
            interval,
            spacing: interval,
            reported: None,
            until_whole: WHOLE_SYNC_EVERY,
        }
    }

    /// What the next sync should read.
    fn wanted(&self) -> SyncRead {
        if self.until_whole.is_zero() {
            SyncRead::Whole
        } else {
            SyncRead::OpenDays
        }
    }

    /// After a sync that took `took` and read `read`, or failed (`None`):
    /// the time from its start to the next one's, and the change to log.
    /// A failed sync's time is a timeout's, not the work's: it is retried
    /// after `interval`, and says nothing about the pace. Nor does a whole
    /// read, now and then among reads of the open days: the next sync
    /// keeps the pace, and the next whole read is spaced out by this one's
    /// time ([`WHOLE_SYNC_EVERY`]), so that whole reads take at most a
    /// fifth of the time too.
    fn next(&mut self, took: Duration, read: Option<SyncRead>) -> (Duration, Option<PaceChange>) {
        let (spacing, change) = match read {
            None => (self.interval, None),
            Some(SyncRead::Whole) => {
                self.until_whole = took.saturating_mul(SYNC_SPACING).max(WHOLE_SYNC_EVERY);
                (self.spacing, None)
            }
            Some(SyncRead::OpenDays) => self.open_days_read(took),
        };
        self.until_whole = self.until_whole.saturating_sub(spacing.max(took));
        (spacing, change)
    }

    fn open_days_read(&mut self, took: Duration) -> (Duration, Option<PaceChange>) {
        let spacing = sync_spacing(self.interval, took);
        self.spacing = spacing;
        let change = match self.reported {
            None if spacing > self.interval => Some(PaceChange::Slower { every: spacing }),
            Some(last) if spacing >= last.saturating_mul(2) => {
                Some(PaceChange::Slower { every: spacing })
            }
            Some(_) if sync_spacing(self.interval, took.saturating_mul(2)) == self.interval => {
                Some(PaceChange::Normal)
            }
            _ => None,
        };
        match change {
            Some(PaceChange::Slower { every }) => self.reported = Some(every),
            Some(PaceChange::Normal) => self.reported = None,
            None => {}
        }
        (spacing, change)
    }
}

/// Refreshes the period totals every `interval` (more slowly when syncs
/// are slow, [`SyncPace`]): other instances' usage reaches this one's
/// limits within `flush_interval` + the spacing. Each sync runs on the
/// blocking pool, not on a data-plane worker: on a worker, decoding and
/// applying every customer's totals held up that worker's requests for
/// 8–10 ms at 10,000 customers and 107–119 ms at 100,000
/// (benches/totals_sync.rs).
pub(crate) async fn run_sync(
    reports: Arc<dyn UsageReports>,
    limiter: Arc<Limiter>,
    interval: Duration,
) {
    // Start-up has just synced.
    tokio::select! {
        () = tokio::time::sleep(interval) => {}
        () = limiter.totals_wanted() => {}
    }
    let mut failing = false;
    let mut pace = SyncPace::new(interval);
    loop {
        let started = Instant::now();
        let result = limiter
            .clone()
            .sync_on_blocking_pool(reports.clone(), pace.wanted())
            .await;
        let took = started.elapsed();
        match result {
            Ok(_) if failing => {
                failing = false;
                emit(TotalsSyncRecovered);
            }
            Ok(_) => {}
            Err(ref error) if !failing => {
                failing = true;
                emit(TotalsSyncFailed(error));
            }
            Err(_) => {}
        }
        let (spacing, change) = pace.next(took, result.ok());
        match change {
            Some(PaceChange::Slower { every }) => emit(TotalsSyncSlow {
                took,
                every,
                interval,
            }),
            Some(PaceChange::Normal) => emit(TotalsSyncFast { interval }),
            None => {}
        }
        // A key given its first limits waits for its month's usage: read
        // at once rather than at the next tick.
        tokio::select! {
            () = tokio::time::sleep(spacing.saturating_sub(started.elapsed())) => {}
            () = limiter.totals_wanted() => {}
        }
    }
}

/// Folds histogram samples in between scrapes, every [`UPKEEP_INTERVAL`].
///
/// The folding runs on the blocking pool, not on a data-plane worker: it
/// takes every sample of the last interval (several per request), which at
/// tens of thousands of requests a second is milliseconds of work that
/// would hold up every request waiting on that worker.
pub(crate) fn spawn_upkeep(metrics: Arc<Metrics>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(UPKEEP_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let metrics = metrics.clone();
            // A panic in the exporter is its own: the next tick tries again.
            let _ = tokio::task::spawn_blocking(move || metrics.upkeep()).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn a_sync_slower_than_a_fifth_of_its_interval_is_spaced_out() {
        let second = ms(1_000);
        assert_eq!(sync_spacing(second, Duration::ZERO), second);
        assert_eq!(sync_spacing(second, ms(200)), second);
        assert_eq!(sync_spacing(second, ms(201)), ms(1005));
        assert_eq!(sync_spacing(second, ms(700)), ms(3500));
        // Short syncs are never spaced out, whatever the interval.
        assert_eq!(sync_spacing(ms(200), ms(99)), ms(200));
        assert_eq!(sync_spacing(ms(200), ms(100)), ms(500));
        // At most a minute apart, unless the interval is longer.
        assert_eq!(sync_spacing(second, ms(30_000)), ms(60_000));
        assert_eq!(sync_spacing(ms(120_000), ms(30_000)), ms(120_000));
        // No overflow, whatever the clock says.
        assert_eq!(sync_spacing(second, Duration::MAX), ms(60_000));
    }

    #[test]
    fn the_pace_is_logged_when_it_slows_doubles_and_recovers_not_at_every_sync() {
        let mut pace = SyncPace::new(ms(1_000));
        let open = Some(SyncRead::OpenDays);
        let slower = |every| Some(PaceChange::Slower { every });
        assert_eq!(pace.next(ms(50), open), (ms(1_000), None));
        assert_eq!(pace.next(ms(300), open), (ms(1_500), slower(ms(1_500))));
        // Slower, but not twice as slow: no new line.
        assert_eq!(pace.next(ms(500), open), (ms(2_500), None));
        assert_eq!(pace.next(ms(600), open), (ms(3_000), slower(ms(3_000))));
        // A failure's time is a timeout's: retried at the interval, and
        // the pace stays as reported.
        assert_eq!(pace.next(ms(5_000), None), (ms(1_000), None));
        assert_eq!(pace.next(ms(700), open), (ms(3_500), None));
        // Just under the limit: fast, but not yet said to be.
        assert_eq!(pace.next(ms(150), open), (ms(1_000), None));
        assert_eq!(
            pace.next(ms(100), open),
            (ms(1_000), Some(PaceChange::Normal))
        );
        assert_eq!(pace.next(ms(60), open), (ms(1_000), None));
        // Slow again: said again.
        assert_eq!(pace.next(ms(250), open), (ms(1_250), slower(ms(1_250))));
    }

    #[test]
    fn the_whole_period_is_read_a_minute_or_five_whole_reads_apart_at_the_same_pace() {
        let open = Some(SyncRead::OpenDays);
        let whole = Some(SyncRead::Whole);
        let mut pace = SyncPace::new(ms(1_000));
        // Start-up read the whole period: the next 60 syncs a second apart
        // read the open days.
        for _ in 0..60 {
            assert_eq!(pace.wanted(), SyncRead::OpenDays);
            pace.next(ms(20), open);
        }
        assert_eq!(pace.wanted(), SyncRead::Whole);
        // A failed whole read is wanted again.
        pace.next(ms(5_000), None);
        assert_eq!(pace.wanted(), SyncRead::Whole);
        assert_eq!(pace.next(ms(900), whole), (ms(1_000), None));
        for _ in 0..59 {
            assert_eq!(pace.wanted(), SyncRead::OpenDays);
            pace.next(ms(20), open);
        }
        assert_eq!(pace.wanted(), SyncRead::Whole);

        // Slow reads of the open days set the pace, and it is reported
        // once. A slow whole read changes neither the pace nor the report:
        // the next sync comes at the pace, the next whole read five times
        // the whole read's time after its start.
        let slower = |every| Some(PaceChange::Slower { every });
        assert_eq!(pace.next(ms(400), open), (ms(2_000), slower(ms(2_000))));
        assert_eq!(pace.wanted(), SyncRead::Whole);
        assert_eq!(pace.next(ms(30_000), whole), (ms(2_000), None));
        let mut since = ms(30_000);
        while pace.wanted() == SyncRead::OpenDays {
            assert_eq!(pace.next(ms(400), open), (ms(2_000), None));
            since += ms(2_000);
        }
        assert_eq!(since, ms(150_000));
        // The pace is reported back to normal by a read of the open days
        // only.
        assert_eq!(pace.next(ms(20), whole), (ms(2_000), None));
        assert_eq!(
            pace.next(ms(20), open),
            (ms(1_000), Some(PaceChange::Normal))
        );
        // A whole read longer than a minute, and syncs longer than their
        // spacing, count their own time: never back to back.
        let mut pace = SyncPace::new(ms(10));
        pace.next(ms(100_000), whole);
        pace.next(ms(350_000), None);
        assert_eq!(pace.wanted(), SyncRead::OpenDays);
        pace.next(ms(50_000), None);
        assert_eq!(pace.wanted(), SyncRead::Whole);
    }
}
