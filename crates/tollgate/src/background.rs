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
use tollgate_metering::limits::Limiter;
use tollgate_metering::telemetry::emit;
use tollgate_metering::Store;
use tollgate_proxy::{Metrics, UPKEEP_INTERVAL};

use crate::events::{TotalsSyncFailed, TotalsSyncFast, TotalsSyncRecovered, TotalsSyncSlow};

/// The totals sync takes at most a fifth of the time: the next one starts
/// no sooner than this many times the last one's duration after it.
const SYNC_SPACING: u32 = 5;

/// How long after a sync that took `took` the next one starts: `interval`,
/// or longer when the sync is slow. The sync reads the whole month's rollup,
/// which grows with customers × days (150 ms at 10,000 customers a week
/// into the month, 2.8 s at 100,000, benches/totals_sync.rs): without
/// spacing, a sync slower than its interval would run back to back and keep
/// a database connection busy for good.
fn sync_spacing(interval: Duration, took: Duration) -> Duration {
    interval.max(took.saturating_mul(SYNC_SPACING))
}

/// Refreshes the period totals every `interval` (more slowly when a sync
/// takes more than a fifth of it, [`sync_spacing`]): other instances' usage
/// reaches this one's limits within `flush_interval` + the spacing. Each
/// sync runs on the blocking pool, not on a data-plane worker: on a worker,
/// decoding and applying every customer's totals held up that worker's
/// requests for 8 ms at 10,000 customers and 120 ms at 100,000
/// (benches/totals_sync.rs).
pub(crate) async fn run_sync(store: Arc<dyn Store>, limiter: Arc<Limiter>, interval: Duration) {
    // Start-up has just synced.
    tokio::time::sleep(interval).await;
    let mut failing = false;
    let mut slow = false;
    loop {
        let started = Instant::now();
        let reports: Arc<dyn UsageReports> = store.clone();
        match limiter.clone().sync_on_blocking_pool(reports).await {
            Ok(()) if failing => {
                failing = false;
                emit(TotalsSyncRecovered);
            }
            Ok(()) => {}
            Err(error) if !failing => {
                failing = true;
                emit(TotalsSyncFailed(&error));
            }
            Err(_) => {}
        }
        let took = started.elapsed();
        let spacing = sync_spacing(interval, took);
        if spacing > interval && !slow {
            slow = true;
            emit(TotalsSyncSlow {
                took,
                every: spacing,
                interval,
            });
        } else if slow && sync_spacing(interval, took.saturating_mul(2)) == interval {
            // Back well under the limit, not just under it: no message
            // for every sync that hovers around it.
            slow = false;
            emit(TotalsSyncFast { interval });
        }
        tokio::time::sleep(spacing.saturating_sub(started.elapsed())).await;
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

    #[test]
    fn a_sync_slower_than_a_fifth_of_its_interval_is_spaced_out() {
        let second = Duration::from_secs(1);
        let ms = Duration::from_millis;
        assert_eq!(sync_spacing(second, Duration::ZERO), second);
        assert_eq!(sync_spacing(second, ms(200)), second);
        assert_eq!(sync_spacing(second, ms(201)), ms(1005));
        assert_eq!(sync_spacing(second, ms(700)), ms(3500));
        assert_eq!(sync_spacing(ms(10), ms(3)), ms(15));
        // No overflow, whatever the clock says.
        assert_eq!(sync_spacing(second, Duration::MAX), Duration::MAX);
    }
}
