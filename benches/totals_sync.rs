//! How long the periodic totals sync (`usage.sync_interval`, every second
//! by default) holds up a data-plane worker, at 10,000 and 100,000
//! customers with usage on each of the first `DAYS` days of a month (7 by
//! default: a week into it): run on the worker itself, as it was run
//! before, and on the blocking pool, as the gateway runs it now
//! (`Limiter::sync_on_blocking_pool`). The limiter's clock stands at noon
//! of the last of those days, March 2026, whatever the date.
//!
//! Each is measured reading the whole month and reading the open days only
//! (the last two: `SyncRead::OpenDays`, the closed days' totals kept from
//! the last whole read), as the gateway's syncs do between whole reads;
//! and the time of each read alone, the whole month's being the baseline
//! of the open days'.
//!
//! The runtime has one worker, as the shell benchmarks run the gateway. A
//! probe task on it yields in a loop and keeps the longest gap between
//! two of its polls: the longest a request waiting on that worker would
//! have waited for it. Each figure is the median of `RUNS` syncs (min–max
//! beside it), with the probe's longest gap over the same stretch with no
//! sync at all as the baseline.
//!
//! Run: `cargo bench --bench totals_sync` (needs the test Postgres of
//! `TOLLGATE_TEST_DATABASE_URL`; makes and drops its own database).
//! `CUSTOMERS=50000 DAYS=31 RUNS=9` change the sizes (`DAYS` at most 31).

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::macros::date;
use tollgate_metering::billing::UsageReports;
use tollgate_metering::limits::{Limiter, ManualClock, SyncRead};
use tollgate_metering::{CustomerId, Store};

mod common;
use common::{env, Bench};

/// Yields until `stop`, and returns the longest time between two of its
/// polls.
async fn probe(stop: Arc<AtomicBool>) -> Duration {
    let mut longest = Duration::ZERO;
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        tokio::task::yield_now().await;
        let now = Instant::now();
        longest = longest.max(now - last);
        last = now;
    }
    longest
}

#[derive(Clone, Copy, PartialEq)]
enum Way {
    /// The probe alone, for as long as a sync takes.
    Idle,
    /// `Limiter::sync_read` awaited on the worker.
    OnWorker(SyncRead),
    /// `Limiter::sync_on_blocking_pool`.
    BlockingPool(SyncRead),
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Idle => "no sync (baseline)",
            Way::OnWorker(SyncRead::Whole) => "whole month on the worker",
            Way::OnWorker(SyncRead::OpenDays) => "open days on the worker",
            Way::BlockingPool(SyncRead::Whole) => "whole month on the blocking pool",
            Way::BlockingPool(SyncRead::OpenDays) => "open days on the blocking pool",
        }
    }
}

/// One read alone, nothing else on the runtime; checks that it read what
/// was asked.
async fn sync_alone(limiter: &Limiter, store: &Arc<dyn Store>, read: SyncRead) -> Duration {
    let started = Instant::now();
    assert_eq!(limiter.sync_read(&**store, read).await.unwrap(), read);
    started.elapsed()
}

/// One sync the given way, with the probe beside it on the worker: the
/// probe's longest gap.
async fn measure(
    way: Way,
    limiter: &Arc<Limiter>,
    store: &Arc<dyn Store>,
    idle_for: Duration,
) -> Duration {
    let stop = Arc::new(AtomicBool::new(false));
    let probe = tokio::spawn(probe(stop.clone()));
    // Let the probe start before the sync does.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (limiter, store) = (limiter.clone(), store.clone());
    let sync = tokio::spawn(async move {
        match way {
            Way::Idle => tokio::time::sleep(idle_for).await,
            Way::OnWorker(read) => {
                assert_eq!(limiter.sync_read(&*store, read).await.unwrap(), read);
            }
            Way::BlockingPool(read) => {
                let reports: Arc<dyn UsageReports> = store;
                let done = limiter.sync_on_blocking_pool(reports, read).await;
                assert_eq!(done.unwrap(), read);
            }
        }
    });
    sync.await.unwrap();
    stop.store(true, Ordering::Relaxed);
    probe.await.unwrap()
}

