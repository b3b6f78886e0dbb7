//! The recorder (spooler and writer) in front of a real Postgres whose
//! writes keep stalling: every event reaches the database exactly once,
//! however often the writer fell behind what the spool keeps in memory and
//! read batches back from disk.

#![allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tollgate_metering::usage::recorder::{self, RecorderConfig};
use tollgate_metering::{CustomerId, KeyId};
use tollgate_store::testing::{test_store, usage_event, Backend};

/// A recorder spooling under `dir`, with room to spare and small batches.
fn spooling_to(
    dir: &std::path::Path,
    batch_size: usize,
    flush_interval: Duration,
) -> RecorderConfig {
    RecorderConfig {
        batch_size,
        flush_interval,
        spool_dir: dir.join("spool"),
        spool_max: 1 << 30,
        reject_when_full: true,
        flush_metrics: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_keeps_stalling_loses_and_doubles_no_row() {
    // Tiny batches, so that within each stall more are appended than the
    // spool keeps in memory, over and over, and the writer switches between
    // reading them back from disk and taking them from memory.
    let (store, guard) = test_store(Backend::Postgres).await;
    let dir = tempfile::tempdir().unwrap();
    let config = spooling_to(dir.path(), 5, Duration::from_millis(2));
    let running = recorder::start(config, store, None).await.unwrap();
    let recorder = running.recorder();

    let (locker, connection) = tokio_postgres::connect(guard.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let stalls = tokio::spawn(async move {
        for _ in 0..30 {
            locker
                .batch_execute("BEGIN; LOCK TABLE usage_daily IN ACCESS EXCLUSIVE MODE")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(25)).await;
            locker.batch_execute("COMMIT").await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let (customer, key) = (CustomerId::new(), KeyId::new());
    let mut recorded = 0u64;
    while !stalls.is_finished() {
        for _ in 0..20 {
            recorder.record(usage_event(customer, key, OffsetDateTime::now_utc()));
        }
        recorded += 20;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stalls.await.unwrap();
    // Everything reaches the database once the stalls end, with no more
    // events to push it along and before any shutdown.
    let stats = recorder.stats().clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.rows_written.load(Ordering::Relaxed) < recorded && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stats.rows_spooled.load(Ordering::Relaxed), recorded);
    assert_eq!(
        stats.rows_written.load(Ordering::Relaxed),
        recorded,
        "every row written once, none left in the spool"
    );
    drop(recorder);
    running.shutdown(recorder::SHUTDOWN_GRACE).await;
    assert_eq!(stats.rows_written.load(Ordering::Relaxed), recorded);
    let counts = guard
        .raw(
            "SELECT (SELECT count(*) FROM usage_events)::text,
                    (SELECT count(DISTINCT id) FROM usage_events)::text,
                    (SELECT sum(requests) FROM usage_daily)::text",
        )
        .await;
    let recorded = Some(recorded.to_string());
    assert_eq!(
        counts[0],
        vec![recorded.clone(), recorded.clone(), recorded],
        "rows, distinct ids, requests rolled up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_one_connection_takes_both_writes_in_turn() {
    // The writer keeps up to two writes going, each on a connection of its
    // own. With `pool_size = 1` the second waits for the first's connection;
    // nothing may fail or stall for the pool's wait bound (5 s) meanwhile.
    let guard = tollgate_store::testing::TestGuard::create(Backend::Postgres).await;
    let store = tollgate_store::open(guard.url(), 1).await.unwrap();
    store.migrate().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = spooling_to(dir.path(), 50, Duration::from_millis(1));
    let running = recorder::start(config, store, None).await.unwrap();
    let recorder = running.recorder();
    let stats = recorder.stats().clone();
    let (customer, key) = (CustomerId::new(), KeyId::new());
    let started = Instant::now();
    let mut recorded = 0u64;
    // Bursts of several batches, so that a second write is always ready
    // while the first is with the database.
    for _ in 0..40 {
        for _ in 0..200 {
            recorder.record(usage_event(customer, key, OffsetDateTime::now_utc()));
        }
        recorded += 200;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.rows_written.load(Ordering::Relaxed) < recorded && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    assert_eq!(stats.rows_written.load(Ordering::Relaxed), recorded);
    assert_eq!(
        stats.write_failures.load(Ordering::Relaxed),
        0,
        "no write gave up waiting for the one connection"
    );
    assert!(
        took < Duration::from_secs(4),
        "{recorded} rows took {took:?}: a write waited out the pool's bound"
    );
    drop(recorder);
    running.shutdown(recorder::SHUTDOWN_GRACE).await;
    let counts = guard
        .raw("SELECT count(*)::text, count(DISTINCT id)::text FROM usage_events")
        .await;
    let recorded = Some(recorded.to_string());
    assert_eq!(
        counts[0],
        vec![recorded.clone(), recorded],
        "rows, distinct ids"
    );
}
