//! The recorder's own cost per usage row, the database left out: rows
//! recorded as the data plane records them, batched, appended to the spool
//! (fsync included) and handed to a sink that discards them, with the
//! checkpoints that follow; in batches of 1, 100 and 5,000. The naive
//! baseline beside it: only serialising the same rows to JSON in memory (no
//! framing, no checksum, no I/O, no hand-off between tasks).
//!
//! The spool lives under Cargo's target tmp dir (the project's disk, not a
//! tmpfs, so the fsync is real); set `TOLLGATE_BENCH_DIR` to measure
//! another disk. Run: `cargo bench --bench spool`; read ns/row as the time
//! divided by the rows (criterion prints elements/s).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use time::OffsetDateTime;
use tollgate_metering::usage::recorder::{self, RecorderConfig};
use tollgate_metering::usage::{CostSource, Outcome, UsageEvent, UsageSink};
use tollgate_metering::{CustomerId, KeyId, StoreError};
use uuid::Uuid;

const BATCH_SIZES: [usize; 3] = [1, 100, 5000];

fn event(i: usize) -> UsageEvent {
    let now = OffsetDateTime::now_utc();
    UsageEvent {
        id: Uuid::now_v7(),
        client_request_id: None,
        ts: now.replace_nanosecond(now.microsecond() * 1000).unwrap(),
        customer_id: CustomerId::new(),
        key_id: KeyId::new(),
        instance: "gw-eu-1".to_owned(),
        route: "openai-chat".to_owned(),
        method: "POST".to_owned(),
        path: "/v1/chat/completions".to_owned(),
        status: 200,
        outcome: Outcome::Ok,
        latency_us: 812_345 + i as u64,
        upstream_latency_us: 245_678,
        request_bytes: 1_834,
        response_bytes: 24_981,
        model: Some("gpt-4o-mini-2024-07-18".to_owned()),
        input_tokens: 412,
        output_tokens: 1_187,
        cache_read_tokens: 128,
        cache_write_tokens: 0,
        cost_nanos: 774_000,
        cost_source: CostSource::Pricing,
    }
}

fn bench_dir() -> tempfile::TempDir {
    let base = std::env::var_os("TOLLGATE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// A database that takes every batch at once and keeps nothing.
struct Discard;

#[async_trait]
impl UsageSink for Discard {
    async fn write_usage(&self, batch: &[UsageEvent]) -> Result<u64, StoreError> {
        Ok(batch.len() as u64)
    }
}

fn spool_append(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for size in BATCH_SIZES {
        let dir = bench_dir();
        let committed = Arc::new(AtomicU64::new(0));
        let config = RecorderConfig {
            batch_size: size,
            // Batches leave by size only: every run records whole batches.
            flush_interval: Duration::from_secs(3600),
            spool_dir: dir.path().to_owned(),
            spool_max: u64::MAX,
            reject_when_full: false,
            flush_metrics: Default::default(),
        };
        let hook_count = committed.clone();
        let hook: recorder::CommitHook = Arc::new(move |batch: &[UsageEvent]| {
            hook_count.fetch_add(batch.len() as u64, Ordering::Relaxed);
        });
        let handle = runtime
            .block_on(recorder::start(config, Arc::new(Discard), Some(hook)))
            .unwrap();
        let recorder = handle.recorder();
        let batch: Vec<UsageEvent> = (0..size).map(event).collect();

        let mut group = c.benchmark_group(format!("spool_append/batch_{size}"));
        group.throughput(Throughput::Elements(size as u64));
        group.sample_size(if size >= 5000 { 20 } else { 50 });
        group.measurement_time(Duration::from_secs(if size >= 5000 { 10 } else { 5 }));
        group.bench_function(BenchmarkId::new("recorder_spool_fsync", size), |b| {
            b.iter_custom(|iters| {
                let target = committed.load(Ordering::Relaxed) + iters * size as u64;
                let start = Instant::now();
                for _ in 0..iters {
                    for event in &batch {
                        let mut event = event.clone();
                        event.id = Uuid::now_v7();
                        recorder.record(event);
                    }
                }
                runtime.block_on(async {
                    while committed.load(Ordering::Relaxed) < target {
                        tokio::time::sleep(Duration::from_micros(50)).await;
                    }
                });
                start.elapsed()
            });
        });

        let mut buf = Vec::new();
        group.bench_function(BenchmarkId::new("serialize_only", size), |b| {
            b.iter(|| {
                buf.clear();
                for event in &batch {
                    let mut event = event.clone();
                    event.id = Uuid::now_v7();
                    serde_json::to_writer(&mut buf, &event).unwrap();
                    buf.push(b'\n');
                }
                std::hint::black_box(buf.len())
            });
        });
        group.finish();
        runtime.block_on(handle.shutdown(recorder::SHUTDOWN_GRACE));
    }
}

criterion_group!(benches, spool_append);
criterion_main!(benches);
