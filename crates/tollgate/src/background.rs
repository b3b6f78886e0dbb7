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
use tollgate_metering::limits::Limiter;
use tollgate_metering::telemetry::emit;
use tollgate_metering::Store;
use tollgate_proxy::{Metrics, UPKEEP_INTERVAL};

use crate::events::{TotalsSyncFailed, TotalsSyncRecovered};

/// Refreshes the period totals every `interval`: other instances' usage
/// reaches this one's limits within `flush_interval + interval`.
pub(crate) async fn run_sync(store: Arc<dyn Store>, limiter: Arc<Limiter>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut failing = false;
    loop {
        ticker.tick().await;
        match limiter.sync(&*store).await {
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