fn median(mut values: Vec<Duration>) -> (Duration, Duration, Duration) {
    values.sort();
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let largest = env("CUSTOMERS", 100_000);
    let days = env("DAYS", 7).clamp(1, 31);
    let runs = env("RUNS", 5).max(1);
    let last_day = date!(2026 - 03 - 01)
        .checked_add(time::Duration::days(days as i64 - 1))
        .unwrap();
    let clock = Arc::new(ManualClock::new(
        last_day.with_hms(12, 0, 0).unwrap().assume_utc(),
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let Bench {
            db: _db,
            store,
            client,
        } = common::database().await;
        println!(
            "totals_sync: longest stall of the one data-plane worker during a sync, \
             {days} days of usage a customer, median of {runs} (min–max)"
        );
        let mut loaded = 0;
        for customers in [largest / 10, largest] {
            // The month's rollup: one row a day for each new customer, from
            // the 1st to the clock's day, day after day, as the gateway
            // fills it (a day's rows are added as its first requests come).
            client
                .execute(
                    "WITH c AS MATERIALIZED \
                       (SELECT gen_random_uuid() AS id FROM generate_series(1, $1::int)) \
                     INSERT INTO usage_customer_daily (day, customer_id, requests, rejected, \
                       errors, input_tokens, output_tokens, cache_read_tokens, \
                       cache_write_tokens, request_bytes, response_bytes, cost_nanos) \
                     SELECT day, c.id, 100, 1, 0, 1000, 500, 0, 0, 4000, 9000, 700000 \
                     FROM c, generate_series('2026-03-01'::date, $2::date, '1 day') AS day \
                     ORDER BY day",
                    &[&i32::try_from(customers - loaded).unwrap(), &last_day],
                )
                .await
                .unwrap();
            client
                .batch_execute("ANALYZE usage_customer_daily")
                .await
                .unwrap();
            loaded = customers;
            let limiter = Arc::new(Limiter::new(clock.clone()));
            // The first sync adds every customer, as at start-up.
            limiter.sync(&*store).await.unwrap();
            let row = client
                .query_one(
                    "SELECT count(DISTINCT customer_id), \
                     (array_agg(customer_id))[1], \
                     (SELECT sum(requests)::bigint FROM usage_customer_daily AS d \
                      WHERE d.customer_id = (array_agg(u.customer_id))[1]) \
                     FROM usage_customer_daily AS u",
                    &[],
                )
                .await
                .unwrap();
            let (count, customer, requests): (i64, uuid::Uuid, i64) =
                (row.get(0), row.get(1), row.get(2));
            assert_eq!(
                count,
                i64::try_from(customers).unwrap(),
                "one id a customer"
            );
            let view = limiter.view(CustomerId(customer));
            assert_eq!(
                view.requests.used,
                u64::try_from(requests).unwrap(),
                "the sync took in the month's totals"
            );

            // Each read alone, nothing else on the runtime.
            let mut alone = Vec::new();
            for read in [SyncRead::Whole, SyncRead::OpenDays] {
                let mut times = Vec::new();
                for _ in 0..runs {
                    times.push(sync_alone(&limiter, &store, read).await);
                }
                alone.push((read, median(times)));
            }

            let mut results = Vec::new();
            for way in [
                Way::OnWorker(SyncRead::Whole),
                Way::BlockingPool(SyncRead::Whole),
                Way::OnWorker(SyncRead::OpenDays),
                Way::BlockingPool(SyncRead::OpenDays),
            ] {
                let mut stalls = Vec::new();
                for _ in 0..runs {
                    stalls.push(measure(way, &limiter, &store, Duration::ZERO).await);
                }
                results.push((way, median(stalls)));
            }
            let whole_time = alone[0].1 .0;
            let mut idle = Vec::new();
            for _ in 0..runs {
                idle.push(measure(Way::Idle, &limiter, &store, whole_time).await);
            }
            results.insert(0, (Way::Idle, median(idle)));
            println!("{customers} customers");
            let line = |what: &str, (stall, low, high): (Duration, Duration, Duration)| {
                println!(
                    "  {what:<40} {:>8.2} ms  ({:.2}–{:.2})",
                    ms(stall),
                    ms(low),
                    ms(high)
                );
            };
            println!(" longest stall of the worker");
            for (way, stall) in results {
                line(way.name(), stall);
            }
            println!(" the read's own time, alone");
            for (read, time) in &alone {
                let what = match read {
                    SyncRead::Whole => "whole month (baseline)",
                    SyncRead::OpenDays => "open days",
                };
                line(what, *time);
            }
            println!(
                "  open days / whole month: {:.3}",
                alone[1].1 .0.as_secs_f64() / whole_time.as_secs_f64()
            );
        }
    });
}
